"""ggml's CPU arithmetic, as llama.cpp computes: the input rows of each product quantized to the weight's
vec_dot type, the f16 GELU table, ggml's RoPE angles, and the forward edit that applies them (`ggml_edit`).
The floors of a llama.cpp comparison are made from these (crosscheck.floors, crosscheck.replay).

Each rule is read from the llama.cpp vendored in llama-cpp-python 0.3.36 (LLAMA_CPP_PYTHON in
refprism/crosscheck/sides/llamacpp.py), the build refprism checks; paths are under its vendor/llama.cpp/ggml/src/.
"""

from __future__ import annotations

import numpy as np

from refprism.crosscheck.capture import ROW_TYPES, GgmlArithmetic
from refprism.crosscheck.floors import _round, pre_rope, profile_of, split_site
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.config import Config


def quantize_rows(x, kind: str):
    """x's rows as ggml-cpu converts a matmul's input for a weight of some type, as float32 values again.

    Q8_0  blocks of 32 along the last axis (ggml-cpu/arch/x86/quants.c quantize_row_q8_0, AVX2; the reference
          ggml-quants.c quantize_row_q8_0_ref rounds the same but half away from zero):
              d = amax / 127 stored as f16,  q = round_half_even(x * (127 / amax)),  x ~ q * f16(d)
    Q8_K  blocks of 256 (ggml-quants.c quantize_row_q8_K_ref; arch/x86/repack.cpp ggml_quantize_mat_q8_K_4x8 for
          the repacked Q4_K weights computes the same):
              s = -127 / max (max: the element of largest |x|),  q = nearest_int(x * s) (half to even),
              d = 1 / s as float32,  x ~ q * d      (the sign of s cancels in q * d: computed with |s|)
    F16, BF16  each value rounded to it (round to nearest even: F16C's vcvtps2ph, GGML_FP32_TO_BF16).
    A block of zeros stays zeros. Every step is float32, as in ggml.
    Shapes: x [..., K] (K a multiple of the block) -> [..., K] float32
    """
    f = np.float32
    x = np.asarray(x, dtype=f)
    if kind == "F16":
        return _round(x, np.dtype(np.float16))
    if kind == "BF16":
        return _round(x, profile_of("bfloat16").rounds_to)
    size = {"Q8_0": 32, "Q8_K": 256}.get(kind)
    if size is None:
        raise InputError(f"no floor for llama.cpp converting a matmul's input to {kind}: refprism emulates "
                         f"{', '.join(ROW_TYPES)}")
    K = x.shape[-1]
    if K % size:
        raise InputError(f"{kind} converts rows in blocks of {size}; this row has {K} values")
    b = x.reshape(*x.shape[:-1], K // size, size)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    nonzero = amax > 0
    inv = np.where(nonzero, f(127) / np.where(nonzero, amax, f(1)), f(0))  # 127 / amax (|s| for Q8_K)
    if kind == "Q8_0":
        d = (amax / f(127)).astype(np.float16).astype(f)  # the block's scale, stored as f16
    else:
        d = np.where(nonzero, f(1) / np.where(nonzero, inv, f(1)), f(0))  # 1 / s, float32
    q = np.rint(b * inv)  # round half to even (_mm256_round_ps(.., _MM_ROUND_NEAREST); nearest_int)
    return (q * d).reshape(x.shape)


GELU_TABLE_RANGE = 10.0  # ggml_vec_gelu_f32 / ggml_vec_geglu_f32: x <= -10 gives 0, x >= 10 gives x, else the table


def gelu_f16_table(x):
    """GELU as ggml-cpu computes it on float32 (ggml-cpu/vec.h, GGML_GELU_FP16: ggml_vec_geglu_f32), a table of
    the 65536 f16 values: table[f16(x)] = f16(ggml_gelu_f32(f16(x))), ggml_gelu_f32 the tanh GELU in float32.

    Math:   gelu(x) = 0 (x <= -10), x (x >= 10), else f16(0.5 h (1 + tanh(sqrt(2/pi) h (1 + 0.044715 h h)))),
            h = f16(x), every step in float32 in that order (vec.h ggml_gelu_f32; the table: ggml-cpu.c,
            ggml_cpu_init)
    Shapes: any -> same, float32
    """
    f = np.float32
    x = np.asarray(x, dtype=f)
    h = x.astype(np.float16).astype(f)
    c, a = f(0.79788456080286535587989211986876), f(0.044715)  # SQRT_2_OVER_PI, GELU_COEF_A
    table = (f(0.5) * h * (f(1) + np.tanh(c * h * (f(1) + a * h * h)))).astype(np.float16).astype(f)
    return np.where(x <= -GELU_TABLE_RANGE, f(0), np.where(x >= GELU_TABLE_RANGE, x, table))


def rope_tables_ggml(positions, d_head, theta, scale=1.0, partial=1.0):
    """cos, sin as llama.cpp's CPU RoPE builds them (ggml-cpu/ops.cpp ggml_rope_cache_init, rope_yarn without YaRN):
    theta_scale = powf(base, -2 / H); the angle of pair i is p * theta_scale**i by repeated float32 products
    (angle_0 = p, angle_i = angle_{i-1} * theta_scale), times freq_scale = 1 / scale; then cosf, sinf.

    Gemma 4's proportional RoPE (partial < 1, full layers): llama.cpp rotates all H dims (n_rot = H) with the
    GGUF's rope_freqs factors, 1 on the int(partial H / 2) rotated pairs and 1e30 on the still ones; the angle
    is angle_i / factor_i (float32), so a still pair turns by ~1e-29 rad: cos 1, sin ~0 (refprism: frequency 0).

    Shapes: positions [T] -> cos, sin [T, H] float32 (split-half layout, as `ops.rope` takes them)
    """
    f = np.float32
    theta_scale = np.power(f(theta), f(-2.0) / f(d_head))
    angles = np.empty((len(positions), d_head // 2), dtype=f)
    a = np.asarray(positions, dtype=f)
    rotated = int(partial * d_head // 2)
    for i in range(d_head // 2):
        angles[:, i] = a if partial == 1.0 or i < rotated else a / f(1e30)  # ggml: theta / freq_factors[i]
        a = a * theta_scale
    if scale != 1.0:
        angles = f(1.0 / scale) * angles  # theta_interp = freq_scale * theta_extrap
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


# the GEGLUs ggml computes through its f16 GELU table: act site -> (gate site, up site); ple.act's "up" is
# the layer's slice of ple.input
_GEGLU = {"mlp.act": ("mlp.gate", "mlp.up"), "moe.act": ("moe.gate", "moe.up"), "ple.act": ("ple.gate", None)}


# refprism weight -> (the site its product makes, the site its input rows come from); Gemma 1 has no o_proj / down
# sites: its attention and MLP outputs are attn.out and mlp.out.
def _products(cfg: Config) -> dict[str, tuple[str, str]]:
    return {"W_Q": ("attn.q_pre", "ln1.out"), "W_K": ("attn.k_pre", "ln1.out"), "W_V": ("attn.v", "ln1.out"),
            "W_O": ("attn.o_proj" if cfg.post_norms else "attn.out", "attn.z"),
            "W_gate": ("mlp.gate", "ln2.out"), "W_up": ("mlp.up", "ln2.out"),
            "W_down": ("mlp.down" if cfg.post_norms else "mlp.out", "mlp.act")}


def ggml_edit(arith: GgmlArithmetic, weights, cfg: Config, T: int):
    """The edit that makes refprism's float32 pass compute as llama.cpp's CPU backend computes (`GgmlArithmetic`).

    At each product with a weight that ggml takes converted input rows for (arith.activations), the product is
    recomputed from its input site converted that way (`quantize_rows`); attn.z enters W_O flattened [T, N*H], n
    major, as llama.cpp's kqv_out. RoPE uses ggml's tables (`rope_tables_ggml`). The scores are (q * scale) . k, q
    scaled first (llama.cpp's ggml_scale of Qcur before the attention); with an f16 KV cache q * scale and k are
    f16 in that product, and the pattern and v are f16 in pattern . v (ggml-cpu converts src1 to F16, the cache's
    vec_dot_type; llamafile's sgemm takes F16 x F16 only on x86). mlp.act is the GELU f16 table times up. Norms,
    softmax and the soft-caps are float32, as refprism's float32 pass computes them. Sites are recomputed from
    `record` (the values that flowed in), so the honest replay runs each op on the reference's inputs.
    """
    f = np.float32
    rows = arith.activations
    products = {site: (key, source) for key, (site, source) in _products(cfg).items()}
    logits_site = "logits_uncapped" if cfg.final_softcap is not None else "logits"
    f16 = np.dtype(np.float16) if arith.kv_cache == "f16" else None
    qscale = f(cfg.query_pre_attn_scalar ** -0.5)
    tables = {}

    if cfg.gemma4:
        qscale = f(1)  # Gemma 4: f_attention_scale = 1 (q and k are RMS-normed)

    def rope_tables(l):
        key = (*cfg.rope_of(l), cfg.head_dim_of(l), cfg.rope_partial_of(l))  # Gemma 4: per layer type
        if key not in tables:
            theta, scale, H, partial = key
            tables[key] = rope_tables_ggml(np.arange(T), H, theta, scale, partial)
        return tables[key]

    def geglu(record, l, act):  # GGML_GELU_FP16: the table; Gemma 4's experts and per-layer inputs too
        gate, up = _GEGLU[act]
        u = record["ple.input"][:, l] if up is None else record[f"blocks.{l}.{up}"]
        return gelu_f16_table(record[f"blocks.{l}.{gate}"]) * u

    def edit(name, value, record):
        l, kind = split_site(name)
        if kind in products and f"blocks.{l}.{products[kind][0]}" in rows:
            key, source = products[kind]
            x = quantize_rows(record[f"blocks.{l}.{source}"].reshape(T, -1), rows[f"blocks.{l}.{key}"])
            W = weights.block(l)[key]  # x [T, D], [T, N*H] or [T, F]
            return (x @ W.reshape(x.shape[1], -1)).reshape(value.shape)
        if name == logits_site and "unembed" in rows:
            return weights.unembed(quantize_rows(record["ln_final.out"], rows["unembed"]))
        if kind in ("attn.q", "attn.k"):
            cos, sin = rope_tables(l)
            return ops.rope(pre_rope(record, cfg, weights, l, kind), cos, sin)
        src = cfg.kv_source(l) if l is not None else None  # a Gemma 4 KV-sharing consumer reads its producer's
        if kind == "attn.scores":
            q = _round(record[f"blocks.{l}.attn.q"] * qscale, f16)
            return ops.attention_scores(q, _round(record[f"blocks.{src}.attn.k"], f16), f(1))
        if kind == "attn.z" and f16 is not None:
            window = cfg.sliding_window if cfg.is_sliding(l) else None
            return ops.attention_mix(_round(record[f"blocks.{l}.attn.pattern"], f16),
                                     _round(record[f"blocks.{src}.attn.v"], f16), window=window, banded=False)
        if kind in _GEGLU:
            return geglu(record, l, kind)
        return value

    return edit
