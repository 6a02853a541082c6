"""The forward pass at scale: packed prompts, logits only where read, selective records, memory preflight, BLAS
attention, and the one edit mechanism (edits, resume). No timed tests: tools/bench.py measures speed."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refprism
from refprism import prisms
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.record import Lazy, MissingSite, Rows, Selection, expected_shapes

FAMILIES = ["tiny", "tiny-gemma2", "tiny-gemma3"]
PROMPTS = [[2, 5, 9, 11, 40, 41, 42, 43, 44, 45, 46], [2, 7], [2], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoint):
    """(float32 model, float64 model) of each family; sliding windows of 4 tokens, so that the packed prompts
    are longer than the window (the tiny Gemma 2/3 presets alternate sliding and full layers)."""
    d = checkpoint(request.param, **({} if request.param == "tiny" else {"sliding_window": 4}))
    return refprism.load(d), refprism.load(d, dtype="float64")


# ------------------------------------------------------------------------------------------------ packed passes


def test_packed_equals_one_by_one_every_site(family):
    """Every recorded site of every prompt of a packed pass equals that prompt's own run: bit-close in float64,
    within float32 rounding of the pack's products (measured < 2e-6 relative to the site's largest value)."""
    for model, tol in ((family[1], 1e-12), (family[0], 2e-5)):
        runs = model.run_many(PROMPTS, pack_tokens=100)
        for prompt, packed in zip(PROMPTS, runs):
            alone = model.run(prompt)
            assert list(packed.tokens) == prompt and packed.pieces == alone.pieces
            assert set(packed.record) == set(alone.record)
            for name, want in alone.record.items():
                got = packed.record[name]
                assert got.shape == want.shape, name
                scale = max(1.0, float(np.abs(want).max()))
                assert np.abs(got - want).max() <= tol * scale, (name, np.abs(got - want).max())


def test_packed_prisms_equal_single_prisms(family):
    model = family[1]
    packed = model.run_many(PROMPTS)[0]
    alone = model.run(PROMPTS[0])
    for run in (packed, alone):
        run.r = prisms.logits_readout(model, run, ["#5", "#9"], versus=["#11"])
    for f in (prisms.residual_prism, lambda r: prisms.attention_prism(r, 1), lambda r: prisms.mlp_prism(r, 0)):
        np.testing.assert_allclose(f(packed.r).values, f(alone.r).values, rtol=1e-10, atol=1e-12)


def test_packs_follow_pack_tokens(family, monkeypatch):
    model = family[0]
    sizes = []
    real = refprism.model.forward_packed
    monkeypatch.setattr(refprism.model, "forward_packed",
                        lambda params, cfg, pack, **kw: (sizes.append([len(t) for t in pack])
                                                         or real(params, cfg, pack, **kw)))
    model.run_many(PROMPTS, pack_tokens=13)
    assert sizes == [[11, 2], [1], [13]]  # consecutive, at most 13 tokens each; a longer prompt runs alone
    sizes.clear()
    model.run_many(PROMPTS)
    assert sizes == [[11, 2, 1, 13]]


def test_packed_attention_stays_within_each_prompt(family):
    """A prompt's run does not depend on its neighbours in the pack."""
    model = family[1]
    a = model.run_many([PROMPTS[0], PROMPTS[3]])[1]
    b = model.run_many([[2, 99, 98, 97], PROMPTS[3]])[1]
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ logits positions


def test_logits_at_chosen_positions_equal_full_logits(family):
    for model in family:
        full = model.run(PROMPTS[0])
        part = model.run(PROMPTS[0], positions=[0, -1, 4])
        assert isinstance(part.record["logits"], Rows) and part.record["logits"].positions == (0, 4, 10)
        for p in (0, 4, -1, 10):
            np.testing.assert_allclose(part.logits[p], full.logits[p], rtol=1e-6, atol=1e-6)
        with pytest.raises(MissingSite, match="only at positions \\[0, 4, 10\\], not at 3"):
            part.logits[3]
        names = set(full.record) - {"logits", "logits_uncapped"}
        assert all(np.array_equal(part.record[n], full.record[n]) for n in names)  # everything else, whole
        if model.config.final_softcap is not None:
            assert part.record["logits_uncapped"].positions == (0, 4, 10)
        packed = model.run_many(PROMPTS, positions=-1)
        for prompt, run in zip(PROMPTS, packed):
            if len(prompt) > 1:  # (a one-token prompt's last position is all of it)
                assert run.record["logits"].positions == (len(prompt) - 1,)
            np.testing.assert_allclose(run.logits[-1], model.run(prompt).logits[-1], rtol=2e-5, atol=2e-5)


