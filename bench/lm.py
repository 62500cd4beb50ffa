"""Our MoE transformer LM vs transformers' ``MixtralForCausalLM`` of the same size: training tokens per second.

Shape legend: B sequences per step, S positions, V vocabulary, D model width, F expert hidden width, E experts.

The design's target is on a GPU (the GPU preset, ours ≥ 1× transformers' tokens/s); on the CPU the same comparison
runs at the CPU preset's size as a proxy. Both models are built to the same architecture, as close as the two code
bases allow::

    ours (moewidgets.lm)                          transformers (MixtralForCausalLM)
    LMConfig.cpu() / .gpu() sizes                 MixtralConfig with the same L, D, H, S, V, E, F, k
    SwiGLU experts, gate "renorm", no aux loss    SwiGLU experts (eager), softmax → top-k → renormalise
    rotary positions, RMSNorm, untied head        rotary positions, RMSNorm, untied head (tie_word_embeddings=False)
    (+ attention/router/head biases: +0.4 %       (no biases)
    parameters; the head bias costs one (B·S, V)
    copy per step inside addmm)

They are not weight-identical (the layer benchmark, bench/layer.py, checks that the MoE blocks compute the same
thing); what is timed is one optimiser step of each on the same batch: forward, cross-entropy over B·S targets,
backward, ``torch.optim.AdamW.step`` (the same optimiser for both, so only the models differ), interleaved with
alternating order (:func:`bench.common.interleaved`). Tokens/s = B·S / median step time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_

from moewidgets.lm import LMConfig, build_lm

from .common import fmt_ratio, fmt_stats, interleaved, ratio_stats, stats, sync, target_row

TARGET = 1.0            # ours / transformers tokens per second (the design's GPU target)


def lm_config(device: str) -> LMConfig:
    """The preset timed on ``device`` ("cpu": the CPU preset; "cuda": the GPU preset), made Mixtral-like."""
    base = LMConfig.gpu(device=device) if torch.device(device).type == "cuda" else LMConfig.cpu(device=device)
    return base.replace(pos="rope", tie_embeddings=False, unigram_init=False).with_moe(
        expert="swiglu", gate="renorm", aux_weight=0.0)


def mixtral_like(cfg: LMConfig, vocab_size: int):
    """A randomly initialised ``MixtralForCausalLM`` with ``cfg``'s sizes (eager experts, no aux loss)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    m = cfg.moe
    hf_cfg = MixtralConfig(vocab_size=vocab_size, hidden_size=m.d_model, intermediate_size=m.d_hidden,
                           num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_heads, num_local_experts=m.n_experts, num_experts_per_tok=m.k,
                           max_position_embeddings=cfg.seq_len, tie_word_embeddings=False, router_jitter_noise=0.0,
                           output_router_logits=False, experts_implementation="eager")
    torch.manual_seed(cfg.seed)                  # transformers initialises from the global generator
    return MixtralForCausalLM(hf_cfg)


def _train_step(model, logits_of, x_BS: torch.Tensor, y_BS: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits_BSV = logits_of(x_BS)
        loss = F_.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), y_BS.reshape(-1))   # (B·S, V)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def bench_lm(repeats: int = 5, min_block_s: float = 0.2, device: str = "cpu", log=print,
             cfg: LMConfig | None = None) -> dict:
    """Time one training step of each model, interleaved; a JSON-able dict with ``"targets"`` (one row).
    ``cfg``: the sizes (default :func:`lm_config` of ``device``; tests pass a tiny one)."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'transformers>=5,<6')"}
    cfg = cfg or lm_config(device)
    V, B, S = cfg.vocab_size, cfg.batch_size, cfg.seq_len
    ours = build_lm(cfg, V, device=device)
    theirs = mixtral_like(cfg, V).to(device)
    g = torch.Generator().manual_seed(0)
    ids_BS1 = torch.randint(V, (B, S + 1), generator=g).to(device)       # one batch of (B, S + 1) token ids
    x_BS, y_BS = ids_BS1[:, :-1], ids_BS1[:, 1:]
    fns = {"ours": _train_step(ours, lambda x: ours(x).logits_BSV, x_BS, y_BS),
           "transformers": _train_step(theirs, lambda x: theirs(input_ids=x).logits, x_BS, y_BS)}
    for fn in fns.values():                      # warm-up: optimiser state, allocator, lazy imports
        fn()
    sync(device)
    times, inner = interleaved(fns, repeats, min_block_s, device)
    st = {n: stats(t) for n, t in times.items()}
    speed = ratio_stats(times["transformers"], times["ours"])            # > 1: ours is faster
    tok = {n: B * S / st[n]["median_s"] for n in st}
    n_par = {n: sum(p.numel() for p in m.parameters()) for n, m in (("ours", ours), ("transformers", theirs))}
    m = cfg.moe
    what = (f"LM training step ({'GPU' if torch.device(device).type == 'cuda' else 'CPU'} preset sizes: {cfg.n_layers} "
            f"layers, D={m.d_model}, E={m.n_experts}, F={m.d_hidden}, top-{m.k}, S={S}, B={B}, V={V}), ours vs "
            f"MixtralForCausalLM (transformers {transformers.__version__}), tokens/s")
    measured = (f"ours {tok['ours']:,.0f} tokens/s ({fmt_stats(st['ours'])} per step), transformers "
                f"{tok['transformers']:,.0f} tokens/s ({fmt_stats(st['transformers'])}): {fmt_ratio(speed)}")
    log(f"  lm: {measured}")
    return {"what": what, "device": device, "repeats": repeats, "calls_per_block": inner,
            "ours": st["ours"], "transformers": st["transformers"], "speedup": speed,
            "tokens_per_s_ours": tok["ours"], "tokens_per_s_transformers": tok["transformers"],
            "parameters_ours": n_par["ours"], "parameters_transformers": n_par["transformers"],
            "targets": [target_row("lm", what, measured, f"ours ≥ {TARGET:g}× transformers' tokens/s"
                                   + ("" if torch.device(device).type == "cuda" else " (GPU target; CPU proxy)"),
                                   speed["median"] >= TARGET, speed["median"])]}
