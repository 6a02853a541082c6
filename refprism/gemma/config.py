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

from refprism.errors import ConfigError

# The activations HF accepts for Gemma 1. Every one of them is the tanh approximation of GELU: the hub's
# config.json says the legacy "gelu", which transformers maps to "gelu_pytorch_tanh" (the Gemma trap: exact-erf
# GELU is wrong for Gemma).
_TANH_GELU_NAMES = {"gelu", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}


MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma4_text")
FULL, SLIDING = "full_attention", "sliding_attention"
# Gemma 4's multimodal config.json nests the decoder under text_config (weights under model.language_model.*)
MULTIMODAL_GEMMA4 = "gemma4"
# Gemma 4 unified (12B; transformers' models/gemma4_unified): the Gemma 4 text decoder without per-layer embeddings
# and MoE. Gemma4UnifiedTextDecoderLayer is Gemma4TextDecoderLayer's code without those two branches, over the
# same Gemma4TextAttention, Gemma4TextMLP, Gemma4RMSNorm and RoPE; Gemma4UnifiedTextConfig is Gemma4TextConfig
# with other defaults (below) and the PLE / MoE keys removed (HF builds no such modules whatever config.json says).
# Its multimodal config ("gemma4_unified") nests the decoder under text_config, weights under model.language_model.
UNIFIED_GEMMA4, MULTIMODAL_UNIFIED_GEMMA4 = "gemma4_unified_text", "gemma4_unified"
_UNIFIED_DEFAULTS = {"sliding_window": 1024, "max_position_embeddings": 262_144}
_REFUSED = {
    "gemma3n": "Gemma 3n (AltUp's four-stream residual, LAuReL) is not supported",
    "gemma3n_text": "Gemma 3n (AltUp's four-stream residual, LAuReL) is not supported",
}


