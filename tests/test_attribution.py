"""Attribution methods (refprism/interventions/attribution.py) against patching and against torch autograd.

- Integrated gradients of one component converge to its patched total effect at the midpoint rule's rate:
  err(k) / err(2k) -> 4 (we require 3 .. 5 on components whose error is well above rounding).
- AtP with the true gradient equals the AtP computed from torch autograd on HF's model (float64, HF patched to
  float64 as in test_gradients_hf.py), noising and denoising, on every level: 1e-9 relative (the gradients agree
  to ~1e-10, the activation changes to ~1e-12).
- gradxact is AtP with the zero (or mean) replacement; GradDrop of a last-layer MLP is |AtP|.
"""

import numpy as np
import pytest
import torch
from hf_reference import load_hf
from test_gradients_hf import hf_sites

import refprism
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.interventions import validate
from refprism.interventions.attribution import attribute


def _ids(model, seed, T=9):
    return [int(i) for i in np.random.default_rng(seed).integers(0, model.config.vocab_size, T)]


@pytest.fixture(scope="module")
def gemma2(checkpoint):
    return refprism.load(checkpoint("tiny-gemma2"), dtype="float64")


def test_integrated_gradients_converge_to_the_total_effect_as_one_over_k_squared(gemma2):
    ids = _ids(gemma2, 1)
    v = validate(gemma2, ids, level="residual", targets=["#5"], versus=["#3"], faithfulness=False)
    errs = {k: np.abs(attribute(gemma2, ids, method="ig", level="residual", targets=["#5"], versus=["#3"],
                                steps=k).values - v.total)[:, 0] for k in (8, 16, 32)}
    checked = 0
    for c, label in enumerate(v.labels):
        # embed: zeroing it passes the path through resid_pre[p] = 0, where rms_norm's gradient is ~1 / sqrt(eps):
        # the midpoint rule reaches its 1/k^2 regime only for k >> |x| / sqrt(eps) (measured: no decrease to k = 32)
        if label == "embed" or errs[32][c] < 1e-8:
            continue
        for k in (8, 16):
            ratio = errs[k][c] / errs[2 * k][c]
            assert 3.0 <= ratio <= 5.0, f"{label}: err({k}) / err({2 * k}) = {ratio:.3f}"
        checked += 1
    assert checked >= 4
    assert errs[32][1:].max() < 1e-3 * np.abs(v.total).max()


def test_gradxact_is_atp_with_the_zero_replacement_and_not_the_total(gemma2):
    ids = _ids(gemma2, 2)
    for level in ("heads", "neurons:1", "head-source:0"):
        gx = attribute(gemma2, ids, method="gradxact", level=level, targets=["#5"])
        atp = attribute(gemma2, ids, method="atp", level=level, targets=["#5"])
        np.testing.assert_array_equal(gx.values, atp.values)
        assert gx.cost == {**gx.cost, "forward": 1, "backward": 1}
    mean = attribute(gemma2, ids, method="gradxact", level="heads", targets=["#5"], ablate="mean")
    zero = attribute(gemma2, ids, method="gradxact", level="heads", targets=["#5"])
    assert np.abs(mean.values - zero.values).max() > 1e-3  # the mean replacement is not zero
    v = validate(gemma2, ids, level="heads", targets=["#5"], faithfulness=False)
    assert np.abs(zero.values - v.total).max() > 1e-3  # a linearisation, not the patched effect


def test_graddrop_of_a_last_layer_mlp_is_the_absolute_atp(gemma2):
    ids, cf = _ids(gemma2, 3), _ids(gemma2, 4)
    kw = dict(level="neurons:2", targets=["#5"], versus=["#3"], ablate="resample", counterfactual=cf)
    gd = attribute(gemma2, ids, method="atp-gd", **kw)
    atp = attribute(gemma2, ids, method="atp", **kw)
    np.testing.assert_allclose(gd.values, np.abs(atp.values), rtol=1e-12)
    assert gd.cost["backward"] == gemma2.config.n_layers
    early = dict(kw, level="neurons:0")
    assert np.abs(attribute(gemma2, ids, method="atp-gd", **early).values
                  - np.abs(attribute(gemma2, ids, method="atp", **early).values)).max() > 1e-6


