"""Configuration dataclasses: what a model, a task and a training run are.

Three frozen dataclasses, each validated on construction and round-tripping through JSON:

* :class:`MoEConfig`   — the MoE layer / model and its balancing knobs (the design's contract names).
* :class:`TaskConfig`  — the synthetic clustered-teacher task of chapter 1.
* :class:`TrainConfig` — optimiser, steps, batch size, device.

A :class:`RunConfig` bundles the three; it is what a dashboard shows as JSON and what a sweep runs.

Errors name the field, the value given and what is allowed, e.g.::

    >>> MoEConfig(n_experts=8, k=9)
    Traceback (most recent call last):
    ...
    ValueError: MoEConfig.k=9 must be in 1..n_experts=8
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .budget import MAX_SEED

__all__ = ["MoEConfig", "TaskConfig", "TrainConfig", "RunConfig", "ARCHS", "ROUTERS", "EXPERTS", "GATES", "KMEANS_MODES"]

ARCHS = ("moe", "dense", "dense_active")   # dense = parameter-matched (hidden E·m), dense_active = k·m
ROUTERS = ("softmax", "kmeans", "mpi")
EXPERTS = ("gelu", "relu", "swiglu")
GATES = ("softmax", "renorm")
KMEANS_MODES = ("ema", "cumulative")


def _fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} must be {allowed}")


def _check_int(cls: str, name: str, value: Any, lo: int, hi: int | None = None, hi_name: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(cls, name, value, "an integer")
    if value < lo or (hi is not None and value > hi):
        rng = f"in {lo}..{hi_name or hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{cls}.{name}={value!r} must be {rng}")


def _check_float(cls: str, name: str, value: Any, *, positive: bool = False, nonneg: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(cls, name, value, "a finite number")
    try:
        finite = math.isfinite(value)
    except OverflowError:                 # an int beyond float range
        finite = False
    if not finite:
        _fail(cls, name, value, "a finite number")
    if positive and not value > 0:
        _fail(cls, name, value, "> 0")
    if nonneg and not value >= 0:
        _fail(cls, name, value, ">= 0")


def check_device(cls: str, value: Any, name: str = "device") -> None:
    """A device string: 'auto', 'cpu', 'cuda', 'cuda:N' (N a non-negative integer) or 'mps'."""
    if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda", "mps")
                                          or re.fullmatch(r"cuda:[0-9]{1,4}", value)):
        _fail(cls, name, value, "'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'")


def _check_choice(cls: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        _fail(cls, name, value, "one of " + ", ".join(repr(c) for c in choices))


class _JSONMixin:
    """JSON round trip shared by the config dataclasses: ``from_json(cfg.to_json()) == cfg``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__} {d!r:.80}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names, key=repr)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class MoEConfig(_JSONMixin):
    """An MoE layer (or its dense baseline) and its routing and balancing knobs.

    Routing: logits ``z = W_r x (+ b_r)``, probabilities ``p = softmax(z / temperature)``, the top ``k``
    experts are selected (``k = n_experts`` is fully soft routing) and the gate of a selected expert is
    ``p_i`` (``gate="softmax"``) or ``p_i / Σ_{j∈top-k} p_j`` (``gate="renorm"``, Mixtral).
    Balancing (independent knobs, any mix): Switch aux loss ``aux_weight · E · Σ_i f_i P_i``, router z-loss
    ``z_weight · mean(logsumexp(z)²)``, loss-free selection bias with rate ``lf_rate`` (0 = off).
    See chapter 1 (``book/chapter1.ipynb``) and ``book/notation.md``.

    >>> MoEConfig(n_experts=4, k=1).replace(temperature=0.5).temperature
    0.5
    """

    n_experts: int = 8          # E, number of experts
    k: int = 2                  # top-k; k = n_experts is fully soft routing
    d_model: int = 32           # D, layer input and output width
    d_hidden: int = 64          # F = m, hidden width of one expert
    expert: str = "gelu"        # "gelu" (W2 φ(W1 x + b1) + b2, paper 1) | "swiglu" (W_out (silu(W_g x) ⊙ W_up x))
    router: str = "softmax"     # "softmax" | "kmeans" (chapter 3) | "mpi" (Manifold Power Iteration, chapter 4)
    temperature: float = 1.0    # τ in p = softmax(z / τ); sharpness = 1/τ
    gate: str = "softmax"       # "softmax": keep softmax-over-all values | "renorm": renormalise over the top-k
    aux_weight: float = 0.0     # α of the Switch aux loss (the load-balancing slider)
    z_weight: float = 0.0       # weight of the router z-loss
    lf_rate: float = 0.0        # γ of loss-free balancing (bias update step); 0 = off, papers use 1e-3
    seed: int = 0               # seeds init, data draw and batch order
    arch: str = "moe"           # "moe" | "dense" (parameter-matched, hidden E·m) | "dense_active" (hidden k·m)
    # Manifold Power Iteration router (router="mpi", chapter 4): R'_i = C · normalize(R_i W_iᵀ W_i), C = C'/√E
    mpi_scale: float = 1.0      # C' (the row norm is C = mpi_scale / √n_experts); choose it so logits are O(1)
    mpi_steps: int = 1          # power steps per forward (the paper and its code: 1)
    mpi_detach: bool = False    # stop the gradient into the expert weights W inside the power step (ablation)
    # online K-Means router (router="kmeans", chapter 3): cosine scores s_i = x̂·Ĉ_i against running means C_i of
    # the tokens routed to expert i; no learned parameters. Every ambiguous choice of the paper is a flag (spec §1.7).
    kmeans_mode: str = "ema"        # "ema": C_i ← (1−β) C_i + β·mean(routed x) | "cumulative": running mean of all
    kmeans_rate: float = 0.05       # β of the EMA, in (0, 1] (spec: 0.01–0.1 at tiny scale)
    kmeans_normalize: bool = False  # average x̂ = x/‖x‖ instead of x (spherical k-means)
    kmeans_detach: bool = False     # detach x inside the scores (gates then send no gradient into x)

    def __post_init__(self) -> None:
        c = "MoEConfig"
        _check_int(c, "n_experts", self.n_experts, 1, 1024)
        _check_int(c, "k", self.k, 1, self.n_experts, f"n_experts={self.n_experts}")
        _check_int(c, "d_model", self.d_model, 1)
        _check_int(c, "d_hidden", self.d_hidden, 1)
        _check_choice(c, "expert", self.expert, EXPERTS)
        _check_choice(c, "router", self.router, ROUTERS)
        _check_float(c, "temperature", self.temperature, positive=True)
        _check_choice(c, "gate", self.gate, GATES)
        for name in ("aux_weight", "z_weight", "lf_rate"):
            _check_float(c, name, getattr(self, name), nonneg=True)
        _check_int(c, "seed", self.seed, 0, MAX_SEED)
        _check_choice(c, "arch", self.arch, ARCHS)
        _check_float(c, "mpi_scale", self.mpi_scale, positive=True)
        _check_int(c, "mpi_steps", self.mpi_steps, 1, 100)
        for name in ("mpi_detach", "kmeans_normalize", "kmeans_detach"):
            if not isinstance(getattr(self, name), bool):
                _fail(c, name, getattr(self, name), "True or False")
        _check_choice(c, "kmeans_mode", self.kmeans_mode, KMEANS_MODES)
        _check_float(c, "kmeans_rate", self.kmeans_rate, positive=True)
        if self.kmeans_rate > 1:
            _fail(c, "kmeans_rate", self.kmeans_rate, "in (0, 1] (the EMA rate β)")

    @property
    def is_soft(self) -> bool:
        """True for fully soft routing (k = E)."""
        return self.k == self.n_experts

    @property
    def dense_hidden(self) -> int:
        """Hidden width of the dense baseline this config asks for (E·m parameter-matched, k·m active-matched)."""
        return self.n_experts * self.d_hidden if self.arch == "dense" else self.k * self.d_hidden

    @property
    def label(self) -> str:
        """A short human name such as "dense (E·m=512)", "top-2 of 8" or "soft (8)"."""
        if self.arch == "dense":
            return f"dense (E·m={self.dense_hidden})"
        if self.arch == "dense_active":
            return f"dense (k·m={self.dense_hidden})"
        return f"soft ({self.n_experts})" if self.is_soft else f"top-{self.k} of {self.n_experts}"


