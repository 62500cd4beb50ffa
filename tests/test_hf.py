"""moewidgets.hf on tiny random Mixtral, Qwen2-MoE, OLMoE and Qwen3-MoE models, against slow obvious oracles:
the model's own router logits, torch.func.jacrev through the HF expert module, the HF experts' outputs, the
block's own output, and the plain geometry functions on the bank view.

Shape legend: B batch, S sequence, T tokens, D model width, E experts, K top-k.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moewidgets.geometry import (bank_jacobian_alignment, expert_jacobians, expert_pca,  # noqa: E402
                                 weighted_expert_spectra)
from moewidgets.geometry.alignment import SwiGLUBankView  # noqa: E402
from moewidgets.hf import (SUPPORTED_FAMILIES, LayerInputs, expert_bank, moe_blocks, probe,  # noqa: E402
                           routed_spectra, trace_hf)
from moewidgets.hf.metrics import alignment_metric  # noqa: E402

VOCAB, D, E, K = 64, 32, 4, 2
FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A tiny random model of ``family`` (2 MoE layers; Qwen3 has a dense layer 1 between them)."""
    common = dict(vocab_size=VOCAB, hidden_size=D, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  num_experts_per_tok=K, initializer_range=0.2)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_hidden_layers=2, intermediate_size=48, num_local_experts=E)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, num_hidden_layers=2, intermediate_size=64,
                                          moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                          num_experts=E, norm_topk_prob=False)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_hidden_layers=2, intermediate_size=24, num_experts=E,
                                       norm_topk_prob=False)
    else:
        cfg = transformers.Qwen3MoeConfig(**common, num_hidden_layers=3, mlp_only_layers=[1], intermediate_size=64,
                                          moe_intermediate_size=24, head_dim=8, num_experts=E, norm_topk_prob=True)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cls = transformers.AutoModelForCausalLM.from_config
    with torch.random.fork_rng():             # HF initialises from the global RNG: keep the caller's untouched
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype).eval()