def _torch_atp(hf, model, run_base, run_other, level, coef, tids, p, sign):
    """AtP from torch autograd on HF: sign * sum_t grad(c)[t] . (c_base[t] - c_other[t]) at t = p, with the
    gradient of the readout in HF's model at the base run and both activations read from HF's own tensors."""
    cfg = model.config
    base = hf_sites(hf, cfg.model_type, run_base.record["embed"])
    with torch.no_grad():
        other = hf_sites(hf, cfg.model_type, run_other.record["embed"])
    raw = base["logits_uncapped" if cfg.final_softcap is not None else "logits"][0, p]
    (torch.tensor(coef[0]) * raw[tids]).sum().backward()
    kv = ops.kv_index(cfg.n_heads, cfg.n_kv_heads)

    def z(sites, l):
        return sites[f"blocks.{l}.attn.z"][0].detach().numpy()  # [N, T, H]

    out = []
    kind, _, arg = level.partition(":")
    L = cfg.n_layers
    if kind == "residual":
        names = ["embed"] + [f"blocks.{l}.{k}.out" for l in range(L) for k in ("attn", "mlp")]
        for n in names:
            grad = base[n].grad[0, p].numpy()
            out.append(grad @ (base[n][0, p].detach().numpy() - other[n][0, p].detach().numpy()))
    elif kind == "heads":
        for l in range(L):
            grad = base[f"blocks.{l}.attn.z"].grad[0, :, p].numpy()  # [N, H]
            out += list(np.sum(grad * (z(base, l)[:, p] - z(other, l)[:, p]), axis=-1))
    elif kind == "head-source":
        l = int(arg)
        grad = base[f"blocks.{l}.attn.z"].grad[0, :, p].numpy()  # [N, H]

        def terms(sites):
            pattern = sites[f"blocks.{l}.attn.pattern"][0, :, p, : p + 1].detach().numpy()  # [N, S]
            v = sites[f"blocks.{l}.attn.v"][0].detach().numpy().reshape(-1, cfg.n_kv_heads, cfg.d_head)[: p + 1]
            return pattern[..., None] * v[:, kv].transpose(1, 0, 2)  # [N, S, H]

        out += list(np.einsum("nh,nsh->ns", grad, terms(base) - terms(other)).ravel())
    else:
        l = int(arg)
        name = f"blocks.{l}.mlp.act"
        change = base[name][0, p].detach().numpy() - other[name][0, p].detach().numpy()
        out += list(base[name].grad[0, p].numpy() * change)
    return sign * np.asarray(out)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_atp_equals_torch_autograd_atp(checkpoint, preset, direction):
    model = refprism.load(checkpoint(preset), dtype="float64")
    hf = load_hf(checkpoint(preset), "float64")
    ids, cf = _ids(model, 5), _ids(model, 6)
    clean, corrupt = model.run(ids), model.run(cf)
    base, other = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    for level in ("residual", "heads", "head-source:1", "neurons:0"):
        a = attribute(model, clean, method="atp", level=level, targets=["#5"], versus=["#3"], ablate="resample",
                      counterfactual=corrupt, direction=direction)
        tids, coef = a.setting.readout.targets.coefficients(np.float64)
        ref = _torch_atp(hf, model, base, other, level, coef, tids, a.setting.position,
                         1 if direction == "noising" else -1)
        scale = np.abs(ref).max()
        assert scale > 1e-3
        assert np.abs(a.values[:, 0] - ref).max() <= 1e-9 * scale, (level, np.abs(a.values[:, 0] - ref).max())


