"""Budgets (moewidgets.budget) and config contracts as properties (hypothesis): round trips through dicts and JSON,
and any invalid value gives a ValueError naming the field, never another exception."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moewidgets import budget as bd
from moewidgets.config import EXPERTS, GATES, KMEANS_MODES, ROUTERS, MoEConfig, RunConfig, TaskConfig, TrainConfig
from moewidgets.lm import LMConfig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ budgets

def test_estimate_grows_with_each_size_and_the_error_names_field_value_estimate_limit():
    base = bd.run_bytes(RunConfig())
    for cfg in (RunConfig(train=TrainConfig(batch_size=4096)), RunConfig(task=TaskConfig(n_train=10**6)),
                RunConfig(model=MoEConfig(d_hidden=1024))):
        assert bd.run_bytes(cfg) > base
    with pytest.raises(ValueError) as exc:
        RunConfig(task=TaskConfig(n_train=10**9))
    msg = str(exc.value)
    assert msg.startswith("task.n_train=1000000000: estimated tensor memory ") and "exceeds the budget of 16 GiB" \
        in msg and "MOEWIDGETS_BUDGET_GB" in msg


def test_the_env_var_raises_the_budget(monkeypatch):
    big = {"task": {"n_train": 10**8}}
    with pytest.raises(ValueError, match="task.n_train=100000000"):
        RunConfig.from_dict(big)
    monkeypatch.setenv(bd.ENV_VAR, "64")
    assert RunConfig.from_dict(big).task.n_train == 10**8
    monkeypatch.setenv(bd.ENV_VAR, "lots")
    with pytest.raises(ValueError, match="MOEWIDGETS_BUDGET_GB='lots' must be a number of GiB"):
        RunConfig()


def test_dashboard_budget_is_stricter_and_raisable(monkeypatch):
    cfg = RunConfig(task=TaskConfig(n_train=2 * 10**6))            # fine for the CLI, too big for a classroom
    bd.check_run(cfg)
    with pytest.raises(ValueError, match=r"task.n_train=2000000: .* exceeds the dashboard budget of 0.5 GiB"):
        bd.check_dashboard(cfg)
    with pytest.raises(ValueError, match="train.steps=100000 exceeds the dashboard budget of 20000 steps"):
        bd.check_dashboard(RunConfig(train=TrainConfig(steps=100_000)))
    monkeypatch.setenv(bd.DASHBOARD_ENV_VAR, "4")
    bd.check_dashboard(cfg)
    bd.check_dashboard(LMConfig.cpu())
    with pytest.raises(ValueError, match="batch_size=1024: .*exceeds the dashboard budget of 4 GiB"):
        bd.check_dashboard(LMConfig.cpu(batch_size=1024))             # ≈ 7 GiB by the estimate


def test_every_preset_and_default_fits_the_cli_budget():
    for cfg in (RunConfig(), LMConfig.cpu(), LMConfig.gpu()):
        bd.check_dashboard(cfg, bd.CLI)
    bd.check_dashboard(RunConfig())
    bd.check_dashboard(LMConfig.cpu())


def test_lm_budget_and_bad_lm_json():
    with pytest.raises(ValueError, match="LMConfig: expected a mapping of fields, got list"):
        LMConfig.from_json("[]")
    with pytest.raises(ValueError, match="LMConfig.moe=3 must be a mapping"):
        LMConfig.from_dict({"moe": 3})
    with pytest.raises(ValueError, match="vocab_size=1000000000: estimated tensor memory"):
        LMConfig(vocab_size=10**9)
    with pytest.raises(ValueError, match="LMConfig.device='cuda:x' must be"):
        LMConfig(device="cuda:x")
    with pytest.raises(ValueError, match="LMConfig.seed=1180591620717411303424 must be in 0..4294967295"):
        LMConfig(seed=2**70)


@pytest.mark.parametrize("d,message", [
    ({"model": None}, "RunConfig.model=None must be a mapping of MoEConfig fields"),
    ({"task": []}, "RunConfig.task=[] must be a mapping of TaskConfig fields"),
    ([], "RunConfig: expected a mapping"),
    ({"model": {"seed": 2**70}}, "MoEConfig.seed=1180591620717411303424 must be in 0..4294967295"),
    ({"train": {"device": "cuda:x"}}, "TrainConfig.device='cuda:x' must be"),
    ({"model": {1: 2}}, "MoEConfig: unknown field(s) [1]"),
])
def test_bad_run_dicts_raise_value_errors_naming_the_field(d, message):
    with pytest.raises(ValueError) as exc:
        RunConfig.from_dict(d)
    assert message in str(exc.value)


# ------------------------------------------------------------------------------------------------ round trips

small = st.integers(1, 16)
finite = st.floats(0, 10, allow_nan=False, allow_infinity=False)
pos = st.floats(1e-3, 10, allow_nan=False, allow_infinity=False)


@st.composite
def moe_configs(draw):
    E = draw(st.integers(1, 16))
    return MoEConfig(n_experts=E, k=draw(st.integers(1, E)), d_model=draw(small), d_hidden=draw(small),
                     expert=draw(st.sampled_from(EXPERTS)), router=draw(st.sampled_from(ROUTERS)),
                     temperature=draw(pos), gate=draw(st.sampled_from(GATES)), aux_weight=draw(finite),
                     z_weight=draw(finite), lf_rate=draw(finite), seed=draw(st.integers(0, bd.MAX_SEED)),
                     arch=draw(st.sampled_from(("moe", "dense", "dense_active"))), mpi_scale=draw(pos),
                     mpi_steps=draw(st.integers(1, 5)), mpi_detach=draw(st.booleans()),
                     kmeans_mode=draw(st.sampled_from(KMEANS_MODES)), kmeans_rate=draw(st.floats(1e-3, 1)),
                     kmeans_normalize=draw(st.booleans()), kmeans_detach=draw(st.booleans()))


@st.composite
def run_configs(draw):
    model = draw(moe_configs())
    task = TaskConfig(d_in=model.d_model, d_out=draw(small), n_clusters=draw(small), cluster_scale=draw(finite),
                      noise=draw(finite), teacher_width=draw(small), shared_teacher=draw(st.booleans()),
                      offset=draw(finite), n_train=draw(st.integers(1, 10**5)), n_probe=draw(st.integers(1, 10**4)))
    train = TrainConfig(steps=draw(st.integers(0, 10**6)), batch_size=draw(st.integers(1, 4096)), lr=draw(pos),
                        weight_decay=draw(finite), schedule=draw(st.sampled_from(("constant", "cosine"))),
                        device=draw(st.sampled_from(("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"))))
    return RunConfig(model, task, train)


@FAST
@given(run_configs())
def test_run_config_round_trips_through_dicts_and_json(cfg):
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for part in (cfg.model, cfg.task, cfg.train):
        assert type(part).from_json(part.to_json()) == part


@FAST
@given(moe_configs(), st.integers(1, 4), st.integers(1, 16), st.integers(0, 1000))
def test_lm_config_round_trips(moe, n_layers, seq_len, seed):
    heads = [h for h in (1, 2, 4) if moe.d_model % h == 0]
    cfg = LMConfig(moe=moe, n_layers=n_layers, n_heads=heads[-1], seq_len=seq_len, seed=seed, vocab_size=64)
    assert LMConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------------------------------ validation

# any JSON-ish value, including the hostile ones: huge ints, NaN, infinities, wrong types, nesting
anything = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)


def _fields(cls):
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", [MoEConfig, TaskConfig, TrainConfig, LMConfig])
def test_any_field_value_is_accepted_or_a_value_error_naming_the_field(cls):
    @FAST
    @given(st.sampled_from(_fields(cls)), anything)
    def check(name, value):
        try:
            cls.from_dict({name: value})
        except ValueError as exc:
            assert name in str(exc), (name, value, str(exc))
    check()


@FAST
@given(st.sampled_from(["model", "task", "train"]), anything)
def test_run_config_sections_of_any_value(section, value):
    try:
        RunConfig.from_dict({section: value})
    except ValueError as exc:
        assert section in str(exc) or "Config" in str(exc)


@FAST
@given(anything)
def test_from_json_of_any_document_is_a_config_or_a_value_error(value):
    for cls in (MoEConfig, RunConfig, LMConfig):
        try:
            cls.from_json(json.dumps(value))
        except ValueError as exc:
            assert cls.__name__ in str(exc) or "Config" in str(exc)
