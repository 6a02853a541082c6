"""refprism.gradients: the freeze switches, GradDrop, the prisms as the all-frozen gradient, selective records.

- Everything frozen, Gemma is linear in every residual with no biases: grad . x = the readout at every residual
  site (Euler: the map is homogeneous of degree 1), in float64 within 1e-10 relative.
- Everything frozen, the gradient is the same for other tokens run with every factor held at the clean run's
  value (norm scales, patterns, gelu gates), 1e-10 of each site's largest, at every site but the factors' own
  (norm scales, patterns: their gradient reads this run's activations).
- Everything frozen and every later layer dropped, grad x activation of each component is its prism term
  (residual parts, heads, head x source terms, neurons), float64 1e-10 of the readout's size.
- Each freeze switch alone equals central differences of a forward with that factor held by a forward edit
  (the forward's edit= hook), 1e-7 relative (central differences in float64, h = 1e-5: O(h^2) ~ 1e-10 plus
  rounding O(eps / h) ~ 1e-11 on O(1) readouts; a wrong or missing derivative is O(1) off).
"""

import numpy as np
import pytest

import refprism
from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gradients.backward import FREEZABLE, gradients

PRESETS = ["tiny", "tiny-gemma2", "tiny-gemma3"]
TARGETS, FOILS = ["#5", "#11"], ["#3"]


@pytest.fixture(scope="module")
def models(checkpoint):
    return {p: refprism.load(checkpoint(p), dtype="float64") for p in PRESETS}


def _ids(model, T=9, seed=4):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, T)


def _residual_sites(cfg):
    return ["embed"] + [f"blocks.{l}.{r}" for l in range(cfg.n_layers) for r in ("resid_pre", "resid_mid",
                                                                                 "resid_post")]


@pytest.mark.parametrize("preset", PRESETS)
def test_all_frozen_is_linear_grad_dot_x_is_the_readout(models, preset):
    model = models[preset]
    run = model.run(_ids(model))
    g = gradients(model, run, targets=TARGETS, versus=FOILS, position=6, freeze=FREEZABLE)
    readout = P.logits_readout(model, run, TARGETS, versus=FOILS, position=6)
    np.testing.assert_allclose(g.value, readout.whole, rtol=1e-14)
    for name in _residual_sites(model.config):
        dot = np.einsum("ztd,td->z", g.record[name], run.record[name])
        np.testing.assert_allclose(dot, g.value, rtol=1e-10, err_msg=name)
    true = gradients(model, run, targets=TARGETS, versus=FOILS, position=6)
    dot = np.einsum("ztd,td->z", true.record["embed"], run.record["embed"])
    assert np.abs(dot - g.value).max() > 1e-3 * np.abs(g.value).max()  # the true gradient is not homogeneous


@pytest.mark.parametrize("preset", PRESETS)
def test_all_frozen_with_later_layers_dropped_gives_the_prism_terms(models, preset):
    model = models[preset]
    cfg = model.config
    L, p = cfg.n_layers, 7
    run = model.run(_ids(model))
    readout = P.logits_readout(model, run, TARGETS, versus=FOILS, position=p)
    tol = 1e-10 * np.abs(readout.whole).max()
    everything = gradients(model, run, targets=TARGETS, versus=FOILS, position=p, freeze=FREEZABLE,
                           drop=range(L))
    split = P.residual_prism(readout)
    for label, term in zip(split.labels, split.values):
        site = "embed" if label == "embed" else f"blocks.{label[1:].split('.')[0]}.{label.split('.')[1]}.out"
        gx = np.einsum("ztd,td->z", everything.record[site], run.record[site])
        assert np.abs(gx - term).max() <= tol, label
    for l in range(L):
        b = f"blocks.{l}."
        g = gradients(model, run, targets=TARGETS, versus=FOILS, position=p, freeze=FREEZABLE,
                      drop=[f"L{l}.mlp", *range(l + 1, L)])
        g_z = g.record[b + "attn.z"][:, p]  # [Z, N, H]
        heads = P.attention_prism(readout, l)
        np.testing.assert_allclose(np.einsum("znh,nh->nz", g_z, run.record[b + "attn.z"][p]),
                                   heads.extras["heads"]["values"], rtol=0, atol=tol)
        kv = ops.kv_index(cfg.n_heads, cfg.n_kv_heads)
        v = run.record[b + "attn.v"][: p + 1, kv].transpose(1, 0, 2)  # [N, S, H]
        terms = run.record[b + "attn.pattern"][:, p, : p + 1, None] * v
        mine = np.einsum("znh,nsh->nsz", g_z, terms).reshape(-1, g_z.shape[0])
        np.testing.assert_allclose(mine, heads.values, rtol=0, atol=tol)
        neurons = P.mlp_prism(readout, l)
        g = gradients(model, run, targets=TARGETS, versus=FOILS, position=p, freeze=FREEZABLE, drop=range(l + 1, L))
        mine = (g.record[b + "mlp.act"][:, p] * run.record[b + "mlp.act"][p]).T
        np.testing.assert_allclose(mine, neurons.values, rtol=0, atol=tol)
        assert np.abs(neurons.values).max() > 1e-3 and np.abs(heads.values).max() > 1e-3


