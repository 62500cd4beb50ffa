"""Writes book/chapter3.ipynb from the cells below (the notebook is the artefact; this keeps its source reviewable).

Run: .venv/bin/python tools/make_chapter3.py && .venv/bin/python tools/execute_notebook.py book/chapter3.ipynb"""
import sys
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = []

cells.append(md(r"""# Chapter 3 — Routers learn the geometry of their experts: coupling, balancing and K-Means routing

Paper: S. Ahrac, N. Hochwald, M. Geva, *Routers Learn the Geometry of Their Experts: Geometric Coupling in Sparse
Mixture-of-Experts* {cite}`ahrac2026coupling`. Only the abstract and secondary summaries could be read; the
derivation below is exact, the measurement protocols are our reconstruction (`shared/papers/router-coupling-and-mpi.md`
§1 and §3).

**What you will learn**

* why, for a routed token, the router row of the selected expert and the expert's **input-side** weights get
  gradients along the **same direction**, the token itself — and why the output side does not;
* how the two gate conventions differ in *which* router rows move, and why top-1 with "renorm" gates leaves the
  router with no gradient at all;
* what a Switch auxiliary load-balancing loss does to this structure (it pushes every row along every token of the
  batch), and what loss-free balancing does instead (nothing to the gradients);
* the **parameter-free online K-Means router**: running means of routed tokens and cosine assignment, the
  "coupling-only" router;
* which of the checkable claims RC-a … RC-g hold in a small controlled replication over 5 seeds."""))

cells.append(md(r"""## The idea

A learned router scores token $x$ for expert $i$ with $z_i = r_i\cdot x$. Look at the gradient of any loss $L$
with respect to the row $r_i$: since $z_i$ is linear in $r_i$,

$$ \frac{\partial L}{\partial r_i} = \frac{\partial L}{\partial z_i}\, x \;=\; \alpha_i\, x . $$

Every router-row gradient is a scalar times the token. Now the selected expert. For a SwiGLU expert
$E_i(x) = W_d\big(\mathrm{SiLU}(W_g x)\odot W_u x\big)$ (a GELU expert $W_{out}\,\phi(W_{in}x+b)$ works the same way),
row $n$ of the gate and up projections sees $x$ only through the dot products $a_n = w_{g,n}\cdot x$ and
$u_n = w_{u,n}\cdot x$, so with $\delta = \partial L/\partial y$ and gate value $g_i$:

$$ \frac{\partial L}{\partial w_{g,n}} = \underbrace{g_i\,(W_d[:,n]\cdot\delta)\,u_n\,\mathrm{SiLU}'(a_n)}_{\beta_{n}}\; x,
\qquad
\frac{\partial L}{\partial w_{u,n}} = \underbrace{g_i\,(W_d[:,n]\cdot\delta)\,\mathrm{SiLU}(a_n)}_{\gamma_{n}}\; x,
\qquad
\frac{\partial L}{\partial W_d} = g_i\,\delta\, h_i^\top . $$

For one token, the selected expert's router row and **every** input-side row move along $x$; only the scalars
differ. The down projection moves along $\delta$ and $h_i$, not $x$: it is not coupled.

**Which rows move.** With the Mixtral convention ("renorm": top-k, then a softmax over the selected logits),
$\alpha_i = g_i(\langle\delta,E_i\rangle - \langle\delta,y\rangle)$ for $i$ selected and exactly $0$ otherwise; at
$k=1$ the gate is identically 1 and *no* row moves. With the Switch/OLMoE convention ("softmax": keep the
softmax-over-all values), unselected rows get $\alpha_i = -p_i\langle\delta,y\rangle \ne 0$ — still along $x$.

**The routed history.** With plain SGD, after $T$ steps $r_i(T)-r_i(0) = -\eta\sum_t \alpha_{i,t}x_t$ and
$w_{g,n}(T)-w_{g,n}(0) = -\eta\sum_t \beta_{n,t}x_t$ over the **same** tokens, those routed to $i$ ("renorm"): both
stay in the span of expert $i$'s routed tokens. Adam's per-coordinate scaling, momentum and weight decay make this
approximate.

**What an aux loss does.** $L_{aux} = \alpha E\sum_i f_iP_i$ with $P_i = \frac1T\sum_t p_i(x_t)$ gives

$$ \frac{\partial L_{aux}}{\partial r_i} = \frac{\alpha E}{T}\sum_t p_{i,t}\Big(f_i - \sum_j f_j p_{j,t}\Big)\, x_t , $$

a weighted sum over **all** tokens of the batch, for **every** row. Over-loaded and under-loaded experts are pushed
in opposite directions along the batch's common directions; when tokens share a mean offset (real residual streams
do), every row picks up a component along it, and distinct rows become more similar: the paper's "nearly three times
more similar". Loss-free balancing adds a bias to the selection scores by a rule, not a gradient, and leaves the
coupling intact.

**The K-Means router.** If a router row is, under SGD, a weighted sum of its routed tokens, why learn it? Keep the
running **mean** of the tokens routed to each expert and assign by cosine:

$$ s_{i}(x) = \frac{x\cdot C_i}{\lVert x\rVert\lVert C_i\rVert},\qquad \text{top-}k \text{ of } p=\mathrm{softmax}(s/\tau)
\;(+\text{a loss-free bias for selection}),\qquad C_i \leftarrow (1-\beta)C_i + \beta\,\overline{x}_{\to i}. $$

It has no learned parameters; the paper reports the lowest load imbalance of the three routers at a modest
perplexity cost."""))

