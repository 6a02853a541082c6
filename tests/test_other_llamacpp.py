"""llama.cpp as the other side of a comparison, for real: Gemma 3 270M from PyPI as Q4_K_M, and as F32.

The F32 file is made here by llama.cpp's own llama-quantize from the Q4_K_M one; it holds the same values (checked
below), so one refprism model, loaded from the Q4_K_M file, is the reference for both. llama.cpp runs twice per
file: llama-cpp-python for the logits at every position, llama-debug for its per-tensor dump, which
refprism/crosscheck/sides/llamacpp.py maps to refprism's sites. Every mapped site is compared with refprism's record on the
same ids, element by printed element, so a wrong axis or a wrong occurrence of a repeated name fails (the negative
controls below show that it does).

Needs llama.cpp's tools built (tools/build_llama_cpp.py, which tools/test.sh runs): a missing build fails with the
command to run, it does not skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import refprism
from refprism.checkpoints.synth import make_config
from refprism.crosscheck.capture import Capture, GgmlArithmetic, Summary
from refprism.crosscheck.sides import gguf_header as LG
from refprism.crosscheck.sides import llamacpp as L
from refprism.crosscheck.sides import llamacpp_debug as LD
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.config import Config
from refprism.gemma.record import SITE_LETTERS, expected_shapes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital city of France is"
IDS = [2, 818, 5279, 3207, 529, 7001, 563]  # <bos> The ▁capital ▁city ▁of ▁France ▁is
PRINT = 0.5 * 10.0 ** -LD.PRINT_DECIMALS  # llama-debug prints %.4f: each printed value is within 5e-5 of its float


@pytest.fixture(scope="module")
def bin_dir(llama_bin_dir):
    return llama_bin_dir


@pytest.fixture(scope="module")
def q4(gemma3_q4_gguf):
    return gemma3_q4_gguf


@pytest.fixture(scope="module")
def f32(gemma3_f32_gguf):
    return gemma3_f32_gguf


@pytest.fixture(scope="module")
def model(gemma3_270m):
    return gemma3_270m


@pytest.fixture(scope="module")
def ref(model):
    """refprism's record of IDS, float32."""
    return dict(model.run(IDS).record)  # every site, attn.q_pre / k_pre (before the q/k norm and RoPE) too


@pytest.fixture(scope="module")
def f32_dump(f32, bin_dir, llama_debug_output):
    """llama-debug on the F32 file with the KV cache in f32: llama.cpp at its most exact (its output is shared
    with tests/test_compare_others.py: conftest's llama_debug_output)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "run_debug", llama_debug_output)
        return L.debug_dump(f32, PROMPT, cache_type="f32", bin_dir=bin_dir)


@pytest.fixture(scope="module")
def q4_dump(q4, bin_dir, llama_debug_output):
    """llama-debug on the Q4_K_M file as users run it: llama.cpp's default f16 KV cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "run_debug", llama_debug_output)
        return L.debug_dump(q4, PROMPT, bin_dir=bin_dir)


def disagreement(s: Summary, full: np.ndarray) -> tuple[float, float, float]:
    """(max |printed - refprism| over the printed elements, max |refprism| there, sum error / sum |refprism|)."""
    idx = tuple(np.array(list(s.elements)).T)
    got = np.array(list(s.elements.values()))
    want = full[idx].astype(np.float64)
    rows = full if s.rows is None else full[list(s.rows)]
    mass = np.abs(rows).sum(dtype=np.float64)
    rel_sum = abs(s.total - rows.sum(dtype=np.float64)) / mass if s.total is not None else 0.0
    return float(np.abs(got - want).max()), float(np.abs(want).max()), rel_sum


def check(site: str, s: Summary, full: np.ndarray, *, rtol: float, sum_rtol: float) -> None:
    """Every printed element within PRINT + rtol * max |refprism|, and the sum within sum_rtol of sum |refprism|."""
    assert s.shape == full.shape, f"{site}: summary shape {s.shape}, refprism {full.shape}"
    err, scale, rel_sum = disagreement(s, full)
    bound = PRINT + rtol * scale
    pairs = ", ".join(f"{v:.4f} vs {full[k]:.6f} at {k}" for k, v in list(s.elements.items())[:3])
    assert err <= bound, f"{site}: NOT OK, max |diff| {err:.3g} > {bound:.3g}; first pairs (llama.cpp vs ref): {pairs}"
    assert rel_sum <= sum_rtol, f"{site}: NOT OK, sum {s.total} vs refprism's, relative error {rel_sum:.3g}"