def test_prisms_work_from_logits_at_the_read_position(family):
    model = family[1]
    full, part = model.run(PROMPTS[0]), model.run(PROMPTS[0], positions=-1)
    a, b = (prisms.residual_prism(prisms.logits_readout(model, r, ["#5"])) for r in (full, part))
    np.testing.assert_array_equal(a.values, b.values)  # the parts do not read the logits
    np.testing.assert_allclose(a.whole, b.whole, rtol=1e-13)  # one row of h E^T, not all T: BLAS may round apart
    with pytest.raises(MissingSite, match="logits(_uncapped)? only at positions \\[10\\]"):
        prisms.logits_readout(model, part, ["#5"], position=3)


# ------------------------------------------------------------------------------------------------ selective records


def test_selection_holds_exactly_what_was_asked(family):
    model = family[0]
    cfg = model.config
    run = model.run(PROMPTS[0], record=["blocks.1.attn.pattern@-1", "blocks.*.mlp.out", "embed@0,2"])
    want = {"blocks.1.attn.pattern", "embed"} | {f"blocks.{l}.mlp.out" for l in range(cfg.n_layers)}
    assert set(run.record) == want
    full = model.run(PROMPTS[0])
    np.testing.assert_array_equal(run.record["blocks.1.attn.pattern"][:, 10, :],
                                  full.record["blocks.1.attn.pattern"][:, 10, :])
    assert run.record["blocks.1.attn.pattern"].data.shape == (cfg.n_heads, 1, 11)
    assert run.record["embed"].shape == (11, cfg.d_model) and run.record["embed"].data.shape == (2, cfg.d_model)
    np.testing.assert_array_equal(run.record["embed"][2], full.record["embed"][2])
    with pytest.raises(MissingSite, match="did not record blocks.0.attn.z"):
        run.record["blocks.0.attn.z"]
    with pytest.raises(MissingSite, match="embed only at positions \\[0, 2\\]"):
        np.asarray(run.record["embed"])


def test_prisms_declare_what_they_need(family):
    """A prism run from the record its `needs` names equals the prism from a full record; one site less and the
    prism fails naming it."""
    model = family[1]
    full = model.run(PROMPTS[3])
    need = prisms.needs(model, position=-1, attention=[1], mlp=[0])
    lean = model.run(PROMPTS[3], record=need)
    assert set(lean.record) < set(full.record)
    for run in (full, lean):
        r = prisms.logits_readout(model, run, ["#5", "#9"])
        run.splits = [prisms.residual_prism(r), prisms.attention_prism(r, 1), prisms.mlp_prism(r, 0)]
    for a, b in zip(full.splits, lean.splits):
        np.testing.assert_array_equal(a.values, b.values)
        for k in a.extras:  # (the logits themselves, computed for one row instead of T, may round apart)
            np.testing.assert_allclose(a.extras[k]["values"], b.extras[k]["values"], rtol=1e-13, atol=1e-15)
    short = model.run(PROMPTS[3], record=[e for e in need if not e.startswith("blocks.1.attn.v")])
    with pytest.raises(MissingSite, match="blocks.1.attn.v"):
        prisms.attention_prism(prisms.logits_readout(model, short, ["#5"]), 1)


@pytest.mark.parametrize("entry, message", [
    ("blocks.*.atn.pattern", "names no recorded site"),
    ("logits@x", "positions after @ are integers"),
    ("logits@20", "position 20 is out of range for 11 tokens"),
    ("", "a record entry is a name or glob"),
])
def test_bad_selections_are_one_line_errors(tiny, entry, message):
    with pytest.raises(InputError, match=message):
        tiny.run(PROMPTS[0], record=[entry])


def test_bad_positions_are_one_line_errors(tiny):
    with pytest.raises(InputError, match="position 11 is out of range for 11 tokens"):
        tiny.run(PROMPTS[0], positions=11)
    with pytest.raises(InputError, match="position -3 is out of range for 2 tokens"):
        tiny.run_many(PROMPTS, positions=-3)
    with pytest.raises(InputError, match="prompt 1: token id 99999 is out of range"):
        tiny.run_many([[2, 3], [2, 99999]])


# ------------------------------------------------------------------------------------------------ preflight


