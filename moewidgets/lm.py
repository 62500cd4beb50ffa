"""A small decoder-only transformer language model with an MoE FFN in every block, and its trainer (chapter 2).

Shape legend (as in every MoE file, plus the transformer's own letters):
    B sequences in a batch, S positions, T = B·S tokens, D model width, H heads, A = D / H head width,
    V vocabulary size, E experts, K top-k, F expert hidden width.

One block (pre-norm)::

    h = x + Attn(norm1(x))                 causal self-attention (torch's scaled_dot_product_attention)
    u = norm2(h)                           the MoE layer's input, the "post-LN hidden state" the probes use
    x = h + FFN(u)                         FFN = make_layer(cfg.moe): an MoELayer, or a dense baseline

The FFN sees the tokens flattened, ``(B, S, D) → (B·S, D)``: routing is per token, so every router, top-k,
temperature, gate convention and balancing knob of ``moewidgets.nn`` applies unchanged, and
``arch="dense"`` / ``"dense_active"`` give the parameter- and active-compute-matched dense baselines.

Paper-1 spec §1.3.2 (its 3-layer WikiText transformer, claims SC-7/SC-8): :meth:`LMConfig.gpu` is the spec's
size; :meth:`LMConfig.cpu` (the default) is our scaled choice that trains on a 2-core CPU in under a minute.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F_
from torch import nn

from .balance import expert_counts
from .config import MoEConfig, _check_choice, _check_float, _check_int, _fail, _JSONMixin
from .nn.experts import fan_in_uniform_
from .nn.layer import MoEOutput, make_layer
from .nn.routers import RouterOutput
from .trace import RoutingTrace
from .train import History, NonFiniteLossError, batch_generator, cosine_lr, make_adamw, resolve_device
from .wikitext import WikiText, load_wikitext

__all__ = ["LMConfig", "LMOutput", "LMEval", "LMHistory", "MoETransformerLM", "CausalSelfAttention", "LMBlock",
           "build_lm", "LMTrainer", "trace_lm", "NORMS", "POSITIONS"]

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("learned", "rope")


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LMConfig(_JSONMixin):
    """A transformer LM run: the MoE FFN (``moe``), the transformer around it, and training.

    ``seed`` seeds the weights and the batch order; ``moe.seed`` is set to it (one number per run).
    ``vocab_size`` caps the word vocabulary (:func:`~moewidgets.wikitext.load_wikitext`). Training: AdamW
    (weight decay on matrices only), linear warm-up over ``warmup`` steps, then ``schedule`` ("cosine": to 0 at
    ``steps``; "constant"), gradient-norm clipping at ``grad_clip`` (0 = off). Chapter 2 (book/chapter2.ipynb).

    >>> cfg = LMConfig.cpu()
    >>> LMConfig.from_json(cfg.to_json()) == cfg
    True
    >>> LMConfig(n_heads=3)
    Traceback (most recent call last):
    ...
    ValueError: LMConfig.n_heads=3 must divide moe.d_model=64
    """

    moe: MoEConfig = field(default_factory=lambda: MoEConfig(n_experts=8, k=2, d_model=64, d_hidden=128,
                                                             aux_weight=0.01))
    n_layers: int = 3               # transformer blocks, each with an MoE (or dense) FFN
    n_heads: int = 4                # H; must divide moe.d_model
    seq_len: int = 64               # S, context length (training windows and evaluation windows)
    vocab_size: int = 4096          # cap on the word vocabulary (<eos>, <unk> and the most frequent words)
    norm: str = "rmsnorm"           # "rmsnorm" | "layernorm" (pre-norm, and a final norm before the head)
    pos: str = "learned"            # "learned" absolute positions | "rope" (rotary, on queries and keys)
    tie_embeddings: bool = True     # the output head reuses the token embedding
    unigram_init: bool = True       # start the head's bias at the training split's log unigram frequencies
    batch_size: int = 16            # B, sequences per step (B·S tokens)
    steps: int = 400                # optimiser steps
    lr: float = 1e-2                # peak AdamW learning rate
    warmup: int = 20                # linear warm-up steps
    schedule: str = "cosine"        # "cosine" (to 0 at `steps`) | "constant" (after warm-up)
    weight_decay: float = 0.0       # AdamW decoupled weight decay, on matrices only
    grad_clip: float = 1.0          # clip the global gradient norm (0 = off)
    device: str = "auto"            # "auto" (CUDA, then MPS, else CPU) | "cpu" | "cuda" | "cuda:N" | "mps"
    seed: int = 0                   # weights and batch order

    def __post_init__(self) -> None:
        c = "LMConfig"
        if not isinstance(self.moe, MoEConfig):
            _fail(c, "moe", self.moe, "a MoEConfig")
        _check_int(c, "n_layers", self.n_layers, 1, 64)
        _check_int(c, "n_heads", self.n_heads, 1)
        if self.moe.d_model % self.n_heads:
            raise ValueError(f"{c}.n_heads={self.n_heads} must divide moe.d_model={self.moe.d_model}")
        _check_int(c, "seq_len", self.seq_len, 1)
        _check_int(c, "vocab_size", self.vocab_size, 2)
        _check_choice(c, "norm", self.norm, NORMS)
        _check_choice(c, "pos", self.pos, POSITIONS)
        if self.pos == "rope" and (self.moe.d_model // self.n_heads) % 2:
            raise ValueError(f"{c}.pos='rope' needs an even head width, got moe.d_model / n_heads = "
                             f"{self.moe.d_model}/{self.n_heads}")
        for name in ("tie_embeddings", "unigram_init"):
            if not isinstance(getattr(self, name), bool):
                _fail(c, name, getattr(self, name), "True or False")
        _check_int(c, "batch_size", self.batch_size, 1)
        _check_int(c, "steps", self.steps, 0)
        _check_float(c, "lr", self.lr, positive=True)
        _check_int(c, "warmup", self.warmup, 0)
        _check_choice(c, "schedule", self.schedule, ("constant", "cosine"))
        _check_float(c, "weight_decay", self.weight_decay, nonneg=True)
        _check_float(c, "grad_clip", self.grad_clip, nonneg=True)
        from .budget import MAX_SEED, check_lm
        from .config import check_device
        check_device(c, self.device)
        _check_int(c, "seed", self.seed, 0, MAX_SEED)
        if self.moe.seed != self.seed:      # one seed per run: the FFNs are drawn from the LM's generator
            object.__setattr__(self, "moe", self.moe.replace(seed=self.seed))
        check_lm(self)                      # the library / CLI budget (moewidgets.budget)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        if not isinstance(d, dict):
            raise ValueError(f"LMConfig: expected a mapping of fields, got {type(d).__name__} {d!r:.80}")
        d = dict(d)
        if isinstance(d.get("moe"), dict):
            try:
                d["moe"] = MoEConfig.from_dict(d["moe"])
            except ValueError as exc:
                raise ValueError(f"LMConfig.moe: {exc}") from None
        elif "moe" in d and not isinstance(d["moe"], MoEConfig):
            _fail("LMConfig", "moe", d["moe"], "a mapping of MoEConfig fields")
        return super().from_dict(d)

    @classmethod
    def cpu(cls, **changes) -> "LMConfig":
        """Our scaled CPU preset (not the paper's size; the class defaults): D = 64, 3 pre-norm layers, 4 heads,
        8 GELU experts of width 128, top-2, Switch aux loss 0.01, context 64, batch 16 × 64 tokens, 4096-word
        vocabulary, head bias started at the unigram, AdamW lr 1e-2 (20 warm-up steps, cosine), 400 steps.
        On the 2-core CPU with one thread: about 45 s, held-out (test.txt) perplexity ≈ 102, half the unigram
        baseline's (205; the KN bigram: 93). ``changes`` override fields (``moe=`` a whole MoEConfig)."""
        return cls(**changes)

    @classmethod
    def gpu(cls, **changes) -> "LMConfig":
        """The paper-1 spec's transformer (§1.3.2): D = 256, 3 pre-norm layers, 4 heads, context 128, 8 GELU
        experts of width 256, top-2; AdamW lr 3e-4, 5k steps, batch 32 × 128 tokens. Word-level vocabulary capped
        at 32768 (the spec's GPT-2 BPE is not available offline; ours)."""
        base = cls(moe=MoEConfig(n_experts=8, k=2, d_model=256, d_hidden=256), n_layers=3, n_heads=4,
                   seq_len=128, vocab_size=32768, batch_size=32, steps=5000, lr=3e-4, warmup=200,
                   weight_decay=0.1)
        return base.replace(**changes)

    def with_moe(self, **changes) -> "LMConfig":
        """A copy with some MoE fields changed, e.g. ``cfg.with_moe(k=8)`` (fully soft) or ``arch="dense"``."""
        return self.replace(moe=self.moe.replace(**changes))


# --------------------------------------------------------------------------------------------- model


@dataclass
class LMOutput:
    """A forward pass: ``logits_BSV`` (B, S, V), the summed weighted ``aux_loss`` of all MoE layers (scalar), and
    ``routings``, one :class:`~moewidgets.nn.routers.RouterOutput` (or None for a dense FFN) per block."""

    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor
    routings: list[RouterOutput | None]


def _norm(kind: str, d: int, dtype: torch.dtype) -> nn.Module:
    return nn.RMSNorm(d, eps=1e-6, dtype=dtype) if kind == "rmsnorm" else nn.LayerNorm(d, dtype=dtype)


def _rope_tables(seq_len: int, head_width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (S, A/2) of rotary positions, frequencies ``10000^(−2i/A)``."""
    inv_freq = 10000.0 ** (-torch.arange(0, head_width, 2, dtype=torch.float64) / head_width)
    angle_SA2 = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angle_SA2.cos().to(dtype), angle_SA2.sin().to(dtype)


def _apply_rope(x_BHSA: torch.Tensor, cos_SA2: torch.Tensor, sin_SA2: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) coordinate pair by the position's angle (GPT-NeoX layout)."""
    x1, x2 = x_BHSA.chunk(2, dim=-1)
    return torch.cat([x1 * cos_SA2 - x2 * sin_SA2, x2 * cos_SA2 + x1 * sin_SA2], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, ``softmax(q kᵀ / √A + causal mask) v``, through
    ``torch.nn.functional.scaled_dot_product_attention``; optional rotary positions on q and k.

    Parameters: ``w_qkv_3DD`` (3D, D) and ``w_o_DD`` (D, D), no biases.

    >>> att = CausalSelfAttention(8, 2, seq_len=4, generator=torch.Generator().manual_seed(0))
    >>> att(torch.zeros(1, 4, 8)).shape
    torch.Size([1, 4, 8])
    """

    def __init__(self, d_model: int, n_heads: int, seq_len: int, rope: bool = False,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        D = d_model
        self.n_heads, self.head_width, self.rope = n_heads, D // n_heads, rope
        self.w_qkv_3DD = nn.Parameter(fan_in_uniform_(torch.empty(3 * D, D, dtype=dtype), D, generator))
        self.w_o_DD = nn.Parameter(fan_in_uniform_(torch.empty(D, D, dtype=dtype), D, generator))
        if rope:
            cos, sin = _rope_tables(seq_len, self.head_width, dtype)
            self.register_buffer("cos_SA2", cos, persistent=False)
            self.register_buffer("sin_SA2", sin, persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        H, A = self.n_heads, self.head_width
        qkv_BS3HA = F_.linear(x_BSD, self.w_qkv_3DD).view(B, S, 3, H, A)       # (B, S, 3D) → (B, S, 3, H, A)
        q_BHSA, k_BHSA, v_BHSA = qkv_BS3HA.permute(2, 0, 3, 1, 4).unbind(0)   # 3 × (B, H, S, A)
        if self.rope:
            q_BHSA = _apply_rope(q_BHSA, self.cos_SA2[:S], self.sin_SA2[:S])
            k_BHSA = _apply_rope(k_BHSA, self.cos_SA2[:S], self.sin_SA2[:S])
        o_BHSA = F_.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSA, is_causal=True)
        o_BSD = o_BHSA.transpose(1, 2).reshape(B, S, D)                        # (B, H, S, A) → (B, S, D)
        return F_.linear(o_BSD, self.w_o_DD)


class LMBlock(nn.Module):
    """One pre-norm block: ``h = x + Attn(norm1(x))``, ``x' = h + FFN(norm2(h))`` with the FFN built by
    :func:`~moewidgets.nn.layer.make_layer` (an MoE layer or a dense baseline) on the flattened tokens.

    >>> blk = LMBlock(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16), n_heads=2, seq_len=4)
    >>> y_BSD, out = blk(torch.zeros(2, 4, 8))
    >>> y_BSD.shape, out.routing.idx_TK.shape     # the FFN routed B·S = 8 tokens
    (torch.Size([2, 4, 8]), torch.Size([8, 2]))
    """

    def __init__(self, moe: MoEConfig, n_heads: int, seq_len: int, norm: str = "rmsnorm", rope: bool = False,
                 generator: torch.Generator | None = None, dispatch: str = "auto",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        D = moe.d_model
        self.norm1 = _norm(norm, D, dtype)
        self.attn = CausalSelfAttention(D, n_heads, seq_len, rope, generator, dtype)
        self.norm2 = _norm(norm, D, dtype)
        self.ffn = make_layer(moe, generator, dtype, dispatch)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEOutput]:
        B, S, D = x_BSD.shape
        h_BSD = x_BSD + self.attn(self.norm1(x_BSD))
        u_TD = self.norm2(h_BSD).reshape(B * S, D)                  # (B, S, D) → (T = B·S, D): per-token routing
        out = self.ffn(u_TD)
        return h_BSD + out.y_TD.view(B, S, D), out                  # (T, D) → (B, S, D)


class MoETransformerLM(nn.Module):
    """A decoder-only transformer LM: token (+ learned position) embeddings, ``n_layers`` :class:`LMBlock`\\ s,
    a final norm and a linear head (tied to the embedding by default). ``logits = head(norm_f(x))``.

    Parameters: ``tok_emb_VD`` (V, D) ~ N(0, 0.02²), ``pos_emb_SD`` (S, D) ~ N(0, 0.02²) (learned positions
    only), ``w_head_VD`` (V, D) when untied, the head's bias ``b_head_V`` (zero, or the log unigram frequencies
    after :meth:`init_unigram_bias`); attention and expert weights use PyTorch's fan-in uniform init, all
    drawn from ``generator``. Chapter 2 (book/chapter2.ipynb).

    >>> cfg = LMConfig(moe=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=32), n_layers=2, n_heads=2, seq_len=8)
    >>> lm = build_lm(cfg, vocab_size=50)
    >>> out = lm(torch.zeros(3, 8, dtype=torch.long))
    >>> out.logits_BSV.shape, len(out.routings), len(lm.moe_layers())
    (torch.Size([3, 8, 50]), 2, 2)
    """

    def __init__(self, cfg: LMConfig, vocab_size: int, generator: torch.Generator | None = None,
                 dispatch: str = "auto", dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 2")
        self.cfg, self.vocab_size = cfg, vocab_size
        V, D, S = vocab_size, cfg.moe.d_model, cfg.seq_len
        with torch.no_grad():
            self.tok_emb_VD = nn.Parameter(torch.empty(V, D, dtype=dtype).normal_(0.0, 0.02, generator=generator))
            self.pos_emb_SD = (nn.Parameter(torch.empty(S, D, dtype=dtype).normal_(0.0, 0.02, generator=generator))
                               if cfg.pos == "learned" else None)
        self.blocks = nn.ModuleList(
            LMBlock(cfg.moe, cfg.n_heads, S, cfg.norm, cfg.pos == "rope", generator, dispatch, dtype)
            for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg.norm, D, dtype)
        self.w_head_VD = (None if cfg.tie_embeddings else
                          nn.Parameter(fan_in_uniform_(torch.empty(V, D, dtype=dtype), D, generator)))
        self.b_head_V = nn.Parameter(torch.zeros(V, dtype=dtype))

    @torch.no_grad()
    def init_unigram_bias(self, train_ids: torch.Tensor) -> None:
        """Set the head's bias to the add-one log unigram frequencies of ``train_ids``, ``log((c_w + 1)/(N + V))``,
        so that the untrained model (logits ≈ bias) already predicts the unigram distribution; the weights then
        only have to learn the context ("initialise the final bias to the data's prior", Karpathy 2019)."""
        counts_V = torch.bincount(train_ids.reshape(-1).cpu(), minlength=self.vocab_size)[: self.vocab_size]
        logp_V = torch.log(counts_V.double() + 1.0) - math.log(float(counts_V.sum()) + self.vocab_size)
        self.b_head_V.copy_(logp_V.to(self.b_head_V))

    def forward(self, ids_BS: torch.Tensor) -> LMOutput:
        B, S = ids_BS.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"sequence length {S} must be <= seq_len={self.cfg.seq_len}")
        x_BSD = self.tok_emb_VD[ids_BS]
        if self.pos_emb_SD is not None:
            x_BSD = x_BSD + self.pos_emb_SD[:S]
        aux = x_BSD.new_zeros(())
        routings: list[RouterOutput | None] = []
        for block in self.blocks:
            x_BSD, out = block(x_BSD)
            aux = aux + out.aux_loss
            routings.append(out.routing)
        head_VD = self.tok_emb_VD if self.w_head_VD is None else self.w_head_VD
        return LMOutput(F_.linear(self.norm_f(x_BSD), head_VD, self.b_head_V), aux, routings)

    def moe_layers(self) -> list[nn.Module]:
        """The FFN layers (MoE or dense), one per block, in order."""
        return [block.ffn for block in self.blocks]

    def num_parameters(self) -> int:
        """Number of trainable parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())