# ------------------------------------------------------------------------------------------------ the build


def test_tools_are_built_from_the_pinned_llama_cpp_python(bin_dir):
    import llama_cpp

    extra = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("llamacpp ="))
    assert f'"llama-cpp-python=={L.LLAMA_CPP_PYTHON}"' in extra
    assert llama_cpp.__version__ == L.LLAMA_CPP_PYTHON
    assert L.tool("llama-debug", bin_dir).parent == L.tool("llama-quantize", bin_dir).parent == bin_dir
    with pytest.raises(L.ToolError, match="build_llama_cpp.py"):
        L.tool("llama-debug", bin_dir / "nowhere")


def test_the_f32_file_holds_the_q4_k_m_values(q4, f32):
    """llama-quantize's dequantization equals the gguf package's, bit for bit, for every weight type in the file."""
    assert (LG.file_type(q4), LG.file_type(f32)) == ("Q4_K_M", "F32")
    types = {}  # the smallest tensor of each type: Q4_K, Q6_K, Q5_0, Q8_0, F32
    for name, (_ne, kind, _) in sorted(LG.read_header(q4).tensors.items(), key=lambda item: np.prod(item[1][0])):
        types.setdefault(kind, name)
    assert len(types) == 5
    for name in types.values():
        assert np.array_equal(LG.tensor(q4, name), LG.tensor(f32, name)), name


def test_config_from_the_header_is_the_loaders(model, q4):
    assert LG.gguf_config(q4) == model.config


# ------------------------------------------------------------------------------------------------ llama-debug: F32


def test_tokens_are_the_same_three_ways(f32, f32_dump, model):
    assert f32_dump.tokens == IDS
    assert L.tokenize(f32, PROMPT) == IDS
    assert model.encode(PROMPT).tolist() == IDS


def test_every_site_llama_cpp_computes_is_mapped(f32_dump, model):
    """All of refprism's sites but the norm scales (llama.cpp prints none), plus q_pre / k_pre; the cut layer.

    resid_pre is no tensor of its own in llama.cpp: it is l_out of the layer before (inp_scaled for layer 0).
    """
    cfg = model.config
    want = {n for n in expected_shapes(cfg, len(IDS)) if not n.endswith(".scale")}
    want |= {f"blocks.{l}.attn.{x}_pre" for l in range(cfg.n_layers) for x in "qk"}
    assert set(f32_dump.summaries) == want
    last = cfg.n_layers - 1
    cut = {n for n, s in f32_dump.summaries.items() if s.rows is not None}
    assert cut == {f"blocks.{last}.{x}" for x in ("attn.out", "resid_mid", "ln2.out", "mlp.gate", "mlp.up",
                                                  "mlp.act", "mlp.down", "mlp.out", "resid_post")} | {
        "ln_final.out", "logits"}
    assert all(f32_dump.summaries[n].rows == (len(IDS) - 1,) for n in cut)
    assert f32_dump.notes == []  # the KV cells beyond the prompt were empty


BEFORE_GELU = ["embed", "ln1.out", "attn.q_pre", "attn.k_pre", "attn.v", "attn.q", "attn.k", "attn.scores",
               "attn.pattern", "attn.z", "attn.o_proj", "attn.out", "resid_mid", "ln2.out", "mlp.gate", "mlp.up"]


@pytest.mark.parametrize("site", BEFORE_GELU)
def test_up_to_the_first_gelu_llama_cpp_prints_refprisms_values(site, f32_dump, ref):
    """F32 weights, f32 KV cache, layer 0 before the first GEGLU: equal up to the print and float32 rounding.

    rtol 4e-6: a few float32 ulps of the site's largest value (two float32 programs summing 640 to 1024 products
    in different orders; measured at most 2e-6 beyond the print rounding).
    """
    name = site if site == "embed" else f"blocks.0.{site}"
    check(name, f32_dump.summaries[name], ref[name], rtol=4e-6, sum_rtol=2e-6)


