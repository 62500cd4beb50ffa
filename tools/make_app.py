"""Writes app/chapterN.ipynb: one tiny notebook per chapter dashboard, served by Voila in classroom mode (`make app`).

Run: .venv/bin/python tools/make_app.py   (the notebooks are the artefact; this keeps their source reviewable).
They are committed unexecuted: Voila runs them in a fresh kernel for every page load.
"""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"

DASHBOARDS = {
    "chapter1": ("Chapter1Dashboard", "Chapter 1 — MoE as soft clustering: expert Jacobian spectra, live",
                 "Routing (dense / top-k / soft), top-k, temperature τ, experts E, balancing α and seed retrain a "
                 "small MLP-MoE and its parameter-matched dense baseline; the Jacobian spectra, σ₁ and "
                 "effective-rank bars, output PCA, cross-expert alignment, loss and load redraw as it trains."),
    "chapter2": ("Chapter2Dashboard", "Chapter 2 — geometric asymmetry: Jacobian alignment vs Grassmann distances, live",
                 "Top-k (k = E is fully soft), temperature τ, experts E, balancing α and seed retrain a small MLP-MoE; "
                 "the Grassmann distances between the experts' routed input subspaces (with their random-group null, "
                 "split-half floor and isotropic level), the cross-expert Jacobian alignment (with its null and "
                 "ceiling), the distance-vs-alignment scatter and the loss redraw as it trains."),
    "chapter3": ("Chapter3Dashboard", "Chapter 3 — router–expert coupling, load balancing and K-Means routing, live",
                 "Router (learned softmax / online K-Means), balancing α, loss-free rate γ, top-k, experts E and seed "
                 "retrain a small MLP-MoE and the same run without balancing; the router-row cosines, each row "
                 "against every expert's routed centroid, the loads, the load imbalance and the loss redraw."),
    "chapter4": ("Chapter4Dashboard", "Chapter 4 — the Manifold Power Iteration router, live",
                 "Router (softmax / MPI), power steps, C′, top-k, experts, balancing α and seed retrain a small "
                 "MLP-MoE and the same model with the plain softmax router; each expert's router-row alignment with "
                 "its top right-singular vector (ψ, angle), the spectral gaps, load imbalance and loss redraw."),
}


# Chapters whose dashboards share finished runs through the run cache (moewidgets/dashboards/runcache.py). Chapter 4
# draws each expert's angle over the steps from the model at every chunk, which a finished run cannot replay: a
# cached chapter-4 run would draw that curve as one point, so chapter 4 always trains.
CACHED = {"chapter1", "chapter2", "chapter3"}


def dashboard_source(cls: str, cached: bool) -> str:
    """The dashboard cell: one torch thread, the dashboard (its run shared through the run cache when
    ``cached``; BokehJS sent once, in the mime type Voila renders), resynced for pages that connect late."""
    lines = ["import torch", f"from moewidgets.dashboards import {cls}",
             "from moewidgets.dashboards.base import JS_MIME"]
    lines += ["from moewidgets.dashboards.runcache import RunCache"] if cached else []
    lines += ["", "torch.set_num_threads(1)   # one thread per visitor: a shared server's cores go further",
              f"dash = {cls}(autostart=False)"]
    if cached:
        lines += ["dash.runner.cache = RunCache()   # finished runs shared by every visitor's kernel (app/README.md)"]
    lines += ["dash.loader_mimes = (JS_MIME,)   # BokehJS once, as Voila renders it (not twice: 1.6 MB per page)",
              "dash.resync_late_pages()   # a page that connects late gets the plots as they are now",
              "dash.runner.request(dash.config, delay=0.0)",
              "dash"]
    return "\n".join(lines)


def notebook(name: str, cls: str, title: str, blurb: str) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [      # fixed cell ids: regenerating gives the same files
        nbf.v4.new_markdown_cell(id="about", source=(
            f"# {title}\n\n{blurb}\n\nThis page has its own Python kernel: what you change here changes nothing "
            "for anyone else. The status line under the controls says what is training; the book's chapter explains "
            "what you see.")),
        nbf.v4.new_code_cell(id="dashboard", source=dashboard_source(cls, name in CACHED)),
    ]
    return nb


def main() -> None:
    APP.mkdir(exist_ok=True)
    for name, (cls, title, blurb) in DASHBOARDS.items():
        nbf.write(notebook(name, cls, title, blurb), APP / f"{name}.ipynb")
        print(f"wrote app/{name}.ipynb")


if __name__ == "__main__":
    main()
