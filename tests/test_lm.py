"""The MoE transformer LM and its trainer: causality, per-token oracles, traces, determinism, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F_

from moewidgets.balance import loss_free_update
from moewidgets.config import MoEConfig
from moewidgets.lm import LMConfig, LMTrainer, build_lm, trace_lm
from moewidgets.train import NonFiniteLossError, torch_threads
from moewidgets.wikitext import load_wikitext, unigram_perplexity

from test_wikitext import needs_real_data, real_data_dir

V = 37


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two spin-waiting threads cost ~7×."""
    with torch_threads(1):
        yield


def tiny(**changes) -> LMConfig:
    moe = changes.pop("moe", {})
    base = LMConfig(moe=MoEConfig(n_experts=4, k=2, d_model=16, d_hidden=24), n_layers=2, n_heads=2, seq_len=8,
                    vocab_size=V, batch_size=4, steps=10, device="cpu", warmup=0)
    return base.replace(**changes).with_moe(**moe)


def ids(B=2, S=8, seed=0):
    return torch.randint(V, (B, S), generator=torch.Generator().manual_seed(seed))


def built(cfg, **kw):
    """build_lm, then one training forward without gradient (initialises K-Means centroids; a no-op for the
    other routers' weights), then eval mode so stateful routers stay put during a test."""
    model = build_lm(cfg, V, **kw)
    with torch.no_grad():
        model.train()(ids(B=4, seed=99))
    return model.eval()


def reference_logits(model, ids_BS):
    """The model written out block by block, with each FFN as its per-token loop (MoELayer.per_token_reference)."""
    B, S = ids_BS.shape
    x = model.tok_emb_VD[ids_BS]
    if model.pos_emb_SD is not None:
        x = x + model.pos_emb_SD[:S]
    inputs = []
    for blk in model.blocks:
        h = x + blk.attn(blk.norm1(x))
        u = blk.norm2(h).reshape(B * S, -1)
        inputs.append(u)
        y = blk.ffn.per_token_reference(u) if hasattr(blk.ffn, "route") else blk.ffn(u).y_TD
        x = h + y.view(B, S, -1)
    head = model.tok_emb_VD if model.w_head_VD is None else model.w_head_VD
    return F_.linear(model.norm_f(x), head, model.b_head_V), inputs


ARCHS = [dict(), dict(k=1), dict(k=4), dict(gate="renorm"), dict(expert="swiglu"), dict(router="mpi"),
         dict(router="kmeans"), dict(temperature=0.5, lf_rate=0.1), dict(arch="dense"), dict(arch="dense_active")]


# ------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("moe", ARCHS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "top2")
@pytest.mark.parametrize("pos, norm", [("learned", "rmsnorm"), ("rope", "layernorm")])
def test_causal(moe, pos, norm):
    model = built(tiny(moe=moe, pos=pos, norm=norm))
    a = ids(seed=1)
    for j in (3, 7):
        b = a.clone()
        b[:, j] = (b[:, j] + 1) % V
        la, lb = model(a).logits_BSV, model(b).logits_BSV
        torch.testing.assert_close(la[:, :j], lb[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(la[:, j:], lb[:, j:])              # the change is seen from position j on


@pytest.mark.parametrize("moe", ARCHS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "top2")
@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("pos, tie", [("learned", True), ("rope", False)])
def test_forward_equals_per_token_reference(moe, dispatch, pos, tie):
    cfg = tiny(moe=moe, pos=pos, tie_embeddings=tie)
    model = built(cfg, dispatch=dispatch)
    for layer in model.moe_layers():                                   # a non-zero loss-free bias, when it is on
        if hasattr(layer, "lf_bias_E"):
            layer.lf_bias_E.copy_(torch.tensor([0.3, -0.1, 0.0, -0.2]))
    x = ids(B=3, seed=2)
    got = model(x).logits_BSV
    want, _ = reference_logits(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_aux_loss_is_the_sum_over_layers():
    model = build_lm(tiny(moe=dict(aux_weight=0.3, z_weight=0.01)), V)
    out = model(ids())
    per_layer = sum(r.aux_loss for r in out.routings)
    assert float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.aux_loss, per_layer)


@pytest.mark.parametrize("arch, width", [("dense", 4 * 24), ("dense_active", 2 * 24)])
def test_dense_baselines(arch, width):
    model = build_lm(tiny(moe=dict(arch=arch)), V)
    for layer in model.moe_layers():
        assert layer.experts.n_experts == 1 and layer.experts.d_hidden == width
    out = model(ids())
    assert out.logits_BSV.shape == (2, 8, V) and out.routings == [None, None] and float(out.aux_loss) == 0.0
    traces = trace_lm(model, ids())
    assert [t.n_experts for t in traces] == [1, 1] and all(bool((t.gates_TK == 1).all()) for t in traces)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_lm(tiny(), V), build_lm(tiny(), V), build_lm(tiny(seed=1), V)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.blocks[0].ffn.experts.w_in_EFD, c.blocks[0].ffn.experts.w_in_EFD)


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="sequence length 9 must be <= seq_len=8"):
        build_lm(tiny(), V)(ids(S=9))