def test_mlp_act_is_gelu_through_an_f16_table(f32_dump, ref):
    """ggml-cpu's GEGLU (GGML_GELU_FP16): gelu_tanh(f16(gate)) looked up as an f16 value, times up in float32.

    Emulated from refprism's own gate and up, layer 0's printed mlp.act agree to the print rounding; the exact
    gelu misses by ~17 times more, so the emulation is what tells them apart.
    """
    s = f32_dump.summaries["blocks.0.mlp.act"]
    gate, up = ref["blocks.0.mlp.gate"], ref["blocks.0.mlp.up"]
    table = ops.gelu_tanh(gate.astype(np.float16).astype(np.float32)).astype(np.float16).astype(np.float32)
    emulated = np.where(gate <= -10, 0, np.where(gate >= 10, gate, table)) * up  # the table's range is (-10, 10)
    exact_err = disagreement(s, ref["blocks.0.mlp.act"])[0]
    emulated_err = disagreement(s, emulated)[0]
    assert emulated_err <= PRINT + 4e-6 * np.abs(emulated).max()
    assert exact_err > 10 * emulated_err  # measured 8.4e-4 vs 5.0e-5


def test_every_mapped_site_agrees_within_the_f16_gelu_drift(f32_dump, ref):
    """All 345 sites: elements within PRINT + 4e-3 * max |refprism|, sums within 1e-3 of sum |refprism|.

    The only inexact step is the f16 GELU table (2**-11 relative per activation), carried through 18 layers and
    residual streams growing to ~1000: measured worst element 1.5e-3 of the site's max (blocks.14.mlp.act), worst
    sum 3.0e-4 (logits: llama-debug's float32 running sum over 262144 values).
    """
    for site, s in f32_dump.summaries.items():
        check(site, s, ref[site], rtol=4e-3, sum_rtol=1e-3)


def test_a_wrong_axis_mapping_fails_the_check(f32_dump, ref, model):
    """Negative controls: the same printed tensors read with a wrong layout, or the wrong occurrence, fail."""
    sizes = {"T": len(IDS), "D": model.config.d_model, "N": model.config.n_heads, "K": model.config.n_kv_heads,
             "H": model.config.d_head, "F": model.config.d_mlp, "V": model.config.vocab_size}
    printed = {(t.name, t.op): t for t in f32_dump.tensors}
    wrong = [  # (tensor, site, wrong layout), each one the right size
        (printed["kqv_out-3", "CONT"], "blocks.3.attn.z", ["HN", "T"]),  # i0 = h*N + n instead of n*H + h
        (printed["Qcur-3", "MUL_MAT"], "blocks.3.attn.q_pre", ["HN", "T"]),
        (printed["Qcur-3", "ROPE"], "blocks.3.attn.q_pre", ["H", "N", "T"]),  # the third Qcur is after RoPE
        (printed["Kcur-3", "ROPE"], "blocks.3.attn.k_pre", ["H", "K", "T"]),
    ]
    for t, site, layout in wrong:
        s = LD.summary_of(t, site, SITE_LETTERS[site.split(".", 2)[2]], layout, sizes, [])
        with pytest.raises(AssertionError, match="NOT OK"):
            check(site, s, ref[site], rtol=4e-3, sum_rtol=1e-3)
    # A layout of the wrong size is refused outright: kqv's ne is [H, T, N], not [H, N, T].
    with pytest.raises(L.ToolError, match="the graph changed"):
        LD.summary_of(printed["kqv-3", "MUL_MAT"], "blocks.3.attn.z", ("T", "N", "H"), ["H", "N", "T"], sizes, [])


# ------------------------------------------------------------------------------------------------ logits


def _kl(p_logits, q_logits) -> np.ndarray:
    """KL(p || q) per position, in nats, from two [T, V] logit arrays (computed in float64)."""
    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_f32_logits_at_every_position(f32, f32_dump, ref):
    """llama-cpp-python on the F32 file (f32 cache): every position, max |diff| 8.1e-3 measured (logits up to ~25),
    the same top token, KL 5e-7 measured; its last row is llama-debug's printed result_output to print rounding."""
    got = L.logits(f32, IDS, cache_type="f32")
    want = ref["logits"]
    assert got.shape == want.shape == (len(IDS), 262144) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 0.03
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert _kl(want, got).max() <= 1e-5
    printed = next(t for t in f32_dump.tensors if t.name == "result_output")
    cols = [k[0] for k in printed.values]
    assert np.abs(np.array(list(printed.values.values())) - got[-1, cols]).max() <= PRINT + 1e-6 * 25


