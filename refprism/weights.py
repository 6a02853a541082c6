"""Checkpoint files -> arrays: safetensors only (single or sharded), strict names and shapes, hub download.

Never unpickles anything: a directory holding only pytorch_model.bin / *.pt is refused.

The parameters are kept as the checkpoint stores them (raw norm weights w, applied as 1 + w inside
`ops.rms_norm`), converted to the compute dtype and re-laid out per head so that "head h" is an index:

    embed   [V, D]      model.embed_tokens.weight (also the unembedding: Gemma ties them)
    ln_final [D]        model.norm.weight
    blocks[l]:
      ln1   [D]         input_layernorm.weight
      W_Q   [D, N, H]   self_attn.q_proj.weight [N*H, D] transposed, rows grouped by head: head n is W_Q[:, n]
      W_K   [D, K, H]   self_attn.k_proj.weight [K*H, D]
      W_V   [D, K, H]   self_attn.v_proj.weight [K*H, D]
      W_O   [N, H, D]   self_attn.o_proj.weight [D, N*H], columns grouped by head
      ln2   [D]         Gemma 1: post_attention_layernorm.weight (the MLP's input norm, despite its HF name);
                        Gemma 2/3: pre_feedforward_layernorm.weight
      W_gate [D, F]     mlp.gate_proj.weight [F, D], transposed
      W_up  [D, F]      mlp.up_proj.weight [F, D], transposed
      W_down [F, D]     mlp.down_proj.weight [D, F], transposed
      ln1_post [D]      Gemma 2/3: post_attention_layernorm.weight (norm of the attention output)
      ln2_post [D]      Gemma 2/3: post_feedforward_layernorm.weight (norm of the MLP output)
      q_norm, k_norm [H]  Gemma 3: self_attn.q_norm.weight, self_attn.k_norm.weight (per-head norms of q, k)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from . import ops
from .config import Config
from .errors import AccessError, CheckpointError, InputError

DEFAULT_MODEL = "google/gemma-2b"
COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64}
_STORED_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# What a model directory needs; only these are downloaded from the hub.
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
             "tokenizer.json", "tokenizer_config.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def compute_dtype(name) -> type:
    """'float32' (default) or 'float64' (audit mode) -> the NumPy type; anything else is refused."""
    key = np.dtype(name).name if isinstance(name, type) or isinstance(name, np.dtype) else str(name)
    if key not in COMPUTE_DTYPES:
        raise InputError(f"dtype {name!r} is not supported: use float32 or float64 (audit mode)")
    return COMPUTE_DTYPES[key]


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma checkpoint of this config must hold, with its HF shape, in the hub's file order."""
    V, D, N, K, H, F = cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    shapes = {"model.embed_tokens.weight": (V, D)}
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
        if cfg.post_norms:  # Gemma 2/3: post_attention_layernorm is the attention's post-norm; two more norms
            shapes.update({p + "pre_feedforward_layernorm.weight": (D,), p + "post_feedforward_layernorm.weight": (D,)})
        if cfg.qk_norm:  # Gemma 3: per-head norms of q and k, over H
            shapes.update({p + "self_attn.q_norm.weight": (H,), p + "self_attn.k_norm.weight": (H,)})
    shapes["model.norm.weight"] = (D,)
    return shapes


# ---------------------------------------------------------------------------------------------------- files


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        # ValueError covers JSONDecodeError and UnicodeDecodeError; RecursionError, a deeply nested [[[[...]]]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        if not all(isinstance(s, str) and s and "/" not in s and "\0" not in s and s not in (".", "..")
                   for s in shards):
            raise CheckpointError(f"{index.name} names a shard that is not a plain file name")
        missing = [s for s in shards if not _is_file(model_dir / s)]
        if missing:
            raise CheckpointError(f"{index.name} names shard {missing[0]}, which is not in {model_dir}")
        return [model_dir / s for s in shards]
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        return [model_dir / n for n in others]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickled weights ({pickles[0]}); refprism never unpickles files: "
            "convert the checkpoint to safetensors"
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system allows: not a file this checkpoint can have
        return False


