"""Training: a seeded, synchronous trainer with a step API (dashboards drive it a few steps at a time).

Shape legend: B batch, T tokens, D model width, E experts, K top-k, O output width.

Loss (chapter 1): ``L = mean‖pred − y‖² / O + L_aux`` with ``L_aux`` the router's weighted balancing losses.
After each optimiser step every MoE layer gets ``after_step(counts_E)`` (loss-free balancing).

Determinism: the trainer owns one ``torch.Generator`` for batch order; the model was initialised from its own
generator (``build_model``) and the task from another (``make_task``). Same config, seed and thread count on CPU
→ bitwise-identical losses.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from .balance import expert_counts
from .config import RunConfig, TrainConfig
from .data import TaskData, make_task
from .models import build_model
from .trace import RoutingTrace

__all__ = ["History", "Trainer", "NonFiniteLossError", "train", "resolve_device", "trace_model", "torch_threads",
           "batch_generator", "make_adamw", "cosine_lr", "SteppedTrainer", "LiveTrainer"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss is NaN or infinite; the step's update is not applied (the model keeps its last
    good weights)."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"loss became {value} at step {step}: training stopped, the last good weights are kept "
                         "(try a smaller learning rate or a larger temperature)")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads and restore the caller's setting afterwards (``None``: leave
    it alone). Widget-size models gain nothing from more threads, on a busy 2-core machine two OpenMP threads
    spin-wait on each other, and with one thread a run's numbers do not depend on the machine's core count; the
    live dashboards and the claim runs use ``n=1``.

    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, then MPS, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def batch_generator(seed: int) -> torch.Generator:
    """The generator of a run's batch order, from the run's seed (separate from the init and data generators, so the
    same seed gives the same batches whatever the model). Every trainer uses it."""
    return torch.Generator().manual_seed(7_919 * seed + 3)


def make_adamw(param_groups, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CPU and CUDA: one kernel per step instead of ~6 foreach ops per parameter group (same maths)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=fused,
                             foreach=None if fused else True)


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """The cosine schedule ``lr_t = lr · ½(1 + cos(π t / steps))`` at 0-based step t (0 at t = steps).

    >>> cosine_lr(1.0, 0, 10), cosine_lr(1.0, 5, 10), round(cosine_lr(1.0, 10, 10), 12)
    (1.0, 0.5, 0.0)
    """
    return 0.5 * lr * (1 + math.cos(math.pi * step / steps))


@dataclass
class History:
    """Per-step records: ``step`` (1-based), ``loss`` (task loss), ``aux`` (weighted balancing loss) and
    ``load`` (fraction of assignments per expert, a list of E floats, or [] for a dense model)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    load: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    def last_loss(self, window: int = 1) -> float:
        """Mean task loss over the last ``window`` steps (nan if none)."""
        tail = self.loss[-window:]
        return sum(tail) / len(tail) if tail else math.nan