def test_q4_k_m_logits_at_every_position(q4, ref):
    """Q4_K_M with llama.cpp's defaults. refprism runs the same dequantized weights exactly; llama.cpp quantizes
    each matmul's activation rows (Q8_0 / Q8_K) and keeps K, V in f16. Measured: max |diff| 1.32, KL 6.9e-3, the
    same top token at all 7 positions (▁Paris last). Bounds: 3, 0.05."""
    got = L.logits(q4, IDS)
    want = ref["logits"]
    assert np.abs(got - want).max() <= 3.0
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert _kl(want, got).max() <= 0.05


# ------------------------------------------------------------------------------------------------ llama-debug: Q4_K_M


def test_q4_k_m_dump_agrees_within_the_activation_quantization(q4_dump, ref):
    """Before the first matmul llama.cpp is exact (the embedding rows dequantize exactly); after it every site
    carries the activation quantization: measured worst element 18% of the site's max (blocks.16.mlp.out), worst
    sum 3.3% (logits). Bounds 0.3 and 0.1: the Q4_K_M run is checked for gross errors only; the mapping itself is
    pinned by the F32 run above."""
    assert q4_dump.tokens == IDS
    for site in ("embed", "blocks.0.ln1.out"):
        check(site, q4_dump.summaries[site], ref[site], rtol=4e-6, sum_rtol=2e-6)
    for site, s in q4_dump.summaries.items():
        check(site, s, ref[site], rtol=0.3, sum_rtol=0.1)


def test_q4_k_m_first_matmul_is_refprism_on_q8_0_activations(q4_dump, ref, model):
    """blk.0.attn_q / attn_v are Q5_0 / Q8_0, so ggml quantizes ln1.out to Q8_0 first (blocks of 32, d = amax/127
    stored in f16, q = round(x/d)). refprism's ln1.out quantized that way and multiplied by the same weights lands
    ~20 times closer to llama.cpp's q_pre and v than the exact product (measured 0.023 vs 0.47): what is left are
    values that round to the other side of a Q8_0 step."""
    h = ref["blocks.0.ln1.out"]
    blocks = h.reshape(h.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    d = amax / np.float32(127)
    q = np.rint(blocks * np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32))
    h8 = (q * d.astype(np.float16).astype(np.float32)).reshape(h.shape).astype(np.float64)
    p = model.params.block(0)
    for site, W in (("blocks.0.attn.q_pre", p["W_Q"]), ("blocks.0.attn.v", p["W_V"])):
        s = q4_dump.summaries[site]
        exact_err = disagreement(s, ref[site])[0]
        q8_err = disagreement(s, np.einsum("td,dkh->tkh", h8, W.astype(np.float64)))[0]
        assert q8_err < exact_err / 5, (site, q8_err, exact_err)
        assert exact_err > 0.1  # the exact product really is off by the quantization


# ------------------------------------------------------------------------------------------------ the capture


def test_capture_assembles_logits_summaries_and_notes(f32, f32_dump, bin_dir, monkeypatch):
    """capture(): llama-cpp-python's full logits + llama-debug's summaries (its logits row left to the array), in
    float32 with llama.cpp's arithmetic of the file (an F32 file converts no product's input)."""
    monkeypatch.setattr(L, "debug_dump", lambda *a, **k: f32_dump)  # the dump above, not a second 20 s run
    cap = L.capture(f32, PROMPT, cache_type="f32", bin_dir=bin_dir)
    assert isinstance(cap, Capture) and cap.source == "llama.cpp" and cap.dtype == "float32"
    assert cap.arithmetic == GgmlArithmetic(weights="F32", kv_cache="f32", activations={})
    assert cap.tokens.tolist() == IDS
    assert set(cap.arrays) == {"logits"} and cap.arrays["logits"].shape == (len(IDS), 262144)
    assert set(cap.summaries) == set(f32_dump.summaries) - {"logits"}
    text = " ".join(cap.notes)
    assert "f16 table" in text and "1 + w" in text and "KV cache in f16" not in text
    assert "quantizes its activation rows" not in text
    q4_notes = " ".join(L.conventions(LG.gguf_config(f32), "Q4_K_M", "f16"))
    assert "KV cache in f16" in q4_notes and "Q4_K_M weights" in q4_notes