@dataclass(frozen=True)
class Stored:
    """One tensor as stored in a safetensors file: where it is, not its values (nothing is read yet)."""

    path: Path
    offset: int  # absolute byte offset of the data in the file
    dtype: np.dtype  # float32, ml_dtypes.bfloat16 or float16
    shape: tuple[int, ...]

    def array(self) -> np.ndarray:
        """A read-only memory map of the tensor: pages are read from the OS page cache as they are touched."""
        if 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_header(path: Path) -> dict[str, Stored]:
    """Parse and check a safetensors header; return name -> Stored. Nothing of the data is read.

    The format: an 8-byte little-endian header length n, n bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to the data.
    safetensors' own NumPy loader copies every tensor into fresh memory; refprism maps them instead, so it reads
    the header itself and checks every declared size against the file before mapping anything.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{path}: the header claims {n} bytes but the file has {size - 8} after it "
                                      "(truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors; [[[[...]]]]
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON (corrupt file?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry")
        stored = entry["dtype"]
        if not isinstance(stored, str) or stored not in _STORED_DTYPES:  # a list or object is not hashable
            raise CheckpointError(f"tensor {name} in {path.name} has dtype {str(stored)[:40]}; refprism reads F32, "
                                  "BF16 and F16")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {name} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        dtype = np.dtype(_STORED_DTYPES[stored])
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name} lies at bytes {begin}..{end}, outside the file's "
                                  f"{data_size} data bytes (truncated file?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} declares shape {shape} ({stored}) but {end - begin} bytes")
        out[name] = Stored(path, data_start + begin, dtype, tuple(shape))
        spans.append((begin, end, name))
    spans.sort()
    for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1 and b2 < e2:
            raise CheckpointError(f"{path}: tensors {n1} and {n2} overlap in the file")
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_tensors(model_dir: Path, cfg: Config) -> dict[str, Stored]:
    """Every tensor of the checkpoint (not yet read), checked strictly against cfg: names, shapes, duplicates."""
    expected = hf_shapes(cfg)
    tensors: dict[str, Stored] = {}
    for path in safetensors_files(model_dir):
        for name, stored in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} is stored twice: in {tensors[name].path.name} and {path.name}")
            tensors[name] = stored
    tied = tensors.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise CheckpointError(
            f"checkpoint has unexpected tensor {unexpected[0]} ({len(unexpected)} in all): "
            "does config.json name the right model_type?")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(tensors[name].shape)}, config.json implies {list(shape)}")
    if tied is not None and not np.array_equal(tied.array(), tensors["model.embed_tokens.weight"].array()):
        raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight; Gemma ties them")
    return tensors


def convert(src: np.ndarray, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> compute dtype, written once into `out` (any strides) or a new array.

    bf16 -> f32 is exact and done as an integer shift: the 16 stored bits become the high half of the float32
    (ml_dtypes' own cast is several times slower). Everything else is NumPy's cast.
    """
    if out is None:
        out = np.empty(src.shape, dtype)
    if src.dtype == ml_dtypes.bfloat16 and out.dtype == np.float32:
        np.left_shift(src.view(np.uint16), np.uint32(16), out=out.view(np.uint32), casting="safe")
    elif src.dtype == ml_dtypes.bfloat16:
        out[...] = convert(src, np.float32)
    else:
        out[...] = src
    return out


def to_compute(a: np.ndarray, dtype) -> np.ndarray:
    """A stored tensor converted to the compute dtype (a new array)."""
    return convert(a, dtype)


BLOCK_KEYS = ("ln1", "W_Q", "W_K", "W_V", "W_O", "ln2", "W_gate", "W_up", "W_down",
              "ln1_post", "ln2_post", "q_norm", "k_norm")  # the last four: Gemma 2/3 only


def norm_names(cfg: Config, l: int) -> dict[str, str]:
    """refprism's name -> HF tensor of layer l's norms. Gemma trap: HF's `post_attention_layernorm` is the MLP's
    *input* norm in Gemma 1 but the attention's *output* norm in Gemma 2/3 (whose MLP input norm is
    `pre_feedforward_layernorm`)."""
    p = f"model.layers.{l}."
    names = {"ln1": p + "input_layernorm.weight"}
    if cfg.post_norms:
        names.update(ln1_post=p + "post_attention_layernorm.weight", ln2=p + "pre_feedforward_layernorm.weight",
                     ln2_post=p + "post_feedforward_layernorm.weight")
    else:
        names["ln2"] = p + "post_attention_layernorm.weight"
    if cfg.qk_norm:
        names.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    return names


_MATRICES = ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down")


