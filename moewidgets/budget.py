"""Work budgets: how big a run, a grid or a seed list may be before validation refuses it.

A budget bounds the work a config can ask for, so a typo (``d_model=10**5``, ``batch_size=10**9``, a 1000×1000
grid) is a clear error before anything is allocated, instead of an allocator error, a ``MemoryError`` or the OOM
killer. Two budgets:

* **library / command line** (``CLI``): what config validation applies everywhere (``RunConfig``,
  ``LMConfig``, sweep specs): 16 GiB of tensors per run, 10⁷ steps, 10⁴ grid points, 10⁴ seeds, 10⁵ jobs.
  16 GiB fits the GPU and CPU machines the claim runs use and is ~100× the largest claim run (chapter 2's LM).
* **dashboards / the classroom app** (``DASHBOARD``): 0.5 GiB of tensors and 20 000 steps per run, so that
  anyone with the link cannot exhaust a shared server from the config box; a chapter-1 default run needs ~110 MiB by this estimate.

Raise them explicitly for a big machine or a cluster: the environment variables ``MOEWIDGETS_BUDGET_GB`` (library
/ CLI memory) and ``MOEWIDGETS_DASHBOARD_BUDGET_GB`` (dashboards), or pass ``budget=Budget(...)``.

The memory estimate (float32, 4 bytes a number; an upper bound, not a measurement)::

    params       P = E·(2·D·F + F + D) + E·D + D·O + O          (experts, router, read-out; dense: the same order)
    training     4·P                                             (weights, gradients, Adam's two moments)
    activations  B·(4·D + 3·E + 4·E·F)                           (B = train.batch_size; dense-masked expert path)
    task         (N_train + N_probe)·(D + O + 1) + C·H·(D + O + 1) + min(N, 4096)·H·D   (data, teachers, draw chunk)
    probes       N_probe·(E + 1)·D·D                             (per-point D×D layer / expert Jacobians of the
                                                                  chapter-1 probes)

>>> from moewidgets.config import RunConfig, TrainConfig
>>> run_bytes(RunConfig()) < 256 * 2**20                    # the chapter-1 default run: ~110 MiB
True
>>> check_run(RunConfig(train=TrainConfig(batch_size=10**9)))
Traceback (most recent call last):
...
ValueError: train.batch_size=1000000000: estimated tensor memory 8.2e+03 GiB (activations 8.2e+03 GiB) exceeds the budget of 16 GiB; lower train.batch_size, or raise the budget (MOEWIDGETS_BUDGET_GB=...)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Budget", "CLI", "DASHBOARD", "ENV_VAR", "DASHBOARD_ENV_VAR", "MAX_SEED", "current", "dashboard_budget",
           "run_bytes", "lm_bytes", "check_run", "check_lm", "check_count", "check_dashboard"]

ENV_VAR = "MOEWIDGETS_BUDGET_GB"
DASHBOARD_ENV_VAR = "MOEWIDGETS_DASHBOARD_BUDGET_GB"
#: The largest seed a config accepts (the data generators seed with 1_000_003·seed + 29 < 2**63).
MAX_SEED = 2**32 - 1
_GiB = 2**30


@dataclass(frozen=True)
class Budget:
    """Limits on one run and on one sweep. ``memory_gb``: the tensor-memory estimate's limit (GiB) per run."""

    memory_gb: float = 16.0
    max_steps: int = 10**7
    max_grid: int = 10**4          # grid points of one sweep spec
    max_seeds: int = 10**4         # seeds of one sweep spec
    max_jobs: int = 10**5          # grid points × seeds
    env_var: str = ENV_VAR         # named in the error message: how to raise it
    label: str = "the budget"


CLI = Budget()
DASHBOARD = Budget(memory_gb=0.5, max_steps=20_000, max_grid=100, max_seeds=100, max_jobs=1000,
                   env_var=DASHBOARD_ENV_VAR, label="the dashboard budget")


def _env_gb(var: str, default: float) -> float:
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{var}={text!r} must be a number of GiB, e.g. {var}=64") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{var}={text!r} must be a finite number of GiB > 0")
    return value


def current() -> Budget:
    """The library / command-line budget, with ``$MOEWIDGETS_BUDGET_GB`` applied (read at each call)."""
    return replace(CLI, memory_gb=_env_gb(ENV_VAR, CLI.memory_gb))


def dashboard_budget() -> Budget:
    """The stricter budget of dashboards and the classroom app, with ``$MOEWIDGETS_DASHBOARD_BUDGET_GB`` applied."""
    return replace(DASHBOARD, memory_gb=_env_gb(DASHBOARD_ENV_VAR, DASHBOARD.memory_gb))


def _fmt(n_bytes: float) -> str:
    return f"{n_bytes / _GiB:.2g} GiB"