def test_the_q4_k_m_files_products_take_q8_0_or_q8_k_rows_by_weight_type(q4):
    """Each weight's type in the file decides what ggml converts its product's input to (VEC_DOT_TYPE): this
    Q4_K_M file mixes Q5_0 and Q8_0 weights (Q8_0 rows, blocks of 32) with Q4_K and Q6_K ones (Q8_K, blocks of
    256); the tied unembedding is token_embd, Q8_0."""
    types = LG.weight_types(q4)
    assert len(types) == 18 * 7 + 1
    assert (types["blocks.0.W_Q"], types["blocks.0.W_O"], types["blocks.0.W_V"], types["blocks.2.W_V"]) == (
        "Q5_0", "Q4_K", "Q8_0", "Q5_0")
    assert (types["blocks.0.W_down"], types["blocks.2.W_down"], types["unembed"]) == ("Q6_K", "Q4_K", "Q8_0")
    how = L.arithmetic(q4)
    assert how.weights == "Q4_K_M" and how.kv_cache == "f16"
    assert {k: v for k, v in how.activations.items() if k.startswith("blocks.0.")} == {
        "blocks.0.W_Q": "Q8_0", "blocks.0.W_K": "Q8_0", "blocks.0.W_V": "Q8_0", "blocks.0.W_O": "Q8_K",
        "blocks.0.W_gate": "Q8_0", "blocks.0.W_up": "Q8_0", "blocks.0.W_down": "Q8_K"}
    assert how.activations["unembed"] == "Q8_0" and len(how.activations) == len(types)
    with pytest.raises(InputError, match="cache_type must be 'f16'"):
        L.arithmetic(q4, "q8_0")


def test_a_weight_type_whose_rows_are_not_emulated_is_refused(q4, monkeypatch):
    """Q4_1 / Q5_1 weights take Q8_1 rows (a scale and a sum per block) that refprism does not emulate: no floor
    rather than a wrong one."""
    monkeypatch.setattr(L, "weight_types", lambda path: {"blocks.0.W_Q": "Q4_1"})
    with pytest.raises(InputError, match=r"no floor for llama\.cpp's Q4_1 weights \(blocks\.0\.W_Q\): their "
                                         r"products convert the input rows to Q8_1"):
        L.arithmetic(q4)


# ------------------------------------------------------------------------------------------------ Gemma 1, 2, 3 graphs


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_each_gemma_graph_maps_to_refprisms_sites(arch, tiny_ggufs, bin_dir):
    """llama.cpp's Gemma 1, 2 and 3 graphs (src/models/gemma.cpp, gemma2.cpp, gemma3.cpp) name their tensors
    differently: Gemma 1 has no post-norms (its o_proj output is attn.out, ffn_out is mlp.out), Gemma 2 names its
    post-feedforward norm "ffn_post_norm" without a layer and soft-caps scores and logits. On tiny random F32 files,
    every site the graph computes is mapped and agrees with refprism to print rounding plus 1e-2 of the site's max:
    the f16 GELU table as above, met by weights of standard deviation 1 that make scores of ~100 (Gemma 1) and
    near one-hot patterns. Measured worst: Gemma 1 4.7e-3 (blocks.1.attn.pattern), Gemma 2 1.4e-4, Gemma 3 3.0e-4."""
    path = tiny_ggufs[arch]
    model = refprism.load(path)
    cfg = model.config
    dump = L.debug_dump(path, "the abc ab the", cache_type="f32", bin_dir=bin_dir)
    assert dump.tokens == model.encode("the abc ab the").tolist() == [2, 276, 275, 271, 269, 272]
    rec = dict(model.run(dump.tokens).record)
    want = {n for n in expected_shapes(cfg, len(dump.tokens)) if not n.endswith(".scale")}
    want -= {"logits_uncapped"}  # Gemma 2: llama.cpp's capping nodes are unnamed
    assert set(dump.summaries) == want
    for site, s in dump.summaries.items():
        check(f"{arch} {site}", s, rec[site], rtol=1e-2, sum_rtol=1e-3)


