"""One entry point, :func:`~moewidgets.hf.probing.probe`: the metrics of :data:`~moewidgets.hf.metrics.METRICS` on
the MoE layers of a Hugging Face model, one :class:`~moewidgets.hf.probing.LayerProbe` per layer.

Shape legend: N probe tokens, D model width, E routed experts, K top-k.

Per requested layer, :func:`~moewidgets.hf.probing.probe` captures the routing
(:func:`~moewidgets.hf.capture.trace_hf`), summarises it (:func:`~moewidgets.hf.metrics.routing_summary`: loads,
MaxVio, Switch aux loss, routing entropy) and runs each chosen metric; results are moved to the CPU.
Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch

from ..geometry.alignment import make_generator
from ..trace import RoutingTrace
from .blocks import model_family, moe_blocks
from .capture import select_layers, trace_hf
from .metrics import DEFAULT_METRICS, METRICS, WEIGHTINGS, LayerInputs, RoutingSummary, SharedExpertProbe, routing_summary

__all__ = ["probe", "ModelProbe", "LayerProbe"]


# --------------------------------------------------------------------------------------------------- results

def _to_cpu(obj):
    """Every tensor in a result (dataclasses, dicts, lists) moved to the CPU, detached."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in fields(obj)})
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass
class LayerProbe:
    """Everything :func:`~moewidgets.hf.probing.probe` measured on one MoE layer (tensors on the CPU).

    Fields::

        layer:    decoder-layer index.
        routing:  RoutingSummary (loads, MaxVio, aux loss, entropy).
        metrics:  {metric name: result}, e.g. ``metrics["spectra"]`` a
                  WeightedSpectra; ``layer_probe["spectra"]`` works too.
        trace:    the layer's RoutingTrace.
        wall_s:   seconds spent on this layer's metrics.
    """

    layer: int
    routing: RoutingSummary
    metrics: dict[str, Any]
    trace: RoutingTrace
    wall_s: float

    def __getitem__(self, name: str) -> Any:
        if name not in self.metrics:
            raise KeyError(f"metric {name!r} was not computed; computed: {sorted(self.metrics)}")
        return self.metrics[name]

    @property
    def shared(self) -> SharedExpertProbe | None:
        """The shared expert's probe (Qwen2-MoE), else None."""
        return self.metrics.get("shared_expert")

    def summary(self) -> dict[str, float | int | str]:
        """One flat row: routing numbers, then ``<metric>_<key>`` for each metric's summary."""
        r = self.routing
        row: dict[str, float | int | str] = {"layer": self.layer, "n_tokens": r.n_tokens, "n_experts": r.n_experts,
                                             "k": r.k, "gate": r.gate, "max_vio": r.max_vio,
                                             "aux_loss": r.aux_loss, "entropy": r.entropy, "n_dead": r.n_dead}
        for name, result in self.metrics.items():
            row.update({f"{name}_{k}": v for k, v in METRICS[name].summary(result).items()})
        return row

    def __repr__(self) -> str:
        return f"LayerProbe(layer={self.layer}, n_tokens={self.routing.n_tokens}, metrics={list(self.metrics)})"


@dataclass
class ModelProbe:
    """:func:`~moewidgets.hf.probing.probe`'s result: one :class:`~moewidgets.hf.probing.LayerProbe` per MoE layer,
    keyed by decoder-layer index.

    Fields::

        family:   config.model_type.
        layers:   {layer index: LayerProbe}; ``result[3]`` is ``result.layers[3]``.
        metrics:  the metric names computed.
        weights:  "gates" | "membership".
        n_tokens: probe tokens (after the attention mask).
        wall_s:   total seconds (forward pass included).
    """

    family: str
    layers: dict[int, LayerProbe]
    metrics: tuple[str, ...]
    weights: str
    n_tokens: int
    wall_s: float = field(default=0.0)

    def __getitem__(self, layer: int) -> LayerProbe:
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not probed; probed: {sorted(self.layers)}")
        return self.layers[layer]

    def summary(self) -> list[dict[str, float | int | str]]:
        """One flat row per layer (:meth:`~moewidgets.hf.probing.LayerProbe.summary`), ready for
        ``pandas.DataFrame`` or a JSONL file."""
        return [lp.summary() for lp in self.layers.values()]

    def __repr__(self) -> str:
        return (f"ModelProbe(family={self.family!r}, layers={sorted(self.layers)}, metrics={list(self.metrics)}, "
                f"weights={self.weights!r}, n_tokens={self.n_tokens})")


# ----------------------------------------------------------------------------------------------------- probe