def held(model, clean, switch, readout):
    """A forward edit holding one factor at the clean run's value (the forward's own edit= hook)."""
    cfg = model.config
    cap = cfg.attn_softcap

    def window_of(name):
        return cfg.sliding_window if cfg.is_sliding(int(name.split(".")[1])) else None

    def edit(name, value, record):
        site = name.split(".", 2)[-1]
        if switch == "norm" and name.endswith("scale"):
            return clean.record[name].copy()
        if switch == "pattern" and site == "attn.pattern":
            return clean.record[name].copy()
        if switch == "gelu" and site == "mlp.act":  # act = gelu(gate_clean) * up (this run's up)
            gate = clean.record[name.replace("mlp.act", "mlp.gate")]
            return ops.gelu_tanh(gate) * record[name.replace("mlp.act", "mlp.up")]
        if switch == "softcap" and site == "attn.scores" and cap is not None:
            # the forward caps what flows on: pass s' with cap tanh(s' / cap) = r(s_clean) s
            r = ops.softcap_factor(clean.record[name], cap)
            with np.errstate(invalid="ignore"):  # masked scores may leave (-cap, cap): the mask replaces them
                held_scores = cap * np.arctanh(r * value / cap)
            allowed = np.broadcast_to(ops.causal_mask(value.shape[-1], window_of(name)), value.shape)
            assert np.all(np.isfinite(held_scores[allowed])), "the held soft-cap left (-cap, cap)"
            return held_scores
        if switch == "softcap" and name == "logits" and cfg.final_softcap is not None:
            r = ops.softcap_factor(clean.record["logits_uncapped"], cfg.final_softcap)
            return r * record["logits_uncapped"]
        return value

    return edit


@pytest.mark.parametrize("preset, switch", [(p, s) for p in PRESETS for s in FREEZABLE if s != "router"  # Gemma 4
                                            if s != "softcap" or p == "tiny-gemma2"])  # only Gemma 2 soft-caps
def test_each_freeze_switch_equals_differences_of_a_forward_with_the_factor_held(models, preset, switch):
    model = models[preset]
    cfg = model.config
    ids, p = _ids(model), 6
    readout = "capped" if switch == "softcap" else "logit"
    clean = model.run(ids)
    g = gradients(model, clean, targets=TARGETS, versus=FOILS, position=p, freeze=[switch], readout=readout)
    true = gradients(model, clean, targets=TARGETS, versus=FOILS, position=p, readout=readout)
    hold = held(model, clean, switch, readout)
    tids, coef = g.targets.coefficients(np.float64)
    rng = np.random.default_rng(0)
    for site in ("embed", "blocks.0.ln1.out", "blocks.0.resid_mid"):
        d = rng.standard_normal(clean.record[site].shape)

        def value(h, d=d, site=site):
            def edit(name, v, record):
                v = hold(name, v, record)
                return v + h * d if name == site else v
            rec = model.run(ids, edit=edit).record
            name = "logits_uncapped" if readout == "logit" and cfg.final_softcap is not None else "logits"
            return coef @ rec[name][p, tids]

        h = 1e-5
        fd = (value(h) - value(-h)) / (2 * h)
        an = g.record[site].reshape(2, -1) @ d.ravel()
        assert np.abs(fd - an).max() <= 1e-7 * np.abs(an).max(), (site, fd, an)
        an_true = true.record[site].reshape(2, -1) @ d.ravel()
        assert np.abs(an - an_true).max() > 1e-4 * np.abs(an).max(), f"{switch} changes nothing at {site}"


