"""Synthetic Gemma (1) checkpoints: random weights of any shape, in the Hugging Face layout.

A checkpoint written here is read the same way as google/gemma-2b from the hub: ``config.json``,
``model.safetensors`` (or ``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``),
``generation_config.json`` and a tokenizer. It lets tests and tools exercise every loading path
(f32 / bf16 / f16, single file or sharded) and the full forward pass without a hub download.

Axis legend (as in ops.py): V vocabulary, D model width, N query heads, K key/value heads,
H head width, F MLP width, L layers.

Tensors written (HF names; no ``lm_head``: the unembedding is tied to the embedding)::

    model.embed_tokens.weight                       [V, D]
    model.layers.{i}.input_layernorm.weight         [D]
    model.layers.{i}.self_attn.q_proj.weight        [N*H, D]
    model.layers.{i}.self_attn.k_proj.weight        [K*H, D]
    model.layers.{i}.self_attn.v_proj.weight        [K*H, D]
    model.layers.{i}.self_attn.o_proj.weight        [D, N*H]
    model.layers.{i}.post_attention_layernorm.weight [D]
    model.layers.{i}.mlp.gate_proj.weight           [F, D]
    model.layers.{i}.mlp.up_proj.weight             [F, D]
    model.layers.{i}.mlp.down_proj.weight           [D, F]
    model.norm.weight                               [D]

Random values (all drawn in float32, then cast once to the requested dtype)::

    embed_tokens  ~ N(0, (1/sqrt(D))**2)   the model multiplies by sqrt(D), so the embedded
                                             residual has entries ~ N(0, 1), rms 1
    *_proj [out, in] ~ N(0, (1/sqrt(in))**2) fan-in scaling: a unit-rms input gives unit-rms output,
                                             so q.k / sqrt(H) ~ N(0, 1): attention patterns are
                                             neither uniform nor one-hot
    *norm.weight  ~ N(0, 0.3**2)            raw Gemma norm weights; the model scales by (1 + w), so a
                                             wrong "w" instead of "1 + w" is caught at once (w ~ 0)
                                             and zero weights would hide that convention

With these scales the final logits have a standard deviation of about |1 + w| ~ 1 across the
vocabulary, with the largest few of order 3-10 (the tied embedding makes the current token's
own logit stand out by about sqrt(D) / (rms of the final residual)).

Every tensor has its own random stream, seeded by ``(seed, crc32(name))``: its values do not
depend on the dtype cast, the sharding, or how many other layers the model has.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import string
import tempfile
import zlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from refprism.gemma.config import Config
from refprism.gemma.weights import hf_shapes

__all__ = [
    "PRESETS",
    "DTYPES",
    "make_config",
    "tensor_shapes",
    "random_tensor",
    "write_checkpoint",
    "build_small_tokenizer",
]

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

# Fields shared by every preset, with the values of the hub's google/gemma-2b config.json.
_COMMON: dict = {
    "architectures": ["GemmaForCausalLM"],
    "model_type": "gemma",
    # Gemma trap: the hub configs say "gelu" (a legacy value) but mean tanh GELU;
    # transformers rewrites hidden_act="gelu" to "gelu_pytorch_tanh" with a warning.
    "hidden_act": "gelu",
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "use_cache": True,
}

PRESETS: dict[str, dict] = {
    # A model small enough to run in a unit test (about 0.1 M parameters).
    "tiny": {
        **_COMMON,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "torch_dtype": "float32",
    },
    # google/gemma-2b: 2.51 B parameters; multi-query attention (one key/value head).
    "gemma-2b": {
        **_COMMON,
        "vocab_size": 256000,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
    # google/gemma-7b: 8.54 B parameters; N*H = 4096 != D = 3072.
    "gemma-7b": {
        **_COMMON,
        "vocab_size": 256000,
        "hidden_size": 3072,
        "intermediate_size": 24576,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
    },
}

# Gemma 2 and 3 in miniature, with every switch of the family made visible at this size: a query scale that is
# not head_dim ** -0.5, a window shorter than the test prompts, soft-caps small enough that tanh bends the
# scores and logits (Gemma 2), and a full layer between sliding ones.
_COMMON_2_3 = {k: v for k, v in _COMMON.items() if k != "hidden_act"}
PRESETS["tiny-gemma2"] = {
    **_COMMON_2_3,
    **{k: PRESETS["tiny"][k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "max_position_embeddings", "torch_dtype")},
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "num_hidden_layers": 3,  # sliding, full, sliding (transformers' default alternation)
    "query_pre_attn_scalar": 24,
    "sliding_window": 4,
    "attn_logit_softcapping": 3.0,
    "final_logit_softcapping": 5.0,
}
PRESETS["tiny-gemma3"] = {
    **_COMMON_2_3,
    **{k: PRESETS["tiny"][k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "max_position_embeddings", "torch_dtype")},
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "num_hidden_layers": 3,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "query_pre_attn_scalar": 24,
    "sliding_window": 4,
    "rope_theta": 1_000_000.0,  # full layers
    "rope_local_base_freq": 10_000.0,  # sliding layers
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}

# Gemma 4 in miniature with every feature on (docs/gemma4.md): 7 layers S F S S F S F; the last 3 share K, V
# (consumers 4 F, 5 S, 6 F read producers 1 F and 3 S: both layer types), with a double-wide MLP; full layers have
# their own head width 32 and one kv head, V = K (k_eq_v), proportional RoPE over a quarter of the head; per-layer
# embeddings of width 16; a mixture of 4 experts (top 2) beside the dense MLP; a final soft-cap that bends; a window
# shorter than the test prompts. Norm weights, layer_scalar, the router's scale and per_expert_scale are drawn
# around 1 (random_tensor): leaving them at 1 would test nothing.
_LAYERS_4 = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
             "sliding_attention", "full_attention"]
_GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}}
PRESETS["tiny-gemma4"] = {
    **_COMMON_2_3,
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "rope_theta": 1_000_000.0,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 7,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_global_key_value_heads": 1,
    "attention_k_eq_v": True,
    "layer_types": _LAYERS_4,
    "rope_parameters": _GEMMA4_ROPE,
    "sliding_window": 4,
    "final_logit_softcapping": 5.0,
    "num_kv_shared_layers": 3,
    "use_double_wide_mlp": True,
    "hidden_size_per_layer_input": 16,  # sqrt(16) = 4 and sqrt(64) = 8 are exact: float64 parity needs no rounding
    "vocab_size_per_layer_input": 512,
    "enable_moe_block": True,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 24,
    "max_position_embeddings": 128,
    "torch_dtype": "float32",
}
# Gemma 4 unified (12B's decoder, model_type gemma4_unified_text) in miniature: tiny-gemma4 without the features it
# lacks (per-layer embeddings, MoE); k_eq_v, KV sharing over both layer types, the double-wide MLP, two head
# geometries and proportional RoPE stay on. "vision" bidirectional attention (its class default) is causal on text.
PRESETS["tiny-gemma4-unified"] = {
    **{k: v for k, v in PRESETS["tiny-gemma4"].items() if k not in (
        "hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
        "top_k_experts", "moe_intermediate_size")},
    "architectures": ["Gemma4UnifiedForCausalLM"],
    "model_type": "gemma4_unified_text",
    "use_bidirectional_attention": "vision",
}
# The released sizes' shapes (text decoders of the hub's google/gemma-4-* config.json files' text_config).
_GEMMA4_COMMON = {**{k: v for k, v in PRESETS["tiny-gemma4"].items() if k in (
    "architectures", "model_type", "hidden_activation", "rms_norm_eps", "attention_bias", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range", "use_cache",
    "rope_parameters")}, "rope_theta": 1_000_000.0, "vocab_size": 262144, "head_dim": 256, "global_head_dim": 512,
    "final_logit_softcapping": 30.0, "torch_dtype": "bfloat16"}


def _pattern(n_layers, every):
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]


PRESETS["gemma-4-e2b"] = {**_GEMMA4_COMMON, "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
                          "num_attention_heads": 8, "num_key_value_heads": 1, "layer_types": _pattern(35, 5),
                          "sliding_window": 512, "num_kv_shared_layers": 20, "use_double_wide_mlp": True,
                          "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
                          "attention_k_eq_v": False, "enable_moe_block": False, "max_position_embeddings": 131072}
PRESETS["gemma-4-e4b"] = {**_GEMMA4_COMMON, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 42,
                          "num_attention_heads": 8, "num_key_value_heads": 2, "layer_types": _pattern(42, 6),
                          "sliding_window": 512, "num_kv_shared_layers": 18, "use_double_wide_mlp": False,
                          "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
                          "attention_k_eq_v": False, "enable_moe_block": False, "max_position_embeddings": 131072}
PRESETS["gemma-4-31b"] = {**_GEMMA4_COMMON, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 60,
                          "num_attention_heads": 32, "num_key_value_heads": 16, "num_global_key_value_heads": 4,
                          "attention_k_eq_v": True, "layer_types": _pattern(60, 6), "sliding_window": 1024,
                          "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 0, "enable_moe_block": False,
                          "max_position_embeddings": 262144}
PRESETS["gemma-4-26b-a4b"] = {**_GEMMA4_COMMON, "hidden_size": 2816, "intermediate_size": 2112,
                              "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8,
                              "num_global_key_value_heads": 2, "attention_k_eq_v": True,
                              "layer_types": _pattern(30, 6), "sliding_window": 1024, "num_kv_shared_layers": 0,
                              "hidden_size_per_layer_input": 0, "enable_moe_block": True, "num_experts": 128,
                              "top_k_experts": 8, "moe_intermediate_size": 704, "max_position_embeddings": 262144}

_GEMMA4_TYPES = ("gemma4_text", "gemma4_unified_text")  # Gemma 4 norms scale by w: their weights are drawn around 1

# Name -> numpy dtype of the tensors written. bfloat16 is ml_dtypes' type, which
# safetensors.numpy saves as "BF16" and loads back as ml_dtypes.bfloat16.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

_POSITIVE_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def _validate_config(config: dict) -> None:
    """Raise ValueError unless ``config`` describes a Gemma (1) model that can be written."""
    missing = [k for k in (*_POSITIVE_INT_KEYS, "rms_norm_eps", "rope_theta") if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}")
    for key in _POSITIVE_INT_KEYS:
        value = config[key]
        # bool is an int subclass: reject it explicitly.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"config[{key!r}] must be a positive integer, got {value!r}")
    n, k = config["num_attention_heads"], config["num_key_value_heads"]
    if n % k != 0:
        raise ValueError(
            f"num_attention_heads ({n}) must be a multiple of num_key_value_heads ({k})"
        )
    if config["head_dim"] % 2 != 0:
        # Split-half RoPE rotates pairs (x[j], x[j + H/2]): H must be even.
        raise ValueError(f"head_dim must be even for RoPE, got {config['head_dim']}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"config[{key!r}] must be a positive number, got {value!r}")
    if config.get("tie_word_embeddings", True) is not True:
        raise ValueError("Gemma ties the unembedding to the embedding: tie_word_embeddings must be true")
    if config.get("model_type", "gemma") not in ("gemma", "gemma2", "gemma3_text", *_GEMMA4_TYPES):
        raise ValueError(f"model_type must be 'gemma', 'gemma2', 'gemma3_text', 'gemma4_text' or "
                         f"'gemma4_unified_text', got {config.get('model_type')!r}")


def make_config(preset: str = "tiny", **overrides) -> dict:
    """An HF ``config.json`` dict for a Gemma (1) model: a preset with some fields replaced.

    ``overrides`` use the HF key names (``num_hidden_layers=3``, ``num_key_value_heads=1``);
    a key that no preset has raises ValueError rather than being written unread.

    >>> make_config("tiny", num_hidden_layers=3)["num_hidden_layers"]
    3
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = json.loads(json.dumps(PRESETS[preset]))  # deep copy
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(config)}")
    config.update(overrides)
    if "torch_dtype" in overrides and overrides["torch_dtype"] not in DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {overrides['torch_dtype']!r}")
    _validate_config(config)
    return config


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in file order, with its shape: the loader's own list
    (``refprism.gemma.weights.hf_shapes``), so the writer and the reader cannot disagree.

    Shapes: embed [V, D]; q [N*H, D]; k, v [K*H, D]; o [D, N*H]; gate, up [F, D]; down [D, F];
    the three norms [D]. Torch ``nn.Linear`` layout: [out_features, in_features].
    """
    _validate_config(config)
    return hf_shapes(Config.from_hf(config))


# Standard deviation of the raw norm weights w; the model scales by (1 + w).
NORM_WEIGHT_STD = 0.3


# Gemma 4's scalars and scale vectors that start at 1 (norm weights, layer_scalar, the router's scale and
# per_expert_scale): drawn as 1 + N(0, 0.3**2), so that a port that leaves them at 1 (or applies 1 + w) is caught
_AROUND_ONE = ("norm.weight", "layer_scalar", "router.scale", "router.per_expert_scale")


def random_tensor(name: str, shape: tuple[int, ...], *, seed: int = 0, norm_mean: float = 0.0) -> np.ndarray:
    """The float32 random values of one tensor (see the module docstring for the scales).

    Math:   embed ~ N(0, 1/D);  proj [out, in] ~ N(0, 1/in);  norm w ~ N(norm_mean, 0.3**2)
            Gemma 4 (norm_mean 1): norm w, layer_scalar, router.scale, per_expert_scale ~ N(1, 0.3**2);
            experts' gate_up [E, 2I, D] ~ N(0, 1/D), down [E, D, I] ~ N(0, 1/I);
            per-layer embedding [Vp, L*P] ~ N(0, 1/P) (the model multiplies it by sqrt(P))
    Shapes: embed [V, D]; proj [out, in]; norm [D]; returned as given, dtype float32

    The stream is seeded by (seed, crc32(name)), so a tensor's values depend only on its
    name, shape and the seed.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    mean = 0.0
    norm = name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight"))  # Gemma 4 MoE: ..._layernorm_2
    if norm_mean and name.endswith(("q_norm.weight", "k_norm.weight")):
        # Gemma 4's scores are q.k at scale 1 (q, k RMS-normed over H): w ~ N(0.5, 0.15**2) keeps them O(1) at the
        # tiny sizes, so that attention is neither uniform nor one-hot (and float32 rounding is not amplified)
        std, mean = NORM_WEIGHT_STD / 2, 0.5
    elif name.endswith(_AROUND_ONE[1:]) or (norm_mean and norm):
        std, mean = NORM_WEIGHT_STD, 1.0
    elif norm:
        std, mean = NORM_WEIGHT_STD, norm_mean
    elif name == "model.embed_tokens.weight":
        std = 1.0 / math.sqrt(shape[1])  # 1/sqrt(D): after the sqrt(D) embedding scale, rms 1
    elif name == "model.embed_tokens_per_layer.weight":
        std = 0.25  # [Vp, L*P]; the model multiplies by sqrt(P): rms 1 at the tiny preset's P = 16
    elif name.endswith(("_proj.weight", "router.proj.weight", "per_layer_input_gate.weight", "_projection.weight",
                        "per_layer_projection.weight")):
        std = 1.0 / math.sqrt(shape[1])  # 1/sqrt(fan_in)
    elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        std = 1.0 / math.sqrt(shape[2])  # [E, out, in]: 1/sqrt(fan_in)
    else:
        raise ValueError(f"no initialisation rule for tensor {name!r}")
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)  # in place, float32 constant: no float64 copy
    if mean:
        values += np.float32(mean)
    return values


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def _plan_shards(sizes: list[int], *, shards: int = 1, max_shard_bytes: int | None = None) -> list[list[int]]:
    """Split tensor indices 0..len(sizes)-1, in order, into contiguous shards.

    ``shards=n``: exactly n non-empty shards whose largest byte total is as small as possible.
    ``max_shard_bytes=b``: greedy, as transformers' ``save_pretrained(max_shard_size=b)``:
    a shard is closed when the next tensor would take it past b; a tensor larger than b
    gets a shard of its own.
    """
    count = len(sizes)

    def greedy(capacity: int) -> list[list[int]]:
        """Close a shard when the next tensor would take it past `capacity` bytes."""
        groups: list[list[int]] = [[]]
        total = 0
        for i, size in enumerate(sizes):
            if groups[-1] and total + size > capacity:
                groups.append([])
                total = 0
            groups[-1].append(i)
            total += size
        return groups

    if max_shard_bytes is not None:
        if shards != 1:
            raise ValueError("give shards or max_shard_bytes, not both")
        if isinstance(max_shard_bytes, bool) or int(max_shard_bytes) != max_shard_bytes or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        return greedy(max_shard_bytes)
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if shards > count:
        raise ValueError(f"cannot split {count} tensors into {shards} non-empty shards")

    # Smallest capacity for which greedy packing needs at most `shards` shards (binary search).
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) <= shards:
            hi = mid
        else:
            lo = mid + 1
    plan = greedy(lo)
    # Fewer shards than asked (possible when a few tensors dominate): split the shard with
    # the most tensors; splitting never raises the largest byte total.
    while len(plan) < shards:
        j = max(range(len(plan)), key=lambda g: len(plan[g]))
        group = plan[j]
        plan[j : j + 1] = [group[: len(group) // 2], group[len(group) // 2 :]]
    return plan


def _shard_file_names(n: int) -> list[str]:
    """Hub file names: ``model.safetensors`` alone, else ``model-0000k-of-0000n.safetensors``."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3 as in Gemma
_WORD_MARK = "\u2581"  # "▁", SentencePiece's word-start marker
_WORDS = (
    "The the capital city of France is Paris London Moscow Hanoi Dublin Amsterdam Tehran Seoul "
    "Tokyo Russia Japan Germany Berlin Italy Rome Spain Madrid China Beijing and a in to"
).split()
_CHAR_SCORE = -10.0  # every single character
_WORD_SCORE = -5.0  # whole words: one word piece beats any split into characters
_MIN_SMALL_VOCAB = 256

# The minimal tokenizer_config.json written beside the small tokenizer. tokenizer_class
# matters: without it transformers' AutoTokenizer picks GemmaTokenizer (from model_type), which
# rebuilds a BPE model from the vocabulary and silently tokenizes character by character.
SMALL_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}


def _small_pieces() -> list[str]:
    """The pieces of the small tokenizer before the filler tokens, in id order."""
    chars = [c for c in string.printable if c not in " \r\x0b\x0c"]  # 94 visible, "\t", "\n"
    words = [_WORD_MARK + w for w in _WORDS] + [w for w in _WORDS if len(w) > 1]
    pieces = _SPECIALS + [_WORD_MARK] + chars + words
    assert len(pieces) == len(set(pieces)), "duplicate piece"
    return pieces


def build_small_tokenizer(vocab_size: int):
    """A Gemma-like SentencePiece-style Unigram tokenizer with exactly ``vocab_size`` pieces.

    Ids: 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>``, 3 ``<unk>``; then ``▁``, every printable ASCII
    character (digits are single pieces, as in Gemma), whole words with and without ``▁``
    (``▁capital``, ``The``), then fillers ``<unused0>``, ``<unused1>``, ... up to ``vocab_size``.

    Mimics the real gemma tokenizer.json: normalizer replaces " " by "▁" (no "▁" is prepended
    to the first word, so "The capital" is ``The ▁capital``); the pre-tokenizer splits on " "
    (a no-op after that normalizer, kept for fidelity); the decoder maps "▁" back to " ";
    the post-processor prepends ``<bos>``. Characters outside the pieces become ``<unk>``.

    >>> tok = build_small_tokenizer(512)
    >>> tok.encode("The capital").tokens
    ['<bos>', 'The', '▁capital']
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    pieces = _small_pieces()
    if vocab_size < _MIN_SMALL_VOCAB:
        raise ValueError(
            f"the small tokenizer needs vocab_size >= {_MIN_SMALL_VOCAB} "
            f"({len(pieces)} base pieces), got {vocab_size}"
        )
    fillers = [f"<unused{j}>" for j in range(vocab_size - len(pieces))]
    vocab = []
    filler_set = set(fillers)  # a list's `in` made this loop quadratic: 26 min at Gemma 4's 262,144 ids
    for piece in pieces + fillers:
        if piece in _SPECIALS or piece in filler_set:
            score = 0.0  # control / user-defined pieces: never reached by the model (added tokens)
        elif len(piece) == 1:
            score = _CHAR_SCORE
        else:
            score = _WORD_SCORE
        vocab.append((piece, score))

    tok = Tokenizer(models.Unigram(vocab, unk_id=_SPECIALS.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Replace(" ", _WORD_MARK)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(_WORD_MARK, " "), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <bos>:1 $B:1",
        special_tokens=[("<bos>", _SPECIALS.index("<bos>"))],
    )
    # Specials and fillers are added tokens, as in Gemma: matched whole, never split.
    # They already have ids in the vocabulary, so adding them keeps those ids.
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in _SPECIALS])
    if fillers:
        tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in fillers])
    if tok.get_vocab_size() != vocab_size:  # pragma: no cover - guards the construction above
        raise AssertionError(f"built {tok.get_vocab_size()} pieces, wanted {vocab_size}")
    return tok