@dataclass(frozen=True)
class TaskConfig(_JSONMixin):
    """The synthetic clustered-teacher task of chapter 1 (paper-1 spec §1.3.2, sizes scaled to a CPU: ours).

    Inputs: a Gaussian mixture of ``n_clusters`` components in R^d, means ``μ_c ~ N(0, cluster_scale² I)``,
    noise ``N(0, I)``. Targets: ``y = T_c(x)``, a per-cluster random 2-layer tanh teacher of width
    ``teacher_width`` (``shared_teacher=True``: one teacher for all clusters, the no-structure control).
    ``offset > 0`` adds one shared vector μ to every input (targets are computed before the shift, so the task is
    the same function of ``x − μ``): the anisotropy of real hidden states that chapter 3 needs.
    """

    d_in: int = 32              # input width (must equal MoEConfig.d_model)
    d_out: int = 32             # target width
    n_clusters: int = 8         # C, mixture components
    cluster_scale: float = 3.0  # s, std of the cluster means (moderate overlap at 3)
    noise: float = 1.0          # within-cluster std
    teacher_width: int = 64     # hidden width of each tanh teacher
    shared_teacher: bool = False  # control: one teacher for every cluster
    offset: float = 0.0         # a shared mean offset μ added to every input, ‖μ‖ = offset · s·√d (chapter 3:
                                # real residual streams are anisotropic; spec §3 uses ‖μ‖ ≈ 2‖μ_c‖). 0 = none
    n_train: int = 16384        # training points (spec: 50k; ours: 16k is plenty for a 32-d task)
    n_probe: int = 2048         # held-out probe points for geometry (spec: 2k–10k)

    def __post_init__(self) -> None:
        c = "TaskConfig"
        for name in ("d_in", "d_out", "n_clusters", "teacher_width", "n_train", "n_probe"):
            _check_int(c, name, getattr(self, name), 1)
        _check_float(c, "cluster_scale", self.cluster_scale, nonneg=True)
        _check_float(c, "noise", self.noise, nonneg=True)
        _check_float(c, "offset", self.offset, nonneg=True)
        if not isinstance(self.shared_teacher, bool):
            _fail(c, "shared_teacher", self.shared_teacher, "True or False")


