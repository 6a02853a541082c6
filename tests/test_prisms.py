"""Exactness of every prism, at every level, by property tests in float64; independence by frozen re-runs.

Exactness bar (the issue's): |whole - sum(parts)| <= 1e-10 * sum(|parts|) (+ 1e-12 absolute for all-zero parts).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import refprism
from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops


def assert_exact(split, rel=1e-10):
    parts = split.values.astype(np.float64)
    bound = 1e-12 + rel * np.abs(parts).sum(axis=0)
    err = np.abs(split.whole - parts.sum(axis=0))
    assert np.all(err <= bound), f"{split.prism} {split.whole_label}: |whole - sum| {err} > {bound}"
    assert split.exact


SHAPES = [dict(), dict(num_attention_heads=4, num_key_value_heads=1), dict(num_key_value_heads=4),
          dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=24)]


@pytest.fixture(scope="module")
def models64(checkpoint):
    return [refprism.load(checkpoint(**s, seed=i), dtype="float64") for i, s in enumerate(SHAPES)]


cases = st.fixed_dictionaries({
    "model": st.integers(0, len(SHAPES) - 1),
    "ids": st.lists(st.integers(0, 511), min_size=1, max_size=14),
    "targets": st.lists(st.integers(0, 511), min_size=1, max_size=4, unique=True),
    "n_versus": st.integers(0, 2),
    "position": st.integers(-14, 13),
    "picks": st.lists(st.integers(0, 10**6), min_size=12, max_size=12),
})


def _setup(models64, case):
    model = models64[case["model"]]
    run = model.run([2] + case["ids"])
    T = len(run.tokens)
    pos = case["position"] % T
    ts = [f"#{t}" for t in case["targets"]]
    versus = [f"#{(t + 7) % 512}" for t in case["targets"][: case["n_versus"]]]
    if set(versus) & set(ts):
        versus = []
    return model, run, P.logits_readout(model, run, ts, position=pos, versus=versus)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases)
def test_every_level_is_exact(models64, case):
    model, run, r = _setup(models64, case)
    pick = iter(case["picks"])
    L, N, F = model.config.n_layers, model.config.n_heads, model.config.d_mlp

    res = P.residual_prism(r)
    ids, coef = r.targets.coefficients(np.float64)
    np.testing.assert_array_equal(res.whole, coef @ run.logits[r.position, ids])  # the model's raw logits
    assert_exact(res)
    assert res.labels == ["embed"] + [f"L{l}.{k}" for l in range(L) for k in ("attn", "mlp")]

    for l in range(L):
        att, mlp = P.attention_prism(r, l), P.mlp_prism(r, l)
        assert_exact(att), assert_exact(mlp), assert_exact(P.head_split(att))
        np.testing.assert_allclose(att.whole, res.term(f"L{l}.attn"), rtol=1e-12, atol=1e-14)  # parent's term
        np.testing.assert_allclose(mlp.whole, res.term(f"L{l}.mlp"), rtol=1e-12, atol=1e-14)
        assert len(att.labels) == N * (r.position + 1) and len(mlp.labels) == F

    # a chain three levels deep: head at a source -> a lower head at another source -> a neuron -> residual parts
    l1 = next(pick) % L
    h1, s1 = next(pick) % N, next(pick) % (r.position + 1)
    r1 = P.through_head(r, l1, h1, s1)
    np.testing.assert_allclose(r1.whole, P.attention_prism(r, l1).term(f"L{l1}H{h1}.src{s1}"), rtol=1e-12, atol=1e-15)
    c1 = P.residual_prism(r1)
    assert_exact(c1)
    assert c1.labels == ["embed"] + [f"L{j}.{k}" for j in range(l1) for k in ("attn", "mlp")]
    if l1 > 0:
        l2 = next(pick) % l1
        h2, s2 = next(pick) % N, next(pick) % (s1 + 1)
        r2 = P.through_head(r1, l2, h2, s2)
        np.testing.assert_allclose(r2.whole, P.attention_prism(r1, l2).term(f"L{l2}H{h2}.src{s2}"),
                                   rtol=1e-12, atol=1e-15)
        assert_exact(P.residual_prism(r2))
        assert r2.whole_label == f"L{l1}H{h1}.src{s1}/L{l2}H{h2}.src{s2}"
        if l2 > 0:
            l3, n3 = next(pick) % l2, next(pick) % F
            r3 = P.through_neuron(r2, l3, n3)
            np.testing.assert_allclose(r3.whole, P.mlp_prism(r2, l3).term(f"L{l3}N{n3}"), rtol=1e-12, atol=1e-15)
            c3 = P.residual_prism(r3)
            assert_exact(c3)
            assert c3.labels[-1] == f"L{l3}.attn"  # resid_mid of layer l3 includes its attention


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases)
def test_neuron_pull_back_then_attention_and_mlp_splits(models64, case):
    model, run, r = _setup(models64, case)
    L, F = model.config.n_layers, model.config.d_mlp
    l = L - 1
    n = case["picks"][0] % F
    rn = P.through_neuron(r, l, n)
    assert_exact(P.residual_prism(rn))
    assert_exact(P.attention_prism(rn, l))  # resid_mid_l contains L{l}.attn
    for j in range(l):
        assert_exact(P.attention_prism(rn, j)), assert_exact(P.mlp_prism(rn, j))


def test_float32_stays_float32_and_exact_within_its_tolerance(tiny):
    run = tiny.run("The capital city of France is")
    r = P.logits_readout(tiny, run, ["▁Paris", "▁London"])
    for split in [P.residual_prism(r), P.attention_prism(r, 1), P.mlp_prism(r, 0),
                  P.residual_prism(P.through_head(r, 1, 0, 3))]:
        assert split.values.dtype == np.float32 and split.whole.dtype == np.float32
        assert split.exact


# ----------------------------------------------------------------------------------------- independence


class FrozenRerun:
    """Re-run one sublayer at position p from the HF tensors (not refprism's per-head layout) with a part removed,
    keeping every recorded norm scale, attention pattern, gelu(gate) factor and every other sublayer's output
    fixed, and read the logits at p through the frozen final norm. The change in the logits is the removed
    part's direct contribution, which the prism must report."""

    def __init__(self, model_dir, model, run):
        self.t = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.cfg, self.rec = model.config, run.record

    def _attn_out(self, l, p, drop_head=None, drop_source=None, remove_from_source=None):
        c, t, rec = self.cfg, self.t, self.rec
        N, K, H = c.n_heads, c.n_kv_heads, c.d_head
        q = f"model.layers.{l}."
        x = rec[f"blocks.{l}.resid_pre"].copy()
        z = np.zeros((N, H))
        for n in range(N):
            xs = x.copy()
            if n == drop_head and remove_from_source is not None:
                xs[drop_source] -= remove_from_source  # the part removed from the residual the head reads at s
            h = xs / rec[f"blocks.{l}.ln1.scale"][:, None] * (1 + t[q + "input_layernorm.weight"])
            v = (h @ t[q + "self_attn.v_proj.weight"].T).reshape(len(x), K, H)[:, n // (N // K)]
            w = rec[f"blocks.{l}.attn.pattern"][n, p].copy()
            if n == drop_head and remove_from_source is None:
                w[drop_source] = 0  # the value read from source s removed
            z[n] = w @ v
        return z.reshape(N * H) @ t[q + "self_attn.o_proj.weight"].T

    def _mlp_out(self, l, p, drop_neuron):
        t, rec, q = self.t, self.rec, f"model.layers.{l}."
        h = (rec[f"blocks.{l}.resid_mid"][p] / rec[f"blocks.{l}.ln2.scale"][p]
             * (1 + t[q + "post_attention_layernorm.weight"]))
        act = ops.gelu_tanh(rec[f"blocks.{l}.mlp.gate"][p]) * (h @ t[q + "mlp.up_proj.weight"].T)
        act[drop_neuron] = 0
        return act @ t[q + "mlp.down_proj.weight"].T

    def logits(self, p, ids, *, attn=None, mlp=None, drop_part=None):
        """attn=(layer, head, source[, part vector removed at the source]); mlp=(layer, neuron); drop_part=label."""
        rec, L = self.rec, self.cfg.n_layers
        parts = {"embed": rec["embed"][p]}
        for l in range(L):
            parts[f"L{l}.attn"] = rec[f"blocks.{l}.attn.out"][p]
            parts[f"L{l}.mlp"] = rec[f"blocks.{l}.mlp.out"][p]
        if attn:
            parts[f"L{attn[0]}.attn"] = self._attn_out(attn[0], p, *attn[1:])
        if mlp:
            parts[f"L{mlp[0]}.mlp"] = self._mlp_out(mlp[0], p, mlp[1])
        if drop_part:
            parts.pop(drop_part)
        x = sum(parts.values())
        y = x / rec["ln_final.scale"][p] * (1 + self.t["model.norm.weight"])
        return y @ self.t["model.embed_tokens.weight"][ids].T


@pytest.fixture(scope="module")
def frozen(checkpoint):
    d = checkpoint(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1)
    model = refprism.load(d, dtype="float64")
    run = model.run("The capital city of France is")
    return model, run, FrozenRerun(d, model, run)


IDS = [108, 109, 116]  # ▁Paris ▁London ▁Tokyo in the small tokenizer


def test_frozen_rerun_reproduces_the_logits(frozen):
    model, run, fr = frozen
    for p in range(len(run.tokens)):
        np.testing.assert_allclose(fr.logits(p, IDS), run.logits[p, IDS], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [3, 6])
def test_independence_of_every_term(frozen, p):
    model, run, fr = frozen
    r = P.logits_readout(model, run, [f"#{i}" for i in IDS], position=p)
    base = fr.logits(p, IDS)
    res = P.residual_prism(r)
    for label in res.labels:
        np.testing.assert_allclose(base - fr.logits(p, IDS, drop_part=label), res.term(label), rtol=1e-9, atol=1e-12)
    for l in range(model.config.n_layers):
        att, mlp = P.attention_prism(r, l), P.mlp_prism(r, l)
        for h in range(model.config.n_heads):
            for s in range(p + 1):
                np.testing.assert_allclose(base - fr.logits(p, IDS, attn=(l, h, s)), att.term(f"L{l}H{h}.src{s}"),
                                           rtol=1e-9, atol=1e-12)
        for n in (0, 17, model.config.d_mlp - 1):
            np.testing.assert_allclose(base - fr.logits(p, IDS, mlp=(l, n)), mlp.term(f"L{l}N{n}"),
                                       rtol=1e-9, atol=1e-12)


def test_independence_of_chain_parts(frozen):
    """Removing part c from the residual that head h reads at source s changes the logits by the chain's c term."""
    model, run, fr = frozen
    p, l, h, s = 6, 2, 3, 5
    r = P.logits_readout(model, run, [f"#{i}" for i in IDS], position=p)
    chain = P.residual_prism(P.through_head(r, l, h, s))
    base = fr.logits(p, IDS)
    vectors = dict(zip(*P.residual_parts(P.through_head(r, l, h, s))))
    for label in chain.labels:
        changed = fr.logits(p, IDS, attn=(l, h, s, vectors[label]))
        np.testing.assert_allclose(base - changed, chain.term(label), rtol=1e-9, atol=1e-12)


def test_direct_effect_and_logit_lens(frozen):
    """The beyond-the-frozen-view extras against their definitions, computed by hand."""
    model, run, fr = frozen
    p = 6
    r = P.logits_readout(model, run, ["#108", "#109"], position=p, versus=["#116"])
    res = P.residual_prism(r)
    E, w, eps = fr.t["model.embed_tokens.weight"], fr.t["model.norm.weight"], model.config.rms_norm_eps
    f = lambda x: (E[[108, 109]] - E[116]) @ (x / np.sqrt(np.mean(x * x) + eps) * (1 + w))  # noqa: E731
    x = run.record["blocks.2.resid_post"][p]
    labels, vectors = P.residual_parts(r)
    for i, _label in enumerate(labels):
        np.testing.assert_allclose(res.extras["direct_effect"]["values"][i], f(x) - f(x - vectors[i]), rtol=1e-10)
    np.testing.assert_allclose(res.extras["logit_lens"]["values"][0], f(run.record["embed"][p]), rtol=1e-10)
    np.testing.assert_allclose(res.extras["logit_lens"]["values"][-1], res.whole, rtol=1e-10)
    np.testing.assert_allclose(res.extras["frozen_running_sum"]["values"][-1], res.whole, rtol=1e-10)


# ----------------------------------------------------------------------------------------------- targets


def test_target_resolution(tiny):
    assert P.resolve_token(tiny, "▁Paris") == P.Token(108, "▁Paris")
    assert P.resolve_token(tiny, " Paris") == P.Token(108, "▁Paris")  # text that is exactly one token
    assert P.resolve_token(tiny, "#116") == P.Token(116, "▁Tokyo")
    with pytest.raises(InputError, match="beyond the vocabulary"):
        P.resolve_token(tiny, "#512")
    with pytest.raises(InputError, match=r"is 2 tokens \(▁Paris ▁London\)"):
        P.resolve_token(tiny, " Paris London")
    with pytest.raises(InputError, match="given twice"):
        P.resolve_targets(tiny, ["▁Paris", "#108"])
    with pytest.raises(InputError, match="no targets"):
        P.resolve_targets(tiny, [])


def test_versus_mean_of_foils_is_exact_difference(tiny64):
    run = tiny64.run("The capital city of France is")
    r = P.logits_readout(tiny64, run, ["▁Paris"], versus=["▁London", "▁Tokyo"])
    assert r.targets.labels == ["▁Paris - mean(▁London, ▁Tokyo)"]
    lg = run.logits[-1]
    np.testing.assert_allclose(r.whole, [lg[108] - (lg[109] + lg[116]) / 2], rtol=1e-14)
    one = P.residual_prism(P.logits_readout(tiny64, run, ["▁Paris", "▁London", "▁Tokyo"]))
    diff = P.residual_prism(r)
    np.testing.assert_allclose(diff.values[:, 0], one.values[:, 0] - one.values[:, 1:].mean(axis=1), rtol=1e-10,
                               atol=1e-13)


@pytest.mark.parametrize("call, message", [
    (lambda r: P.attention_prism(r, 2), "layer 2 is out of range"),
    (lambda r: P.through_head(r, 0, 4, 0), "head 4 is out of range"),
    (lambda r: P.through_head(r, 1, 0, 5), "source 5 is out of range"),
    (lambda r: P.through_neuron(r, 0, 128), "neuron 128 is out of range"),
    (lambda r: P.attention_prism(P.through_head(r, 1, 0, 2), 1), "L1.attn is not part of blocks.1.resid_pre"),
    (lambda r: P.mlp_prism(P.through_neuron(r, 1, 0), 1), "L1.mlp is not part of blocks.1.resid_mid"),
])
def test_out_of_range_errors(tiny, call, message):
    run = tiny.run("The capital city of France is")
    r = P.logits_readout(tiny, run, ["▁Paris"], position=4)
    with pytest.raises(InputError, match=message):
        call(r)
    with pytest.raises(InputError, match="position 7 is out of range"):
        P.logits_readout(tiny, run, ["▁Paris"], position=7)
    with pytest.raises(InputError, match="position -8 is out of range"):
        P.logits_readout(tiny, run, ["▁Paris"], position=-8)


def test_mlp_prism_matches_the_naive_neuron_outputs(tiny64):
    """The neuron split projects the readout first (W_down u: [F, Z]); it equals the naive [F, D] way."""
    run = tiny64.run("The capital city of France is")
    r = P.logits_readout(tiny64, run, ["▁Paris", "▁London"])
    split = P.mlp_prism(r, 1)
    W = tiny64.params.block(1)["W_down"]  # [F, D]
    act = run.record["blocks.1.mlp.act"][-1]
    np.testing.assert_allclose(split.values, (act[:, None] * W) @ r.u.T, rtol=1e-12, atol=1e-14)


def test_pca_of_points_in_a_plane_keeps_their_distances():
    """Rows in a 2-D affine plane of R^D: the PCA coordinates keep every pairwise distance; variance sums to 1."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((16, 2)))[0].T  # 2 orthonormal directions in D = 16
    ab = rng.standard_normal((5, 2)) * [3.0, 1.0]
    E = np.zeros((10, 16))
    E[[1, 3, 4, 7, 9]] = 5.0 + ab @ basis
    model = SimpleNamespace(params=SimpleNamespace(embed_rows=lambda ids: E[ids]))
    toks = [P.Token(i, str(i)) for i in (1, 3, 4, 7, 9)]
    coords, var = P.unembedding_pca(model, toks)
    d = lambda X: np.linalg.norm(X[:, None] - X[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(coords), d(ab), atol=1e-10)
    np.testing.assert_allclose(var.sum(), 1.0, rtol=1e-12)
    assert var[0] >= var[1]


def test_chain_three_levels_deep(checkpoint):
    model = refprism.load(checkpoint(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1),
                          dtype="float64")
    run = model.run("The capital city of France is")
    r = P.logits_readout(model, run, ["▁Paris", "▁London"], versus=["▁Tokyo"])
    r1 = P.through_head(r, 2, 1, 5)
    r2 = P.through_head(r1, 1, 3, 2)
    r3 = P.through_neuron(r2, 0, 42)
    splits = [P.residual_prism(x) for x in (r, r1, r2, r3)]
    for split in splits:
        assert_exact(split)
    assert splits[3].whole_label == "L2H1.src5/L1H3.src2/L0N42"
    assert splits[3].labels == ["embed", "L0.attn"] and r3.position == 2
    np.testing.assert_allclose(r3.whole, P.mlp_prism(r2, 0).term("L0N42"), rtol=1e-12)
    np.testing.assert_allclose(r2.whole, P.attention_prism(r1, 1).term("L1H3.src2"), rtol=1e-12)
