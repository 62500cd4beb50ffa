"""Chapter 2's live dashboard on the small MoE transformer language model (WikiText-2), with streaming progress.

The same questions as :class:`~moewidgets.dashboards.chapter2.Chapter2Dashboard`, asked of a real language model:
top-k, temperature τ, experts E (4, 8 or 16), balancing α, seed and the number of training steps retrain a
:class:`~moewidgets.lm.MoETransformerLM` live (default :meth:`LMConfig.cpu() <moewidgets.lm.LMConfig.cpu>`: 3
pre-norm layers, D = 64, 8 GELU experts of width 128 per layer, top-2, gate "softmax", α = 0.01, 400 steps of
16 × 64 tokens, about 40 s on one CPU thread; k = E is fully soft routing). Every ``probe_every`` (100) steps and at
the end, :func:`probe_lm` traces the first ``N_PROBE_TOKENS`` = 512 held-out tokens (whole windows of ``seq_len``)
through the model and computes, for every MoE layer, the numbers the MLP dashboard draws
(:func:`~moewidgets.dashboards.chapter2.probe_layer_asymmetry`), plus the held-out perplexity on the first
``N_EVAL_TARGETS`` = 2,048 test targets. The layer selector picks which layer the heatmaps show; it redraws from
the stored probes and never retrains. The views (:class:`~moewidgets.dashboards.chapter2.Chapter2Views`):

1. the E×E normalised geodesic Grassmann distance ``‖θ‖₂ / ((π/2)√r)`` between the experts' routed input
   subspaces (rank-r gate-weighted PCA of the MoE layer's inputs, the post-``norm2`` hidden states), titled with
   the random-token-group null band, the split-half floor and the isotropic level;
2. the E×E alignment ``|cos_F(J̄_i, J̄_j)|`` of the gate-weighted mean expert Jacobians, titled with its Gaussian
   null and split-half ceiling;
3. one point per expert pair (distance, alignment) with those references as lines;
4. the training cross-entropy per step (nats per token) and, dashed, the held-out cross-entropy at each probe.

The status line streams the run: ``step i/N · train loss L nats (ppl e^L) · held-out ppl · elapsed · steps/s ·
ETA``, with L the mean training loss of the last 20 steps, steps/s measured over the last 5 s (probes left out)
and the ETA = remaining steps / (steps/s) + remaining probes × the mean probe time so far.

Shape legend: W probe windows, S positions per window (``seq_len``), T = W·S probe tokens, D model width,
E experts, K top-k, V vocabulary size.

Data flows one way: widgets → :class:`~moewidgets.lm.LMConfig` → :class:`~.runner.LiveRunner` (its
``make_trainer`` builds an :class:`~moewidgets.lm.LMTrainer`) → :func:`~moewidgets.lm.trace_lm` →
:mod:`moewidgets.geometry` → :mod:`moewidgets.views`. WikiText-2 is loaded when the first run starts
(:func:`~moewidgets.wikitext.load_wikitext` from ``$MOEWIDGETS_DATA``, cached per vocabulary size), so building
the dashboard needs no data; a missing data folder is reported on the status line.

>>> dash = Chapter2LMDashboard(autostart=False)
>>> dash
Chapter2LMDashboard(top-2 of 8, τ=1, α=0.01, seed=0, 3 layers, 400 steps)
>>> dash.layer, dash.trainer is None, dash.probe is None     # nothing trained, no data loaded yet
(0, True, True)

Chapter 2 (book/chapter2.ipynb).
"""
from __future__ import annotations

import html
import logging
import math
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import ipywidgets as W
import torch

from .. import views as V
from ..lm import LMConfig, LMEval, LMTrainer, trace_lm
from ..wikitext import ENV_VAR, WikiText, load_wikitext
from .base import DashboardBase
from .chapter2 import RANK, AsymmetryProbe, Chapter2Views, both_sides, describe_probe, draw_asymmetry, \
    probe_layer_asymmetry
from .runner import LiveRunner, RunState

__all__ = ["Chapter2LMDashboard", "LMProbe", "LMTrack", "LMLiveRunner", "probe_lm", "probe_windows",
           "describe_lm_run", "DEFAULT_LM", "N_PROBE_TOKENS", "N_EVAL_TARGETS", "EXPERT_CHOICES", "STEP_CHOICES"]