@dataclass(frozen=True)
class Config:
    """A Gemma model's hyper-parameters (Gemma 1, 2 or 3 text), named with refprism's axis letters.

    The family differs in a few switches: Gemma 2 and 3 add a norm after attention and after the MLP
    (`post_norms`), a sliding attention window on some layers (`layer_types`, `sliding_window`) and a query scale
    `query_pre_attn_scalar ** -0.5`; Gemma 2 soft-caps attention scores and final logits; Gemma 3 normalises q
    and k per head (`qk_norm`) and uses another RoPE base on sliding layers (`rope_local_theta`).
    """

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
    query_pre_attn_scalar: float = 0.0  # 0: head_dim (Gemma 1)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None  # a sliding layer's query at t sees sources t - W < s <= t
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"
    rope_local_theta: float = 0.0  # 0: rope_theta; Gemma 3's sliding layers: 10000
    rope_scale: float = 1.0  # "linear" RoPE scaling on full layers (Gemma 3 4B+): angles / factor
    post_norms: bool = False  # Gemma 2/3: post_attention / post_feedforward norms on the sublayer outputs
    qk_norm: bool = False  # Gemma 3: RMSNorm (1 + w) of each head's q and k over H
    # Gemma 4 (model_type gemma4_text; every field below keeps Gemma 1-3 unchanged at its default)
    d_head_global: int = 0  # 0: d_head; Gemma 4's full layers: global_head_dim (512)
    n_kv_heads_global: int = 0  # 0: n_kv_heads; Gemma 4's full layers with k_eq_v: num_global_key_value_heads
    rope_partial: float = 1.0  # full layers' "proportional" RoPE: the rotated fraction p of H (Gemma 4: 0.25)
    rope_local_partial: float = 1.0  # the same on sliding layers
    k_eq_v: bool = False  # Gemma 4 full layers: V is the raw k_proj output (no v_proj)
    n_kv_shared: int = 0  # Gemma 4: the last n layers reuse K, V of the last earlier layer of their type
    double_wide_mlp: bool = False  # Gemma 4: the KV-sharing layers have MLP width 2F
    d_ple: int = 0  # Gemma 4: per-layer embedding width P (hidden_size_per_layer_input; 0: none)
    vocab_ple: int = 0  # Gemma 4: rows of the per-layer embedding (vocab_size_per_layer_input)
    n_experts: int = 0  # Gemma 4 MoE: experts E per layer (0: no MoE)
    top_k: int = 0  # Gemma 4 MoE: experts selected per token
    d_expert: int = 0  # Gemma 4 MoE: an expert's MLP width (moe_intermediate_size)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.n_layers if isinstance(self.n_layers, int)
                               and 0 < self.n_layers <= MAX_LAYERS else ())
        if not self.query_pre_attn_scalar:
            object.__setattr__(self, "query_pre_attn_scalar", float(self.d_head))
        if not self.rope_local_theta:
            object.__setattr__(self, "rope_local_theta", self.rope_theta)

    @property
    def family(self) -> int:
        """1, 2, 3 or 4: the Gemma generation."""
        return {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma4_text": 4}[self.model_type]

    @property
    def norm_offset(self) -> float:
        """The RMSNorm gain is (offset + w). Gemma trap: 1 for Gemma 1-3 (checkpoints store w, the norm scales by
        1 + w), 0 for Gemma 4 (the norm scales by w itself; its weights start at 1)."""
        return 0.0 if self.family == 4 else 1.0

    @property
    def gemma4(self) -> bool:
        return self.family == 4

    @property
    def ple(self) -> bool:
        """Gemma 4 E2B / E4B: per-layer embeddings."""
        return self.d_ple > 0

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def is_sliding(self, l: int) -> bool:
        return self.layer_types[l] == SLIDING

    def rope_of(self, l: int) -> tuple[float, float]:
        """(theta, scale) of layer l's RoPE: Gemma 3 uses a local base on sliding layers."""
        if self.is_sliding(l):
            return self.rope_local_theta, 1.0
        return self.rope_theta, self.rope_scale

    def rope_partial_of(self, l: int) -> float:
        """The rotated fraction of layer l's head (Gemma 4's "proportional" RoPE on full layers: 0.25)."""
        return self.rope_local_partial if self.is_sliding(l) else self.rope_partial

    def head_dim_of(self, l: int) -> int:
        """H of layer l: Gemma 4's full layers have global_head_dim."""
        return self.d_head_global if self.d_head_global and not self.is_sliding(l) else self.d_head

    def kv_heads_of(self, l: int) -> int:
        """K of layer l: Gemma 4's full layers with k_eq_v have num_global_key_value_heads."""
        return self.n_kv_heads_global if self.n_kv_heads_global and not self.is_sliding(l) else self.n_kv_heads

    def k_eq_v_at(self, l: int) -> bool:
        """Whether layer l's V is its raw K projection (Gemma 4: attention_k_eq_v, full layers only)."""
        return self.k_eq_v and not self.is_sliding(l)

    def kv_source(self, l: int) -> int:
        """The layer whose K and V layer l attends over: l itself, or for a KV-sharing consumer (the last
        n_kv_shared layers) the last earlier non-consumer layer of the same type (HF: kv_sharing_modes)."""
        first = self.n_layers - self.n_kv_shared
        if l < first:
            return l
        return max(i for i in range(first) if self.layer_types[i] == self.layer_types[l])

    def has_kv(self, l: int) -> bool:
        """Whether layer l computes its own K and V (not a KV-sharing consumer)."""
        return l < self.n_layers - self.n_kv_shared

    def mlp_width_of(self, l: int) -> int:
        """F of layer l: Gemma 4's double-wide MLP doubles it on the KV-sharing consumers."""
        return 2 * self.d_mlp if self.double_wide_mlp and not self.has_kv(l) else self.d_mlp

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
        if isinstance(model_type, str) and model_type in _REFUSED:
            raise ConfigError(f"config.json has model_type {model_type!r}: {_REFUSED[model_type]} (refprism reads "
                              "Gemma 1, 2, 3 and 4 text decoders)")
        if model_type in (MULTIMODAL_GEMMA4, MULTIMODAL_UNIFIED_GEMMA4):
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"config.json is a multimodal Gemma 4 (model_type {model_type!r}) without a "
                                  "text_config object: re-download the model's config.json")
            inner = "gemma4_text" if model_type == MULTIMODAL_GEMMA4 else UNIFIED_GEMMA4
            return cls.from_hf({"model_type": inner, **text})
        if model_type == UNIFIED_GEMMA4:  # the Gemma 4 text decoder with PLE and MoE off, whatever config.json says
            return cls.from_hf({**_UNIFIED_DEFAULTS, **hf, "model_type": "gemma4_text",
                                "hidden_size_per_layer_input": 0, "enable_moe_block": False})
        if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
            raise ConfigError("config.json is a multimodal Gemma 3 (model_type 'gemma3'); refprism reads the text "
                              "models (model_type 'gemma3_text', e.g. google/gemma-3-270m, google/gemma-3-1b-pt)")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"config.json has model_type {_short(model_type)}; refprism supports Gemma 1, 2, 3 and 4 text models "
                f"(model_type {', '.join(repr(m) for m in MODEL_TYPES)})"
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
        rope_theta, rope_local_theta, rope_scale = _rope(hf, model_type)
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
            **_family_fields(hf, model_type, need("num_hidden_layers") if model_type != "gemma" else None),
            rope_local_theta=float(rope_local_theta),
            rope_scale=float(rope_scale),
            **(_gemma4_fields(hf, need("num_hidden_layers"), d_head, n_kv) if model_type == "gemma4_text" else {}),
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
        for name in ("rope_theta", "rope_local_theta", "rope_scale", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"config.json: {name} must be a finite positive number, got {value!r}")
        for name in ("attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"config.json: {name} must be a positive number or null, got {value!r}")
        if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= {FULL, SLIDING}:
            raise ConfigError(f"config.json: layer_types must list {self.n_layers} entries, each "
                              f"'{FULL}' or '{SLIDING}'")
        if SLIDING in self.layer_types and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ConfigError(f"config.json: sliding layers need a positive integer sliding_window, "
                              f"got {self.sliding_window!r}")
        if self.gemma4:
            for name in ("d_head_global", "n_kv_heads_global"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"config.json: {HF_KEYS[name]} must be a positive integer, got {_short(value)}")
            if self.d_head_global % 2:
                raise ConfigError(f"config.json: global_head_dim ({self.d_head_global}) must be even for RoPE")
            if self.n_heads % self.n_kv_heads_global:
                raise ConfigError(f"config.json: num_attention_heads ({self.n_heads}) must be a multiple of "
                                  f"num_global_key_value_heads ({self.n_kv_heads_global})")
            if self.d_ple < 0 or (self.d_ple and self.vocab_ple <= 0):
                raise ConfigError("config.json: hidden_size_per_layer_input must be >= 0 and "
                                  "vocab_size_per_layer_input positive")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"config.json: {name} is {value}, outside the vocabulary (ids 0 .. "
                                  f"{self.vocab_size - 1})")


