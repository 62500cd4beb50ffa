"""Train the grids behind the book's kernel-free figures and write them (data as JSON, figure as one HTML page).

    python tools/make_static_figures.py                 # train every grid (≈ 1 min each on 2 idle cores), write all
    python tools/make_static_figures.py --render-only   # re-render the HTML from the committed JSON (seconds)
    python tools/make_static_figures.py --chapters chapter3   # train and write one chapter only

Writes book/_extra/figures/chapterN.json and chapterN.html. The book copies book/_extra/ into its HTML root
(``html_extra_path``), and each chapter shows its page in an ``<iframe src="figures/chapterN.html">``.

Each grid point is the live dashboard's run (the same configs, seeds, probes and reference runs), trained to the end
with one torch thread:

* chapter 1: top-k ∈ {1, 2, 4, 8 (fully soft)} × τ ∈ {0.1, 0.3, 1, 3, 10}; the other fields as the dashboard's
  default (E=8, D=32, m=64, gate "softmax", α=0, seed 0, 400 steps); the parameter-matched dense baseline once.
* chapter 2: top-k ∈ {1, 2, 4, 8 (fully soft)} × τ ∈ {0.3, 1, 3}; the other fields as the dashboard's default (chapter
  1's default run, seed 0, 400 steps), each run probed at its end as the dashboard's final redraw does
  (``probe_asymmetry`` on the first N_PROBE = 512 probe points with the dashboard's rank, draws and splits).
* chapter 3: router / α ∈ {K-Means, softmax with α = 0, 1e-3, 1e-2, 0.1} × loss-free γ ∈ {0, 1e-4, 1e-3, 1e-2};
  the other fields as the dashboard's default (SwiGLU experts, gate "renorm", top-2 of 8, task offset 0.5, seed 0,
  400 steps); the K-Means points have α = 0 (the aux loss has no router parameter to act on there).
* chapter 4: C' ∈ {0.1, 0.3, 1, 3, 10} × α ∈ {0, 1e-3, 1e-2, 0.1, 1} with the MPI router (one power step, gate
  "renorm", top-2 of 8, seed 0, 400 steps), and the plain softmax router at each α as the reference.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moewidgets  # noqa: E402
from moewidgets.config import RunConfig  # noqa: E402
from moewidgets.balance import expert_counts, load_stats  # noqa: E402
from moewidgets.dashboards.chapter1 import N_PROBE, dense_baseline  # noqa: E402
from moewidgets.dashboards.chapter2 import DEFAULT_RUN as CH2_RUN, N_PROBE as CH2_N_PROBE, AsymmetryProbe, \
    Chapter2Dashboard, describe_probe, probe_asymmetry  # noqa: E402
from moewidgets.dashboards.chapter3 import DEFAULT_RUN as CH3_RUN, LF_RATES, PROBE_TOKENS  # noqa: E402
from moewidgets.dashboards.chapter4 import DEFAULT_RUN as CH4_RUN, plain_router  # noqa: E402
from moewidgets.data import make_task  # noqa: E402
from moewidgets.geometry import chapter1_probes, row_alignment  # noqa: E402
from moewidgets.geometry.coupling import router_row_similarity  # noqa: E402
from moewidgets.nn.routers import input_side_weights  # noqa: E402
from moewidgets.static import STATIC_FIGURES, GridAxis, static_grid_html  # noqa: E402
from moewidgets.train import Trainer, torch_threads, trace_model  # noqa: E402

OUT = ROOT / "book" / "_extra" / "figures"

CH1_RUN = RunConfig()
CH1_AXES = (GridAxis("k", "top-k (8 = fully soft)", (1, 2, 4, 8)),
            GridAxis("temperature", "temperature τ", (0.1, 0.3, 1.0, 3.0, 10.0)))
CH1_INITIAL = (2, 1.0)                 # the dashboard's default
CH2_AXES = (GridAxis("k", "top-k (8 = fully soft)", (1, 2, 4, 8)),
            GridAxis("temperature", "temperature τ", (0.3, 1.0, 3.0)))
CH2_INITIAL = (CH2_RUN.model.k, CH2_RUN.model.temperature)   # the dashboard's default: top-2, τ = 1
CH2_LOSS_EVERY = 5                     # chapter 2: the loss curve keeps every 5th step (and the last)
CH3_AXES = (GridAxis("router_alpha", "router / balancing α", ("kmeans", 0.0, 1e-3, 1e-2, 1e-1),
                     ("k-means", "0", "0.001", "0.01", "0.1")),
            GridAxis("lf_rate", "loss-free γ", LF_RATES))
CH3_INITIAL = (CH3_RUN.model.aux_weight, 0.0)   # the dashboard's default: softmax, α = 0.01, γ = 0
CH4_AXES = (GridAxis("mpi_scale", "MPI row scale C'", (0.1, 0.3, 1.0, 3.0, 10.0)),
            GridAxis("aux_weight", "balancing weight α", (0.0, 1e-3, 1e-2, 1e-1, 1.0)))
CH4_INITIAL = (1.0, 1e-2)              # the dashboard's default
TRACK_EVERY = 20                       # chapter 4: record the alignment every 20 steps (and at step 0)


def _round(x, digits: int = 5):
    """Floats to ``digits`` significant digits, NaN → None (JSON has no NaN), recursively through lists."""
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


def _train(run: RunConfig, data) -> Trainer:
    tr = Trainer.from_config(run, data=data)
    tr.step(run.train.steps)
    return tr


# ---------------------------------------------------------------------------------------------------------------
def chapter1_probe(tr: Trainer, seed: int):
    """The dashboard's probes (chapter1._probe): the bundle on the first N_PROBE probe points."""
    return chapter1_probes(tr.model.layer.experts, trace_model(tr.model, tr.data.x_probe[:N_PROBE]), generator=seed)