@pytest.mark.parametrize("preset", PRESETS)
def test_selective_record_is_recomputed_layer_by_layer(models, preset):
    model = models[preset]
    ids = _ids(model, 11, 2)
    full = gradients(model, model.run(ids), targets=TARGETS, versus=FOILS, readout="logprob", position=5)
    sel = gradients(model, model.run(ids, record=["logits@-1"]), targets=TARGETS, versus=FOILS, readout="logprob",
                    position=5)
    # a difference of log-probabilities (|log p| ~ 5) from logits at p that the checkpoint pass computes as a
    # 1-row product (another summation order than the [T, V] one): absolute rounding, ~1e-15 (seen 9e-16, 1.8e-15)
    np.testing.assert_allclose(sel.value, full.value, rtol=1e-14, atol=1e-13)
    for name in full.record:
        np.testing.assert_allclose(sel.record[name], full.record[name], rtol=0,
                                   atol=1e-13 * max(1.0, np.abs(full.record[name]).max()), err_msg=name)


def _bytes(rec, prefix=""):
    """What a record holds, in bytes (the logits kept at one position left out: [V] each, not [T, V])."""
    return sum(np.asarray(rec[n]).nbytes for n in rec if n.startswith(prefix) and not n.startswith("logits"))


@pytest.mark.parametrize("preset, overrides", [("tiny-gemma2", {"num_hidden_layers": 8}), ("tiny-gemma4", {})])
def test_a_selective_backward_holds_the_checkpoints_and_one_layer(checkpoint, monkeypatch, preset, overrides):
    """The bound the backward promises for a selective record: it holds its checkpoints (backward._layer_source:
    each resid_pre, the final sites; Gemma 4's per-layer inputs and producer k, v), the kept gradients, and one
    layer: that layer's recomputed sites (backward._one_layer) and their Z-row gradients. Each recomputed layer is
    gone (weak reference) before the next is made, and tracemalloc's peak over the whole backward stays within
    checkpoints + (1 + Z) x the largest layer + the kept gradients. Holding every layer instead (a cache in
    _one_layer) breaks both: its peak is about the full record's (8 layers at T = 64: 8.4 MB against 2.5 MB, bound
    3.1 MB)."""
    import gc
    import tracemalloc
    import weakref

    from refprism.gradients import backward as B

    model = refprism.load(checkpoint(preset, **overrides), dtype="float64")
    cfg = model.config
    T = 48
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, T)
    full = model.run(ids).record
    layer = max(_bytes(full, f"blocks.{l}.") for l in range(cfg.n_layers))
    run = model.run(ids, record=["logits@-1"])
    checkpoints = _bytes(B._layer_source(model, run, T - 1).top)
    Z = 2  # TARGETS against FOILS: two rows
    kept = Z * full["embed"].nbytes
    assert layer * cfg.n_layers > 2 * (checkpoints + (1 + Z) * layer + kept)  # a cache of all layers would show
    made, alive_then = [], []
    one_layer = B._one_layer

    def counted(*args):
        gc.collect()
        alive_then.append(sum(r() is not None for r in made))
        rec = one_layer(*args)
        made.append(weakref.ref(rec))
        return rec

    monkeypatch.setattr(B, "_one_layer", counted)
    tracemalloc.start()
    try:
        g = gradients(model, run, targets=TARGETS, versus=FOILS, record=["embed"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(made) == cfg.n_layers and alive_then == [0] * cfg.n_layers, alive_then
    assert peak <= checkpoints + (1 + Z) * layer + kept, (peak, checkpoints, layer, kept)
    assert set(g.record) == {"embed"}


@pytest.mark.parametrize("readout", ["logit", "logprob"])
def test_a_prompt_is_unembedded_only_at_the_readouts_position(models, readout):
    """gradients(model, prompt) runs the full record with the logits at `position` only (Model.run_reading):
    every gradient equals the one from the full run's record, where the [T, V] product rounds that row as the
    1-row product need not (the readout's value and the log-softmax seed within 1e-13, the rest the same)."""
    model = models["tiny-gemma3"]
    ids = _ids(model, 11, 3)
    full = gradients(model, model.run(ids), targets=TARGETS, versus=FOILS, readout=readout, position=6)
    part = gradients(model, ids, targets=TARGETS, versus=FOILS, readout=readout, position=6)
    assert part.run.record["logits"].positions == (6,)
    np.testing.assert_allclose(part.value, full.value, rtol=1e-14, atol=1e-13)
    assert set(part.record) == set(full.record)
    for name in full.record:
        np.testing.assert_allclose(part.record[name], full.record[name], rtol=0,
                                   atol=1e-13 * max(1.0, np.abs(full.record[name]).max()), err_msg=name)
    with pytest.raises(InputError, match="position 11 is out of range for 11 tokens"):
        gradients(model, ids, targets=TARGETS, position=11)


def test_direction_readout_and_gradient_drop(models):
    model = models["tiny-gemma2"]
    cfg = model.config
    run = model.run(_ids(model))
    u = np.random.default_rng(1).standard_normal((3, cfg.d_model))
    g = gradients(model, run, readout=u, position=5)
    x = run.record[f"blocks.{cfg.n_layers - 1}.resid_post"]
    np.testing.assert_allclose(g.value, u @ x[5], rtol=1e-14)
    np.testing.assert_array_equal(g.record[f"blocks.{cfg.n_layers - 1}.resid_post"][:, 5], u)
    dropped = gradients(model, run, readout=u, position=5, drop=[1])
    np.testing.assert_array_equal(dropped.record["blocks.1.resid_pre"], dropped.record["blocks.1.resid_post"])
    assert np.all(dropped.record["blocks.1.mlp.act"] == 0)
    np.testing.assert_array_equal(dropped.record["blocks.1.resid_post"], g.record["blocks.1.resid_post"])
    assert np.abs(dropped.record["embed"] - g.record["embed"]).max() > 1e-6


def test_float32_stays_float32_and_close_to_float64(checkpoint):
    m32 = refprism.load(checkpoint("tiny-gemma3"))
    m64 = refprism.load(checkpoint("tiny-gemma3"), dtype="float64")
    ids = _ids(m32)
    g32 = gradients(m32, ids, targets=TARGETS)
    g64 = gradients(m64, ids, targets=TARGETS)
    for name in g32.record:
        assert g32.record[name].dtype == np.float32, name
        scale = max(1e-6, np.abs(g64.record[name]).max())
        assert np.abs(g32.record[name] - g64.record[name]).max() <= 1e-3 * scale, name


def test_bad_arguments_are_one_line_errors(models):
    model = models["tiny"]
    ids = _ids(model)
    for kwargs, text in [({"freeze": ["norms"]}, "freeze 'norms'"), ({"drop": [9]}, "drop 9"),
                         ({"drop": ["L0.mix"]}, "drop 'L0.mix'"),
                         ({"readout": "prob"}, "readout 'prob'"), ({"readout": np.ones(3)}, "direction readout"),
                         ({"dtype": "float32"}, "computes in float64"), ({"record": ["blocks.*.nope"]}, "names no"),
                         ({"position": 40}, "out of range")]:
        with pytest.raises(InputError, match=text):
            gradients(model, ids, **kwargs)


def test_public_api_is_the_callable_package(models):
    import refprism.gradients.backward as backward_module

    model = models["tiny"]
    g = refprism.gradients(model, _ids(model), targets=TARGETS, versus=FOILS, freeze=["norm"])
    assert backward_module.__name__ == "refprism.gradients.backward"
    assert g.freeze == ("norm",) and g.record["embed"].shape == (2, 9, model.config.d_model)
    np.testing.assert_allclose(g.token_embedding, g.record["embed"] * model.normalizer, rtol=1e-15)


@pytest.mark.parametrize("preset", PRESETS)
def test_all_frozen_second_differences_vanish(models, preset):
    """With every factor held by edits the readout is linear in the embedding: R(e + hd) - 2R(e) + R(e - hd) = 0
    even for h = 1 (1e-10 of the first difference), and the first difference is the frozen gradient's."""
    model = models[preset]
    cfg = model.config
    ids, p = _ids(model), 6
    clean = model.run(ids)
    g = gradients(model, clean, targets=TARGETS, versus=FOILS, position=p, freeze=FREEZABLE)
    # the held pattern makes the attention soft-cap moot (and the pre-cap readout has no final one to hold)
    holds = [held(model, clean, s, "logit") for s in ("norm", "pattern", "gelu")]
    d = np.random.default_rng(3).standard_normal(clean.record["embed"].shape)
    tids, coef = g.targets.coefficients(np.float64)

    def value(h):
        def edit(name, v, record):
            for hold in holds:
                v = hold(name, v, record)
            return v + h * d if name == "embed" else v
        rec = model.run(ids, edit=edit).record
        return coef @ rec["logits_uncapped" if cfg.final_softcap is not None else "logits"][p, tids]

    r0, r1, r2 = value(0.0), value(1.0), value(-1.0)
    first = (r1 - r2) / 2
    np.testing.assert_allclose(first, g.record["embed"].reshape(2, -1) @ d.ravel(), rtol=1e-10)
    assert np.abs(r1 - 2 * r0 + r2).max() <= 1e-10 * np.abs(first).max()


def check_truncated(model, ids, freeze, drop=frozenset()):
    """backward(upto=S) with rows at several positions in one pass: every site's gradient over positions 0 .. S-1
    is each row's own full pass's there (1e-10 of the site's largest + 1e-13 of the pass's: the summation order of
    another Z), and
    the full pass is exactly zero after the row's position (causal)."""
    from refprism.gemma.record import symbolic_shapes
    from refprism.gradients.backward import Seed, _layer_source, backward

    cfg = model.config
    run = model.run(ids)
    layers = _layer_source(model, run, len(ids) - 1)
    u = np.random.default_rng(3).normal(size=(3, cfg.d_model))
    at, S = np.array([2, 5, 5]), 6
    kw = {"freeze": frozenset(freeze), "drop": drop}
    cut = backward(model, layers, Seed(None, u, {}), at, upto=S, **kw)
    shapes = symbolic_shapes(cfg)
    assert cut["embed"].shape == (3, S, cfg.d_model)
    for z in range(3):
        full = backward(model, layers, Seed(None, u[[z]], {}), int(at[z]), **kw)
        assert set(full) == set(cut)
        top = max(np.abs(g).max() for g in full.values())
        for name, g in full.items():
            axes = shapes[name]
            window = tuple(slice(0, S) if a in ("T", "S") else slice(None) for a in axes)
            scale = np.abs(g).max() + 1e-300
            err = np.abs(cut[name][z][window] - g[0][window]).max()
            assert err <= 1e-10 * scale + 1e-13 * top, f"{name} row {z}: {err:.2e}"  # BLAS order (another Z)
            later = tuple(slice(int(at[z]) + 1, None) if a == "T" else slice(None) for a in axes)
            if "T" in axes:
                assert not g[0][later].any(), f"{name}: a gradient after the row's position"
    with pytest.raises(InputError, match="upto 5"):
        backward(model, layers, Seed(None, u, {}), at, upto=5, **kw)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("freeze", [(), FREEZABLE])
def test_backward_truncated_to_the_rows_positions_equals_the_full_one(models, preset, freeze):
    check_truncated(models[preset], _ids(models[preset]), freeze, frozenset({(1, "mlp")}))


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_a_long_prompts_lazy_record_is_recomputed_once_per_layer_with_the_same_bits(models, preset, monkeypatch):
    """A long record (record.long_record) keeps most sites as recipes (record.Lazy): the backward recomputes each
    such layer once from its resid_pre (backward._one_layer) and gets every gradient bit for bit as from a record
    that kept every site as an array (all but the logits: nothing lazy)."""
    from refprism.gemma import record as R
    from refprism.gemma.record import Lazy, everything_but
    from refprism.gradients import backward as B

    model = models[preset]
    monkeypatch.setattr(R, "LONG_PROMPT", 16)  # (the tiny models' context is 128 tokens)
    monkeypatch.setattr(R, "LAZY_BUDGET", 0)  # (their records are far under the budget)
    ids = _ids(model, T=24, seed=5)
    lazy = model.run(ids)
    assert isinstance(dict.__getitem__(lazy.record, "blocks.0.mlp.gate"), Lazy)
    eager = model.run(ids, record=everything_but(model.config, ("logits", "logits_uncapped")))
    assert not isinstance(dict.__getitem__(eager.record, "blocks.0.mlp.gate"), Lazy)
    calls = []
    one_layer = B._one_layer
    monkeypatch.setattr(B, "_one_layer", lambda *a: calls.append(a[-1]) or one_layer(*a))
    got = gradients(model, lazy, targets=["#5"], versus=["#3"], position=20)
    assert sorted(calls) == list(range(model.config.n_layers))
    calls.clear()
    want = gradients(model, eager, targets=["#5"], versus=["#3"], position=20)
    assert calls == []
    assert set(got.record) == set(want.record)
    for name in want.record:
        np.testing.assert_array_equal(got.record[name], want.record[name], err_msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_all_frozen_gradient_is_the_same_for_other_tokens_with_the_factors_held(models, preset):
    """Everything frozen the readout is a linear map of the input whose coefficients are the frozen factors: run
    other tokens with every factor held at the clean run's value by edits, and the freeze=all gradient of that
    run is the clean run's, 1e-10 of the site's largest in float64 (the backward reads the held factors from the
    edited record: the norm scales, the patterns and the gates, whose gelu is act's factor).

    Held here: every RMSNorm scale (ln1, ln2, the post-norms, q/k norms, the final norm: `held`'s norm edit), every
    pattern, every gelu(gate) (mlp.gate set to the clean one: act = gelu(gate_clean) * up, and the backward's
    frozen gelu reads gelu of the recorded gate). The soft-caps are held without an edit of their own: the held
    pattern fixes everything the capped scores feed (Gemma 2), and the readout is the prisms' pre-cap logit, which
    the final soft-cap comes after. So this test catches a norm, pattern or gelu switch not honoured, not a
    soft-cap one (test_each_freeze_switch_equals_differences_... covers that).

    The same at every site but these, whose gradient multiplies the factor's input with this run's activations:
    a norm scale's (dR/ds = -sum_d g_d y_d / s: y is this run's normalised input) and a pattern's
    (dR/dpattern[t, s] = dR/dz[t] . v[s]: this run's values); Gemma 3's q/k norm scales sit behind the frozen
    pattern, zero in both runs like the scores, q and k (equal, trivially). The embedding's site is among the
    equal ones: embed is the input of the linear map, not a factor of it (its gradient is the map's row)."""
    model = models[preset]
    cfg = model.config
    ids, p = _ids(model), 6
    other_ids = _ids(model, seed=9)
    assert (ids != other_ids).sum() >= 7
    clean = model.run(ids)
    holds = [held(model, clean, s, "logit") for s in ("norm", "pattern")]

    def edit(name, v, record):
        for hold in holds:
            v = hold(name, v, record)
        return clean.record[name].copy() if name.endswith("mlp.gate") else v

    other = model.run(other_ids, edit=edit)
    kw = dict(targets=TARGETS, versus=FOILS, position=p, freeze=FREEZABLE)
    want = gradients(model, clean, **kw)
    got = gradients(model, other, **kw)
    readout = P.logits_readout(model, other, TARGETS, versus=FOILS, position=p)
    np.testing.assert_allclose(got.value, readout.whole, rtol=1e-14)  # the gradient is of the edited run
    assert np.abs(got.value - want.value).max() > 1e-2 * np.abs(want.value).max()  # other tokens, another readout
    # the linear map's row, applied to the other run's input, is its readout (Euler, as for the clean run)
    np.testing.assert_allclose(np.einsum("ztd,td->z", want.record["embed"], other.record["embed"]), got.value,
                               rtol=1e-10)

    def differs(name):  # the factors' own sites: their gradient reads this run's activations (the q/k norms'
        # scales are behind the frozen pattern: zero in both, as the scores, q and k are)
        return (name.endswith("scale") and "_norm." not in name) or name.endswith("attn.pattern")

    checked = []
    for name in want.record:
        a, b = got.record[name], want.record[name]
        scale = np.abs(b).max()
        if differs(name):
            assert np.abs(a - b).max() > 1e-6 * scale, f"{name}: expected to read this run's activations"
            continue
        assert np.abs(a - b).max() <= 1e-10 * scale, (name, np.abs(a - b).max(), scale)
        if scale > 0:
            checked.append(name)
    assert {"embed", "blocks.0.resid_mid", "blocks.0.attn.v", "blocks.0.mlp.up", "blocks.0.ln1.out"} <= set(checked)
    assert len(checked) >= 10 * cfg.n_layers
    true_clean = gradients(model, clean, targets=TARGETS, versus=FOILS, position=p)
    true_other = gradients(model, other_ids, targets=TARGETS, versus=FOILS, position=p)
    assert np.abs(true_other.record["embed"] - true_clean.record["embed"]).max() > 1e-3 * \
        np.abs(true_clean.record["embed"]).max()  # unfrozen, the gradient depends on the input