# The config.json key behind each Config field, for messages.
HF_KEYS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_head": "head_dim",
           "d_mlp": "intermediate_size", "max_positions": "max_position_embeddings",
           "d_head_global": "global_head_dim", "n_kv_heads_global": "num_global_key_value_heads"}
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


def _rope(hf: dict, model_type: str) -> tuple[float, float, float]:
    """(theta of full layers, theta of sliding layers, linear scale of full layers) from config.json.

    Accepts transformers 4's rope_theta / rope_local_base_freq / rope_scaling and transformers 5's
    rope_parameters (flat, or per layer type for Gemma 3). Only "default" and "linear" RoPE are supported.
    """
    default_full = 1_000_000.0 if model_type in ("gemma3_text", "gemma4_text") else 10000.0
    params = hf.get("rope_parameters")
    if model_type == "gemma4_text" and params is None:
        params = GEMMA4_ROPE
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        full = _rope_entry(_object(params, "full_attention"), default_full)
        local = _rope_entry(_object(params, "sliding_attention"), 10000.0)
        return full[0], local[0], full[1]
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError("config.json: rope_parameters must be an object with a rope_theta")
        theta, scale = _rope_entry(params, default_full)
    else:
        theta, scale = _rope_entry({"rope_theta": hf.get("rope_theta", default_full),
                                    **_object(hf, "rope_scaling")}, default_full)
    local = hf.get("rope_local_base_freq", 10000.0 if model_type == "gemma3_text" else theta)
    return theta, float(_typed("rope_local_base_freq", local, float)), scale


