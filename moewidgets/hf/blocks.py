"""Finding the MoE blocks of a Hugging Face model and viewing their experts as a moewidgets expert bank.

Shape legend: T tokens, D model width (``hidden_size``), F expert hidden width (``intermediate_size`` or
``moe_intermediate_size``), E routed experts, K top-k.

transformers 5 stores a block's routed experts as two fused 3-d parameters (``experts.gate_up_proj`` (E, 2F, D),
``experts.down_proj`` (E, D, F)) and computes, for expert e (``MixtralExperts.forward`` and its copies)::

    gate, up = (x @ gate_up_proj[e].T).chunk(2)     # gate = rows 0..F-1, up = rows F..2F-1
    E_e(x)   = down_proj[e] @ (silu(gate) * up)

so the bank view is ``w_gate_EFD = gate_up_proj[:, :F]``, ``w_up_EFD = gate_up_proj[:, F:]``,
``w_out_EDF = down_proj``: slices of the model's own parameters (no copies, the model's dtype and device).
Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..geometry.alignment import SwiGLUBankView

__all__ = ["SUPPORTED_FAMILIES", "HFMoEBlock", "moe_blocks", "expert_bank", "mlp_bank", "model_family"]


@dataclass(frozen=True)
class _Family:
    """What differs between the supported families (everything else is the shared transformers-5 layout)."""

    label: str              # the name people use
    module: str             # transformers module holding the block class
    block_class: str        # the sparse MoE block
    always_renorm: bool     # Mixtral renormalises its top-k always; the others follow config.norm_topk_prob
    has_shared: bool        # Qwen2-MoE: one shared expert beside the routed ones, scaled by sigmoid(w_s · x)


_FAMILIES = {
    "mixtral": _Family("Mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
                       True, False),
    "qwen2_moe": _Family("Qwen2-MoE (Qwen1.5-MoE)", "transformers.models.qwen2_moe.modeling_qwen2_moe",
                         "Qwen2MoeSparseMoeBlock", False, True),
    "olmoe": _Family("OLMoE", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", False, False),
    "qwen3_moe": _Family("Qwen3-MoE", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock",
                         False, False),
}
SUPPORTED_FAMILIES = tuple(_FAMILIES)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.[^.]+$")     # "model.layers.3.mlp" → 3


def model_family(model) -> str:
    """The model's ``config.model_type`` if moewidgets.hf supports it, else a ValueError listing the families.

    >>> from transformers import OlmoeConfig, OlmoeForCausalLM
    >>> model_family(OlmoeForCausalLM(OlmoeConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
    ...     num_hidden_layers=1, num_attention_heads=2, num_experts=2, num_experts_per_tok=1,
    ...     pad_token_id=0, eos_token_id=1)))
    'olmoe'

    Chapter 2 (book/chapter2.ipynb).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        listed = ", ".join(f"{k!r} ({f.label})" for k, f in _FAMILIES.items())
        raise ValueError(f"model {type(model).__name__} with config.model_type={model_type!r} is not supported; "
                         f"moewidgets.hf supports {listed}")
    return model_type


def _check_no_meta(name: str, *ws: torch.Tensor) -> None:
    if any(w.device.type == "meta" for w in ws):
        raise ValueError(f"{name} has weights on the 'meta' device (offloaded by accelerate, or not loaded); "
                         "load the model onto CPU/GPU memory (device_map='auto' without disk offload)")


