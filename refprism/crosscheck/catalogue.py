"""The catalogue of known Gemma mistakes, and the diagnosis that runs it at the first wrong op.

Each `Mistake` is a variant of one op (`Op`: its inputs as the replay P recorded them); at the first wrong op
every candidate is recomputed from those inputs and checked against the other side there: those that reproduce
it within the floor are the diagnosis (`diagnose`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from refprism.crosscheck.floors import (
    UNIT_ROUNDOFF,
    Profile,
    WeightsAs,
    _round,
    compared_mask,
    errors,
    pre_rope,
    profile_of,
    split_site,
    summary_errors,
)
from refprism.crosscheck.replay import _Reached, _Runs, replay_edit
from refprism.crosscheck.result import _num
from refprism.gemma import ops
from refprism.gemma.config import Config
from refprism.gemma.forward import embed_normalizer, forward
from refprism.gemma.record import Record, symbolic_shapes


@dataclass
class Op:
    """One op as the replay saw it: what a catalogued mistake recomputes the wrong way.

    record: every earlier site as it flowed in the replay (the other side's values where it has them);
    value: refprism's own op on those inputs; weights: the float64 weights.
    """

    site: str
    layer: int | None
    kind: str
    value: np.ndarray
    record: Record
    weights: WeightsAs
    cfg: Config
    tokens: np.ndarray

    @property
    def block(self) -> dict:
        return self.weights.block(self.layer)

    def at(self, kind: str):
        return self.record[f"blocks.{self.layer}.{kind}"]


@dataclass(frozen=True)
class Mistake:
    """A known way to get a Gemma op wrong, as a variant of refprism's own op.

    name:      identifier (`gelu_exact`)
    kinds:     the sites (within a layer, or embed / ln_final.out / logits) where it acts
    compute:   Op -> the value the mistaken op gives on the same inputs, or None where it does not apply
               (a Gemma 2 only mistake on Gemma 1, a sliding-window mistake on a full layer, ...)
    says:      the diagnosis in words
    rounds_to: the dtype the mistaken op rounds its output to (keys stored in float16, a norm in float32 in a
               float64 run). When that dtype is coarser than the other side's arithmetic, the evidence is exact:
               every value of the other side there must be a value of that dtype, and within a few of its
               roundings of the mistaken op (`_rounded_to`). Otherwise the mistake is judged like any other: its
               error within the local floor.
    """

    name: str
    kinds: tuple[str, ...]
    compute: Callable
    says: str
    rounds_to: str | None = None


_NORM_OF = {  # norm output -> (input, recorded scale, weight key); ln_final.out handled apart
    "ln1.out": ("resid_pre", "ln1.scale", "ln1"),
    "ln2.out": ("resid_mid", "ln2.scale", "ln2"),
    "attn.out": ("attn.o_proj", "ln1_post.scale", "ln1_post"),  # Gemma 2-4 post-norms
    "mlp.out": ("mlp.down", "ln2_post.scale", "ln2_post"),
}
# Gemma 4's further norm outputs: the MoE layer's two post-norms and its experts' input norm, the per-layer input's
# post-norm, and v_norm (no learned scale: weight None); ple.input (the per-layer inputs' norm) is handled apart
_NORM_OF_4 = {**_NORM_OF, "mlp.dense": ("mlp.down", "ln2_post1.scale", "ln2_post1"),
              "moe.out": ("moe.down", "ln2_post2.scale", "ln2_post2"),
              "ln2_moe.out": ("resid_mid", "ln2_moe.scale", "ln2_moe"),
              "ple.out": ("ple.proj", "ple_post.scale", "ple_post"),
              "attn.v": ("attn.v_pre", "attn.v_norm.scale", None)}


NORM_OUTPUTS = ("ln1.out", "ln2.out", "attn.out", "mlp.out", "ln_final.out", "attn.q", "attn.k")
NORM_OUTPUTS_4 = (*NORM_OUTPUTS, "mlp.dense", "moe.out", "ln2_moe.out", "ple.out", "attn.v")
# ple.input = (rms_norm(model_proj; ple_norm) + token) / sqrt(2) is a norm's output carried on by float64 steps:
# a norm rounded there leaves no fingerprint of its dtype in the site's values, so only norm_one_plus_w acts there


def _norm_parts(op: Op):
    """(x, recorded s, w, finish) of the norm that produces op.site; finish(y) completes the op (RoPE for Gemma
    3/4's q / k norms, the token term of Gemma 4's per-layer inputs). w None: a norm without a learned scale
    (Gemma 4's v_norm). None when the site is not a norm's output in this model."""
    cfg = op.cfg
    if op.kind == "ln_final.out":
        return (op.record[f"blocks.{cfg.n_layers - 1}.resid_post"], op.record["ln_final.scale"],
                op.weights.ln_final, lambda y: y)
    if op.kind in ("attn.q", "attn.k"):
        if not cfg.qk_norm or (op.kind == "attn.k" and not cfg.has_kv(op.layer)):
            return None
        w = op.kind[-1]
        cos, sin = _tables(op)
        return (op.at(f"attn.{w}_pre"), op.at(f"attn.{w}_norm.scale"), op.block[f"{w}_norm"],
                lambda y: ops.rope(y, cos, sin))
    if op.kind in ("attn.out", "mlp.out") and not cfg.post_norms:
        return None
    if op.kind in _NORM_OF:
        x, s, w = _NORM_OF[op.kind]
        if op.kind == "mlp.out" and cfg.moe:  # Gemma 4 MoE: the post-norm of the dense and expert branches' sum
            x = "mlp.sum"
        return op.at(x), op.at(s), op.block[w], lambda y: y
    if not cfg.gemma4:
        return None
    if op.kind == "ple.input":  # (rms_norm(model_proj; ple_norm) + token) / sqrt(2)
        token = op.record["ple.token"]
        return (op.record["ple.model_proj"], op.record["ple.model_proj_norm.scale"], op.weights.ple_norm,
                lambda y: (y + token) * 2.0 ** -0.5)
    if op.kind == "attn.v" and not cfg.has_kv(op.layer):
        return None
    x, s, w = _NORM_OF_4[op.kind]
    return op.at(x), op.at(s), None if w is None else op.block[w], lambda y: y


def _tables(op: Op, *, theta=None, scale=None, offset=0, partial=None):
    """cos, sin [T, H] of the op's layer (float64 angles), optionally with another base, scale, position offset or
    rotated fraction (Gemma 4: the layer's own head width and proportional fraction)."""
    th, sc = op.cfg.rope_of(op.layer)
    th = th if theta is None else theta
    sc = sc if scale is None else scale
    p = op.cfg.rope_partial_of(op.layer) if partial is None else partial
    T = len(op.tokens)
    return ops.rope_tables((np.arange(T) + offset) / sc, op.cfg.head_dim_of(op.layer), th, np.float64, p)


def _norm_w(op):
    parts = _norm_parts(op)
    if parts is None:
        return None
    x, s, w, finish = parts
    return finish(x / s[..., None] * w)  # Gemma trap: the scale is 1 + w, not w


def _norm_in(dt_name):
    def compute(op):
        parts = _norm_parts(op)
        if parts is None:
            return None
        x, _, w, finish = parts
        return finish(norm_rounded(x, w, op.cfg.rms_norm_eps, dt_name, offset=op.cfg.norm_offset))
    return compute


def norm_rounded(x, w, eps, dt_name, *, offset=1):
    """RMSNorm with every step in a low dtype, as torch computes it on such a tensor without upcasting:
    x^2, the mean (accumulated in float32, rounded), + eps, rsqrt, x * r, offset + w and the product, each rounded
    (Gemma 1-3: offset 1; Gemma 4: offset 0, w itself; w None: no learned scale, Gemma 4's v_norm)."""
    f = np.float32
    dt = np.float32 if dt_name == "float32" else profile_of(dt_name).rounds_to
    x = _round(np.asarray(x, dtype=f), dt)
    ms = _round(np.mean(_round(x * x, dt), axis=-1, dtype=f), dt)
    r = _round(f(1) / np.sqrt(_round(ms + f(eps), dt)), dt)
    y = _round(x * r[..., None], dt)
    if w is None:
        return y.astype(np.float64)
    w = _round(np.asarray(w, dtype=f), dt)
    scale = _round(f(1) + w, dt) if offset else w
    return _round(y * scale, dt).astype(np.float64)


def _swapped_norm_weight(op):
    """Gemma 2/3 with HF's post_attention_layernorm read as the MLP's input norm (its Gemma 1 meaning): the
    attention's post-norm gets pre_feedforward_layernorm's weight and the MLP's input norm the other."""
    if not op.cfg.post_norms or op.kind not in ("attn.out", "ln2.out"):
        return None
    x, s, _, _ = _norm_parts(op)
    other = "ln2" if op.kind == "attn.out" else "ln1_post"
    return ops.rms_apply(x, s, op.block[other], op.cfg.norm_offset)


POST_NORMED = ("attn.out", "mlp.out", "mlp.dense", "moe.out", "ple.out")  # Gemma 4: the last three too


def _post_norm_missing(op):
    """The post-norm's input as its output (Gemma 4 MoE: mlp.out's input is mlp.sum)."""
    if not op.cfg.post_norms:
        return None
    parts = _norm_parts(op)
    return None if parts is None else parts[0]


def _embed_scale_missing(op):
    """E[tokens] unscaled; Gemma 4's per-layer token embedding (ple.token) without its sqrt(P) likewise."""
    return op.weights.ple_rows(op.tokens) if op.kind == "ple.token" else op.weights.embed_rows(op.tokens)


def _with_dtype(name):
    return np.dtype(np.float32) if name == "float32" else profile_of(name).rounds_to


def _embed_rounded(dt_name):
    """embed = E[tokens] * sqrt(D) rounded to dt_name (None where that rounding is exact, e.g. D = 64)."""
    def compute(op):
        exact = math.sqrt(op.cfg.d_model)
        rounded = float(np.asarray(exact).astype(_with_dtype(dt_name)))
        return None if rounded == exact else op.weights.embed_rows(op.tokens) * rounded
    return compute


_GLU_OF = {"mlp.act": ("mlp.gate", "mlp.up"), "moe.act": ("moe.gate", "moe.up")}  # Gemma 4: the experts' too


def _glu_inputs(op):
    """(gate, up) of a GeGLU: the MLP's, Gemma 4's experts' ([T, J, G]) or its per-layer input's (ple.act = gelu(
    ple.gate) * ple.input[:, l])."""
    if op.kind == "ple.act":
        return op.at("ple.gate"), op.record["ple.input"][:, op.layer]
    gate, up = _GLU_OF[op.kind]
    return op.at(gate), op.at(up)


def _gelu_exact(op):
    gate, up = _glu_inputs(op)
    return gelu_erf(gate) * up


def gelu_erf(x):
    """The exact GELU, x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (Gemma trap: Gemma uses the tanh approximation)."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def _geglu_swapped(op):
    gate, up = _glu_inputs(op)
    return ops.gelu_tanh(up) * gate


def _rope_variant(**how):
    def compute(op):
        if how.get("applies") and not how["applies"](op):
            return None
        x = pre_rope(op.record, op.cfg, op.weights, op.layer, op.kind)
        if how.get("missing"):
            return x
        if how.get("qk_norm_missing"):
            if not op.cfg.qk_norm:
                return None
            x = op.at(f"attn.{op.kind[-1]}_pre")
        theta = how.get("theta")(op) if how.get("theta") else None
        if theta is not None and theta == op.cfg.rope_of(op.layer)[0]:
            return None  # the same base as Gemma's: not a different implementation
        scale = how.get("scale")(op) if how.get("scale") else None
        if scale is not None and scale == op.cfg.rope_of(op.layer)[1]:
            return None
        partial = how.get("partial")
        if partial is not None and partial == op.cfg.rope_partial_of(op.layer):
            return None  # Gemma 4's sliding layers rotate every pair
        cos, sin = _tables(op, theta=theta, scale=scale, offset=how.get("offset", 0), partial=partial)
        if how.get("interleaved"):
            return rope_interleaved(x, cos, sin)
        return ops.rope(x, cos, sin)
    return compute


def rope_interleaved(x, cos, sin):
    """Llama-style interleaved RoPE (Gemma trap: Gemma rotates dimension i with i + H/2, not 2i with 2i + 1).

    Math:   out[2i] = x[2i] cos_i - x[2i+1] sin_i,  out[2i+1] = x[2i+1] cos_i + x[2i] sin_i  (angle i as split-half's)
    Shapes: x [T, heads, H], cos/sin [T, H] (split-half layout: the first half holds angle i) -> [T, heads, H]
    """
    H = x.shape[-1]
    c, s = cos[:, None, : H // 2], sin[:, None, : H // 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = odd * c + even * s
    return out


def _query_scale(which):
    def compute(op):
        cfg = op.cfg
        scale = {"head_dim": cfg.d_head ** -0.5, "missing": 1.0,
                 "d_model_over_heads": (cfg.d_model / cfg.n_heads) ** -0.5}[which]
        if which != "missing" and (scale == cfg.query_pre_attn_scalar ** -0.5
                                   or (which == "d_model_over_heads" and cfg.d_model / cfg.n_heads == cfg.d_head)):
            return None
        return ops.attention_scores(op.at("attn.q"), op.at("attn.k"), scale)
    return compute


def _kv_interleaved(op):
    """Query head n reads kv head n % K (torch .repeat instead of repeat_interleave) instead of n // (N / K).
    Gemma 4: K is the layer's own (kv_heads_of), a KV-sharing consumer reads its producer's k and v."""
    cfg = op.cfg
    K = cfg.kv_heads_of(op.layer)
    if not 1 < K < cfg.n_heads:
        return None
    kv = np.arange(cfg.n_heads) % K
    src = f"blocks.{cfg.kv_source(op.layer)}."
    if op.kind == "attn.scores":
        q, k = op.at("attn.q"), op.record[src + "attn.k"]
        return np.einsum("tnh,snh->nts", q, k[:, kv]) * cfg.query_pre_attn_scalar ** -0.5
    return np.einsum("nts,snh->tnh", op.at("attn.pattern"), op.record[src + "attn.v"][:, kv])


def _pattern_variant(which):
    def compute(op):
        cfg = op.cfg
        scores = op.at("attn.scores")
        window = cfg.sliding_window if cfg.is_sliding(op.layer) else None
        cap = cfg.attn_softcap
        T = scores.shape[-1]
        if which == "softcap_missing":
            if cap is None:
                return None
            cap = None
        elif which == "window_missing":
            if window is None or window >= T:
                return None
            window = None
        elif which == "window_plus_one":
            if window is None or window >= T:
                return None
            window += 1
        elif which == "causal_missing":
            e = ops.softcap(scores, cap) if cap is not None else scores
            allowed = np.ones((T, T), bool) if window is None else np.abs(np.arange(T)[:, None] - np.arange(T)) < window
            e = np.where(allowed, e, -np.inf)
            e = np.exp(e - e.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        return ops.causal_softmax(scores, window, cap=cap)
    return compute


def _softmax_in_float32(op):
    """The pattern from float32 softmax of the (soft-capped) scores, as HF computes it in any model dtype
    (softmax(..., dtype=float32))."""
    cfg = op.cfg
    scores = op.at("attn.scores")
    e = ops.softcap(scores, cfg.attn_softcap) if cfg.attn_softcap is not None else scores
    window = cfg.sliding_window if cfg.is_sliding(op.layer) else None
    return ops.causal_softmax(e.astype(np.float32), window).astype(np.float64)


def _final_softcap_missing(op):
    if op.cfg.final_softcap is None:
        return None
    return op.record["logits_uncapped"]


def _unembed_scaled(op):
    """The logits of E * sqrt(D). With a final soft-cap (Gemma 2, 4) it acts at logits_uncapped, and the honest cap
    follows; the logits of a model without one."""
    if op.kind == "logits" and op.cfg.final_softcap is not None:
        return None
    return op.weights.unembed(op.record["ln_final.out"]) * math.sqrt(op.cfg.d_model)


def _kv_rounded(dt_name):
    dt = _with_dtype(dt_name)
    return lambda op: _round(op.value, dt)


CATALOGUE: list[Mistake] = [
    Mistake("norm_w", NORM_OUTPUTS, _norm_w,
            "a norm scales by w instead of 1 + w; Gemma's RMSNorm stores w and scales by 1 + w"),
    Mistake("norm_in_float32", NORM_OUTPUTS_4, _norm_in("float32"),
            "a norm is computed in float32 in a float64 run; the rest of the run is float64",
            rounds_to="float32"),
    Mistake("norm_in_float16", NORM_OUTPUTS_4, _norm_in("float16"),
            "a norm is computed in float16 step by step; Gemma implementations compute it in float32 and round "
            "once", rounds_to="float16"),
    Mistake("norm_weights_swapped", ("attn.out", "ln2.out"), _swapped_norm_weight,
            "the attention's post-norm and the MLP's input norm have each other's weights: HF's "
            "post_attention_layernorm is read as the MLP's input norm (its Gemma 1 meaning); in Gemma 2-4 it "
            "is the attention's output norm and pre_feedforward_layernorm is the MLP's"),
    Mistake("post_norm_missing", POST_NORMED, _post_norm_missing,
            "a sublayer's output is added to the residual without its post-norm; Gemma 2-4 normalise the "
            "attention and MLP outputs (post_attention_layernorm, post_feedforward_layernorm; Gemma 4 also the "
            "dense and expert branches of a MoE layer, post_feedforward_layernorm_1 / _2, and the per-layer "
            "input, post_per_layer_input_norm)"),
    Mistake("embed_scale_missing", ("embed", "ple.token"), _embed_scale_missing,
            "the embedding is not multiplied by sqrt(D); Gemma scales it by sqrt(hidden_size) (Gemma 4's "
            "per-layer token embedding by sqrt(hidden_size_per_layer_input))"),
    Mistake("embed_scale_in_bfloat16", ("embed",), _embed_rounded("bfloat16"),
            "sqrt(D) is rounded to bfloat16 (as a bfloat16 run does) in a run of higher precision"),
    Mistake("embed_scale_in_float16", ("embed",), _embed_rounded("float16"),
            "sqrt(D) is rounded to float16 in a run of higher precision"),
    Mistake("embed_scale_in_float32", ("embed",), _embed_rounded("float32"),
            "sqrt(D) is rounded to float32 in a float64 run (HF makes the constant a float32 tensor)"),
    Mistake("gelu_exact", ("mlp.act", "moe.act", "ple.act"), _gelu_exact,
            "the MLP uses the exact erf GELU; Gemma uses the tanh approximation"),  # (Gemma 4: experts, PLE gate too)
    Mistake("geglu_swapped", ("mlp.act", "moe.act"), _geglu_swapped,
            "the GeGLU applies gelu to up_proj instead of gate_proj: act = gelu(up) * gate; Gemma's is "
            "gelu(gate) * up"),
    Mistake("rope_interleaved", ("attn.q", "attn.k"), _rope_variant(interleaved=True),
            "RoPE rotates interleaved pairs (2i, 2i+1) as Llama's original code; Gemma rotates i with i + H/2 "
            "(split-half, HF's rotate_half)"),
    Mistake("rope_missing", ("attn.q", "attn.k"), _rope_variant(missing=True),
            "q and k are not rotated (no RoPE)"),
    Mistake("rope_base_10000", ("attn.q", "attn.k"), _rope_variant(theta=lambda op: 10_000.0),
            "RoPE uses base 10000 here; this layer's base is the config's (rope_theta, or Gemma 3's "
            "rope_local_base_freq on sliding layers; Gemma 4's per layer type)"),
    Mistake("rope_base_1000000", ("attn.q", "attn.k"), _rope_variant(theta=lambda op: 1_000_000.0),
            "RoPE uses base 1000000 (Gemma 3's global base) here; this layer's base is the config's"),
    Mistake("rope_local_base_on_global", ("attn.q", "attn.k"),
            _rope_variant(theta=lambda op: op.cfg.rope_local_theta,
                          applies=lambda op: op.cfg.qk_norm and not op.cfg.is_sliding(op.layer)),
            "a Gemma 3/4 full-attention layer uses the local RoPE base (rope_local_base_freq; Gemma 4: the "
            "sliding layers' rope_theta) of sliding layers; full layers use rope_theta"),
    Mistake("rope_global_base_on_local", ("attn.q", "attn.k"),
            _rope_variant(theta=lambda op: op.cfg.rope_theta,
                          applies=lambda op: op.cfg.qk_norm and op.cfg.is_sliding(op.layer)),
            "a Gemma 3/4 sliding layer uses the global RoPE base (rope_theta of full layers); sliding layers use "
            "rope_local_base_freq (Gemma 4: their own rope_theta)"),
    Mistake("rope_scaling_missing", ("attn.q", "attn.k"), _rope_variant(scale=lambda op: 1.0),
            "RoPE ignores the linear rope_scaling factor of full layers (Gemma 3 4B and larger; Gemma 4's "
            "proportional factor)"),
    Mistake("rope_positions_from_1", ("attn.q", "attn.k"), _rope_variant(offset=1),
            "RoPE positions start at 1 instead of 0"),
    Mistake("qk_norm_missing", ("attn.q", "attn.k"), _rope_variant(qk_norm_missing=True),
            "q and k are rotated without Gemma 3/4's q_norm / k_norm"),
    Mistake("query_scale_head_dim", ("attn.scores",), _query_scale("head_dim"),
            "the query scale is head_dim ** -0.5; this model's is query_pre_attn_scalar ** -0.5"),
    Mistake("query_scale_d_model_over_heads", ("attn.scores",), _query_scale("d_model_over_heads"),
            "the query scale is (hidden_size / num_heads) ** -0.5; this model's is query_pre_attn_scalar ** -0.5"),
    Mistake("query_scale_missing", ("attn.scores",), _query_scale("missing"),
            "q . k is not scaled; Gemma scales it by query_pre_attn_scalar ** -0.5"),
    Mistake("kv_heads_interleaved", ("attn.scores", "attn.z"), _kv_interleaved,
            "query head n reads key/value head n % K (tensor.repeat); Gemma's heads share kv heads in "
            "consecutive groups, n // (N / K) (repeat_interleave, HF's repeat_kv)"),
    Mistake("attn_softcap_missing", ("attn.pattern",), _pattern_variant("softcap_missing"),
            "the attention scores are not soft-capped; Gemma 2 caps them, cap * tanh(scores / cap)"),
    Mistake("sliding_window_missing", ("attn.pattern",), _pattern_variant("window_missing"),
            "a sliding-window layer attends to every earlier token; its window is sliding_window"),
    Mistake("sliding_window_plus_one", ("attn.pattern",), _pattern_variant("window_plus_one"),
            "the sliding window keeps one source too many (t - s <= W instead of t - s < W)"),
    Mistake("causal_mask_missing", ("attn.pattern",), _pattern_variant("causal_missing"),
            "attention sees later tokens (no causal mask)"),
    Mistake("softmax_in_float32", ("attn.pattern",), _softmax_in_float32,
            "the softmax is computed in float32 in a float64 run (HF's eager attention does so in every dtype)",
            rounds_to="float32"),
    Mistake("kv_in_float16", ("attn.k", "attn.v"), _kv_rounded("float16"),
            "keys and values are stored in float16 (a float16 KV cache)", rounds_to="float16"),
    Mistake("kv_in_bfloat16", ("attn.k", "attn.v"), _kv_rounded("bfloat16"),
            "keys and values are stored in bfloat16 (a bfloat16 KV cache)", rounds_to="bfloat16"),
    Mistake("final_softcap_missing", ("logits",), _final_softcap_missing,
            "the logits are not soft-capped; Gemma 2 and 4 cap them, cap * tanh(logits / cap)"),
    Mistake("unembed_scaled", ("logits_uncapped", "logits"), _unembed_scaled,
            "the unembedding uses the scaled embedding E * sqrt(D); Gemma's tied unembedding is E itself"),
]


# ------------------------------------------------------------------------------------------------ Gemma 4

def _norm_one_plus_w(op):
    """Gemma 4's norms with Gemma 3's (1 + w) (the trap of a port from Gemma 3); v_norm has no w to offset."""
    parts = _norm_parts(op)
    if parts is None or parts[2] is None:
        return None
    x, s, w, finish = parts
    return finish(x / s[..., None] * (1 + w))


def _v_norm_missing(op):
    return op.at("attn.v_pre") if op.cfg.has_kv(op.layer) else None


def _scale_head_dim_4(op):
    cfg = op.cfg
    k = op.record[f"blocks.{cfg.kv_source(op.layer)}.attn.k"]
    return ops.attention_scores(op.at("attn.q"), k, cfg.head_dim_of(op.layer) ** -0.5)


def _kv_producer(rule):
    """A KV-sharing consumer's scores over the keys of another producer than HF's (the last non-shared layer of
    its own type): `rule(cfg, l)` -> that layer, or None. Not applicable where it is HF's producer, or where that
    layer's keys have another shape (the two layer types' head widths or kv head counts differ)."""
    def compute(op):
        cfg, l = op.cfg, op.layer
        if cfg.has_kv(l):
            return None
        src = rule(cfg, l)
        if src is None or src == cfg.kv_source(l):
            return None
        k = op.record.get(f"blocks.{src}.attn.k")
        true_k = op.record[f"blocks.{cfg.kv_source(l)}.attn.k"]
        if k is None or k.shape != true_k.shape:
            return None
        return ops.attention_scores(op.at("attn.q"), k, cfg.query_pre_attn_scalar ** -0.5)
    return compute


def _llama_cpp_producer(cfg, l):
    """llama.cpp's rule (src/llama-model.cpp, the Gemma 3n / Gemma 4 reuse callback): the first shared layer
    minus 2 for a sliding consumer, minus 1 for a full one (right only when the last non-shared layers are
    sliding then full, as in the released layouts)."""
    first = cfg.n_layers - cfg.n_kv_shared
    return first - (2 if cfg.is_sliding(l) else 1) if first >= 2 else None


def _first_producer(cfg, l):
    """The first non-shared layer of the consumer's type (a port that keeps the first store, not the last)."""
    first = cfg.n_layers - cfg.n_kv_shared
    return next((j for j in range(first) if cfg.layer_types[j] == cfg.layer_types[l]), None)


def _layer_scalar_missing(op):
    x = op.at("resid_mlp")
    return x + op.at("ple.out") if op.cfg.ple else x


def _router_logits(*, scale=True, root_d=True, expert_input=False):
    """The router's logits (x / s_r * router_scale * D^-0.5) W_router (x = resid_mid, s_r its RMS, a norm without
    weight) with its learned scale or its D^-0.5 left out (llama.cpp: ffn_gate_inp_s, the ggml_scale by
    1 / sqrt(n_embd)), or read from the experts' own input x / s_r * w_ln2_moe (ln2_moe.out, which the forward makes
    after the router: s_r is its scale too)."""
    def compute(op):
        x = ops.rms_apply(op.at("resid_mid"), op.at("moe.router.scale"), None)
        if expert_input:
            x = x * op.block["ln2_moe"]
            x = ops.rms_apply(x, ops.rms_scale(x, eps=op.cfg.rms_norm_eps), None)
        if scale:
            x = x * op.block["router_scale"]
        if root_d:
            x = x * op.cfg.d_model ** -0.5
        return x @ op.block["W_router"]
    return compute


def _topk_weights(*, renormalise=True, per_expert=True):
    """The router's top-k weights made the wrong way, at moe.topk.weight, or at moe.down as the experts' sum they
    weight, sum_j w_j expert_out_j: llama.cpp prints no moe.topk.weight (its ffn_moe_weights_norm lacks
    per_expert_scale, which it applies to each expert's down output), so there a routing mistake first shows in
    ffn_moe_out, refprism's moe.down."""
    def compute(op):
        logits = op.at("moe.router.logits")
        prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
        prob /= prob.sum(axis=-1, keepdims=True)
        top = np.argsort(-prob, axis=-1, kind="stable")[:, : op.cfg.top_k]
        w = np.take_along_axis(prob, top, axis=-1)
        if renormalise:
            w = w / w.sum(axis=-1, keepdims=True)
        w = w * op.block["per_expert_scale"][top] if per_expert else w
        if op.kind == "moe.down":
            return np.einsum("tj,tjd->td", w, op.at("moe.expert_out"))
        return w
    return compute


def _rope_neox_partial(op):
    """The full layers rotate their first 2R dims as NeoX's partial rotary does (pairs (i, i + R), frequencies
    theta^(-2i / 2R)), instead of Gemma 4's proportional pairs (i, i + H/2) with theta^(-2i / H)."""
    cfg, l = op.cfg, op.layer
    p = cfg.rope_partial_of(l)
    if p == 1.0 or (op.kind == "attn.k" and not cfg.has_kv(l)):
        return None
    which = op.kind[-1]
    x = op.at(f"attn.{which}_pre") / op.at(f"attn.{which}_norm.scale")[..., None] * op.block[f"{which}_norm"]
    H = cfg.head_dim_of(l)
    R = int(p * H // 2)
    theta, scale = cfg.rope_of(l)
    cos, sin = ops.rope_tables(np.arange(len(op.tokens)) / scale, 2 * R, theta, np.float64)
    out = x.copy()
    out[..., : 2 * R] = ops.rope(np.ascontiguousarray(x[..., : 2 * R]), cos, sin)
    return out


GEMMA4_CATALOGUE: list[Mistake] = [
    Mistake("norm_one_plus_w", (*NORM_OUTPUTS_4, "ple.input"), _norm_one_plus_w,
            "a norm scales by 1 + w (Gemma 1-3's RMSNorm); Gemma 4's scales by w itself (its weights start at 1)"),
    Mistake("v_norm_missing", ("attn.v",), _v_norm_missing,
            "the values are not RMS-normalised; Gemma 4 normalises each value head (v_norm, no learned scale)"),
    Mistake("query_scale_head_dim_4", ("attn.scores",), _scale_head_dim_4,
            "q . k is scaled by head_dim ** -0.5; Gemma 4's attention scale is 1 (q and k are RMS-normed)"),
    Mistake("layer_scalar_missing", ("resid_post",), _layer_scalar_missing,
            "the residual stream leaving the layer is not multiplied by layer_scalar"),
    Mistake("router_scale_missing", ("moe.router.logits",), _router_logits(scale=False),
            "the router's input is not multiplied by its learned scale (router.scale; GGUF ffn_gate_inp_s)"),
    Mistake("router_root_d_missing", ("moe.router.logits",), _router_logits(root_d=False),
            "the router's input is not scaled by hidden_size ** -0.5 (HF's scalar_root_size)"),
    Mistake("router_reads_expert_input", ("moe.router.logits",), _router_logits(expert_input=True),
            "the router reads the experts' normed input (pre_feedforward_layernorm_2's output); Gemma 4's router "
            "reads the residual after attention, through its own norm without weight"),
    Mistake("per_expert_scale_dropped", ("moe.topk.weight", "moe.down"), _topk_weights(per_expert=False),
            "the router's top-k weights are not multiplied by per_expert_scale"),
    Mistake("topk_not_renormalised", ("moe.topk.weight", "moe.down"), _topk_weights(renormalise=False),
            "the top-k probabilities are not renormalised to sum 1 before per_expert_scale"),
    Mistake("kv_producer_llama_cpp_rule", ("attn.scores",), _kv_producer(_llama_cpp_producer),
            "a KV-sharing consumer attends over the keys of layer (first shared layer) - 2 if sliding, - 1 if full "
            "(llama.cpp's rule, right only when the last non-shared layers are sliding then full); HF's producer "
            "is the last non-shared layer of the consumer's own type"),
    Mistake("kv_producer_first_of_type", ("attn.scores",), _kv_producer(_first_producer),
            "a KV-sharing consumer attends over the keys of the first non-shared layer of its type; HF's producer "
            "is the last one"),
    Mistake("rope_proportional_missing", ("attn.q", "attn.k"), _rope_variant(partial=1.0),
            "a full layer rotates every pair of its head (default RoPE, theta^(-2i/H) for every i); Gemma 4's "
            "proportional RoPE rotates the first int(p H / 2) pairs only (partial_rotary_factor p), the others "
            "have frequency 0"),
    Mistake("rope_partial_contiguous", ("attn.q", "attn.k"), _rope_neox_partial,
            "a full layer rotates its first dims contiguously (NeoX's partial rotary); Gemma 4's proportional RoPE "
            "rotates dims [0, R) with [H/2, H/2 + R), frequencies theta^(-2i/H)"),
]


# Mistakes of the token ids, told apart before any activation.
TOKEN_MISTAKES = {
    "missing_bos": "the other side's tokens are ours without the leading <bos>: Gemma needs BOS first "
                   "(the tokenizer adds it; a port that drops it runs off-distribution)",
    "double_bos": "the other side's tokens are ours with a second <bos> in front: BOS was added twice "
                  "(by the tokenizer and by hand)",
}


# Which roundings can be told apart from the other side's own arithmetic: only coarser ones. A norm in float32 is a
# mistake in a float64 run (HF's RMSNorm upcasts to float32 even in a float64 model). A norm computed step by step
# in float16 is one in a float16 run: x**2 overflows float16 beyond |x| = 256, and Gemma's residual stream gets
# there (honest runs compute norms in float32). In bfloat16 the same norm differs from an honest one by about one
# bfloat16 rounding, inside the bfloat16 floor: not a mistake compare can tell apart, so it is not catalogued.
_COARSER = {"float64": ("float32", "bfloat16", "float16"), "float32": ("bfloat16", "float16"),
            "bfloat16": (), "float16": ()}


_NORM_ROUNDING = {"float64": "float32", "float16": "float16"}


# The Gemma 1-3 entries that cannot apply to Gemma 4, and why; every other entry runs on Gemma 4 too, its variant
# made right there (norms by w, the layer's own head width, RoPE geometry and kv heads, the producer's keys of a
# KV-sharing consumer, the MoE and per-layer-input sites: see each compute function).
NOT_ON_GEMMA4 = {
    "norm_w": "Gemma 4's norms do scale by w; its norm mistake is the other way round, norm_one_plus_w",
    "query_scale_head_dim": "Gemma 4 has no query_pre_attn_scalar (its scale is 1); head_dim ** -0.5 there is "
                            "query_scale_head_dim_4, with each layer type's own head width",
    "query_scale_d_model_over_heads": "a wrong query_pre_attn_scalar, which Gemma 4 does not have (its scale is 1)",
    "query_scale_missing": "Gemma 4's attention scale is 1: an unscaled q . k is the right one",
    "attn_softcap_missing": "Gemma 4 does not soft-cap its attention scores",
}


def candidates(profile: Profile, cfg: Config | None = None) -> list[Mistake]:
    """The catalogue entries that apply to this model and can be told apart at this arithmetic: on Gemma 4 every
    entry of CATALOGUE but NOT_ON_GEMMA4's, then GEMMA4_CATALOGUE."""
    pool = CATALOGUE
    if cfg is not None and cfg.gemma4:
        pool = [m for m in CATALOGUE if m.name not in NOT_ON_GEMMA4] + GEMMA4_CATALOGUE
    out = []
    for m in pool:
        if m.name.startswith("norm_in_"):
            if m.rounds_to != _NORM_ROUNDING.get(profile.dtype):
                continue
        elif m.rounds_to is not None or m.name.startswith("embed_scale_in_"):
            if m.name.rsplit("_in_", 1)[1] not in _COARSER[profile.dtype]:
                continue
        out.append(m)
    return out


def _token_diagnosis(ours, theirs, bos) -> list[dict]:
    out = []
    if ours[:1] == [bos] and theirs == ours[1:]:
        out.append({"variant": "missing_bos", "site": "tokens", "explains": True, "max_abs": 0.0, "floor": 0.0,
                    "says": TOKEN_MISTAKES["missing_bos"]})
    if theirs == [bos] + ours:
        out.append({"variant": "double_bos", "site": "tokens", "explains": True, "max_abs": 0.0, "floor": 0.0,
                    "says": TOKEN_MISTAKES["double_bos"]})
    return out


def diagnose(model, tokens, wrong: str, theirs: dict, runs: _Runs, profile: Profile, floor: float, *,
             printed=None) -> list[dict]:
    """Try every applicable catalogued mistake at the first wrong op and say which reproduce the other side.

    The op's local error covers the ops from just after the previous site the other side provides up to `wrong`
    (its *span*: everything the replay had to compute with our own arithmetic). Each mistake acts at the span's
    sites where it applies, in a replay resumed at the op's layer and stopped at `wrong` (one layer's work, not a
    forward pass), and its value there is compared with the other side's: it explains the other side when its
    error is within the same local floor (for a rounding mistake, see `Mistake.rounds_to`). Never claims a cause
    that does not reproduce.

    printed: where the other side printed only part of the site (llama.cpp's llama-debug: a `Summary` of some
    elements and the sum, so no replay is possible and there is no first wrong op, only a first divergence), the
    mistakes are tried at that site on the reference's inputs (every earlier site agreed within its floor) and
    compared with what was printed: a mistake explains the other side when the printed elements and the printed
    sum are each within their floors of the mistaken op's value (`floors.summary_errors`, the site's own floors).
    """
    cfg = model.config
    order = list(symbolic_shapes(cfg))
    i = order.index(wrong)
    start = max((j for j in range(i) if order[j] in theirs), default=-1) + 1
    span = set(order[start:i + 1])
    kinds = {split_site(n)[1] for n in span}
    w64 = runs.w64
    n64 = embed_normalizer(cfg.d_model, np.float64)
    layer = split_site(order[start])[0]
    # Before layer 0 (embed, Gemma 4's per-layer inputs ple.*) the replay runs from the start; after the last
    # layer (ln_final, logits) it resumes at the last layer
    before = start <= order.index("blocks.0.resid_pre")
    resume = None if before else (layer if layer is not None else cfg.n_layers - 1, runs.Pflow)
    mask = compared_mask(cfg, wrong, len(tokens))
    target = theirs.get(wrong)
    out = []
    for mistake in candidates(profile, cfg):
        if not kinds & set(mistake.kinds):
            continue

        def variant(name, value, record, mistake=mistake):
            l, kind = split_site(name)
            if name not in span or kind not in mistake.kinds:
                return None
            return mistake.compute(Op(name, l, kind, value, record, w64, cfg, tokens))

        kept, acted = {}, []

        def tracking(name, value, record, variant=variant, acted=acted):
            wrong_value = variant(name, value, record)
            if wrong_value is not None:
                acted.append(name)
            return wrong_value

        try:
            forward(w64, cfg, tokens, normalizer=n64, resume=resume,
                    edit=replay_edit(theirs, kept, variant=tracking, stop=wrong))
        except _Reached:
            pass
        if not acted:
            continue  # not applicable to this model or layer (e.g. a Gemma 2 mistake on Gemma 3)
        value = kept[wrong]
        if printed is not None:
            out.append(_printed_verdict(cfg, wrong, printed, value, runs, profile, mistake, acted))
            continue
        e = errors(target, value, mask)
        explains = e["max_abs"] <= floor
        evidence = None
        if mistake.rounds_to in _COARSER[profile.dtype]:
            explains, evidence = _rounded_to(mistake.rounds_to, target, value, floor, mask)
        out.append({"variant": mistake.name, "site": wrong, "acts_at": acted, "explains": bool(explains),
                    "max_abs": _num(e["max_abs"]), "floor": _num(floor), "says": mistake.says,
                    **({"evidence": evidence} if evidence else {})})
    def closeness(d):  # the error relative to its floor: the element error, or the sum's where nothing else
        if d["max_abs"] is not None:
            return d["max_abs"] / d["floor"] if d["floor"] else d["max_abs"]
        return d["sum_error"] / d["sum_floor"] if d.get("sum_floor") else math.inf

    out.sort(key=lambda d: (not d["explains"], closeness(d)))
    return out


def _printed_verdict(cfg, site, printed, value, runs: _Runs, profile: Profile, mistake, acted) -> dict:
    """A mistake's value at a printed site against what was printed: explains when the printed elements and the
    printed sum are each within their floors (those of the site itself)."""
    s = summary_errors(cfg, site, symbolic_shapes(cfg)[site], printed, value, runs.R[site], runs.F[site], profile)
    (e_abs, e_floor, _), total = s["elements"], s["sum"]
    # As for a whole site's local floor (compare._site): an op's honest rounding grows with the values it makes, so
    # where the other side printed larger values than the reference's (the mistake made them), the floors grow too.
    ref = np.asarray(runs.R[site], dtype=np.float64)
    printed_max = max((abs(v) for v in printed.elements.values()), default=0.0)
    ref_max = max((abs(float(ref[i])) for i in printed.elements), default=0.0)
    grow = max(1.0, printed_max / ref_max) if ref_max > 0 else 1.0
    e_floor = e_floor * grow
    if total is not None:
        total = (total[0], total[1] * grow, total[2])
    explains = (e_abs is None or e_abs <= e_floor) and (total is None or total[0] <= total[1])
    explains = explains and not (e_abs is None and total is None)
    d = {"variant": mistake.name, "site": site, "acts_at": acted, "explains": bool(explains),
         "max_abs": _num(e_abs), "floor": _num(e_floor), "says": mistake.says, "from": "printed"}
    if total is not None:
        d.update(sum_error=_num(total[0]), sum_floor=_num(total[1]))
    return d


def _rounded_to(dt_name, theirs, value, floor, mask):
    """Is the other side's op rounded to dt_name? Its values must all be dt_name values (a fingerprint no op of a
    finer arithmetic leaves) and each within floor + ROUNDING_ULPS units of roundoff of the mistaken op's value
    (two implementations of the same rounded op agree within a few of its roundings). -> (explains, evidence)"""
    a = np.asarray(theirs, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    if mask is not None:
        keep = np.broadcast_to(mask, a.shape)
        a, v = a[keep], v[keep]
    def all_values_of(name):
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(_with_dtype(name)).astype(np.float64) == a

    exact = all_values_of(dt_name)
    close = np.abs(a - v) <= floor + ROUNDING_ULPS * UNIT_ROUNDOFF[dt_name] * np.abs(a)
    evidence = (f"{int(exact.sum())} of {a.size} of the other side's values are {dt_name} values; "
                f"{int(close.sum())} are within {ROUNDING_ULPS} units of {dt_name} roundoff of the mistaken op")
    coarser = [c for c in ("float16", "bfloat16") if UNIT_ROUNDOFF[c] > UNIT_ROUNDOFF[dt_name] and
               all_values_of(c).all()]
    if coarser:  # bfloat16 values in float16's range are float16 values too: the coarser rounding explains them
        return False, evidence + f", but they are all {coarser[-1]} values too (a coarser rounding)"
    return bool(exact.all() and close.all()), evidence


# How many units of roundoff two implementations of one op rounded to a low dtype may differ by: the op's few
# roundings (an RMSNorm's mean, rsqrt and two products) in different orders (torch's reduction order is not
# NumPy's: their float32 means of the same squares differ by up to 2 ulps).
ROUNDING_ULPS = 8