def _object(parent: dict, key: str) -> dict:
    """parent[key] when it is a JSON object, {} when absent or null, else ConfigError."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {key} must be an object or null, got {_short(value)}")
    return value


# Gemma4TextConfig's rope_parameters when config.json has none
GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                  "rope_theta": 1_000_000.0}}


def _rope_entry(entry: dict, default_theta: float) -> tuple[float, float]:
    kind = entry.get("rope_type", entry.get("type", "default"))
    if not isinstance(kind, str) or kind not in ("default", "linear", "proportional"):
        raise ConfigError(f"config.json: rope_type {_short(kind)} is not supported (only 'default', 'linear' and "
                          "Gemma 4's 'proportional')")
    theta = entry.get("rope_theta", default_theta)
    # "proportional" divides its frequencies by `factor` as "linear" divides the angles: the same scale
    scale = entry.get("factor", 1.0) if kind in ("linear", "proportional") else 1.0
    return float(_typed("rope_theta", theta, float)), float(_typed("rope factor", scale, float))


def _family_fields(hf: dict, model_type: str, n_layers) -> dict:
    """The Gemma 2 / 3 switches, with transformers' defaults where config.json is silent."""
    if model_type == "gemma":
        return {}
    gemma2 = model_type == "gemma2"
    layer_types = hf.get("layer_types")
    if layer_types is None and isinstance(n_layers, int) and 0 < n_layers <= MAX_LAYERS:
        pattern = 2 if gemma2 else _typed("sliding_window_pattern", hf.get("sliding_window_pattern", 6), int)
        if pattern <= 0:
            raise ConfigError(f"config.json: sliding_window_pattern must be positive, got {pattern}")
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
    if layer_types is None:
        layer_types = []  # an impossible layer count: validate() names it
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConfigError(f"config.json: layer_types must be a list of strings, got {_short(layer_types)}")
    window = hf.get("sliding_window", 512 if model_type == "gemma4_text" else 4096)
    if window is not None:
        window = _typed("sliding_window", window, int)
    if model_type == "gemma4_text" and layer_types and layer_types[-1] != FULL:
        layer_types = [*layer_types[:-1], FULL]  # as Gemma4TextConfig.__post_init__: the last layer is always full
    fields = {
        # Gemma 4 trap: the attention scale is 1.0 (Gemma4TextAttention.scaling; q and k are RMS-normed per head)
        "query_pre_attn_scalar": 1.0 if model_type == "gemma4_text" else _number(hf, "query_pre_attn_scalar", 256),
        "attn_softcap": _optional(hf, "attn_logit_softcapping", 50.0 if gemma2 else None),
        "final_softcap": _optional(hf, "final_logit_softcapping", 30.0 if gemma2 else None),
        "sliding_window": window,  # every pattern-th layer is full; the others see a window of this many tokens
        "layer_types": tuple(layer_types),
        "post_norms": True,
        "qk_norm": not gemma2,
    }
    bidirectional = hf.get("use_bidirectional_attention")
    # Gemma 4's "vision" opens attention both ways within each run of image tokens only (Gemma4Model builds that
    # mask from mm_token_type_ids); text tokens stay causal, and refprism's prompts are text. Gemma 3 reads any
    # truthy value as bidirectional text attention, Gemma 4's "all" too.
    if bidirectional not in (None, False) and not (model_type == "gemma4_text" and bidirectional == "vision"):
        raise ConfigError(f"config.json: use_bidirectional_attention {_short(bidirectional)} is not supported: "
                          "refprism runs causal attention only (Gemma 4's 'vision', causal on text, is read)")
    return fields


