"""Capturing what a Hugging Face MoE model routed where, as :class:`~moewidgets.trace.RoutingTrace` per layer.

Shape legend: B batch, S sequence, T = B·S tokens (row-major, t = b·S + s; padded positions dropped), D model
width, E routed experts, K top-k.

One forward hook per requested block's router (``block.gate``) records what the router saw and returned:
``x_TD`` (the block input, flattened), the logits, and the gates and indices *as the model used them*. The
routing probabilities follow every supported family's convention ``probs_TE = softmax(logits.float())`` (the
top-k values of which are the gates, renormalised when the block's ``gate`` is "renorm"). The hooks live only
for the one forward pass and are removed afterwards, also when it raises. The forward stops after the last
requested layer (a hook on that decoder layer), so probing early layers of a big model is cheap.
Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from ..trace import RoutingTrace
from .blocks import HFMoEBlock, moe_blocks

__all__ = ["trace_hf", "select_layers"]


class _StopForward(Exception):
    """Raised by a hook after the last requested layer: the rest of the forward pass is not needed."""


def select_layers(blocks: dict[int, HFMoEBlock], layers: int | Iterable[int] | None) -> list[int]:
    """Validated, sorted, de-duplicated MoE layer indices (``None`` = all MoE layers).

    >>> select_layers({0: None, 2: None, 3: None}, [3, 0, 3]), select_layers({0: None, 2: None}, None)
    ([0, 3], [0, 2])

    Chapter 2 (book/chapter2.ipynb).
    """
    if layers is None:
        return sorted(blocks)
    try:
        items = [layers] if isinstance(layers, numbers.Integral) else list(layers)
    except TypeError:
        items = [layers]
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
        raise ValueError(f"layers={layers!r} must be None, an int or a list of ints")
    wanted = sorted({int(i) for i in items})
    if not wanted:
        raise ValueError(f"layers={layers!r} is empty; this model's MoE layers are {sorted(blocks)}")
    bad = [i for i in wanted if i not in blocks]
    if bad:
        raise ValueError(f"layers={layers!r}: {bad} are not MoE layers; this model's MoE layers are {sorted(blocks)}")
    return wanted


def _check_ids(model: nn.Module, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.is_floating_point() \
            or input_ids.is_complex() or input_ids.numel() == 0:
        desc = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"input_ids={desc} must be a non-empty integer tensor (B, S) or (S,)")
    ids_BS = input_ids if input_ids.dim() == 2 else input_ids[None]            # (S,) → (1, S)
    vocab = getattr(model.config, "vocab_size", None)
    lo, hi = int(ids_BS.min()), int(ids_BS.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        allowed = f"0..{vocab - 1} (config.vocab_size={vocab})" if vocab is not None else ">= 0"
        raise ValueError(f"input_ids hold token ids in {lo}..{hi}; they must be in {allowed}")
    mask_BS = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.numel() != ids_BS.numel():
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        mask_BS = attention_mask.reshape(ids_BS.shape)                       # (B, S)
        if not bool(((mask_BS == 0) | (mask_BS == 1)).all()) or not bool(mask_BS.any()):
            raise ValueError("attention_mask must hold 0/1 with at least one 1")
    return ids_BS, mask_BS


def _input_device(model: nn.Module) -> torch.device | None:
    """Where the token ids must go: the input embedding's device (None when offloaded: accelerate moves them)."""
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return None
    return None if device.type == "meta" else device


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the pass (no dropout, no Mixtral router jitter); every module's flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _router_hook(records: list, block: HFMoEBlock):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        if not (isinstance(output, tuple) and len(output) == 3):
            raise RuntimeError(f"{type(module).__name__} at {block.name}.gate returned {type(output).__name__}; "
                               "moewidgets.hf expects (logits (T, E), gates (T, K), idx (T, K))")
        logits_TE, gates_TK, idx_TK = output
        records.append((x.detach().reshape(-1, block.d_model).clone(), logits_TE.detach(), gates_TK.detach(),
                        idx_TK.detach()))
    return hook


def _stop_hook(module, args, output):
    raise _StopForward


@torch.no_grad()
def trace_hf(model: nn.Module, input_ids: torch.Tensor, layers: int | Iterable[int] | None = None, *,
             attention_mask: torch.Tensor | None = None) -> dict[int, RoutingTrace]:
    """Run ``model`` once on ``input_ids`` and return each requested MoE layer's routing trace.

    Per layer: ``x_TD`` the block input (model dtype), ``probs_TE = softmax(logits.float())`` (float32),
    ``idx_TK`` and ``gates_TK`` exactly as the block used them (Mixtral: top-k renormalised; Qwen/OLMoE: per
    ``config.norm_topk_prob``). Positions where ``attention_mask`` is 0 are dropped. Tensors stay on each
    layer's device. The model runs in eval mode under ``torch.no_grad`` (its train/eval flags are restored).

    Args:
        model: a supported Hugging Face MoE model (``moewidgets.hf.SUPPORTED_FAMILIES``), any device/device_map.
        input_ids: (B, S) or (S,) token ids.
        layers: decoder-layer indices of MoE blocks (None = all); the forward stops after the last one.
        attention_mask: optional (B, S) 0/1 mask, passed to the model; masked positions are left out.

    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))
    >>> traces = trace_hf(model, torch.arange(10).reshape(2, 5), layers=[1])
    >>> tr = traces[1]
    >>> tuple(tr.x_TD.shape), tuple(tr.probs_TE.shape), tuple(tr.idx_TK.shape), tr.layer
    ((10, 8), (10, 4), (10, 2), 1)
    >>> bool(torch.allclose(tr.gates_TK.sum(-1), torch.ones(10)))      # Mixtral renormalises its top-2
    True

    Chapter 2 (book/chapter2.ipynb).
    """
    blocks = moe_blocks(model)
    wanted = select_layers(blocks, layers)
    ids_BS, mask_BS = _check_ids(model, input_ids, attention_mask)
    device = _input_device(model)
    if device is not None:
        ids_BS = ids_BS.to(device)
        mask_BS = mask_BS.to(device) if mask_BS is not None else None
    records: dict[int, list] = {i: [] for i in wanted}
    handles = []
    try:
        for i in wanted:
            handles.append(blocks[i].router.register_forward_hook(_router_hook(records[i], blocks[i]),
                                                                  with_kwargs=True))
        # after the decoder layer's forward (and after any accelerate post-forward) of the last wanted layer
        handles.append(blocks[wanted[-1]].decoder_layer.register_forward_hook(_stop_hook))
        with _eval_mode(model):
            try:
                model(input_ids=ids_BS, attention_mask=mask_BS, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    keep_T = mask_BS.reshape(-1).bool() if mask_BS is not None else None        # (B, S) → (T,)
    traces = {}
    for i in wanted:
        if not records[i]:
            raise RuntimeError(f"the router of layer {i} ({blocks[i].name}.gate) was not called in the forward pass")
        x_TD, logits_TE, gates_TK, idx_TK = (torch.cat(parts) for parts in zip(*records[i]))
        if keep_T is not None:
            keep = keep_T.to(x_TD.device)
            x_TD, logits_TE, gates_TK, idx_TK = x_TD[keep], logits_TE[keep], gates_TK[keep], idx_TK[keep]
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        traces[i] = RoutingTrace(x_TD=x_TD, probs_TE=probs_TE, idx_TK=idx_TK.long(), gates_TK=gates_TK, layer=i,
                                 n_experts=blocks[i].n_experts)
    return traces