def _run_terms(run) -> dict[str, tuple[float, str]]:
    """term -> (bytes, the field that drives it) of a RunConfig."""
    m, t, tr = run.model, run.task, run.train
    E, D, F, O = m.n_experts, m.d_model, m.d_hidden, t.d_out
    P = E * (2 * D * F + F + D) + E * D + D * O + O
    N = t.n_train + t.n_probe
    terms = {
        "params": (4 * 4 * P, "model.d_hidden" if F >= D else "model.d_model"),
        "activations": (4 * tr.batch_size * (4 * D + 3 * E + 4 * E * F), "train.batch_size"),
        "task": (4 * (N * (D + O + 1) + t.n_clusters * t.teacher_width * (D + O + 1)
                      + min(N, 4096) * t.teacher_width * D), "task.n_train"),
        "probes": (4 * t.n_probe * (E + 1) * D * D, "model.d_model"),
    }
    return terms


def run_bytes(run) -> int:
    """The tensor-memory estimate of one :class:`~moewidgets.config.RunConfig` (bytes; formula: module docstring)."""
    return int(sum(b for b, _ in _run_terms(run).values()))


def _lm_terms(cfg) -> dict[str, tuple[float, str]]:
    m = cfg.moe
    E, D, F, L, V, S, B = m.n_experts, m.d_model, m.d_hidden, cfg.n_layers, cfg.vocab_size, cfg.seq_len, cfg.batch_size
    P = V * D + S * D + L * (4 * D * D + E * (2 * D * F + F + D) + E * D + 4 * D)
    T = B * S
    return {
        "params": (4 * 4 * P, "vocab_size" if V * D >= L * E * D * F else "moe.d_hidden"),
        "activations": (4 * T * L * (12 * D + 3 * E + 4 * E * F), "batch_size"),
        "attention": (4 * 2 * B * cfg.n_heads * S * S * L, "seq_len"),
        "logits": (4 * 3 * T * V, "vocab_size"),
    }


def lm_bytes(cfg) -> int:
    """The tensor-memory estimate of one :class:`~moewidgets.lm.LMConfig` run: params ×4 (Adam), per-layer
    activations ``B·S·L·(12·D + 3·E + 4·E·F)``, attention ``2·B·H·S²·L`` and logits ``3·B·S·V`` numbers."""
    return int(sum(b for b, _ in _lm_terms(cfg).values()))


def _check_terms(cls: str, terms: dict[str, tuple[float, str]], cfg, budget: Budget) -> None:
    total = sum(b for b, _ in terms.values())
    if total > budget.memory_gb * _GiB:
        name, (b, fld) = max(terms.items(), key=lambda kv: kv[1][0])
        obj = cfg
        for part in fld.split("."):
            obj = getattr(obj, part)
        raise ValueError(f"{fld}={obj!r}: estimated tensor memory {_fmt(total)} ({name} {_fmt(b)}) exceeds "
                         f"{budget.label} of {budget.memory_gb:g} GiB; lower {fld}, or raise the budget "
                         f"({budget.env_var}=...)")


def _check_steps(fld: str, steps: int, budget: Budget) -> None:
    if steps > budget.max_steps:
        raise ValueError(f"{fld}={steps} exceeds {budget.label} of {budget.max_steps} steps per run; lower it "
                         f"(or pass a larger Budget(max_steps=...))")


def check_run(run, budget: Budget | None = None) -> None:
    """Refuse a :class:`~moewidgets.config.RunConfig` beyond ``budget`` (default :func:`current`): ValueError
    naming the field, its value, the estimate and the limit."""
    budget = budget or current()
    _check_steps("train.steps", run.train.steps, budget)
    _check_terms("RunConfig", _run_terms(run), run, budget)


def check_lm(cfg, budget: Budget | None = None) -> None:
    """Refuse an :class:`~moewidgets.lm.LMConfig` beyond ``budget`` (default :func:`current`)."""
    budget = budget or current()
    _check_steps("steps", cfg.steps, budget)
    _check_terms("LMConfig", _lm_terms(cfg), cfg, budget)


def check_count(field: str, n: int, limit_name: str, budget: Budget | None = None) -> None:
    """Refuse a count (grid points, seeds, jobs) above ``budget.<limit_name>``, e.g. ``check_count("seeds",
    10**9, "max_seeds")``."""
    budget = budget or current()
    limit = getattr(budget, limit_name)
    if n > limit:
        raise ValueError(f"{field}: {n} exceeds {budget.label} of {limit} ({limit_name}); split the sweep, or "
                         f"pass a larger Budget({limit_name}=...)")


def check_dashboard(cfg: Any, budget: Budget | None = None) -> None:
    """What a dashboard or the classroom app calls on a config a visitor typed (a RunConfig or an LMConfig):
    refuse it beyond the stricter :func:`dashboard_budget` (ValueError naming field, value, estimate, limit).

    >>> from moewidgets.config import RunConfig, TrainConfig
    >>> check_dashboard(RunConfig())
    >>> check_dashboard(RunConfig(train=TrainConfig(steps=10**6)))
    Traceback (most recent call last):
    ...
    ValueError: train.steps=1000000 exceeds the dashboard budget of 20000 steps per run; lower it (or pass a larger Budget(max_steps=...))
    """
    budget = budget or dashboard_budget()
    if hasattr(cfg, "train"):
        check_run(cfg, budget)
    else:
        check_lm(cfg, budget)