log = logging.getLogger(__name__)

DEFAULT_LM = LMConfig.cpu(device="cpu")   # the scaled CPU preset: 3 layers, D = 64, E = 8, top-2, 400 steps
N_PROBE_TOKENS = 512                      # held-out tokens the geometry traces (whole windows of seq_len)
N_EVAL_TARGETS = 2048                     # held-out targets of the perplexity at each probe
EXPERT_CHOICES = (4, 8, 16)               # the experts control (a config's own E is added to it)
STEP_CHOICES = (100, 200, 400, 800, 1600)  # the training-steps control (a config's own value is added to it)

_DATA: OrderedDict[tuple[str | None, int], WikiText] = OrderedDict()   # ($MOEWIDGETS_DATA, vocab cap) → data


def describe_lm_run(run: LMConfig) -> str:
    """A short description of an LM run: 'top-2 of 8 · τ=1 · α=0.01 · seed 0 · 3 layers'.

    >>> describe_lm_run(LMConfig.cpu().with_moe(k=8))
    'soft (8) · τ=1 · α=0.01 · seed 0 · 3 layers'

    Chapter 2 (book/chapter2.ipynb).
    """
    m = run.moe
    parts = [m.label]
    if m.arch == "moe":
        parts += [f"τ={m.temperature:g}", f"α={m.aux_weight:g}"]
    parts += [f"seed {run.seed}", f"{run.n_layers} layer{'s' if run.n_layers > 1 else ''}"]
    return " · ".join(parts)


def probe_windows(ids_N: torch.Tensor, seq_len: int, n_tokens: int = N_PROBE_TOKENS) -> torch.Tensor:
    """The first whole windows of a token stream ``ids_N`` (N,): (W, S) with ``W = ⌊min(n_tokens, N) / S⌋`` and
    S = ``seq_len``; a stream shorter than one window gives one shorter sequence (1, N).

    >>> probe_windows(torch.arange(100), seq_len=16, n_tokens=40).shape     # 40 tokens → 2 windows of 16
    torch.Size([2, 16])
    >>> probe_windows(torch.arange(5), seq_len=16).shape
    torch.Size([1, 5])

    Chapter 2 (book/chapter2.ipynb).
    """
    if ids_N.dim() != 1 or ids_N.numel() < 1:
        raise ValueError(f"ids_N must be a non-empty 1-D token stream, got shape {tuple(ids_N.shape)}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be an integer >= 1")
    n = min(n_tokens, ids_N.numel())
    W = n // seq_len
    if W == 0:
        return ids_N[:n].view(1, n)                            # (n,) → (1, n): one short sequence
    return ids_N[: W * seq_len].view(W, seq_len)                # (W·S,) → (W, S)