cells.append(md(r"""## The set-up (ours)

* **Model and task:** the MLP-MoE of chapter 1 with **SwiGLU** experts (E = 8, k = 2, D = 32, m = 64), gate
  **"renorm"** (top-k then softmax, the spec's primary convention), on the clustered-teacher task with a **shared
  offset** $\mu$ added to every input, $\lVert\mu\rVert = 0.5\,s\sqrt D$ (one direction carrying 18 % of the input
  energy; targets are computed before the shift). The spec's $\lVert\mu\rVert = 2\lVert\mu_c\rVert$ made this
  un-normalised model route every token to the same two experts from the first step (6 of 8 experts dead without
  balancing), so we halved it twice.
* **Arms:** `none` (learned softmax router, no balancing); `aux-0.001`, `aux-0.01`, `aux-0.1` (Switch aux loss, ours
  is 1 at perfect balance); `lfb` (loss-free bias, γ = 1e-3 on the routing probabilities); `kmeans` (no bias),
  `kmeans+lfb` (with the sign bias, γ = 1e-3, as SEC-C suggests the paper's has), `kmeans-cum+lfb` (cumulative mean
  instead of EMA).
* **K-Means flags** (`MoEConfig.kmeans_*`): EMA with β = 0.05, raw $x$ averaged (not normalised), centroids
  initialised with 8 distinct random tokens of the first training batch, τ = 1, gates from the cosine scores with the
  same "renorm" convention, scores not detached.
* **Training:** AdamW (weight decay 0.1), batch 256, 2,000 steps, learning rate $10^{-2}$ with cosine decay, 5 seeds,
  one torch thread; every run is also trained 4× longer to check convergence. Live runs: 400 steps at
  $3\cdot10^{-3}$."""))

cells.append(code(r"""import copy

import torch
import moewidgets as mw
from moewidgets.geometry.coupling import coupling_exactness, gradient_spans, sgd_span_residual

torch.set_num_threads(1)   # tiny models: one thread is fastest, and printed numbers are machine-independent"""))