def chapter1_point(k: int, temperature: float, data=None) -> dict:
    """One chapter-1 grid point: train the dashboard's run with top-k and τ, probe it, return the record."""
    run = CH1_RUN.replace(model=CH1_RUN.model.replace(k=k, temperature=temperature))
    data = make_task(run.task, run.model.seed) if data is None else data
    tr = _train(run, data)
    p = chapter1_probe(tr, run.model.seed)
    return dict(k=k, temperature=temperature, label=run.model.label, ratios_EJ=_round(p.spectra.ratios.tolist()),
                sigma1_E=_round(p.spectra.sigma1.tolist()), final_loss=_round(tr.history.loss[-1]),
                dead=int(p.dead.sum()))


def chapter1_dense(data=None) -> dict:
    """The parameter-matched dense baseline of the chapter-1 runs (the same for every grid point)."""
    run = dense_baseline(CH1_RUN)
    data = make_task(run.task, run.model.seed) if data is None else data
    tr = _train(run, data)
    d = chapter1_probe(tr, run.model.seed)
    return dict(ratios_J=_round(d.spectra.ratios[0].tolist()), sigma1=_round(d.sigma1),
                final_loss=_round(tr.history.loss[-1]), hidden=run.model.dense_hidden)


def chapter1_grid(log=print) -> dict:
    data = make_task(CH1_RUN.task, CH1_RUN.model.seed)
    points = []
    for k in CH1_AXES[0].values:
        for tau in CH1_AXES[1].values:
            t0 = time.perf_counter()
            points.append(chapter1_point(k, tau, data))
            log(f"  chapter1 k={k} τ={tau:g}: {time.perf_counter() - t0:.1f} s")
    return dict(dense=chapter1_dense(data), points=points, config=json.loads(CH1_RUN.to_json()),
                runs=f"{len(points)} MoE runs (one per grid point) and the dense baseline, {CH1_RUN.train.steps} "
                     f"steps each, seed {CH1_RUN.model.seed}")


