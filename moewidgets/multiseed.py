"""Several seeds of one config trained at once, each as its own :class:`~moewidgets.train.Trainer` run would be.

Shape legend: S seeds, B batch tokens, N training points, D model width, F expert hidden width, E experts,
K top-k, O output width, G = S·E (seed, expert) groups, P = S·B·K (token, slot) pairs, C capacity: tokens per group (padded),
T = S·B tokens of all seeds, M = n·B batch rows of n steps drawn at once (pooled).

Claim runs train every arm over several seeds, and they do it here: :mod:`moewidgets.reproduce` trains each MLP
arm's seeds as one seed group on this trainer (a :class:`~moewidgets.sweep.Job` with ``seeds``). At widget sizes
one step of one seed costs its ≈ 110 torch ops (≈ 4 µs each) more than its arithmetic, so the S seeds share one
set of ops: every parameter of the S models
gets a leading seed axis (``w_in_SEFD`` …) and the forward is the layer's maths with that one more batch axis:

* the router's logits from its ``logits_with`` on the stacked tensors (:mod:`moewidgets.nn.functional`): softmax
  ``z_s = W_r[s] x + b_r[s]`` (one ``baddbmm``); MPI rows ``R'_s`` from :func:`~moewidgets.nn.functional.mpi_rows`
  on the S·E rows at once; K-Means cosines against each seed's centroids ``C_s`` (S, E, D), moved after each
  training forward by :func:`~moewidgets.nn.functional.kmeans_update` over the S·E (seed, expert) groups;
  then :func:`~moewidgets.nn.functional.route` (``p = softmax(z / τ)``, top-k on the S·B rows with seed s's
  loss-free bias on its rows, gates, per-seed aux and z losses);
* dispatch ``"dense"``: every expert of seed s on every token of seed s (batched einsums); or ``"gather"``: the
  S·E (seed, expert) pairs are the G groups of one bank (:func:`~moewidgets.nn.functional.combine_gather`), the
  P pairs sorted by group once for all seeds, each group through its expert without padding
  (``torch.nn.functional.grouped_mm``, "ragged") or padded to the largest group (one ``bmm``);
* per-seed losses ``L_s = mean‖pred_s − y_s‖² / O + L_aux,s`` and one ``backward`` of ``Σ_s L_s`` (seed s's
  weights only see ``L_s``); one fused AdamW step over the stacked weights (Adam is elementwise: S AdamW
  steps); loss-free bias updates per seed (:func:`~moewidgets.balance.loss_free_update` with the seed axis).

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

from .balance import expert_counts, loss_free_update
from .config import RunConfig
from .data import TaskData, make_task
from .models import MLPMoE, build_model, readout
from .nn import functional as fn
from .nn.experts import ragged_available
from .nn.layer import DISPATCHES, choose_dispatch
from .train import History, NonFiniteLossError, batch_generator, cosine_lr, make_adamw, resolve_device

__all__ = ["MultiSeedTrainer", "SeedResult", "train_seeds", "ragged_available"]


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

    Every router, balancing knob, arch and expert activation of :class:`~moewidgets.config.MoEConfig`: the
    forward is seed 0's layer's own functions (``router.logits_with``, ``route_with``, ``prepare_with``,
    ``update_with`` and :mod:`moewidgets.nn.functional`) applied to the stacked tensors.

    Attributes: ``seeds``; ``histories`` (one :class:`~moewidgets.train.History` per seed); ``errors`` (seed →
    :class:`~moewidgets.train.NonFiniteLossError` of a stopped seed); ``data`` (one
    :class:`~moewidgets.data.TaskData` per seed); ``params`` (state-dict name → the (S, …) stacked parameter,
    e.g. ``params["layer.experts.w_in_EFD"]`` is ``w_in_SEFD``); ``buffers`` (state-dict name → the (S, …) stacked buffer, e.g. the
    K-Means router's ``"layer.router.centroids_ED"``); ``lf_bias_SE`` (the loss-free biases, or None for a dense
    arch);
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
        # every buffer (loss-free biases, a stateful router's state) stacked the same way, by state-dict name
        self.buffers: dict[str, torch.Tensor] = {
            name: torch.stack([dict(m.named_buffers())[name] for m in models]).to(self.device)
            for name, _ in models[0].named_buffers()
        }
        self.lf_bias_SE = self.buffers.get("layer.lf_bias_E")
        # the modules of seed 0 are the templates: their hyper-parameters and their functions of given tensors
        self._layer = models[0].layer.to(self.device)
        self._router = getattr(self._layer, "router", None)
        if self._router is not None and not hasattr(self._router, "logits_with"):
            raise ValueError(f"run.model.router={cfg.router!r}: {type(self._router).__name__} has no logits_with(...) "
                             "(the router's logits as a function of given tensors), so its seeds cannot be stacked; "
                             "train it one seed at a time with moewidgets.train.Trainer")
        self._prepared = False          # the router's prepare_with ran on a training batch (it is then a no-op)
        self._init_seeds = [getattr(m.layer, "router", None) and getattr(m.layer.router, "init_seed", None)
                            for m in models]
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

    def _group(self, prefix: str, table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stacked tensors under ``prefix`` (a submodule's state-dict names), keyed by their own names."""
        return {name[len(prefix):]: t for name, t in table.items() if name.startswith(prefix)}

    def _forward(self, x_SBD: torch.Tensor, training: bool = False) -> _StackedOutput:
        """The model's forward with a leading seed axis: the functions of :mod:`moewidgets.nn.functional` that
        :class:`~moewidgets.nn.layer.MoELayer` calls, on the stacked weights (routing, combine, router state)."""
        c, p = self.cfg, self.params
        S, B, _ = x_SBD.shape
        bank_w = self._group("layer.experts.", p)
        if c.arch == "moe":
            router = self._router
            r_params, r_buffers = self._group("layer.router.", p), self._group("layer.router.", self.buffers)
            if not self._prepared and hasattr(router, "prepare_with"):     # e.g. K-Means: first batch → centroids
                router.prepare_with(r_buffers, x_SBD, training, self._init_seeds)
                self._prepared = training
            logits_SEB = router.logits_with(r_params, r_buffers, bank_w, x_SBD)      # expert-major (S, E, B)
            bias_SE = self.lf_bias_SE if c.lf_rate > 0 else None                       # selection only
            routing = router.route_with(logits_SEB, bias_SE)
            gates_SBK, idx_SBK = routing.gates_TK, routing.idx_TK
            if self.dispatch_path(S * B) == "dense":
                soft = idx_SBK.shape[2] == c.n_experts and c.lf_rate == 0
                y_SBD = fn.combine_dense(fn.expert_all_outputs(c.expert, bank_w, x_SBD), gates_SBK, idx_SBK, soft)
            else:
                y_SBD = fn.combine_gather(c.expert, bank_w, x_SBD, gates_SBK, idx_SBK, self.ragged)
            if training and hasattr(router, "update_with"):   # as the layer does after a training forward
                router.update_with(r_buffers, x_SBD, idx_SBK, self.active_S)
            aux_S = routing.aux_loss
        else:                        # DenseFFN: one expert of width E·m or k·m
            y_SBD = fn.expert_all_outputs(c.expert, bank_w, x_SBD)[:, :, 0]
            aux_S, idx_SBK = x_SBD.new_zeros(S), None
        return _StackedOutput(readout(p["w_ro_OD"], p["b_ro_O"], y_SBD), aux_S, idx_SBK)

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
                        loss_free_update(self.lf_bias_SE, counts_SE, self.cfg.lf_rate, active)
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
            state = {name: t.detach()[s].clone() for name, t in (self.params | self.buffers).items()}
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
