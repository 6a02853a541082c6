"""Checkpoint files -> arrays: safetensors only (single or sharded), strict names and shapes, hub download.

Never unpickles anything: a directory holding only pytorch_model.bin / *.pt is refused.

The parameters are kept as the checkpoint stores them (raw norm weights w, applied as 1 + w inside
`ops.rms_norm`), converted to the compute dtype and re-laid out per head so that "head h" is an index:

    embed   [V, D]      model.embed_tokens.weight (also the unembedding: Gemma ties them)
    ln_final [D]        model.norm.weight
    blocks[l]:
      ln1   [D]         input_layernorm.weight
      W_Q   [N, D, H]   self_attn.q_proj.weight [N*H, D], rows grouped by head
      W_K   [K, D, H]   self_attn.k_proj.weight [K*H, D]
      W_V   [K, D, H]   self_attn.v_proj.weight [K*H, D]
      W_O   [N, H, D]   self_attn.o_proj.weight [D, N*H], columns grouped by head
      ln2   [D]         post_attention_layernorm.weight (the MLP's input norm, despite its HF name)
      W_gate [D, F]     mlp.gate_proj.weight [F, D], transposed
      W_up  [D, F]      mlp.up_proj.weight [F, D], transposed
      W_down [F, D]     mlp.down_proj.weight [D, F], transposed
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import Config
from .errors import AccessError, CheckpointError

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
        raise CheckpointError(f"dtype {name!r} is not supported: use float32 or float64 (audit mode)")
    return COMPUTE_DTYPES[key]


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma (1) checkpoint must hold, with its HF shape, in the hub's file order."""
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
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
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


def read_tensors(model_dir: Path, cfg: Config) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in their stored dtype (f32, bf16 or f16), checked strictly against cfg."""
    from safetensors import SafetensorError, safe_open

    expected = hf_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    if name in where:
                        raise CheckpointError(f"tensor {name} is stored twice: in {where[name]} and {path.name}")
                    stored = f.get_slice(name).get_dtype()
                    if stored not in _STORED_DTYPES:
                        raise CheckpointError(
                            f"tensor {name} in {path.name} has dtype {stored}; refprism reads F32, BF16 and F16")
                    where[name] = path.name
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    tied = tensors.pop("lm_head.weight", None)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise CheckpointError(
            f"checkpoint has unexpected tensor {unexpected[0]} ({len(unexpected)} in all); is it a Gemma 1 model?")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(tensors[name].shape)}, config.json implies {list(shape)}")
    if tied is not None and not np.array_equal(tied, tensors["model.embed_tokens.weight"]):
        raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight; Gemma ties them")
    return tensors


def to_compute(a: np.ndarray, dtype) -> np.ndarray:
    """Stored tensor -> compute dtype. bf16 -> f32 is exact: the 16 bits become the high half of a float32."""
    if a.dtype == ml_dtypes.bfloat16 and dtype == np.float32:
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(dtype)


def to_params(tensors: dict[str, np.ndarray], cfg: Config, dtype) -> dict:
    """HF tensors -> refprism's per-head parameter layout (see the module docstring), in the compute dtype.

    Consumes `tensors`: each stored tensor is dropped as soon as it is converted, so the peak memory is the
    converted model plus one stored tensor, not both models.
    """
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model

    def get(name):
        return to_compute(tensors.pop(name), dtype)

    blocks = []
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        blocks.append({
            "ln1": get(p + "input_layernorm.weight"),
            # q_proj rows are [head, h]: [N*H, D] -> [N, H, D] -> [N, D, H]
            "W_Q": np.ascontiguousarray(get(p + "self_attn.q_proj.weight").reshape(N, H, D).transpose(0, 2, 1)),
            "W_K": np.ascontiguousarray(get(p + "self_attn.k_proj.weight").reshape(K, H, D).transpose(0, 2, 1)),
            "W_V": np.ascontiguousarray(get(p + "self_attn.v_proj.weight").reshape(K, H, D).transpose(0, 2, 1)),
            # o_proj columns are [head, h]: [D, N*H] -> [D, N, H] -> [N, H, D]
            "W_O": np.ascontiguousarray(get(p + "self_attn.o_proj.weight").reshape(D, N, H).transpose(1, 2, 0)),
            "ln2": get(p + "post_attention_layernorm.weight"),
            "W_gate": get(p + "mlp.gate_proj.weight").T,
            "W_up": get(p + "mlp.up_proj.weight").T,
            "W_down": get(p + "mlp.down_proj.weight").T,
        })
    return {"embed": get("model.embed_tokens.weight"), "ln_final": get("model.norm.weight"), "blocks": blocks}


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
