"""The weights as the forward pass reads them: refprism's per-head layout, in the compute dtype, converted at
load (memory="fast") or layer by layer as they are used (memory="low"), from tensors a checkpoint reader hands over
(refprism.checkpoints: safetensors, GGUF, or arrays in memory).

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

Gemma 4 (docs/gemma4.md) keeps these names, with the geometry of each layer (H_l, K_l, F_l: Config.head_dim_of,
kv_heads_of, mlp_width_of); a KV-sharing consumer has no W_K, W_V, k_norm, and a k_eq_v layer no W_V. New:

    layer_scalar [1]        layer_scalar (a buffer that multiplies the residual stream at the layer's end)
    W_ple_gate [D, P]       per_layer_input_gate.weight [P, D], transposed          (per-layer embeddings)
    W_ple_proj [P, D]       per_layer_projection.weight [D, P], transposed
    ple_post   [D]          post_per_layer_input_norm.weight
    W_router   [D, E]       router.proj.weight [E, D], transposed                   (mixture of experts)
    router_scale [D]        router.scale;  per_expert_scale [E]  router.per_expert_scale
    We_gate, We_up [E, D, I]  experts.gate_up_proj [E, 2I, D]: rows [:I] gate, [I:] up, kept as stored per expert
                            and read through a transposed view
    We_down    [E, I, D]    experts.down_proj [E, D, I], kept as stored, read through a transposed view
    ln2_moe [D]             pre_feedforward_layernorm_2.weight (the experts' input norm)
    ln2_post1, ln2_post2 [D]  post_feedforward_layernorm_1 / _2.weight (dense branch's / experts' post-norms)
  global:
    ple_embed  [Vp, L, P]   model.embed_tokens_per_layer.weight [Vp, L*P] (rows read per token, never whole)
    W_ple_model [D, L, P]   model.per_layer_model_projection.weight [L*P, D], transposed
    ple_norm   [P]          model.per_layer_projection_norm.weight
"""

from __future__ import annotations

import math
import os

import ml_dtypes
import numpy as np

from refprism.errors import CheckpointError, InputError
from refprism.gemma import ops
from refprism.gemma.config import Config

COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64}


def compute_dtype(name) -> type:
    """'float32' (default) or 'float64' (audit mode) -> the NumPy type; anything else is refused."""
    key = np.dtype(name).name if isinstance(name, type) or isinstance(name, np.dtype) else str(name)
    if key not in COMPUTE_DTYPES:
        raise InputError(f"dtype {name!r} is not supported: use float32 or float64 (audit mode)")
    return COMPUTE_DTYPES[key]


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Gemma checkpoint of this config must hold, with its HF shape, in the hub's file order."""
    if cfg.gemma4:
        return _gemma4_shapes(cfg)
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


