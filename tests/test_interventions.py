"""Interventions: the prism term of a change is its effect with everything downstream frozen, the direct effect is
its effect with only the norms on the direct path recomputed, the total effect is a re-run; resume equals a full
re-run; a head x source edit changes exactly its term; the agreement metrics on cases with known answers.

Exactness bar (the issue's): float64, |effect - prism| <= 1e-12 + 1e-10 * (|readout| + |prism|).
HF independence of the total effects: tests/test_interventions_hf.py.
"""

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refprism
from refprism import cli
from refprism import interventions as I
from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops

SHAPES = [("tiny", {}), ("tiny", dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3)),
          ("tiny", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=24)),
          ("tiny-gemma2", {}), ("tiny-gemma2", dict(num_key_value_heads=1)), ("tiny-gemma3", {}),
          ("tiny-gemma3", dict(num_attention_heads=2, num_key_value_heads=2, head_dim=8))]
PROMPT = "The capital city of France is"  # 7 tokens with the small tokenizer
COUNTER = "The capital city of Japan is"


@pytest.fixture(scope="module")
def models64(checkpoint):
    return [refprism.load(checkpoint(preset, seed=i, **kw), dtype="float64") for i, (preset, kw) in enumerate(SHAPES)]


cases = st.fixed_dictionaries({
    "model": st.integers(0, len(SHAPES) - 1),
    "ids": st.lists(st.integers(3, 511), min_size=1, max_size=11),
    "cf_seed": st.integers(0, 2**16),
    "kind": st.sampled_from(I.KINDS),
    "ablate": st.sampled_from(I.ABLATIONS),
    "denoise": st.booleans(),
    "at": st.sampled_from(["readout", "all", "some"]),
    "position": st.integers(-12, 11),
    "picks": st.lists(st.integers(0, 10**6), min_size=6, max_size=6),
})


def label_of(case, model, p):
    c, pick = model.config, iter(case["picks"])
    l, h, n = next(pick) % c.n_layers, next(pick) % c.n_heads, next(pick) % c.d_mlp
    s = next(pick) % (p + 1)
    return {"embed": "embed", "attn": f"L{l}.attn", "mlp": f"L{l}.mlp", "head": f"L{l}H{h}",
            "edge": f"L{l}H{h}.src{s}", "neuron": f"L{l}N{n}"}[case["kind"]]