def build_lm(cfg: LMConfig, vocab_size: int, device: str | torch.device = "cpu", dispatch: str = "auto",
             dtype: torch.dtype = torch.float32) -> MoETransformerLM:
    """A :class:`MoETransformerLM` initialised from ``cfg.seed`` with its own generator (never the global RNG).

    Same seed → same weights; an MoE and its dense baselines of one seed share the embedding draw.

    >>> a = build_lm(LMConfig(n_layers=1), vocab_size=10); b = build_lm(LMConfig(n_layers=1), vocab_size=10)
    >>> torch.equal(a.tok_emb_VD, b.tok_emb_VD)
    True
    """
    g = torch.Generator().manual_seed(10_007 * cfg.seed + 5)
    return MoETransformerLM(cfg, vocab_size, g, dispatch, dtype).to(device)


# --------------------------------------------------------------------------------------------- tracing


@torch.no_grad()
def trace_lm(model: MoETransformerLM, tokens: torch.Tensor, with_expert_outputs: bool = False) -> list[RoutingTrace]:
    """One :class:`~moewidgets.trace.RoutingTrace` per block's FFN on ``tokens`` (B, S) or (S,).

    Records what the forward pass itself routed: scoped forward hooks on every FFN (removed afterwards) catch its
    input ``x_TD`` (the post-``norm2`` hidden state, T = B·S tokens in row-major (b, s) order) and the router's
    ``probs_TE``, ``idx_TK``, ``gates_TK``. The model runs in eval mode (stateful routers are not updated) and its
    mode is restored. A dense FFN gives a one-expert trace (every token to expert 0 with gate 1), as
    :func:`~moewidgets.trace.trace_layer` does. ``with_expert_outputs`` adds the selected experts' ungated
    outputs (T, K, D). Chapter 2 (book/chapter2.ipynb).

    >>> cfg = LMConfig(moe=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=32), n_layers=2, n_heads=2, seq_len=8)
    >>> traces = trace_lm(build_lm(cfg, vocab_size=50), torch.arange(16).view(2, 8))
    >>> [(t.layer, tuple(t.x_TD.shape), tuple(t.idx_TK.shape)) for t in traces]
    [(0, (16, 16), (16, 2)), (1, (16, 16), (16, 2))]
    """
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)                                           # (S,) → (1, S)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, S) or (S,) ids, got shape {tuple(tokens.shape)}")
    layers = model.moe_layers()
    caught: list[tuple[torch.Tensor, MoEOutput] | None] = [None] * len(layers)

    def catcher(i: int):
        def hook(module, args, output):
            caught[i] = (args[0].detach(), output)
        return hook

    handles = [layer.register_forward_hook(catcher(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        model(tokens.to(model.tok_emb_VD.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    traces = []
    for i, (layer, got) in enumerate(zip(layers, caught)):
        x_TD, out = got
        T = x_TD.shape[0]
        if out.routing is None:                                                # dense FFN: one "expert"
            idx_TK = torch.zeros(T, 1, dtype=torch.long, device=x_TD.device)
            gates_TK = torch.ones(T, 1, dtype=x_TD.dtype, device=x_TD.device)
            probs_TE: torch.Tensor | None = torch.ones(T, 1, dtype=x_TD.dtype, device=x_TD.device)
        else:
            r = out.routing
            idx_TK, gates_TK = r.idx_TK, r.gates_TK.detach()
            probs_TE = r.probs_TE.detach() if r.probs_TE is not None else None
        out_TKD = None
        if with_expert_outputs:
            y_TED = layer.experts.all_outputs(x_TD)
            out_TKD = y_TED.gather(1, idx_TK.unsqueeze(-1).expand(-1, -1, y_TED.shape[-1]))
        traces.append(RoutingTrace(x_TD, probs_TE, idx_TK, gates_TK, out_TKD, i, getattr(layer, "n_experts", 1)))
    return traces


# --------------------------------------------------------------------------------------------- training


@dataclass
class LMHistory(History):
    """:class:`~moewidgets.train.History` of an LM run: ``loss`` is the training cross-entropy (nats per token),
    ``load`` the per-expert assignment fractions averaged over the MoE layers, plus ``layer_load`` (per step, one
    list of E fractions per MoE layer) and ``lr`` (the learning rate used at each step)."""

    layer_load: list[list[list[float]]] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


@dataclass
class LMEval:
    """Held-out evaluation: mean cross-entropy ``loss`` (nats per token), ``ppl = exp(loss)``, ``n_targets``."""

    loss: float
    ppl: float
    n_targets: int


class LMTrainer:
    """AdamW on a :class:`MoETransformerLM` over a :class:`~moewidgets.wikitext.WikiText`; ``step(n)`` advances n
    optimiser steps, like :class:`~moewidgets.train.Trainer` (chapter 2).

    Each step draws ``batch_size`` windows of ``seq_len + 1`` tokens at random offsets of the training stream
    (the trainer's own generator: same seed → same batches), minimises ``CE(next token) + Σ_layers aux_loss``,
    clips the gradient norm, steps AdamW with the warm-up/cosine learning rate, then calls
    ``layer.after_step(counts_E)`` on every MoE layer with that layer's own routing counts (loss-free balancing).
    A non-finite loss raises :class:`~moewidgets.train.NonFiniteLossError` before the update is applied.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "valid.txt").write_text("the cat sat on the mat\\n" * 40); _ = (d / "test.txt").write_text("the cat\\n")
    >>> cfg = LMConfig(moe=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=32), n_layers=1, n_heads=2,
    ...                seq_len=8, batch_size=4, steps=3, device="cpu")
    >>> tr = LMTrainer.from_config(cfg, data_dir=d, verbose=False)
    >>> _ = tr.step(3)
    >>> len(tr.history), tr.done, tr.evaluate().n_targets
    (3, True, 2)
    """

    def __init__(self, model: MoETransformerLM, data: WikiText, cfg: LMConfig | None = None):
        cfg = model.cfg if cfg is None else cfg
        if data.train_ids.numel() < cfg.seq_len + 2:
            raise ValueError(f"the training stream has {data.train_ids.numel()} tokens; it needs at least "
                             f"seq_len + 2 = {cfg.seq_len + 2}")
        if data.vocab_size > model.vocab_size:
            raise ValueError(f"data vocabulary {data.vocab_size} exceeds the model's vocab_size={model.vocab_size}")
        self.cfg, self.data = cfg, data
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.train_ids = data.train_ids.cpu()                       # batches are cut on the CPU, then moved
        self.generator = batch_generator(cfg.seed)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():               # decay matrices, not norms / biases (b_*)
            (decay if p.dim() >= 2 and not name.rsplit(".", 1)[-1].startswith("b_") else no_decay).append(p)
        self.optimizer = make_adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], cfg.lr, 0.0, self.device)
        self.history = LMHistory()
        self.steps_done = 0
        self.wall_s = 0.0
        self._layers = [m for m in self.model.moe_layers() if hasattr(m, "route")]
        self._offsets_S = torch.arange(cfg.seq_len)

    @classmethod
    def from_config(cls, cfg: LMConfig, data: WikiText | None = None, data_dir: str | os.PathLike | None = None,
                    verbose: bool = True, dispatch: str = "auto") -> "LMTrainer":
        """Load WikiText-2 (``data_dir`` or ``$MOEWIDGETS_DATA``, capped at ``cfg.vocab_size``) unless ``data`` is
        given, build the model from ``cfg.seed`` (with ``cfg.unigram_init``, its head bias starts at the training
        split's log unigram frequencies) and return the trainer."""
        if data is None:
            data = load_wikitext(data_dir, cfg.vocab_size, verbose)
        model = build_lm(cfg, data.vocab_size, dispatch=dispatch)
        if cfg.unigram_init:
            model.init_unigram_bias(data.train_ids)
        return cls(model, data, cfg)

    @property
    def done(self) -> bool:
        """True once ``cfg.steps`` steps have run."""
        return self.steps_done >= self.cfg.steps

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based step ``step``: linear warm-up, then cosine to 0 at ``steps`` (or constant)."""
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return cfg.lr
        span = max(1, cfg.steps - cfg.warmup)
        return cosine_lr(cfg.lr, min(step - cfg.warmup, span), span)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch: inputs and next-token targets, both (B, S), from the trainer's generator."""
        n = self.train_ids.shape[0]
        starts_B = torch.randint(n - self.cfg.seq_len, (self.cfg.batch_size,), generator=self.generator)
        idx_BS = starts_B[:, None] + self._offsets_S[None, :]
        return self.train_ids[idx_BS].to(self.device), self.train_ids[idx_BS + 1].to(self.device)

    def step(self, n: int = 1) -> float:
        """Run up to ``n`` optimiser steps (never past ``cfg.steps``); returns the last training loss (nats).

        Raises :class:`~moewidgets.train.NonFiniteLossError` (without applying that step's update) if the loss or
        the aux loss is not finite.
        """
        t0 = time.perf_counter()
        model, opt, hist, cfg = self.model, self.optimizer, self.history, self.cfg
        V = model.vocab_size
        model.train()
        loss_value = math.nan
        try:
            for _ in range(max(0, min(n, cfg.steps - self.steps_done))):
                x_BS, y_BS = self.batch()
                out = model(x_BS)
                ce = F_.cross_entropy(out.logits_BSV.reshape(-1, V), y_BS.reshape(-1))   # (B·S, V) vs (B·S,)
                loss_value, aux_value = float(ce.detach()), float(out.aux_loss.detach())
                if not (math.isfinite(loss_value) and math.isfinite(aux_value)):
                    raise NonFiniteLossError(self.steps_done + 1, loss_value if not math.isfinite(loss_value)
                                             else aux_value)
                opt.zero_grad(set_to_none=True)
                (ce + out.aux_loss).backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr_t = self.lr_at(self.steps_done)
                for group in opt.param_groups:
                    group["lr"] = lr_t
                opt.step()
                self.steps_done += 1
                loads = []
                for layer, routing in zip(model.moe_layers(), out.routings):
                    if routing is None:
                        continue
                    counts_E = expert_counts(routing.idx_TK, layer.n_experts)
                    layer.after_step(counts_E)
                    loads.append(counts_E / counts_E.sum())
                hist.step.append(self.steps_done)
                hist.loss.append(loss_value)
                hist.aux.append(aux_value)
                hist.lr.append(lr_t)
                if loads:
                    load_LE = torch.stack(loads)
                    hist.layer_load.append(load_LE.tolist())
                    hist.load.append(load_LE.mean(0).tolist())
                else:
                    hist.layer_load.append([])
                    hist.load.append([])
        finally:
            self.wall_s += time.perf_counter() - t0
        return loss_value

    def run(self, callback: Callable[["LMTrainer"], None] | None = None, every: int = 50) -> LMHistory:
        """Train to ``cfg.steps``; ``callback(trainer)`` every ``every`` steps (e.g. ``print(tr.progress())``)."""
        while not self.done:
            self.step(every)
            if callback is not None:
                callback(self)
        return self.history

    def progress(self) -> str:
        """One status line: step, training loss (mean of the last 20 steps) and its perplexity, wall time."""
        loss = self.history.last_loss(20)
        rate = self.steps_done / self.wall_s if self.wall_s > 0 else 0.0
        return (f"step {self.steps_done}/{self.cfg.steps}  train loss {loss:.3f} (ppl {math.exp(loss):.1f})  "
                f"{self.wall_s:.1f} s ({rate:.1f} steps/s)")

    @torch.no_grad()
    def evaluate(self, max_tokens: int | None = None, ids: torch.Tensor | None = None,
                 windows_per_batch: int = 64) -> LMEval:
        """Held-out cross-entropy and perplexity on ``ids`` (default: the held-out split, ``data.eval_ids``).

        Scores the targets ``ids[1:]`` (the first ``max_tokens`` of them if given), the same targets as
        :func:`~moewidgets.wikitext.baselines`, in consecutive non-overlapping windows of ``seq_len`` (each
        window's first target sees one token of context). Eval mode: stateful routers are not updated.
        """
        ids = (self.data.eval_ids if ids is None else ids).cpu()
        n = ids.shape[0] - 1 if max_tokens is None else min(ids.shape[0] - 1, int(max_tokens))
        if n < 1:
            raise ValueError(f"need at least one target: ids has {ids.shape[0]} tokens, max_tokens={max_tokens}")
        S, model = self.cfg.seq_len, self.model
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            n_full = n // S
            x_WS = ids[: n_full * S].view(n_full, S)                       # (n_full·S,) → (W windows, S)
            y_WS = ids[1: n_full * S + 1].view(n_full, S)
            chunks = [(x_WS[i:i + windows_per_batch], y_WS[i:i + windows_per_batch])
                      for i in range(0, n_full, windows_per_batch)]
            if n > n_full * S:                                             # the last, shorter window
                chunks.append((ids[n_full * S: n].view(1, -1), ids[n_full * S + 1: n + 1].view(1, -1)))
            for x_BS, y_BS in chunks:
                logits_BSV = model(x_BS.to(self.device)).logits_BSV
                total += float(F_.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]),
                                                y_BS.reshape(-1).to(self.device), reduction="sum"))
        finally:
            model.train(was_training)
        loss = total / n
        return LMEval(loss, math.exp(loss), n)