def _gemma4_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Gemma4ForCausalLM's tensors (Gemma4TextModel under `model.`), layer by layer with each layer's geometry."""
    V, D, N, L, P = cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ple
    shapes = {"model.embed_tokens.weight": (V, D)}
    if cfg.ple:
        shapes.update({"model.embed_tokens_per_layer.weight": (cfg.vocab_ple, L * P),
                       "model.per_layer_model_projection.weight": (L * P, D),
                       "model.per_layer_projection_norm.weight": (P,)})
    for l in range(L):
        p = f"model.layers.{l}."
        H, K, F = cfg.head_dim_of(l), cfg.kv_heads_of(l), cfg.mlp_width_of(l)
        shapes.update({p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (N * H, D),
                       p + "self_attn.q_norm.weight": (H,)})
        if cfg.has_kv(l):  # a KV-sharing consumer has no k/v weights (it reads its producer's K, V)
            shapes.update({p + "self_attn.k_proj.weight": (K * H, D), p + "self_attn.k_norm.weight": (H,)})
            if not cfg.k_eq_v_at(l):
                shapes[p + "self_attn.v_proj.weight"] = (K * H, D)
        shapes.update({p + "self_attn.o_proj.weight": (D, N * H), p + "post_attention_layernorm.weight": (D,),
                       p + "pre_feedforward_layernorm.weight": (D,), p + "mlp.gate_proj.weight": (F, D),
                       p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
                       p + "post_feedforward_layernorm.weight": (D,), p + "layer_scalar": (1,)})
        if cfg.moe:
            E, I = cfg.n_experts, cfg.d_expert
            shapes.update({p + "router.proj.weight": (E, D), p + "router.scale": (D,),
                           p + "router.per_expert_scale": (E,), p + "experts.gate_up_proj": (E, 2 * I, D),
                           p + "experts.down_proj": (E, D, I), p + "pre_feedforward_layernorm_2.weight": (D,),
                           p + "post_feedforward_layernorm_1.weight": (D,),
                           p + "post_feedforward_layernorm_2.weight": (D,)})
        if cfg.ple:
            shapes.update({p + "per_layer_input_gate.weight": (P, D), p + "per_layer_projection.weight": (D, P),
                           p + "post_per_layer_input_norm.weight": (D,)})
    shapes["model.norm.weight"] = (D,)
    return shapes


# Tensors HF itself ignores when loading a Gemma 4 checkpoint: the k/v weights some released files carry for the
# KV-sharing consumer layers (Gemma4TextModel._keys_to_ignore_on_load_unexpected)
def gemma4_ignored(cfg: Config, name: str) -> bool:
    if not cfg.gemma4 or not name.startswith("model.layers."):
        return False
    parts = name.split(".")
    return (parts[2].isdigit() and int(parts[2]) < cfg.n_layers and not cfg.has_kv(int(parts[2]))
            and len(parts) > 4 and parts[3] == "self_attn" and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm"))


# A multimodal Gemma 4 checkpoint (Gemma4ForConditionalGeneration): the decoder under model.language_model., the
# towers beside it (ignored: refprism reads the text decoder)
GEMMA4_DECODER = "model.language_model."
# (Gemma 4 unified, Gemma4UnifiedForConditionalGeneration, has no towers but embedders: model.embed_vision.*,
# model.embed_audio.* and, as its files name the patch embedder, model.vision_embedder.*)
GEMMA4_TOWERS = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                 "model.vision_embedder.")


def text_decoder_names(tensors: dict) -> tuple[dict, list[str]]:
    """A multimodal Gemma 4 checkpoint's tensors renamed to Gemma4ForCausalLM's (model.language_model.X ->
    model.X), the vision / audio towers dropped -> (tensors, notes naming what was ignored). A text-only
    checkpoint comes back unchanged."""
    if not any(n.startswith(GEMMA4_DECODER) for n in tensors):
        return tensors, []
    out, towers = {}, {}
    for name, value in tensors.items():
        if name.startswith(GEMMA4_DECODER):
            out["model." + name[len(GEMMA4_DECODER):]] = value
        elif name.startswith(GEMMA4_TOWERS):
            tower = name.split(".")[1]
            towers[tower] = towers.get(tower, 0) + 1
        else:
            out[name] = value
    notes = ["multimodal checkpoint: the text decoder (model.language_model.*) is read; ignored: "
             + ", ".join(f"model.{t} ({n} tensors)" for t, n in sorted(towers.items()))] if towers else \
        ["multimodal checkpoint: the text decoder (model.language_model.*) is read"]
    return out, notes


# ---------------------------------------------------------------------------------------------------- files


def check_gemma4_tensors(cfg: Config, tensors: dict) -> None:
    """The Gemma 4 config fields a checkpoint's tensors contradict, refused in one line naming the field."""
    if not cfg.gemma4:
        return
    for l in range(cfg.n_layers):
        if cfg.has_kv(l) and cfg.k_eq_v_at(l) and f"model.layers.{l}.self_attn.v_proj.weight" in tensors:
            raise CheckpointError(f"config.json sets attention_k_eq_v (V is the K projection on full layers) but the "
                                  f"checkpoint has model.layers.{l}.self_attn.v_proj.weight")
    experts = tensors.get("model.layers.0.experts.gate_up_proj")
    if experts is not None and (not cfg.moe or experts.shape[0] != cfg.n_experts):
        raise CheckpointError(f"config.json: num_experts is {cfg.n_experts or None} (enable_moe_block "
                              f"{cfg.moe}) but the checkpoint holds {experts.shape[0]} experts a layer")
    if cfg.moe and experts is not None and experts.shape[1] != 2 * cfg.d_expert:
        raise CheckpointError(f"config.json: moe_intermediate_size is {cfg.d_expert} but the checkpoint's experts "
                              f"are {experts.shape[1] // 2} wide")


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
              "ln1_post", "ln2_post", "q_norm", "k_norm",  # the last four: Gemma 2/3/4 only
              # Gemma 4 only
              "layer_scalar", "W_ple_gate", "W_ple_proj", "ple_post", "W_router", "router_scale", "per_expert_scale",
              "We_gate", "We_up", "We_down", "ln2_moe", "ln2_post1", "ln2_post2")


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
    if cfg.gemma4:  # the small vectors of Gemma 4, converted at load with the norms
        if not cfg.has_kv(l):
            del names["k_norm"]
        names["layer_scalar"] = p + "layer_scalar"
        if cfg.ple:
            names["ple_post"] = p + "post_per_layer_input_norm.weight"
        if cfg.moe:
            names.update(router_scale=p + "router.scale", per_expert_scale=p + "router.per_expert_scale",
                         ln2_moe=p + "pre_feedforward_layernorm_2.weight",
                         ln2_post1=p + "post_feedforward_layernorm_1.weight",
                         ln2_post2=p + "post_feedforward_layernorm_2.weight")
    return names


