"""Safetensors checkpoints -> tensors: single or sharded files, strict names and shapes, the hub download.

Never unpickles anything: a directory holding only pytorch_model.bin / *.pt is refused. Nothing is read here
but headers: each tensor is a `Stored` (file, offset, dtype, shape) whose `array()` memory-maps it, and
`gemma.weights.Weights` converts it to refprism's layout when it is used.
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

from refprism.errors import AccessError, CheckpointError
from refprism.gemma.config import Config
from refprism.gemma.weights import check_gemma4_tensors, gemma4_ignored, hf_shapes, text_decoder_names

DEFAULT_MODEL = "google/gemma-2b"


_STORED_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# What a model directory needs; only these are downloaded from the hub.
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
             "tokenizer.json", "tokenizer_config.json"]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    for (_b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1 and b2 < e2:
            raise CheckpointError(f"{path}: tensors {n1} and {n2} overlap in the file")
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_tensors(model_dir: Path, cfg: Config, notes: list | None = None) -> dict[str, Stored]:
    """Every tensor of the checkpoint (not yet read), checked strictly against cfg: names, shapes, duplicates.

    Gemma 4: a multimodal checkpoint's decoder is read (its towers ignored), the k/v weights of KV-sharing layers
    are ignored as HF ignores them; what was ignored is appended to `notes`."""
    expected = hf_shapes(cfg)
    tensors: dict[str, Stored] = {}
    for path in safetensors_files(model_dir):
        for name, stored in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} is stored twice: in {tensors[name].path.name} and {path.name}")
            tensors[name] = stored
    tensors, found = text_decoder_names(tensors)
    tied = tensors.pop("lm_head.weight", None)
    check_gemma4_tensors(cfg, tensors)
    ignored = [n for n in tensors if gemma4_ignored(cfg, n)]
    if ignored:
        found.append(f"ignored as HF does: {len(ignored)} k/v tensors of KV-sharing layers (e.g. {ignored[0]})")
        tensors = {n: t for n, t in tensors.items() if n not in set(ignored)}
    if notes is not None:
        notes.extend(found)
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
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

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
