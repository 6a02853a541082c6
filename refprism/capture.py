"""What another implementation computed, in refprism's names and shapes: the input of `refprism.compare`.

Every "other side" (HF transformers live, TransformerLens, llama.cpp, a dump file from anywhere) is turned into one
`Capture`: arrays named like refprism's record (`blocks.3.attn.pattern`, `logits`, ...) and laid out in refprism's
axis letters without a batch axis (`attn.q` [T, N, H], `attn.pattern` [N, T, S], `mlp.act` [T, F], ...), plus,
for tools that print only part of a tensor (llama.cpp's `llama-debug` prints a few corner elements and the sum),
a `Summary` of what was printed. Conventions that cannot be mapped are listed in `notes`, never compared silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass
class Summary:
    """What a tool printed of one tensor: some of its elements, by refprism index, and the sum of all of them.

    shape:    the tensor's shape in refprism's axis order (e.g. [T, D]); `rows` says which T rows it covers when a
              tool cut it (llama.cpp keeps only the output rows of the last layer)
    elements: refprism index -> value, for every element the tool printed
    total:    the sum over every element of the (possibly cut) tensor, or None when not printed
    """

    shape: tuple[int, ...]
    elements: dict[tuple[int, ...], float]
    total: float | None = None
    rows: tuple[int, ...] | None = None  # the positions the tensor holds, when not all


@dataclass
class Capture:
    """The other side of a comparison: its token ids, its activations by refprism name, and what it could not map.

    source:    "hf", "tl", "llama.cpp" or the dump file's name
    tokens:    [T] int64, the ids the other side ran (compared first: different tokens stop the comparison)
    arrays:    refprism record name -> array in refprism's layout, any float dtype (compared in float64)
    summaries: refprism record name -> Summary, for tensors the other side printed only in part
    dtype:     the other side's compute dtype as a word ("float32", "bfloat16", "float16", "Q4_K_M", ...)
    notes:     one line per convention difference that was mapped, or a site that was left out and why
    """

    source: str
    tokens: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    summaries: dict[str, Summary] = field(default_factory=dict)
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise InputError(f"{self.source}: the token ids must be a 1-D integer array, got shape {list(tokens.shape)} "
                             f"of {tokens.dtype}")
        self.tokens = tokens.astype(np.int64)
