"""What another implementation computed, in refprism's names and shapes: the input of `refprism.compare`.

Every "other side" (HF transformers live, TransformerLens, llama.cpp, a dump file from anywhere) is turned into one
`Capture`: arrays named like refprism's record (`blocks.3.attn.pattern`, `logits`, ...) and laid out in refprism's
axis letters without a batch axis (`attn.q` [T, N, H], `attn.pattern` [N, T, S], `mlp.act` [T, F], ...), plus,
for tools that print only part of a tensor (llama.cpp's `llama-debug` prints a few corner elements and the sum),
a `Summary` of what was printed. Conventions that cannot be mapped are listed in `notes`, never compared silently.
An implementation whose arithmetic is not plain arithmetic in one dtype says how it rounds (`GgmlArithmetic`:
llama.cpp's CPU backend), so that compare's floors are those of an honest implementation of that arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refprism.errors import InputError

ROW_TYPES = ("Q8_0", "Q8_K", "F16", "BF16")  # the conversions of a matmul's input rows ggml.quantize_rows computes


@dataclass
class Summary:
    """What a tool printed of one tensor: some of its elements, by refprism index, and the sum of all of them.

    shape:      the tensor's shape in refprism's axis order (e.g. [T, D]); `rows` says which T rows it covers when a
                tool cut it (llama.cpp keeps only the output rows of the last layer)
    elements:   refprism index -> value, for every element the tool printed
    total:      the sum over every element of the (possibly cut) tensor, or None when not printed
    resolution: how far a printed element may be from the tensor's value by the printing alone (llama-debug's
                %.4f: half a unit of the 4th decimal, 5e-5); 0 for values passed on exactly
    total_sum:  how the tool summed the total, when not exactly: "float32" for a running float32 sum (llama-debug),
                whose own rounding is then part of the total's floor; None for an exact (float64) sum
    total_order: the axes in the order the tool summed them, slowest first (its partial sums, and so its running
                sum's rounding, depend on it); None: refprism's own axis order
    total_resolution: as resolution, for the printed total (llama-debug's %f: 5e-7)
    """

    shape: tuple[int, ...]
    elements: dict[tuple[int, ...], float]
    total: float | None = None
    rows: tuple[int, ...] | None = None  # the positions the tensor holds, when not all
    resolution: float = 0.0
    total_sum: str | None = None
    total_order: tuple[str, ...] | None = None
    total_resolution: float = 0.0


@dataclass
class GgmlArithmetic:
    """How llama.cpp's CPU backend (ggml-cpu) computes a Gemma, where it is not plain float32 arithmetic.

    weights:     the GGUF's weight type as llama.cpp names it ("F32", "Q4_K_M", ...), for the report
    kv_cache:    "f16" (llama.cpp's default) or "f32": keys and values are stored in it, and with "f16" the other
                 factor of each attention product is converted to f16 too (vec_dot_type of F16: q * scale before
                 q . k, the pattern before pattern . v)
    activations: refprism weight ("blocks.3.W_Q", ..., "unembed") -> what ggml converts the rows of that weight's
                 product's input to, per the weight's type (its vec_dot_type): "Q8_0" (blocks of 32), "Q8_K"
                 (blocks of 256), "F16", "BF16"; a weight absent from it (F32) takes its input as it is
    Always, on the CPU: GELU through an f16 table (GGML_GELU_FP16) and RoPE angles built by repeated float32
    multiplication (ggml_rope_cache_init). crosscheck.ggml_edit computes refprism the same way.
    """

    weights: str
    kv_cache: str = "f16"
    activations: dict[str, str] = field(default_factory=dict)


@dataclass
class Capture:
    """The other side of a comparison: its token ids, its activations by refprism name, and what it could not map.

    source:    "hf", "tl", "llama.cpp" or the dump file's name
    tokens:    [T] int64, the ids the other side ran (compared first: different tokens stop the comparison)
    arrays:    refprism record name -> array in refprism's layout, any float dtype (compared in float64)
    summaries: refprism record name -> Summary, for tensors the other side printed only in part
    dtype:     the other side's compute dtype as a word ("float32", "bfloat16", "float16", "float64")
    notes:     one line per convention difference that was mapped, or a site that was left out and why
    arithmetic: how it rounds where that is not plain arithmetic in `dtype` (llama.cpp: `GgmlArithmetic`), or None
    """

    source: str
    tokens: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    summaries: dict[str, Summary] = field(default_factory=dict)
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)
    arithmetic: GgmlArithmetic | None = None

    def __post_init__(self):
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"{self.source}: the token ids must be a 1-D integer array, got shape "
                             f"{list(tokens.shape)} of {tokens.dtype}")
        self.tokens = tokens.astype(np.int64)
