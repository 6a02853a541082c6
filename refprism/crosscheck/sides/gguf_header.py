"""A GGUF file's header read without the gguf package's array loading: metadata, tensor names, shapes and types
(`read_header`), one tensor (`tensor`), the file type, the config refprism reads from it, and each product's
weight type (what llama.cpp's arithmetic depends on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refprism.errors import CheckpointError
from refprism.gemma.config import Config


def gguf_config(path) -> Config:
    """refprism's Config of a GGUF file, from its metadata alone (no tensor is read)."""
    from refprism.checkpoints.gguf import ARCHITECTURES, config_from_metadata, open_gguf

    head = read_header(path)
    meta, tensors = head.meta, {name: ne for name, (ne, _, _) in head.tensors.items()}
    if meta.get("general.architecture") == "gemma4":  # its config reads many shapes and rope_freqs' values
        config, _, _ = open_gguf(path)  # the header and rope_freqs only: no other tensor is dequantized
        return Config.from_hf({k: v for k, v in config.items() if k != "gguf_defaults"})
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
