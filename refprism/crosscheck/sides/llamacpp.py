"""llama.cpp as the other side of `refprism compare`: its logits and its own per-tensor dump, in refprism's names.

    cap = capture("gemma-3-270m-F32.gguf", "The capital city of France is")   # -> refprism.crosscheck.capture.Capture

Two views of one llama.cpp, the version vendored in llama-cpp-python LLAMA_CPP_PYTHON (tools/build_llama_cpp.py
builds the binaries from that very sdist):

1. `logits(gguf, ids)`: logits at every position, [T, V], through llama-cpp-python (logits_all, the ids exactly as
   given: no BOS is added, no text is tokenized).
2. `debug_dump(gguf, prompt)`: llama.cpp's own `llama-debug` tool run with `--verbose` (its eval callback prints every
   graph tensor as it is computed), flash attention off (`-fa off`, so the softmax `kq_soft_max` exists), no warm-up
   run (`--no-warmup`: it would print a second graph). It takes text only (`-f FILE`), tokenized with BOS by
   llama.cpp; the ids it printed are checked against the ids asked for. What it prints of each tensor:

       common_debug_cb_eval:   attn_norm-0 = (f32)   MUL(norm-0{640, 7, 1, 1}, blk.0.attn_norm.weight{640, 1, 1, 1}}) = {640, 7, 1, 1}
           [ [ [ v, v, v, ..., v, v, v ], ...  ] ]
           sum = -41.621765

   i.e. along each of the three fastest axes the first and last 3 indices (all when the axis has <= 6), at 4
   decimals (`%12.4f`), and the float32 sum of every element. `parse_debug_output` reads this back exactly; each
   printed element becomes a `Summary` element at its refprism index. (tools/build_llama_cpp.py patches one line
   of the tool: it flushes llama.cpp's asynchronous logger before exiting, without which the end of the dump is
   often lost.)

ggml lists dimensions fastest first (ne[0] is the model width), so a [ne0=D, ne1=T] tensor is refprism's [T, D].
The graph tags -> refprism sites, read from the vendored sources (src/models/gemma.cpp, gemma2.cpp, gemma3.cpp,
src/llama-graph.cpp) and checked against real runs: Gemma 3 270M, and tiny random Gemma 1, 2 and 3 files
(tests/test_other_llamacpp.py):

    llama.cpp tag (op)              ne, fastest first   refprism site               refprism index
    inp_scaled                      [D, T]              embed (and blocks.0.resid_pre)  [t, d]
    attn_norm-l                     [D, T]              blocks.l.ln1.out            [t, d]
    Qcur-l (MUL_MAT)                [N*H, T]            blocks.l.attn.q_pre         [t, n, h], i0 = n*H + h
    Qcur-l (RESHAPE)                [H, N, T]           blocks.l.attn.q_pre         [t, n, h]
    Qcur-l (ROPE)                   [H, N, T]           blocks.l.attn.q             [t, n, h]  (after the Gemma 3 q norm)
    Kcur-l  (same three)            [K*H, T] / [H, K, T]  attn.k_pre / attn.k
    Vcur-l (MUL_MAT, RESHAPE)       [K*H, T] / [H, K, T]  blocks.l.attn.v
    kq-l                            [S, T, N]           blocks.l.attn.scores        [n, t, s]  (q * scale . k)
    kq_soft_max-l                   [S, T, N]           blocks.l.attn.pattern       [n, t, s]
    kqv-l                           [H, T, N]           blocks.l.attn.z             [t, n, h]
    kqv_out-l                       [N*H, T]            blocks.l.attn.z             [t, n, h]
    (unnamed) MUL_MAT of blk.l.attn_output.weight  [D, T]   Gemma 2/3: attn.o_proj; Gemma 1: attn.out
    attn_post_norm-l                [D, T]              blocks.l.attn.out           (Gemma 2/3)
    sa_out-l                        [D, T]              blocks.l.resid_mid
    ffn_norm-l                      [D, T]              blocks.l.ln2.out
    ffn_gate-l / ffn_up-l           [F, T]              blocks.l.mlp.gate / mlp.up
    ffn_geglu-l                     [F, T]              blocks.l.mlp.act
    ffn_out-l                       [D, T]              Gemma 2/3: mlp.down; Gemma 1: mlp.out
    ffn_post_norm-l (Gemma 3), ffn_post_norm (Gemma 2: no layer in its name; the layer of the ffn_out before it)
                                    [D, T]              blocks.l.mlp.out
    l_out-l                         [D, T]              blocks.l.resid_post (and blocks.l+1.resid_pre)
    result_norm                     [D, T]              ln_final.out
    result_output                   [V, T]              logits      (Gemma 2: after the final soft-cap)

Gemma 4 (src/models/gemma4.cpp) has its own table, llamacpp_debug.GEMMA4_SITES (docs/gemma4.md): per-layer
inputs [P, L, T], the experts [G, J, T], the PLE products, each layer's own widths; F32 files only.

S is the KV cache's cell axis: n_kv cells (llama.cpp pads the cache to 256), the first T holding positions
0 .. T-1 of this fresh context; the printed cells beyond T are empty (0 in kq and in the pattern) and are checked
to be 0, then dropped. Not mapped, because refprism records no such quantity: `embd` (the unscaled embedding rows),
`norm-l` (x / s before the norm weight), `Qcur_normed-l` / `Kcur_normed-l` (Gemma 3: after the q/k norm, before
RoPE), the unnamed q * scale node (and Gemma 1's `Qcur_scaled-l`), Gemma 2's capped scores `kq_scaled_1-l`,
`kq_tanh-l`, `kq_scaled_2-l`, the KV cache copies `cache_k_l*` / `cache_v_l*`, and the GET_ROWS nodes that cut
the last layer. The last layer is cut to the output rows (llama-debug asks for the last position's logits only)
after the attention's o_proj: from attn_post_norm-(L-1) on, and in result_norm / result_output, a summary holds
row T-1 only (`Summary.rows`).

llama.cpp's conventions, as they meet refprism's numbers (each becomes a note of the capture):
- Norm weights: the GGUF stores every Gemma norm weight as 1 + w (the converter adds 1; refprism/checkpoints/gguf.py
  subtracts it on reading). Same activations.
- Embedding scale: `ggml_scale(embd, sqrtf(D))`, sqrt rounded to float32 (25.298222 for D = 640), which is what a
  float32 refprism run uses (a bf16 HF run rounds it to 25.25).
- KV cache: keys and values are stored (default f16) and read back for the attention, so kq, the pattern and z use
  f16-rounded keys and values unless `cache_type="f32"`; q, k and v themselves are printed before the store.
- GEGLU on the CPU: gelu_tanh through an f16 table (ggml-cpu/vec.h, GGML_GELU_FP16): the gate is rounded to f16 and
  gelu(gate) is an f16 value, so mlp.act differs from exact by up to ~2**-10 relative.
- RoPE angles: theta_i = p * base**(-2i/H) built by repeated float32 multiplication (ggml_rope_cache_init).
- Quantized files (Q4_K_M, ...): each matmul with a quantized weight first quantizes its activation row (to Q8_K for
  the k-quants, Q8_0 for Q4_0/Q5_0/Q8_0), so even a perfect reference differs by more than the weights' rounding.

A capture is float32 with `arithmetic` (capture.GgmlArithmetic: the file's weight types, the KV cache): compare's
floors are those of an honest implementation of llama.cpp's arithmetic (crosscheck.ggml_edit), every rounding above
included, and the printed summaries carry the print's resolution and llama-debug's running float32 sum.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refprism.crosscheck.capture import ROW_TYPES, Capture, GgmlArithmetic, Summary
from refprism.crosscheck.sides.gguf_header import VEC_DOT_TYPE, file_type, gguf_config, read_header, weight_types
from refprism.crosscheck.sides.llamacpp_debug import (
    Printed,
    _ends_with_token_ids,
    parse_debug_output,
    summaries_from_debug,
)
from refprism.errors import CheckpointError, InputError, ToolError
from refprism.gemma.config import Config

LLAMA_CPP_PYTHON = "0.3.36"  # llama-cpp-python, whose vendor/llama.cpp the tools are built from (pyproject: llamacpp)
BUILD_COMMAND = "python tools/build_llama_cpp.py"


# ------------------------------------------------------------------------------------------------ the tools


def cache_dir() -> Path:
    """Where tools/build_llama_cpp.py keeps this version's build: $REFPRISM_CACHE or ~/.cache/refprism, /llama.cpp/V."""
    base = os.environ.get("REFPRISM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "refprism") / "llama.cpp" / LLAMA_CPP_PYTHON


def tool(name: str, bin_dir=None) -> Path:
    """The path of a built llama.cpp binary (llama-debug, llama-quantize), or ToolError naming the build command."""
    folder = Path(bin_dir) if bin_dir is not None else cache_dir() / "bin"
    path = folder / name
    if bin_dir is not None and not os.access(path, os.X_OK):  # a folder given (--llama-cpp DIR, or the tests')
        raise ToolError(f"no executable {name} in {str(folder)[:200]!r}: give the folder your llama.cpp build wrote "
                        f"its binaries to (e.g. build/bin; --llama-cpp), or run {BUILD_COMMAND}")
    if not os.access(path, os.X_OK):
        raise ToolError(f"{name} of llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}) is not built in {folder}: "
                        f"run {BUILD_COMMAND}")
    return path


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ToolError(f"llama.cpp's logits need llama-cpp-python: pip install 'refprism[llamacpp]' "
                        f"(or run {BUILD_COMMAND})") from None
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        raise ToolError(f"llama-cpp-python {llama_cpp.__version__} is installed; refprism's llama.cpp side is built "
                        f"and checked with {LLAMA_CPP_PYTHON}: pip install llama-cpp-python=={LLAMA_CPP_PYTHON}")
    return llama_cpp


def quantize(src, dst, file_type: str = "F32", *, bin_dir=None) -> Path:
    """Convert a GGUF file with llama.cpp's own llama-quantize (e.g. Q4_K_M -> F32: the same values, dequantized).

    Runs `llama-quantize --allow-requantize SRC DST TYPE` (--allow-requantize: the source is already quantized).
    """
    dst = Path(dst)
    cmd = [str(tool("llama-quantize", bin_dir)), "--allow-requantize", str(src), str(dst), file_type]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not dst.is_file():
        raise ToolError(f"llama-quantize failed ({done.returncode}): {_last_line(done.stderr or done.stdout)}")
    return dst


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------ view 1: logits


def _no_extra_buffers(llama_cpp) -> None:
    """Load weights into plain CPU buffers, as ggml's vec_dot computes (the arithmetic refprism's floors model),
    never into llama.cpp's "extra" buffer types: on a CPU with AMX, llama-cpp-python 0.3.36 (built -march=native by
    pip) moves Q4_K weights into AMX buffers, whose matmul (ggml_backend_amx_mul_mat) crashes the process on this
    workplace's VMs (a segmentation fault on Gemma 3 270M's Q4_K_M file). llama-cpp-python does not expose the model
    parameter `use_extra_bufts`, so its defaults are wrapped once."""
    lib = llama_cpp.llama_cpp
    if getattr(lib.llama_model_default_params, "refprism", False):
        return
    real = lib.llama_model_default_params

    def params():
        p = real()
        p.use_extra_bufts = False
        return p

    params.refprism = True
    lib.llama_model_default_params = params


def _load_llama(gguf_path, n_tokens: int, *, cache_type="f16", vocab_only=False):
    llama_cpp = _llama_cpp()
    _no_extra_buffers(llama_cpp)
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[_cache_type(cache_type)]
    n_ctx = max(256, -(-n_tokens // 256) * 256)
    try:
        with _quiet_stderr():  # verbose=False leaves llama.cpp's context warnings on stderr (fd 2)
            return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=2, n_threads_batch=2, logits_all=True, flash_attn=False, type_k=kv,
                                   type_v=kv, vocab_only=vocab_only, verbose=False)
    except ValueError as e:  # llama-cpp-python: "Failed to load model from file: ..."
        raise CheckpointError(f"llama.cpp cannot load {gguf_path}: {e}") from None


@contextlib.contextmanager
def _quiet_stderr():
    """stderr silenced for the block, both sys.stderr (llama-cpp-python prints llama.cpp's log through it) and file
    descriptor 2 (ggml's C code): the warnings llama.cpp gives while it sets up a context ("n_ctx_seq >
    n_ctx_train", "using full-size SWA cache") are not refprism's to print; failures still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cache_type(cache_type: str) -> str:
    if cache_type not in ("f16", "f32"):
        raise InputError(f"cache_type must be 'f16' (llama.cpp's default) or 'f32', got {cache_type!r}")
    return cache_type


def tokenize(gguf_path, text: str) -> list[int]:
    """llama.cpp's tokenization of text as llama-debug does it: BOS added when the file says so, no special tokens."""
    llm = _load_llama(gguf_path, 1, vocab_only=True)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=bool(llm._model.add_bos_token()), special=False)
    finally:
        llm.close()


def detokenize(gguf_path, ids) -> str:
    """Text for ids[1:] (ids[0] must be BOS), which llama.cpp turns back into exactly `ids`, or InputError."""
    ids = [int(i) for i in ids]
    llm = _load_llama(gguf_path, 1, vocab_only=True)
    try:
        bos = llm.token_bos()
        if not ids or ids[0] != bos:
            raise InputError(f"llama-debug takes text and adds BOS ({bos}): the ids must start with it")
        try:
            text = llm.detokenize(ids[1:]).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("these ids do not spell UTF-8 text; llama-debug takes text only") from None
        again = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()
    if again != ids:
        first = next(i for i, (a, b) in enumerate(zip(again + [-1] * len(ids), ids)) if a != b)
        raise InputError(f"llama-debug takes text only, and llama.cpp tokenizes the text of these ids differently "
                         f"(from position {first}): give the prompt as text, or ids that round-trip")
    return text


def logits(gguf_path, ids, *, cache_type="f16") -> np.ndarray:
    """llama.cpp's logits at every position, [T, V] float32, for the token ids exactly as given (no BOS added).

    llama-cpp-python with logits_all, one batch of T tokens, n_threads 2, flash attention off, the KV cache in
    `cache_type` ("f16", llama.cpp's default, or "f32").
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise InputError("the token id list is empty")
    llm = _load_llama(gguf_path, len(ids), cache_type=cache_type)
    try:
        V = llm.n_vocab()
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise InputError(f"token id {bad[0]} is out of range: the vocabulary has ids 0 .. {V - 1}")
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)], dtype=np.float32)  # a copy: scores is the Llama's own buffer
    finally:
        llm.close()
    return out


# ------------------------------------------------------------------------------------------------ view 2: llama-debug


def run_debug(gguf_path, prompt: str, *, cache_type="f16", tensor_filter=(), bin_dir=None, timeout=300,
              attempts=5) -> str:
    """Run llama-debug on text; return its stdout (the tensor dump, then the token ids).

    llama.cpp's logger prints from a worker thread that nobody waits for at exit (common/log.cpp leaks it on
    purpose, llama.cpp issue 22142), so the end of the output is sometimes lost. The token ids are its last
    lines: a run whose output lacks them whole is run again, up to `attempts` times. A run still going after
    `timeout` seconds is killed: if it had printed everything it is used (it hung on exit), else it is run again.
    """
    exe = tool("llama-debug", bin_dir)
    with tempfile.TemporaryDirectory(prefix="refprism-llama-debug-") as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(prompt + "\n", encoding="utf-8")  # -f drops one trailing newline: this one
        n_ctx = 256 * (1 + len(prompt.encode("utf-8")) // 256)  # a cell per byte at least: room for every token
        cmd = [str(exe), "-m", str(gguf_path), "-f", str(prompt_file), "--verbose", "-fa", "off", "--no-warmup", "--no-repack",
               "-t", "2", "-tb", "2", "-c", str(n_ctx), "-b", str(n_ctx), "-ub", str(n_ctx),
               "-ctk", _cache_type(cache_type), "-ctv", cache_type]
        for pattern in tensor_filter:
            cmd += ["--tensor-filter", pattern]
        for _ in range(attempts):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired as stuck:  # killed; what it printed before is kept
                out = stuck.stdout or ""
                out = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
                if _ends_with_token_ids(out):
                    return out  # it printed everything and then did not exit (its logger thread at exit)
                continue
            if done.returncode != 0:
                raise ToolError(f"llama-debug failed (exit {done.returncode}) on {gguf_path}: "
                                f"{_last_line(done.stderr)}")
            if _ends_with_token_ids(done.stdout):
                return done.stdout
    raise ToolError(f"llama-debug's output was cut short or it hung (over {timeout} s) {attempts} times "
                    "(its logger thread is not flushed at exit)")


# ------------------------------------------------------------------------------------------------ names and axes


@dataclass
class Dump:
    """What llama-debug printed for one prompt, read back: token ids, summaries by refprism site, raw tensors."""

    tokens: list[int]
    summaries: dict[str, Summary]
    tensors: list[Printed]
    notes: list[str]


def debug_dump(gguf_path, prompt, *, cache_type="f16", tensor_filter=(), bin_dir=None, cfg=None) -> Dump:
    """Run llama-debug on a prompt (text, or ids starting with BOS that llama.cpp round-trips through text).

    Returns every printed tensor and the summaries of the mapped ones (module docstring: the table).
    """
    if isinstance(prompt, str):
        text, want = prompt, None
    else:
        want = [int(i) for i in prompt]
        text = detokenize(gguf_path, want)
    tokens, tensors = parse_debug_output(run_debug(gguf_path, text, cache_type=cache_type,
                                                   tensor_filter=tensor_filter, bin_dir=bin_dir))
    if tokens is None:
        raise ToolError("llama-debug printed no token ids")
    if want is not None and tokens != want:
        raise ToolError(f"llama-debug ran ids {tokens[:12]}..., not the ids asked for {want[:12]}...")
    cfg = cfg or gguf_config(gguf_path)
    summaries, notes = summaries_from_debug(tensors, cfg, len(tokens))
    return Dump(tokens=tokens, summaries=summaries, tensors=tensors, notes=notes)


# ------------------------------------------------------------------------------------------------ the arithmetic


def arithmetic(gguf_path, cache_type: str = "f16") -> GgmlArithmetic:
    """How llama.cpp's CPU backend computes this GGUF (capture.GgmlArithmetic): its weight types say what each
    product converts its input rows to (VEC_DOT_TYPE); the KV cache is the run's choice. A weight type whose
    conversion refprism does not emulate (Q4_1 / Q5_1: Q8_1 rows) is an InputError naming it."""

    rows = {}
    for weight, kind in weight_types(gguf_path).items():
        if kind not in VEC_DOT_TYPE:
            raise InputError(f"llama.cpp weight type {kind} ({weight}): no known conversion of its input rows")
        row = VEC_DOT_TYPE[kind]
        if row is not None and row not in ROW_TYPES:
            raise InputError(f"no floor for llama.cpp's {kind} weights ({weight}): their products convert the input "
                             f"rows to {row}, which refprism does not emulate (it does {', '.join(ROW_TYPES)})")
        if row is not None:
            rows[weight] = row
    return GgmlArithmetic(weights=file_type(gguf_path), kv_cache=_cache_type(cache_type), activations=rows)


def gemma4_f32_only(gguf_path) -> None:
    """Gemma 4 against llama.cpp is modelled on F32 weights only: ggml's conversion of the input rows of the
    experts' MUL_MAT_ID, the router and the per-layer products (an F16 or quantized weight's vec_dot type) is
    not in crosscheck.ggml_edit. Anything else is an InputError naming the way to an F32 file."""
    import gguf

    kinds = {gguf.GGMLQuantizationType(kind).name for _, kind, _ in read_header(gguf_path).tensors.values()}
    if kinds - {"F32"}:
        raise InputError(f"comparing a Gemma 4 GGUF with {', '.join(sorted(kinds - {'F32'}))} tensors against "
                         "llama.cpp is not supported yet (ggml's row conversions for its experts and per-layer "
                         "products are not modelled): convert it to F32 first (refprism.crosscheck.sides."
                         "llamacpp.quantize(src, dst, 'F32'))")


GEMMA4_UNMAPPED = ("not mapped on Gemma 4 (refprism records no such quantity): embd, per_layer_proj (the per-layer "
                   "projection after its norm), Qcur_normed / Kcur_normed (before RoPE), ffn_moe_probs, "
                   "ffn_moe_weights_norm (without per_expert_scale: refprism's moe.topk.weight has it), "
                   "ffn_moe_down_scaled (ffn_moe_down, the unscaled down product, is moe.expert_out), ffn_moe_weighted, "
                   "the PLE GELU and product nodes, the KV cache copies; "
                   "a KV-sharing consumer has no k / v of its own (kq reads its producer's cache)")


# ------------------------------------------------------------------------------------------------ the capture


def conventions(cfg: Config, weights: str, cache_type: str) -> list[str]:
    """The notes every llama.cpp capture carries: how its numbers are made where they differ from refprism's."""
    notes = [
        "llama.cpp's GGUF stores each Gemma norm weight as 1 + w (refprism subtracts 1 on reading): same activations",
        f"embedding scale: llama.cpp multiplies by sqrtf(D) in float32 ({np.sqrt(np.float32(cfg.d_model)):.8g}), "
        "as a float32 refprism run does",
        "mlp.act: llama.cpp's CPU GEGLU looks gelu_tanh up in an f16 table (gate and gelu rounded to f16: "
        "up to ~2**-10 relative)",
        "RoPE angles: llama.cpp builds p * base**(-2i/H) by repeated float32 multiplication",
        "llama-debug prints each tensor's corners (first and last 3 along its three fastest axes) at 4 decimals, "
        "and its float32 sum; the last layer after o_proj, result_norm and result_output hold row T-1 only",
        "not mapped (refprism records no such quantity): embd (unscaled), norm-l (x / s before the weight), "
        "Qcur_normed / Kcur_normed, the q * scale node, Gemma 2's capped scores kq_scaled_2, the KV cache copies; "
        "llama.cpp prints no norm scales (ln*.scale)",
    ]
    if cfg.gemma4:
        notes[-1] = GEMMA4_UNMAPPED
        notes[2] = ("mlp.act, moe.act, ple.act: llama.cpp's CPU GELU looks gelu_tanh up in an f16 table (gate and "
                    "gelu rounded to f16: up to ~2**-10 relative; a gate on an f16 rounding boundary flips with one "
                    "ulp of its product, which later layers carry)")
    if cache_type == "f16":
        notes.append("KV cache in f16 (llama.cpp's default): attn.scores, attn.pattern and attn.z use f16-rounded "
                     "keys and values (attn.k and attn.v are printed before the store)")
    if weights not in ("F32", "F16", "BF16"):
        notes.append(f"{weights} weights: each quantized matmul also quantizes its activation rows (Q8_K for "
                     "k-quants, Q8_0 for Q4_0/Q5_0/Q8_0)")
    return notes