def _gemma4_fields(hf: dict, n_layers, d_head, n_kv) -> dict:
    """Gemma 4's fields (Gemma4TextConfig's defaults where config.json is silent); contradictions refused, each
    naming its key. Full layers: global_head_dim and num_global_key_value_heads (the latter only with
    attention_k_eq_v, as Gemma4TextConfig.__post_init__), or a per_layer_config as `to_dict()` writes it."""
    if not isinstance(n_layers, int) or not 0 < n_layers <= MAX_LAYERS:
        return {}  # validate() names the layer count
    layer_types = _family_fields(hf, "gemma4_text", n_layers)["layer_types"]
    k_eq_v = hf.get("attention_k_eq_v", False)
    if not isinstance(k_eq_v, bool):
        raise ConfigError(f"config.json: attention_k_eq_v must be true or false, got {_short(k_eq_v)}")
    d_global = _typed("global_head_dim", hf.get("global_head_dim", 512), int)
    kv_global = hf.get("num_global_key_value_heads")
    kv_global = _typed("num_global_key_value_heads", kv_global, int) if kv_global is not None and k_eq_v else n_kv
    per_layer = _object(hf, "per_layer_config")
    if per_layer:
        found = set()
        for key, entry in per_layer.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < n_layers) or not isinstance(entry, dict):
                raise ConfigError(f"config.json: per_layer_config has an entry {_short(key)} that is not a layer "
                                  f"index below {n_layers} with an object")
            l = int(key)
            head = _typed("per_layer_config head_dim", entry.get("head_dim", d_head), int)
            kv = _typed("per_layer_config num_key_value_heads", entry.get("num_key_value_heads", n_kv), int)
            if layer_types[l] == SLIDING:
                if (head, kv) != (d_head, n_kv):
                    raise ConfigError(f"config.json: per_layer_config gives sliding layer {l} its own head_dim or "
                                      "num_key_value_heads; refprism supports one geometry per layer type")
                continue
            found.add((head, kv))
        if len(found) > 1:
            raise ConfigError("config.json: per_layer_config gives the full layers different head_dim or "
                              "num_key_value_heads; refprism supports one geometry per layer type")
        d_global, kv_global = found.pop() if found else (d_head, n_kv)
    shared = _typed("num_kv_shared_layers", hf.get("num_kv_shared_layers", 0), int)
    if not 0 <= shared < n_layers:
        raise ConfigError(f"config.json: num_kv_shared_layers is {shared}; it must be at least 0 and below "
                          f"num_hidden_layers ({n_layers}): the shared K, V come from earlier layers")
    producers = set(layer_types[: n_layers - shared])
    if shared and set(layer_types[n_layers - shared:]) - producers:
        kind = min(set(layer_types[n_layers - shared:]) - producers)
        raise ConfigError(f"config.json: num_kv_shared_layers ({shared}) leaves the {kind} layers that share K, V "
                          "without an earlier layer of that type to share from")
    ple = hf.get("hidden_size_per_layer_input", 256)
    ple = 0 if ple is None else _typed("hidden_size_per_layer_input", ple, int)
    moe = hf.get("enable_moe_block", False)
    if not isinstance(moe, bool):
        raise ConfigError(f"config.json: enable_moe_block must be true or false, got {_short(moe)}")
    experts = {}
    if moe:
        for field, key in (("n_experts", "num_experts"), ("top_k", "top_k_experts"),
                           ("d_expert", "moe_intermediate_size")):
            value = hf.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: enable_moe_block needs {key} as a positive integer, got "
                                  f"{_short(value)}")
            experts[field] = value
        if experts["top_k"] > experts["n_experts"]:
            raise ConfigError(f"config.json: top_k_experts ({experts['top_k']}) exceeds num_experts "
                              f"({experts['n_experts']})")
    double = hf.get("use_double_wide_mlp", False)
    if not isinstance(double, bool):
        raise ConfigError(f"config.json: use_double_wide_mlp must be true or false, got {_short(double)}")
    partial = {}
    params = hf.get("rope_parameters") or GEMMA4_ROPE
    if isinstance(params, dict):
        for field, kind in (("rope_partial", FULL), ("rope_local_partial", SLIDING)):
            entry = params.get(kind) if isinstance(params.get(kind), dict) else {}
            p = entry.get("partial_rotary_factor", 1.0) if entry.get("rope_type") == "proportional" else 1.0
            p = float(_typed("partial_rotary_factor", p, float))
            if not 0 < p <= 1:
                raise ConfigError(f"config.json: {kind}'s partial_rotary_factor must be in (0, 1], got {p}")
            partial[field] = p
    return {"d_head_global": d_global, "n_kv_heads_global": kv_global, "k_eq_v": k_eq_v, "n_kv_shared": shared,
            "double_wide_mlp": double, "d_ple": ple,
            "vocab_ple": _typed("vocab_size_per_layer_input", hf.get("vocab_size_per_layer_input", 262_144), int)
            if ple else 0, **experts, **partial}


def _number(hf, key, default):
    return float(_typed(key, hf.get(key, default), float))


def _optional(hf, key, default):
    value = hf.get(key, default)
    return None if value is None else _number({key: value}, key, None)


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
