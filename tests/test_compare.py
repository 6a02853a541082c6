"""refprism.compare's core, without HF: metrics on literal cases, the replay, floors, and the other side's
imperfections (missing sites, NaN, masked scores, printed summaries, other tokens).

The other side here is refprism itself, recorded through the forward pass's edit hook: a float32 run is an honest
implementation (within its floors by construction of nothing: its errors are measured, not assumed), and a run
with one op edited is an implementation with that one op wrong, self-consistent downstream.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import refprism
from refprism import crosscheck as C
from refprism.crosscheck import catalogue, floors, ggml, replay
from refprism.crosscheck.capture import Capture, Summary
from refprism.errors import InputError

IDS = [2, 455, 17, 301, 88, 260, 41, 7, 130]


def recorded(model, ids=IDS, edit=None, source="refprism-float32"):
    """A Capture of refprism's own float32 run (optionally with an edit): every site, as a port would dump it."""
    run = model.run(ids, edit=edit)
    return Capture(source=source, tokens=np.asarray(ids), arrays=dict(run.record), dtype="float32")


# ------------------------------------------------------------------------------------------ metrics


def test_errors_on_a_literal_case():
    ref = np.array([[1.0, -2.0], [0.5, 4.0]])
    theirs = np.array([[1.0, -2.5], [0.5, 4.0]])
    e = floors.errors(theirs, ref, letters=("T", "D"))
    assert e["max_abs"] == 0.5 and e["max_rel"] == 0.5 / 4.0
    assert e["worst"] == {"T": 0, "D": 1}
    assert e["nmse_db"] == pytest.approx(10 * math.log10(0.25 / (1 + 4 + 0.25 + 16)))
    cos = (1 + 5 + 0.25 + 16) / (math.sqrt(1 + 6.25 + 0.25 + 16) * math.sqrt(1 + 4 + 0.25 + 16))
    assert e["cosine"] == pytest.approx(cos, rel=1e-15)
    exact = floors.errors(ref, ref)
    assert exact["max_abs"] == 0 and exact["nmse_db"] == -math.inf and exact["cosine"] == pytest.approx(1.0)


def test_errors_mask_and_nonfinite():
    ref = np.zeros((2, 3, 3))
    theirs = np.zeros((2, 3, 3))
    theirs[1, 0, 2] = np.finfo(np.float32).min  # a masked score holding the mask's value
    theirs[1, 2, 1] = 0.25
    mask = np.tril(np.ones((3, 3), bool))
    e = floors.errors(theirs, ref, mask, letters=("N", "T", "S"))
    assert e["max_abs"] == 0.25 and e["worst"] == {"N": 1, "T": 2, "S": 1}
    theirs[0, 1, 1] = np.nan
    e = floors.errors(theirs, ref, mask, letters=("N", "T", "S"))
    assert e["max_abs"] == math.inf and e["nonfinite"] == 1 and e["worst"] == {"N": 0, "T": 1, "S": 1}


def test_logit_metrics_literal():
    ref = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    theirs = np.log(np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]))
    g = floors.logit_metrics(theirs, ref, k=2)
    kl0 = 0.5 * 0 + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.3)
    assert g["kl_max"] == pytest.approx(kl0, rel=1e-12) and g["kl_mean"] == pytest.approx(kl0 / 2, rel=1e-12)
    assert g["topk_overlap_min"] == 0.5 and g["argmax_agree"] == 1.0 and g["first_argmax_mismatch"] is None
    g = floors.logit_metrics(ref[::-1], ref, k=1)
    assert g["argmax_agree"] == 0.0 and g["first_argmax_mismatch"] == 0


def test_interleaved_rope_pairs_neighbours_split_half_pairs_halves():
    x = np.zeros((1, 1, 4))
    x[..., 0] = 1.0
    cos, sin = np.array([[0.0, 1.0, 0.0, 1.0]]), np.array([[1.0, 0.0, 1.0, 0.0]])  # angle pi/2 for i = 0
    np.testing.assert_allclose(catalogue.rope_interleaved(x, cos, sin)[0, 0], [0, 1, 0, 0])  # dim 0 -> dim 1
    from refprism.gemma import ops

    np.testing.assert_allclose(ops.rope(x, cos, sin)[0, 0], [0, 0, 1, 0])  # dim 0 -> dim H/2