def build(models64, case):
    """(model, setting, group, the edit's changes) for one drawn case."""
    model = models64[case["model"]]
    ids = [2] + case["ids"]
    T = len(ids)
    cf = [2] + np.random.default_rng(case["cf_seed"]).integers(3, 512, T - 1).tolist()
    p = case["position"] % T
    at = {"readout": None, "all": "all", "some": sorted({p, case["picks"][4] % T, case["picks"][5] % T})}[case["at"]]
    kw = dict(targets=["#108", "#109"], versus=["#116"], position=p, at=at, ablate=case["ablate"])
    if case["ablate"] == "resample":
        kw.update(counterfactual=cf, direction="denoising" if case["denoise"] else "noising")
    if case["ablate"] == "mean" and case["denoise"]:
        kw.update(reference=[cf, ids[: max(2, T // 2)]])
    s = I.setting(model, ids, **kw)
    g = I.parse_component(model.config, label_of(case, model, p), T=T)
    return model, s, g


def sublayer(g) -> int:
    """The index of the component's sublayer: -1 for the embedding, 2l for attention, 2l + 1 for the MLP."""
    return -1 if g.kind == "embed" else 2 * g.layer + (g.kind in ("mlp", "neuron"))


def downstream_frozen(s, edit, g, *, norms, free=()):
    """The component's edit, with every later sublayer's output held at the base run's value; with norms=True
    also every norm scale, attention pattern and gelu(gate) factor (everything the prisms freeze) but those named
    in `free`."""
    base, own = s.base.record, sublayer(g)

    def f(name, value, record):
        value = edit(name, value, record)
        m = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.out", name)
        if m and 2 * int(m[1]) + (m[2] == "mlp") > own:
            return base[name]
        frozen = name.endswith(".scale") or name.endswith("attn.pattern") or name.endswith("mlp.gate")
        if norms and frozen and name not in free:
            return base[name]
        return value
    return f


def effect(s, run):
    readings = I.Readings(s)
    return s.sign * (readings.of_record(s.base.record)[0] - readings.of_record(run.record)[0])


def assert_exact(name, got, want, whole):
    bound = 1e-12 + 1e-10 * (np.abs(whole) + np.abs(want))
    err = np.abs(got - want)
    assert np.all(err <= bound), f"{name}: |got - want| {err} > {bound} (got {got}, want {want})"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases)
def test_prism_is_the_effect_with_everything_downstream_frozen(models64, case):
    """Freeze every later component's output and every norm, pattern and gate: the change's effect on the readout
    is its prism term, u . (c - c'), to 1e-10 (float64)."""
    model, s, g = build(models64, case)
    delta, repl = I.deltas(s, g)
    prism = I.prism_terms(s, g, delta)[0]
    edit = I.Edit(model.config, [(g, s.at, repl)])
    run = model.run(s.base.tokens, edit=downstream_frozen(s, edit, g, norms=True))
    assert_exact(f"{g.labels[0]} frozen effect", effect(s, run), prism, s.readout.whole)
    # the component's own post-norm (Gemma 2/3) recomputed, every other norm frozen: prism + post_norm_rescaling
    own = {"head": "ln1_post", "edge": "ln1_post", "neuron": "ln2_post"}.get(g.kind)
    if model.config.post_norms and own:
        post_only = I.direct_effects(s, I.Readings(s), g, delta)[1][0]
        free = {f"blocks.{g.layer}.{own}.scale"}
        run = model.run(s.base.tokens, edit=downstream_frozen(s, edit, g, norms=True, free=free))
        assert_exact(f"{g.labels[0]} post-norm only", effect(s, run), post_only, s.readout.whole)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases)
def test_direct_is_the_effect_with_only_the_direct_path_norms_recomputed(models64, case):
    """Later components held at their recorded outputs, norms free: the forward pass recomputes the component's
    own post-norm (Gemma 2/3) and the final norm, and its effect is the direct effect computed from the record."""
    model, s, g = build(models64, case)
    delta, repl = I.deltas(s, g)
    direct = I.direct_effects(s, I.Readings(s), g, delta)[0]
    edit = I.Edit(model.config, [(g, s.at, repl)])
    run = model.run(s.base.tokens, edit=downstream_frozen(s, edit, g, norms=False))
    assert_exact(f"{g.labels[0]} direct", effect(s, run), direct[0], s.readout.whole)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases)
def test_resume_equals_a_full_rerun(models64, case):
    model, s, g = build(models64, case)
    _, repl = I.deltas(s, g)
    edit = I.Edit(model.config, [(g, s.at, repl)])
    assert edit.first_layer == (None if g.kind == "embed" else g.layer)
    resumed, full = I.rerun(model, s.base, edit), model.run(s.base.tokens, edit=edit)
    # the re-run stops at the final norm (the readout needs one row of the unembedding, not [T, V])
    assert set(resumed) == set(full.record) - {"logits", "logits_uncapped"}
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], full.record[name], err_msg=name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases)
def test_zero_ablation_prism_is_the_prisms_own_term(models64, case):
    """Zero-ablated at the readout position, a component's prism term is the term the prisms report for it, and
    a residual part's direct effect is the residual prism's direct_effect extra."""
    case = dict(case, ablate="zero", at="readout")
    model, s, g = build(models64, case)
    label = g.labels[0]
    r = s.readout
    got = I.patch(model, s.base, label, targets=r.targets, position=r.position)
    if g.kind in ("embed", "attn", "mlp"):
        res = P.residual_prism(r)
        want = res.term(label)
        direct = res.extras["direct_effect"]["values"][res.labels.index(label)]
        np.testing.assert_allclose(got.direct, direct, rtol=1e-12, atol=1e-14)
    elif g.kind == "neuron":
        want = P.mlp_prism(r, g.layer).term(label)
    elif g.kind == "head":
        want = P.head_split(P.attention_prism(r, g.layer)).term(label)
    else:
        want = P.attention_prism(r, g.layer).term(label)
    np.testing.assert_allclose(got.prism, want, rtol=1e-12, atol=1e-14)


