"""S seeds trained at once (moewidgets.multiseed) against the slow obvious oracle: S separate Trainer runs.

Per-step task losses, aux losses, loads, final weights (and loss-free biases) and probe MSE agree within 1e-5
relative (only matmul summation order differs), over routing conventions, balancing knobs, routers, archs and
every dispatch path (dense, padded gather, ragged gather).
"""
from __future__ import annotations

import functools

import pytest
import torch

from moewidgets import MoEConfig, NonFiniteLossError, RunConfig, TaskConfig, TrainConfig, Trainer
from moewidgets.multiseed import MultiSeedTrainer, ragged_available, train_seeds
from moewidgets.train import torch_threads

RTOL = 1e-5
SEEDS = (0, 1, 2)
BASE = RunConfig(MoEConfig(n_experts=4, k=2, d_model=8, d_hidden=16),
                 TaskConfig(d_in=8, d_out=8, n_train=512, n_probe=64),
                 TrainConfig(steps=12, batch_size=64, lr=1e-2, device="cpu"))

GRID = {
    "top-2": {},
    "top-1": {"k": 1},
    "soft k=E": {"k": 4},
    "renorm top-2": {"gate": "renorm"},
    "renorm top-1 tau=0.5": {"gate": "renorm", "k": 1, "temperature": 0.5},
    "aux + z": {"aux_weight": 0.1, "z_weight": 0.01},
    "loss-free": {"lf_rate": 1e-2},
    "loss-free soft": {"lf_rate": 1e-2, "k": 4},
    "mpi": {"router": "mpi", "mpi_scale": 2.0},
    "mpi renorm 2 steps": {"router": "mpi", "gate": "renorm", "mpi_steps": 2, "aux_weight": 0.1},
    "swiglu": {"expert": "swiglu", "lf_rate": 1e-2},
    "kmeans ema": {"router": "kmeans", "kmeans_rate": 0.1},
    "kmeans cumulative normalize renorm": {"router": "kmeans", "kmeans_mode": "cumulative", "kmeans_normalize": True,
                                           "gate": "renorm", "temperature": 0.3},
    "kmeans loss-free top-1 aux": {"router": "kmeans", "k": 1, "lf_rate": 1e-2, "aux_weight": 0.1},
    "kmeans swiglu detach z": {"router": "kmeans", "expert": "swiglu", "kmeans_detach": True, "z_weight": 0.01},
    "kmeans soft loss-free": {"router": "kmeans", "k": 4, "lf_rate": 1e-2},
    "mpi swiglu soft z loss-free": {"router": "mpi", "expert": "swiglu", "k": 4, "z_weight": 0.01, "lf_rate": 1e-2},
    "mpi detach top-1 aux": {"router": "mpi", "mpi_detach": True, "k": 1, "aux_weight": 0.1},
    "relu": {"expert": "relu"},
    "relu mpi renorm aux loss-free": {"router": "mpi", "expert": "relu", "gate": "renorm", "aux_weight": 0.1,
                                      "lf_rate": 1e-2},
    "relu kmeans": {"router": "kmeans", "expert": "relu"},
    "dense": {"arch": "dense"},
    "dense_active": {"arch": "dense_active"},
    "dense relu": {"arch": "dense", "expert": "relu"},
}
PATHS = [("dense", False), ("gather", False)] + ([("gather", True)] if ragged_available("cpu", 8, 16) else [])


@pytest.fixture(autouse=True)
def one_thread():
    """Widget sizes gain nothing from threads, and two OpenMP threads on a busy 2-core machine spin-wait."""
    with torch_threads(1):
        yield


def run_of(name: str, train: dict | None = None) -> RunConfig:
    run = BASE.replace(model=BASE.model.replace(**GRID[name]))
    return run.replace(train=run.train.replace(**train)) if train else run


@functools.lru_cache(maxsize=None)
def oracle(run_json: str, seed: int) -> Trainer:
    """One seed trained alone, step by step, by the ordinary Trainer (cached across dispatch paths)."""
    run = RunConfig.from_json(run_json)
    trainer = Trainer.from_config(run.replace(model=run.model.replace(seed=seed)))
    for _ in range(run.train.steps):
        trainer.step(1)
    return trainer


def rel(a, b) -> float:
    """max |a − b| / max |a| (0 for empty)."""
    a, b = (torch.as_tensor(v).detach().to(torch.float64) for v in (a, b))
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) if a.numel() else 0.0


def assert_matches(ms: MultiSeedTrainer, run: RunConfig, seeds=SEEDS, skip=()) -> None:
    models = ms.models()
    mse = ms.evaluate()
    for s, seed in enumerate(seeds):
        if seed in skip:
            continue
        tr = oracle(run.to_json(), seed)
        h, ref = ms.histories[s], tr.history
        assert h.step == ref.step
        assert rel(ref.loss, h.loss) < RTOL, (seed, rel(ref.loss, h.loss))
        assert rel(ref.aux, h.aux) < RTOL
        assert rel(ref.load, h.load) < RTOL          # loads are count fractions: equal while routing agrees
        got = models[s].state_dict()
        for name, want in tr.model.state_dict().items():
            assert rel(want, got[name]) < RTOL, (seed, name, rel(want, got[name]))
        assert models[s].cfg == tr.model.cfg
        assert abs(mse[s] - tr.evaluate()) <= RTOL * tr.evaluate()


@pytest.mark.parametrize("dispatch,ragged", PATHS, ids=[f"{d}-{'ragged' if r else 'padded'}" for d, r in PATHS])
@pytest.mark.parametrize("name", list(GRID))
def test_seeds_at_once_equal_separate_runs(name, dispatch, ragged):
    run = run_of(name)
    if run.model.arch != "moe" and (dispatch, ragged) != ("dense", False):
        pytest.skip("dense archs have no dispatch")
    ms = MultiSeedTrainer(run, list(SEEDS), dispatch=dispatch, ragged=ragged)
    ms.step(5)                     # steps in chunks: the batch order must not depend on how step() is called
    ms.step(100)
    assert ms.done and ms.steps_done == run.train.steps
    assert_matches(ms, run)