def capture(gguf_path, prompt, *, with_debug=True, cache_type="f16", bin_dir=None, own_build=False) -> Capture:
    """llama.cpp on a GGUF file as a Capture: full logits [T, V] (llama-cpp-python) + llama-debug's summaries.

    bin_dir: a folder holding llama-debug, run instead of the cached one; own_build: it is your own build
    (`compare --llama-cpp DIR`), so its logits are what it prints too (llama-cpp-python links the pinned build).
    prompt: text (tokenized by llama.cpp, BOS added as the file says) or token ids (run as given; with_debug needs
    them to start with BOS and round-trip through text, since llama-debug takes text only).
    The capture's dtype is float32 and its `arithmetic` says how llama.cpp's CPU backend rounds this file
    (`arithmetic`): compare's floors are those of that arithmetic.
    """
    gguf_path = Path(gguf_path)
    if with_debug:
        tool("llama-debug", bin_dir)  # a missing build: one line naming the command, before any work
    cfg = gguf_config(gguf_path)
    how = arithmetic(gguf_path, cache_type)
    if cfg.gemma4:
        gemma4_f32_only(gguf_path)
    ids = tokenize(gguf_path, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if with_debug and not isinstance(prompt, str):
        detokenize(gguf_path, ids)  # ids llama-debug cannot take are refused before any run
    cap = Capture(source="llama.cpp", tokens=np.asarray(ids, dtype=np.int64), dtype="float32", arithmetic=how,
                  notes=conventions(cfg, how.weights, how.kv_cache))
    if not own_build:  # llama-cpp-python runs the build refprism pins; a build of your own prints its own logits
        cap.arrays["logits"] = logits(gguf_path, ids, cache_type=cache_type)
    else:
        cap.source = f"llama.cpp ({bin_dir})"
        cap.notes.append(f"your llama.cpp build in {bin_dir}: every site from its llama-debug, the logits too "
                         "(the rows it prints; llama-cpp-python runs the build refprism pins, not yours)")
    if with_debug:
        dump = debug_dump(gguf_path, prompt if isinstance(prompt, str) else ids, cache_type=cache_type,
                          bin_dir=bin_dir, cfg=cfg)
        if dump.tokens != ids:
            raise ToolError(f"llama-debug tokenized the prompt as {dump.tokens[:12]}..., llama-cpp-python as "
                            f"{ids[:12]}...")
        # The full logits (llama-cpp-python) are the logits site; llama-debug's printed last row is the same
        # quantity from the other binary (tests/test_other_llamacpp.py checks that they agree).
        if "logits" in cap.arrays:
            dump.summaries.pop("logits", None)
        cap.summaries.update(dump.summaries)
        cap.notes += dump.notes
    return cap