def test_patch_and_validate_agree(models64):
    model = models64[5]
    v = I.validate(model, PROMPT, level="heads", ablate="resample", counterfactual=COUNTER, faithfulness=False,
                   logprob=True)
    for label in ("L0H1", "L2H3"):
        one = I.patch(model, PROMPT, label, ablate="resample", counterfactual=COUNTER)
        i = v.labels.index(label)
        for key in ("prism", "direct", "total"):
            np.testing.assert_allclose(getattr(v, key)[i], getattr(one, key), rtol=1e-12, atol=1e-15, err_msg=key)
        np.testing.assert_allclose(v.logprob_total[i], one.logprob["total"], rtol=1e-12, atol=1e-15)
    # the readings of the final norm's output are the model's own logits (read at the readout's rows only)
    np.testing.assert_allclose(one.base_value, v.setting.readout.whole, rtol=1e-13)
    assert v.verified.all() and v.agreement["n"] == len(v.labels) == 12


# ----------------------------------------------------------------------------------------- the edit itself


@pytest.mark.parametrize("shape", [0, 3, 5])
def test_head_source_edit_changes_exactly_that_term(models64, shape):
    model = models64[shape]
    base, cf = model.run(PROMPT), model.run(COUNTER)
    l, h, s_, p = 1, 1, 2, 6
    kv = ops.kv_index(model.config.n_heads, model.config.n_kv_heads)[h]
    b = f"blocks.{l}."
    term = lambda rec: rec[b + "attn.pattern"][h, p, s_] * rec[b + "attn.v"][s_, kv]  # noqa: E731
    g = I.parse_component(model.config, f"L{l}H{h}.src{s_}", T=7)
    for value, want in ((np.zeros((1, 1, model.config.d_head)), -term(base.record)),
                        (term(cf.record)[None, None], term(cf.record) - term(base.record))):
        rec = I.rerun(model, base, I.Edit(model.config, [(g, [p], value)]))
        z0, z1 = base.record[b + "attn.z"], rec[b + "attn.z"]
        np.testing.assert_allclose(z1[p, h] - z0[p, h], want, rtol=1e-12, atol=1e-14)
        untouched = np.ones(z0.shape[:2], dtype=bool)
        untouched[p, h] = False
        np.testing.assert_array_equal(z1[untouched], z0[untouched])  # every other head and position, bit for bit
        for name in ("attn.pattern", "attn.v", "attn.k", "attn.q"):
            np.testing.assert_array_equal(rec[b + name], base.record[b + name])
        change = want @ model.params.get(l, "W_O")[h]  # what attention adds changes by that term through W_O
        o = "attn.o_proj" if model.config.post_norms else "attn.out"
        np.testing.assert_allclose(rec[b + o][p] - base.record[b + o][p], change, rtol=1e-10, atol=1e-13)


def test_edit_does_not_modify_its_input(models64):
    model = models64[0]
    base = model.run(PROMPT)
    z = base.record["blocks.1.attn.z"].copy()
    g = I.parse_component(model.config, "L1H1", T=7)
    I.rerun(model, base, I.Edit(model.config, [(g, [6], np.zeros((1, 1, model.config.d_head)))]))
    np.testing.assert_array_equal(base.record["blocks.1.attn.z"], z)