def _shared_tokenizer_dir() -> pathlib.Path:
    """Folder of the real gemma-2b tokenizer: $REFPRISM_SHARED_TOKENIZER, else ../shared/gemma-2b-tokenizer."""
    env = os.environ.get("REFPRISM_SHARED_TOKENIZER")
    if env:
        return pathlib.Path(env)
    checkout = pathlib.Path(__file__).resolve().parents[2]  # refprism/checkpoints/synth.py -> the checkout
    return checkout.parent / "shared" / "gemma-2b-tokenizer"


GEMMA_VOCAB_SIZE = 256000


def _tokenizer_files_for(vocab_size: int) -> dict[str, pathlib.Path | str]:
    """The tokenizer files of a checkpoint: file name -> source Path (copied) or text (written).

    vocab_size 256000: the real gemma-2b ``tokenizer.json`` and ``tokenizer_config.json`` (and
    ``tokenizer.model`` when present) from the shared folder; FileNotFoundError if absent.
    Any other vocab_size: the small tokenizer of ``build_small_tokenizer(vocab_size)``.
    """
    if vocab_size == GEMMA_VOCAB_SIZE:
        folder = _shared_tokenizer_dir()
        files: dict[str, pathlib.Path | str] = {}
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"vocab_size {vocab_size} needs the real gemma-2b tokenizer, but {path} is missing; "
                    "set REFPRISM_SHARED_TOKENIZER to its folder, or pass tokenizer=None"
                )
            files[name] = path
        if (folder / "tokenizer.model").is_file():
            files["tokenizer.model"] = folder / "tokenizer.model"
        return files
    tok = build_small_tokenizer(vocab_size)
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(SMALL_TOKENIZER_CONFIG, indent=2) + "\n",
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_checkpoint(
    out_dir,
    config: dict | None = None,
    *,
    dtype: str = "float32",
    shards: int = 1,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    tokenizer: str | None = "auto",
    force: bool = False,
    progress=None,
) -> pathlib.Path:
    """Write a random-weight Gemma (1) checkpoint in the hub's layout; return its folder.

    Files: ``config.json`` (``config`` with ``torch_dtype`` set to ``dtype``),
    ``generation_config.json``, ``model.safetensors`` when there is one shard, else
    ``model-0000k-of-0000N.safetensors`` and ``model.safetensors.index.json``
    (``{"metadata": {"total_size": bytes of all tensors}, "weight_map": {name: file}}``);
    each safetensors file carries metadata ``{"format": "pt"}``, which transformers requires.
    Tokenizer (``tokenizer="auto"``): the real gemma-2b one if vocab_size is 256000, else
    ``build_small_tokenizer(vocab_size)``; ``tokenizer=None`` writes none.

    Memory: one shard at a time is generated, written and released; the peak is about one
    shard in ``dtype`` plus the largest tensor in float32 (gemma-2b, bf16, 2 shards: ~2.5 GB
    + 2.1 GB). Use more shards to lower it.

    Files go to a temporary folder beside ``out_dir``, renamed into place at the end: a
    failure leaves neither a partial checkpoint nor the temporary folder. An existing
    non-empty ``out_dir`` raises FileExistsError unless ``force=True``, which replaces it
    (only once the new checkpoint is complete).
    """
    config = make_config() if config is None else json.loads(json.dumps(config))
    _validate_config(config)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if tokenizer not in ("auto", None):
        raise ValueError(f"tokenizer must be 'auto' or None, got {tokenizer!r}")
    config["torch_dtype"] = dtype
    np_dtype = DTYPES[dtype]

    shapes = tensor_shapes(config)
    names = list(shapes)
    sizes = [math.prod(shapes[n]) * np_dtype.itemsize for n in names]
    plan = _plan_shards(sizes, shards=shards, max_shard_bytes=max_shard_bytes)
    files = _shard_file_names(len(plan))
    # Resolve tokenizer sources before any heavy work: a missing shared folder fails fast.
    tokenizer_files = _tokenizer_files_for(config["vocab_size"]) if tokenizer == "auto" else {}

    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / "generation_config.json",
            {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
        weight_map: dict[str, str] = {}
        for file_name, group in zip(files, plan):
            tensors = {}
            for i in group:
                name = names[i]
                values = random_tensor(name, shapes[name], seed=seed,
                                       norm_mean=1.0 if config.get("model_type") in _GEMMA4_TYPES else 0.0)
                tensors[name] = values.astype(np_dtype, copy=False)  # round to nearest even
                del values  # the float32 draw goes now, not at the end of the shard
                weight_map[name] = file_name
                if progress is not None:  # progress(what, done, total): a tensor drawn
                    progress("drawing", len(weight_map), len(names))
            if progress is not None:
                progress(f"writing {file_name}", 0, 1)
            save_file(tensors, tmp / file_name, metadata={"format": "pt"})
            if progress is not None:
                progress(f"writing {file_name}", 1, 1)
            del tensors
        if len(files) > 1:
            _write_json(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
            )
        for file_name, source in tokenizer_files.items():
            if isinstance(source, pathlib.Path):
                shutil.copyfile(source, tmp / file_name)
            else:
                (tmp / file_name).write_text(source, encoding="utf-8")

        # mkdtemp makes the folder 0700 and safetensors writes its files 0600: give them the
        # permissions a plain mkdir / open would (0777 / 0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)

        # Swap into place: move any old folder aside, rename, then delete the old one.
        old = None
        if out.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / out.name, out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