cells.append(md(r"""### Check 1: every routed gradient is parallel to its token

A random SwiGLU MoE layer in float64 (D = 16, E = 4, k = 2), 12 tokens, one backward per token with a random upstream
gradient $\delta$. We print the worst $|\cos|$ between the token and (a) the gradient of a selected expert's router
row, (b) every gate and up row of the selected experts; the largest gradient an unselected row gets; and the median
$|\cos|$ of the down projection's columns (not coupled)."""))

cells.append(code(r"""x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
for gate in ("renorm", "softmax"):
    cfg = mw.MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=8, expert="swiglu", gate=gate)
    layer = mw.MoELayer(cfg, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ce = coupling_exactness(layer, x, generator=0)
    exact = "< 1e-12" if 1 - ce.min_selected_cos < 1e-12 else f"{1 - ce.min_selected_cos:.0e}"
    print(f"gate={gate:<8} 1 − worst |cos| (selected rows) {exact} · largest unselected router-row gradient "
          f"{ce.max_unselected_norm:.2g} · down-projection median |cos| {ce.median_output_cos:.2f}")"""))

cells.append(md(r"""With "renorm" the unselected rows get exactly zero; with "softmax" they move too, and (not printed) their
gradients are just as parallel to $x$.

### Check 2: SGD keeps the changes in the span of the routed tokens; Adam does not

Thirty optimiser steps on 6 fixed tokens in $\mathbb R^{16}$ (so each expert's routed tokens span a small subspace),
no aux loss. The residual is $\lVert\Delta - P\Delta\rVert/\lVert\Delta\rVert$ with $P$ the projector onto the span
of the tokens routed to the expert at any step, for the router row and the whole input side of each expert (float32)."""))

cells.append(code(r"""cfg = mw.MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=8, expert="swiglu", gate="renorm")
layer = mw.MoELayer(cfg, generator=torch.Generator().manual_seed(0))
g = torch.Generator().manual_seed(2)
x6, y6 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
for opt, lr in (("sgd", 0.05), ("adamw", 0.01)):
    res = sgd_span_residual(layer, x6, y6, steps=30, lr=lr, optimizer=opt)
    level = "< 1e-5" if res.max < 1e-5 else f"{res.max:.1g}"
    print(f"{opt:<6} largest residual outside the routed span: {level}   (tokens per expert: "
          f"{res.n_tokens_E.tolist()})")"""))

cells.append(md(r"""### Check 3: the aux loss's gradient lives in the span of the whole batch

The same layer with α = 0.1: split one batch's router gradient into its task part and its aux part."""))

cells.append(code(r"""aux_layer = mw.MoELayer(cfg.replace(aux_weight=0.1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
gs = gradient_spans(aux_layer, x6.double(), y6.double())
fmt = lambda v: "[" + ", ".join("nan" if a != a else "< 1e-12" if a < 1e-12 else f"{float(a):.1f}" for a in v) + "]"
print("task gradient, residual outside own routed span:", fmt(gs.task_own_E), " (nan: expert 3 got no token)")
print("aux  gradient, residual outside own routed span:", fmt(gs.aux_own_E))
print("aux  gradient, residual outside the batch span:  ", fmt(gs.aux_all_E))"""))

cells.append(md(r"""## The live dashboard

Switch the **router** between the learned softmax router and K-Means, move the **aux weight α** (log steps, and 0),
the **loss-free rate γ**, **top-k**, the number of **experts** or the **seed**: the status line acknowledges at once
and the model retrains while the plots redraw. Top row: the cosine between every pair of router rows (for K-Means,
its centroids) — the coupling-similarity view —, every router row against every expert's routed centroid on a fixed
probe batch (a bright diagonal: each row points at its own tokens), and the load of each expert. Bottom: the batch
MaxVio (max load / mean load − 1) and the loss. When any balancing is on, the dashed curves are the same run with no
balancing, trained alongside. Try α = 0.1 vs α = 0 and watch the off-diagonal cosines; then K-Means with γ = 0.001."""))

