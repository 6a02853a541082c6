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
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from refprism.crosscheck.capture import ROW_TYPES, Capture, GgmlArithmetic, Summary
from refprism.errors import CheckpointError, InputError, RefprismError
from refprism.gemma.config import Config
from refprism.gemma.record import SITE_LETTERS

LLAMA_CPP_PYTHON = "0.3.36"  # llama-cpp-python, whose vendor/llama.cpp the tools are built from (pyproject: llamacpp)
BUILD_COMMAND = "python tools/build_llama_cpp.py"
PRINTED_EDGE = 3  # llama-debug prints the first and last 3 indices of each of the three fastest axes
PRINT_DECIMALS = 4  # ... as %12.4f
PRINTED_RESOLUTION = 0.5 * 10.0 ** -PRINT_DECIMALS  # a printed element is within 5e-5 of the tensor's value
SUM_RESOLUTION = 0.5e-6  # the sum is printed as %f (6 decimals) of a running float32 sum (common/debug.cpp)


class ToolError(RefprismError):
    """An external tool (llama.cpp's binaries, llama-cpp-python) is missing or failed."""


# ------------------------------------------------------------------------------------------------ the tools


def cache_dir() -> Path:
    """Where tools/build_llama_cpp.py keeps this version's build: $REFPRISM_CACHE or ~/.cache/refprism, /llama.cpp/V."""
    base = os.environ.get("REFPRISM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "refprism") / "llama.cpp" / LLAMA_CPP_PYTHON


def tool(name: str, bin_dir=None) -> Path:
    """The path of a built llama.cpp binary (llama-debug, llama-quantize), or ToolError naming the build command."""
    folder = Path(bin_dir) if bin_dir is not None else cache_dir() / "bin"
    path = folder / name
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


# ------------------------------------------------------------------------------------------------ the file


def gguf_config(path) -> Config:
    """refprism's Config of a GGUF file, from its metadata alone (no tensor is read)."""
    from refprism.checkpoints.gguf import ARCHITECTURES, config_from_metadata

    head = read_header(path)
    meta, tensors = head.meta, {name: ne for name, (ne, _, _) in head.tensors.items()}
    if meta.get("general.architecture") not in ARCHITECTURES:
        raise CheckpointError(f"{Path(path).name} holds a {meta.get('general.architecture')!r} model, not Gemma 1/2/3")
    shapes = {hf: tuple(reversed(tensors[name])) for name, hf in  # the two shapes the config reads, in HF's order
              (("token_embd.weight", "model.embed_tokens.weight"),
               ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight")) if name in tensors}
    hf = config_from_metadata(meta, shapes, path)
    return Config.from_hf({k: v for k, v in hf.items() if k != "gguf_defaults"})


def file_type(path) -> str:
    """The GGUF's weight type as llama.cpp names it: "F32", "F16", "BF16", "Q4_K_M", ... ("unknown" if unrecorded)."""
    import gguf

    value = read_header(path).meta.get("general.file_type")
    if value is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return f"file_type {int(value)}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


# GGUF value types: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files, version 2 and 3)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    """A GGUF file's header: metadata, and per tensor its ne (fastest first), ggml type and data offset."""

    meta: dict
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (ne, ggml type id, offset from data_start)
    data_start: int


def read_header(path) -> Header:
    """A GGUF file's metadata and tensor table, read straight from its header with `struct`.

    gguf.GGUFReader builds NumPy views of every field (~10 s for a 262k-piece vocabulary); this reads only what
    the header holds and skips arrays of strings (the tokenizer's pieces and merges: no config lives there), which
    come back as None. Numeric arrays come back as lists.
    """
    import struct

    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        def take(fmt):
            size = struct.calcsize(fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise CheckpointError(f"{path} is truncated: its GGUF header ends early")
            return struct.unpack(fmt, raw)[0]

        def string():
            n = take("<Q")
            raw = f.read(n)
            if len(raw) != n:
                raise CheckpointError(f"{path} is truncated: its GGUF header ends early")
            return raw.decode("utf-8", errors="replace")

        def value(kind):
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                inner, n = take("<I"), take("<Q")
                if inner == _STRING:
                    for _ in range(n):
                        f.seek(take("<Q"), 1)
                    return None
                if inner not in _SCALARS:
                    raise CheckpointError(f"{path}: a GGUF array of value type {inner} cannot be read")
                fmt = _SCALARS[inner]
                raw = f.read(struct.calcsize(fmt) * n)
                return [x[0] for x in struct.iter_unpack(fmt, raw)]
            raise CheckpointError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic)")
        version = take("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            ne = tuple(take("<Q") for _ in range(take("<I")))
            tensors[name] = (ne, take("<I"), take("<Q"))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
    return Header(meta, tensors, data_start)


def tensor(path, name: str) -> np.ndarray:
    """One tensor of a GGUF file, dequantized to float32 by the gguf package, in NumPy order (reversed ne)."""
    import gguf

    head = read_header(path)
    if name not in head.tensors:
        raise CheckpointError(f"{Path(path).name} has no tensor {name}")
    ne, kind, offset = head.tensors[name]
    qtype = gguf.GGMLQuantizationType(kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_bytes = int(np.prod(ne)) // block * size
    raw = np.fromfile(path, dtype=np.uint8, count=n_bytes, offset=head.data_start + offset)
    shape = (*reversed(ne[1:]), ne[0] // block * size)  # rows of bytes, as gguf.quants.dequantize takes them
    return gguf.quants.dequantize(raw.reshape(shape), qtype).astype(np.float32).reshape(tuple(reversed(ne)))


# ------------------------------------------------------------------------------------------------ view 1: logits


def _load_llama(gguf_path, n_tokens: int, *, cache_type="f16", vocab_only=False):
    llama_cpp = _llama_cpp()
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


@dataclass
class Printed:
    """One tensor as llama-debug printed it: name, type, op, sources, ne (fastest first), printed values, sum."""

    name: str
    type: str
    op: str
    src0: str
    src1: str
    ne: tuple[int, int, int, int]
    values: dict[tuple[int, int, int, int], float] = field(default_factory=dict)  # (i0, i1, i2, i3) -> value
    total: float | None = None


_HEADER = re.compile(r"^common_debug_cb_eval:\s*(?P<name>.*?) = \((?P<type>[^)]*)\)\s*(?P<op>[A-Z0-9_]+)"
                     r"\((?P<src0>.*?)\{[-\d, ]*\}, (?P<src1>.*?)\}\) = \{(?P<ne>[-\d, ]+)\}\s*$")
_SUM = re.compile(r"^\s*sum = (?P<sum>\S+)\s*$")


def printed_indices(n: int, edge: int = PRINTED_EDGE) -> list[int]:
    """The indices llama-debug prints along an axis of length n: all if n <= 2*edge, else the first and last `edge`."""
    return list(range(n)) if n <= 2 * edge else [*range(edge), *range(n - edge, n)]


def parse_debug_output(text: str) -> tuple[list[int] | None, list[Printed]]:
    """llama-debug's stdout -> (the token ids it printed, or None; every tensor it printed, in graph order)."""
    lines = text.splitlines()
    tensors: list[Printed] = []
    tokens = None
    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i])
        if m is None:
            if lines[i].startswith("Token ids (") and i + 1 < len(lines):
                n = int(lines[i][len("Token ids ("):].split(")")[0])
                found = _token_ids("\n".join(lines[i + 1:]) + "\n", n)  # a piece may be a newline: read on
                if found is None:
                    raise ToolError(f"cannot read llama-debug's {n} token ids from {lines[i + 1][:200]!r}")
                tokens = found
            i += 1
            continue
        ne = tuple(int(x) for x in m["ne"].split(","))
        t = Printed(m["name"].strip(), m["type"], m["op"], m["src0"].strip(), m["src1"].strip(), ne)
        i += 1
        numbers: list[float] = []
        while i < len(lines) and lines[i].startswith(" "):  # the data block is indented; a quantized tensor has none
            s = _SUM.match(lines[i])
            if s:
                if t.total is None:
                    t.total = float(s["sum"])
                i += 1
                if i < len(lines) and lines[i].strip() == "[":  # another ne[3] block follows
                    continue
                break
            row = lines[i].strip()
            if row.startswith("[") and len(row) > 1:
                numbers += [float(x) for x in row.strip("[],").replace(" ", "").split(",") if x and x != "..."]
            i += 1
        if numbers:
            order = [(i0, i1, i2, i3) for i3 in range(ne[3]) for i2 in printed_indices(ne[2])
                     for i1 in printed_indices(ne[1]) for i0 in printed_indices(ne[0])]
            if len(order) != len(numbers):
                raise ToolError(f"llama-debug printed {len(numbers)} values of {t.name} (ne {list(ne)}), "
                                f"expected {len(order)}: its print format changed")
            t.values = dict(zip(order, numbers))
        tensors.append(t)
    return tokens, tensors


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
        cmd = [str(exe), "-m", str(gguf_path), "-f", str(prompt_file), "--verbose", "-fa", "off", "--no-warmup",
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


# llama-debug ends with "Token ids (n):" and one line of `piece(id)`, space separated; a piece is printed as it is,
# so a newline piece breaks that line: an id is "(digits)" followed by a space or a newline.
_TOKEN_ID = re.compile(r"\((-?\d+)\)(?=[ \n])")


def _token_ids(rest: str, n: int) -> list[int] | None:
    """The n ids printed at the start of `rest` (what follows "Token ids (n):"), or None when the output stops
    before the line that holds the last of them is complete."""
    found = list(_TOKEN_ID.finditer(rest))[:n]
    if len(found) < n:
        return None
    if found and "\n" not in rest[found[-1].end():]:
        return None  # the line of the last id is not finished: the output was cut there
    return [int(m[1]) for m in found]


def _ends_with_token_ids(text: str) -> bool:
    """Whether llama-debug's output holds its closing "Token ids (n):" line and all n ids after it."""
    at = text.rfind("\nToken ids (")
    if at < 0:
        return False
    head, _, rest = text[at + 1:].partition("\n")
    return _token_ids(rest, int(head[len("Token ids ("):].split(")")[0])) is not None


# ------------------------------------------------------------------------------------------------ names and axes


GLOBAL_SITES = ("embed", "ln_final.out", "logits")


def place(tag: str, op: str | None, ndim: int, cfg: Config) -> tuple[str, str] | None:
    """(refprism site without "blocks.{l}.", ggml layout fastest first) of a llama.cpp graph tensor, or None.

    tag: the name without its "-l" layer suffix. op: the ggml op that made it; None for a dump file, which keeps
    names only: then a repeated name means its last tensor, told apart by ndim (Qcur as [N*H, T] is the
    projection, as [H, N, T] the tensor after RoPE). A layout lists ne axes fastest first; "NH" is one axis holding
    head n's H values at n*H + h; S is the KV cache's cell axis.
    """
    post = cfg.post_norms
    simple = {
        "inp_scaled": ("embed", "D T"),
        "attn_norm": ("ln1.out", "D T"),
        "attn_post_norm": ("attn.out", "D T") if post else None,
        "sa_out": ("resid_mid", "D T"),
        "ffn_norm": ("ln2.out", "D T"),
        "ffn_gate": ("mlp.gate", "F T"),
        "ffn_up": ("mlp.up", "F T"),
        "ffn_geglu": ("mlp.act", "F T"),
        "ffn_out": ("mlp.down" if post else "mlp.out", "D T"),
        "ffn_post_norm": ("mlp.out", "D T") if post else None,
        "l_out": ("resid_post", "D T"),
        "kq": ("attn.scores", "S T N"),
        "kq_soft_max": ("attn.pattern", "S T N"),
        "kqv_out": ("attn.z", "NH T"),
        "kqv": ("attn.z", "H T N"),
        "result_norm": ("ln_final.out", "D T"),
        "result_output": ("logits", "V T"),
        "attn_output": ("attn.o_proj" if post else "attn.out", "D T"),  # the unnamed MUL_MAT of blk.l.attn_output
    }
    if tag in simple:
        return simple[tag]
    if tag not in ("Qcur", "Kcur", "Vcur"):
        return None
    heads = "N" if tag == "Qcur" else "K"
    before, after = {"Qcur": ("attn.q_pre", "attn.q"), "Kcur": ("attn.k_pre", "attn.k"),
                     "Vcur": ("attn.v", "attn.v")}[tag]
    if op == "MUL_MAT" or (op is None and ndim == 2):
        return before, f"{heads}H T"  # the projection, [N*H, T]
    if op == "RESHAPE":
        return before, f"H {heads} T"  # the same values viewed per head
    if op == "ROPE" or (op is None and ndim == 3):
        return after, f"H {heads} T"  # after RoPE (Gemma 3: after the q/k norm too); v has no RoPE: the reshape
    return None


def _sizes(cfg: Config, T: int) -> dict[str, int]:
    return {"T": T, "D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.d_head, "F": cfg.d_mlp,
            "V": cfg.vocab_size}


def _split(tag: str) -> tuple[str, int | None]:
    """"Qcur-3" -> ("Qcur", 3); "result_norm" -> ("result_norm", None)."""
    head, _, tail = tag.rpartition("-")
    return (head, int(tail)) if head and tail.isdecimal() else (tag, None)


def summaries_from_debug(tensors: list[Printed], cfg: Config, T: int) -> tuple[dict[str, Summary], list[str]]:
    """llama-debug's printed tensors -> {refprism site: Summary of the printed elements}, plus notes.

    Two printed tensors of one site (Qcur MUL_MAT and RESHAPE; kqv and kqv_out) pool their elements; the total is
    the first one's. Elements in KV cells beyond the prompt are checked to be 0 and dropped.
    """
    out: dict[str, Summary] = {}
    notes: list[str] = []
    sizes = _sizes(cfg, T)
    last_layer = None  # Gemma 2 names its post-feedforward norm "ffn_post_norm", without the layer
    for t in tensors:
        tag, layer = _split(t.name)
        if tag.startswith("node_") and t.op == "MUL_MAT":
            m = re.fullmatch(r"blk\.(\d+)\.attn_output\.weight", t.src0)
            if m is None:
                continue
            tag, layer = "attn_output", int(m[1])
        if tag == "ffn_out":
            last_layer = layer
        if tag == "ffn_post_norm" and layer is None:
            layer = last_layer
        spot = place(tag, t.op, 2 if t.ne[2] == 1 and t.ne[3] == 1 else 3, cfg)
        if spot is None or not t.values:
            continue
        site_end, layout = spot
        if (layer is None) != (site_end in GLOBAL_SITES):
            continue
        site = site_end if layer is None else f"blocks.{layer}.{site_end}"
        summary = summary_of(t, site, SITE_LETTERS[site_end], layout.split(), sizes, notes)
        if site in out:
            _pool(out[site], summary, site)
        else:
            out[site] = summary
    for site, same in _entering(cfg):  # refprism's resid_pre of layer l is what left layer l - 1 (or the embedding)
        if same in out and out[same].rows is None:
            out[site] = replace(out[same], elements=dict(out[same].elements))
    return out, notes


def _entering(cfg: Config) -> list[tuple[str, str]]:
    """(blocks.l.resid_pre, the site it equals by definition): embed for layer 0, resid_post of l - 1 after."""
    return [("blocks.0.resid_pre", "embed")] + [(f"blocks.{l}.resid_pre", f"blocks.{l - 1}.resid_post")
                                                for l in range(1, cfg.n_layers)]


def summary_of(t: Printed, site: str, letters, layout: list[str], sizes: dict[str, int], notes: list) -> Summary:
    """One printed tensor as a Summary of `site`: each ne index (layout: its axes, fastest first) -> refprism index."""
    T = sizes["T"]
    n_rows = T
    for axis, n in zip(layout, t.ne):
        if axis == "S":
            if n < T:
                raise ToolError(f"llama-debug's {t.name} has {n} KV cells for {T} tokens")
        elif axis == "T":
            if n not in (T, 1):
                raise ToolError(f"llama-debug's {t.name} has {n} positions; the prompt has {T}")
            n_rows = n
        elif n != np.prod([sizes[a] for a in axis]):
            raise ToolError(f"llama-debug printed {t.name} with ne {list(t.ne)}; the {site} mapping expects "
                            f"{' '.join(layout)} = {[sizes.get(a, a) for a in layout]}: the graph changed")
    if any(n != 1 for n in t.ne[len(layout):]):
        raise ToolError(f"llama-debug printed {t.name} with ne {list(t.ne)}: more axes than {' '.join(layout)}")
    rows = None if n_rows == T else (T - 1,)  # the cut last layer keeps the position with logits: the last
    elements = {}
    beyond = []
    for idx, value in t.values.items():
        at = {}
        for axis, i in zip(layout, idx):
            if len(axis) == 2:  # "NH": i = n*H + h
                at[axis[0]], at[axis[1]] = divmod(i, sizes[axis[1]])
            else:
                at[axis] = i
        if rows is not None:
            at["T"] = rows[at["T"]]
        if at.get("S", 0) >= T:  # a KV cell beyond the prompt: empty
            beyond.append(value)
            continue
        elements[tuple(at[a] for a in letters)] = value
    total = t.total
    if any(v != 0 for v in beyond):
        notes.append(f"{site}: KV cells beyond the prompt are not empty in llama.cpp's {t.name}: its sum left out")
        total = None
    shape = tuple(T if a in ("T", "S") else sizes[a] for a in letters)
    order = tuple(c for axis in reversed(layout) for c in axis)  # ggml sums i0 fastest: its axes, slowest first
    return Summary(shape=shape, elements=elements, total=total, rows=rows, resolution=PRINTED_RESOLUTION,
                   total_sum="float32", total_order=order, total_resolution=SUM_RESOLUTION)


def _pool(into: Summary, more: Summary, site: str) -> None:
    if into.shape != more.shape or into.rows != more.rows:
        raise ToolError(f"llama-debug printed {site} twice with different shapes")
    for k, v in more.elements.items():
        into.elements.setdefault(k, v)
    if into.total is None:
        into.total = more.total


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


# A weight's product converts its input rows to the weight type's vec_dot_type (ggml/src/ggml-cpu/ggml-cpu.c,
# type_traits_cpu; ggml_compute_forward_mul_mat calls that type's `from_float` on src1 when src1->type differs; the
# repacked Q4_K weights of x86 AVX2, ggml-cpu/repack.cpp q4_K_8x8_q8_K, take Q8_K rows too). None: float32 rows.
VEC_DOT_TYPE = {
    "F32": None, "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ2_XXS": "Q8_K",
    "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K", "IQ1_S": "Q8_K", "IQ1_M": "Q8_K",
    "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}
GGUF_WEIGHTS = {"attn_q": "W_Q", "attn_k": "W_K", "attn_v": "W_V", "attn_output": "W_O", "ffn_gate": "W_gate",
                "ffn_up": "W_up", "ffn_down": "W_down"}  # blk.l.<name>.weight -> refprism's blocks.l.<weight>


def weight_types(gguf_path) -> dict[str, str]:
    """refprism weight ("blocks.3.W_Q", ..., "unembed") -> its ggml type in the GGUF ("Q5_0", "Q4_K", "F32", ...).

    The unembedding is output.weight when the file has one, else token_embd.weight (llama.cpp's tied output).
    """
    import gguf

    tensors = read_header(gguf_path).tensors
    name = lambda kind: gguf.GGMLQuantizationType(kind).name  # noqa: E731
    out = {}
    for tensor_name, (_, kind, _) in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor_name)
        if m and m[2] in GGUF_WEIGHTS:
            out[f"blocks.{m[1]}.{GGUF_WEIGHTS[m[2]]}"] = name(kind)
    unembed = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if unembed in tensors:
        out["unembed"] = name(tensors[unembed][1])
    return out


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
    if cache_type == "f16":
        notes.append("KV cache in f16 (llama.cpp's default): attn.scores, attn.pattern and attn.z use f16-rounded "
                     "keys and values (attn.k and attn.v are printed before the store)")
    if weights not in ("F32", "F16", "BF16"):
        notes.append(f"{weights} weights: each quantized matmul also quantizes its activation rows (Q8_K for "
                     "k-quants, Q8_0 for Q4_0/Q5_0/Q8_0)")
    return notes


def capture(gguf_path, prompt, *, with_debug=True, cache_type="f16", bin_dir=None) -> Capture:
    """llama.cpp on a GGUF file as a Capture: full logits [T, V] (llama-cpp-python) + llama-debug's summaries.

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
    ids = tokenize(gguf_path, prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if with_debug and not isinstance(prompt, str):
        detokenize(gguf_path, ids)  # ids llama-debug cannot take are refused before any run
    cap = Capture(source="llama.cpp", tokens=np.asarray(ids, dtype=np.int64), dtype="float32", arithmetic=how,
                  notes=conventions(cfg, how.weights, how.kv_cache))
    cap.arrays["logits"] = logits(gguf_path, ids, cache_type=cache_type)
    if with_debug:
        dump = debug_dump(gguf_path, prompt if isinstance(prompt, str) else ids, cache_type=cache_type,
                          bin_dir=bin_dir, cfg=cfg)
        if dump.tokens != ids:
            raise ToolError(f"llama-debug tokenized the prompt as {dump.tokens[:12]}..., llama-cpp-python as "
                            f"{ids[:12]}...")
        # The full logits (llama-cpp-python) are the logits site; llama-debug's printed last row is the same
        # quantity from the other binary (tests/test_other_llamacpp.py checks that they agree).
        dump.summaries.pop("logits", None)
        cap.summaries.update(dump.summaries)
        cap.notes += dump.notes
    return cap


# ------------------------------------------------------------------------------------------------ dump files


def scheme_llamacpp(name: str, array, cfg: Config, *, T: int | None = None) -> list[tuple[str, object]]:
    """A dump file's tensor named in llama.cpp's graph scheme -> [(refprism site, array or Summary)], [] if unmapped.

    The array is the tensor's memory as NumPy sees it: dimensions in reverse ne order (ggml's [ne0=D, ne1=T] is a
    [T, D] array), possibly with leading axes of 1 (ne[3], ne[2]). A name repeated in llama.cpp's graph means its
    last tensor: "Qcur-l" as [T, N*H] is the projection (attn.q_pre), as [T, N, H] the one after RoPE (attn.q).
    kq / kq_soft_max come as [N, T, cells] and keep the first T cells (the prompt's positions). When T (the
    prompt's length) is given, a tensor with fewer rows (llama.cpp's cut last layer) comes back as a Summary of
    the last rows. Gemma 2's layerless "ffn_post_norm" cannot be placed: []. A scheme name of the wrong shape is
    InputError.
    """
    tag, layer = _split(name)
    probe = place(tag, None, 2, cfg)
    if probe is None:
        return []
    a = np.asarray(array)
    while a.ndim > 3 and a.shape[0] == 1:  # ne[3] = 1
        a = a[0]
    if tag in ("Qcur", "Kcur", "Vcur"):
        heads = cfg.n_heads if tag == "Qcur" else cfg.n_kv_heads
        if a.ndim == 3 and a.shape[1:] != (heads, cfg.d_head) and a.shape[0] == 1:
            a = a[0]  # [1, T, N*H]: the projection with its ne[2] = 1
    elif len(probe[1].split()) == 2:
        while a.ndim > 2 and a.shape[0] == 1:
            a = a[0]
    site_end, layout = place(tag, None, a.ndim, cfg)
    is_global = site_end in GLOBAL_SITES
    if (layer is None) != is_global or (layer is not None and not 0 <= layer < cfg.n_layers):
        return []
    site = site_end if is_global else f"blocks.{layer}.{site_end}"
    axes = layout.split()[::-1]  # NumPy order: slowest first
    if a.ndim != len(axes):
        raise InputError(f"{name}: {a.ndim} axes {list(a.shape)}, but llama.cpp's {tag} is [{', '.join(axes)}]")
    n_rows = a.shape[axes.index("T")]
    sizes = {**_sizes(cfg, n_rows), "S": n_rows}
    expect = [None if ax in ("T", "S") else int(np.prod([sizes[c] for c in ax])) for ax in axes]
    if any(e is not None and e != n for e, n in zip(expect, a.shape)):
        shown = ", ".join(ax if e is None else str(e) for ax, e in zip(axes, expect))
        raise InputError(f"{name}: shape {list(a.shape)}, but llama.cpp's {tag} for this model is [{shown}]")
    if "S" in axes:  # [N, T, cells]: the first T cells hold the prompt's positions
        if a.shape[2] < n_rows:
            raise InputError(f"{name}: {a.shape[2]} KV cells for {n_rows} positions")
        a = a[:, :, :n_rows]
    flat = [c for ax in axes for c in ax]  # "NH" -> N, H (n major)
    letters = SITE_LETTERS[site_end]
    a = a.reshape([sizes[c] for c in flat]).transpose([flat.index(c) for c in letters])
    if T is not None and n_rows < T:
        rows = tuple(range(T - n_rows, T))  # llama.cpp keeps the output rows: the last positions
        elements = {(rows[idx[0]], *idx[1:]): float(v) for idx, v in np.ndenumerate(a)}
        return [(site, Summary(shape=(T, *a.shape[1:]), elements=elements, total=float(a.sum(dtype=np.float64)),
                               rows=rows))]
    also = [entering for entering, same in _entering(cfg) if same == site]  # the next layer's resid_pre
    return [(site, a)] + [(entering, a) for entering in also]
