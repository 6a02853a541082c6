"""The prisms on Gemma 4 (the tiny preset with every feature on): w-gain norms frozen like every norm, the
layer_scalars folded into every part's path (the residual prism still sums to the pre-cap logits), the
per-layer-input term a part of its own and split into its token-identity and embedding-linear pieces, the MoE
split into the dense branch and each selected expert (and an expert into its neurons), and head x source through
a KV-sharing consumer pulled back to the PRODUCER layer's residual at the source, chaining from there. Every
level exact in float64 and float32, both on prompts, targets and picks that hypothesis draws."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prisms import assert_exact

import refprism
from refprism import prisms as P


@pytest.fixture(scope="module")
def g4(checkpoint):
    d = checkpoint("tiny-gemma4")
    return {"float64": refprism.load(d, dtype="float64"), "float32": refprism.load(d, dtype="float32")}


def _every_level(model, run, r, picks, rel):
    cfg = model.config
    raw = run.record["logits_uncapped"]
    ids, coef = r.targets.coefficients(model.dtype)
    np.testing.assert_array_equal(r.whole, coef @ raw[r.position, ids])
    res = P.residual_prism(r)
    assert_exact(res, rel)
    assert res.labels[:4] == ["embed", "L0.attn", "L0.mlp", "L0.ple"]
    tol = dict(rtol=100 * rel, atol=1e-6 if rel > 1e-8 else 1e-13)
    for l in range(cfg.n_layers):
        att, mlp, moe, ple = P.attention_prism(r, l), P.mlp_prism(r, l), P.moe_prism(r, l), P.ple_prism(r, l)
        for split in (att, mlp, moe, ple):
            assert_exact(split, rel)
        np.testing.assert_allclose(att.whole, res.term(f"L{l}.attn"), **tol)
        np.testing.assert_allclose(mlp.whole, res.term(f"L{l}.mlp"), **tol)
        np.testing.assert_allclose(moe.whole, res.term(f"L{l}.mlp"), **tol)
        np.testing.assert_allclose(ple.whole, res.term(f"L{l}.ple"), **tol)
        chosen = run.record[f"blocks.{l}.moe.topk.index"][r.position]
        assert moe.labels == [f"L{l}.dense"] + [f"L{l}E{int(e)}" for e in chosen]
        e = int(chosen[picks[0] % len(chosen)])
        ex = P.expert_prism(r, l, e)
        assert_exact(ex, rel)
        np.testing.assert_allclose(ex.whole, moe.term(f"L{l}E{e}"), **tol)
        assert len(ex.labels) == cfg.d_expert
    p = r.position
    for l in (cfg.n_layers - 1, cfg.n_layers - 2, 2):  # consumers 6 (full) and 5 (sliding), producer-side 2
        h, s = picks[1] % cfg.n_heads, picks[2] % (p + 1)
        r1 = P.through_head(r, l, h, s)
        np.testing.assert_allclose(r1.whole, P.attention_prism(r, l).term(f"L{l}H{h}.src{s}"), **tol)
        assert r1.site == 2 * cfg.kv_source(l) and r1.position == s
        assert_exact(P.residual_prism(r1), rel)
        deeper = cfg.kv_source(l)
        if deeper > 0:  # and on, from the producer's residual
            j = picks[3] % deeper
            r2 = P.through_neuron(r1, j, picks[4] % cfg.mlp_width_of(j))
            np.testing.assert_allclose(r2.whole, P.mlp_prism(r1, j).term(r2.path[-1]), **tol)
            assert_exact(P.residual_prism(r2), rel)
            assert_exact(P.attention_prism(r2, 0), rel)


# A prompt (after BOS), targets, how many of them get a versus token, and six picks (expert, head, source, layer,
# neuron, readout position), as both tests below draw them
_PROMPTS = (st.lists(st.integers(0, 511), min_size=1, max_size=12),
            st.lists(st.integers(0, 511), min_size=1, max_size=3, unique=True), st.integers(0, 2),
            st.lists(st.integers(0, 10**6), min_size=6, max_size=6))


def _readout(model, ids, targets, n_versus, picks):
    run = model.run([2] + ids)
    p = picks[5] % len(run.tokens)
    versus = [f"#{(t + 7) % 512}" for t in targets[:n_versus] if (t + 7) % 512 not in targets]
    return run, P.logits_readout(model, run, [f"#{t}" for t in targets], position=p, versus=versus)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(*_PROMPTS)
def test_every_level_is_exact_on_gemma4_float64(g4, ids, targets, n_versus, picks):
    model = g4["float64"]
    run, r = _readout(model, ids, targets, n_versus, picks)
    _every_level(model, run, r, picks, 1e-10)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(*_PROMPTS)
def test_every_level_is_exact_on_gemma4_float32(g4, ids, targets, n_versus, picks):
    """float32: each Split meets its stated float32 tolerance (prisms.TOLERANCE), the wholes agree to float32."""
    model = g4["float32"]
    run, r = _readout(model, ids, targets, n_versus, picks)
    assert run.record["logits"].dtype == np.float32 and r.u.dtype == np.float32
    _every_level(model, run, r, picks, 1e-4)


def test_layer_scalars_are_folded_into_every_part(g4):
    """Without layer_scale the parts would not sum to the logits: the scalars are random (not 1) and the
    embedding carries the product of all seven."""
    model = g4["float64"]
    run = model.run(np.arange(3, 14))
    r = P.logits_readout(model, run, ["#11"])
    res = P.residual_prism(r)
    lam = np.prod([model.params.get(l, "layer_scalar")[0] for l in range(model.config.n_layers)])
    assert abs(lam - 1) > 0.05
    np.testing.assert_allclose(res.term("embed"), r.value_of(run.record["embed"][-1]) * lam, rtol=1e-12)
    unscaled = r.value_of(np.stack([run.record["embed"][-1]] + [run.record[f"blocks.{l}.{k}.out"][-1]
                                    for l in range(7) for k in ("attn", "mlp", "ple")])).sum(axis=0)
    assert np.abs(unscaled - r.whole).max() > 1e-3


def test_ple_pieces_are_the_token_and_the_embedding(g4):
    """The token-identity piece does not change when the rest of the prompt (hence the embedding-linear piece's
    neighbours, the gate) stays and only the per-layer table row is what it is: it equals the piece computed
    from E_ple directly, and the embedding piece from x_0 W_ple_model directly."""
    model = g4["float64"]
    run = model.run([2, 40, 41, 42])
    r = P.logits_readout(model, run, ["#9"])
    rec, l, p = run.record, 3, 3
    split = P.ple_prism(r, l)
    g = refprism.gemma.ops.gelu_tanh(rec[f"blocks.{l}.ple.gate"][p])
    u = P.through_post_norm(r, l, "ple")
    Wp = model.params.get(l, "W_ple_proj")
    token = model.params.ple_rows([42])[0, l] * 4.0 / np.sqrt(2)  # sqrt(P) = 4
    model_proj = rec["embed"][p] @ model.params.ple_model()[:, l] / 8.0  # sqrt(D) = 8
    s = np.sqrt(np.mean(model_proj ** 2) + model.config.rms_norm_eps)
    embed = model_proj / s * model.params.ple_norm / np.sqrt(2)
    np.testing.assert_allclose(split.term(f"L{l}.ple.token"), (g * token) @ Wp @ u.T, rtol=1e-12)
    np.testing.assert_allclose(split.term(f"L{l}.ple.embed"), (g * embed) @ Wp @ u.T, rtol=1e-12)


def test_moe_and_ple_prisms_refuse_models_without_them(checkpoint):
    from refprism.errors import InputError

    model = refprism.load(checkpoint("tiny-gemma4", enable_moe_block=False, hidden_size_per_layer_input=0))
    run = model.run([2, 5, 6])
    r = P.logits_readout(model, run, ["#9"])
    with pytest.raises(InputError, match="mixture-of-experts"):
        P.moe_prism(r, 0)
    with pytest.raises(InputError, match="per-layer embeddings"):
        P.ple_prism(r, 0)
    assert_exact(P.residual_prism(r), 1e-4)  # dense, no PLE: the layer_scalars still folded in
    assert_exact(P.mlp_prism(r, 2), 1e-4)


def test_needs_records_what_the_gemma4_prisms_read(g4):
    """A run recording only prisms.needs(...) gives the same residual, attention (a consumer) and MLP prisms."""
    model = g4["float64"]
    ids = np.arange(7, 19)
    full = model.run(ids)
    small = model.run(ids, record=P.needs(model, attention=[6], mlp=[4]))
    for run_a, run_b in [(full, small)]:
        ra, rb = P.logits_readout(model, run_a, ["#3"]), P.logits_readout(model, run_b, ["#3"])
        np.testing.assert_array_equal(P.residual_prism(ra).values, P.residual_prism(rb).values)
        np.testing.assert_array_equal(P.attention_prism(ra, 6).values, P.attention_prism(rb, 6).values)
        np.testing.assert_array_equal(P.mlp_prism(ra, 4).values, P.mlp_prism(rb, 4).values)