cells.append(code(r"""from moewidgets.dashboards import Chapter3Dashboard

dash = Chapter3Dashboard()
dash"""))

cells.append(code(r"""await dash.wait()              # the first run, to its last step
print(dash.status_summary())"""))

cells.append(md(r"""**Without a kernel** (the built HTML book): the router-row cosines and the expert loads, precomputed over the router (K-Means, or the softmax router at each balancing weight α) × the loss-free rate γ by `make figures` (each point trained as the dashboard would); the sliders below pick a grid point.

<iframe src="figures/chapter3.html" title="Router-row cosines and expert loads over router / balancing α × loss-free γ (precomputed)" width="100%" height="480" style="border: 0;" loading="lazy"></iframe>"""))

cells.append(md(r"""## The claims, over 5 seeds

The table is rendered from `book/results/chapter3.jsonl`, written by

```bash
python -m moewidgets reproduce chapter3   # 8 arms × 5 seeds, plus each run 4× longer; resumable (~7 min on 2 cores)
```

**Pass rule** (as in chapter 1): the per-seed difference A − B has the predicted sign in ≥ 4 of 5 seeds **and** its
95 % bootstrap CI excludes 0. B is a comparison arm, a fixed level for the exactness claims, `none@init` the values at
initialisation (after one step for K-Means), and `none@×1.5` the comparison arm's value times 1.5 (a ratio claim).
**Converged**: for every seed the probe MSE after 2,000 steps is within 0.5 % of Var(y) of a run 4× longer. RC-a and
RC-b are measured on the trained `none` models (float64 copies for RC-a, 16 probe tokens; RC-b on 6 tokens, 30 steps
at lr = 0.01, in float64 as well, with Δ the sum of the updates applied);
RC-e's score is the router logit, the activation the mean $|\mathrm{SiLU}(W_g x)|$ over 1,024 probe tokens, routed or
not, with the permuted-expert null; RC-g compares each row with the mean of the probe tokens routed to it."""))

cells.append(code(r"""from moewidgets.reproduce import chapter3_claims, claims_table, load_results

rows = load_results("chapter3")
print(claims_table(chapter3_claims(rows)))"""))

cells.append(code(r"""from moewidgets.reproduce import CHAPTER3_ARMS, convergence_table

print(convergence_table(rows, CHAPTER3_ARMS))"""))

cells.append(md(r"""### Every arm side by side

Means over the 5 seeds: row similarity (mean over pairs of rows, signed and absolute), score → activation ρ and its
null, the centroid-matching margin, the global and per-batch MaxVio, the std of the load fractions, the number of dead
experts (no probe token), and the probe MSE."""))

cells.append(code(r"""import statistics as st

keys = [("sim_abs", "S_abs", ".3f"), ("sim_signed", "S_sgn", "+.3f"), ("rho", "ρ", "+.2f"), ("rho_null", "null", "+.2f"),
        ("cm_margin", "match", ".2f"), ("maxvio_global", "MaxVio", ".2f"), ("maxvio_batch", "MV_b", ".2f"),
        ("load_std_global", "std", ".3f"), ("n_dead", "dead", ".1f"), ("probe_mse", "MSE", ".4f")]
print(f"{'arm':<16}" + "".join(f"{h:>8}" for _, h, _ in keys))
for arm in CHAPTER3_ARMS:
    ms = [r["metrics"] for r in rows if r["arm"] == arm]
    print(f"{arm:<16}" + "".join(f"{format(st.mean(m[k] for m in ms), f):>8}" for k, _, f in keys))"""))

cells.append(md(r"""### Load imbalance during training

The batch MaxVio, averaged over windows of 50 steps and over the seeds:"""))

cells.append(code(r"""print(f"{'arm':<16}" + "".join(f"{s:>7}" for s in (50, 100, 200, 500, 1000, 2000)))
for arm in CHAPTER3_ARMS:
    tracks = [r["metrics"]["track"] for r in rows if r["arm"] == arm]
    steps = tracks[0]["step"]
    print(f"{arm:<16}" + "".join(f"{st.mean(t['maxvio'][steps.index(s)] for t in tracks):>7.2f}"
                                 for s in (50, 100, 200, 500, 1000, 2000)))"""))

