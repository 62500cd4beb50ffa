"""Hugging Face adapters: the book's geometry probes on Mixtral, Qwen2-MoE (Qwen1.5-MoE), OLMoE and Qwen3-MoE.

Needs the ``hf`` extra (transformers 5.x, accelerate): ``pip install "moewidgets[hf]"``. ``import moewidgets``
never imports transformers; this subpackage does, when you import it.

* :func:`~moewidgets.hf.blocks.moe_blocks`: the sparse MoE blocks of a model, keyed by decoder-layer index;
* :func:`~moewidgets.hf.blocks.expert_bank`: a block's fused experts as a SwiGLU bank view (no copies), which
  every ``moewidgets.geometry`` function takes unchanged;
* :func:`~moewidgets.hf.capture.trace_hf`: one forward pass → a :class:`~moewidgets.trace.RoutingTrace` per layer;
* :func:`~moewidgets.hf.probing.probe`: routing summary, Jacobian spectra, cross-expert alignment with its null and
  ceiling, and weighted PCA per layer, from a registry of metrics (:data:`~moewidgets.hf.metrics.METRICS`).

A researcher with Mixtral-8x7B on their own GPU machine (about 93 GB in bf16: one H200, or ``device_map="auto"``
over several GPUs; what does not fit is offloaded by accelerate and brought in layer by layer)::

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moewidgets.hf import probe, trace_hf

    name = "mistralai/Mixtral-8x7B-v0.1"
    tok = AutoTokenizer.from_pretrained(name)
    tok.pad_token = tok.eos_token                    # Mixtral's tokenizer has no pad token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, device_map="auto")
    texts = [line for line in open("wiki.test.raw") if len(line) > 200][:16]      # any text you like
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    res = probe(model, batch.input_ids, layers=[0, 15, 31], attention_mask=batch.attention_mask,
                metric_options={"spectra": {"max_points": 64}})
    for row in res.summary():                        # one flat dict per layer
        print(row["layer"], row["max_vio"], row["spectra_sigma1"], row["alignment_mean_abs"],
              row["alignment_null_level"], row["alignment_ceiling"], row["pca_erank_entropy"])
    res[15]["alignment"].matrix                      # (8, 8) cosines of the experts' mean Jacobians
    traces = trace_hf(model, batch.input_ids, layers=[15], attention_mask=batch.attention_mask)

Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

try:
    import transformers as _transformers
except ImportError as err:                                   # pragma: no cover - depends on the environment
    raise ImportError('moewidgets.hf needs transformers 5.x and accelerate: pip install "moewidgets[hf]"') from err

if int(_transformers.__version__.split(".")[0]) < 5:          # pragma: no cover
    raise ImportError(f"moewidgets.hf needs transformers>=5,<6 (fused 3-d experts); found "
                      f"{_transformers.__version__}: pip install \"moewidgets[hf]\"")

from .blocks import SUPPORTED_FAMILIES, HFMoEBlock, expert_bank, mlp_bank, model_family, moe_blocks  # noqa: E402
from .capture import select_layers, trace_hf  # noqa: E402
from .metrics import (METRICS, WEIGHTINGS, InputPCA, LayerInputs, Metric, RoutingSummary,  # noqa: E402
                      SharedExpertProbe, routed_mean_jacobians, routed_spectra, routing_summary)
from .probing import LayerProbe, ModelProbe, probe  # noqa: E402

__all__ = ["probe", "trace_hf", "moe_blocks", "expert_bank", "mlp_bank", "model_family", "select_layers",
           "SUPPORTED_FAMILIES", "HFMoEBlock", "METRICS", "Metric", "LayerInputs", "LayerProbe", "ModelProbe",
           "RoutingSummary", "routing_summary", "SharedExpertProbe", "InputPCA", "routed_spectra",
           "routed_mean_jacobians", "WEIGHTINGS"]