# ------------------------------------------------------------------------------------------------ parsing, dumps


PRINTED = """\
common_debug_cb_eval:                 ffn_up-2 = (f32)    MUL_MAT(blk.2.ffn_up.weight{4, 8, 1, 1}, ffn_norm-2{4, 2, 1, 1}}) = {8, 2, 1, 1}
    [
        [
            [      1.0000,       2.0000,       3.0000,    ...,       6.0000,       7.0000,       8.0000  ],
            [     -1.0000,      -2.0000,      -3.0000,    ...,      -6.0000,      -7.0000,     -80.5000  ],
        ],
    ]
    sum = -72.500000
common_debug_cb_eval:  cache_k_l0 (view) = (q8_0)   SET_ROWS(Kcur-0 (view){256, 7, 1, 1}, idx{7, 1, 1, 1}}) = {256, 256, 1, 1}
Model add_bos: true
Token ids (3):
<bos>(2) (5)(818)  capital(5279)
"""


def test_parse_reads_printed_corners_sums_and_token_ids():
    tokens, tensors = LD.parse_debug_output(PRINTED)
    assert tokens == [2, 818, 5279]
    up, cache = tensors
    assert (up.name, up.op, up.src0, up.ne, up.total) == ("ffn_up-2", "MUL_MAT", "blk.2.ffn_up.weight", (8, 2, 1, 1),
                                                          -72.5)
    assert up.values[(0, 0, 0, 0)] == 1.0 and up.values[(5, 0, 0, 0)] == 6.0 and up.values[(7, 1, 0, 0)] == -80.5
    assert (3, 0, 0, 0) not in up.values and len(up.values) == 12
    assert cache.name == "cache_k_l0 (view)" and cache.values == {}  # quantized: header only


def test_token_ids_are_read_across_newline_pieces():
    """A piece is printed as it is: a newline token breaks the ids' line, and the ids are still all read (a run
    cut before its last id is not complete)."""
    tail = "Token ids (6):\n<bos>(2) def(2063)  f(517) \n(107)     (140) return(2060)\n"
    tokens, _ = LD.parse_debug_output(PRINTED.split("Model add_bos")[0] + tail)
    assert tokens == [2, 2063, 517, 107, 140, 2060]
    assert LD._ends_with_token_ids("x\n" + tail) and not LD._ends_with_token_ids("x\n" + tail[:-9])
    assert not LD._ends_with_token_ids("x\n" + tail[:-1])  # the last id's line unfinished
    assert LD._ends_with_token_ids("x\n" + tail + "llama_perf: (12) (13)\n")  # what follows is not read


def test_parse_refuses_a_changed_print_format():
    broken = PRINTED.replace("      8.0000  ],", "  ],", 1)
    with pytest.raises(L.ToolError, match="print format changed"):
        LD.parse_debug_output(broken)


def test_summary_of_a_printed_tensor_in_refprism_indices():
    cfg = Config.from_hf(make_config("tiny-gemma3", intermediate_size=8))
    _, (up, _) = LD.parse_debug_output(PRINTED)
    s, notes = LD.summaries_from_debug([up], cfg, 2)
    assert notes == [] and set(s) == {"blocks.2.mlp.up"}
    s = s["blocks.2.mlp.up"]
    assert s.shape == (2, 8) and s.total == -72.5 and s.rows is None
    assert s.elements[(1, 7)] == -80.5 and s.elements[(0, 5)] == 6.0  # ne [F, T] -> refprism [t, f]
    with pytest.raises(L.ToolError, match="2 positions"):  # 2 rows of 5 positions: not llama.cpp's cut (1 row)
        LD.summaries_from_debug([up], cfg, 5)


