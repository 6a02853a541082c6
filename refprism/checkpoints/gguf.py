"""GGUF files (llama.cpp's format) -> an HF-style config, HF-named float32 arrays and a tokenizer.

    config, tensors, tokenizer = read_gguf("gemma-3-270m-q4_k_m.gguf")

Pure reading: nothing here knows the forward pass. The `gguf` package (pip install gguf, tested with 0.19.0)
parses the file and dequantizes every tensor type it supports (Q4_K, Q5_0, Q6_K, Q8_0, ..., F16, BF16, F32);
refprism hand-writes no dequantization. Architectures: `gemma` (Gemma 1), `gemma2`, `gemma3` (text only), `gemma4`
(text decoder; below and `_gemma4_config`).

Gemma 4 (convert_hf_to_gguf.py's Gemma4Model, conversion/gemma.py; src/models/gemma4.cpp): the norms are stored
as w (its norm_shift is 0: nothing is subtracted); layer_scalar is `blk.{l}.layer_output_scale.weight`, the
router `ffn_gate_inp.weight` with its scale vector `ffn_gate_inp.scale`, per_expert_scale `ffn_down_exps.scale`,
the experts `ffn_gate_up_exps.weight` (or `ffn_gate_exps` + `ffn_up_exps`, joined on read) and
`ffn_down_exps.weight`; the per-layer embeddings `per_layer_token_embd`, `per_layer_model_proj`,
`per_layer_proj_norm` and per block `inp_gate`, `proj`, `post_norm`. `rope_freqs.weight` (1 for each rotated
frequency of the full layers, 1e30 for each still one) gives the proportional RoPE's partial_rotary_factor; k/v
tensors of KV-sharing layers are dropped, as HF and llama.cpp ignore them. The tokenizer model `gemma4` is read
like `llama` (its merges rebuilt from the vocabulary; the stored merges are not read).

What llama.cpp's converter (convert_hf_to_gguf.py, GemmaModel / Gemma2Model / Gemma3Model) changed, undone here:

- Names. llama.cpp's names map back to HF's (table `_BLOCK_NAMES`). One trap: Gemma 1's MLP input norm is
  `blk.{l}.ffn_norm`, which HF calls `post_attention_layernorm`; in Gemma 2/3 `ffn_norm` is the
  `pre_feedforward_layernorm` and `post_attention_norm` is HF's `post_attention_layernorm`.
- Shapes. GGUF lists dimensions fastest-first (ggml's ne[0] = the input width); the arrays come back in HF's
  order: projections [out, in], e.g. q_proj [N*H, D], down_proj [D, F], embedding [V, D].
- The norm offset. The converter writes every tensor whose HF name ends in "norm.weight" as (1 + w), in float32
  (llama.cpp's RMSNorm multiplies by the stored weight). HF and refprism keep w and apply (1 + w) in the norm, so
  1 is subtracted on read from exactly those tensors: input/post-attention/pre-/post-feedforward norms, the
  final norm, and Gemma 3's q_norm / k_norm. w comes back as float32(1 + w) - 1: exact for the bf16 weights of
  the released models up to the float32 rounding of 1 + w (at most 2**-24 absolute).
- No Q/K permutation. The converter permutes q/k rows only for LLaMA-style interleaved RoPE; the Gemma classes
  do not (llama.cpp runs Gemma with NEOX, split-half RoPE), so q_proj / k_proj are returned as stored. Checked
  end to end by tools/check_gemma3_270m.py (HF transformers on these arrays predicts ▁Paris / ▁Tokyo).
- Vocabulary rows. For Gemma 3 the converter drops embedding rows beyond the tokenizer's pieces, so
  vocab_size is the embedding's row count (262144 for Gemma 3, not HF's padded 262208).

The config: read from the metadata keys `{arch}.block_count`, `.embedding_length`, `.feed_forward_length`,
`.context_length`, `.attention.head_count`, `.attention.head_count_kv`, `.attention.key_length`,
`.attention.layer_norm_rms_epsilon`, `.attention.sliding_window`, `.rope.freq_base`, `.rope.scaling.type` /
`.factor`, `.attn_logit_softcapping`, `.final_logit_softcapping`, and when present `.rope.freq_base_swa`,
`.attention.sliding_window_pattern`, `.attention.scale`; the token ids from `tokenizer.ggml.{bos,eos,padding}
_token_id`; vocab_size from the embedding's rows. Float32 metadata is written as the shortest decimal that
rounds to it (1e-06, not 9.99999997e-07). What the file does not store comes from the architecture's known
defaults (the values llama.cpp hard-codes for it), and the returned config lists those keys, sorted, under
"gguf_defaults":

    every architecture   hidden_activation "gelu_pytorch_tanh" (tanh GELU), tie_word_embeddings true,
                         attention_bias false, attention_dropout 0.0; when absent: bos/eos/pad 2/1/0,
                         head_count_kv = head_count
    gemma, gemma2        rope_theta 10000.0 when .rope.freq_base is absent (their converters never write it)
    gemma2               layer_types sliding, full, sliding, ... (llama.cpp's pattern 2: layer 0 slides);
                         query_pre_attn_scalar = head_dim, but hidden_size / heads for the 27B (46 layers);
                         when absent: sliding_window 4096, attn_logit_softcapping 50.0, final_logit_softcapping 30.0
    gemma3               layer_types five sliding then one full, repeated (pattern 6: layers 5, 11, 17, ... are
                         global); rope_local_base_freq 10000.0 (the sliding layers' RoPE base; .rope.freq_base is
                         the global layers' rope_theta); query_pre_attn_scalar = head_dim, but hidden_size / heads
                         for the 27B (62 layers); attn_logit_softcapping None (removed in Gemma 3);
                         final_logit_softcapping None when absent

The tokenizer: `tokenizer.ggml.model` "llama" is SentencePiece. Gemma's SentencePiece model is BPE-type, and
the file stores no merges, so they are rebuilt from the vocabulary (`tokenizer_from_vocab`): a `tokenizers` BPE
with byte fallback whose merges are every split of a normal or user-defined piece into two pieces of the
vocabulary, ranked by the merged piece's id (the order of its score: Gemma's scores fall with the id) and, for
one piece, shorter left part first. Applied to gemma-2b's vocabulary this gives exactly the 580,545 merges and
the encodings of its tokenizer.json (tests/test_gguf.py). Spaces become ▁ (no prefix space: Gemma adds none);
`<bos>` is prepended when tokenizer.ggml.add_bos_token says so; control tokens are special added tokens and
user-defined ones (newline runs, HTML tags, ...) plain added tokens, matched whole as HF does. llama.cpp stores
user-defined pieces with real spaces ("  ") where SentencePiece has ▁▁; they are spelled back with ▁.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refprism.errors import CheckpointError

ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
                 "gemma4": "gemma4_text"}  # GGUF arch -> HF model_type
_HF_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
               "gemma4": "Gemma4ForCausalLM"}

# llama.cpp's per-block tensor names -> HF's, after "blk.{l}." and "model.layers.{l}." (".weight" on both).
_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA2 = {
    **_COMMON,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAMES = {
    # Gemma 1 has no post-attention norm: its MLP input norm (llama.cpp's ffn_norm) is HF's post_attention_layernorm.
    "gemma": {**_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma2": _GEMMA2,
    "gemma3": {**_GEMMA2, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
_BLOCK_NAMES["gemma4"] = {  # convert_hf_to_gguf.py's Gemma4Model (conversion/gemma.py), gguf-py's tensor_mapping
    **_BLOCK_NAMES["gemma3"], "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1", "post_ffw_norm_2": "post_feedforward_layernorm_2",
    "ffn_gate_inp": "router.proj", "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm"}
# Gemma 4's tensors whose HF names have no ".weight" (llama.cpp suffix -> HF name after model.layers.{l}.)
_GEMMA4_OTHER = {"layer_output_scale.weight": "layer_scalar", "ffn_gate_inp.scale": "router.scale",
                 "ffn_down_exps.scale": "router.per_expert_scale", "ffn_gate_up_exps.weight": "experts.gate_up_proj",
                 "ffn_down_exps.weight": "experts.down_proj",
                 # the converter's alternative to ffn_gate_up_exps: the two halves apart (joined on read)
                 "ffn_gate_exps.weight": "experts.gate_proj", "ffn_up_exps.weight": "experts.up_proj"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",  # Gemma 4
                 "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
                 "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"}

# tokenizer.ggml.token_type values (SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_gguf(path, *, progress=None) -> tuple[dict, dict[str, np.ndarray], "tokenizers.Tokenizer"]:  # noqa: F821
    """GGUF file -> (HF-style config.json dict, tensors under HF names and HF shapes as float32 arrays, tokenizer).

    The config's "gguf_defaults" lists the keys whose values are the architecture's known defaults rather than
    read from the file (module docstring). Norm weights come back as HF stores them (w, not 1 + w). The tied
    unembedding is not repeated: there is no lm_head.weight. Anything unreadable, truncated, of another
    architecture or with missing / unexpected / mis-shaped tensors raises CheckpointError naming the file.
    progress(what, done, total) is called after each tensor is dequantized.
    """
    config, tokenizer, dequantize = open_gguf(path)
    return config, dequantize(progress), tokenizer


def open_gguf(path):
    """read_gguf in two steps: (config dict, tokenizer, dequantize) now, every check that needs no tensor data
    done; `dequantize(progress)` then returns the tensors (and releases the file)."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path.name} holds a {arch!r} model; refprism reads the GGUF architectures "
                              f"{', '.join(ARCHITECTURES)} (Gemma 1, 2, 3 and 4)")
    stored = {t.name: t for t in reader.tensors}
    rope_freqs = stored.pop("rope_freqs.weight", None) if arch == "gemma4" else None
    tensors = {_hf_name(name, arch, path): t for name, t in stored.items() if name != "output.weight"}
    shapes = {name: _hf_shape(t) for name, t in tensors.items()}
    if rope_freqs is not None:
        shapes["rope_freqs"] = _dequantize(rope_freqs, path)  # values, not a shape: the rotated dims
    config = config_from_metadata(meta, shapes, path)
    if arch == "gemma4":  # the experts' halves are joined (in shape here, in value below), then checked as HF's
        tensors = _gemma4_tensors(tensors, config)
        joined = _gemma4_experts({name: _hf_shape(t) for name, t in tensors.items()}, join=_join_shapes)
        _check_names_and_shapes(joined, config, path, shape=lambda s: s)
    else:
        _check_names_and_shapes(tensors, config, path)
    tokenizer = tokenizer_from_metadata(meta, config["vocab_size"], path)

    def dequantize(progress=None) -> dict[str, np.ndarray]:
        nonlocal reader, stored, tensors
        total = len(tensors) + ("output.weight" in stored)
        arrays = {}
        for name, t in tensors.items():
            arrays[name] = _dequantize(t, path)
            if progress is not None:
                progress("dequantizing", len(arrays), total)
        if "output.weight" in stored:  # Gemma ties the unembedding to the embedding: a separate one must equal it
            out = _dequantize(stored["output.weight"], path)
            if not np.array_equal(out, arrays["model.embed_tokens.weight"]):
                raise CheckpointError(f"{path.name} has an output.weight that differs from token_embd.weight; "
                                      "Gemma ties them")
            if progress is not None:
                progress("dequantizing", total, total)
        for name, a in arrays.items():
            if name.endswith("norm.weight") and arch != "gemma4":
                # The (1 + w) trap: llama.cpp's converter stored 1 + w; HF and refprism keep w. (Gemma 4's norms
                # scale by w itself: its converter's norm_shift is 0, and w is stored as it is.)
                a -= np.float32(1)
        if arch == "gemma4":
            arrays = _gemma4_experts(arrays)
        reader = stored = tensors = None  # releases the file's memory map: every array above is a copy
        return arrays

    return config, tokenizer, dequantize