def test_preflight_refuses_before_allocating(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(refprism.model, "available_memory", lambda: 100_000)
    monkeypatch.setattr(refprism.model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError) as e:
        tiny.run(list(range(2, 60)))
    text = str(e.value)
    assert "\n" not in text and "would need about" in text and "but 97.7 KB is available" in text
    # the only way out named is one that fits: a prompt of at most 7 tokens, in the library's spelling
    assert text.endswith(": shorten the prompt to at most 7 tokens"), text
    assert calls == []  # refused before the pass started
    tiny.run(list(range(2, 9)))  # 7 tokens fit
    assert calls == [1]
    with pytest.raises(InputError, match="at most 7 tokens"):
        tiny.run(list(range(2, 10)))


def test_preflight_estimate_matches_the_record(family):
    """The estimate of what a record keeps is its real size, full or selective."""
    from refprism.gemma.record import estimate_bytes

    model = family[0]
    for record, positions in ((None, None), (["blocks.*.attn.out@-1", "blocks.0.attn.pattern"], -1)):
        run = model.run(PROMPTS[0], record=record, positions=positions)
        stored = [dict.__getitem__(run.record, n) for n in run.record]  # (a Lazy entry is stored as its recipe)
        real = sum(0 if isinstance(a, Lazy) else (a.data if isinstance(a, Rows) else a).nbytes for a in stored)
        est = estimate_bytes(model.config, [11], model.dtype, model._selection(record, positions, [11]))
        assert est["record"] == real


def test_packs_shrink_to_fit_memory(tiny, monkeypatch):
    """With little memory, run_many packs fewer prompts rather than refusing: room for one prompt and a half means
    three passes of one prompt (with room, one pass of three), and the same logits as the single runs."""
    from refprism.gemma.record import estimate_bytes

    packs, real = [], refprism.model.forward_packed
    monkeypatch.setattr(refprism.model, "forward_packed",
                        lambda params, config, pack, **kw: packs.append(len(pack)) or real(params, config, pack, **kw))
    assert len(tiny.run_many([PROMPTS[3]] * 3)) == 3 and packs == [3]
    packs.clear()
    one = estimate_bytes(tiny.config, [13], tiny.dtype)["total"]
    monkeypatch.setattr(refprism.model, "available_memory", lambda: int(one * 1.5 / refprism.model.MEMORY_SHARE))
    runs = tiny.run_many([PROMPTS[3]] * 3)
    assert packs == [1, 1, 1]
    alone = tiny.run(PROMPTS[3]).logits
    for run in runs:  # a one-prompt pass is the single run's computation; float32 rounding at most, if BLAS differs
        np.testing.assert_allclose(run.logits, alone, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ BLAS attention


def einsum_attention(q, k, v, scale, cap=None, window=None):
    """The former einsum form of ops.attention, kept as the reference of the BLAS form."""
    kv = ops.kv_index(q.shape[1], k.shape[1])
    k_n, v_n = k[:, kv, :], v[:, kv, :]
    scores = np.einsum("tnh,snh->nts", q, k_n) * np.asarray(scale, dtype=q.dtype)
    a = scores if cap is None else ops.softcap(scores, cap)
    allowed = ops.causal_mask(q.shape[0], window)
    a = np.where(allowed, a, -np.inf)
    e = np.exp(a - a.max(-1, keepdims=True))
    return scores, e / e.sum(-1, keepdims=True), np.einsum("nts,snh->tnh", e / e.sum(-1, keepdims=True), v_n)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.sampled_from([2, 4, 8]),
       st.sampled_from([None, 5.0]), st.sampled_from([None, 1, 3]), st.integers(0, 2**16))
def test_blas_attention_equals_einsum_form(K, G, T, H, cap, window, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((T, n, H)) for n in (K * G, K, K))
    got = ops.attention(q, k, v, scale=0.3, cap=cap, window=window)
    want = einsum_attention(q, k, v, 0.3, cap, window)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    # row blocks of 2: each block reads only the sources its rows may see (the band), the rest stays 0
    pattern = ops.causal_softmax(got[0], window, cap=cap, row_block=2)
    np.testing.assert_allclose(pattern, want[1], rtol=1e-12, atol=1e-14)
    z = ops.attention_mix(pattern, v, window=window, row_block=2)
    np.testing.assert_allclose(z, want[2], rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.sampled_from([None, 5.0]),
       st.sampled_from([None, 1, 3, 7]), st.sampled_from([1, 4, 8]), st.integers(0, 2**16))
def test_attention_pattern_is_softmax_of_the_scores_bit_for_bit(K, G, T, cap, window, row_block, seed):
    """attention_pattern (the forward's path when nobody reads the scores) computes only each row block's band of
    scores, with the same products as attention_scores: its pattern is causal_softmax of those scores exactly, so
    a record's lazy scores (attention_scores again) give back the recorded pattern bit for bit. float32, where a
    different product shape would show."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((T, n, 16)).astype(np.float32) for n in (K * G, K))
    scores = ops.attention_scores(q, k, 0.25, window, row_block=row_block)
    got = ops.attention_pattern(q, k, 0.25, window, cap=cap, row_block=row_block)
    np.testing.assert_array_equal(got, ops.causal_softmax(scores, window, cap=cap, row_block=row_block))
    np.testing.assert_allclose(scores, einsum_attention(q.astype(np.float64), k.astype(np.float64),
                                                        k.astype(np.float64), 0.25, cap, window)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_records_lazy_scores_give_its_pattern(preset, checkpoint):
    """In the forward pass (300 tokens: three row blocks; sliding windows of 4): the recorded pattern is
    causal_softmax of the recorded (lazy) scores, bit for bit, on every layer of every family; and a run that reads
    the scores (an edit that only looks) gives the same scores and pattern."""
    model = refprism.load(checkpoint(preset, max_position_embeddings=512,
                                     **({} if preset == "tiny" else {"sliding_window": 4})))
    cfg = model.config
    ids = [2] + list(np.random.default_rng(1).integers(3, cfg.vocab_size, 300))
    rec = model.run(ids).record
    looked = model.run(ids, edit=lambda name, value, record: value).record
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        assert isinstance(dict.__getitem__(rec, b + "attn.scores"), Lazy)
        window = cfg.sliding_window if cfg.is_sliding(l) else None
        np.testing.assert_array_equal(ops.causal_softmax(rec[b + "attn.scores"], window, cap=cfg.attn_softcap),
                                      rec[b + "attn.pattern"])
        np.testing.assert_array_equal(looked[b + "attn.scores"], rec[b + "attn.scores"])
        np.testing.assert_array_equal(looked[b + "attn.pattern"], rec[b + "attn.pattern"])


def test_attention_literal_case():
    """Two positions, one query head, one key/value head of width 2: every number by hand.

    scores = q.k * 1: [[1, 0], [0, 2]] (q0 = [1, 0], q1 = [0, 1]; k0 = [1, 0], k1 = [0, 2]);
    position 0 sees only itself; position 1 weighs exp(0), exp(2): pattern [1/(1+e^2), e^2/(1+e^2)].
    """
    q = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    k = np.array([[[1.0, 0.0]], [[0.0, 2.0]]])
    v = np.array([[[10.0, 0.0]], [[0.0, 20.0]]])
    scores, pattern, z = ops.attention(q, k, v, scale=1.0)
    np.testing.assert_array_equal(scores[0], [[1.0, 0.0], [0.0, 2.0]])
    w = np.exp(2) / (1 + np.exp(2))
    np.testing.assert_allclose(pattern[0], [[1.0, 0.0], [1 - w, w]], rtol=1e-15)
    np.testing.assert_allclose(z[:, 0], [[10.0, 0.0], [10 * (1 - w), 20 * w]], rtol=1e-15)


# ------------------------------------------------------------------------------------------------ edits and resume


class Recorded:
    """An edit that changes nothing but remembers the order of the sites it saw."""

    def __init__(self):
        self.names = []

    def __call__(self, name, value, record):
        self.names.append(name)
        return value


def test_identity_edit_sees_every_site_in_forward_order(family):
    model = family[0]
    edit = Recorded()
    run = model.run(PROMPTS[0], edit=edit)
    plain = model.run(PROMPTS[0])
    assert edit.names == list(expected_shapes(model.config, 11))  # RECORD_TABLE order, every site once
    assert all(np.array_equal(run.record[n], plain.record[n]) for n in plain.record)


def test_the_record_holds_what_flowed_on(tiny64):
    def zero_head(name, value, record):
        if name == "blocks.0.attn.z":
            value = value.copy()
            value[:, 1] = 0
        return value

    run = tiny64.run(PROMPTS[0], edit=zero_head)
    assert np.all(run.record["blocks.0.attn.z"][:, 1] == 0)
    W_O = tiny64.params.get(0, "W_O")
    np.testing.assert_allclose(run.record["blocks.0.attn.out"],
                               np.einsum("tnh,nhd->td", run.record["blocks.0.attn.z"], W_O))


def test_scores_and_activations_are_recomputed_exactly(family):
    """A plain run stores the scores and (one prompt) the activations as recipes (record.Lazy); what they give
    is what an edited run, which stores every value, recorded: the same bits."""
    model = family[0]
    plain, edited = model.run(PROMPTS[0]), model.run(PROMPTS[0], edit=Recorded())
    for name in ("blocks.0.attn.scores", "blocks.1.attn.scores", "blocks.0.mlp.act"):
        assert isinstance(dict.__getitem__(plain.record, name), Lazy)
        assert not isinstance(dict.__getitem__(edited.record, name), Lazy)
        np.testing.assert_array_equal(plain.record[name], edited.record[name])
    packed = model.run_many(PROMPTS)[0]
    assert isinstance(dict.__getitem__(packed.record, "blocks.0.attn.scores"), Lazy)
    np.testing.assert_array_equal(packed.record["blocks.0.attn.scores"],
                                  model.run_many(PROMPTS)[0].record["blocks.0.attn.scores"])


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_long_prompt_keeps_the_stream_and_recomputes_the_rest_exactly(checkpoint, preset, monkeypatch):
    """From LONG_PROMPT tokens, an unedited full record over LAZY_BUDGET keeps the residual stream, the sublayer
    outputs, the scales, the pattern and the logits as arrays; every other site is a recipe whose value is the one
    an edited run (which stores everything) recorded, bit for bit. Resuming from such a record equals a full
    re-run. Under the budget (the tiny models' record is a few MB) the same prompt keeps every site as an array
    but the scores and the neuron activations."""
    from refprism.gemma import record as R
    from refprism.gemma.record import LAZY_KEPT, LONG_PROMPT

    extra = {} if preset == "tiny" else {"sliding_window": 40}
    model = refprism.load(checkpoint(preset, max_position_embeddings=1024, **extra))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, LONG_PROMPT + 20).tolist()
    small = model.run(ids)
    assert {n for n in small.record if isinstance(dict.__getitem__(small.record, n), Lazy)} == \
        {n for n in small.record if n.endswith(("attn.scores", "mlp.act"))}
    assert not R.long_record(model.config, LONG_PROMPT + 20, model.dtype)
    monkeypatch.setattr(R, "LAZY_BUDGET", R._long_lazy_bytes(model.config, LONG_PROMPT + 20, model.dtype) - 1)
    assert R.long_record(model.config, LONG_PROMPT + 20, model.dtype)
    assert not R.long_record(model.config, LONG_PROMPT - 1, model.dtype)
    plain, edited = model.run(ids), model.run(ids, edit=Recorded())
    lazy = {n for n in plain.record if isinstance(dict.__getitem__(plain.record, n), Lazy)}
    kept = {n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in set(plain.record) - lazy}
    assert kept == {k for k in kept if k in LAZY_KEPT or k.endswith("scale")}
    assert {"blocks.0.attn.v", "blocks.0.mlp.gate", "blocks.1.attn.z", "ln_final.out"} <= lazy
    for name in plain.record:
        np.testing.assert_array_equal(plain.record[name], edited.record[name], err_msg=name)

    def edit(name, value, record):
        if name == "blocks.1.mlp.act":
            value = value.copy()
            value[5, 3] += 1.0
        return value

    resumed = model.run(ids, edit=edit, resume=(1, plain.record))
    full = model.run(ids, edit=edit)
    for name in full.record:
        np.testing.assert_array_equal(resumed.record[name], full.record[name], err_msg=name)


@pytest.mark.parametrize("long", [False, True])
def test_logits_at_some_positions_keep_the_full_records_recipes(checkpoint, long, monkeypatch):
    """positions= on a full record changes the logits only: the same sites are recipes (record.Lazy) as in the
    full record, short (the scores and the activations) or long (most of each layer), the same bits, and the
    memory estimate differs by the logits' rows alone. An explicit selection of every site (everything_but)
    still keeps every site but the scores as an array."""
    from refprism.gemma import record as R
    from refprism.gemma.record import everything_but

    model = refprism.load(checkpoint("tiny-gemma2", max_position_embeddings=1024, sliding_window=40))
    cfg = model.config
    T = R.LONG_PROMPT + 20
    if long:
        monkeypatch.setattr(R, "LAZY_BUDGET", 0)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, T).tolist()
    full, part = model.run(ids), model.run(ids, positions=[-1])

    def lazy(run):
        return {n for n in run.record if isinstance(dict.__getitem__(run.record, n), Lazy)}

    assert lazy(part) == lazy(full) and ("blocks.0.mlp.gate" in lazy(part)) == long
    assert "blocks.0.mlp.act" in lazy(part)
    assert set(part.record) == set(full.record)
    assert part.record["logits"].positions == (T - 1,)
    for name in set(full.record) - {"logits", "logits_uncapped"}:
        np.testing.assert_array_equal(part.record[name], full.record[name], err_msg=name)
    est = {k: R.estimate_bytes(cfg, [T], model.dtype, sel)["record"]
           for k, sel in (("full", None), ("part", model._selection(None, [-1], [T])))}
    rows = 2 * (T - 1) * cfg.vocab_size * np.dtype(model.dtype).itemsize  # logits and logits_uncapped
    assert est["full"] - est["part"] == rows
    eager = model.run(ids, record=everything_but(cfg, ("logits", "logits_uncapped")))
    assert lazy(eager) == {n for n in eager.record if n.endswith("attn.scores")}


def test_an_edited_pattern_is_mixed_whole(tiny64):
    """A pattern an edit replaced may weigh sources outside the causal band (another implementation's, wrong):
    z is then that pattern times v over every source, not only the band."""
    v = tiny64.run(PROMPTS[0]).record["blocks.0.attn.v"]

    def uniform(name, value, record):
        return np.full_like(value, 1 / value.shape[-1]) if name == "blocks.0.attn.pattern" else value

    run = tiny64.run(PROMPTS[0], edit=uniform)
    kv = ops.kv_index(tiny64.config.n_heads, tiny64.config.n_kv_heads)
    want = np.broadcast_to(v.mean(axis=0)[kv], run.record["blocks.0.attn.z"].shape)  # every row: the mean value
    np.testing.assert_allclose(run.record["blocks.0.attn.z"], want, rtol=1e-12)


def test_a_frozen_scale_is_used(tiny64):
    """Norm scales are sites of their own: an edit that replaces one changes the normalised output accordingly."""
    clean = tiny64.run(PROMPTS[0])

    def double_scale(name, value, record):
        return value * 2 if name == "blocks.1.ln2.scale" else value

    run = tiny64.run(PROMPTS[0], edit=double_scale)
    np.testing.assert_allclose(run.record["blocks.1.ln2.out"], clean.record["blocks.1.ln2.out"] / 2, rtol=1e-14)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_resume_equals_full_rerun(family, layer):
    model = family[0]
    layer %= model.config.n_layers
    clean = model.run(PROMPTS[3])

    def edit(name, value, record):
        if name == f"blocks.{layer}.mlp.act":
            value = value.copy()
            value[5, 3] += 1.0
        return value

    full = model.run(PROMPTS[3], edit=edit)
    resumed = model.run(PROMPTS[3], edit=edit, resume=(layer, clean.record))
    assert set(full.record) == set(resumed.record)
    for name in full.record:
        np.testing.assert_array_equal(resumed.record[name], full.record[name], err_msg=name)
    assert resumed.record["embed"] is clean.record["embed"]  # layers before the resume point are the clean arrays


def test_resume_layer_is_checked(tiny):
    clean = tiny.run(PROMPTS[0])
    with pytest.raises(InputError, match="resume layer 7 is out of range"):
        tiny.run(PROMPTS[0], resume=(7, clean.record))


def test_selection_repr_and_union():
    s = Selection(["logits@-1", "logits@0", "blocks.*.attn.out"])
    assert s.rows("logits", 5) == (0, 4) and s.rows("blocks.3.attn.out", 5) == "all" and s.rows("embed", 5) is None
    assert "logits@-1" in repr(s)


def test_a_dropped_run_frees_its_record_at_once(family):
    """The lazy entries read their record through a weak reference: no cycle, so a run dropped is freed then (a
    cycle would keep ~0.5 GB of a gemma-2b record alive into the next forward until the garbage collector ran)."""
    import gc
    import weakref

    model, _ = family
    gc.disable()
    try:
        run = model.run(PROMPTS[0])
        assert any(isinstance(v, Lazy) for v in dict.values(run.record))
        gone = weakref.ref(run.record)
        del run
        assert gone() is None
    finally:
        gc.enable()


def test_a_resumed_runs_lazy_entries_outlive_the_clean_run(family):
    model, _ = family
    clean = model.run(PROMPTS[3])
    want = {n: np.array(clean.record[n]) for n in clean.record if n.startswith("blocks.0.")}
    resumed = model.run(PROMPTS[3], resume=(1, clean.record))
    del clean
    for name, value in want.items():
        np.testing.assert_array_equal(resumed.record[name], value)