# ------------------------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("moe", [dict(), dict(k=4), dict(router="mpi", k=1), dict(router="kmeans"), dict(lf_rate=0.1)],
                         ids=["top2", "soft", "mpi-top1", "kmeans", "loss-free"])
def test_trace_lm_equals_the_layers_routing(moe):
    model = built(tiny(moe=moe))
    model.train()
    x = ids(B=3, seed=3)
    state = [b.clone() for b in model.buffers()]
    traces = trace_lm(model, x, with_expert_outputs=True)
    assert model.training                                              # mode restored
    assert all(torch.equal(a, b) for a, b in zip(state, model.buffers()))   # no router state moved
    assert all(len(layer._forward_hooks) == 0 for layer in model.moe_layers())   # hooks removed
    with torch.no_grad():
        _, inputs = reference_logits(model.eval(), x)
    for i, (t, layer, u) in enumerate(zip(traces, model.moe_layers(), inputs)):
        assert t.layer == i and t.n_experts == 4
        torch.testing.assert_close(t.x_TD, u, rtol=1e-6, atol=1e-6)    # the post-norm2 hidden state, (b, s) order
        r = layer.route(t.x_TD)
        assert torch.equal(t.idx_TK, r.idx_TK)
        torch.testing.assert_close(t.gates_TK, r.gates_TK.detach())
        torch.testing.assert_close(t.probs_TE, r.probs_TE.detach())
        for tok in (0, 5, 23):
            for s in range(t.k):
                e = int(t.idx_TK[tok, s])
                want = layer.experts.expert_output(e, t.x_TD[tok:tok + 1])[0].detach()
                torch.testing.assert_close(t.expert_out_TKD[tok, s], want, rtol=1e-5, atol=1e-6)