# ---------------------------------------------------------------------------------------------------------------
def chapter2_settings() -> dict:
    """The dashboard's geometry settings (``rank``, ``n_draws``, ``n_splits``), read off a dashboard that is never
    started, so the grid cannot drift from what the dashboard draws."""
    dash = Chapter2Dashboard(autostart=False)
    return dict(rank=dash.rank, n_draws=dash.n_draws, n_splits=dash.n_splits)


def chapter2_record(p: AsymmetryProbe, label: str, loss_S) -> dict:
    """The JSON record of one chapter-2 probe (what ``moewidgets.static.chapter2_static_figure`` reads back): the
    E×E matrices to 4 significant digits, the reference numbers to 6, the loss every CH2_LOSS_EVERY-th step."""
    c, a, s = p.comparison, p.alignment, p.summary
    steps = list(range(CH2_LOSS_EVERY, len(loss_S) + 1, CH2_LOSS_EVERY))
    if not steps or steps[-1] != len(loss_S):
        steps.append(len(loss_S))              # the last step is always kept
    return dict(label=label, final_loss=_round(loss_S[-1]), loss_step_S=steps,
                loss_S=_round([loss_S[t - 1] for t in steps], 4), rank=p.rank, step=p.step, n_points=p.n_points,
                distance_EE=_round(p.distance_EE.tolist(), 4), alignment_EE=_round(p.alignment_EE.tolist(), 4),
                comparison={f: _round(getattr(c, f), 6) for f in ("between_mean", "group_null_lo_mean",
                                                                   "group_null_hi_mean", "group_null_mean",
                                                                   "floor_mean", "iso_mean")},
                alignment={f: _round(getattr(a, f), 6) for f in ("mean_abs_offdiag", "null_level", "null_sd",
                                                                  "ceiling")},
                summary={f: _round(getattr(s, f), 6) for f in ("functional_fraction", "representational_fraction")},
                skipped=sorted(p.skipped), dead=[e for e, d in enumerate(p.alignment.dead.tolist()) if d],
                geometry=describe_probe(p))


def chapter2_point(k: int, temperature: float, data=None, settings: dict | None = None) -> dict:
    """One chapter-2 grid point: the dashboard's run with top-k and τ, trained to the end, probed as the dashboard's
    final redraw (``probe_asymmetry`` on the first CH2_N_PROBE probe points, seeded with the run's seed)."""
    run = CH2_RUN.replace(model=CH2_RUN.model.replace(k=k, temperature=temperature))
    data = make_task(run.task, run.model.seed) if data is None else data
    settings = chapter2_settings() if settings is None else settings
    tr = _train(run, data)
    p = probe_asymmetry(tr.model, tr.data.x_probe[:CH2_N_PROBE], **settings, seed=run.model.seed,
                        step=tr.steps_done)
    return dict(k=k, temperature=temperature, **chapter2_record(p, run.model.label, tr.history.loss))


def chapter2_grid(log=print) -> dict:
    data = make_task(CH2_RUN.task, CH2_RUN.model.seed)
    settings = chapter2_settings()
    points = []
    for k in CH2_AXES[0].values:
        for tau in CH2_AXES[1].values:
            t0 = time.perf_counter()
            points.append(chapter2_point(k, tau, data, settings))
            log(f"  chapter2 k={k} τ={tau:g}: {time.perf_counter() - t0:.1f} s")
    return dict(points=points, n_probe=CH2_N_PROBE, settings=settings, config=json.loads(CH2_RUN.to_json()),
                runs=f"{len(points)} runs (one per grid point), {CH2_RUN.train.steps} steps each, seed "
                     f"{CH2_RUN.model.seed}, each probed at its end on {CH2_N_PROBE} probe points (rank "
                     f"{settings['rank']}, {settings['n_draws']} random-group and isotropic draws, "
                     f"{settings['n_splits']} split halves)")