def test_many_groups_at_one_site_are_the_groups_applied_one_after_another(models64):
    """Edit merges a site's consecutive setting groups into one assignment: where groups overlap the last one given
    wins, as when each is applied on its own in order (heads and neurons, overlapping and repeated positions)."""
    model = models64[0]
    base = model.run(PROMPT)
    rng = np.random.default_rng(7)
    cfg = model.config
    for kind, width, site in (("neuron", cfg.d_mlp, "mlp.act"), ("head", cfg.n_heads, "attn.z")):
        W = 1 if kind == "neuron" else cfg.d_head
        changes = []
        for _ in range(6):
            idx = rng.choice(width, size=3, replace=False)
            g = I.Group(kind, 1, idx, np.full(3, -1))
            pos = rng.choice(7, size=2, replace=False)
            changes.append((g, pos, rng.normal(size=(2, 3, W))))
        want = base.record[f"blocks.1.{site}"].copy()
        for g, pos, vals in changes:  # one after another, by hand
            for p_, v in zip(pos, vals):
                want[p_, g.index] = v[:, 0] if kind == "neuron" else v
        edit = I.Edit(cfg, changes)
        assert len(edit.ops[f"blocks.1.{site}"]) == 1  # merged
        got = edit(f"blocks.1.{site}", base.record[f"blocks.1.{site}"], base.record)
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("kind", ["residual", "head", "neuron"])
def test_direct_equals_prism_when_the_norm_scale_is_unchanged(models64, kind):
    """Gemma 1 (no post-norms): a replacement that reflects the final residual x across a hyperplane keeps |x|, so
    the final norm's scale is unchanged and the direct effect is exactly the prism term."""
    model = models64[0]
    s = I.setting(model, PROMPT, targets=["#108"], versus=["#116"])
    x = s.base.record["blocks.1.resid_post"][6]
    label, W = {"residual": ("L0.attn", None), "head": ("L1H2", model.params.get(1, "W_O")[2]),
                "neuron": ("L0N7", model.params.get(0, "W_down")[7][None])}[kind]
    g = I.parse_component(model.config, label, T=7)
    a = np.random.default_rng(1).standard_normal(x.shape if W is None else W.shape[0])
    w = a if W is None else a @ W  # a direction the component can write
    delta = (2 * (x @ w) / (w @ w) * a)[None]  # c - c': the residual changes by -delta W = -2 (x.w)/(w.w) w
    d = I.residual_changes(s, g, delta)[0]
    np.testing.assert_allclose(np.linalg.norm(x + d), np.linalg.norm(x), rtol=1e-13)
    assert np.abs(d).max() > 0.1  # a real change
    prism = I.prism_terms(s, g, delta)[0]
    direct = I.direct_effects(s, I.Readings(s), g, delta)[0]
    assert_exact(label, direct[0], prism, s.readout.whole)
    assert abs(prism[0]) > 1e-3


def test_patch_parts_are_the_effects_of_separate_reruns(models64):
    """Every number patch reports, each from a forward pass written here (its own edit, not interventions.Edit, and
    the readout read off the run's own pre-cap logits, not interventions.Readings): L1H2 zero-ablated at the last
    position of a Gemma 2 model (own post-attention norm, final soft-cap) and of a Gemma 1 model (neither).
        prism:  every later sublayer output, norm scale, pattern and gelu(gate) held at the clean run's values
        post:   the same with the head's own post-attention norm recomputed, minus the prism run
        direct: only later sublayer outputs held (every norm recomputed); final = direct run - post-norm run
        total:  the full re-run;  mediated = full re-run - direct run (the later layers' response)
    The float64 bar is the module's (1e-12 + 1e-10 * scale): the two sides sum differently."""
    for model, post_norms in ((models64[3], True), (models64[0], False)):
        p = I.patch(model, PROMPT, "L1H2", ablate="zero", targets=["#108"], versus=["#116"])
        s, g = p.setting, I.parse_component(model.config, "L1H2", T=7)
        raw = "logits_uncapped" if model.config.final_softcap else "logits"

        def zero_head(name, value, record):
            if name != "blocks.1.attn.z":
                return value
            value = value.copy()
            value[6, 2] = 0.0  # [T, N, H]: head 2's output at the readout position
            return value

        def effect(hook, model=model, raw=raw, base=s.base):
            run = model.run(PROMPT, edit=hook)
            m = lambda rec: rec[raw][6, 108] - rec[raw][6, 116]  # noqa: E731
            return np.array([m(base.record) - m(run.record)])  # clean minus replaced

        frozen = effect(downstream_frozen(s, zero_head, g, norms=True))
        direct = effect(downstream_frozen(s, zero_head, g, norms=False))
        total = effect(zero_head)
        whole = s.readout.whole
        assert_exact("prism", p.prism, frozen, whole)
        assert_exact("direct", p.direct, direct, whole)
        assert_exact("total", p.total, total, whole)
        assert_exact("mediated", p.mediated, total - direct, whole)
        if post_norms:
            post = effect(downstream_frozen(s, zero_head, g, norms=True, free={"blocks.1.ln1_post.scale"}))
            assert_exact("post_norm_rescaling", p.post_norm_rescaling, post - frozen, whole)
            assert_exact("final_norm_rescaling", p.final_norm_rescaling, direct - post, whole)
            assert np.all(np.abs(post - frozen) > 1e-6)  # Gemma 2: the head's own post-attention norm acts
            assert p.capped is not None and len(p.to_json()["softcapped"]["total"]) == 1  # the capped readout too
        else:
            assert np.all(p.post_norm_rescaling == 0)  # Gemma 1 has no post-norm: the whole gap is the final norm's
            assert_exact("final_norm_rescaling", p.final_norm_rescaling, direct - frozen, whole)
        # each part is a real share of the total (none of these checks compares zeros)
        assert np.all(np.abs(total - direct) > 1e-6) and np.all(np.abs(direct - frozen) > 1e-6)
        j = p.to_json()
        for key in ("component", "prism", "direct", "total", "norm_rescaling", "mediated"):
            assert key in j