def expert_bank(experts: nn.Module) -> SwiGLUBankView:
    """A SwiGLU bank view over a transformers-5 fused experts module (``block.experts``): no copies.

    ``w_gate_EFD = gate_up_proj[:, :F]``, ``w_up_EFD = gate_up_proj[:, F:]``, ``w_out_EDF = down_proj``, so
    ``E_e(x) = W_out[e] (silu(W_gate[e] x) ⊙ W_up[e] x)`` is exactly the module's expert e. Layouts other than
    the four families' (transposed, interleaved gate/up, biases, a post-expert norm, a non-SiLU activation)
    raise a ValueError rather than give a silently wrong view.

    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))
    >>> bank = expert_bank(model.model.layers[0].mlp.experts)
    >>> bank.activation, tuple(bank.w_gate_EFD.shape), tuple(bank.w_out_EDF.shape)
    ('swiglu', (4, 12, 8), (4, 8, 12))
    >>> bank.w_up_EFD.data_ptr() == model.model.layers[0].mlp.experts.gate_up_proj[:, 12:].data_ptr()   # a view
    True

    Chapter 2 (book/chapter2.ipynb).
    """
    name = type(experts).__name__
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 \
            or down.dim() != 3:
        raise ValueError(f"{name} must hold fused 3-d gate_up_proj (E, 2F, D) and down_proj (E, D, F) "
                         "(the transformers-5 layout; transformers 4.x per-expert modules are not supported)")
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = {k: getattr(experts, k) for k, want in flags.items() if getattr(experts, k, want) != want}
    if odd:
        raise ValueError(f"{name} has an unsupported layout {odd}; moewidgets.hf reads {flags}")
    act = getattr(experts, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        raise ValueError(f"{name}.act_fn={type(act).__name__} must be SiLU (hidden_act='silu') for a SwiGLU view")
    E, F2, D = gate_up.shape
    F = F2 // 2
    if F2 % 2 or tuple(down.shape) != (E, D, F):
        raise ValueError(f"{name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
                         "must be (E, 2F, D) and (E, D, F)")
    _check_no_meta(name, gate_up, down)
    gu_E2FD = gate_up.detach()
    return SwiGLUBankView(w_gate_EFD=gu_E2FD[:, :F], w_up_EFD=gu_E2FD[:, F:], w_out_EDF=down.detach())


def mlp_bank(mlp: nn.Module) -> SwiGLUBankView:
    """A one-expert SwiGLU bank view over a dense gated MLP (gate_proj, up_proj, down_proj ``nn.Linear``),
    e.g. Qwen2-MoE's shared expert: ``W_out (silu(W_gate x) ⊙ W_up x)``, E = 1, no copies.

    >>> lin = lambda i, o: nn.Linear(i, o, bias=False)
    >>> mlp = nn.Module()
    >>> mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn = lin(4, 6), lin(4, 6), lin(6, 4), nn.SiLU()
    >>> tuple(mlp_bank(mlp).w_out_EDF.shape)
    (1, 4, 6)

    Chapter 2 (book/chapter2.ipynb).
    """
    name = type(mlp).__name__
    lins = [getattr(mlp, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, nn.Linear) and m.bias is None for m in lins):
        raise ValueError(f"{name} must have bias-free nn.Linear gate_proj, up_proj and down_proj")
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        raise ValueError(f"{name}.act_fn={type(act).__name__} must be SiLU for a SwiGLU view")
    ws = [m.weight.detach() for m in lins]
    _check_no_meta(name, *ws)
    return SwiGLUBankView(w_gate_EFD=ws[0][None], w_up_EFD=ws[1][None], w_out_EDF=ws[2][None])


@dataclass
class HFMoEBlock:
    """One sparse MoE block of a Hugging Face model (what :func:`~moewidgets.hf.blocks.moe_blocks` finds).

    Fields::

        layer:          decoder-layer index (dense layers of Qwen-MoE's mlp_only_layers have no block).
        name:           the block's qualified module name, e.g. "model.layers.3.mlp".
        family:         config.model_type ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe").
        module:         the block (its forward maps (B, S, D) → (B, S, D)).
        decoder_layer:  the decoder layer holding it.
        router:         ``module.gate``: returns (logits (T, E), gates (T, K), idx (T, K)).
        experts:        ``module.experts``: the fused routed experts.
        n_experts, top_k, d_model, d_hidden: E, K, D, F.
        gate:           "renorm" (top-k renormalised: Mixtral, norm_topk_prob=True) or "softmax" (the
                        softmax-over-all values of the selected experts: norm_topk_prob=False).
        shared_expert, shared_expert_gate: Qwen2-MoE's shared expert and its scalar gate (else None); the
                        block adds ``sigmoid(shared_expert_gate(x)) · shared_expert(x)`` to the routed sum.
    """

    layer: int
    name: str
    family: str
    module: nn.Module
    decoder_layer: nn.Module
    router: nn.Module
    experts: nn.Module
    n_experts: int
    top_k: int
    d_model: int
    d_hidden: int
    gate: str
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None

    def bank(self) -> SwiGLUBankView:
        """The routed experts as a bank view (:func:`~moewidgets.hf.blocks.expert_bank`)."""
        return expert_bank(self.experts)

    def shared_bank(self) -> SwiGLUBankView | None:
        """The shared expert as a one-expert bank view (:func:`~moewidgets.hf.blocks.mlp_bank`), or None."""
        return None if self.shared_expert is None else mlp_bank(self.shared_expert)


def moe_blocks(model: nn.Module) -> dict[int, HFMoEBlock]:
    """The sparse MoE blocks of a supported Hugging Face model, keyed by decoder-layer index (ascending).

    Works for ``*ForCausalLM`` and bare ``*Model`` classes, and for models loaded with ``device_map``; an
    unsupported model raises a ValueError listing the supported families.

    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...     moe_intermediate_size=4, num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=2,
    ...     num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True))
    >>> {i: (b.name, b.n_experts, b.top_k, b.gate) for i, b in moe_blocks(model).items()}
    {0: ('model.layers.0.mlp', 4, 2, 'renorm'), 2: ('model.layers.2.mlp', 4, 2, 'renorm')}

    Chapter 2 (book/chapter2.ipynb).
    """
    family = model_family(model)
    spec = _FAMILIES[family]
    block_cls = getattr(importlib.import_module(spec.module), spec.block_class)
    blocks: dict[int, HFMoEBlock] = {}
    for name, module in model.named_modules():
        if not isinstance(module, block_cls):
            continue
        match = _LAYER_RE.search(name)
        if match is None:
            raise ValueError(f"found {spec.block_class} at {name!r}, outside a 'layers.<i>' decoder stack")
        layer = int(match.group(1))
        if layer in blocks:
            raise ValueError(f"two MoE blocks for decoder layer {layer}: {blocks[layer].name!r} and {name!r}")
        router, experts = module.gate, module.experts
        gate_up = experts.gate_up_proj
        renorm = spec.always_renorm or bool(getattr(router, "norm_topk_prob", False))
        blocks[layer] = HFMoEBlock(
            layer=layer, name=name, family=family, module=module,
            decoder_layer=model.get_submodule(name.rsplit(".", 1)[0]), router=router, experts=experts,
            n_experts=int(gate_up.shape[0]), top_k=int(router.top_k), d_model=int(gate_up.shape[2]),
            d_hidden=int(gate_up.shape[1]) // 2, gate="renorm" if renorm else "softmax",
            shared_expert=getattr(module, "shared_expert", None) if spec.has_shared else None,
            shared_expert_gate=getattr(module, "shared_expert_gate", None) if spec.has_shared else None)
    if not blocks:
        raise ValueError(f"no {spec.block_class} found in {type(model).__name__} (config.model_type={family!r})")
    return dict(sorted(blocks.items()))