# ---------------------------------------------------------------------------------------------------------------
def chapter3_run(router_alpha, lf_rate: float) -> RunConfig:
    """The dashboard's run at one grid point: ``router_alpha`` is ``"kmeans"`` (K-Means router, α = 0) or the
    softmax router's α."""
    m = CH3_RUN.model
    model = (m.replace(router="kmeans", aux_weight=0.0, lf_rate=lf_rate) if router_alpha == "kmeans"
             else m.replace(router="softmax", aux_weight=float(router_alpha), lf_rate=lf_rate))
    return CH3_RUN.replace(model=model)


def chapter3_point(router_alpha, lf_rate: float, data=None) -> dict:
    """One chapter-3 grid point: train the dashboard's run, then (as the dashboard's final redraw) the router rows'
    cosines and the loads of the routing decisions on the first PROBE_TOKENS probe inputs, in eval mode."""
    run = chapter3_run(router_alpha, lf_rate)
    data = make_task(run.task, run.model.seed) if data is None else data
    tr = _train(run, data)
    layer = tr.model.layer
    with torch.no_grad():
        sim = router_row_similarity(layer.router.effective_rows_ED())
        layer.eval()
        try:
            idx_NK = layer.route(tr.data.x_probe[:PROBE_TOKENS]).idx_TK
        finally:
            layer.train()
        loads = load_stats(expert_counts(idx_NK, layer.n_experts))
    return dict(router_alpha=router_alpha, lf_rate=lf_rate, router=run.model.router,
                aux_weight=run.model.aux_weight, cos_EE=_round(sim.cos_EE.tolist()), s_abs=_round(sim.abs),
                s_signed=_round(sim.signed), load_E=_round(loads.fractions), maxvio=_round(loads.maxvio),
                dead=loads.dead, final_loss=_round(tr.history.loss[-1]))


def chapter3_grid(log=print) -> dict:
    data = make_task(CH3_RUN.task, CH3_RUN.model.seed)
    points = []
    for ra in CH3_AXES[0].values:
        for g in CH3_AXES[1].values:
            t0 = time.perf_counter()
            points.append(chapter3_point(ra, g, data))
            log(f"  chapter3 {ra if ra == 'kmeans' else f'α={ra:g}'} γ={g:g}: {time.perf_counter() - t0:.1f} s")
    return dict(points=points, probe_tokens=PROBE_TOKENS, config=json.loads(CH3_RUN.to_json()),
                runs=f"{len(points)} runs (one per grid point; the α = 0, γ = 0 points are the no-balancing "
                     f"references), {CH3_RUN.train.steps} steps each, seed {CH3_RUN.model.seed}")


# ---------------------------------------------------------------------------------------------------------------
def _alignment(tr: Trainer):
    layer = tr.model.layer
    return row_alignment(input_side_weights(layer.experts), layer.router.effective_rows_ED())


def _tracked(run: RunConfig, data) -> tuple[Trainer, list[int], list[list[float]]]:
    """Train ``run`` to the end, recording each expert's angle to v1 every TRACK_EVERY steps (and at step 0)."""
    tr = Trainer.from_config(run, data=data)
    steps, angle_SE = [0], [_alignment(tr).angle_deg.tolist()]
    while not tr.done:
        tr.step(TRACK_EVERY)
        steps.append(tr.steps_done)
        angle_SE.append(_alignment(tr).angle_deg.tolist())
    return tr, steps, angle_SE


def chapter4_reference(aux_weight: float, data=None) -> dict:
    """The plain softmax router at balancing weight α: λ per expert at the end, mean angle over the steps."""
    run = plain_router(CH4_RUN.replace(model=CH4_RUN.model.replace(aux_weight=aux_weight)))
    data = make_task(run.task, run.model.seed) if data is None else data
    tr, steps, angle_SE = _tracked(run, data)
    return dict(ref_lam_E=_round(_alignment(tr).lam.tolist()),
                ref_angle_S=_round([sum(a) / len(a) for a in angle_SE]),
                ref_final_loss=_round(tr.history.loss[-1]))