def test_effect_sign_is_clean_minus_replaced_in_both_directions(models64):
    """Replacing the whole embedding by the counterfactual's turns the clean run into the counterfactual run
    (noising) and back (denoising): both totals are readout(clean) - readout(counterfactual)."""
    for model in (models64[0], models64[3], models64[5]):
        clean, cf = model.run(PROMPT), model.run(COUNTER)
        for direction in I.DIRECTIONS:
            p = I.patch(model, PROMPT, "embed", at="all", ablate="resample", counterfactual=COUNTER,
                        direction=direction, targets=["#108"], versus=["#116"])
            raw = "logits_uncapped" if model.config.final_softcap else "logits"
            want = (clean.record[raw][6, 108] - clean.record[raw][6, 116]) - (cf.record[raw][6, 108]
                                                                               - cf.record[raw][6, 116])
            np.testing.assert_allclose(p.total, [want], rtol=1e-12, err_msg=direction)
            assert abs(want) > 1e-3


def test_mean_values_by_hand(models64):
    model = models64[3]  # Gemma 2, sliding window 4 on layer 0
    refs = [[2, 5, 6, 7, 8, 9, 10], [2, 11, 12]]
    runs = [model.run(r) for r in refs]
    g = I.parse_component(model.config, "L1N9", T=7)
    want = np.mean([r.record["blocks.1.mlp.act"][t, 9] for r in runs for t in range(1, len(r.tokens))])
    np.testing.assert_allclose(I.mean_activation(model, runs, g)[0, 0], want, rtol=1e-14)
    for layer in (0, 1):  # layer 0 slides (window 4), layer 1 sees every source
        g = I.parse_component(model.config, f"L{layer}H2.src0", T=7)
        b = f"blocks.{layer}."
        edges = []
        for r in runs:
            rec = r.record
            for t in range(1, len(r.tokens)):
                for s_ in range(t + 1):
                    if t - s_ < 4 or not model.config.is_sliding(layer):
                        kv = ops.kv_index(model.config.n_heads, model.config.n_kv_heads)[2]
                        edges.append(rec[b + "attn.pattern"][2, t, s_] * rec[b + "attn.v"][s_, kv])
        np.testing.assert_allclose(I.mean_activation(model, runs, g)[0], np.mean(edges, axis=0), rtol=1e-12)