class Weights:
    """The weights in refprism's per-head layout (module docstring) and compute dtype.

    memory="fast": every tensor is converted once, at load (4 bytes a parameter in float32: ~10 GB for gemma-2b).
    memory="low":  tensors stay memory-mapped in their stored dtype and each layer is converted when it is used
                   (and freed after), so resident memory is about one layer plus the page cache's share.
    Both give bit-identical values (tests/test_memory.py). Norm weights (a few KB) are always converted.
    """

    def __init__(self, stored: dict, cfg: Config, dtype, memory: str = "fast"):
        if memory not in ("fast", "low"):
            raise CheckpointError(f"memory mode {memory!r} is not one of auto, fast, low")
        self.cfg, self.dtype, self.memory = cfg, np.dtype(dtype), memory
        self._stored = stored
        self._checked: set[str] = set()  # tensors already proven finite
        self._scratch: dict[str, np.ndarray] = {}  # low-memory mode: conversion buffers reused across layers
        self._arena = None  # fast mode: where the converted weights live
        self._pool = None  # low-memory mode: the threads that convert a layer
        self.ln_final = self._convert("model.norm.weight")
        self._norms = [{key: self._convert(name) for key, name in norm_names(cfg, l).items()}
                       for l in range(cfg.n_layers)]
        self._embed = self._blocks = None
        if memory == "fast":
            self._arena = _Arena(sum(math.prod(s) for s in hf_shapes(cfg).values()) * self.dtype.itemsize)
            # Two threads: the conversions release the GIL, so the page faults of the fresh memory (the cost of a
            # load, docs/performance.md) are taken on both cores. The values do not depend on the order.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
                embed = pool.submit(self._convert, "model.embed_tokens.weight")
                blocks = list(pool.map(self._convert_block, range(cfg.n_layers)))
                self._embed, self._blocks = embed.result(), blocks
            self._stored = None  # every map released: nothing of the files stays resident

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cfg: Config, dtype, memory="fast") -> "Weights":
        """From in-memory HF-named arrays (tests build random models this way, without files)."""
        return cls(dict(arrays), cfg, dtype, memory)

    @classmethod
    def from_converted(cls, cfg: Config, dtype, *, embed, ln_final, blocks) -> "Weights":
        """Weights already in refprism's layout and compute dtype (what `embedding()`, `ln_final` and `block(l)`
        return), adopted as they are: nothing is converted or copied. Read-only arrays are fine: the forward pass
        and the prisms never write to the weights (tests/test_sweeps.py checks it). The Ray backend of the sweeps
        rebuilds its models this way from zero-copy views of the object store (refprism/sweeps_ray.py).
        """
        self = cls.__new__(cls)
        self.cfg, self.dtype, self.memory = cfg, np.dtype(dtype), "fast"
        self._stored, self._checked, self._scratch, self._arena, self._pool = None, set(), {}, None, None
        V, D, N, K, H, F = cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
        layout = {"W_Q": (D, N, H), "W_K": (D, K, H), "W_V": (D, K, H), "W_O": (N, H, D), "W_gate": (D, F),
                  "W_up": (D, F), "W_down": (F, D), "q_norm": (H,), "k_norm": (H,)}
        blocks = [dict(b) for b in blocks]
        given = {"embed": (embed, (V, D)), "ln_final": (ln_final, (D,))}
        if len(blocks) != cfg.n_layers:
            raise CheckpointError(f"{len(blocks)} converted blocks for a model of {cfg.n_layers} layers")
        for l, block in enumerate(blocks):
            keys = set(norm_names(cfg, l)) | set(_MATRICES)
            if set(block) != keys:
                raise CheckpointError(f"converted block {l} has weights {sorted(block)}, expected {sorted(keys)}")
            given.update({f"blocks[{l}].{k}": (a, layout.get(k, (D,))) for k, a in block.items()})
        for name, (a, shape) in given.items():
            if tuple(a.shape) != shape or a.dtype != self.dtype:
                raise CheckpointError(f"converted weight {name} is {a.dtype} {list(a.shape)}, expected {self.dtype} "
                                      f"{list(shape)}")
        self.ln_final, self._embed, self._blocks = ln_final, embed, blocks
        self._norms = [{k: b[k] for k in norm_names(cfg, l)} for l, b in enumerate(blocks)]
        return self

    def _source(self, name):
        src = self._stored[name]
        return src.array() if isinstance(src, Stored) else src

    def _convert(self, name, layout=None, reuse=False):
        """Convert one stored tensor; `layout(view)` rearranges the source into refprism's layout first.

        reuse=True writes into a buffer kept per tensor role (e.g. "W_Q") and overwritten by the next layer's
        conversion: no fresh pages to fault in at every layer (low-memory forward passes only).
        """
        src = self._source(name)
        view = src if layout is None else layout(src)
        out = None if self._arena is None else self._arena.take(view.shape, self.dtype)
        if reuse:
            role = name.split(".", 3)[-1]  # "self_attn.q_proj.weight": the same shape in every layer
            out = self._scratch.get(role)
            if out is None or out.shape != view.shape:
                out = self._scratch[role] = np.empty(view.shape, self.dtype)
        out = convert(view, self.dtype, out=out)
        del src, view  # unmaps the file region: its pages leave this process's resident set
        if name not in self._checked:
            # One pass, no temporary: any NaN or inf makes the sum non-finite, so a finite sum proves every value
            # finite (only a sum that overflows needs the element-wise look).
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.add.reduce(out, axis=None)
            if not np.isfinite(total) and not np.isfinite(out).all():
                raise CheckpointError(f"tensor {name} contains NaN or inf values: the checkpoint is corrupt")
            self._checked.add(name)
        return out

    def _convert_one(self, l, key, reuse=False) -> np.ndarray:
        """Layer l's weight `key` in refprism's layout (see the module docstring), converted from the stored one."""
        N, K, H, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head, self.cfg.d_model
        p = f"model.layers.{l}."
        if key in self._norms[l]:
            return self._norms[l][key]
        if key not in _MATRICES:
            raise KeyError(f"{key} (this {self.cfg.model_type} model has no such weight)")
        # q/k/v_proj rows are [head, h]: [heads*H, D] -> transposed [D, heads*H] -> [D, heads, H]. D first, so
        # that x W_Q is one BLAS product over a [D, N*H] view (no copy), and head n is still an index: W_Q[:, n]
        if key == "W_Q":
            return self._convert(p + "self_attn.q_proj.weight", lambda a: a.T.reshape(D, N, H), reuse)
        if key in ("W_K", "W_V"):
            name = p + f"self_attn.{key[-1].lower()}_proj.weight"
            return self._convert(name, lambda a: a.T.reshape(D, K, H), reuse)
        if key == "W_O":  # o_proj columns are [head, h]: [D, N*H] -> [D, N, H] -> [N, H, D]
            return self._convert(p + "self_attn.o_proj.weight", lambda a: a.reshape(D, N, H).transpose(1, 2, 0), reuse)
        # gate/up [F, D] and down [D, F] kept as stored and read through a transposed view (BLAS takes the
        # transpose for free): W_gate, W_up [D, F], W_down [F, D]
        return self._convert(p + f"mlp.{key[2:]}_proj.weight", reuse=reuse).T

    def _convert_block(self, l, reuse=False) -> dict:
        if self.memory == "low":  # at every use: the seven matrices converted on two threads (GIL released)
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1)))
            matrices = self._pool.map(lambda key: self._convert_one(l, key, reuse), _MATRICES)
        else:
            matrices = (self._convert_one(l, key, reuse) for key in _MATRICES)
        return {**self._norms[l], **dict(zip(_MATRICES, matrices))}

    # The three ways the model reads its weights.

    def block(self, l: int, *, scratch: bool = False) -> dict:
        """Layer l's weights: ln1, W_Q [D, N, H], W_K/W_V [D, K, H], W_O [N, H, D], ln2, W_gate/W_up [D, F],
        W_down [F, D] (and ln1_post, ln2_post, q_norm, k_norm where the model has them).

        Low-memory mode converts them at each call, into new arrays that are the caller's own; with
        scratch=True into buffers that the next scratch call overwrites (the forward pass, one layer at a time).
        """
        return self._blocks[l] if self._blocks is not None else self._convert_block(l, scratch)

    def get(self, l: int, key: str) -> np.ndarray:
        """One of layer l's weights (a key of `block`); low-memory mode converts only that one."""
        if key not in BLOCK_KEYS:
            raise KeyError(key)
        if self._blocks is not None and key not in self._blocks[l]:
            raise KeyError(f"{key} (this {self.cfg.model_type} model has no such weight)")
        return self._blocks[l][key] if self._blocks is not None else self._convert_one(l, key)

    def embed_rows(self, ids) -> np.ndarray:
        """E[ids]: [n, D] rows of the embedding (= unembedding) matrix."""
        ids = np.asarray(ids)
        if self._embed is not None:
            return self._embed[ids]
        return convert(self._source("model.embed_tokens.weight")[ids], self.dtype)

    def unembed(self, h: np.ndarray, chunk: int = 32768) -> np.ndarray:
        """h E^T: [T, D] -> [T, V] logits against the tied embedding (low-memory mode: in row chunks of E).

        The [T, V] result is written into 4 KiB pages (ops.zeros: faulted in by the BLAS threads as they write),
        not NumPy's 2 MiB ones: a long prompt's logits are GBs (T = 2048 on Gemma 3: 2.1 GB, ~0.5 s less here)."""
        if self._embed is not None:
            return np.matmul(h, self._embed.T, out=ops.zeros((h.shape[0], self._embed.shape[0]), self.dtype))
        E = self._source("model.embed_tokens.weight")
        out = ops.zeros((h.shape[0], E.shape[0]), dtype=self.dtype)
        buf = self._scratch.get("unembed")
        if buf is None or buf.shape != (chunk, E.shape[1]):
            buf = self._scratch["unembed"] = np.empty((chunk, E.shape[1]), self.dtype)  # reused every call
        for i in range(0, E.shape[0], chunk):
            rows = E[i:i + chunk]
            out[:, i:i + chunk] = h @ convert(rows, self.dtype, out=buf[: len(rows)]).T
        return out

    def embedding(self) -> np.ndarray:
        """The whole E [V, D] in the compute dtype (low-memory mode: a new array each call)."""
        return self._embed if self._embed is not None else self._convert("model.embed_tokens.weight")