def test_scheme_llamacpp_maps_dump_names_and_refuses_wrong_shapes():
    cfg3 = Config.from_hf(make_config("tiny-gemma3"))
    cfg1 = Config.from_hf(make_config("tiny"))
    T, N, H, D, F = 5, cfg3.n_heads, cfg3.d_head, cfg3.d_model, cfg3.d_mlp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D)).astype(np.float32)
    assert [(s, a.shape) for s, a in LD.scheme_llamacpp("attn_norm-1", x, cfg3)] == [("blocks.1.ln1.out", (T, D))]
    assert [s for s, _ in LD.scheme_llamacpp("l_out-1", x, cfg3)] == ["blocks.1.resid_post", "blocks.2.resid_pre"]
    assert [s for s, _ in LD.scheme_llamacpp("l_out-2", x, cfg3)] == ["blocks.2.resid_post"]  # the last layer
    assert [s for s, _ in LD.scheme_llamacpp("inp_scaled", x, cfg3)] == ["embed", "blocks.0.resid_pre"]
    assert LD.scheme_llamacpp("ffn_out-0", x, cfg3)[0][0] == "blocks.0.mlp.down"
    assert LD.scheme_llamacpp("ffn_out-0", x, cfg1)[0][0] == "blocks.0.mlp.out"  # Gemma 1: no post-norm
    assert LD.scheme_llamacpp("attn_post_norm-0", x, cfg1) == []
    q = rng.normal(size=(T, N * H)).astype(np.float32)
    (site, a), = LD.scheme_llamacpp("Qcur-2", q, cfg3)
    assert site == "blocks.2.attn.q_pre" and np.array_equal(a, q.reshape(T, N, H))  # i0 = n*H + h
    (site, a), = LD.scheme_llamacpp("Qcur-2", q.reshape(1, 1, T, N, H)[0], cfg3)  # [1, T, N, H]: after RoPE
    assert site == "blocks.2.attn.q" and a.shape == (T, N, H)
    kq = rng.normal(size=(N, T, 256)).astype(np.float32)  # [N, T, cells]
    (site, a), = LD.scheme_llamacpp("kq_soft_max-0", kq, cfg3)
    assert site == "blocks.0.attn.pattern" and np.array_equal(a, kq[:, :, :T])
    kqv = rng.normal(size=(N, T, H)).astype(np.float32)  # ne [H, T, N]
    (site, a), = LD.scheme_llamacpp("kqv-0", kqv, cfg3)
    assert site == "blocks.0.attn.z" and np.array_equal(a, kqv.transpose(1, 0, 2))
    out = rng.normal(size=(1, cfg3.vocab_size)).astype(np.float32)
    (site, s), = LD.scheme_llamacpp("result_output", out, cfg3, T=T)
    assert site == "logits" and s.rows == (T - 1,) and s.shape == (T, cfg3.vocab_size)
    assert s.elements[(T - 1, 3)] == out[0, 3]
    assert LD.scheme_llamacpp("norm-0", x, cfg3) == [] and LD.scheme_llamacpp("Qcur_normed-0", q, cfg3) == []
    assert LD.scheme_llamacpp("ffn_post_norm", x, cfg3) == []  # Gemma 2's layerless name: cannot be placed
    with pytest.raises(InputError, match="ffn_gate-0"):
        LD.scheme_llamacpp("ffn_gate-0", rng.normal(size=(T, F + 1)), cfg3)


def _fake_llama_debug(folder: Path, body: str) -> Path:
    folder.mkdir()
    exe = folder / "llama-debug"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return folder


def test_a_llama_debug_that_hangs_after_printing_everything_is_used(tmp_path):
    """llama-debug once printed its whole dump and then never exited: the run is killed at the timeout and what it
    printed is used, since its token ids (the last lines) are whole."""
    folder = _fake_llama_debug(tmp_path / "bin",
                               "printf 'tensors\\nToken ids (2):\\n<bos>(2) a(64)\\n'\nexec sleep 60\n")
    out = L.run_debug(tmp_path / "m.gguf", "a", bin_dir=folder, timeout=1, attempts=1)
    assert out.endswith("a(64)\n")


def test_a_llama_debug_that_hangs_before_its_token_ids_is_run_again_then_refused(tmp_path):
    folder = _fake_llama_debug(tmp_path / "bin",
                               "echo started >> \"$0.runs\"\nprintf 'tensors\\nToken ids (2):\\n<bos>(2)'\n"
                               "exec sleep 60\n")
    with pytest.raises(L.ToolError, match=r"cut short or it hung \(over 1 s\) 2 times"):
        L.run_debug(tmp_path / "m.gguf", "a", bin_dir=folder, timeout=1, attempts=2)
    assert (folder / "llama-debug.runs").read_text().count("started") == 2