def test_cosine_schedule_weight_decay_and_seed_order():
    run = run_of("loss-free", {"schedule": "cosine", "weight_decay": 0.1})
    ms = MultiSeedTrainer(run, [2, 0])          # any seeds, any order
    ms.run(every=5)
    assert_matches(ms, run, seeds=(2, 0))
    # the loss-free biases of each seed are its own run's
    for s, seed in enumerate((2, 0)):
        assert rel(oracle(run.to_json(), seed).model.layer.lf_bias_E, ms.lf_bias_SE[s]) < RTOL


def test_train_seeds_results_are_ordinary_models():
    run = run_of("mpi")
    results = train_seeds(run, [1, 2])
    assert [r.seed for r in results] == [1, 2]
    for r in results:
        tr = oracle(run.to_json(), r.seed)
        assert r.run.model.seed == r.seed and r.error is None
        assert len(r.history) == run.train.steps
        assert torch.equal(r.data.x_train, tr.data.x_train)
        with torch.no_grad():     # the unstacked model is an MLPMoE whose forward gives its own run's predictions
            x = r.data.x_probe
            assert rel(tr.model(x).pred_TO, r.model(x).pred_TO) < 10 * RTOL
        assert r.model.layer.router.experts is r.model.layer.experts      # MPI rows see the model's own bank


@pytest.mark.parametrize("name", ["top-2", "kmeans loss-free top-1 aux"])
def test_a_nonfinite_seed_stops_alone(name):
    run = run_of(name)
    ms = MultiSeedTrainer(run, list(SEEDS), dispatch="gather")
    ms.step(4)
    with torch.no_grad():                        # blow up seed 1 only: its next loss is inf
        ms.params["w_ro_OD"][1] *= 1e30
    ms.step(100)
    assert ms.done and list(ms.errors) == [1] and ms.errors[1].step == 5
    assert len(ms.histories[1]) == 4 and len(ms.histories[0]) == run.train.steps
    # oracle: seed 1 alone, same blow-up: Trainer raises at step 5 and keeps its last good weights (its K-Means
    # centroids have moved in that step's forward, as ours have)
    alone = Trainer.from_config(run.replace(model=run.model.replace(seed=1)))
    alone.step(4)
    with torch.no_grad():
        alone.model.w_ro_OD *= 1e30
    with pytest.raises(NonFiniteLossError):
        alone.step(1)
    got = ms.models()[1].state_dict()
    for key, want in alone.model.state_dict().items():
        assert rel(want, got[key]) < RTOL, key
    assert ms.histories[1].loss == pytest.approx(alone.history.loss, rel=RTOL)
    # the other seeds are untouched by it (the gather path groups all seeds' tokens together)
    assert_matches(ms, run, skip=(1,))


@pytest.mark.parametrize("kwargs,match", [
    ({"seeds": []}, r"seeds=\[\] must be a non-empty list"),
    ({"seeds": [0, 3, 0]}, r"seeds=\[0, 3, 0\] has duplicates \[0\]"),
    ({"seeds": [0, -1]}, r"bad: \[-1\]"),
    ({"seeds": [True]}, r"bad: \[True\]"),
    ({"seeds": 3}, r"seeds=3 must be a non-empty list"),
    ({"run": BASE.replace(model=BASE.model.replace(router="kmeans"), train=BASE.train.replace(batch_size=3))},
     r"batch_size=3 must be >= n_experts=4 for router='kmeans'"),
    ({"dispatch": "sparse"}, r"dispatch='sparse' must be one of"),
    ({"ragged": "yes"}, r"ragged='yes' must be"),
    ({"run": RunConfig(MoEConfig(d_model=6, d_hidden=16), TaskConfig(d_in=6, d_out=6)), "ragged": True},
     r"ragged=True needs"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    args = {"run": BASE, "seeds": [0, 1]} | kwargs
    with pytest.raises(ValueError, match=match):
        MultiSeedTrainer(**args)


def test_a_router_it_does_not_know_is_refused():
    # a router name no module implements (faked here past the config's validation) is refused, not mis-trained
    model = BASE.model.replace()
    object.__setattr__(model, "router", "hash")
    with pytest.raises(ValueError, match=r"router='hash' must be one of 'softmax', 'kmeans', 'mpi'"):
        MultiSeedTrainer(BASE.replace(model=model), [0])


def test_kmeans_needs_a_training_step_before_evaluating():
    ms = MultiSeedTrainer(run_of("kmeans ema"), [0, 1])
    with pytest.raises(RuntimeError, match="not initialised yet"):
        ms.evaluate()


@pytest.mark.parametrize("ragged", [False, True] if ragged_available("cpu", 8, 16) else [False])
def test_a_seed_does_not_depend_on_the_others(ragged):
    # seed 1 trained among [2, 1, 0] equals seed 1 trained alone (same dispatch path); not asserted bitwise: the
    # fused AdamW kernel may round a seed's block 1 ulp differently where it falls on its vector body or tail
    run = run_of("aux + z")
    together = MultiSeedTrainer(run, [2, 1, 0], dispatch="gather", ragged=ragged)
    alone = MultiSeedTrainer(run, [1], dispatch="gather", ragged=ragged)
    together.run(), alone.run()
    assert rel(alone.histories[0].loss, together.histories[1].loss) < 1e-6
    for name, p in together.params.items():
        assert rel(alone.params[name][0], p[1]) < 1e-6, name