# ---------------------------------------------------------------------------------------------------- file


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading .gguf files needs the gguf package: pip install gguf") from None
    return gguf


def _open(path: Path):
    """gguf.GGUFReader over the file; whatever it raises becomes one CheckpointError naming the file."""
    gguf = _gguf()
    if not path.is_file():
        raise CheckpointError(f"no GGUF file {path}" if not path.exists() else f"{path} is not a file")
    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # the gguf package raises ValueError, KeyError, IndexError, ... on malformed files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _metadata(reader, path: Path) -> dict:
    """Every metadata key -> its Python value (str, int, float, bool or list)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:  # a malformed value: report which key
            raise CheckpointError(f"{path.name}: metadata {key} cannot be read ({type(e).__name__})") from None
    return out


def _hf_name(name: str, arch: str, path: Path) -> str:
    if name in _GLOBAL_NAMES and (arch == "gemma4" or not name.startswith("per_layer")):
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if arch == "gemma4" and len(parts) == 4 and parts[0] == "blk" and parts[1].isdecimal():
        other = _GEMMA4_OTHER.get(f"{parts[2]}.{parts[3]}")
        if other is not None:
            return f"model.layers.{int(parts[1])}.{other}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdecimal() and parts[3] == "weight":
        hf = _BLOCK_NAMES[arch].get(parts[2])
        if hf is not None:
            return f"model.layers.{int(parts[1])}.{hf}.weight"
    raise CheckpointError(f"{path.name} has tensor {name}, which a {arch} model does not have")


def _gemma4_tensors(tensors: dict, config: dict) -> dict:
    """Gemma 4: the k/v tensors a file may carry for KV-sharing layers are dropped (HF and llama.cpp ignore them)."""
    from refprism.gemma.config import Config
    from refprism.gemma.weights import gemma4_ignored

    cfg = Config.from_hf({k: v for k, v in config.items() if k != "gguf_defaults"})
    return {n: t for n, t in tensors.items() if not gemma4_ignored(cfg, n)} | {
        n: t for n, t in tensors.items() if n.endswith(("experts.gate_proj", "experts.up_proj"))}


def _gemma4_experts(arrays: dict, join=lambda a, b: np.concatenate([a, b], 1)) -> dict:
    """ffn_gate_exps + ffn_up_exps (each [E, I, D]) -> HF's experts.gate_up_proj [E, 2I, D] (gate rows first).
    `join` joins two values (arrays; _join_shapes for their shapes only, before anything is dequantized)."""
    for name in [n for n in arrays if n.endswith("experts.gate_proj")]:
        up = name.replace("gate_proj", "up_proj")
        arrays[name.replace("gate_proj", "gate_up_proj")] = join(arrays.pop(name), arrays.pop(up))
    return arrays


def _join_shapes(a: tuple, b: tuple) -> tuple:
    """The shape np.concatenate([x, y], 1) would have (mismatched halves are refused by the shape check)."""
    return (a[0], a[1] + b[1], *a[2:]) if len(a) == len(b) == 3 and a[::2] == b[::2] else a + b


def _hf_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists ne[0] (the fastest axis) first


def _dequantize(t, path: Path) -> np.ndarray:
    """The tensor as a new float32 array in HF's shape, checked finite."""
    gguf = _gguf()
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:  # NotImplementedError for types gguf cannot dequantize; ValueError for short data
        raise CheckpointError(f"{path.name}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized: "
                              f"{type(e).__name__}: {str(e)[:200]}") from None
    a = np.array(a, dtype=np.float32, copy=True).reshape(_hf_shape(t))
    if not np.isfinite(a).all():
        raise CheckpointError(f"{path.name}: tensor {t.name} contains NaN or inf values: the file is corrupt")
    return a