def test_trace_lm_accepts_one_sequence_and_rejects_bad_shapes():
    model = build_lm(tiny(), V)
    assert trace_lm(model, ids()[0])[0].x_TD.shape == (8, 16)
    with pytest.raises(ValueError, match="tokens must be"):
        trace_lm(model, torch.zeros(1, 2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("changes, match", [
    (dict(n_heads=3), "LMConfig.n_heads=3 must divide moe.d_model=64"),
    (dict(n_layers=0), "LMConfig.n_layers=0 must be in 1..64"),
    (dict(seq_len=0), "LMConfig.seq_len=0 must be >= 1"),
    (dict(vocab_size=1), "LMConfig.vocab_size=1 must be >= 2"),
    (dict(norm="batchnorm"), "LMConfig.norm='batchnorm' must be one of 'rmsnorm', 'layernorm'"),
    (dict(pos="alibi"), "LMConfig.pos='alibi' must be one of 'learned', 'rope'"),
    (dict(lr=0.0), "LMConfig.lr=0.0 must be > 0"),
    (dict(lr=float("inf")), "LMConfig.lr=inf must be a finite number"),
    (dict(schedule="linear"), "LMConfig.schedule='linear' must be one of"),
    (dict(device="tpu"), "LMConfig.device='tpu' must be"),
    (dict(batch_size=2.0), "LMConfig.batch_size=2.0 must be an integer"),
    (dict(tie_embeddings=1), "LMConfig.tie_embeddings=1 must be True or False"),
    (dict(moe={"k": 2}), "LMConfig.moe={'k': 2} must be a MoEConfig"),
    (dict(moe=MoEConfig(d_model=6), n_heads=2, pos="rope"), "even head width"),
])
def test_bad_config_values(changes, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        LMConfig(**changes)


def test_config_json_round_trip_presets_and_seed():
    for cfg in (LMConfig.cpu(), LMConfig.gpu(), tiny(moe=dict(router="mpi", k=1), pos="rope")):
        assert LMConfig.from_json(cfg.to_json()) == cfg
    gpu = LMConfig.gpu()
    assert (gpu.moe.d_model, gpu.moe.d_hidden, gpu.moe.n_experts, gpu.moe.k, gpu.n_layers, gpu.n_heads,
            gpu.seq_len, gpu.batch_size, gpu.steps, gpu.lr) == (256, 256, 8, 2, 3, 4, 128, 32, 5000, 3e-4)
    assert LMConfig(seed=3).moe.seed == 3 and LMConfig().replace(seed=5).moe.seed == 5   # one seed per run
    assert LMConfig.cpu().with_moe(k=8).moe.is_soft
    with pytest.raises(ValueError, match="unknown field"):
        LMConfig.from_dict({"layers": 3})


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def wt():
    if real_data_dir() is None:
        pytest.skip("WikiText-2 not found (set MOEWIDGETS_DATA)")
    return load_wikitext(real_data_dir(), vocab_size=512, verbose=False)


def small(**changes):
    return tiny(**{**dict(vocab_size=512, seq_len=16, batch_size=8, steps=40, lr=1e-2), **changes})


@needs_real_data
def test_trainer_is_deterministic_and_seeded(wt):
    runs = []
    for seed in (0, 0, 1):
        tr = LMTrainer.from_config(small(seed=seed, steps=6, moe=dict(lf_rate=0.01)), wt)
        tr.step(4)
        tr.step(4)                                                      # capped at steps=6
        runs.append(tr)
    a, b, c = runs
    assert a.steps_done == 6 and a.history.step == [1, 2, 3, 4, 5, 6] and a.done
    assert a.history.loss == b.history.loss and a.history.layer_load == b.history.layer_load
    assert a.history.loss != c.history.loss


@needs_real_data
def test_a_few_steps_reduce_the_loss(wt):
    tr = LMTrainer.from_config(small(unigram_init=False), wt)
    before = tr.evaluate(max_tokens=2000)
    seen = []
    tr.run(callback=lambda t: seen.append(t.steps_done), every=15)
    after = tr.evaluate(max_tokens=2000)
    assert seen == [15, 30, 40]
    assert before.loss == pytest.approx(math.log(512), abs=0.3)       # untrained: near uniform over V
    assert after.loss < before.loss - 1.0
    assert sum(tr.history.loss[-5:]) / 5 < tr.history.loss[0] - 1.0
    assert "step 40/40" in tr.progress()


@needs_real_data
def test_unigram_init_starts_at_the_unigram_baseline(wt):
    tr = LMTrainer.from_config(small(), wt)
    ev = tr.evaluate(max_tokens=3000)
    uni = unigram_perplexity(wt.train_ids, wt.eval_ids[:3001], wt.vocab_size)
    assert ev.ppl == pytest.approx(uni, rel=0.05)


@needs_real_data
def test_after_step_gets_each_layers_own_counts(wt):
    rate = 0.05
    tr = LMTrainer.from_config(small(steps=2, moe=dict(lf_rate=rate, aux_weight=0.01)), wt)
    layers = tr.model.moe_layers()
    calls = {i: [] for i in range(2)}
    for i, layer in enumerate(layers):
        orig = layer.after_step
        layer.after_step = (lambda f, i: lambda c: (calls[i].append(c.clone()), f(c)))(orig, i)
    T = 8 * 16
    for step in (1, 2):
        tr.step(1)
        for i in range(2):
            assert len(calls[i]) == step and float(calls[i][-1].sum()) == T * 2     # T tokens × k slots
            torch.testing.assert_close(torch.tensor(tr.history.layer_load[-1][i]), calls[i][-1] / T / 2)
            replay = torch.zeros(4)                                  # the bias the recorded counts imply
            for c in calls[i]:
                loss_free_update(replay, c, rate)
            torch.testing.assert_close(layers[i].lf_bias_E, replay)
        if step == 1:
            assert all(float(layer.lf_bias_E.abs().sum()) > 0 for layer in layers)
    assert calls[0][-1].tolist() != calls[1][-1].tolist()            # each layer its own counts
    assert all(a > 0 for a in tr.history.aux)


@needs_real_data
def test_non_finite_loss_stops_before_the_update(wt):
    tr = LMTrainer.from_config(small(), wt)
    tr.step(1)
    with torch.no_grad():
        tr.model.blocks[0].attn.w_o_DD[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        tr.step(1)
    assert tr.steps_done == 1 and len(tr.history) == 1
    for n, p in tr.model.named_parameters():
        assert torch.equal(torch.nan_to_num(p, nan=7.0), torch.nan_to_num(before[n], nan=7.0)), n


@pytest.fixture(scope="module")
def fake_wt(tmp_path_factory):
    d = tmp_path_factory.mktemp("wikitext")
    (d / "valid.txt").write_text("the cat sat on the mat\n" * 20)
    (d / "test.txt").write_text("the cat\n")
    return load_wikitext(d, verbose=False)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule(fake_wt, schedule):
    tr = LMTrainer.from_config(tiny(steps=100, warmup=10, lr=1.0, schedule=schedule), fake_wt)
    assert tr.lr_at(0) == pytest.approx(0.1) and tr.lr_at(9) == pytest.approx(1.0)
    assert tr.lr_at(10) == pytest.approx(1.0)
    if schedule == "cosine":
        assert tr.lr_at(55) == pytest.approx(0.5)
        assert tr.lr_at(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    else:
        assert tr.lr_at(55) == tr.lr_at(99) == 1.0
    tr.step(12)
    assert tr.history.lr == [tr.lr_at(i) for i in range(12)]


def test_evaluate_scores_every_next_token_once(tmp_path):
    (tmp_path / "valid.txt").write_text("a b c d e f g h i j\n" * 5)
    (tmp_path / "test.txt").write_text("a b c d e f g h i\nb c d e f g h\n")     # 18 tokens: 17 targets
    tr = LMTrainer.from_config(tiny(vocab_size=64), data_dir=tmp_path, verbose=False)
    stream = tr.data.eval_ids
    model = tr.model.eval()
    with torch.no_grad():                                              # windows [0:8], [8:16], then [16:17]
        nll = 0.0
        for lo, hi in ((0, 8), (8, 16), (16, 17)):
            logits = model(stream[lo:hi].view(1, -1)).logits_BSV[0]
            nll += float(F_.cross_entropy(logits, stream[lo + 1:hi + 1], reduction="sum"))
    ev = tr.evaluate()
    assert ev.n_targets == 17 and ev.loss == pytest.approx(nll / 17, rel=1e-6)
    assert ev.ppl == pytest.approx(math.exp(nll / 17), rel=1e-6)
    assert tr.evaluate(max_tokens=8).n_targets == 8


def test_trainer_rejects_a_too_short_stream(tmp_path):
    (tmp_path / "valid.txt").write_text("a b\n")
    (tmp_path / "test.txt").write_text("a\n")
    with pytest.raises(ValueError, match="needs at least seq_len"):
        LMTrainer.from_config(tiny(), data_dir=tmp_path, verbose=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(fake_wt):
    losses = []
    for device in ("cpu", "cuda"):
        tr = LMTrainer.from_config(tiny(device=device, steps=3), fake_wt)
        tr.step(3)
        assert tr.model.tok_emb_VD.device.type == device
        losses.append(tr.history.loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