@dataclass(frozen=True)
class TrainConfig(_JSONMixin):
    """Optimiser and schedule. Adam with a constant learning rate; mini-batches drawn with replacement."""

    steps: int = 400            # optimiser steps
    batch_size: int = 256       # tokens (points) per step
    lr: float = 3e-3            # Adam learning rate (live runs; claim runs use their own)
    weight_decay: float = 0.0   # AdamW-style decoupled weight decay
    schedule: str = "constant"  # "constant" | "cosine" (decay to 0 over `steps`; claim runs use it to converge)
    device: str = "auto"        # "auto" (CUDA, then MPS, else CPU) | "cpu" | "cuda" | "cuda:N" | "mps"

    def __post_init__(self) -> None:
        c = "TrainConfig"
        _check_int(c, "steps", self.steps, 0)
        _check_int(c, "batch_size", self.batch_size, 1)
        _check_float(c, "lr", self.lr, positive=True)
        _check_float(c, "weight_decay", self.weight_decay, nonneg=True)
        _check_choice(c, "schedule", self.schedule, ("constant", "cosine"))
        check_device(c, self.device)


@dataclass(frozen=True)
class RunConfig(_JSONMixin):
    """Everything one training run needs: model, task and training settings (a dashboard's JSON, a sweep row)."""

    model: MoEConfig = field(default_factory=MoEConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name, typ in (("model", MoEConfig), ("task", TaskConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), typ):
                _fail("RunConfig", name, getattr(self, name), f"a {typ.__name__}")
        if self.task.d_in != self.model.d_model:
            raise ValueError(
                f"RunConfig: task.d_in={self.task.d_in} must equal model.d_model={self.model.d_model}"
            )
        from .budget import check_run
        check_run(self)           # the library / CLI budget (moewidgets.budget); dashboards apply a stricter one

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        if not isinstance(d, dict):
            raise ValueError(f"RunConfig: expected a mapping with fields model, task, train, got "
                             f"{type(d).__name__} {d!r:.80}")
        for name, typ in (("model", MoEConfig), ("task", TaskConfig), ("train", TrainConfig)):
            if name in d and not isinstance(d[name], dict):
                _fail("RunConfig", name, d[name], f"a mapping of {typ.__name__} fields")
        unknown = sorted(set(d) - {"model", "task", "train"}, key=repr)
        if unknown:
            raise ValueError(f"RunConfig: unknown field(s) {unknown}; allowed fields are ['model', 'task', 'train']")
        return cls(
            model=MoEConfig.from_dict(d.get("model", {})),
            task=TaskConfig.from_dict(d.get("task", {})),
            train=TrainConfig.from_dict(d.get("train", {})),
        )