@contextlib.contextmanager
def _onloaded(module: torch.nn.Module):
    """Weights offloaded by accelerate (device_map with CPU/disk offload) brought to the execution device."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield


def probe(model: torch.nn.Module, input_ids: torch.Tensor, layers: int | Iterable[int] | None = None, *,
          attention_mask: torch.Tensor | None = None, metrics: Iterable[str] | None = None,
          weights: str = "gates", generator: torch.Generator | int | None = None,
          metric_options: Mapping[str, Mapping[str, Any]] | None = None) -> ModelProbe:
    """Run the geometry probes on the MoE layers of a Hugging Face model (module docstring for the metrics).

    The model is run once on ``input_ids`` (stopping after the last requested layer); each layer's block
    inputs and routing are captured (:func:`~moewidgets.hf.capture.trace_hf`), and every metric runs on them with
    the routing weights ``w_ne`` = the gate of expert e for token n (``weights="gates"``) or 1 if e was selected
    (``"membership"``). It never loads weights: pass a model you loaded (any dtype, CPU, GPU or device_map).

    Args:
        model: Mixtral, Qwen2-MoE (Qwen1.5-MoE), OLMoE or Qwen3-MoE (``moewidgets.hf.SUPPORTED_FAMILIES``).
        input_ids: (B, S) or (S,) token ids: the probe tokens (N = B·S, minus masked positions).
        layers: MoE decoder-layer indices (None = all).
        attention_mask: optional (B, S) 0/1; masked positions are not probed.
        metrics: names from :data:`~moewidgets.hf.metrics.METRICS`: "spectra", "alignment", "pca", "shared_expert"
            (these four are the default, None) and "subspaces" (Grassmann distances with their references).
        weights: "gates" or "membership".
        generator: torch.Generator or int seed (None = 0) for the spectra subset, the split-half and the null.
        metric_options: per-metric keyword options, e.g. ``{"spectra": {"max_points": 64}}`` (the
            ``*_metric`` functions' keywords: spectra max_points/keep_sv, alignment min_points/n_null_pairs/
            keep_mean_jacobians, pca n_components/fraction, shared_expert max_points, subspaces
            rank/n_draws/n_splits).

    A researcher with Mixtral-8x7B on their own GPU machine (bf16 weights; the probes run in float32)::

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from moewidgets.hf import probe

        name = "mistralai/Mixtral-8x7B-v0.1"
        tok = AutoTokenizer.from_pretrained(name)
        tok.pad_token = tok.eos_token                    # Mixtral's tokenizer has no pad token
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, device_map="auto")
        texts = [line for line in open("wiki.test.raw") if len(line) > 200][:16]      # any text you like
        batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        res = probe(model, batch.input_ids, layers=[0, 15, 31], attention_mask=batch.attention_mask,
                    metric_options={"spectra": {"max_points": 64}})
        res.summary()                                    # one flat dict per layer
        res[15]["alignment"].matrix                      # (8, 8) cosines of the experts' mean Jacobians

    Cost: "spectra" forms one D×D Jacobian and one SVD per routed (token, expert) pair, K·max_points of them
    per layer (at Mixtral's D = 4096, F = 14336 about 1 TFLOP plus a 4096² SVD each: keep max_points small);
    "alignment" and "pca" are O(N·E·F·D + E·F·D²) and O(N·E·D² + E·D³), cheap next to it.

    >>> from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    >>> model = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     moe_intermediate_size=8, shared_expert_intermediate_size=24, num_hidden_layers=2,
    ...     num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))
    >>> res = probe(model, torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1)))
    >>> res
    ModelProbe(family='qwen2_moe', layers=[0, 1], metrics=['spectra', 'alignment', 'pca', 'shared_expert'],
               weights='gates', n_tokens=64)
    >>> tuple(res[1]["spectra"].sigma1.shape), tuple(res[1]["alignment"].matrix.shape), res[1].shared.d_hidden
    ((4,), (4, 4), 24)

    Chapter 2 (book/chapter2.ipynb).
    """
    t0 = time.perf_counter()
    family = model_family(model)
    names = DEFAULT_METRICS if metrics is None else tuple(dict.fromkeys([metrics] if isinstance(metrics, str)
                                                                       else metrics))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"metrics={metrics!r}: {unknown or 'none given'}; choose from {list(METRICS)}")
    if weights not in WEIGHTINGS:
        raise ValueError(f"weights={weights!r} must be one of {WEIGHTINGS}")
    options = dict(metric_options or {})
    for name, opts in options.items():
        if name not in names:
            raise ValueError(f"metric_options names {name!r}, which is not among the metrics run: {list(names)}")
        try:
            inspect.signature(METRICS[name].compute).bind(None, **opts)
        except TypeError as err:
            raise ValueError(f"metric_options[{name!r}]={dict(opts)!r} does not fit {name}: {err}") from None
        if METRICS[name].check is not None:
            METRICS[name].check(**opts)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=make_generator(generator)))
    blocks = moe_blocks(model)
    wanted = select_layers(blocks, layers)
    traces = trace_hf(model, input_ids, wanted, attention_mask=attention_mask)

    out: dict[int, LayerProbe] = {}
    for layer in wanted:
        t1 = time.perf_counter()
        block, trace = blocks[layer], traces.pop(layer)          # pop: free each layer's device copy when done
        with _onloaded(block.module):
            bank = block.bank()
            device = bank.w_gate_EFD.device
            w_NE = trace.gate_matrix() if weights == "gates" else trace.membership()
            inputs = LayerInputs(layer=layer, block=block, bank=bank, trace=trace,
                                 x_ND=trace.x_TD.to(device=device, dtype=torch.float32),
                                 weights_NE=w_NE.to(device=device, dtype=torch.float32), weights=weights,
                                 seed=(seed + 7919 * layer) % 2 ** 63)
            results = {name: _to_cpu(METRICS[name].compute(inputs, **options.get(name, {}))) for name in names}
        out[layer] = LayerProbe(layer=layer, routing=routing_summary(trace, block.gate), metrics=results,
                                trace=_to_cpu(trace), wall_s=time.perf_counter() - t1)
    n_tokens = next(iter(out.values())).routing.n_tokens
    return ModelProbe(family=family, layers=out, metrics=names, weights=weights, n_tokens=n_tokens,
                      wall_s=time.perf_counter() - t0)