class _Arena:
    """One block of anonymous memory for every converted weight (fast mode).

    Fresh memory is paid for at first touch, page by page. On the VMs this was measured on (docs/performance.md),
    plain 4 KiB pages faulted in from two threads were about twice as fast as NumPy's own large allocations, which
    ask for transparent huge pages. Where an anonymous mmap is not available, arrays come from NumPy as usual.
    Thread-safe: the weights are converted by two threads.
    """

    def __init__(self, nbytes: int):
        import threading

        self.offset, self.buffer, self.lock = 0, None, threading.Lock()
        try:
            import mmap

            self.buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (ImportError, AttributeError, OSError, TypeError, ValueError, OverflowError):
            self.buffer = None

    def take(self, shape, dtype) -> np.ndarray | None:
        """A C-contiguous array carved from the block (None once it is used up or unavailable)."""
        n = math.prod(shape) * np.dtype(dtype).itemsize
        with self.lock:
            if self.buffer is None or self.offset + n > len(self.buffer):
                return None
            offset, self.offset = self.offset, self.offset + -(-n // 64) * 64  # 64-byte aligned
        return np.frombuffer(self.buffer, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def n_parameters(cfg: Config) -> int:
    return sum(math.prod(s) for s in hf_shapes(cfg).values())


def choose_memory(cfg: Config, dtype, memory: str) -> str:
    """'auto' -> 'fast' when the converted weights (plus 2 GiB for activations) fit in available memory, else
    'low'. 'fast' and 'low' are returned as given."""
    if memory not in ("auto", "fast", "low"):
        raise InputError(f"memory mode {memory!r} is not one of auto, fast, low")
    if memory != "auto":
        return memory
    need = n_parameters(cfg) * np.dtype(dtype).itemsize + 2 * 2**30
    return "fast" if need <= available_memory() else "low"


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


# ---------------------------------------------------------------------------------------------------- hub


def resolve_model_dir(model: str | os.PathLike | None) -> tuple[Path, str]:
    """A local directory, or a hub repo id downloaded (or found in the cache) -> (directory, display name).

    None means $REFPRISM_MODEL, else google/gemma-2b. The hub path honours HF_TOKEN, HF_HOME / the cache and
    HF_HUB_OFFLINE through huggingface_hub.
    """
    if model is None:
        model = os.environ.get("REFPRISM_MODEL") or DEFAULT_MODEL
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            if path.suffix in _PICKLE_SUFFIXES:
                raise CheckpointError(f"{path} is a pickled checkpoint; refprism never unpickles files")
            raise CheckpointError(f"{path} is a file; give the model directory that holds config.json")
        if not os.access(path, os.R_OK | os.X_OK):
            raise CheckpointError(f"cannot read the directory {path}: check its permissions")
        return path, text
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"no model directory {text!r} (and it is not a hub id like google/gemma-2b)")
    return download(text), text


def download(repo_id: str) -> Path:
    """Fetch only the files refprism needs from the hub into the HF cache; one-line errors for the usual failures."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except hf_errors.GatedRepoError:
        raise AccessError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id} while logged in, "
            "then set HF_TOKEN to a token of that account (or run `hf auth login`)") from None
    except hf_errors.RepositoryNotFoundError:
        raise AccessError(
            f"no hub model {repo_id!r} (or it is private and HF_TOKEN lacks access): check the id") from None
    except hf_errors.RevisionNotFoundError:
        raise AccessError(f"{repo_id}: the requested revision does not exist on the hub") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise AccessError(
            f"{repo_id} is not in the local HF cache and the hub cannot be reached (offline or HF_HUB_OFFLINE=1): "
            "go online once to download it, or pass a local model directory") from None
    except hf_errors.HfHubHTTPError as e:
        raise AccessError(f"the hub refused {repo_id}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise AccessError(f"could not download {repo_id}: {e.strerror or e}") from None