def test_gelu_erf_literal():
    assert catalogue.gelu_erf(np.array([1.0]))[0] == pytest.approx(0.8413447460685429, rel=1e-15)


# ------------------------------------------------------------------------------------------ the replay


def test_reference_is_exact_and_a_float64_replay_of_itself_has_no_local_error(tiny64):
    """refprism float64 against itself: every error is 0, inherited and local (the replay runs the same ops on the
    same values)."""
    r = C.compare(tiny64, IDS, against=recorded(tiny64), dtype="float64")
    from refprism.gemma.record import symbolic_shapes

    assert r.exit_status == 0 and len(r.sites) == len(symbolic_shapes(tiny64.config))
    assert all(s.max_abs == 0 and s.local_max_abs == 0 for s in r.sites)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_plumbing_refprism_float32_against_its_own_record_is_within_its_floors(checkpoint, preset):
    """A plumbing test, not a check of the floors: refprism's float32 record as the other side, so the errors are
    0 and any floor passes. What shows that the floors can fail: test_one_edited_op_is_exactly_the_one_wrong_op
    below and tests/test_compare_catalogue.py (broken HF models found at float32, bfloat16 and float16)."""
    model = refprism.load(checkpoint(preset))
    for T, seed in [(1, 0), (9, 1), (17, 2)]:
        ids = [2] + np.random.default_rng(seed).integers(3, 512, T - 1).tolist()
        r = C.compare(model, ids, against=recorded(model, ids))
        assert r.exit_status == 0, r.table()
        assert max(s.max_abs / s.floor for s in r.sites) < 1  # (no site is exactly at its floor by accident)


def test_floors_are_tight_enough_to_matter(tiny):
    """float32 floors sit at ~1e-6 of each site's scale, never near the size of a real mistake (1e-4)."""
    r = C.compare(tiny, IDS, against=recorded(tiny))
    for s in r.sites:
        assert s.floor <= 3e-5 * s.scale + 1e-30, (s.site, s.floor, s.scale)
        assert s.local_floor <= 3e-5 * s.scale + 1e-30, (s.site, s.local_floor, s.scale)


@pytest.mark.parametrize("preset,site", [("tiny", "blocks.1.mlp.up"), ("tiny-gemma2", "blocks.0.attn.scores"),
                                         ("tiny-gemma3", "blocks.2.attn.z"), ("tiny", "ln_final.out"),
                                         ("tiny-gemma2", "logits_uncapped")])
def test_one_edited_op_is_exactly_the_one_wrong_op(checkpoint, preset, site):
    """A float32 run whose one op is off by 1e-4 of its scale, everything downstream computed from it: the replay
    names that op alone, though the error reaches every later site."""
    model = refprism.load(checkpoint(preset))

    def off(name, value, record):
        if name != site:
            return value
        wobble = np.sin(np.arange(value.size, dtype=np.float32)).reshape(value.shape)  # not a scale: norms see it
        return value + np.float32(1e-4) * np.abs(value).max() * wobble

    r = C.compare(model, IDS, against=recorded(model, edit=off))
    assert r.wrong_ops == [site], r.table()
    assert r.first_divergence == site and r.exit_status == 1
    names = [s.site for s in r.sites]
    assert all(s.diverges for s in r.sites[names.index(site):] if s.site != "ln_final.scale")


def test_weights_seen_in_float64_are_exact(tiny):
    w = floors.WeightsAs(tiny.params, np.float64)
    assert w.block(1)["W_Q"].dtype == np.float64
    np.testing.assert_array_equal(w.block(1)["W_Q"], tiny.params.block(1)["W_Q"])
    h = np.random.default_rng(0).standard_normal((3, tiny.config.d_model))
    np.testing.assert_allclose(w.unembed(h, chunk=100), h @ tiny.params.embedding().astype(np.float64).T,
                               rtol=1e-13, atol=1e-13)  # float64 sums of 64 terms of order 1, in any order