def chapter4_point(mpi_scale: float, aux_weight: float, data=None, reference: dict | None = None) -> dict:
    """One chapter-4 grid point: the MPI run at (C', α) and its plain-router reference at α."""
    run = CH4_RUN.replace(model=CH4_RUN.model.replace(mpi_scale=mpi_scale, aux_weight=aux_weight))
    data = make_task(run.task, run.model.seed) if data is None else data
    tr, steps, angle_SE = _tracked(run, data)
    reference = chapter4_reference(aux_weight, data) if reference is None else reference
    angle_ES = [list(a) for a in zip(*angle_SE)]            # (S, E) → (E, S)
    return dict(mpi_scale=mpi_scale, aux_weight=aux_weight, lam_E=_round(_alignment(tr).lam.tolist()),
                steps_S=steps, angle_ES=_round(angle_ES), final_loss=_round(tr.history.loss[-1]), **reference)


def chapter4_grid(log=print) -> dict:
    data = make_task(CH4_RUN.task, CH4_RUN.model.seed)
    points, refs = [], {}
    for a in CH4_AXES[1].values:
        t0 = time.perf_counter()
        refs[a] = chapter4_reference(a, data)
        log(f"  chapter4 plain router α={a:g}: {time.perf_counter() - t0:.1f} s")
    for c in CH4_AXES[0].values:
        for a in CH4_AXES[1].values:
            t0 = time.perf_counter()
            points.append(chapter4_point(c, a, data, refs[a]))
            log(f"  chapter4 C'={c:g} α={a:g}: {time.perf_counter() - t0:.1f} s")
    return dict(points=points, config=json.loads(CH4_RUN.to_json()),
                runs=f"{len(points)} MPI runs (one per grid point) and {len(refs)} plain-router runs (one per α), "
                     f"{CH4_RUN.train.steps} steps each, seed {CH4_RUN.model.seed}")


GRIDS = {"chapter1": (chapter1_grid, CH1_AXES, CH1_INITIAL), "chapter2": (chapter2_grid, CH2_AXES, CH2_INITIAL),
         "chapter3": (chapter3_grid, CH3_AXES, CH3_INITIAL),
         "chapter4": (chapter4_grid, CH4_AXES, CH4_INITIAL)}


def train_grid(chapter: str, log=print) -> dict:
    """Train one chapter's grid (one torch thread) and return its JSON-ready data."""
    make, axes, initial = GRIDS[chapter]
    t0 = time.perf_counter()
    with torch_threads(1):
        data = make(log)
    return dict(chapter=chapter, axes=[a.to_dict() for a in axes], initial=list(initial), **data,
                wall_s=round(time.perf_counter() - t0, 1), moewidgets=moewidgets.__version__,
                torch=torch.__version__, machine=platform.machine())


def render(chapter: str, data: dict, out: Path = OUT) -> Path:
    """Write ``chapterN.html`` from its grid data; returns the path."""
    build, title = STATIC_FIGURES[chapter]
    path = out / f"{chapter}.html"
    path.write_text(static_grid_html(build(data), title), encoding="utf-8")
    return path


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chapters", nargs="+", choices=sorted(GRIDS), default=sorted(GRIDS))
    ap.add_argument("--render-only", action="store_true", help="re-render the HTML from the existing JSON")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for chapter in args.chapters:
        json_path = args.out / f"{chapter}.json"
        if args.render_only:
            if not json_path.exists():
                raise SystemExit(f"{json_path} is missing: run without --render-only to train the grid")
            data = json.loads(json_path.read_text())
        else:
            print(f"training the {chapter} grid")
            data = train_grid(chapter)
            json_path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
            print(f"{_show(json_path)}: {json_path.stat().st_size / 1e3:.0f} kB, {data['wall_s']} s")
        path = render(chapter, data, args.out)
        print(f"{_show(path)}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