# ---------------------------------------------------------------------------------------------------- config


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def config_from_metadata(meta: dict, shapes: dict[str, tuple[int, ...]], path: Path | str = "GGUF") -> dict:
    """GGUF metadata (+ the tensors' HF shapes, for vocab_size and a missing head width) -> HF config.json dict.

    Keys the file does not hold take the architecture's known defaults (module docstring) and are listed,
    sorted, under "gguf_defaults".
    """
    name = Path(path).name
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{name} holds a {arch!r} model; refprism reads the GGUF architectures "
                              f"{', '.join(ARCHITECTURES)} (Gemma 1, 2, 3 and 4)")
    defaults: list[str] = []

    def need(key, kind=int):
        full = f"{arch}.{key}"
        if full not in meta:
            raise CheckpointError(f"{name} lacks the metadata key {full}")
        return _value(meta[full], kind, full, name)

    def get(key, hf_key, default, kind=int):
        full = f"{arch}.{key}"
        if full in meta:
            return _value(meta[full], kind, full, name)
        defaults.append(hf_key)
        return default

    def token_id(key, hf_key, default):
        full = f"tokenizer.ggml.{key}"
        if full in meta:
            return _value(meta[full], int, full, name)
        defaults.append(hf_key)
        return default

    if "model.embed_tokens.weight" not in shapes:
        raise CheckpointError(f"{name} has no token_embd.weight tensor")
    n_layers = need("block_count")
    d_model = need("embedding_length")
    n_heads = need("attention.head_count")
    q_rows = shapes.get("model.layers.0.self_attn.q_proj.weight", (0,))[0]
    # A missing key_length: the head width from q_proj's rows (N*H), never hidden_size / heads (gemma-7b: 256 != 192).
    d_head = get("attention.key_length", "head_dim", q_rows // n_heads if n_heads else 0)
    if "head_dim" in defaults:
        defaults.remove("head_dim")  # read from the tensor shapes, which are part of the file
    config = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(shapes["model.embed_tokens.weight"][0]),
        "hidden_size": d_model,
        "intermediate_size": need("feed_forward_length") if arch != "gemma4" else None,  # Gemma 4: per layer
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", "num_key_value_heads", n_heads)
        if arch != "gemma4" else None,
        "head_dim": d_head,
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon", float),
        "rope_theta": get("rope.freq_base", "rope_theta", 10000.0, float),
        "rope_scaling": _rope_scaling(meta, arch, name),
        "bos_token_id": token_id("bos_token_id", "bos_token_id", 2),
        "eos_token_id": token_id("eos_token_id", "eos_token_id", 1),
        "pad_token_id": token_id("padding_token_id", "pad_token_id", 0),
    }
    known = {"hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "attention_bias": False,
             "attention_dropout": 0.0}
    if arch == "gemma2":
        config["sliding_window"] = get("attention.sliding_window", "sliding_window", 4096)
        config["attn_logit_softcapping"] = get("attn_logit_softcapping", "attn_logit_softcapping", 50.0, float)
        config["final_logit_softcapping"] = get("final_logit_softcapping", "final_logit_softcapping", 30.0, float)
        config["query_pre_attn_scalar"] = _query_pre_attn_scalar(  # the 27B (46 layers): 4608 / 32 = 144
            meta, arch, d_model // n_heads if n_layers == 46 else d_head, defaults, name)
        config["layer_types"] = _layer_types(meta, arch, n_layers, 2, defaults, name)
    elif arch == "gemma3":
        config["sliding_window"] = need("attention.sliding_window")
        config["final_logit_softcapping"] = get("final_logit_softcapping", "final_logit_softcapping", None, float)
        known["attn_logit_softcapping"] = None  # removed in Gemma 3
        config["query_pre_attn_scalar"] = _query_pre_attn_scalar(  # the 27B (62 layers): 5376 / 32 = 168
            meta, arch, d_model // n_heads if n_layers == 62 else d_head, defaults, name)
        # The sliding layers' RoPE base; .rope.freq_base is the global (full-attention) layers' rope_theta.
        config["rope_local_base_freq"] = get("rope.freq_base_swa", "rope_local_base_freq", 10000.0, float)
        config["layer_types"] = _layer_types(meta, arch, n_layers, 6, defaults, name)
    elif arch == "gemma4":
        _gemma4_config(meta, shapes, config, defaults, known, name)
    config.update(known)
    config["gguf_defaults"] = sorted(set(defaults) | set(known))
    return config


def get_optional(meta: dict, key: str, name: str):
    """A float metadata key's value, or None when the file lacks it."""
    return _value(meta[key], float, key, name) if key in meta else None


def _per_layer(meta: dict, key: str, n_layers: int, name: str) -> list[int] | None:
    """An integer metadata key that may be one value or one per layer -> per-layer list (None when absent)."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) != n_layers:
            raise CheckpointError(f"{name}: {key} has {len(value)} entries for {n_layers} layers")
        return [_value(v, int, key, name) for v in value]
    return [_value(value, int, key, name)] * n_layers


def _gemma4_config(meta: dict, shapes: dict, config: dict, defaults: list, known: dict, name: str) -> None:
    """Gemma 4's fields from what convert_hf_to_gguf.py's Gemma4Model writes (conversion/gemma.py) and what
    src/models/gemma4.cpp reads: key_length = the full layers' head width, key_length_swa the sliding ones';
    head_count_kv and feed_forward_length per layer (arrays) when they differ by layer; sliding_window_pattern one
    bool per layer; shared_kv_layers; embedding_length_per_layer_input; expert_count / expert_used_count /
    expert_feed_forward_length; rope.freq_base (full) and rope.freq_base_swa (sliding); the full layers'
    proportional RoPE as the rope_freqs tensor (1 for a rotated frequency, 1e30 for a still one). k_eq_v is not
    metadata: the full layers have no attn_v."""
    arch = "gemma4"
    L = config["num_hidden_layers"]
    full_h = config["head_dim"]
    swa_key = f"{arch}.attention.key_length_swa"
    if swa_key not in meta:
        raise CheckpointError(f"{name} lacks the metadata key {swa_key}")
    config["head_dim"] = _value(meta[swa_key], int, swa_key, name)
    config["global_head_dim"] = full_h
    types = _layer_types(meta, arch, L, 6, defaults, name)
    config["layer_types"] = types
    kv = _per_layer(meta, f"{arch}.attention.head_count_kv", L, name) or [config["num_attention_heads"]] * L
    sliding_kv = {k for k, t in zip(kv, types) if t == "sliding_attention"}
    full_kv = {k for k, t in zip(kv, types) if t == "full_attention"}
    if len(sliding_kv) > 1 or len(full_kv) > 1:
        raise CheckpointError(f"{name}: {arch}.attention.head_count_kv differs within a layer type")
    config["num_key_value_heads"] = next(iter(sliding_kv or full_kv))
    shared = meta.get(f"{arch}.attention.shared_kv_layers", 0)
    shared = _value(shared, int, "shared_kv_layers", name)
    config["num_kv_shared_layers"] = shared
    producers = [l for l in range(L - shared) if types[l] == "full_attention"]
    k_eq_v = bool(producers) and all(f"model.layers.{l}.self_attn.v_proj.weight" not in shapes for l in producers)
    config["attention_k_eq_v"] = k_eq_v
    if full_kv and next(iter(full_kv)) != config["num_key_value_heads"]:
        if not k_eq_v:
            raise CheckpointError(f"{name}: the full layers have their own head_count_kv but a v_proj (attn_v): "
                                  "HF's Gemma4TextConfig applies num_global_key_value_heads only with k_eq_v")
        config["num_global_key_value_heads"] = next(iter(full_kv))
    ff = _per_layer(meta, f"{arch}.feed_forward_length", L, name)
    base = min(ff)
    double = [l for l in range(L) if ff[l] != base]
    if any(ff[l] != 2 * base for l in double) or (double and double != list(range(L - shared, L))):
        raise CheckpointError(f"{name}: {arch}.feed_forward_length {ff} is neither one width nor Gemma 4's "
                              "double-wide MLP on the KV-sharing layers")
    config["intermediate_size"] = base
    config["use_double_wide_mlp"] = bool(double)
    ple = _value(meta.get(f"{arch}.embedding_length_per_layer_input", 0), int, "embedding_length_per_layer_input",
                 name)
    config["hidden_size_per_layer_input"] = ple
    if ple:
        config["vocab_size_per_layer_input"] = int(shapes["model.embed_tokens_per_layer.weight"][0])
    experts = meta.get(f"{arch}.expert_count", 0)
    moe = bool(experts) and "model.layers.0.router.proj.weight" in shapes
    config["enable_moe_block"] = moe
    if moe:
        config["num_experts"] = _value(experts, int, "expert_count", name)
        config["top_k_experts"] = _value(meta.get(f"{arch}.expert_used_count"), int, "expert_used_count", name)
        config["moe_intermediate_size"] = _value(meta.get(f"{arch}.expert_feed_forward_length"), int,
                                                 "expert_feed_forward_length", name)
    config["sliding_window"] = _value(meta.get(f"{arch}.attention.sliding_window"), int, "sliding_window", name)
    config["final_logit_softcapping"] = get_optional(meta, f"{arch}.final_logit_softcapping", name)
    if config["final_logit_softcapping"] is None:
        defaults.append("final_logit_softcapping")
    freqs = shapes.get("rope_freqs")
    if freqs is None:
        defaults.append("partial_rotary_factor")
        partial = 0.25
    else:
        rotated = int(np.sum(freqs == 1.0))
        if freqs.shape != (full_h // 2,) or not (np.all(freqs[:rotated] == 1.0) and np.all(freqs[rotated:] >= 1e29)):
            raise CheckpointError(f"{name}: rope_freqs is not Gemma 4's proportional RoPE ({full_h // 2} factors: "
                                  "1 for the rotated frequencies, then 1e30)")
        partial = 2 * rotated / full_h
    theta = config.pop("rope_theta")
    local = meta.get(f"{arch}.rope.freq_base_swa")
    if local is None:
        defaults.append("rope_local_base_freq")
    config["rope_parameters"] = {
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial, "rope_theta": theta},
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": 10000.0 if local is None else _value(local, float, "freq_base_swa", name)}}
    if config.pop("rope_scaling", None) is not None:
        raise CheckpointError(f"{name}: rope scaling on a Gemma 4 file is not supported")


def _value(v, kind, key: str, name: str):
    if kind is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
        raise CheckpointError(f"{name}: metadata {key} must be an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))):
        raise CheckpointError(f"{name}: metadata {key} must be a number, got {v!r}")
    return int(v) if kind is int else _f32(v)


def _layer_types(meta: dict, arch: str, n_layers: int, period: int, defaults: list, name: str) -> list[str]:
    """Per layer "sliding_attention" or "full_attention", as llama.cpp decides it.

    {arch}.attention.sliding_window_pattern, when the file has it: an integer n (layer l slides unless
    l % n == n - 1) or one bool per layer (true: sliding). Otherwise the architecture's period: Gemma 2 n = 2
    (layer 0 slides), Gemma 3 n = 6 (layers 5, 11, 17, ... are global).
    """
    key = f"{arch}.attention.sliding_window_pattern"
    value = meta.get(key)
    if isinstance(value, list):
        if len(value) != n_layers:
            raise CheckpointError(f"{name}: {key} has {len(value)} entries for {n_layers} layers")
        sliding = [bool(v) for v in value]
    else:
        if value is None:
            defaults.append("layer_types")
            n = period
        else:
            n = _value(value, int, key, name)
        sliding = [n == 0 or l % n < n - 1 for l in range(n_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _query_pre_attn_scalar(meta: dict, arch: str, default: int, defaults: list, name: str):
    """{arch}.attention.scale (the query scale s) as HF's query_pre_attn_scalar 1 / s**2, else the default."""
    key = f"{arch}.attention.scale"
    if key not in meta:
        defaults.append("query_pre_attn_scalar")
        return default
    scale = _value(meta[key], float, key, name)
    if not scale > 0:
        raise CheckpointError(f"{name}: {key} must be positive, got {scale!r}")
    scalar = 1.0 / scale**2
    return round(scalar) if abs(scalar - round(scalar)) < 1e-3 * scalar else scalar


def _rope_scaling(meta: dict, arch: str, name: str):
    """{arch}.rope.scaling.type / .factor -> HF's rope_scaling (Gemma 3 4B-27B: linear, factor 8, global layers)."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise CheckpointError(f"{name}: rope scaling {kind!r} is not supported (Gemma uses none or linear)")
    return {"rope_type": "linear", "factor": _value(meta.get(f"{arch}.rope.scaling.factor"), float,
                                                    f"{arch}.rope.scaling.factor", name)}


def hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config holds (the tied lm_head aside), with its HF shape: the
    safetensors loader's own list (refprism.gemma.weights.hf_shapes), so GGUF and safetensors cannot disagree."""
    from refprism.gemma.config import Config
    from refprism.gemma.weights import hf_shapes as shapes_of

    return shapes_of(Config.from_hf({k: v for k, v in config.items() if k != "gguf_defaults"}))


def _check_names_and_shapes(tensors: dict, config: dict, path: Path, shape=None) -> None:
    shape = shape or _hf_shape
    expected = hf_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{path.name} is missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise CheckpointError(f"{path.name} has unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    for name, want in expected.items():
        if tuple(shape(tensors[name])) != want:
            raise CheckpointError(f"{path.name}: tensor {getattr(tensors[name], 'name', name)} has HF shape "
                                  f"{list(shape(tensors[name]))}, the "
                                  f"metadata implies {list(want)}")


# ---------------------------------------------------------------------------------------------------- tokenizer


def tokenizer_from_metadata(meta: dict, vocab_size: int, path: Path | str = "GGUF"):
    """The tokenizer.ggml.* metadata -> a `tokenizers.Tokenizer` (module docstring)."""
    name = Path(path).name
    model = meta.get("tokenizer.ggml.model")
    if model not in ("llama", "gemma4"):
        raise CheckpointError(f"{name}: tokenizer.ggml.model is {model!r}; refprism reads Gemma's SentencePiece "
                              "vocabulary ('llama'; Gemma 4's converter writes 'gemma4')")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not isinstance(types, list) or len(tokens) != len(types) or not tokens:
        raise CheckpointError(f"{name}: tokenizer.ggml.tokens / token_type are missing or of different lengths")
    if len(tokens) > vocab_size:
        raise CheckpointError(f"{name}: the vocabulary has {len(tokens)} pieces but the embedding only "
                              f"{vocab_size} rows")
    bos = meta.get("tokenizer.ggml.bos_token_id", 2)
    unk = meta.get("tokenizer.ggml.unknown_token_id", 3)
    for key, i in (("bos", bos), ("unknown", unk)):
        if not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise CheckpointError(f"{name}: tokenizer.ggml.{key}_token_id {i!r} is not a vocabulary id")
    # Absent flags take Gemma's behaviour: BOS prepended, no prefix space (llama.cpp's own default for a
    # SentencePiece vocabulary adds one, which early Gemma GGUFs without the flag got wrong).
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    return tokenizer_from_vocab(tokens, types, bos_id=bos if add_bos else None, unk_id=unk,
                                add_space_prefix=add_space_prefix)


def tokenizer_from_vocab(tokens: list[str], types: list[int], *, bos_id: int | None, unk_id: int,
                         add_space_prefix: bool = False):
    """A SentencePiece BPE vocabulary (pieces in id order, their types) -> `tokenizers.Tokenizer`.

    Merges: for every normal or user-defined piece, in id order (SentencePiece merges by score, and Gemma's
    scores fall with the id), each split into two pieces of the vocabulary, shorter left part first.
    bos_id: prepended to every encoding (None: nothing is).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    mergeable = (NORMAL, USER_DEFINED)
    pieces = list(tokens)
    seen = set(pieces)
    for i, t in enumerate(pieces):
        # llama.cpp writes user-defined pieces with real spaces ("  "); the normalizer below turns every space
        # into ▁ before the model sees it, so those pieces are spelled back with ▁ (unless that name is taken).
        if types[i] in mergeable and " " in t and t.replace(" ", "\u2581") not in seen:
            pieces[i] = t.replace(" ", "\u2581")
            seen.add(pieces[i])
    vocab: dict[str, int] = {}
    for i, t in enumerate(pieces):
        vocab.setdefault(t, i)
    can_merge = {t for t, i in vocab.items() if types[i] in mergeable}
    merges = []
    for t, i in vocab.items():  # dicts keep insertion order: id order
        if types[i] not in mergeable:
            continue
        merges.extend((t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in can_merge and t[k:] in can_merge)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id], fuse_unk=True,
                               byte_fallback=True))
    # Gemma: every space is ▁ and no ▁ is prepended to the text.
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_space_prefix else replace
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                            for i in range(len(pieces)) if types[i] in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(pieces[i], normalized=False, special=False)
                    for i in range(len(pieces)) if types[i] == USER_DEFINED])
    if bos_id is not None:
        b = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, bos_id)])
    return tok