def test_float32_rope_angles_match_torch():
    """The honest float32 profile's RoPE tables are HF's: float32 inv_freq, float32 angles (exact position)."""
    import torch

    cos, sin = replay.rope_tables_float32(np.arange(300), 16, 10_000.0)
    inv = 1.0 / (10_000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    ang = torch.arange(300).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    np.testing.assert_allclose(cos, ang.cos().numpy(), atol=2e-7)
    np.testing.assert_allclose(sin, ang.sin().numpy(), atol=2e-7)


# ------------------------------------------------------------------------------------------ imperfect other sides


def test_missing_sites_are_listed_and_the_rest_compared(tiny):
    cap = recorded(tiny)
    cap.arrays = {k: v for k, v in cap.arrays.items() if k.endswith(("resid_post", "logits"))}
    r = C.compare(tiny, IDS, against=cap)
    assert r.exit_status == 0 and [s.site for s in r.sites] == ["blocks.0.resid_post", "blocks.1.resid_post",
                                                                 "logits"]
    assert "blocks.0.attn.q" in r.missing and "not provided by the other side" in r.table()


def test_missing_intermediate_sites_still_find_the_op_and_its_cause(tiny, monkeypatch):
    """Only resid_post and logits dumped, exact GELU in layer 1: the wrong op is layer 1's resid_post (its span
    covers the whole layer) and the diagnosis still finds the GELU inside it."""
    def exact_gelu(name, value, record):
        if name == "blocks.1.mlp.act":
            return (catalogue.gelu_erf(record["blocks.1.mlp.gate"]) * record["blocks.1.mlp.up"]).astype(np.float32)
        return value

    cap = recorded(tiny, edit=exact_gelu)
    cap.arrays = {k: v for k, v in cap.arrays.items() if k.endswith(("resid_post", "logits"))}
    r = C.compare(tiny, IDS, against=cap)
    assert r.first_wrong_op == "blocks.1.resid_post"
    assert [d["variant"] for d in r.diagnosis if d["explains"]] == ["gelu_exact"]
    assert r.diagnosis[0]["acts_at"] == ["blocks.1.mlp.act"]


def test_nan_is_a_divergence_at_that_site_not_a_crash(tiny):
    cap = recorded(tiny)
    bad = cap.arrays["blocks.1.attn.v"].copy()
    bad[3, 0, 5] = np.nan
    cap.arrays["blocks.1.attn.v"] = bad
    r = C.compare(tiny, IDS, against=cap)
    site = next(s for s in r.sites if s.site == "blocks.1.attn.v")
    assert site.diverges and site.nonfinite == 1 and site.worst == {"T": 3, "K": 0, "H": 5}
    assert r.first_wrong_op == "blocks.1.attn.v" and r.exit_status == 1
    j = json.loads(json.dumps(r.to_json(), allow_nan=False))  # strict JSON: no NaN anywhere
    assert j["sites"][[s["site"] for s in j["sites"]].index("blocks.1.attn.v")]["max_abs"] is None


def test_masked_scores_are_not_compared_but_masked_pattern_entries_are(checkpoint):
    model = refprism.load(checkpoint("tiny-gemma2"))
    cap = recorded(model)
    scores = cap.arrays["blocks.0.attn.scores"].copy()  # a sliding layer: window 4
    T = scores.shape[1]
    allowed = floors.compared_mask(model.config, "blocks.0.attn.scores", T)[0]
    assert not allowed[8, 4] and allowed[8, 5] and not allowed[2, 3]  # outside the window; inside; the future
    scores[:, ~allowed] = np.finfo(np.float32).min  # HF's eager: scores + mask
    cap.arrays["blocks.0.attn.scores"] = scores
    assert C.compare(model, IDS, against=cap).exit_status == 0
    pattern = cap.arrays["blocks.0.attn.pattern"].copy()
    pattern[1, 8, 2] = 1e-3  # attention outside the window
    cap.arrays["blocks.0.attn.pattern"] = pattern
    r = C.compare(model, IDS, against=cap)
    assert r.first_wrong_op == "blocks.0.attn.pattern"
    assert r.sites[[s.site for s in r.sites].index("blocks.0.attn.pattern")].local_worst == {"N": 1, "T": 8, "S": 2}


def test_printed_summaries_are_compared_by_element_and_sum(tiny):
    """llama.cpp's llama-debug prints a few elements and the sum: those are compared, with floors derived the same
    way, and no local error (a replay needs the whole array)."""
    run = tiny.run(IDS)
    out = run.record["blocks.1.attn.out"]
    good = Summary(shape=out.shape, elements={(0, 0): float(out[0, 0]), (8, 63): float(out[8, 63])},
                   total=float(out.astype(np.float64).sum()))
    cap = Capture("llama.cpp", np.asarray(IDS), arrays={"logits": run.logits}, summaries={"blocks.1.attn.out": good})
    r = C.compare(tiny, IDS, against=cap)
    s = r.sites[[x.site for x in r.sites].index("blocks.1.attn.out")]
    assert s.summary and not s.diverges and s.local_max_abs is None and r.exit_status == 0
    good.total += 1e-2
    r = C.compare(tiny, IDS, against=cap)
    s = r.sites[[x.site for x in r.sites].index("blocks.1.attn.out")]
    assert s.diverges and s.worst == {"sum": True} and r.exit_status == 1
    assert r.first_wrong_op is None and "printed elements and sum only" in r.table()
    good.total -= 1e-2
    good.elements[(8, 63)] += 1e-3
    s = C.compare(tiny, IDS, against=cap).sites[0]
    assert s.site == "blocks.1.attn.out" and s.diverges and s.worst == {"T": 8, "D": 63}
    # llama.cpp keeps only some rows of the last layer: the sum covers those rows, element indices stay whole
    last = Summary(shape=(1, out.shape[1]), elements={(8, 0): float(run.record["blocks.1.resid_post"][8, 0])},
                   total=float(run.record["blocks.1.resid_post"][8].astype(np.float64).sum()), rows=(8,))
    cap.summaries = {"blocks.1.resid_post": last}
    r = C.compare(tiny, IDS, against=cap)
    assert r.exit_status == 0 and r.sites[0].site == "blocks.1.resid_post"


def test_a_mis_shaped_array_is_named(tiny):
    cap = recorded(tiny)
    cap.arrays["blocks.0.attn.q"] = cap.arrays["blocks.0.attn.q"].transpose(1, 0, 2)
    with pytest.raises(InputError, match=r"blocks\.0\.attn\.q has shape \[4, 9, 16\], this model and prompt give "
                                         r"\[9, 4, 16\]"):
        C.compare(tiny, IDS, against=cap)


def test_arrays_must_hold_floats_and_bfloat16_is_one(tiny):
    import ml_dtypes

    cap = recorded(tiny)
    cap.arrays["logits"] = cap.arrays["logits"].astype(ml_dtypes.bfloat16)
    r = C.compare(tiny, IDS, against=cap)  # logits rounded to bfloat16: float32 floors see it, bfloat16's do not
    assert r.wrong_ops == ["logits"] and r.sites[-1].max_rel < 2 ** -8
    assert C.compare(tiny, IDS, against=cap, dtype="bfloat16").exit_status == 0
    cap.arrays["logits"] = cap.arrays["logits"].astype(np.int64)
    with pytest.raises(InputError, match=r"refprism-float32: logits holds int64 values, not floats"):
        C.compare(tiny, IDS, against=cap)


def test_other_tokens_stop_the_comparison(tiny):
    cap = recorded(tiny)
    r = C.compare(tiny, [2, 455, 17, 301, 88, 260, 41, 8, 130], against=cap)
    assert not r.tokens_match and r.exit_status == 2 and r.sites == []
    assert r.headline().startswith("tokens differ at position 7: ours 8 (") and "theirs 7 (" in r.headline()


def test_json_has_the_documented_keys(tiny):
    j = C.compare(tiny, IDS, against=recorded(tiny)).to_json()
    assert {"tokens_match", "sites", "first_divergence", "first_wrong_op", "diagnosis", "exit_status"} <= set(j)
    assert {"site", "max_abs", "floor", "local_max_abs", "diverges", "max_rel", "nmse_db", "cosine",
            "worst"} <= set(j["sites"][0])
    assert j["sites"][-1]["logits"]["argmax_agree"] == 1.0
    json.dumps(j, allow_nan=False)


def test_unknown_dtype_of_the_other_side_is_refused(tiny):
    cap = recorded(tiny)
    cap.dtype = "Q4_K_M"
    with pytest.raises(InputError, match=r"the other side's dtype 'Q4_K_M' has no floor: give its arithmetic"):
        C.compare(tiny, IDS, against=cap)
    assert C.compare(tiny, IDS, against=cap, dtype="float32").exit_status == 0


def test_catalogue_entries_are_named_once_with_their_site_kinds():
    names = [m.name for m in catalogue.CATALOGUE]
    assert len(names) == len(set(names))
    from refprism.checkpoints.synth import make_config
    from refprism.gemma.record import symbolic_shapes

    kinds = set().union(*(symbolic_shapes(refprism.Config.from_hf(make_config(p)))  # (Gemma 4: experts, PLE)
                          for p in ("tiny-gemma3", "tiny-gemma4")))
    kinds = {floors.split_site(n)[1] for n in kinds} | {"logits"}
    for m in catalogue.CATALOGUE:
        assert set(m.kinds) <= kinds, m.name


def test_printed_elements_are_judged_with_their_print_resolution(tiny):
    """llama-debug prints %.4f: an element is within 5e-5 of the tensor's value by the printing alone, a total of
    a running float32 sum within its partial sums' roundings. Both are part of the floor (Summary.resolution,
    total_sum), and nothing more: a printed value off by more than its resolution still diverges."""
    run = tiny.run(IDS)
    out = run.record["blocks.1.mlp.act"]
    elements = {(t, f): float(np.round(out[t, f], 4)) for t in (0, 8) for f in (0, 1, 126, 127)}
    running = float(np.cumsum(out.astype(np.float32).ravel(), dtype=np.float32)[-1])  # llama-debug's `float sum`
    printed = Summary(shape=out.shape, elements=elements, total=running, resolution=5e-5, total_sum="float32")
    cap = Capture("llama.cpp", np.asarray(IDS), summaries={"blocks.1.mlp.act": printed})
    s = C.compare(tiny, IDS, against=cap).sites[0]
    assert not s.diverges and s.floor >= 5e-5
    assert max(abs(v - out[k]) for k, v in elements.items()) > 1e-6  # the rounding is really there
    exact = Summary(shape=out.shape, elements=elements, total=running)  # taken as exact values: they are not
    assert C.compare(tiny, IDS, against=Capture("llama.cpp", np.asarray(IDS),
                                                summaries={"blocks.1.mlp.act": exact})).sites[0].diverges
    printed.elements[(8, 127)] += 2e-4
    s = C.compare(tiny, IDS, against=cap).sites[0]
    assert s.diverges and s.worst == {"T": 8, "F": 127}


def test_running_sum_rounding_on_literal_cases():
    """u32 * sum_k |s_k|, the partial sums in the order summed: a bound on a float32 running sum's own error."""
    u = 2.0 ** -24
    x = np.array([1.0, u, u])  # float32: 1 + u rounds to 1 (ties to even), twice; the exact sum is 1 + 2u
    bound = floors.running_sum_rounding(x, ("D",))
    assert bound == pytest.approx(u * (1 + (1 + u) + (1 + 2 * u)), rel=1e-15)
    err = abs(float(np.cumsum(x.astype(np.float32), dtype=np.float32)[-1]) - (1 + 2 * u))
    assert err == 2 * u and err <= bound
    grid = np.array([[0.0, 1.0], [0.0, 0.0]])  # [T, D]: summed T-major: 0, 1, 1, 1; D-major: 0, 0, 1, 1
    assert floors.running_sum_rounding(grid, ("T", "D")) == 3 * u
    assert floors.running_sum_rounding(grid, ("T", "D"), ("D", "T")) == 2 * u


# ------------------------------------------------------------------------------------------ llama.cpp's arithmetic


def test_quantize_rows_q8_0_and_q8_k_on_literal_blocks():
    """ggml's conversions of a matmul's input rows: Q8_0 scales each block of 32 by amax / 127 (stored as f16),
    Q8_K each block of 256 by 127 / amax (float32); both round half to even (AVX's round, nearest_int)."""
    x = np.zeros(256, np.float32)
    x[:5] = [127.0, 0.5, 1.5, -2.5, 3.25]  # block 0: amax 127, scale 1: the halves go to even
    x[32:35] = [1.984375, 0.7, -0.35]  # block 1: amax 127/64, scale 1/64 (exact in f16)
    q8_0 = ggml.quantize_rows(x, "Q8_0")
    np.testing.assert_array_equal(q8_0[:5], [127, 0, 2, -2, 3])  # roundf (half away from zero) gives 1 and -3
    np.testing.assert_array_equal(q8_0[32:35], [1.984375, 0.703125, -0.34375])  # 127, 45 and -22 sixty-fourths
    assert q8_0.dtype == np.float32 and not q8_0[64:].any()  # blocks of zeros stay zeros
    q8_k = ggml.quantize_rows(x, "Q8_K")  # one block of 256 with amax 127: block 1's values on the unit grid too
    np.testing.assert_array_equal(q8_k[:5], [127, 0, 2, -2, 3])
    np.testing.assert_array_equal(q8_k[32:35], [2, 1, 0])
    d = np.float32(1.27) / np.float32(127)  # a scale f16 cannot hold: Q8_0 stores it rounded, Q8_K in float32
    y = np.zeros(256, np.float32)
    y[:2] = [1.27, 0.5]
    assert ggml.quantize_rows(y, "Q8_0")[1] == np.float32(50) * np.float32(np.float16(d))
    assert ggml.quantize_rows(y, "Q8_K")[1] == np.float32(50) * (np.float32(1) / (np.float32(127) / np.float32(1.27)))
    np.testing.assert_array_equal(ggml.quantize_rows(np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11]), "F16"),
                                  [1.0, 1 + 2 ** -9])  # f16 ties to even
    with pytest.raises(InputError, match="blocks of 256; this row has 64 values"):
        ggml.quantize_rows(np.ones(64), "Q8_K")
    with pytest.raises(InputError, match="no floor for llama.cpp converting a matmul's input to Q8_1"):
        ggml.quantize_rows(np.ones(32), "Q8_1")


