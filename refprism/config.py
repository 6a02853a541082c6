"""The model's shape and constants, read from an HF config.json.

Axis legend used everywhere in refprism (no batch axis in the core):

    T query position   S source position   D model width (hidden_size)
    N query heads      K key/value heads   H head width (head_dim)
    F MLP width        V vocabulary        L layers      C components
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

# The activations HF accepts for Gemma 1. Every one of them is the tanh approximation of GELU: the hub's
# config.json says the legacy "gelu", which transformers maps to "gelu_pytorch_tanh" (the Gemma trap: exact-erf
# GELU is wrong for Gemma).
_TANH_GELU_NAMES = {"gelu", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}


@dataclass(frozen=True)
class Config:
    """A Gemma (1) model's hyper-parameters, named with refprism's axis letters."""

    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    d_head: int  # H
    d_mlp: int  # F
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    model_type: str = "gemma"
    activation: str = "gelu_pytorch_tanh"

    @property
    def group_size(self) -> int:
        """Query heads per key/value head: gemma-2b 8 (one shared kv head), gemma-7b 1."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, h: int) -> int:
        """The key/value head that query head h reads (HF's repeat_kv: heads grouped consecutively)."""
        return h // self.group_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        """Build from an HF config.json dict; raise ConfigError naming any problem (one line, what to fix)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json holds {_kind(hf)}, not a JSON object: re-download the model's config.json")
        model_type = hf.get("model_type")
        if model_type != "gemma":
            raise ConfigError(
                f"config.json has model_type {_short(model_type)}; refprism supports Gemma 1 (model_type 'gemma') "
                "such as google/gemma-2b and google/gemma-7b"
            )

        def need(key, kind=int):
            if key not in hf:
                raise ConfigError(f"config.json is missing the required key {key!r}: re-download the model's "
                                  "config.json (Gemma 1 configs have it)")
            return _typed(key, hf[key], kind)

        def optional(key, default, kind):
            value = hf.get(key)
            return default if value is None else _typed(key, value, kind)

        n_heads = need("num_attention_heads")
        d_model = need("hidden_size")
        d_head = optional("head_dim", None, int)
        if d_head is None:  # HF's default when head_dim is absent
            d_head = d_model // n_heads if n_heads > 0 else 0
        n_kv = optional("num_key_value_heads", n_heads, int)
        rope_theta = _rope_theta(hf)
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if not isinstance(activation, str) or activation not in _TANH_GELU_NAMES:
            raise ConfigError(
                f"config.json asks for activation {_short(activation)}; Gemma uses the tanh GELU "
                f"(one of {sorted(_TANH_GELU_NAMES)})"
            )
        if hf.get("tie_word_embeddings", True) is False:
            raise ConfigError("config.json sets tie_word_embeddings false; Gemma ties the unembedding to the embedding")
        cfg = cls(
            vocab_size=need("vocab_size"),
            d_model=d_model,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            d_mlp=need("intermediate_size"),
            rms_norm_eps=float(optional("rms_norm_eps", 1e-6, float)),
            rope_theta=float(rope_theta),
            max_positions=optional("max_position_embeddings", 8192, int),
            bos_token_id=_token_id(hf, "bos_token_id", 2),
            eos_token_id=_token_id(hf, "eos_token_id", 1),
            pad_token_id=_token_id(hf, "pad_token_id", 0),
            model_type=model_type,
            activation="gelu_pytorch_tanh",
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Refuse impossible values, naming the config.json key (HF spelling) and the value."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_mlp", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {HF_KEYS[name]} must be a positive integer, got {_short(value)}")
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"config.json: num_hidden_layers is {self.n_layers}, implausibly many (Gemma models have "
                              f"tens; refprism accepts up to {MAX_LAYERS}): is config.json corrupt?")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.d_head % 2:
            raise ConfigError(f"config.json: head_dim ({self.d_head}) must be even for split-half RoPE")
        if not (self.rms_norm_eps >= 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"config.json: rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"config.json: rope_theta must be a finite positive number, got {self.rope_theta!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"config.json: {name} is {value}, outside the vocabulary (ids 0 .. "
                                  f"{self.vocab_size - 1})")


# The config.json key behind each Config field, for messages.
HF_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_head": "head_dim",
           "d_mlp": "intermediate_size", "max_positions": "max_position_embeddings"}
# A bound on the layer count, only so that a corrupt config.json (say 10**12 layers) fails at once instead of
# listing 9 * 10**12 expected tensor names. Gemma 1 has 18 (2b) and 28 (7b) layers.
MAX_LAYERS = 10_000


def _short(value, limit=60) -> str:
    """repr(value), cut to `limit` characters: a message stays one short line whatever the file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _typed(key, value, kind):
    """value if it is a JSON integer (kind int) or number (kind float), else ConfigError naming the key."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config.json: {key} must be an integer, got {_short(value)}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"config.json: {key} must be a number, got {_short(value)}")
    if kind is float and isinstance(value, int) and abs(value) > 1e300:
        raise ConfigError(f"config.json: {key} is {_short(value)}, too large for a float")
    return value


def _rope_theta(hf: dict) -> float:
    """rope_theta (transformers 4) or rope_parameters.rope_theta (transformers 5); only default RoPE."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError("config.json: rope_parameters must be an object with a rope_theta")
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"config.json: rope_type {_short(params['rope_type'])} is not supported (only 'default')")
        theta = params["rope_theta"]
    else:
        scaling = hf.get("rope_scaling")
        if scaling:
            raise ConfigError(f"config.json: rope_scaling {_short(scaling)} is not supported (Gemma 1 uses none)")
        theta = hf.get("rope_theta", 10000.0)
    return float(_typed("rope_theta", theta, float))


def _token_id(hf: dict, key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, list):  # eos_token_id may be a list in newer configs
        value = value[0] if value else default
    return default if value is None else _typed(key, value, int)


def read_config(path: str | Path) -> Config:
    """Read <path>/config.json (or the file itself) into a Config."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}: a model directory needs the HF config.json beside the weights")
    try:
        text = path.read_text(encoding="utf-8")
        hf = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, deep nesting
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ConfigError(f"{path} is not valid JSON ({reason}): re-download or repair it") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    return Config.from_hf(hf)