cells.append(md((Path(__file__).parent / "chapter3_findings.md").read_text()
                if (Path(__file__).parent / "chapter3_findings.md").exists() else "## What holds, and what does not"))

cells.append(md(r"""## Re-run the pinned subset live

Seed 0 of four arms, trained again now and compared with the committed rows (tolerance 2 % relative on probe MSE,
$S_{abs}$, ρ, the global MaxVio and the centroid margin). If this ever prints `NO`, the committed numbers no longer
describe the code: re-run the claim runs."""))

cells.append(code(r"""from moewidgets.reproduce import pinned_subset

for check in pinned_subset(rows, seed=0, arms=["none", "aux-0.01", "lfb", "kmeans+lfb"], chapter="chapter3"):
    print(f"{check.arm:<12} seed {check.seed}: within 2 % of the committed row: {'yes' if check.ok else 'NO'}")"""))

cells.append(md(r"""## Exercises

1. **Top-1 with renormalised gates.** Set k = 1 and `gate="renorm"` and train. What does the router learn, and why?

:::{admonition} Solution
:class: dropdown
Nothing: with one selected expert the renormalised gate is $e^{z_i}/e^{z_i} = 1$ whatever the logits are, so
$\partial L/\partial z = 0$ and the router rows never move (only the aux loss, if any, moves them). The experts still
train, on a routing frozen at initialisation. This is why `gate="softmax"` is the package default:

```python
cfg = mw.MoEConfig(n_experts=4, k=1, d_model=16, d_hidden=8, gate="renorm")
layer = mw.MoELayer(cfg, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
float(coupling_exactness(layer, x, generator=0).router_norm_TE.max())    # 0.0
```
:::

2. **Why does the aux loss need a shared offset to make rows similar?** Set the offset to 0
   (`TaskConfig(offset=0.0)`) and compare $S_{abs}$ with and without α.

:::{admonition} Solution
:class: dropdown
The aux gradient of row $i$ is $\sum_t w_{i,t}x_t$ with weights of opposite signs for over- and under-loaded experts.
If the tokens have a common mean $\mu$, every such sum has a large component along $\mu$ (with a sign set by the
expert's load), so rows gain a shared direction and $|\cos|$ between them rises. With zero-mean, isotropic tokens the
sums point in nearly random directions and the rows stay as dissimilar as before: the effect needs anisotropy, as
real residual streams have (spec §1.12, RC-d).
:::"""))

cells.append(md(r"""## What is ours

The paper's text beyond its abstract was not available. Ours ([PROPOSAL] in the spec): the controlled MLP-MoE with
SwiGLU experts and the clustered-teacher task with a shared offset instead of a 1B LM trained on 50B tokens; every
K-Means choice (EMA β = 0.05, raw averaging, initialisation from batch tokens, τ = 1, "renorm" gates on cosine scores,
the optional sign bias on the routing probabilities); the metrics' exact forms (row similarity over all rows including
dead experts, ρ with logits and mean $|\mathrm{SiLU}(W_gx)|$ over all probe tokens, the centroid margin, MaxVio and
the std of load fractions on 1,024 probe points and per batch); the levels in the exactness claims; the 5 % margin in
RC-f; AdamW with weight decay 0.1 and cosine decay for 2,000 steps and the 4× convergence check; and the pass rule's
bootstrap. The chapter-2 transformer on WikiText-2 is not used here yet."""))

nb = nbf.v4.new_notebook()
nb.cells = cells
nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
               "language_info": {"name": "python"}}
nbf.write(nb, sys.argv[1] if len(sys.argv) > 1 else "book/chapter3.ipynb")