def test_gelu_f16_table_on_literal_values():
    """ggml-cpu's GELU: 0 below -10, x above 10, else the f16 table entry of f16(x)."""
    x = np.array([-10.5, -10.0, 10.0, 12.25, 1.0, 1.0 + 2 ** -12], np.float32)
    g = ggml.gelu_f16_table(x)
    np.testing.assert_array_equal(g[:4], [0.0, 0.0, 10.0, 12.25])
    assert g[4] == g[5] == 0.84130859375  # gelu_tanh(1) = 0.8411920 to the nearest f16; one f16 bucket, one value
    exact = refprism.gemma.ops.gelu_tanh(np.array([1.0, 1.0 + 2 ** -12]))
    assert exact[0] != exact[1] and abs(g[4] - exact[0]) < 2 ** -11


def test_rope_tables_ggml_build_the_angles_by_repeated_products():
    """ggml_rope_cache_init: angle_i = p * theta_scale**i as i float32 products of theta_scale = powf(base, -2/H),
    each rounded: off the exact angle by at most about i roundings, unlike refprism's angles rounded once."""
    cos, sin = ggml.rope_tables_ggml(np.arange(8), 256, 1_000_000.0)
    assert cos.shape == sin.shape == (8, 256) and cos.dtype == np.float32
    np.testing.assert_array_equal(cos[:, :128], cos[:, 128:])  # split-half: pair i is dimensions i and i + 128
    i = np.arange(128)
    exact = 7 * 1_000_000.0 ** (-2 * i / 256)
    angle = np.arctan2(sin[7, :128].astype(np.float64), cos[7, :128].astype(np.float64))  # in (-pi, pi]
    off = np.abs((angle - exact + np.pi) % (2 * np.pi) - np.pi)
    assert np.all(off <= (i + 2) * 2.0 ** -23 * exact + 2e-7)  # + cos / sin's own float32 rounding
    assert (cos[0] == 1).all() and (sin[0] == 0).all()
    hf_cos, _ = replay.rope_tables_float32(np.arange(8), 256, 1_000_000.0)  # p * inv_freq, each rounded once
    assert (cos != hf_cos).any()
    scaled = ggml.rope_tables_ggml(np.arange(8), 256, 1_000_000.0, 8.0)  # linear scaling: freq_scale 1/8, exact
    np.testing.assert_array_equal(scaled[0], ggml.rope_tables_ggml(np.arange(8) / 8, 256, 1_000_000.0)[0])
    cos4, sin4 = ggml.rope_tables_ggml(np.array([3]), 4, 10_000.0)  # theta_scale = 10000**-0.5 = 0.01
    np.testing.assert_allclose(cos4[0], np.cos([3, 0.03, 3, 0.03]), rtol=1e-6)