_MATRICES = ("W_Q", "W_K", "W_V", "W_O", "W_gate", "W_up", "W_down")


def matrix_keys(cfg: Config, l: int) -> tuple[str, ...]:
    """The matrices of layer l (refprism's names): Gemma 4's consumers lack W_K, W_V, k_eq_v layers W_V."""
    if not cfg.gemma4:
        return _MATRICES
    keys = [k for k in _MATRICES if not (k in ("W_K", "W_V") and not cfg.has_kv(l))
            and not (k == "W_V" and cfg.k_eq_v_at(l))]
    if cfg.ple:
        keys += ["W_ple_gate", "W_ple_proj"]
    if cfg.moe:
        keys += ["W_router", "We_gate", "We_up", "We_down"]
    return tuple(keys)


def block_layout(cfg: Config, l: int) -> dict[str, tuple[int, ...]]:
    """Layer l's weights in refprism's layout: key -> shape (module docstring)."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.kv_heads_of(l), cfg.head_dim_of(l), cfg.mlp_width_of(l)
    shapes = {"W_Q": (D, N, H), "W_K": (D, K, H), "W_V": (D, K, H), "W_O": (N, H, D), "W_gate": (D, F),
              "W_up": (D, F), "W_down": (F, D), "q_norm": (H,), "k_norm": (H,), "layer_scalar": (1,),
              "W_ple_gate": (D, cfg.d_ple), "W_ple_proj": (cfg.d_ple, D), "W_router": (D, cfg.n_experts),
              "per_expert_scale": (cfg.n_experts,), "We_gate": (cfg.n_experts, D, cfg.d_expert),
              "We_up": (cfg.n_experts, D, cfg.d_expert), "We_down": (cfg.n_experts, cfg.d_expert, D)}
    return {k: shapes.get(k, (D,)) for k in (*norm_names(cfg, l), *matrix_keys(cfg, l))}


class Weights:
    """The weights in refprism's per-head layout (module docstring) and compute dtype.

    memory="fast": every tensor is converted once, at load (4 bytes a parameter in float32: ~10 GB for gemma-2b).
    memory="low":  tensors stay memory-mapped in their stored dtype and each layer is converted when it is used
                   (and freed after), so resident memory is about one layer plus the page cache's share.
    Both give bit-identical values (tests/test_memory.py). Norm weights (a few KB) are always converted.
    """

    def __init__(self, stored: dict, cfg: Config, dtype, memory: str = "fast", progress=None):
        """progress(what, done, total): called after the embedding and after each layer is converted (fast)."""
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
        self._ple_model = None
        if cfg.ple:  # Gemma 4 per-layer embeddings: the table's rows are read per token (E2B: 2.3 G values)
            self._ple_table = stored["model.embed_tokens_per_layer.weight"]
            self.ple_norm = self._convert("model.per_layer_projection_norm.weight")
        if memory == "fast":
            self._arena = _Arena(sum(math.prod(s) for s in hf_shapes(cfg).values()) * self.dtype.itemsize)
            # Two threads: the conversions release the GIL, so the page faults of the fresh memory (the cost of a
            # load, docs/performance.md) are taken on both cores. The values do not depend on the order.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
                embed = pool.submit(self._convert, "model.embed_tokens.weight")
                layers = [pool.submit(self._convert_block, l) for l in range(cfg.n_layers)]
                self._embed, blocks = embed.result(), []
                for done, layer in enumerate([embed, *layers], 1):  # reported in order, from this thread
                    if layer is not embed:
                        blocks.append(layer.result())
                    if progress is not None:
                        progress("converting", done, cfg.n_layers + 1)
                self._blocks = blocks
                if cfg.ple:
                    self._ple_model = self.ple_model()
            self._stored = None  # every map released: nothing of the files stays resident

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cfg: Config, dtype, memory="fast", progress=None) -> "Weights":
        """From in-memory HF-named arrays (tests build random models this way, without files)."""
        return cls(dict(arrays), cfg, dtype, memory, progress)

    @classmethod
    def from_converted(cls, cfg: Config, dtype, *, embed, ln_final, blocks) -> "Weights":
        """Weights already in refprism's layout and compute dtype (what `embedding()`, `ln_final` and `block(l)`
        return), adopted as they are: nothing is converted or copied. Read-only arrays are fine: the forward pass
        and the prisms never write to the weights (tests/test_sweeps.py checks it). The Ray backend of the sweeps
        rebuilds its models this way from zero-copy views of the object store (refprism/sweeps/ray.py).
        """
        self = cls.__new__(cls)
        self.cfg, self.dtype, self.memory = cfg, np.dtype(dtype), "fast"
        self._stored, self._checked, self._scratch, self._arena, self._pool = None, set(), {}, None, None
        V, D = cfg.vocab_size, cfg.d_model
        if cfg.ple:
            raise CheckpointError("converted weights of a model with per-layer embeddings are not supported")
        blocks = [dict(b) for b in blocks]
        given = {"embed": (embed, (V, D)), "ln_final": (ln_final, (D,))}
        if len(blocks) != cfg.n_layers:
            raise CheckpointError(f"{len(blocks)} converted blocks for a model of {cfg.n_layers} layers")
        for l, block in enumerate(blocks):
            layout = block_layout(cfg, l)
            if set(block) != set(layout):
                raise CheckpointError(f"converted block {l} has weights {sorted(block)}, expected {sorted(layout)}")
            given.update({f"blocks[{l}].{k}": (a, layout[k]) for k, a in block.items()})
        for name, (a, shape) in given.items():
            if tuple(a.shape) != shape or a.dtype != self.dtype:
                raise CheckpointError(f"converted weight {name} is {a.dtype} {list(a.shape)}, expected {self.dtype} "
                                      f"{list(shape)}")
        self.ln_final, self._embed, self._blocks = ln_final, embed, blocks
        self._norms = [{k: b[k] for k in norm_names(cfg, l)} for l, b in enumerate(blocks)]
        return self

    def _source(self, name):
        src = self._stored[name]
        return src.array() if hasattr(src, "array") else src  # a lazily read tensor (checkpoints.safetensors.Stored)

    def _convert(self, name, layout=None, reuse=False):
        """Convert one stored tensor; `layout(view)` rearranges the source into refprism's layout first.

        reuse=True writes into a buffer kept per tensor role (e.g. "W_Q") and overwritten by the next layer's
        conversion: no fresh pages to fault in at every layer (low-memory forward passes only).
        """
        src = self._source(name)
        view = src if layout is None else layout(src)
        out = None if self._arena is None else self._arena.take(view.shape, self.dtype)
        if reuse:
            # "self_attn.q_proj.weight": the same shape in every layer (Gemma 4: per layer type, reallocated when
            # the shape changes); a string names the role itself (the gate and up halves of one experts tensor)
            role = reuse if isinstance(reuse, str) else name.split(".", 3)[-1]
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
        cfg = self.cfg
        N, K, H, D = cfg.n_heads, cfg.kv_heads_of(l), cfg.head_dim_of(l), cfg.d_model
        p = f"model.layers.{l}."
        if key in self._norms[l]:
            return self._norms[l][key]
        if key not in matrix_keys(cfg, l):
            raise KeyError(f"{key} (layer {l} of this {cfg.model_type} model has no such weight)")
        if key in ("W_ple_gate", "W_ple_proj", "W_router"):  # [out, in] kept as stored, read transposed
            hf = {"W_ple_gate": "per_layer_input_gate.weight", "W_ple_proj": "per_layer_projection.weight",
                  "W_router": "router.proj.weight"}[key]
            return self._convert(p + hf, reuse=reuse).T
        # The experts as stored, per expert [out, in], read through transposed views (as W_gate below): an
        # expert's few rows stream its stored rows in ops.matmul's slices
        if key in ("We_gate", "We_up"):  # gate_up_proj [E, 2I, D]: gate rows [:I], up rows [I:] -> [E, I, D].T
            I = cfg.d_expert
            rows = slice(0, I) if key == "We_gate" else slice(I, 2 * I)
            return self._convert(p + "experts.gate_up_proj", lambda a: a[:, rows, :], reuse and key).transpose(0, 2, 1)
        if key == "We_down":  # down_proj [E, D, I] -> [E, I, D] (a transposed view)
            return self._convert(p + "experts.down_proj", reuse=reuse).transpose(0, 2, 1)
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
            matrices = self._pool.map(lambda key: self._convert_one(l, key, reuse), matrix_keys(self.cfg, l))
        else:
            matrices = (self._convert_one(l, key, reuse) for key in matrix_keys(self.cfg, l))
        return {**self._norms[l], **dict(zip(matrix_keys(self.cfg, l), matrices))}

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
            return ops.matmul(h, self._embed.T, out=ops.zeros((h.shape[0], self._embed.shape[0]), self.dtype))
        E = self._source("model.embed_tokens.weight")
        out = ops.zeros((h.shape[0], E.shape[0]), dtype=self.dtype)
        buf = self._scratch.get("unembed")
        if buf is None or buf.shape != (chunk, E.shape[1]):
            buf = self._scratch["unembed"] = np.empty((chunk, E.shape[1]), self.dtype)  # reused every call
        for i in range(0, E.shape[0], chunk):  # the default chunk is a multiple of every slice width: fast's bits
            rows = E[i:i + chunk]
            ops.matmul(h, convert(rows, self.dtype, out=buf[: len(rows)]).T, out=out[:, i:i + chunk])
        return out

    def ple_rows(self, ids) -> np.ndarray:
        """Gemma 4: E_ple[ids] as [n, L, P]: rows of model.embed_tokens_per_layer.weight [Vp, L*P] (converted per
        call, only these rows)."""
        table = self._ple_table.array() if hasattr(self._ple_table, "array") else self._ple_table
        rows = convert(table[np.asarray(ids)], self.dtype)
        return rows.reshape(len(rows), self.cfg.n_layers, self.cfg.d_ple)

    def ple_model(self) -> np.ndarray:
        """Gemma 4: W_ple_model [D, L, P], per_layer_model_projection.weight [L*P, D] transposed (low-memory mode:
        converted at each call)."""
        if self._ple_model is not None:
            return self._ple_model
        cfg = self.cfg
        return self._convert("model.per_layer_model_projection.weight",
                             lambda a: a.T.reshape(cfg.d_model, cfg.n_layers, cfg.d_ple))

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