@dataclass
class LMProbe:
    """One probe of an LM run (:func:`probe_lm`).

    Fields::

        step:      the training step probed.
        layers:    one AsymmetryProbe per block (layer 0 first), each on the same T held-out tokens.
        held_out:  held-out cross-entropy and perplexity (an LMEval), or None when not computed.
        n_tokens:  T, the probe tokens traced (W windows of S).
        wall_s:    seconds the probe took (trace, every layer's geometry, the evaluation).
    """

    step: int
    layers: list[AsymmetryProbe]
    held_out: LMEval | None
    n_tokens: int
    wall_s: float

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def probe_lm(trainer: LMTrainer, *, n_tokens: int = N_PROBE_TOKENS, eval_targets: int | None = N_EVAL_TARGETS,
             rank: int = RANK, n_draws: int = 12, n_splits: int = 6, seed: int = 0) -> LMProbe:
    """Trace the first ``n_tokens`` held-out tokens (:func:`probe_windows`, (W, S)) through the trainer's model with
    :func:`~moewidgets.lm.trace_lm` and probe every MoE layer with
    :func:`~moewidgets.dashboards.chapter2.probe_layer_asymmetry` (a generator seeded with ``seed`` per layer,
    so layer ℓ's numbers equal ``layer_asymmetry(model.moe_layers()[ℓ].experts, traces[ℓ], rank=min(rank, D),
    generator=seed, ...)``); then, unless ``eval_targets`` is None, the held-out perplexity
    ``exp(mean CE)`` on the first ``eval_targets`` test targets (:meth:`LMTrainer.evaluate
    <moewidgets.lm.LMTrainer.evaluate>`).

    Raises ValueError for a dense model (no experts to compare).

    >>> import tempfile, pathlib
    >>> from moewidgets.config import MoEConfig
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "valid.txt").write_text("the cat sat on the mat\\n" * 40)
    >>> _ = (d / "test.txt").write_text("a cat sat on a mat\\n" * 20)
    >>> cfg = LMConfig(moe=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=16), n_layers=2, n_heads=2,
    ...                seq_len=8, batch_size=4, steps=2, device="cpu")
    >>> tr = LMTrainer.from_config(cfg, data_dir=d, verbose=False)
    >>> p = probe_lm(tr, n_tokens=64, rank=2)
    >>> p.n_layers, p.n_tokens, p.layers[1].distance_EE.shape, p.held_out.n_targets
    (2, 64, (4, 4), 139)

    Chapter 2 (book/chapter2.ipynb).
    """
    t0 = time.perf_counter()
    layers = trainer.model.moe_layers()
    if not all(hasattr(layer, "experts") and hasattr(layer, "route") for layer in layers):
        raise ValueError(f"moe.arch={trainer.cfg.moe.arch!r}: probe_lm needs MoE layers (a dense FFN has no experts "
                         f"to compare)")
    tokens_WS = probe_windows(trainer.data.eval_ids, trainer.cfg.seq_len, n_tokens)
    traces = trace_lm(trainer.model, tokens_WS)
    step = trainer.steps_done
    probes = [probe_layer_asymmetry(layer.experts, trace, rank=rank, n_draws=n_draws, n_splits=n_splits, seed=seed,
                                    step=step) for layer, trace in zip(layers, traces)]
    ev = trainer.evaluate(max_tokens=eval_targets) if eval_targets is not None else None
    return LMProbe(step=step, layers=probes, held_out=ev, n_tokens=tokens_WS.numel(), wall_s=time.perf_counter() - t0)


@dataclass
class LMTrack:
    """What the views draw for one run: every probe so far (oldest first) and the last probe error."""

    generation: int
    probes: list[LMProbe] = field(default_factory=list)
    error: str | None = None

    @property
    def latest(self) -> LMProbe | None:
        return self.probes[-1] if self.probes else None


class LMLiveRunner(LiveRunner):
    """:class:`~.runner.LiveRunner` with the LM's streaming status line (only :meth:`status_text` differs).

    'top-2 of 8 · τ=1 · α=0.01 · seed 0 · 3 layers — step 120/400 · train loss 5.12 nats (ppl 167) · held-out ppl
    171 on 2048 targets (step 100) · 13.0 s · 9.8 steps/s · ETA 29 s — training'.

    The speed is measured over the last ``rate_window_s`` (5) seconds of the run less its probes (training, redraws
    and status included), so the ETA follows a machine whose load changes; the first status of a run (one sample,
    its time dominated by building the model) shows neither.
    """

    rate_window_s: float = 5.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._samples: deque[tuple[int, float]] = deque()   # (steps done, seconds less probes) of one run
        self._samples_generation = -1

    def steps_per_s(self, st: RunState, elapsed_s: float | None = None) -> float:
        """Recent speed of ``st`` in steps per second, ``elapsed_s`` (default: now) seconds after its start
        (records a sample; nan until two samples differ)."""
        if st.generation != self._samples_generation:
            self._samples.clear()
            self._samples_generation = st.generation
        n = st.trainer.steps_done
        elapsed_s = time.perf_counter() - st.t_fire if elapsed_s is None else elapsed_s
        busy = elapsed_s - sum(st.timings.probe_s)
        self._samples.append((n, busy))
        while len(self._samples) > 2 and busy - self._samples[1][1] >= self.rate_window_s:
            self._samples.popleft()
        n0, b0 = self._samples[0]
        return (n - n0) / (busy - b0) if n > n0 and busy > b0 else math.nan

    def status_text(self, st: RunState) -> str:
        """The status line of ``st``: step, mean training loss of the last 20 steps and its perplexity, the last
        probe's held-out perplexity, elapsed seconds, steps per second (:meth:`steps_per_s`) and (while training)
        the ETA of :meth:`eta_s`; errors as :meth:`LiveRunner.status_text
        <moewidgets.dashboards.runner.LiveRunner.status_text>` words them."""
        if st.phase == "error":
            return super().status_text(st)
        tr, desc = st.trainer, self.describe(st.run)
        n, N = tr.steps_done, tr.cfg.steps
        text = f"{desc} — step {n}/{N}"
        loss = tr.history.last_loss(20)
        if math.isfinite(loss):
            text += f" · train loss {loss:.3g} nats (ppl {math.exp(min(loss, 700)):.0f})"
        p = st.probes
        if isinstance(p, LMProbe) and p.held_out is not None:
            text += f" · held-out ppl {p.held_out.ppl:.0f} on {p.held_out.n_targets} targets (step {p.step})"
        wall = time.perf_counter() - st.t_fire      # now (the run's timings are stale just after a probe)
        rate = self.steps_per_s(st, wall)
        text += f" · {wall:.1f} s"
        if math.isfinite(rate):
            text += f" · {rate:.1f} steps/s"
        if st.phase == "training" and math.isfinite(rate) and rate > 0:
            text += f" · ETA {self.eta_s(st, rate):.0f} s"
        return f"{text} — {st.phase}"

    def eta_s(self, st: RunState, rate: float) -> float:
        """Seconds left: remaining steps at ``rate`` steps/s, plus the probes still due (at multiples of
        ``probe_every`` and at the end) at the mean probe time so far."""
        tr = st.trainer
        n, N, every = tr.steps_done, tr.cfg.steps, self.probe_every
        due = {s for s in range(every, N + 1, every) if s > n} | ({N} if N > n else set())
        probe_s = st.timings.probe_s
        mean_probe = sum(probe_s) / len(probe_s) if probe_s else 0.0
        return (N - n) / rate + (len(due) * mean_probe if self.probe is not None else 0.0)