@runtime_checkable
class SteppedTrainer(Protocol):
    """The step API every trainer shares (:class:`Trainer`, :class:`~moewidgets.lm.LMTrainer`,
    :class:`~moewidgets.multiseed.MultiSeedTrainer`), what the claim runs drive:

    * ``step(n)`` runs up to n optimiser steps (never past the configured steps) and returns the last loss(es);
    * ``done`` is True once the configured steps have run; ``steps_done`` counts them; ``wall_s`` is the time
      spent in ``step``;
    * ``run(callback, every)`` trains to the end, calling ``callback(trainer)`` every ``every`` steps;
    * ``evaluate(...)`` scores the trained model(s) on held-out data.
    """

    steps_done: int
    wall_s: float

    @property
    def done(self) -> bool: ...

    def step(self, n: int = 1) -> Any: ...

    def run(self, callback: Callable[[Any], None] | None = None, every: int = 50) -> Any: ...

    def evaluate(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class LiveTrainer(SteppedTrainer, Protocol):
    """What :class:`~moewidgets.dashboards.runner.LiveRunner` and the dashboards read of one run's trainer
    (:class:`Trainer`, :class:`~moewidgets.lm.LMTrainer`): the step API plus ``cfg`` (its ``steps``), ``history``
    (``loss``, ``last_loss(window)``), ``model`` and ``data``.

    >>> from moewidgets import RunConfig, TaskConfig, TrainConfig
    >>> isinstance(Trainer.from_config(RunConfig(task=TaskConfig(n_train=64, n_probe=8))), LiveTrainer)
    True
    """

    cfg: Any
    history: Any
    model: torch.nn.Module
    data: Any


class Trainer:
    """Adam on an MLP-MoE and a task; ``step(n)`` advances n optimiser steps (chapter 1).

    >>> from moewidgets import RunConfig, TaskConfig, TrainConfig
    >>> run = RunConfig(task=TaskConfig(n_train=512, n_probe=64), train=TrainConfig(steps=5, device="cpu"))
    >>> tr = Trainer.from_config(run)
    >>> _ = tr.step(5)
    >>> len(tr.history), tr.done
    (5, True)
    """

    def __init__(self, model: torch.nn.Module, data: TaskData, cfg: TrainConfig = TrainConfig(), seed: int = 0):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.data = data.to(self.device)
        self.generator = batch_generator(seed)
        self.optimizer = make_adamw(list(self.model.parameters()), cfg.lr, cfg.weight_decay, self.device)
        self.history = History()
        self.steps_done = 0
        self.wall_s = 0.0
        self._layers = list(model.moe_layers()) if hasattr(model, "moe_layers") else []

    @classmethod
    def from_config(cls, run: RunConfig, model: torch.nn.Module | None = None,
                    data: TaskData | None = None) -> "Trainer":
        """Build the task, the model and the trainer of a :class:`~moewidgets.config.RunConfig` (each from ``run.model.seed``)."""
        seed = run.model.seed
        data = make_task(run.task, seed) if data is None else data
        model = build_model(run.model, run.task.d_out) if model is None else model
        return cls(model, data, run.train, seed)

    @property
    def done(self) -> bool:
        """True once ``cfg.steps`` steps have run."""
        return self.steps_done >= self.cfg.steps

    def step(self, n: int = 1) -> float:
        """Run up to ``n`` optimiser steps (never past ``cfg.steps``); returns the last task loss.

        Raises :class:`NonFiniteLossError` (without applying that step's update) if the loss is not finite.
        """
        t0 = time.perf_counter()
        x_all, y_all = self.data.x_train, self.data.y_train
        n_train = x_all.shape[0]
        B = self.cfg.batch_size
        model, opt, hist = self.model, self.optimizer, self.history
        model.train()
        loss_value = math.nan
        try:
            for _ in range(max(0, min(n, self.cfg.steps - self.steps_done))):
                idx_B = torch.randint(n_train, (B,), generator=self.generator).to(self.device)
                out = model(x_all[idx_B])
                task_loss = torch.nn.functional.mse_loss(out.pred_TO, y_all[idx_B])
                loss = task_loss + out.aux_loss
                loss_value = float(task_loss.detach())
                if not math.isfinite(loss_value) or not math.isfinite(float(out.aux_loss.detach())):
                    raise NonFiniteLossError(self.steps_done + 1, loss_value)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.schedule == "cosine":
                    lr_t = cosine_lr(self.cfg.lr, self.steps_done, self.cfg.steps)
                    for group in opt.param_groups:
                        group["lr"] = lr_t
                opt.step()
                self.steps_done += 1
                hist.step.append(self.steps_done)
                hist.loss.append(loss_value)
                hist.aux.append(float(out.aux_loss.detach()))
                if out.routing is not None:
                    counts_E = expert_counts(out.routing.idx_TK, self._layers[0].n_experts)
                    for layer in self._layers:
                        layer.after_step(counts_E)
                    hist.load.append((counts_E / counts_E.sum()).tolist())
                else:
                    hist.load.append([])
        finally:
            self.wall_s += time.perf_counter() - t0
        return loss_value

    def run(self, callback=None, every: int = 50) -> History:
        """Train to ``cfg.steps``; ``callback(trainer)`` every ``every`` steps (e.g. a progress bar)."""
        while not self.done:
            self.step(every)
            if callback is not None:
                callback(self)
        return self.history

    @torch.no_grad()
    def evaluate(self, x_TD: torch.Tensor | None = None, y_TO: torch.Tensor | None = None) -> float:
        """Mean-squared error on the probe set (or on given points)."""
        x_TD = self.data.x_probe if x_TD is None else x_TD.to(self.device)
        y_TO = self.data.y_probe if y_TO is None else y_TO.to(self.device)
        self.model.eval()
        return float(torch.nn.functional.mse_loss(self.model(x_TD).pred_TO, y_TO))


def train(model: torch.nn.Module, data: TaskData, steps: int = 400, seed: int = 0, **train_kwargs) -> Trainer:
    """Train ``model`` on ``data`` for ``steps`` steps and return the :class:`Trainer` (history, model).

    >>> from moewidgets import MoEConfig, TaskConfig, build_model, make_task
    >>> tr = train(build_model(MoEConfig()), make_task(TaskConfig(n_train=512)), steps=3, device="cpu")
    >>> len(tr.history.loss)
    3
    """
    trainer = Trainer(model, data, TrainConfig(steps=steps, **train_kwargs), seed)
    trainer.run(every=steps or 1)
    return trainer


@torch.no_grad()
def trace_model(model: torch.nn.Module, x_TD: torch.Tensor, with_expert_outputs: bool = False) -> RoutingTrace:
    """The routing trace of the (single) MoE layer of an :class:`~moewidgets.models.MLPMoE` on inputs x_TD.

    A dense model gives a one-expert trace (every token to expert 0 with gate 1), so geometry code treats dense
    baselines and MoEs alike.
    """
    from .trace import trace_layer
    was_training = model.training
    model.eval()
    try:
        layer = model.moe_layers()[0]
        return trace_layer(layer, x_TD.to(next(model.parameters()).device), with_expert_outputs)
    finally:
        model.train(was_training)