def test_attribute_refuses_bad_arguments(gemma2):
    ids = _ids(gemma2, 7)
    for kwargs, text in [({"method": "eip"}, "method 'eip' is not one of .*eap, eap-ig"),
                         ({"method": "atp*"}, "needs --level heads"), ({"method": "ig", "steps": 0}, "steps"),
                         ({"method": "gradxact", "ablate": "resample", "counterfactual": ids}, "gradxact"),
                         ({"level": "layers"}, "not a level")]:
        with pytest.raises(InputError, match=text):
            attribute(gemma2, ids, **kwargs)


def test_validate_methods_sets_each_method_beside_the_totals(gemma2):
    from refprism.interventions.agreement import agreement
    from refprism.interventions.attribution import validate_methods

    ids, cf = _ids(gemma2, 8), _ids(gemma2, 9)
    kw = dict(level="heads", targets=["#5"], versus=["#3"], ablate="resample", counterfactual=cf,
              direction="denoising")
    r = validate_methods(gemma2, ids, methods=["atp", "ig"], steps=4, faithfulness=False, **kw)
    v = r.validation
    alone = attribute(gemma2, ids, method="atp", **kw)
    assert r.methods["atp"].labels == v.labels
    np.testing.assert_allclose(r.methods["atp"].values, alone.values, rtol=1e-12)
    assert r.agreement("ig") == agreement(r.methods["ig"].values[:, 0], v.total[:, 0], v.agreement["k"])
    assert np.abs(r.methods["ig"].values - v.total).max() < np.abs(alone.values - v.total).max()
    j = r.to_json()
    assert set(j["methods"]) == {"atp", "ig", "prism"} and j["direction"] == "denoising"
    assert all("atp" in c and "ig" in c for c in j["components"])
    assert j["methods"]["ig"]["cost"]["forward"] > j["methods"]["atp"]["cost"]["forward"]