def _check_probe_every(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"probe_every={value!r} must be an integer >= 1")
    return value


def _rounded(x: float) -> str:
    """2 significant digits, without exponent for ordinary sizes: 104.7 → '100', 4.63 → '4.6'."""
    return "–" if x is None or not math.isfinite(x) else f"{float(f'{x:.2g}'):g}"


class Chapter2LMDashboard(DashboardBase):
    """Retrain the MoE transformer LM on WikiText-2 live and redraw paper 2's geometry per layer (module docstring).

    Args:
        config: the starting run (default ``DEFAULT_LM``, :meth:`LMConfig.cpu(device="cpu")
            <moewidgets.lm.LMConfig.cpu>`); Reset returns to it.
        data: the :class:`~moewidgets.wikitext.WikiText` to train on (then ``vocab_size`` changes do not reload
            it); default: :func:`~moewidgets.wikitext.load_wikitext` from ``$MOEWIDGETS_DATA`` capped at the run's
            ``vocab_size``, loaded when a run starts, cached per vocabulary size.
        autostart: start training at once (needs a running event loop, as in a Jupyter kernel).
        probe_every: steps between probes (chunks end there, so probes land on steps 100, 200, ...; and at the end).

    Knobs (attributes): ``redraw_s`` (at most one loss redraw per 0.2 s), ``rank`` (4), ``n_draws`` (12),
    ``n_splits`` (6), ``n_probe_tokens`` (512), ``eval_targets`` (2048; None: no held-out perplexity).

    Accessors: ``config``, ``trainer`` (the :class:`~moewidgets.lm.LMTrainer`), ``data``, ``layer`` (settable: the
    layer the heatmaps show), ``probe`` (that layer's last :class:`~moewidgets.dashboards.chapter2.AsymmetryProbe`),
    ``probe_for(layer)``, ``lm_probe`` (the last :class:`LMProbe`), ``probes`` (all of the run's), ``track``,
    ``status``; ``run_sync()``, ``await wait()``, ``stop()``, ``status_summary()``.
    """

    _describe = staticmethod(describe_lm_run)
    _config_class = LMConfig
    _runner_class = LMLiveRunner
    _loss_label = "train CE"

    def __init__(self, config: LMConfig | None = None, data: WikiText | None = None, autostart: bool = True,
                 probe_every: int = 100):
        _check_probe_every(probe_every)
        if config is not None and not isinstance(config, LMConfig):
            raise ValueError(f"config={type(config).__name__} must be a moewidgets.lm.LMConfig or None (the MLP "
                             f"runs of chapter 2 go to Chapter2Dashboard)")
        if data is not None and not isinstance(data, WikiText):
            raise ValueError(f"data={type(data).__name__} must be a moewidgets.wikitext.WikiText or None")
        self._given_data = data
        self.track: LMTrack | None = None
        self.rank, self.n_draws, self.n_splits = RANK, 12, 6
        self.n_probe_tokens, self.eval_targets = N_PROBE_TOKENS, N_EVAL_TARGETS
        self.views = Chapter2Views.build(loss_label="cross-entropy (nats/token)",
                                         ref_label="held-out (test targets)")
        super().__init__(config, autostart=False)
        self.probe_every = probe_every
        error = self._check_loaded(self._initial)
        if error is not None:
            self.runner.fail(error.replace("config JSON: ", "config: "))
            self.views.caption.text = html.escape(error.split(": ", 1)[-1])
        elif autostart:
            self._request(self._initial, delay=0.0)

    def _default_config(self) -> LMConfig:
        return DEFAULT_LM

    def _moe_of(self, run: LMConfig):
        return run.moe

    def _runner_hooks(self) -> dict:
        return {"probe": self._probe, "on_probes": self._draw_probes, "make_trainer": self._make_trainer}

    # -- data ----------------------------------------------------------------------------------------------------
    def _data_for(self, run: LMConfig) -> WikiText:
        """The given data, or WikiText-2 from ``$MOEWIDGETS_DATA`` capped at ``run.vocab_size`` (cached)."""
        if self._given_data is not None:
            return self._given_data
        key = (os.environ.get(ENV_VAR), run.vocab_size)
        if key not in _DATA:
            _DATA[key] = load_wikitext(None, run.vocab_size, verbose=False)
            while len(_DATA) > 2:                   # a 4096-word WikiText-2 holds ≈ 0.5M ids: keep two
                _DATA.popitem(last=False)
        _DATA.move_to_end(key)
        return _DATA[key]

    def _data_error(self, run: LMConfig) -> str | None:
        """The loader's error as status-line text, or None once the data is loaded."""
        try:
            self._data_for(run)
        except (OSError, ValueError) as exc:         # FileNotFoundError: where it looked and how to fix it
            return f"no training data: {exc}"
        return None

    def _make_trainer(self, run: LMConfig) -> LMTrainer:
        return LMTrainer.from_config(run, data=self._data_for(run))

    @property
    def data(self) -> WikiText | None:
        """The data the latest run trains on (None before the first run)."""
        tr = self.trainer
        return tr.data if tr is not None else self._given_data

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build_controls(self, wide: dict) -> list[W.Widget]:
        self.w_tau = W.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="temperature τ",
                                      style=wide, readout_format=".2g")
        self.w_E = W.ToggleButtons(options=list(EXPERT_CHOICES), value=8, description="experts E",
                                   style={**wide, "button_width": "40px"})
        self.w_steps = W.SelectionSlider(options=list(STEP_CHOICES), value=400, description="training steps",
                                         style=wide)
        self.w_k_note = W.Label(value="")
        # the layer selector redraws from the stored probes: it is not returned, so it never retrains
        self.w_layer = W.ToggleButtons(options=[("layer 0", 0)], value=0, description="heatmaps show",
                                       style={**wide, "button_width": "64px"})
        self.w_layer.observe(self._on_layer, names="value")
        return [self.w_tau, self.w_E, self.w_steps]

    def _control_rows(self) -> list[W.Widget]:
        # the base's experts slider (self.w_experts) only mirrors the config: E is chosen with w_E here
        return [W.HBox([self.w_k, self.w_k_note, self.w_tau]),
                W.HBox([self.w_E, self.w_aux, self.w_seed]),
                W.HBox([self.w_steps, self.w_layer, self.w_reset, self.w_stop])]

    def _set_controls(self, run: LMConfig) -> None:
        m = run.moe
        log_tau = math.log10(m.temperature)
        self.w_tau.min, self.w_tau.max = min(-1, math.floor(log_tau)), max(1, math.ceil(log_tau))
        self.w_tau.value = m.temperature
        self.w_E.options = sorted(set(EXPERT_CHOICES) | {m.n_experts})
        self.w_E.value = m.n_experts
        self.w_steps.options = sorted(set(STEP_CHOICES) | {run.steps})
        self.w_steps.value = run.steps
        layer = min(self.w_layer.value, run.n_layers - 1)
        self.w_layer.options = [(f"layer {i}", i) for i in range(run.n_layers)]
        self.w_layer.value = layer

    def _sync_enabled(self) -> None:
        self.w_k.max = self.w_E.value                 # k = E is fully soft routing
        soft = self.w_k.value == self.w_E.value
        self.w_k_note.value = "k = E: fully soft routing" if soft else "top-k routing"

    def _config_from_widgets(self) -> LMConfig:
        """The run the widgets describe: the current config with the widget fields replaced (validated)."""
        E = self.w_E.value
        moe = self._config.moe.replace(n_experts=E, k=min(self.w_k.value, E), temperature=float(self.w_tau.value),
                                       aux_weight=float(self.w_aux.value))
        return self._config.replace(moe=moe, seed=self.w_seed.value, steps=self.w_steps.value)

    def _check_loaded(self, run: LMConfig) -> str | None:
        m = run.moe
        if m.arch != "moe":
            return (f"config JSON: moe.arch={m.arch!r} must be 'moe' here (a dense FFN has no experts to compare; "
                    f"train it with moewidgets.lm.LMTrainer for its perplexity)")
        if m.n_experts < 2:
            return f"config JSON: moe.n_experts={m.n_experts} must be >= 2 here (pairs of experts are compared)"
        return None

    # -- starting runs -------------------------------------------------------------------------------------------
    def _request(self, run: LMConfig, delay: float | None = None) -> None:
        """Check ``run`` and load the data now (a dense run or a missing folder → status line), then ask the runner
        for ``run``."""
        error = self._check_loaded(run)
        if error is not None:
            self.runner.fail(error.replace("config JSON: ", "config: "))
            return
        error = self._data_error(run)
        if error is not None:
            self.runner.fail(error)
            return
        self.runner.request(run, delay=delay)

    def run_sync(self, config: LMConfig | None = None) -> RunState | None:
        """Train ``config`` (default: the widgets' run) to the end now, drawing as it goes (tests, scripts). A run
        the dashboard cannot show, or missing data, goes to the status line (returns the previous state)."""
        run = config if config is not None else self._config
        error = self._check_loaded(run)
        if error is not None:
            self.runner.fail(error.replace("config JSON: ", "config: "))
            return self.runner.state
        if config is not None:
            self._set_widgets(config)
            self._config = config
        error = self._data_error(run)
        if error is not None:
            self.runner.fail(error)
            return self.runner.state
        return self.runner.run_sync(run)

    # -- probes and drawing --------------------------------------------------------------------------------------
    def _track(self, st: RunState) -> LMTrack:
        if self.track is None or self.track.generation != st.generation:
            self.track = LMTrack(st.generation)
        return self.track

    def _probe(self, st: RunState) -> LMProbe | None:
        """One probe of every layer. A failure is reported in the caption; the last plots and the run go on."""
        t = self._track(st)
        try:
            p = probe_lm(st.trainer, n_tokens=self.n_probe_tokens, eval_targets=self.eval_targets, rank=self.rank,
                         n_draws=self.n_draws, n_splits=self.n_splits, seed=st.run.seed)
        except Exception as exc:                    # never a traceback in a cell: say it, keep the plots
            log.exception("chapter 2 LM probe failed")
            t.error = f"probe failed at step {st.trainer.steps_done}: {type(exc).__name__}: {exc}"
            return None
        t.probes.append(p)
        t.error = None
        return p

    def _draw_chunk(self, st: RunState) -> None:
        """The loss curves at most every ``redraw_s`` seconds and at the end."""
        self._track(st)
        if not self._redraw_due(st, final=st.trainer.done):
            return
        self._draw_loss(st)
        self._write_caption(st)
        self._redrawn()

    def _draw_probes(self, st: RunState, p: LMProbe | None) -> None:
        """After a probe: the selected layer's geometry, the held-out point on the loss plot, the caption."""
        if p is not None:
            self._draw_layer(p)
        self._draw_loss(st)
        self._write_caption(st)

    def _draw_loss(self, st: RunState) -> None:
        h, probes = st.trainer.history, self._track(st).probes
        held = [p for p in probes if p.held_out is not None]
        V.update_series(self.views.loss, h.step, [h.loss], [p.step for p in held], [p.held_out.loss for p in held])

    def _draw_layer(self, p: LMProbe) -> None:
        draw_asymmetry(self.views, p.layers[min(self.layer, p.n_layers - 1)])

    def _on_layer(self, change) -> None:
        """The layer selector: redraw from the stored probes (no training, no probe)."""
        if self._syncing:
            return
        st = self.runner.state
        p = self.lm_probe
        if p is not None:
            self._draw_layer(p)
        if st is not None and self.track is not None and self.track.generation == st.generation:
            self._write_caption(st)

    def _write_caption(self, st: RunState) -> None:
        tr, t, run = st.trainer, self._track(st), st.run
        text = (f"{describe_lm_run(run)} at step {tr.steps_done}/{tr.cfg.steps} (gate {run.moe.gate!r}, "
                f"{tr.model.vocab_size}-word vocabulary)")
        p = t.latest
        if p is None:
            text += (f" · geometry: waiting for the first probe at step {min(self.runner.probe_every, tr.cfg.steps)}"
                     f" (the plots show the previous run until then)")
        else:
            layer = min(self.layer, p.n_layers - 1)
            windows = max(1, p.n_tokens // tr.cfg.seq_len)
            text += (f" · layer {layer} of {p.n_layers} (the MoE input: the block's post-norm2 hidden state) · "
                     + describe_probe(p.layers[layer], points=f"held-out tokens ({windows} windows)"))
            ev = p.held_out
            if ev is not None:
                text += (f" · held-out ppl {ev.ppl:.1f} on {ev.n_targets} test targets at step {p.step} "
                         f"(dashed: held-out cross-entropy)")
        if t.error is not None:
            text += f" · {t.error} (last good geometry kept)"
        self.views.caption.text = html.escape(text)

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def probe_every(self) -> int:
        """Steps between probes (the runner's; a change applies from the next run)."""
        return self.runner.probe_every

    @probe_every.setter
    def probe_every(self, value: int) -> None:
        self.runner.probe_every = _check_probe_every(value)

    @property
    def layer(self) -> int:
        """The layer the heatmaps show (set it to redraw from the stored probes, without retraining)."""
        return self.w_layer.value

    @layer.setter
    def layer(self, value: int) -> None:
        L = len(self.w_layer.options)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < L:
            raise ValueError(f"layer={value!r} must be in 0..{L - 1} (n_layers={L})")
        self.w_layer.value = value

    @property
    def probes(self) -> list[LMProbe]:
        """Every probe of the latest run, oldest first."""
        st = self.runner.state
        t = self.track
        return list(t.probes) if t is not None and st is not None and t.generation == st.generation else []

    @property
    def lm_probe(self) -> LMProbe | None:
        """The latest run's last probe (None before its first)."""
        probes = self.probes
        return probes[-1] if probes else None

    def probe_for(self, layer: int | None = None) -> AsymmetryProbe | None:
        """A layer's geometry at the last probe (default: the layer shown)."""
        p = self.lm_probe
        if p is None:
            return None
        layer = self.layer if layer is None else layer
        if not 0 <= layer < p.n_layers:
            raise ValueError(f"layer={layer} must be in 0..{p.n_layers - 1}")
        return p.layers[layer]

    @property
    def probe(self) -> AsymmetryProbe | None:
        """The shown layer's geometry at the last probe."""
        return self.probe_for()

    def _summary_extra(self) -> str:
        """Held-out perplexity and the shown layer's two sides with their references, 2 significant digits."""
        p = self.lm_probe
        if p is None:
            return ""
        text = f" · held-out ppl {_rounded(p.held_out.ppl)}" if p.held_out is not None else ""
        return text + f" · layer {self.layer}: " + both_sides(self.probe)

    # -- display -------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        run = self._config
        m = run.moe
        return (f"Chapter2LMDashboard({m.label}, τ={m.temperature:g}, α={m.aux_weight:g}, seed={run.seed}, "
                f"{run.n_layers} layer{'s' if run.n_layers > 1 else ''}, {run.steps} steps)")