def token_ids(B: int = 4, S: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def hf_expert(experts, e: int, x_TD: torch.Tensor) -> torch.Tensor:
    """Expert e of the HF module alone, ungated: route every token to e with weight 1."""
    T = x_TD.shape[0]
    return experts(x_TD, torch.full((T, 1), e, dtype=torch.long), torch.ones(T, 1, dtype=x_TD.dtype))


# ------------------------------------------------------------------------------------------------ discovery

@pytest.mark.parametrize("family", FAMILIES)
def test_moe_blocks_finds_each_sparse_block(family):
    model = make_model(family)
    blocks = moe_blocks(model)
    assert list(blocks) == ([0, 2] if family == "qwen3_moe" else [0, 1])      # Qwen3 layer 1 is dense
    renorm = family == "mixtral" or model.config.norm_topk_prob
    for i, b in blocks.items():
        assert b.module is model.model.layers[i].mlp and b.decoder_layer is model.model.layers[i]
        assert (b.n_experts, b.top_k, b.d_model, b.family) == (E, K, D, family)
        assert b.gate == ("renorm" if renorm else "softmax")
        assert (b.shared_expert is not None) == (family == "qwen2_moe")


def test_unsupported_model_raises_listing_families():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng():
        llama = transformers.LlamaForCausalLM(cfg)
    for bad in (llama, torch.nn.Linear(2, 2)):
        for fn in (moe_blocks, lambda m: probe(m, token_ids()), lambda m: trace_hf(m, token_ids())):
            with pytest.raises(ValueError, match="not supported") as err:
                fn(bad)
            assert all(f in str(err.value) for f in SUPPORTED_FAMILIES)


# --------------------------------------------------------------------------------------------------- routing

@pytest.mark.parametrize("family,overrides", [(f, {}) for f in FAMILIES] + [("olmoe", {"norm_topk_prob": True}),
                                                                          ("qwen3_moe", {"norm_topk_prob": False})])
def test_captured_routing_equals_output_router_logits(family, overrides):
    model = make_model(family, **overrides)
    ids_BS = token_ids(2, 12)
    blocks = moe_blocks(model)
    # independent oracle for x_TD: a pre-hook on each block records its input
    seen = {}
    handles = [b.module.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, D)))
               for i, b in blocks.items()]
    try:
        with torch.no_grad():
            out = model(ids_BS, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    traces = trace_hf(model, ids_BS)
    assert list(traces) == list(blocks) and len(out.router_logits) == len(blocks)
    for (i, tr), logits_TE in zip(traces.items(), out.router_logits):
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        top = torch.topk(probs_TE, K, dim=-1)
        gates_TK = top.values / top.values.sum(-1, keepdim=True) if blocks[i].gate == "renorm" else top.values
        assert tr.n_tokens == 24 and tr.n_experts == E and tr.layer == i
        assert torch.equal(tr.idx_TK, top.indices)
        torch.testing.assert_close(tr.gates_TK.float(), gates_TK)
        torch.testing.assert_close(tr.probs_TE, probs_TE)
        torch.testing.assert_close(tr.x_TD, seen[i])


def test_trace_stops_after_last_layer_removes_hooks_and_restores_mode():
    model = make_model("mixtral").train()
    blocks = moe_blocks(model)
    calls = []
    h = blocks[1].router.register_forward_hook(lambda *a: calls.append(1))
    try:
        traces = trace_hf(model, token_ids(), layers=0)
    finally:
        h.remove()
    assert list(traces) == [0] and calls == []                     # layer 1 never ran
    assert model.training and all(m.training for m in model.modules())
    assert all(not b.router._forward_hooks and not b.decoder_layer._forward_hooks for b in blocks.values())


def test_hooks_removed_when_the_forward_raises():
    model = make_model("olmoe")
    blocks = moe_blocks(model)

    def boom(*args):
        raise RuntimeError("boom")
    h = model.model.layers[1].self_attn.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            trace_hf(model, token_ids())
    finally:
        h.remove()
    assert all(not b.router._forward_hooks and not b.decoder_layer._forward_hooks for b in blocks.values())
    assert not model.training


def test_attention_mask_drops_padded_positions():
    model = make_model("qwen3_moe")
    ids_BS = token_ids(2, 10)
    mask_BS = torch.ones(2, 10, dtype=torch.long)
    mask_BS[1, 6:] = 0                                  # right padding: causal attention leaves the rest unchanged
    full, masked = trace_hf(model, ids_BS), trace_hf(model, ids_BS, attention_mask=mask_BS)
    keep_T = mask_BS.reshape(-1).bool()
    for i in full:
        assert masked[i].n_tokens == 16
        torch.testing.assert_close(masked[i].x_TD, full[i].x_TD[keep_T])
        assert torch.equal(masked[i].idx_TK, full[i].idx_TK[keep_T])


# ------------------------------------------------------------------------------------------------ bank view

@pytest.mark.parametrize("family", FAMILIES)
def test_bank_view_outputs_equal_hf_experts_and_block(family):
    model = make_model(family)                 # the default experts implementation (grouped_mm), float32
    x_TD = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    for i, b in moe_blocks(model).items():
        bank = expert_bank(b.experts)
        assert bank.w_gate_EFD.data_ptr() == b.experts.gate_up_proj.data_ptr()          # views, no copies
        assert bank.w_out_EDF.data_ptr() == b.experts.down_proj.data_ptr()
        with torch.no_grad():
            y_TED = bank.all_outputs(x_TD)
            for e in range(E):
                torch.testing.assert_close(y_TED[:, e], hf_expert(b.experts, e, x_TD), atol=1e-5, rtol=1e-4)
            # the whole block = Σ_k g_k E_{idx_k}(x) (+ sigmoid(w_s·x) · shared(x) for Qwen2-MoE)
            tr = trace_hf(model, token_ids(1, 7), layers=i)[i]
            y_ref = b.module(tr.x_TD[None])[0]
            y_TD = torch.einsum("tk,tkd->td", tr.gates_TK.float(), bank.all_outputs(tr.x_TD)[
                torch.arange(tr.n_tokens)[:, None], tr.idx_TK])
            if b.shared_expert is not None:
                shared = b.shared_bank()
                y_TD = y_TD + torch.sigmoid(b.shared_expert_gate(tr.x_TD)) * shared.all_outputs(tr.x_TD)[:, 0]
            torch.testing.assert_close(y_TD, y_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_view_jacobian_equals_jacrev_through_hf_experts(family):
    """The closed-form Jacobian of the view against autograd through the HF module: a gate/up mix-up fails."""
    model = make_model(family, dtype=torch.float64)
    model.config._experts_implementation = "eager"            # grouped_mm has no float64 kernel on CPU
    X_ND = torch.randn(2, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for b in moe_blocks(model).values():
        bank = expert_bank(b.experts)
        J_ENDD = expert_jacobians(bank, X_ND)
        for e in range(E):
            for n in range(X_ND.shape[0]):
                J_ref = torch.func.jacrev(lambda x_D: hf_expert(b.experts, e, x_D[None])[0])(X_ND[n])
                torch.testing.assert_close(J_ENDD[e, n], J_ref, atol=1e-10, rtol=1e-8)
        swapped = SwiGLUBankView(bank.w_up_EFD, bank.w_gate_EFD, bank.w_out_EDF)       # the mix-up, caught
        assert not torch.allclose(expert_jacobians(swapped, X_ND), J_ENDD, atol=1e-6)
        if b.shared_expert is not None:
            J_s = expert_jacobians(b.shared_bank(), X_ND)[0]
            for n in range(X_ND.shape[0]):
                torch.testing.assert_close(J_s[n], torch.func.jacrev(b.shared_expert)(X_ND[n]), atol=1e-10,
                                           rtol=1e-8)


# ----------------------------------------------------------------------------------------------------- probe

FINITE = ["max_vio", "aux_loss", "entropy", "spectra_sigma1", "spectra_stable_rank", "spectra_decay_alpha",
          "spectra_erank", "alignment_mean_abs", "alignment_null_level", "alignment_ceiling",
          "pca_erank_entropy", "pca_erank_participation", "pca_k90", "pca_n_eff_min"]


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_runs_and_returns_finite_numbers(family):
    model = make_model(family)
    res = probe(model, token_ids(), metric_options={"alignment": {"min_points": 4}})
    assert res.family == family and res.n_tokens == 64 and list(res.layers) == list(moe_blocks(model))
    for i, lp in res.layers.items():
        row = lp.summary()
        assert row["layer"] == i and row["n_tokens"] == 64
        bad = {k: row[k] for k in FINITE if not math.isfinite(row[k])}
        assert not bad, bad
        assert lp["spectra"].sigma1.dtype == torch.float32 and lp["spectra"].sigma1.device.type == "cpu"
        assert lp["alignment"].matrix.shape == (E, E) and lp["pca"].pca.eigenvalues.shape == (E, D)
        assert abs(float(lp.routing.loads.sum()) - 1) < 1e-6
        if family == "qwen2_moe":
            sh = lp.shared
            assert sh.d_hidden == 40 and sh.cos_routed.shape == (E,) and 0 < sh.gate_mean < 1
            assert math.isfinite(row["shared_expert_sigma1"])
            assert math.isfinite(row["shared_expert_cos_routed_mean_abs"])
        else:
            assert lp.shared is None and not any(k.startswith("shared_expert_") for k in row)


@pytest.mark.parametrize("weights", ["gates", "membership"])
def test_probe_metrics_equal_plain_geometry_on_the_view(weights):
    model = make_model("olmoe")
    res = probe(model, token_ids(), metrics=["spectra", "pca"], weights=weights,
                metric_options={"spectra": {"max_points": None, "keep_sv": True}, "pca": {"n_components": None}})
    for i, b in moe_blocks(model).items():
        tr = res[i].trace
        w_NE = (tr.gate_matrix() if weights == "gates" else tr.membership()).float()
        bank = expert_bank(b.experts)
        ref = weighted_expert_spectra(expert_jacobians(bank, tr.x_TD), w_NE)
        got = res[i]["spectra"]
        for name in ("sigma1", "stable_rank", "erank", "decay_alpha"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=1e-4, equal_nan=True)
        torch.testing.assert_close(got.sv, ref.sv, atol=1e-5, rtol=1e-4, equal_nan=True)
        pca_ref = expert_pca(tr.x_TD, w_NE)
        torch.testing.assert_close(res[i]["pca"].pca.eigenvalues, pca_ref.eigenvalues, atol=1e-5, rtol=1e-4)


def test_alignment_metric_equals_bank_jacobian_alignment():
    model = make_model("mixtral")
    tr = trace_hf(model, token_ids(), layers=1)[1]
    block = moe_blocks(model)[1]
    bank, w_NE = expert_bank(block.experts), tr.gate_matrix().float()
    inputs = LayerInputs(layer=1, block=block, bank=bank, trace=tr, x_ND=tr.x_TD.float(), weights_NE=w_NE,
                         weights="gates", seed=123)
    got = alignment_metric(inputs, min_points=4, keep_mean_jacobians=True)
    ref = bank_jacobian_alignment(bank, tr.x_TD, w_NE, generator=torch.Generator().manual_seed(123), min_points=4)
    torch.testing.assert_close(got.matrix, ref.matrix, atol=1e-5, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(got.mean_jacobians, ref.mean_jacobians, atol=1e-6, rtol=1e-4, equal_nan=True)
    assert abs(got.ceiling - ref.ceiling) < 1e-5 and got.null_level == ref.null_level


def test_probe_bf16_model_uses_float32_jacobians():
    model = make_model("qwen3_moe", dtype=torch.bfloat16)
    res = probe(model, token_ids(), layers=[2], metrics=["spectra"])
    sp = res[2]["spectra"]
    assert sp.sigma1.dtype == torch.float32 and bool(torch.isfinite(sp.sigma1).all())
    b = moe_blocks(model)[2]
    tr = res[2].trace
    bank32 = SwiGLUBankView(*(w.float() for w in (b.bank().w_gate_EFD, b.bank().w_up_EFD, b.bank().w_out_EDF)))
    ref = weighted_expert_spectra(expert_jacobians(bank32, tr.x_TD.float()), tr.gate_matrix().float())
    torch.testing.assert_close(sp.sigma1, ref.sigma1, atol=1e-5, rtol=1e-4)


def test_routed_spectra_chunks_match_one_shot():
    b = moe_blocks(make_model("mixtral"))[0]
    bank = expert_bank(b.experts)
    X = torch.randn(20, D, generator=torch.Generator().manual_seed(4))
    w = torch.rand(20, E, generator=torch.Generator().manual_seed(5)) * (torch.rand(20, E) > 0.5)
    ref = weighted_expert_spectra(expert_jacobians(bank, X), w)
    got = routed_spectra(bank, X, w, max_elements=3 * D * D)          # 3 points per chunk
    torch.testing.assert_close(got.sigma1, ref.sigma1, equal_nan=True)
    torch.testing.assert_close(got.erank, ref.erank, equal_nan=True)


def test_probe_is_seeded_and_independent_of_metric_selection():
    model = make_model("mixtral")
    opts = {"spectra": {"max_points": 20}, "alignment": {"min_points": 4}}
    a = probe(model, token_ids(), metrics=["spectra", "alignment"], generator=7, metric_options=opts)
    b = probe(model, token_ids(), metrics=["alignment"], generator=7, metric_options={"alignment": {"min_points": 4}})
    c = probe(model, token_ids(), layers=[1], metrics=["spectra", "alignment"], generator=7, metric_options=opts)
    assert a[1]["alignment"].ceiling == b[1]["alignment"].ceiling == c[1]["alignment"].ceiling
    torch.testing.assert_close(a[1]["spectra"].sigma1, c[1]["spectra"].sigma1, equal_nan=True)


@pytest.mark.parametrize("where", ["cpu", "disk offload"])
def test_device_map(tmp_path, where):
    """Loaded through accelerate with device_map="cpu", or with layer 0 offloaded to disk (weights on 'meta'
    until a forward or the probe brings them in): the same numbers as the model in memory."""
    pytest.importorskip("accelerate")
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "model")
    if where == "cpu":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map="cpu")
    else:
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                      "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                                   offload_folder=tmp_path / "offload")
        assert loaded.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    opts = {"alignment": {"min_points": 4}, "spectra": {"max_points": 16}}
    ref, got = probe(model, token_ids(), generator=0, metric_options=opts), \
        probe(loaded, token_ids(), generator=0, metric_options=opts)
    for i in ref.layers:
        r, g = ref[i].summary(), got[i].summary()
        assert r.keys() == g.keys()
        for k, v in r.items():
            assert v == g[k] if isinstance(v, str) else math.isclose(v, g[k], rel_tol=1e-4, abs_tol=1e-6), k
    if where != "cpu":
        tr = trace_hf(loaded, token_ids(), layers=0)[0]         # the forward stops right after the offloaded layer
        assert torch.equal(tr.idx_TK, ref[0].trace.idx_TK)
        assert loaded.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"     # offloaded again


def test_bad_arguments_raise_before_work():
    model = make_model("mixtral")
    ids = token_ids()
    cases = [
        (dict(layers=[5]), "MoE layers are \\[0, 1\\]"),
        (dict(layers=[]), "empty"),
        (dict(layers=["0"]), "list of ints"),
        (dict(metrics=["nope"]), "choose from"),
        (dict(weights="soft"), "weights='soft'"),
        (dict(metric_options={"spectra": {"bogus": 1}}), "does not fit spectra"),
        (dict(metrics=["pca"], metric_options={"spectra": {}}), "not among the metrics"),
        (dict(metric_options={"spectra": {"max_points": 0}}), "max_points=0"),
        (dict(metric_options={"alignment": {"min_points": -1}}), "min_points=-1"),
        (dict(metric_options={"pca": {"fraction": 1.5}}), "fraction=1.5"),
    ]
    calls = []
    h = moe_blocks(model)[0].router.register_forward_hook(lambda *a: calls.append(1))
    try:
        for kwargs, msg in cases:
            with pytest.raises(ValueError, match=msg):
                probe(model, ids, **kwargs)
    finally:
        h.remove()
    assert calls == []                                   # refused before the forward pass
    with pytest.raises(ValueError, match="vocab_size"):
        probe(model, torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="integer tensor"):
        trace_hf(model, ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        trace_hf(model, ids, attention_mask=torch.ones(3))
    experts = moe_blocks(model)[0].experts
    experts.is_transposed = True
    with pytest.raises(ValueError, match="unsupported layout"):
        expert_bank(experts)


def test_import_moewidgets_does_not_import_transformers_and_hf_says_how_to_install():
    code = ("import sys, moewidgets, moewidgets.geometry\n"
            "print('transformers' in sys.modules)\n"
            "sys.modules['transformers'] = None          # as if the extra were not installed\n"
            "try:\n"
            "    import moewidgets.hf\n"
            "except ImportError as err:\n"
            "    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "False"
    assert 'pip install "moewidgets[hf]"' in out.stdout


def test_subspaces_metric_equals_the_geometry_functions():
    """The registry's Grassmann metric is the chapter-2 geometry on the traced block inputs, by name only."""
    from moewidgets.geometry.subspaces import compare_subspaces, routed_subspaces
    from moewidgets.hf import probe
    model = make_model("mixtral")
    ids = token_ids(B=8, S=32)
    res = probe(model, ids, layers=[0], metrics="subspaces", metric_options={"subspaces": {"rank": 2, "n_draws": 4,
                                                                                             "n_splits": 3}})
    lp = res[0]
    got = lp["subspaces"]
    trace = lp.trace
    w_NE = trace.gate_matrix().float()
    want = compare_subspaces(routed_subspaces(trace.x_TD.float(), w_NE, rank=2, space="inputs"),
                             generator=torch.Generator().manual_seed(0), n_draws=4, n_splits=3)
    assert got.n_pairs == want.n_pairs and got.n_pairs > 0
    assert math.isclose(got.between_mean, want.between_mean, rel_tol=1e-5)
    assert 0.0 <= got.between_mean <= 1.0
    assert set(lp.summary()) >= {"subspaces_grassmann_mean", "subspaces_grassmann_floor"}
    assert "subspaces" not in probe(model, ids, layers=[0]).metrics          # not a default: needs many tokens
    with pytest.raises(ValueError, match="rank=0 must be a positive integer"):
        probe(model, ids, metrics="subspaces", metric_options={"subspaces": {"rank": 0}})