def test_logprob_and_capped_numbers(models64):
    model = models64[3]
    p = I.patch(model, PROMPT, "L2.mlp", targets=["#108"], versus=["#116"])
    g = I.parse_component(model.config, "L2.mlp", T=7)
    base, patched = model.run(PROMPT), model.run(PROMPT, edit=I.Edit(model.config, [(g, [6], np.zeros((1, 1, 64)))]))
    lsm = lambda r: r.record["logits"][6].astype(np.float64) - np.log(np.exp(r.record["logits"][6]).sum())  # noqa: E731
    np.testing.assert_allclose(p.logprob["total"], [lsm(base)[108] - lsm(patched)[108]], rtol=1e-10)
    capped = lambda r: r.record["logits"][6, 108] - r.record["logits"][6, 116]  # noqa: E731
    np.testing.assert_allclose(p.capped["total"], capped(base) - capped(patched), rtol=1e-10)
    # the last sublayer has nothing after it: the total is the direct effect, pre-cap, capped and in log-prob
    np.testing.assert_allclose(p.total, p.direct, rtol=1e-10)
    np.testing.assert_allclose(p.capped["total"], p.capped["direct"], rtol=1e-10)
    np.testing.assert_allclose(p.logprob["total"], p.logprob["direct"], rtol=1e-9)


# ----------------------------------------------------------------------------------------- agreement metrics