def test_cli_attribute_and_validate_methods(checkpoint, capsys):
    import json

    from refprism import cli

    d = str(checkpoint("tiny-gemma3"))
    args = ["--model", d, "--ids", "2,5,7,9,11,13", "--level", "heads", "--ablate", "zero", "--targets", "#5"]
    assert cli.main(["attribute", *args, "--method", "atp", "--method", "gradxact", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["components"][0]["label"] == "L0H0" and set(out["methods"]) == {"atp", "gradxact"}
    assert out["components"][0]["atp"] == out["components"][0]["gradxact"]
    assert (out["intervention"], out["ablate"], out["direction"], out["position"], out["at"]) == \
        ("attribute", "zero", "noising", 5, [5])
    assert out["counterfactual"] is None and out["reference"] is None and [t["id"] for t in out["targets"]] == [5]
    # every setting key from its flag: resample, denoising, another position, the counterfactual's tokens
    cf = [2, 6, 8, 10, 12, 14]
    assert cli.main(["attribute", *args[:-4], "--ablate", "resample", "--counterfactual-ids", ",".join(map(str, cf)),
                     "--direction", "denoising", "--position", "4", "--targets", "#5", "--method", "atp",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ablate"], out["direction"], out["position"], out["at"]) == ("resample", "denoising", 4, [4])
    assert [t["id"] for t in out["counterfactual"]] == cf and out["reference"] is None
    assert [t["id"] for t in out["tokens"]] == [2, 5, 7, 9, 11, 13] and set(out["methods"]) == {"atp"}
    api = attribute(refprism.load(d), [2, 5, 7, 9, 11, 13], method="atp", level="heads", targets=["#5"],
                    ablate="resample", counterfactual=cf, direction="denoising", position=4)
    assert [c["label"] for c in out["components"]] == api.labels
    np.testing.assert_array_equal([c["atp"] for c in out["components"]], api.values)
    assert cli.main(["validate", *args, "--methods", "atp", "--no-faithfulness"]) == 0
    assert "each method's agreement" in capsys.readouterr().out
    assert cli.main(["attribute", *args, "--method", "eip"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refprism: error: method 'eip'") and "\n" not in err


def _qk_brute(model, clean, other, p, l, n, g_z):
    """The QK fix of head n (layer l) at the readout position p by brute force: z's change (clean minus other)
    from the values (linear), the row softmaxed again with the other run's query, and with each other-run key
    alone (the other keys clean), read by g_z = dR/dz[p, n] [Z, H]: [Z]. Head n's own row only: its kv head's
    keys and values, no other query head."""
    cfg = model.config
    b = f"blocks.{l}."
    j = ops.kv_index(cfg.n_heads, cfg.n_kv_heads)[n]
    q, k, v = (clean.record[b + x][:, [n if x == "attn.q" else j]] for x in ("attn.q", "attn.k", "attn.v"))
    q2, k2, v2 = (other.record[b + x][:, [n if x == "attn.q" else j]] for x in ("attn.q", "attn.k", "attn.v"))
    scale = cfg.query_pre_attn_scalar ** -0.5
    window = cfg.sliding_window if cfg.is_sliding(l) else None  # Gemma 2/3's sliding layers

    def row(qq, kk):
        return ops.causal_softmax(ops.attention_scores(qq, kk, scale), window, cap=cfg.attn_softcap)[0, p]  # [S]

    A = row(q, k)
    dz = A @ (v[:, 0] - v2[:, 0])  # the value part's change of z (clean minus other)
    dz -= (row(q2, k) - A) @ v[:, 0]
    for s in range(p + 1):
        k_s = k.copy()
        k_s[s] = k2[s]
        dz -= (row(q, k_s) - A) @ v[:, 0]
    return g_z @ dz  # [Z]


def test_atp_star_qk_fix_against_brute_force_and_its_linear_limit(gemma2):
    """atp* (heads, resample): each part recomputed by brute force here (the pattern row softmaxed again with the
    other run's query, and with each other-run key alone) for every head of a layer whose query heads share kv
    heads (4 heads, 2 kv heads: a key part summed over the heads of a kv group would differ), and as the other run
    approaches the clean one, atp* and atp agree to second order: |atp* - atp| / |atp| shrinks in proportion to
    the change."""
    from refprism.gradients.backward import gradients

    model, cfg = gemma2, gemma2.config
    assert cfg.n_kv_heads < cfg.n_heads
    ids = _ids(model, 10)
    clean = model.run(ids)
    d = np.random.default_rng(0).standard_normal(clean.record["embed"].shape)

    def nearby(eps):
        return model.run(ids, edit=lambda name, v, r: v + eps * d if name == "embed" else v)

    other = nearby(1.0)
    kw = dict(level="heads", targets=["#5"], versus=["#3"], ablate="resample")
    star = attribute(model, clean, method="atp*", counterfactual=other, **kw)
    p, l = star.setting.position, 1  # layer 1 (full attention)
    g_z = gradients(model, clean, targets=star.setting.readout.targets, position=p).record[f"blocks.{l}.attn.z"]
    for n in range(cfg.n_heads):
        expected = _qk_brute(model, clean, other, p, l, n, g_z[:, p, n])
        np.testing.assert_allclose(star.values[star.labels.index(f"L{l}H{n}")], expected, rtol=1e-10)

    gaps = []
    for eps in (1e-2, 1e-3):
        o = nearby(eps)
        a1 = attribute(model, clean, method="atp*", counterfactual=o, **kw).values
        a0 = attribute(model, clean, method="atp", counterfactual=o, **kw).values
        gaps.append(np.abs(a1 - a0).max() / np.abs(a0).max())
    assert 5 < gaps[0] / gaps[1] < 20, gaps  # O(eps): 10x smaller for a 10x smaller change


def test_atp_star_with_graddrop_against_brute_force(gemma2):
    """atp*-gd, AtP* in full: the brute-force QK fix read by the gradient of each backward with one other layer
    dropped, |.| averaged over those layers; a last-layer head's is |atp*| (no later layer to drop)."""
    from refprism.gradients.backward import gradients

    model, cfg = gemma2, gemma2.config
    ids, cf = _ids(model, 13), _ids(model, 14)
    clean, other = model.run(ids), model.run(cf)
    kw = dict(level="heads", targets=["#5"], versus=["#3"], ablate="resample", counterfactual=other)
    full = attribute(model, clean, method="atp*-gd", **kw)
    star = attribute(model, clean, method="atp*", **kw)
    assert full.cost["backward"] == cfg.n_layers and full.cost["forward"] == 2
    s = full.setting
    L = cfg.n_layers
    drops = {d: gradients(model, clean, targets=s.readout.targets, position=s.position, drop=[d]).record
             for d in range(L)}
    for l in range(L):
        for n in range(cfg.n_heads):
            parts = [np.abs(_qk_brute(model, clean, other, s.position, l, n,
                                      drops[d][f"blocks.{l}.attn.z"][:, s.position, n])) for d in range(L) if d != l]
            np.testing.assert_allclose(full.values[full.labels.index(f"L{l}H{n}")], np.mean(parts, axis=0),
                                       rtol=1e-10, err_msg=f"L{l}H{n}")
    last = [i for i, label in enumerate(full.labels) if label.startswith(f"L{L - 1}H")]
    np.testing.assert_allclose(full.values[last], np.abs(star.values[last]), rtol=1e-12)
    first = [i for i, label in enumerate(full.labels) if label.startswith("L0H")]
    assert np.abs(full.values[first] - np.abs(star.values[first])).max() > 1e-6  # dropping a later layer matters
    with pytest.raises(InputError, match="atp\\*-gd estimates a head's patch"):
        attribute(model, clean, method="atp*-gd", level="heads", targets=["#5"])
    from refprism.interventions.attribution import validate_methods

    r = validate_methods(model, clean, methods=["atp*-gd"], faithfulness=False, **kw)
    np.testing.assert_array_equal(r.scores("atp*-gd"), full.values)
    assert r.agreement("atp*-gd")["sign_agreement"] is None  # unsigned, as atp-gd
    with pytest.raises(InputError, match="atp\\*-gd estimates a head's patch"):
        validate_methods(model, clean, methods=["atp", "atp*-gd"], level="heads", targets=["#5"], ablate="zero")


def test_validate_methods_table_and_figure_show_every_method(gemma2):
    from refprism.interventions import plots as PI
    from refprism.interventions.attribution import validate_methods

    ids = _ids(gemma2, 11)
    r = validate_methods(gemma2, ids, methods=["gradxact", "atp", "ig"], steps=2, level="heads", targets=["#5"],
                         faithfulness=False, top=3)
    text = r.table()
    for m in ("prism", "gradxact", "atp", "ig"):
        g = r.validation.agreement if m == "prism" else r.agreement(m)
        line = next(x for x in text.splitlines() if x.startswith(f"{m} "))
        assert f"{g['top_k_recall']:.3f}" in line and line.split()[6] == str(g["reruns_to_true_top_k"]), line
    fig = PI._validation_fig(r)
    ax = fig.get_axes()[-1]
    assert len(fig.get_axes()) == 3 and ax.get_title() == "each method against the total (y = x)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [x.split(":")[0] for x in labels] == ["prism", "gradxact", "atp", "ig"]
    # ig: 3 layers x 4 heads x 2 steps = 24 re-runs and backward passes, plus the base run
    assert f"Spearman {r.agreement('ig')['spearman']:.2f}" in labels[3] and "25 + 24 passes" in labels[3]
    v = r.validation
    np.testing.assert_allclose(ax.collections[3].get_offsets(), np.stack([v.total[:, 0], r.methods["ig"].values[:, 0]],
                                                                         1), rtol=1e-6)
    j = r.to_json()
    assert j["methods"]["prism"]["cost"]["seconds"] is None and j["methods"]["ig"]["cost"]["seconds"] > 0


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_attribute_runs_unembed_only_the_readout_position_with_the_same_scores(gemma2, direction, monkeypatch):
    """attribute's own runs keep the logits only at the readout position (the [T, V] product elsewhere skipped),
    the prompt and its counterfactual in one packed pass (Model.run_many: each run is the packed pass's own, and
    its own separate run's to rounding); its scores are those computed from full-record runs of that pass bit for
    bit (no score reads the logits), and the separate runs' to rounding."""
    from refprism.gemma.record import Rows
    from refprism.interventions.attribution import linear_scores, qk_fixed_scores
    from refprism.interventions.components import level_groups
    from refprism.interventions.setting import setting

    ids, other = _ids(gemma2, 3), _ids(gemma2, 4)
    kw = dict(targets=["#5"], versus=["#3"], position=-2, at="all", ablate="resample", counterfactual=other,
              direction=direction)
    import refprism.model as M

    passes = []

    def counted(name, f):
        return lambda *a, **k: passes.append(name) or f(*a, **k)

    for name in ("forward", "forward_packed"):  # the passes Model.run and Model.run_many make
        monkeypatch.setattr(M, name, counted(name, getattr(M, name)))
    s = setting(gemma2, ids, readout_logits_only=True, **kw)
    assert passes == ["forward_packed"]  # the two prompts in one pass
    monkeypatch.undo()
    for run in (s.clean, s.counterfactual):
        logits = run.record["logits_uncapped"]
        assert isinstance(logits, Rows) and logits.positions == (len(ids) - 2,)
        assert run.record.shape_of("blocks.0.mlp.gate") == (len(ids), gemma2.config.d_mlp)
    # the pair is one packed pass: each run is run_many's, bit for bit
    packed = gemma2.run_many([ids, other], positions=[-2])
    for run, own in zip((s.clean, s.counterfactual), packed):
        for name in own.record:
            if name.startswith("logits"):
                np.testing.assert_array_equal(run.record[name][len(ids) - 2], own.record[name][len(ids) - 2])
            else:
                np.testing.assert_array_equal(run.record[name], own.record[name], err_msg=name)
    full = setting(gemma2, ids, **kw)
    assert full.clean.record.selection is None
    # the readout's value is one row of the unembedding: a 1-row product sums in another order than the [T, V] one
    np.testing.assert_allclose(s.readout.whole, full.readout.whole, rtol=1e-14)
    groups = level_groups(gemma2.config, "heads", full.position)
    for method, scores in (("atp", linear_scores), ("atp*", qk_fixed_scores)):
        a = attribute(gemma2, ids, method=method, level="heads", **kw)
        np.testing.assert_array_equal(a.values, scores(s, groups))
        separate = scores(full, groups)  # each prompt run alone: the same to float64 rounding
        np.testing.assert_allclose(a.values, separate, rtol=0, atol=1e-12 * np.abs(separate).max())
    with pytest.raises(InputError, match="position 9 is out of range for 9 tokens"):
        attribute(gemma2, ids, method="atp", level="heads", position=9)
    # the runs it made (logits at the readout position only) are taken back as full ones (the CLI's many methods)
    again = attribute(gemma2, s.clean, method="atp", level="heads", **{**kw, "counterfactual": s.counterfactual})
    np.testing.assert_array_equal(again.values, linear_scores(s, groups))
    with pytest.raises(InputError, match="the prompt is a run with a selective record"):  # sites missing: refused
        attribute(gemma2, gemma2.run(ids, record=["logits@-1"]), method="atp", level="heads", targets=["#5"])


def test_validate_methods_score_the_re_run_components_so_ig_runs_at_a_neurons_level(gemma2):
    """A level larger than the budget: validate re-runs the prism's top-k and a sample, and every method scores
    those components only. ig on all 128 neurons x 16 steps (2048 re-runs) is more than attribute allows; on the
    8 re-run ones it is 128 re-runs, and each score is that neuron's (it converges to its total; the other
    methods' scores are their whole-level scores at the same labels)."""
    from refprism.interventions.agreement import agreement
    from refprism.interventions.attribution import validate_methods

    ids = _ids(gemma2, 12)
    kw = dict(level="neurons:1", targets=["#5"], versus=["#3"])
    with pytest.raises(InputError, match="2048 re-runs"):
        attribute(gemma2, ids, method="ig", steps=16, **kw)
    r = validate_methods(gemma2, ids, methods=["ig", "atp"], steps=16, budget=8, top=3, faithfulness=False, **kw)
    v = r.validation
    rows = np.flatnonzero(v.verified)
    assert len(v.labels) == 128 and len(rows) == 8
    verified = [v.labels[i] for i in rows]
    assert r.methods["ig"].labels == verified and r.methods["atp"].labels == verified
    assert r.methods["ig"].cost["forward"] == 8 * 16 + 1 and r.methods["ig"].cost["backward"] == 8 * 16
    whole = attribute(gemma2, ids, method="atp", **kw)
    np.testing.assert_array_equal(r.scores("atp"), whole.values[rows])
    ig, total = r.scores("ig")[:, 0], v.total[rows, 0]
    assert np.abs(total).max() > 1e-3
    assert np.abs(ig - total).max() < 1e-3 * np.abs(total).max(), np.c_[ig, total]  # midpoint rule, k = 16
    assert np.abs(r.scores("atp")[:, 0] - total).max() > 10 * np.abs(ig - total).max()  # not the linearisation
    assert r.agreement("ig") == {**agreement(ig, total, 3), "reruns_to_true_top_k": None}
    j = r.to_json()
    assert [c["label"] for c in j["components"]] == verified and all("ig" in c for c in j["components"])
    with pytest.raises(InputError, match="'L1N999' is not a component of level neurons:1"):
        attribute(gemma2, ids, method="atp", components=["L1N3", "L1N999"], **kw)


def test_cli_validate_ig_at_a_neurons_level_beyond_attributes_limit(checkpoint, capsys):
    import json

    from refprism import cli

    args = ["--model", str(checkpoint("tiny-gemma3")), "--ids", "2,5,7,9,11,13", "--level", "neurons:1", "--ablate",
            "zero", "--targets", "#5", "--steps", "9"]  # 128 neurons x 9 steps = 1152 re-runs: attribute refuses
    assert cli.main(["attribute", *args, "--method", "ig"]) == 2
    assert "1152 re-runs" in capsys.readouterr().err
    assert cli.main(["validate", *args, "--methods", "ig", "--budget", "4", "--top", "2", "--no-faithfulness",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_components"] == 128 and out["n_verified"] == 4 and len(out["components"]) == 4
    assert all(len(c["ig"]) == 1 for c in out["components"])
    assert out["methods"]["ig"]["cost"]["forward"] == 4 * 9 + 1


def test_cli_attribute_scores_only_the_components_given(checkpoint, capsys):
    """--components: ig on a few neurons of a level whose whole ig attribute refuses (128 x 9 re-runs); the JSON
    holds those components, in the level's order, with the numbers attribute(components=) gives; bad lists are
    one line, before or after the weights."""
    import json

    from refprism import cli

    d = checkpoint("tiny-gemma3")
    args = ["--model", str(d), "--ids", "2,5,7,9,11,13", "--level", "neurons:1", "--ablate", "zero", "--targets",
            "#5", "--steps", "9"]
    assert cli.main(["attribute", *args, "--method", "ig", "--method", "atp", "--components", "L1N7, L1N2",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["label"] for c in out["components"]] == ["L1N2", "L1N7"]
    assert out["methods"]["ig"]["cost"]["forward"] == 2 * 9 + 1
    model = refprism.load(d)
    lib = attribute(model, [2, 5, 7, 9, 11, 13], method="ig", level="neurons:1", ablate="zero", targets=["#5"],
                    steps=9, components=["L1N2", "L1N7"])
    np.testing.assert_allclose([c["ig"][0] for c in out["components"]], lib.values[:, 0], rtol=1e-6, atol=1e-9)
    for extra, text in [(["--components", "L1N2", "--method", "eap"], "--components picks components, not edges"),
                        (["--components", " , ", "--method", "atp"], "--components names no component"),
                        (["--components", "L0N2", "--method", "atp"], "'L0N2' is not a component of level neurons:1")]:
        assert cli.main(["attribute", *args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err, err
