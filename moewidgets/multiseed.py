"""Several seeds of one config trained at once, each as its own :class:`~moewidgets.train.Trainer` run would be.

Shape legend: S seeds, B batch tokens, N training points, D model width, F expert hidden width, E experts,
K top-k, O output width, G = S·E (seed, expert) groups, P = S·B·K (token, slot) pairs, C tokens per group (padded).

Claim runs train every arm over several seeds, and they do it here: :mod:`moewidgets.reproduce` trains each MLP
arm's seeds as one seed group on this trainer (a :class:`~moewidgets.sweep.Job` with ``seeds``). At widget sizes
one step of one seed costs its ≈ 110 torch ops (≈ 4 µs each) more than its arithmetic, so the S seeds share one
set of ops: every parameter of the S models
gets a leading seed axis (``w_in_SEFD`` …) and the forward is the layer's maths with that one more batch axis:

* softmax router ``z_s = W_r[s] x + b_r[s]`` (one ``baddbmm``); MPI router rows ``R'_s`` from
  :func:`~moewidgets.nn.routers.mpi_rows` on the S·E rows at once; K-Means router cosines against each seed's
  centroids ``C_s`` (S, E, D), moved after each training forward by sums over the S·E (seed, expert) groups;
  ``p = softmax(z / τ)`` and :func:`~moewidgets.nn.routers.select_topk` on the S·B rows (seed s's loss-free bias
  added on its rows);
* dispatch ``"dense"``: every expert of seed s on every token of seed s (batched einsums); or ``"gather"``: the
  S·E (seed, expert) pairs are the G groups of one bank, the P pairs sorted by group once for all seeds, each
  group through its expert without padding (``torch.nn.functional.grouped_mm``, "ragged") or padded to the
  largest group (one ``bmm``);
* per-seed losses ``L_s = mean‖pred_s − y_s‖² / O + L_aux,s`` and one ``backward`` of ``Σ_s L_s`` (seed s's
  weights only see ``L_s``); one fused AdamW step over the stacked weights (Adam is elementwise: S AdamW
  steps); loss-free bias updates per seed.

Why an explicit seed axis rather than ``torch.func.vmap`` over ``functional_call``: the gather path pads to a
data-dependent ``C = max count``, which ``vmap`` cannot batch, so ``vmap`` is stuck with dense dispatch (E/K
times the expert FLOPs) and adds its own per-op overhead. At the chapter-1 default with 8 seeds (CPU time per
step, one thread, a busy machine): vmap + dense ≈ 65 ms, seed axis + dense 19 ms, + padded gather 13 ms, + ragged
gather 9.6 ms; one seed alone 3.5 ms.

Same as S separate ``Trainer.from_config(run.replace(model=run.model.replace(seed=s)))`` runs: initial weights
(:func:`~moewidgets.models.build_model` of seed s), data (:func:`~moewidgets.data.make_task` of seed s), batch
order (seed s's trainer generator), optimiser, learning-rate schedule, balancing losses and updates, gate
conventions, temperature and k = E soft routing. Only the summation order inside some matmuls differs, so the
numbers agree to ≈ 1e-7 relative, not bitwise (the tests check 1e-5). Over long top-k runs such rounding
differences eventually flip a top-k choice and runs drift apart, exactly as much as the Trainer's own two
(exact) dispatch paths drift from each other: at the chapter-1 claim size (2000 steps) the first loss deviation
above 1e-5 came after ≈ 200–500 steps and final probe MSEs differed by up to 8e-3 relative, in both comparisons.
Dense baselines stay bitwise equal. A seed's numbers do not depend on the other seeds trained with it: for a
fixed dispatch path, ``MultiSeedTrainer(run, [s])`` reproduces seed s of a multi-seed run (bitwise at the
chapter-1 sizes over 300 steps; in general up to 1-ulp differences where the fused AdamW kernel rounds its
vectorised body and its scalar tail differently, which depends on where a seed's block sits in the stacked tensor).

A seed whose loss turns non-finite stops alone, as its own run would (its weights stay the last good ones and
its error is kept in ``errors``); the others go on. :meth:`MultiSeedTrainer.models` unstacks the weights into
ordinary :class:`~moewidgets.models.MLPMoE` modules, so every geometry probe applies unchanged.
Chapter 1 (book/chapter1.ipynb).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F_
from torch import nn

from .balance import expert_counts
from .config import RunConfig
from .data import TaskData, make_task
from .models import MLPMoE, build_model
from .nn.experts import ragged_available, ragged_expert_outputs
from .nn.layer import DISPATCHES, choose_dispatch, gather_combine
from .nn.routers import mpi_rows, select_topk
from .train import History, NonFiniteLossError, batch_generator, cosine_lr, make_adamw, resolve_device

__all__ = ["MultiSeedTrainer", "SeedResult", "train_seeds", "ragged_available"]

MULTISEED_ROUTERS = ("softmax", "mpi", "kmeans")


@dataclass
class SeedResult:
    """One seed of a :class:`MultiSeedTrainer`, what a separate :class:`~moewidgets.train.Trainer` run would hold.

    Fields::

        seed:      the seed.
        run:       its RunConfig (run.model.seed == seed).
        history:   its per-step History (ends at its last good step if it stopped).
        model:     an ordinary MLPMoE with its trained weights.
        data:      its TaskData (make_task(run.task, seed)).
        probe_mse: mean-squared error on its probe set (what Trainer.evaluate() gives).
        error:     the NonFiniteLossError that stopped it, or None.
    """

    seed: int
    run: RunConfig
    history: History
    model: MLPMoE
    data: TaskData
    probe_mse: float
    error: NonFiniteLossError | None = None


@dataclass
class _StackedOutput:
    """The batched forward: ``pred_SBO`` (S, B, O), weighted ``aux_S`` (S,), ``idx_SBK`` (S, B, K) or None (dense)."""

    pred_SBO: torch.Tensor
    aux_S: torch.Tensor
    idx_SBK: torch.Tensor | None


def _check_seeds(seeds) -> tuple[int, ...]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of distinct integers >= 0")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if not seeds or bad:
        raise ValueError(f"seeds={list(seeds)!r} must be a non-empty list of distinct integers >= 0"
                         + (f" (bad: {bad!r})" if bad else ""))
    dup = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if dup:
        raise ValueError(f"seeds={list(seeds)!r} has duplicates {dup}: each seed must appear once")
    return tuple(seeds)


class MultiSeedTrainer:
    """S seeds of one :class:`~moewidgets.config.RunConfig` trained together, seed s as
    ``Trainer.from_config(run.replace(model=run.model.replace(seed=s)))`` would train it, to float rounding (see
    the module docstring). The step API is the Trainer's: ``step(n)``, ``run()``, ``done``, ``steps_done``.

    Args:
        run: the config; ``run.model.seed`` is ignored (``seeds`` replaces it).
        seeds: distinct integers >= 0.
        dispatch: "auto" (by :func:`~moewidgets.nn.layer.choose_dispatch` at S·B tokens), "dense" or "gather".
        ragged: the gather path without padding (:func:`ragged_available`; ``None``: whenever available) or
            with every group padded to the largest (``False``); same numbers either way.

    Routers "softmax", "mpi" and "kmeans", archs "moe", "dense" and "dense_active", experts "gelu" and "swiglu".

    Attributes: ``seeds``; ``histories`` (one :class:`~moewidgets.train.History` per seed); ``errors`` (seed →
    :class:`~moewidgets.train.NonFiniteLossError` of a stopped seed); ``data`` (one
    :class:`~moewidgets.data.TaskData` per seed); ``params`` (state-dict name → the (S, …) stacked parameter,
    e.g. ``params["layer.experts.w_in_EFD"]`` is ``w_in_SEFD``); ``lf_bias_SE`` (loss-free biases, or None for a
    dense arch); ``centroids_SED``, ``km_counts_SE`` (the K-Means router's state, ``router="kmeans"`` only);
    ``ragged`` (the gather path in use); ``wall_s`` (seconds spent in ``step``).

    >>> from moewidgets import MoEConfig, RunConfig, TaskConfig, TrainConfig
    >>> run = RunConfig(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16),
    ...                 TaskConfig(d_in=8, d_out=8, n_train=256, n_probe=32), TrainConfig(steps=5, device="cpu"))
    >>> ms = MultiSeedTrainer(run, seeds=[0, 1, 2])
    >>> _ = ms.step(5)
    >>> [len(h) for h in ms.histories], ms.done, [m.cfg.seed for m in ms.models()]
    ([5, 5, 5], True, [0, 1, 2])

    Chapter 1 (book/chapter1.ipynb).
    """

    def __init__(self, run: RunConfig, seeds: Sequence[int], dispatch: str = "auto", ragged: bool | None = None):
        if not isinstance(run, RunConfig):
            raise ValueError(f"run={run!r} must be a RunConfig")
        self.seeds = _check_seeds(seeds)
        cfg = run.model
        if cfg.arch == "moe" and cfg.router not in MULTISEED_ROUTERS:
            raise ValueError(f"run.model.router={cfg.router!r} is not supported by MultiSeedTrainer (allowed: "
                             f"{', '.join(repr(r) for r in MULTISEED_ROUTERS)}); train it one seed at a time "
                             "with moewidgets.train.Trainer")
        if cfg.arch == "moe" and cfg.router == "kmeans" and run.train.batch_size < cfg.n_experts:
            raise ValueError(f"run.train.batch_size={run.train.batch_size} must be >= n_experts={cfg.n_experts} "
                             "for router='kmeans' (its first batch initialises one centroid per expert)")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch={dispatch!r} must be one of {DISPATCHES}")
        if ragged not in (None, True, False):
            raise ValueError(f"ragged={ragged!r} must be None (when available), True or False")
        self.run_config, self.cfg, self.train_cfg, self.dispatch = run, cfg, run.train, dispatch
        self.runs = [run.replace(model=cfg.replace(seed=s)) for s in self.seeds]
        self.device = resolve_device(run.train.device)
        S = len(self.seeds)
        can_ragged = ragged_available(self.device, cfg.d_model, cfg.d_hidden)
        if ragged and not can_ragged:
            raise ValueError(f"ragged=True needs torch.nn.functional.grouped_mm (torch >= 2.8), a CPU device and "
                             f"d_model, d_hidden multiples of 4; got torch {torch.__version__}, device "
                             f"{self.device}, d_model={cfg.d_model}, d_hidden={cfg.d_hidden}")
        self.ragged = can_ragged if ragged is None else ragged

        # the S models and data sets, exactly as S trainers would build them; then stack along a seed axis
        models = [build_model(r.model, r.task.d_out) for r in self.runs]
        self.data = [make_task(run.task, s).to(self.device) for s in self.seeds]
        self.params: dict[str, nn.Parameter] = {
            name: nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach() for m in models]).to(self.device))
            for name, _ in models[0].named_parameters()
        }
        self.lf_bias_SE = (torch.stack([m.layer.lf_bias_E for m in models]).to(self.device)
                           if cfg.arch == "moe" else None)
        self.kmeans = cfg.arch == "moe" and cfg.router == "kmeans"
        if self.kmeans:          # the K-Means router's state per seed (buffers, no parameters)
            self.centroids_SED = torch.stack([m.layer.router.centroids_ED for m in models]).to(self.device)
            self.km_counts_SE = torch.stack([m.layer.router.counts_E for m in models]).to(self.device)
            self.km_init_seeds = [m.layer.router.init_seed for m in models]
            self.km_initialized = False
        self.x_train_SND = torch.stack([d.x_train for d in self.data])
        self.y_train_SNO = torch.stack([d.y_train for d in self.data])
        for s, d in enumerate(self.data):          # one copy of the training set: each seed's is a view of the stack
            d.x_train, d.y_train = self.x_train_SND[s], self.y_train_SNO[s]
        N = self.x_train_SND.shape[1]
        self._row_offset_S1 = (torch.arange(S, device=self.device) * N).unsqueeze(1)   # seed s's rows in (S·N)

        self.generators = [batch_generator(s) for s in self.seeds]          # as Trainer: batch order
        self.optimizer = make_adamw(list(self.params.values()), run.train.lr, run.train.weight_decay, self.device)
        self.histories = [History() for _ in self.seeds]
        self.errors: dict[int, NonFiniteLossError] = {}
        self.active_S = torch.ones(S, dtype=torch.bool)     # False once a seed's loss went non-finite
        self._frozen: dict[str, torch.Tensor] = {}           # last good weights of stopped seeds
        self.steps_done = 0
        self.wall_s = 0.0

    @property
    def n_seeds(self) -> int:
        """S, the number of seeds trained together."""
        return len(self.seeds)

    @property
    def done(self) -> bool:
        """True once ``train.steps`` steps have run (or every seed has stopped on a non-finite loss)."""
        return self.steps_done >= self.train_cfg.steps or not bool(self.active_S.any())

    # ---------------------------------------------------------------- the batched forward (one more axis: S)

    def dispatch_path(self, n_tokens: int) -> str:
        """The dispatch path ("dense" or "gather") a forward of ``n_tokens`` tokens (all seeds together) takes."""
        if self.dispatch != "auto":
            return self.dispatch
        c = self.cfg
        return choose_dispatch(n_tokens, c.n_experts, c.k, c.d_model, c.d_hidden, c.expert)

    def _all_outputs(self, x_SBD: torch.Tensor) -> torch.Tensor:
        """Every expert of seed s on every token of seed s, (S, B, E, D) (the bank's ``all_outputs`` per seed)."""
        p = self.params
        if self.cfg.expert == "gelu":
            h_SBEF = torch.einsum("sbd,sefd->sbef", x_SBD, p["layer.experts.w_in_EFD"]) \
                + p["layer.experts.b_in_EF"].unsqueeze(1)
            return torch.einsum("sbef,sedf->sbed", F_.gelu(h_SBEF), p["layer.experts.w_out_EDF"]) \
                + p["layer.experts.b_out_ED"].unsqueeze(1)
        g_SBEF = torch.einsum("sbd,sefd->sbef", x_SBD, p["layer.experts.w_gate_EFD"])
        u_SBEF = torch.einsum("sbd,sefd->sbef", x_SBD, p["layer.experts.w_up_EFD"])
        return torch.einsum("sbef,sedf->sbed", F_.silu(g_SBEF) * u_SBEF, p["layer.experts.w_out_EDF"])

    def _grouped_outputs(self, x_GCD: torch.Tensor) -> torch.Tensor:
        """Group g = s·E + e through expert e of seed s: x_GCD (G, C, D) → (G, C, D) (the bank's
        ``grouped_outputs`` over the S·E stacked experts)."""
        w = self._expert_weights_G()
        if self.cfg.expert == "gelu":
            h_GCF = torch.baddbmm(w["b_in_EF"].unsqueeze(1), x_GCD, w["w_in_EFD"].transpose(1, 2))
            return torch.baddbmm(w["b_out_ED"].unsqueeze(1), F_.gelu(h_GCF), w["w_out_EDF"].transpose(1, 2))
        g_GCF = torch.bmm(x_GCD, w["w_gate_EFD"].transpose(1, 2))
        u_GCF = torch.bmm(x_GCD, w["w_up_EFD"].transpose(1, 2))
        return torch.bmm(F_.silu(g_GCF) * u_GCF, w["w_out_EDF"].transpose(1, 2))

    def _expert_weights_G(self) -> dict[str, torch.Tensor]:
        """The stacked expert weights with (seed, expert) flattened into G = S·E groups: (S, E, …) → (G, …)."""
        names = (("w_in_EFD", "b_in_EF", "w_out_EDF", "b_out_ED") if self.cfg.expert == "gelu"
                 else ("w_gate_EFD", "w_up_EFD", "w_out_EDF"))
        return {n: self.params[f"layer.experts.{n}"].flatten(0, 1) for n in names}

    def _combine_gather(self, x_SBD, gates_SBK, idx_SBK):
        """:func:`~moewidgets.nn.layer.gather_combine` over G = S·E groups (group g = s·E + e is expert e of seed
        s): the (token, slot) pairs of all seeds sorted by group once, each group through its expert."""
        S, B, K = idx_SBK.shape
        E, D = self.cfg.n_experts, x_SBD.shape[2]
        gid_SBK = idx_SBK + E * torch.arange(S, device=x_SBD.device).view(S, 1, 1)      # (S, B, K) group ids
        ragged = self._ragged_outputs if self.ragged else None
        y_TD = gather_combine(x_SBD.reshape(S * B, D), gates_SBK.reshape(S * B, K), gid_SBK.reshape(S * B, K),
                              S * E, self._grouped_outputs, ragged)                      # T = S·B tokens
        return y_TD.view(S, B, D)

    def _ragged_outputs(self, x_PD: torch.Tensor, g_sorted: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
        """Slots sorted by group through their experts with no padding
        (:func:`~moewidgets.nn.experts.ragged_expert_outputs` over the G = S·E stacked experts)."""
        return ragged_expert_outputs(self.cfg.expert, self._expert_weights_G(), x_PD, g_sorted, offs_G)

    def _combine_dense(self, x_SBD, gates_SBK, idx_SBK):
        """``MoELayer._combine_dense`` per seed: every expert on every token, weighted by the (S, B, E) gates."""
        y_SBED = self._all_outputs(x_SBD)
        if idx_SBK.shape[2] == self.cfg.n_experts and self.cfg.lf_rate == 0:
            g_SBE = gates_SBK                    # fully soft: slots are experts in index order (select_topk)
        else:
            g_SBE = gates_SBK.new_zeros(*gates_SBK.shape[:2], self.cfg.n_experts).scatter(2, idx_SBK, gates_SBK)
        return torch.einsum("sbe,sbed->sbd", g_SBE, y_SBED)

    def _logits_SEB(self, x_SBD: torch.Tensor) -> torch.Tensor:
        """Router logits of every seed, laid out (S, E, B): a softmax over E is then a reduction across rows,
        which torch vectorises along B (over a last dim of E = 8 it costs ≈ 6× more, per-row overhead)."""
        p, c = self.params, self.cfg
        x_SDB = x_SBD.transpose(1, 2)
        if c.router == "kmeans":                                       # cosines s = x̂ Ĉᵀ
            xn_SDB = F_.normalize(x_SBD.detach() if c.kmeans_detach else x_SBD, dim=-1).transpose(1, 2)
            return torch.bmm(F_.normalize(self.centroids_SED, dim=-1), xn_SDB)
        if c.router == "softmax":                                      # z = W_r x + b_r
            return torch.baddbmm(p["layer.router.b_E"].unsqueeze(2), p["layer.router.w_ED"], x_SDB)
        S, E, D = p["layer.router.r_ED"].shape                          # MPI: z = R' x, R' from the power step
        w_name = "layer.experts.w_in_EFD" if c.expert == "gelu" else "layer.experts.w_gate_EFD"
        rows_GD = mpi_rows(p["layer.router.r_ED"].reshape(S * E, D), p[w_name].flatten(0, 1),
                           c.mpi_scale / math.sqrt(c.n_experts), c.mpi_steps, c.mpi_detach)
        return torch.bmm(rows_GD.view(S, E, D), x_SDB)

    def _forward(self, x_SBD: torch.Tensor, training: bool = False) -> _StackedOutput:
        c, p = self.cfg, self.params
        S, B, _ = x_SBD.shape
        if c.arch == "moe":
            if self.kmeans and not self.km_initialized:
                if not training:
                    raise RuntimeError("MultiSeedTrainer: the K-Means centroids are not initialised yet; run one "
                                       "training step first")
                self._kmeans_init(x_SBD)
            logits_SEB = self._logits_SEB(x_SBD)
            E = logits_SEB.shape[1]
            scaled_SEB = logits_SEB / c.temperature
            probs_SEB = torch.softmax(scaled_SEB, dim=1)
            probs_TE = probs_SEB.transpose(1, 2).reshape(S * B, E)                      # T = S·B rows (a copy)
            bias_TE = (self.lf_bias_SE.unsqueeze(1).expand(S, B, E).reshape(S * B, E)    # seed s's bias on its rows
                       if c.lf_rate > 0 else None)
            scaled_TE = scaled_SEB.transpose(1, 2).reshape(S * B, E) if c.gate == "renorm" else None
            gates_TK, idx_TK = select_topk(probs_TE, c.k, c.gate, bias_TE, scaled_TE)
            gates_SBK, idx_SBK = gates_TK.view(S, B, -1), idx_TK.view(S, B, -1)
            aux_S = logits_SEB.new_zeros(S)
            if c.aux_weight > 0:     # Switch aux loss per seed: E Σ_i f_i P_i (moewidgets.balance.switch_aux_loss)
                ones = torch.ones_like(gates_SBK).view(S, -1)
                f_SE = logits_SEB.new_zeros(S, E).scatter_add(1, idx_SBK.reshape(S, -1), ones) / idx_SBK[0].numel()
                aux_S = aux_S + c.aux_weight * (E * (f_SE * probs_SEB.mean(2)).sum(-1))
            if c.z_weight > 0:       # z-loss per seed: mean_t logsumexp(z_t)²
                aux_S = aux_S + c.z_weight * torch.logsumexp(logits_SEB, dim=1).square().mean(-1)
            combine = self._combine_dense if self.dispatch_path(S * B) == "dense" else self._combine_gather
            y_SBD = combine(x_SBD, gates_SBK, idx_SBK)
            if self.kmeans and training:        # as the layer does after a training forward: move the centroids
                self._kmeans_update(x_SBD, idx_SBK)
        else:                        # DenseFFN: one expert of width E·m or k·m
            y_SBD, aux_S, idx_SBK = self._all_outputs(x_SBD)[:, :, 0], x_SBD.new_zeros(S), None
        pred_SBO = torch.baddbmm(p["b_ro_O"].unsqueeze(1), y_SBD, p["w_ro_OD"].transpose(1, 2))
        return _StackedOutput(pred_SBO, aux_S, idx_SBK)

    @torch.no_grad()
    def _kmeans_init(self, x_SBD: torch.Tensor) -> None:
        """``KMeansRouter.init_centroids`` per seed: E distinct random tokens of its first batch (its own seed)."""
        E, B = self.cfg.n_experts, x_SBD.shape[1]
        for s, seed in enumerate(self.km_init_seeds):
            pick_E = torch.randperm(B, generator=torch.Generator().manual_seed(seed))[:E].to(x_SBD.device)
            self.centroids_SED[s] = x_SBD[s, pick_E]
        self.km_counts_SE.zero_()
        self.km_initialized = True

    @torch.no_grad()
    def _kmeans_update(self, x_SBD: torch.Tensor, idx_SBK: torch.Tensor) -> None:
        """``KMeansRouter.update`` per active seed: each centroid moves towards the mean of the batch tokens routed
        to it (EMA or cumulative); the sums run over the G = S·E (seed, expert) groups at once."""
        c = self.cfg
        S, B, K = idx_SBK.shape
        E, D = c.n_experts, x_SBD.shape[2]
        x_TD = x_SBD.reshape(S * B, D)
        if c.kmeans_normalize:
            x_TD = F_.normalize(x_TD, dim=-1)
        gid = (idx_SBK + E * torch.arange(S, device=x_TD.device).view(S, 1, 1)).reshape(-1)   # (P,) group of slot
        x_PD = x_TD.unsqueeze(1).expand(S * B, K, D).reshape(-1, D)                          # token of each slot
        sum_SED = x_TD.new_zeros(S * E, D).index_add_(0, gid, x_PD).view(S, E, D)
        n_SE = x_TD.new_zeros(S * E).index_add_(0, gid, torch.ones_like(gid, dtype=x_TD.dtype)).view(S, E)
        C_SED, counts_SE = self.centroids_SED, self.km_counts_SE
        if c.kmeans_mode == "ema":
            mean_SED = sum_SED / n_SE.clamp_min(1).unsqueeze(2)
            new_SED = (1 - c.kmeans_rate) * C_SED + c.kmeans_rate * mean_SED
        else:
            total_SE = counts_SE + n_SE
            new_SED = (counts_SE.unsqueeze(2) * C_SED + sum_SED) / total_SE.clamp_min(1).unsqueeze(2)
        active_S1 = self.active_S.to(x_TD.device).unsqueeze(1)        # a stopped seed's state stays as it was
        hit_SE = (n_SE > 0) & active_S1                                # experts with no token keep C_i
        C_SED.copy_(torch.where(hit_SE.unsqueeze(2), new_SED, C_SED))
        counts_SE.add_(torch.where(active_S1, n_SE, 0.0))

    # ---------------------------------------------------------------- training

    def step(self, n: int = 1) -> list[float]:
        """Run up to ``n`` optimiser steps of every seed (never past ``train.steps``); returns each seed's last
        task loss (nan for a seed that stopped). A seed whose loss or aux loss is not finite stops without that
        step's update (its error goes to ``errors[seed]``), as its own :class:`~moewidgets.train.Trainer` would."""
        t0 = time.perf_counter()
        S, B, cfg = self.n_seeds, self.train_cfg.batch_size, self.train_cfg
        n = max(0, min(n, cfg.steps - self.steps_done)) if bool(self.active_S.any()) else 0
        x_flat, y_flat = self.x_train_SND.flatten(0, 1), self.y_train_SNO.flatten(0, 1)    # (S·N, D), (S·N, O)
        last = [math.nan] * S
        try:
            if n == 0:
                return last
            # n steps' batch indices per seed in one draw: the CPU generator gives the same numbers as n draws of
            # B (the tests compare with Trainer, which draws B per step); then rows of the flattened (S·N) data
            N = self.x_train_SND.shape[1]
            rows_SM = torch.stack([torch.randint(N, (n * B,), generator=g) for g in self.generators])
            rows_SM = rows_SM.to(self.device) + self._row_offset_S1
            for i in range(n):
                rows = rows_SM[:, i * B:(i + 1) * B].reshape(-1)                        # (S·B,)
                x_SBD = x_flat.index_select(0, rows).view(S, B, -1)
                y_SBO = y_flat.index_select(0, rows).view(S, B, -1)
                out = self._forward(x_SBD, training=True)
                task_S = F_.mse_loss(out.pred_SBO, y_SBO, reduction="none").mean(dim=(1, 2))
                task_l, aux_l = torch.stack([task_S.detach(), out.aux_S.detach()]).tolist()
                self._stop_nonfinite(task_l, aux_l)
                active_l = self.active_S.tolist()
                if not any(active_l):
                    break
                active = self.active_S.to(self.device)
                loss_S = task_S + out.aux_S                 # seed s's weights see only L_s
                loss = (loss_S if all(active_l) else torch.where(active, loss_S, 0.0)).sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.schedule == "cosine":
                    lr_t = cosine_lr(cfg.lr, self.steps_done, cfg.steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr_t
                self.optimizer.step()
                if self._frozen:
                    self._restore_stopped()
                self.steps_done += 1
                loads = None
                if out.idx_SBK is not None:
                    E = self.cfg.n_experts
                    gid = out.idx_SBK + E * torch.arange(S, device=self.device).view(S, 1, 1)
                    counts_SE = expert_counts(gid, S * E).view(S, E)
                    if self.cfg.lf_rate > 0:
                        self._loss_free_update(counts_SE, active)
                    loads = (counts_SE / counts_SE.sum(-1, keepdim=True)).tolist()
                for s, hist in enumerate(self.histories):
                    if active_l[s]:
                        hist.step.append(self.steps_done)
                        hist.loss.append(task_l[s])
                        hist.aux.append(aux_l[s])
                        hist.load.append(loads[s] if loads is not None else [])
                        last[s] = task_l[s]
        finally:
            self.wall_s += time.perf_counter() - t0
        return last

    def _stop_nonfinite(self, task_l: list[float], aux_l: list[float]) -> None:
        """Stop the seeds whose step loss is not finite: keep their current (last good) weights and the error."""
        for s, seed in enumerate(self.seeds):
            if self.active_S[s] and not (math.isfinite(task_l[s]) and math.isfinite(aux_l[s])):
                self.errors[seed] = NonFiniteLossError(self.steps_done + 1, task_l[s])
                self.active_S[s] = False
                for name, p in self.params.items():
                    self._frozen.setdefault(name, p.detach().clone())[s] = p.detach()[s]

    @torch.no_grad()
    def _restore_stopped(self) -> None:
        stopped = ~self.active_S.to(self.device)
        for name, p in self.params.items():
            p[stopped] = self._frozen[name][stopped]

    @torch.no_grad()
    def _loss_free_update(self, counts_SE: torch.Tensor, active_S: torch.Tensor) -> None:
        """``b_s ← b_s + γ sign(mean(c_s) − c_s)``, centred, per active seed
        (:func:`~moewidgets.balance.loss_free_update` with a seed axis)."""
        b_SE = self.lf_bias_SE
        new_SE = b_SE + self.cfg.lf_rate * torch.sign(counts_SE.mean(-1, keepdim=True) - counts_SE)
        new_SE = new_SE - new_SE.mean(-1, keepdim=True)
        b_SE.copy_(torch.where(active_S.unsqueeze(1), new_SE, b_SE))

    def run(self, callback: Callable[["MultiSeedTrainer"], None] | None = None, every: int = 50) -> list[History]:
        """Train to ``train.steps``; ``callback(self)`` every ``every`` steps. Returns the per-seed histories."""
        while not self.done:
            self.step(every)
            if callback is not None:
                callback(self)
        return self.histories

    # ---------------------------------------------------------------- results

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Each seed's mean-squared error on its own probe set (``Trainer.evaluate()`` per seed)."""
        x_SPD = torch.stack([d.x_probe for d in self.data])
        y_SPO = torch.stack([d.y_probe for d in self.data])
        pred_SPO = self._forward(x_SPD).pred_SBO
        return F_.mse_loss(pred_SPO, y_SPO, reduction="none").mean(dim=(1, 2)).tolist()

    def models(self) -> list[MLPMoE]:
        """The S trained models as ordinary :class:`~moewidgets.models.MLPMoE` modules (fresh copies, on
        ``self.device``): every geometry probe applies to them unchanged."""
        out = []
        for s, r in enumerate(self.runs):
            model = build_model(r.model, r.task.d_out, device=self.device)
            state = {name: p.detach()[s].clone() for name, p in self.params.items()}
            if self.lf_bias_SE is not None:
                state["layer.lf_bias_E"] = self.lf_bias_SE[s].clone()
            if self.kmeans:
                state["layer.router.centroids_ED"] = self.centroids_SED[s].clone()
                state["layer.router.counts_E"] = self.km_counts_SE[s].clone()
                state["layer.router.initialized"] = torch.tensor(self.km_initialized)
            model.load_state_dict(state)
            out.append(model)
        return out

    def results(self) -> list[SeedResult]:
        """One :class:`SeedResult` per seed (history, model, data, probe MSE, error)."""
        mse = self.evaluate()
        return [SeedResult(seed, r, h, m, d, mse[s], self.errors.get(seed))
                for s, (seed, r, h, m, d) in enumerate(zip(self.seeds, self.runs, self.histories, self.models(),
                                                           self.data))]


def train_seeds(run: RunConfig, seeds: Sequence[int], dispatch: str = "auto", ragged: bool | None = None,
                callback: Callable[[MultiSeedTrainer], None] | None = None, every: int = 50) -> list[SeedResult]:
    """Train ``seeds`` of ``run`` at once (:class:`MultiSeedTrainer`) to ``run.train.steps``; one
    :class:`SeedResult` per seed, each equal (to float rounding) to its own ``Trainer`` run.

    >>> from moewidgets import MoEConfig, RunConfig, TaskConfig, TrainConfig
    >>> run = RunConfig(MoEConfig(n_experts=4, k=1, d_model=8, d_hidden=16),
    ...                 TaskConfig(d_in=8, d_out=8, n_train=256, n_probe=32), TrainConfig(steps=3, device="cpu"))
    >>> [(r.seed, len(r.history)) for r in train_seeds(run, [3, 5])]
    [(3, 3), (5, 3)]

    Chapter 1 (book/chapter1.ipynb).
    """
    trainer = MultiSeedTrainer(run, seeds, dispatch, ragged)
    trainer.run(callback, every)
    return trainer.results()