def test_rank_correlations_on_known_cases():
    assert I.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert I.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert I.kendall([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # one swapped pair of 4: Kendall (5 - 1) / 6; Spearman 1 - 6 * 2 / (4 * 15)
    assert I.kendall([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert I.spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)
    np.testing.assert_array_equal(I.ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
    assert I.spearman([1, 1, 1], [1, 2, 3]) is None and I.kendall([1, 1, 1], [1, 2, 3]) is None


def test_rank_correlations_match_scipy_with_ties():
    from scipy import stats  # the test extra's: missing, this fails rather than skips
    rng = np.random.default_rng(0)
    for n in (5, 40, 700):  # 700 > one block of Kendall's pairs
        a, b = rng.integers(0, 6, n).astype(float), rng.integers(0, 9, n).astype(float)
        assert I.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
        assert I.kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)  # tau-b
        for x in (0, 3):
            want = stats.beta.ppf(0.95, x + 1, n - x)
            assert I.binomial_upper(x, n) == pytest.approx(want, rel=1e-9)


def test_binomial_upper_bound_known_values():
    assert I.binomial_upper(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-12)  # the rule of three: ~3/n
    assert I.binomial_upper(5, 5) == 1.0 and I.binomial_upper(0, 0) == 1.0
    assert I.binomial_upper(1, 10) > I.binomial_upper(0, 10) > 0


def test_agreement_on_a_hand_made_case():
    prism = np.array([5.0, -4.0, 3.0, 3.0, 1.0])
    total = np.array([5.0, 1.0, -4.0, 0.0, 3.0])
    a = I.agreement(prism, total, 3)
    # top-3 by |prism| with the tie at 3: {0, 1, 2, 3}; by |total|: {0, 2, 4}; shared {0, 2}
    assert a["top_k_precision"] == pytest.approx(2 / 4) and a["top_k_recall"] == pytest.approx(2 / 3)
    assert a["sign_agreement"] == pytest.approx(2 / 5)  # components 0 and 4 agree; 3 has total 0
    # verifying in prism order 0, 1, 2, 3, 4: the true top-3 (0, 2, 4) is complete after 5 re-runs
    assert a["reruns_to_true_top_k"] == 5
    assert I.reruns_to_top_k(prism, total, 2) == 3  # the true top-2 (0, 2)
    assert I.agreement(prism, prism, 2)["spearman"] == pytest.approx(1)


def test_recovered_curve_and_grid():
    f = I.recovered_curve([0, 1, 2, 3], [2.0, 2.5, 3.7, 4.0], ablate="mean", direction="noising")
    assert f["recovered"] == pytest.approx([0, 0.25, 0.85, 1]) and f["k80"] == 2 and f["k90"] == 3
    assert I.faithfulness_grid(5) == [0, 1, 2, 3, 4, 5]
    grid = I.faithfulness_grid(294912)
    assert grid[0] == 0 and grid[-1] == 294912 and len(grid) <= 26 and grid == sorted(set(grid))
    assert I.recovered_curve([0, 1], [1.0, 1.0], ablate="zero", direction="noising")["recovered"] == [None, None]


# ----------------------------------------------------------------------------------------- validate


def test_faithfulness_curve_is_that_of_separate_reruns(models64):
    """Each point of the curve is a forward pass written here: the top k residual parts by |prism| kept, the rest
    replaced at the readout position (noising, mean: the clean run's mean over positions 1 .. T-1; denoising,
    resample: the counterfactual run with the top k set to their clean values), read off the run's own logits.
    The end points 0 and 1 hold by the curve's definition; the points between, and the readouts, are the check."""
    model = models64[5]
    raw = "logits_uncapped" if model.config.final_softcap else "logits"
    clean, cf = model.run(PROMPT), model.run(COUNTER)
    L = model.config.n_layers
    sites = ["embed"] + [f"blocks.{l}.{part}.out" for l in range(L) for part in ("attn", "mlp")]
    for kw in (dict(ablate="mean"), dict(ablate="resample", counterfactual=COUNTER, direction="denoising")):
        v = I.validate(model, PROMPT, level="residual", targets=["#108"], versus=["#116"], **kw)
        f = v.faithfulness
        denoise = kw.get("direction") == "denoising"
        base, donor = (cf, clean) if denoise else (clean, None)
        mean = {name: clean.record[name][1:].mean(axis=0) for name in sites}
        order = np.argsort(-np.abs(v.prism[:, 0]), kind="stable")
        assert [v.labels[i] for i in range(len(sites))] == ["embed"] + [f"L{l}.{p}" for l in range(L)
                                                                          for p in ("attn", "mlp")]
        readouts = []
        for k in f["k"]:
            top = {sites[i] for i in order[:k]}
            edited = top if denoise else set(sites) - top

            def hook(name, value, record, edited=edited, denoise=denoise, donor=donor, mean=mean):
                if name not in edited:
                    return value
                value = value.copy()
                value[6] = donor.record[name][6] if denoise else mean[name]
                return value

            rec = model.run(base.tokens, edit=hook).record
            readouts.append(rec[raw][6, 108] - rec[raw][6, 116])
        m = np.array(readouts)
        np.testing.assert_allclose(f["readout"], m, rtol=1e-10, atol=1e-12)
        assert abs(m[-1] - m[0]) > 1e-3  # a curve worth the name
        middle = (m[1:-1] - m[0]) / (m[-1] - m[0])
        np.testing.assert_allclose(f["recovered"][1:-1], middle, rtol=1e-9, atol=1e-10)
        assert np.ptp(middle) > 1e-3  # the intermediate points differ from one another
        assert f["k80"] == next(k for k, r in zip(f["k"], [0, *middle, 1]) if r >= 0.8)


def test_a_sampled_level_reports_its_bound(models64):
    model = models64[3]
    v = I.validate(model, PROMPT, level="neurons", budget=30, top=5, seed=3, faithfulness=False)
    assert len(v.labels) == 3 * 128 and v.verified.sum() == 30
    b = v.sample_bound
    assert b["sample"] == 25 and b["outside"] == 3 * 128 - 5
    order = np.argsort(-np.abs(v.prism[:, 0]), kind="stable")
    assert v.verified[order[:5]].all()  # the prism's top-5 is always verified
    assert b["threshold"] == pytest.approx(np.abs(v.total[order[:5], 0]).min())
    assert b["upper_bound"] == pytest.approx(I.binomial_upper(b["exceeding"], 25))
    assert v.agreement["reruns_to_true_top_k"] is None and v.agreement["n"] == 30
    j = v.to_json()
    assert len(j["components"]) == 30 and all(c["total"][0] is not None for c in j["components"])
    again = I.validate(model, PROMPT, level="neurons", budget=30, top=5, seed=3, faithfulness=False)
    np.testing.assert_array_equal(again.verified, v.verified)  # the seed fixes the sample


def test_levels(models64):
    cfg = models64[1].config  # 3 layers, 4 heads
    assert [g.labels for g in I.level_groups(cfg, "residual", 6)][:3] == [["embed"], ["L0.attn"], ["L0.mlp"]]
    assert sum(len(g) for g in I.level_groups(cfg, "heads", 6)) == 12
    edges = I.level_groups(cfg, "head-source:2", 3)[0]
    assert edges.labels[:5] == ["L2H0.src0", "L2H0.src1", "L2H0.src2", "L2H0.src3", "L2H1.src0"] and len(edges) == 16
    assert I.level_groups(cfg, "neurons:1", 6)[0].labels[-1] == "L1N127"


# ----------------------------------------------------------------------------------------- CLI and figures


def test_cli_patch_and_validate_json(checkpoint, capsys, tmp_path):
    d = str(checkpoint("tiny-gemma3"))
    assert cli.main(["patch", PROMPT, "--model", d, "--component", "L1H2", "--source", "5", "--ablate", "resample",
                     "--counterfactual", COUNTER, "--targets", "▁Paris", "--versus", "▁Tokyo", "--json",
                     "--plot", str(tmp_path / "p.png")]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["component"] == "L1H2.src5" and j["intervention"] == "patch" and j["columns"] == ["▁Paris - ▁Tokyo"]
    assert j["counterfactual"][5]["piece"] == "▁Japan" and j["at"] == [6]
    assert cli.main(["validate", PROMPT, "--model", d, "--level", "heads", "--ablate", "zero", "--json",
                     "--plot", str(tmp_path / "v.png")]) == 0
    j = json.loads(capsys.readouterr().out)
    assert {"label", "prism", "direct", "total"} <= set(j["components"][0])
    assert {"spearman", "kendall", "sign_agreement", "top_k_precision", "top_k_recall"} <= set(j["agreement"])
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "v.png").stat().st_size > 1000
    assert cli.main(["validate", PROMPT, "--model", d, "--level", "residual", "--ablate", "mean", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "Spearman" in text and "smallest k recovering 80%" in text


def test_validation_figure_panels(models64):
    from refprism.interventions import plots as PI

    v = I.validate(models64[0], PROMPT, level="heads")
    fig = PI._validation_fig(v)
    axes = fig.get_axes()
    assert len(axes) == 3 and axes[2].get_title() == "circuit faithfulness"
    assert len(axes[0].collections[0].get_offsets()) == len(v.labels)  # one point per re-run component
    np.testing.assert_allclose(axes[0].collections[0].get_offsets(), np.stack([v.prism[:, 0], v.total[:, 0]], 1),
                               rtol=1e-6)
    widths = np.array([bar.get_width() for bar in axes[1].patches]).reshape(4, -1)  # prism, post, final, mediated
    totals = axes[1].collections[0].get_offsets()[:, 0]  # the diamonds: each component's total
    np.testing.assert_allclose(widths.sum(axis=0), totals, rtol=1e-6, atol=1e-9)  # the gap's parts add up
    order = np.argsort(-np.abs(v.total[:, 0]), kind="stable")
    np.testing.assert_allclose(totals, v.total[order, 0], rtol=1e-6)
    patch = PI._patch_fig(I.patch(models64[0], PROMPT, "L1H2"))
    assert len(patch.get_axes()[0].patches) == 3  # prism, direct, total for one column


def test_library_refusals(models64):
    model = models64[0]
    with pytest.raises(InputError, match="not a component label"):
        I.patch(model, PROMPT, "L1X2")
    with pytest.raises(InputError, match="needs a counterfactual"):
        I.patch(model, PROMPT, "L1H2", ablate="resample")
    with pytest.raises(InputError, match="top must be at least 1"):
        I.validate(model, PROMPT, level="heads", top=0)
    with pytest.raises(InputError, match="budget must be at least top"):
        I.validate(model, PROMPT, level="heads", top=5, budget=4)
    with pytest.raises(InputError, match="--source picks a head's source"):
        I.parse_component(model.config, "L1N2", T=7, source=3)
