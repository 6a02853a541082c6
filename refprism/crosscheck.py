"""`refprism.compare`: check another Gemma implementation against the reference, site by site, and name the first
op that is wrong and what the mistake probably is.

The other side arrives as a `capture.Capture` (HF transformers live, TransformerLens, llama.cpp, or a dump file,
all in refprism's names and layout). Four refprism passes over the same tokens do the rest:

    R  reference       refprism in float64 on the checkpoint's weights                         what every site should be
    P  replay          float64, each site's value replaced by the other side's before it      local error = |P - theirs|
                       flows on (`forward`'s edit hook): every op runs on the other side's
                       inputs, so its error is that op's alone
    F  honest run      an honest implementation at the other side's dtype (`Profile`)          floor = |F - R|
    Q  honest replay   the same, each op run on R's values                                     local floor = |Q - R|

A site *diverges* when its error exceeds its floor; the *first wrong op* is the first site, in forward order,
whose local error exceeds its local floor, even when every later site differs too (their values flow on in P, so
a mistake does not spread into the local errors after it). At the first wrong op, each catalogued mistake
(`CATALOGUE`: a variant of that op, computed from the inputs P recorded) is checked against the other side there;
those that reproduce it within the floor are the diagnosis.

Metrics of a site, a = the other side's array, b = the reference's (R, or P for the local error), over the
compared elements (all of them, except the scores: only the sources a query may see, since masked scores are
the mask's value in some implementations and are never read):

    max_abs  = max |a - b|                          max_rel = max_abs / max |b|   (relative to the site's scale)
    nmse_db  = 10 log10(sum (a - b)^2 / sum b^2)    cosine  = sum a b / (|a| |b|)
    worst    = argmax |a - b|, as indices in the site's axis letters (T position, N head, H channel, ...)
    logits only: top-k overlap |topk(a[t]) & topk(b[t])| / k; KL(softmax(b[t]) || softmax(a[t])) in nats;
                 argmax agreement over positions

Floors (`floors`): floor = SAFETY * max|F - R| + SLACK * u * max|R|, with u the unit roundoff of the other
side's dtype (docs/compare.md says why these constants).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import ops
from .capture import Capture, GgmlArithmetic
from .config import Config
from .errors import InputError
from .forward import embed_normalizer, forward
from .record import Record, expected_shapes, symbolic_shapes

# ------------------------------------------------------------------------------------------------ profiles

# Unit roundoff u (half an ulp at 1) of each arithmetic.
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}

# A floor is SAFETY times the honest implementation's error there, plus SLACK units of roundoff of the site's
# largest value (sites where the honest run happens to be exact, e.g. masked pattern entries, or an embedding
# whose scale is a power of 2). Chosen from the spread of honest implementations (docs/compare.md, "Floors").
SAFETY = 8.0
SLACK = 4.0


@dataclass(frozen=True)
class Profile:
    """How an honest implementation at the other side's dtype computes, simulated with refprism's own ops.

    float32:   refprism in float32, with RoPE angles formed in float32 (as HF and most ports do: position * inv_freq
               rounded, so the angle error grows with the position) instead of float64 rounded once.
    bfloat16 / float16: float32 arithmetic with the weights and sqrt(D) rounded to the dtype and every site's value
               rounded to it as it flows on; elementwise steps inside an op are rounded as torch rounds them
               (RoPE's two products and their sum, the scores' product and scale, Gemma 2's soft-caps, gelu before
               the product with up); norms, softmax and matrix products accumulate in float32 and round once.
    float64:   the float32 profile's errors scaled by u64 / u32 = 2**-29: the same roundings at float64's unit
               (refprism float64 is the reference itself, so it cannot be its own honest other side).
    ggml:      llama.cpp's CPU backend (float32, with `ggml`'s roundings: `ggml_edit`): the GELU through an f16
               table, RoPE angles by repeated float32 products, the KV cache's type, and each matmul's input rows
               converted as the weight's type makes ggml convert them (Q8_0 / Q8_K blocks for quantized weights).
    """

    dtype: str
    ggml: GgmlArithmetic | None = None

    @property
    def rounds_to(self):
        """The ml_dtypes / NumPy dtype every flowing value is rounded to, or None."""
        if self.dtype in ("bfloat16", "float16"):
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else np.dtype(np.float16)
        return None

    @property
    def scale(self) -> float:
        """Errors of the simulated run are multiplied by this (float64: 2**-29, else 1)."""
        return UNIT_ROUNDOFF["float64"] / UNIT_ROUNDOFF["float32"] if self.dtype == "float64" else 1.0

    @property
    def u(self) -> float:
        return UNIT_ROUNDOFF[self.dtype]


def profile_of(dtype: str, arithmetic: GgmlArithmetic | None = None) -> Profile:
    if dtype not in UNIT_ROUNDOFF:
        raise InputError(f"the other side's dtype {dtype!r} has no floor: give its arithmetic as one of "
                         f"{', '.join(UNIT_ROUNDOFF)}")
    if arithmetic is not None and dtype != "float32":
        raise InputError(_GGML_DTYPE.format(dtype=dtype))
    return Profile(dtype, arithmetic)


_GGML_DTYPE = ("llama.cpp computes in float32 with its own roundings (the GGUF's weight types and --kv-cache say "
               "which), not in {dtype}: leave --dtype out")


def _round(x, dt):
    """x rounded to dt (round to nearest even, as torch casts; beyond its range: inf) and back to x's dtype."""
    if dt is None:
        return x
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(dt).astype(x.dtype)


# ------------------------------------------------------------------------------------------------ weights


class WeightsAs:
    """A model's weights seen in another compute dtype, optionally rounded to a storage dtype first (an honest
    bfloat16 run holds bfloat16 weights). Converted a layer at a time, like the low-memory mode, into buffers that
    the next layer reuses (fresh memory costs a page fault per 4 KiB: reusing it is most of the speed); a float32
    checkpoint seen in float64 is exact (every float32 is a float64). Duck-types `weights.Weights` for
    `forward.forward`; a block is valid until the next layer's is asked for."""

    def __init__(self, params, dtype, round_to=None):
        self.params, self.dtype, self.round_to = params, np.dtype(dtype), round_to
        self.ln_final = self._cast(params.ln_final)
        self._last = (None, None)
        self._buffers: dict = {}

    def _identity(self, a) -> bool:
        return a.dtype == self.dtype and self.round_to is None

    def _cast(self, a, key=None):
        """a in this dtype (rounded through round_to), into the reused buffer `key` when given."""
        if self._identity(a):
            return a
        if key is None:
            return _round(np.asarray(a, dtype=self.dtype), self.round_to)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != a.shape:
            buf = self._buffers[key] = np.empty_like(a, dtype=self.dtype)  # the source's layout (W_gate is a .T view)
            if self.round_to is not None:
                self._buffers[key, "rounded"] = np.empty_like(a, dtype=self.round_to)
        if self.round_to is not None:
            low = self._buffers[key, "rounded"]
            np.copyto(low, a, casting="unsafe")
            np.copyto(buf, low)
        else:
            np.copyto(buf, a)
        return buf

    def block(self, l: int, *, scratch: bool = False) -> dict:
        if self._last[0] != l:
            self._last = (l, {k: self._cast(v, k) for k, v in self.params.block(l).items()})
        return self._last[1]

    def embed_rows(self, ids):
        return self._cast(self.params.embed_rows(ids))

    def unembed(self, h, chunk: int = 8192):
        """h E^T in this dtype, E converted in row chunks (gemma-2b's E is 2 GB in float32, 4 GB in float64)."""
        E = self.params.embedding()
        if self._identity(E):
            return h @ E.T
        out = np.empty((h.shape[0], E.shape[0]), dtype=self.dtype)
        for i in range(0, E.shape[0], chunk):
            rows = E[i:i + chunk]
            out[:, i:i + chunk] = h @ self._cast(rows, ("unembed", len(rows))).T
        return out

    def embedding(self):
        return self._cast(self.params.embedding())


# ------------------------------------------------------------------------------------------------ sites


def split_site(name: str) -> tuple[int | None, str]:
    """'blocks.3.attn.q' -> (3, 'attn.q'); 'logits' -> (None, 'logits')."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def compared_mask(cfg: Config, name: str, T: int):
    """The elements of a site that are compared: None (all) or, for scores, the [N, T, S] sources each query may
    see (causal, within the window on a sliding layer). Masked scores are never read by the softmax, and some
    implementations hold the mask's value there (HF's eager scores + mask, -inf, finfo.min)."""
    l, kind = split_site(name)
    if kind != "attn.scores":
        return None
    window = cfg.sliding_window if cfg.is_sliding(l) else None
    return np.broadcast_to(ops.causal_mask(T, window), (cfg.n_heads, T, T))


# ------------------------------------------------------------------------------------------------ metrics


def errors(theirs, ref, mask=None, letters=None) -> dict:
    """Error metrics of `theirs` against `ref` (module docstring), over the elements where mask is True.

    Non-finite values of theirs (NaN, inf) make max_abs inf and name the first such element as the worst.
    Shapes: theirs, ref, mask [...] (the same) -> {max_abs, max_rel, nmse_db, cosine, worst, nonfinite, scale}
    """
    a, b, index = _compared(theirs, ref, mask)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = a - b
    ad = np.abs(d)
    nonfinite = int(np.count_nonzero(~np.isfinite(ad)))
    if nonfinite:
        flat = int(np.flatnonzero(~np.isfinite(ad))[0])
        max_abs, nmse, cos = math.inf, math.inf, math.nan
    else:
        flat = int(np.argmax(ad)) if d.size else 0
        max_abs = float(ad.flat[flat]) if d.size else 0.0
        num, den = float(np.vdot(d, d)), float(np.vdot(b, b))
        nmse = (10 * math.log10(num / den) if num > 0 else -math.inf) if den > 0 else (0.0 if num == 0 else math.inf)
        aa = float(np.vdot(a, a))
        cos = float(np.vdot(a, b)) / math.sqrt(aa * den) if aa > 0 and den > 0 else (1.0 if aa == den else 0.0)
    if d.size == 0:
        worst = {}
    else:
        idx = tuple(int(i) for i in (index[flat] if index is not None else np.unravel_index(flat, d.shape)))
        worst = dict(zip(letters or [f"axis{i}" for i in range(len(idx))], idx))
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
            "nmse_db": nmse, "cosine": cos, "worst": worst, "nonfinite": nonfinite, "scale": scale}


def max_abs_error(theirs, ref, mask=None) -> float:
    """max |theirs - ref| over the compared elements (inf where theirs is not finite): the floors' statistic."""
    a, b, _ = _compared(theirs, ref, mask)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a - b)
    if not d.size:
        return 0.0
    m = float(d.max())
    return m if math.isfinite(m) else math.inf


def _compared(theirs, ref, mask):
    """(a, b, index): the compared elements as contiguous float64 arrays (flattened under a mask, with the
    [count, ndim] indices they came from)."""
    a = np.ascontiguousarray(theirs, dtype=np.float64)
    b = np.ascontiguousarray(ref, dtype=np.float64)
    if mask is None:
        return a, b, None
    keep = np.broadcast_to(mask, a.shape)
    return a[keep], b[keep], np.argwhere(keep)


def logit_metrics(theirs, ref, k: int = 5) -> dict:
    """Agreement of two [T, V] logit arrays as distributions, position by position.

    Math:   topk_overlap[t] = |topk(a[t]) & topk(b[t])| / k
            kl[t] = sum_v p_b log(p_b / p_a),  p = softmax (log-sum-exp in float64; nats)
            argmax agreement = the fraction of t with argmax a[t] == argmax b[t]
    Shapes: theirs, ref [T, V] -> {topk_overlap_min, topk_overlap_mean, kl_max, kl_mean, argmax_agree,
            first_argmax_mismatch}
    """
    a = np.asarray(theirs, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    k = min(k, a.shape[-1])
    if not np.isfinite(a).all():
        return {"k": k, "topk_overlap_min": None, "topk_overlap_mean": None, "kl_max": None, "kl_mean": None,
                "argmax_agree": None, "first_argmax_mismatch": None}
    top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]  # the k largest, in no order: an overlap is a set
    top_b = np.argpartition(-b, k - 1, axis=-1)[:, :k]
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)])
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = np.maximum((np.exp(lb) * (lb - la)).sum(-1), 0.0)  # >= 0; rounding can give -1e-17
    agree = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
    return {"k": k, "topk_overlap_min": float(overlap.min()), "topk_overlap_mean": float(overlap.mean()),
            "kl_max": float(kl.max()), "kl_mean": float(kl.mean()), "argmax_agree": float(agree.mean()),
            "first_argmax_mismatch": None if agree.all() else int(np.flatnonzero(~agree)[0])}


# ------------------------------------------------------------------------------------------------ runs


class _Reached(Exception):
    """Raised by an edit once the site it waits for is computed: the rest of the pass is not needed."""


def replay_edit(given: dict, kept: dict, *, cast=None, honest=None, stop=None, variant=None):
    """The edit of a teacher-forced replay: keep our value of each site, pass the given one on.

    At each site: value = honest(name, value, record) when an honest-arithmetic edit is given (the floor runs),
    value = variant(name, value, record) when a mistake is being tried there (it returns None where it does not
    act); kept[name] = value (our op on the given inputs); then the given array flows on where there is one
    (cast to the pass's dtype by `cast`), our value elsewhere. `stop`: raise _Reached after that site.
    Never changes `value` in place (forward's contract).
    """

    def edit(name, value, record):
        if honest is not None:
            value = honest(name, value, record)
        if variant is not None:
            wrong = variant(name, value, record)
            value = value if wrong is None else wrong
        kept[name] = value
        if name == stop:
            raise _Reached
        if name in given:
            return given[name] if cast is None else cast(name, given[name])
        return value

    return edit


def honest_edit(profile: Profile, weights, cfg: Config, T: int):
    """The edit that makes refprism's float32 pass compute like an honest implementation at profile.dtype
    (`Profile`): RoPE with float32 angles, and for bfloat16 / float16 torch's roundings at each step; for llama.cpp
    (profile.ggml) ggml's roundings (`ggml_edit`)."""
    if profile.ggml is not None:
        return ggml_edit(profile.ggml, weights, cfg, T)
    dt = profile.rounds_to
    tables = {}

    def rope_tables(l):
        theta, scale = cfg.rope_of(l)
        if (theta, scale) not in tables:
            cos, sin = rope_tables_float32(np.arange(T), cfg.d_head, theta, scale)
            tables[theta, scale] = (_round(cos, dt), _round(sin, dt))
        return tables[theta, scale]

    def edit(name, value, record):
        l, kind = split_site(name)
        if kind in ("attn.q", "attn.k"):
            x = pre_rope(record, cfg, weights, l, kind)
            cos, sin = rope_tables(l)
            if dt is None:
                return ops.rope(x, cos, sin)
            a = _round(x * cos[:, None, :], dt)
            b = _round(ops.rotate_half(x) * sin[:, None, :], dt)
            return _round(a + b, dt)
        if dt is None:
            return value
        if kind == "attn.scores":
            qk = _round(ops.attention_scores(record[f"blocks.{l}.attn.q"], record[f"blocks.{l}.attn.k"], 1.0), dt)
            return _round(qk * np.float32(cfg.query_pre_attn_scalar ** -0.5), dt)
        if kind == "attn.pattern" and cfg.attn_softcap is not None:
            capped = _softcap_rounded(record[f"blocks.{l}.attn.scores"], cfg.attn_softcap, dt)
            window = cfg.sliding_window if cfg.is_sliding(l) else None
            return _round(ops.causal_softmax(capped, window), dt)
        if kind == "mlp.act":
            g = _round(ops.gelu_tanh(record[f"blocks.{l}.mlp.gate"]), dt)
            return _round(g * record[f"blocks.{l}.mlp.up"], dt)
        if kind == "logits" and cfg.final_softcap is not None:
            return _softcap_rounded(record["logits_uncapped"], cfg.final_softcap, dt)
        return _round(value, dt)

    return edit


def _softcap_rounded(x, cap, dt):
    """cap * tanh(x / cap) with each step rounded to dt, as torch computes it on a low-precision tensor."""
    cap = np.asarray(cap, dtype=x.dtype)
    return _round(_round(np.tanh(_round(x / cap, dt)), dt) * cap, dt)


def rope_tables_float32(positions, d_head, theta, scale=1.0):
    """cos, sin as HF computes them in float32: inv_freq = 1 / theta ** (arange(0, H, 2) / H) (/ scale for linear
    scaling), angle = float32(position) * inv_freq, rounded at each step (the angle's error grows with position).

    Shapes: positions [T] -> cos, sin [T, H] float32
    """
    f = np.float32
    inv = (f(1.0) / (f(theta) ** (np.arange(0, d_head, 2, dtype=f) / f(d_head)))).astype(f)
    if scale != 1.0:
        inv = (inv / f(scale)).astype(f)
    angles = np.asarray(positions, dtype=f)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(f), np.sin(angles).astype(f)


# ------------------------------------------------------------------------------------------------ llama.cpp (ggml-cpu)
# Each rule below is read from the llama.cpp vendored in llama-cpp-python 0.3.36 (refprism/other/llamacpp.py:
# LLAMA_CPP_PYTHON), the build refprism checks; paths are under its vendor/llama.cpp/ggml/src/.

ROW_TYPES = ("Q8_0", "Q8_K", "F16", "BF16")  # the conversions of a matmul's input rows `quantize_rows` computes


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


def rope_tables_ggml(positions, d_head, theta, scale=1.0):
    """cos, sin as llama.cpp's CPU RoPE builds them (ggml-cpu/ops.cpp ggml_rope_cache_init, rope_yarn without YaRN):
    theta_scale = powf(base, -2 / H); the angle of pair i is p * theta_scale**i by repeated float32 products
    (angle_0 = p, angle_i = angle_{i-1} * theta_scale), times freq_scale = 1 / scale; then cosf, sinf.

    Shapes: positions [T] -> cos, sin [T, H] float32 (split-half layout, as `ops.rope` takes them)
    """
    f = np.float32
    theta_scale = np.power(f(theta), f(-2.0) / f(d_head))
    angles = np.empty((len(positions), d_head // 2), dtype=f)
    a = np.asarray(positions, dtype=f)
    for i in range(d_head // 2):
        angles[:, i] = a
        a = a * theta_scale
    if scale != 1.0:
        angles = f(1.0 / scale) * angles  # theta_interp = freq_scale * theta_extrap
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


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

    def rope_tables(l):
        theta, scale = cfg.rope_of(l)
        if (theta, scale) not in tables:
            tables[theta, scale] = rope_tables_ggml(np.arange(T), cfg.d_head, theta, scale)
        return tables[theta, scale]

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
        if kind == "attn.scores":
            q = _round(record[f"blocks.{l}.attn.q"] * qscale, f16)
            return ops.attention_scores(q, _round(record[f"blocks.{l}.attn.k"], f16), f(1))
        if kind == "attn.z" and f16 is not None:
            window = cfg.sliding_window if cfg.is_sliding(l) else None
            return ops.attention_mix(_round(record[f"blocks.{l}.attn.pattern"], f16),
                                     _round(record[f"blocks.{l}.attn.v"], f16), window=window, banded=False)
        if kind == "mlp.act":
            return gelu_f16_table(record[f"blocks.{l}.mlp.gate"]) * record[f"blocks.{l}.mlp.up"]
        return value

    return edit


def pre_rope(record, cfg: Config, weights, l: int, kind: str):
    """RoPE's input at layer l from a record: q_pre / k_pre, through Gemma 3's q / k norm (with the recorded
    scale) where the model has one. Shapes: -> [T, heads, H]"""
    which = kind[-1]  # "q" or "k"
    x = record[f"blocks.{l}.attn.{which}_pre"]
    if cfg.qk_norm:
        x = ops.rms_apply(x, record[f"blocks.{l}.attn.{which}_norm.scale"], weights.block(l)[f"{which}_norm"])
    return x


@dataclass
class _Runs:
    """The four passes (module docstring) and what they kept."""

    R: Record  # reference, float64
    F: Record  # honest run at the other side's dtype
    P: dict  # our op on the other side's inputs, per site (float64)
    Pflow: Record  # what flowed in the replay: theirs where they have it
    Q: dict  # the honest op on R's values, per site
    w64: WeightsAs  # the float64 weights, shared with the diagnosis


def _run_all(model, tokens, theirs: dict, profile: Profile) -> _Runs:
    cfg = model.config
    T = len(tokens)
    w64 = WeightsAs(model.params, np.float64)
    n64 = embed_normalizer(cfg.d_model, np.float64)
    R = forward(w64, cfg, tokens, normalizer=n64)
    w32 = WeightsAs(model.params, np.float32, profile.rounds_to)
    n32 = embed_normalizer(cfg.d_model, np.float32, round_to=profile.dtype if profile.rounds_to else None)
    honest = honest_edit(profile, w32, cfg, T)
    F = forward(w32, cfg, tokens, normalizer=n32, edit=honest)
    P: dict = {}
    Pflow = forward(w64, cfg, tokens, normalizer=n64, edit=replay_edit(theirs, P))
    Q: dict = {}
    given = {name: R[name] for name in theirs}
    forward(w32, cfg, tokens, normalizer=n32,
            edit=replay_edit(given, Q, honest=honest, cast=lambda n, a: a.astype(np.float32)))
    return _Runs(R, F, P, Pflow, Q, w64)


# ------------------------------------------------------------------------------------------------ the catalogue


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
    "attn.out": ("attn.o_proj", "ln1_post.scale", "ln1_post"),  # Gemma 2/3 post-norms
    "mlp.out": ("mlp.down", "ln2_post.scale", "ln2_post"),
}
NORM_OUTPUTS = ("ln1.out", "ln2.out", "attn.out", "mlp.out", "ln_final.out", "attn.q", "attn.k")


def _norm_parts(op: Op):
    """(x, recorded s, w, finish) of the norm that produces op.site; finish(y) completes the op (RoPE for Gemma
    3's q / k norms). None when the site is not a norm's output in this model."""
    cfg = op.cfg
    if op.kind == "ln_final.out":
        return (op.record[f"blocks.{cfg.n_layers - 1}.resid_post"], op.record["ln_final.scale"],
                op.weights.ln_final, lambda y: y)
    if op.kind in ("attn.q", "attn.k"):
        if not cfg.qk_norm:
            return None
        w = op.kind[-1]
        cos, sin = _tables(op)
        return (op.at(f"attn.{w}_pre"), op.at(f"attn.{w}_norm.scale"), op.block[f"{w}_norm"],
                lambda y: ops.rope(y, cos, sin))
    if op.kind in ("attn.out", "mlp.out") and not cfg.post_norms:
        return None
    x, s, w = _NORM_OF[op.kind]
    return op.at(x), op.at(s), op.block[w], lambda y: y


def _tables(op: Op, *, theta=None, scale=None, offset=0):
    """cos, sin [T, H] of the op's layer (float64 angles), optionally with another base, scale or position offset."""
    th, sc = op.cfg.rope_of(op.layer)
    th = th if theta is None else theta
    sc = sc if scale is None else scale
    T = len(op.tokens)
    return ops.rope_tables((np.arange(T) + offset) / sc, op.cfg.d_head, th, np.float64)


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
        return finish(norm_rounded(x, w, op.cfg.rms_norm_eps, dt_name))
    return compute


def norm_rounded(x, w, eps, dt_name):
    """RMSNorm with every step in a low dtype, as torch computes it on such a tensor without upcasting:
    x^2, the mean (accumulated in float32, rounded), + eps, rsqrt, x * r, 1 + w and the product, each rounded."""
    f = np.float32
    dt = np.float32 if dt_name == "float32" else profile_of(dt_name).rounds_to
    x = _round(np.asarray(x, dtype=f), dt)
    ms = _round(np.mean(_round(x * x, dt), axis=-1, dtype=f), dt)
    r = _round(f(1) / np.sqrt(_round(ms + f(eps), dt)), dt)
    scale = _round(f(1) + _round(np.asarray(w, dtype=f), dt), dt)
    return _round(_round(x * r[..., None], dt) * scale, dt).astype(np.float64)


def _swapped_norm_weight(op):
    """Gemma 2/3 with HF's post_attention_layernorm read as the MLP's input norm (its Gemma 1 meaning): the
    attention's post-norm gets pre_feedforward_layernorm's weight and the MLP's input norm the other."""
    if not op.cfg.post_norms or op.kind not in ("attn.out", "ln2.out"):
        return None
    x, s, _, _ = _norm_parts(op)
    other = "ln2" if op.kind == "attn.out" else "ln1_post"
    return ops.rms_apply(x, s, op.block[other])


def _post_norm_missing(op):
    if not op.cfg.post_norms:
        return None
    return op.at("attn.o_proj" if op.kind == "attn.out" else "mlp.down")


def _embed_scale_missing(op):
    return op.weights.embed_rows(op.tokens)


def _with_dtype(name):
    return np.dtype(np.float32) if name == "float32" else profile_of(name).rounds_to


def _embed_rounded(dt_name):
    """embed = E[tokens] * sqrt(D) rounded to dt_name (None where that rounding is exact, e.g. D = 64)."""
    def compute(op):
        exact = math.sqrt(op.cfg.d_model)
        rounded = float(np.asarray(exact).astype(_with_dtype(dt_name)))
        return None if rounded == exact else op.weights.embed_rows(op.tokens) * rounded
    return compute


def _gelu_exact(op):
    gate = op.at("mlp.gate")
    return gelu_erf(gate) * op.at("mlp.up")


def gelu_erf(x):
    """The exact GELU, x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (Gemma trap: Gemma uses the tanh approximation)."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def _geglu_swapped(op):
    return ops.gelu_tanh(op.at("mlp.up")) * op.at("mlp.gate")


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
        cos, sin = _tables(op, theta=theta, scale=scale, offset=how.get("offset", 0))
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
    """Query head n reads kv head n % K (torch .repeat instead of repeat_interleave) instead of n // (N / K)."""
    cfg = op.cfg
    if not 1 < cfg.n_kv_heads < cfg.n_heads:
        return None
    kv = np.arange(cfg.n_heads) % cfg.n_kv_heads
    if op.kind == "attn.scores":
        q, k = op.at("attn.q"), op.at("attn.k")
        return np.einsum("tnh,snh->nts", q, k[:, kv]) * cfg.query_pre_attn_scalar ** -0.5
    return np.einsum("nts,snh->tnh", op.at("attn.pattern"), op.at("attn.v")[:, kv])


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
    raw = op.weights.unembed(op.record["ln_final.out"]) * math.sqrt(op.cfg.d_model)
    return ops.softcap(raw, op.cfg.final_softcap) if op.cfg.final_softcap is not None else raw


def _kv_rounded(dt_name):
    dt = _with_dtype(dt_name)
    return lambda op: _round(op.value, dt)


CATALOGUE: list[Mistake] = [
    Mistake("norm_w", NORM_OUTPUTS, _norm_w,
            "a norm scales by w instead of 1 + w; Gemma's RMSNorm stores w and scales by 1 + w"),
    Mistake("norm_in_float32", NORM_OUTPUTS, _norm_in("float32"),
            "a norm is computed in float32 in a float64 run; the rest of the run is float64",
            rounds_to="float32"),
    Mistake("norm_in_float16", NORM_OUTPUTS, _norm_in("float16"),
            "a norm is computed in float16 step by step; Gemma implementations compute it in float32 and round "
            "once", rounds_to="float16"),
    Mistake("norm_weights_swapped", ("attn.out", "ln2.out"), _swapped_norm_weight,
            "the attention's post-norm and the MLP's input norm have each other's weights: HF's "
            "post_attention_layernorm is read as the MLP's input norm (its Gemma 1 meaning); in Gemma 2/3 it "
            "is the attention's output norm and pre_feedforward_layernorm is the MLP's"),
    Mistake("post_norm_missing", ("attn.out", "mlp.out"), _post_norm_missing,
            "a sublayer's output is added to the residual without its post-norm; Gemma 2/3 normalise the "
            "attention and MLP outputs (post_attention_layernorm, post_feedforward_layernorm)"),
    Mistake("embed_scale_missing", ("embed",), _embed_scale_missing,
            "the embedding is not multiplied by sqrt(D); Gemma scales it by sqrt(hidden_size)"),
    Mistake("embed_scale_in_bfloat16", ("embed",), _embed_rounded("bfloat16"),
            "sqrt(D) is rounded to bfloat16 (as a bfloat16 run does) in a run of higher precision"),
    Mistake("embed_scale_in_float16", ("embed",), _embed_rounded("float16"),
            "sqrt(D) is rounded to float16 in a run of higher precision"),
    Mistake("embed_scale_in_float32", ("embed",), _embed_rounded("float32"),
            "sqrt(D) is rounded to float32 in a float64 run (HF makes the constant a float32 tensor)"),
    Mistake("gelu_exact", ("mlp.act",), _gelu_exact,
            "the MLP uses the exact erf GELU; Gemma uses the tanh approximation"),
    Mistake("geglu_swapped", ("mlp.act",), _geglu_swapped,
            "the GeGLU applies gelu to up_proj instead of gate_proj: act = gelu(up) * gate; Gemma's is "
            "gelu(gate) * up"),
    Mistake("rope_interleaved", ("attn.q", "attn.k"), _rope_variant(interleaved=True),
            "RoPE rotates interleaved pairs (2i, 2i+1) as Llama's original code; Gemma rotates i with i + H/2 "
            "(split-half, HF's rotate_half)"),
    Mistake("rope_missing", ("attn.q", "attn.k"), _rope_variant(missing=True),
            "q and k are not rotated (no RoPE)"),
    Mistake("rope_base_10000", ("attn.q", "attn.k"), _rope_variant(theta=lambda op: 10_000.0),
            "RoPE uses base 10000 here; this layer's base is the config's (rope_theta, or Gemma 3's "
            "rope_local_base_freq on sliding layers)"),
    Mistake("rope_base_1000000", ("attn.q", "attn.k"), _rope_variant(theta=lambda op: 1_000_000.0),
            "RoPE uses base 1000000 (Gemma 3's global base) here; this layer's base is the config's"),
    Mistake("rope_local_base_on_global", ("attn.q", "attn.k"),
            _rope_variant(theta=lambda op: op.cfg.rope_local_theta,
                          applies=lambda op: op.cfg.qk_norm and not op.cfg.is_sliding(op.layer)),
            "a Gemma 3 full-attention layer uses the local RoPE base (rope_local_base_freq) of sliding layers; "
            "full layers use rope_theta"),
    Mistake("rope_global_base_on_local", ("attn.q", "attn.k"),
            _rope_variant(theta=lambda op: op.cfg.rope_theta,
                          applies=lambda op: op.cfg.qk_norm and op.cfg.is_sliding(op.layer)),
            "a Gemma 3 sliding layer uses the global RoPE base (rope_theta); sliding layers use "
            "rope_local_base_freq"),
    Mistake("rope_scaling_missing", ("attn.q", "attn.k"), _rope_variant(scale=lambda op: 1.0),
            "RoPE ignores the linear rope_scaling factor of full layers (Gemma 3 4B and larger)"),
    Mistake("rope_positions_from_1", ("attn.q", "attn.k"), _rope_variant(offset=1),
            "RoPE positions start at 1 instead of 0"),
    Mistake("qk_norm_missing", ("attn.q", "attn.k"), _rope_variant(qk_norm_missing=True),
            "q and k are rotated without Gemma 3's q_norm / k_norm"),
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
            "the logits are not soft-capped; Gemma 2 caps them, cap * tanh(logits / cap)"),
    Mistake("unembed_scaled", ("logits",), _unembed_scaled,
            "the unembedding uses the scaled embedding E * sqrt(D); Gemma's tied unembedding is E itself"),
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


def candidates(profile: Profile) -> list[Mistake]:
    """The catalogue entries that can be told apart at this arithmetic."""
    out = []
    for m in CATALOGUE:
        if m.name.startswith("norm_in_"):
            if m.rounds_to != _NORM_ROUNDING.get(profile.dtype):
                continue
        elif m.rounds_to is not None or m.name.startswith("embed_scale_in_"):
            if m.name.rsplit("_in_", 1)[1] not in _COARSER[profile.dtype]:
                continue
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------ results


@dataclass
class SiteResult:
    """One site's comparison: the error against the reference with its floor, and the local error (the op alone,
    on the other side's inputs) with its local floor. Errors are absolute; *_rel divide by max |reference|."""

    site: str
    shape: tuple[int, ...]
    letters: tuple[str, ...]
    max_abs: float
    max_rel: float
    nmse_db: float
    cosine: float
    worst: dict
    floor: float
    local_max_abs: float | None
    local_max_rel: float | None
    local_worst: dict | None
    local_floor: float | None
    scale: float = 0.0  # max |reference| at the site
    nonfinite: int = 0
    logits: dict | None = None
    summary: bool = False  # only printed elements and a sum were available (llama.cpp's llama-debug)

    @property
    def diverges(self) -> bool:
        return not self.max_abs <= self.floor

    @property
    def local_diverges(self) -> bool:
        return self.local_max_abs is not None and not self.local_max_abs <= self.local_floor

    def to_json(self) -> dict:
        scale = self.scale
        out = {"site": self.site, "shape": list(self.shape), "axes": "".join(self.letters),
               "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel), "nmse_db": _num(self.nmse_db),
               "cosine": _num(self.cosine), "worst": self.worst, "floor": _num(self.floor),
               "floor_rel": _num(self.floor / scale) if scale else None, "scale": _num(scale),
               "local_max_abs": _num(self.local_max_abs), "local_max_rel": _num(self.local_max_rel),
               "local_worst": self.local_worst, "local_floor": _num(self.local_floor),
               "diverges": self.diverges, "local_diverges": self.local_diverges, "nonfinite": self.nonfinite}
        if self.logits is not None:
            out["logits"] = self.logits
        if self.summary:
            out["summary"] = True
        return out


def _num(x):
    """A float for JSON: None for NaN and infinities (JSON has neither)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class CompareResult:
    """What `compare` found. `exit_status`: 0 every site within its floor, 1 something diverges (or the tokens)."""

    model: str
    against: str
    dtype: str
    tokens: list[int]
    pieces: list[str]
    their_tokens: list[int]
    their_pieces: list[str]
    sites: list[SiteResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diagnosis: list[dict] = field(default_factory=list)
    floors: dict = field(default_factory=dict)

    @property
    def tokens_match(self) -> bool:
        return self.tokens == self.their_tokens

    @property
    def token_mismatch(self) -> dict | None:
        if self.tokens_match:
            return None
        p = next((i for i, (a, b) in enumerate(zip(self.tokens, self.their_tokens)) if a != b),
                 min(len(self.tokens), len(self.their_tokens)))
        side = lambda ids, pieces: ({"id": ids[p], "piece": pieces[p]} if p < len(ids) else None)  # noqa: E731
        return {"position": p, "ours": side(self.tokens, self.pieces),
                "theirs": side(self.their_tokens, self.their_pieces),
                "lengths": [len(self.tokens), len(self.their_tokens)]}

    @property
    def first_divergence(self) -> str | None:
        return next((s.site for s in self.sites if s.diverges), None)

    @property
    def wrong_ops(self) -> list[str]:
        return [s.site for s in self.sites if s.local_diverges]

    @property
    def first_wrong_op(self) -> str | None:
        ops_ = self.wrong_ops
        return ops_[0] if ops_ else None

    @property
    def exit_status(self) -> int:
        """0: every site within its floor; 1: something diverges (a finding); 2: the token ids differ, so nothing
        could be compared (bad input, as for the command's other refusals)."""
        if not self.tokens_match:
            return 2
        return int(any(s.diverges or s.local_diverges for s in self.sites))

    def to_json(self) -> dict:
        return {"model": self.model, "against": self.against, "dtype": self.dtype,
                "tokens_match": self.tokens_match, "tokens": self.tokens, "their_tokens": self.their_tokens,
                "token_mismatch": self.token_mismatch, "sites": [s.to_json() for s in self.sites],
                "missing": self.missing, "first_divergence": self.first_divergence,
                "first_wrong_op": self.first_wrong_op, "wrong_ops": self.wrong_ops, "diagnosis": self.diagnosis,
                "floors": self.floors, "notes": self.notes, "exit_status": self.exit_status}

    def headline(self) -> str:
        """One line: the verdict."""
        if not self.tokens_match:
            mm = self.token_mismatch
            show = lambda s: "none (shorter)" if s is None else f"{s['id']} ({s['piece']})"  # noqa: E731
            why = "".join(f"; {d['says']}" for d in self.diagnosis if d["explains"])
            return (f"tokens differ at position {mm['position']}: ours {show(mm['ours'])}, theirs "
                    f"{show(mm['theirs'])} ({mm['lengths'][0]} vs {mm['lengths'][1]} tokens){why}; nothing else "
                    "compared")
        if self.exit_status == 0:
            return f"every one of {len(self.sites)} sites is within its floor"
        wrong = self.first_wrong_op
        text = f"first divergence: {self.first_divergence or 'none'}; first wrong op: {wrong or 'none'}"
        if wrong is None:
            text += " (every op is within its local floor: the divergence is accumulated, not one op's)"
        return text

    def diagnosis_lines(self) -> list[str]:
        lines = []
        explained = [d for d in self.diagnosis if d["explains"]]
        for d in explained:
            how = d.get("evidence") or f"max abs {_fmt(d['max_abs'])} within the floor {_fmt(d['floor'])}"
            lines.append(f"diagnosis: {d['says']} (the other side behaves like refprism with `{d['variant']}` at "
                         f"{d['site']}: {how})")
        if self.diagnosis and not explained:
            where = self.diagnosis[0]["site"]
            lines.append(f"diagnosis: none of the {len(self.diagnosis)} catalogued mistakes that act at {where} "
                         "reproduces the other side there (closest: "
                         + ", ".join(f"{d['variant']} {_fmt(d['max_abs'])}" for d in self.diagnosis[:3]) + ")")
        elif not self.diagnosis and self.first_wrong_op:
            lines.append(f"diagnosis: no catalogued mistake acts at {self.first_wrong_op}")
        return lines

    def table(self) -> str:
        """The report as text: header, one row per site (first divergence and first wrong op marked), verdict."""
        out = [f"refprism compare  model {self.model}  against {self.against} ({self.dtype})  "
               f"{len(self.tokens)} tokens",
               "tokens: " + " ".join(f"{p}({i})" for i, p in zip(self.tokens, self.pieces))]
        if not self.tokens_match:
            out.append("their tokens: " + " ".join(f"{p}({i})" for i, p in zip(self.their_tokens, self.their_pieces)))
            out.append(self.headline())
            out += self.diagnosis_lines()
            return "\n".join(out)
        out.append(f"floors: {self.floors.get('method', '')}")
        width = max([len(s.site) for s in self.sites] + [4])
        out.append(f"  {'site':<{width}}  {'max abs':>9} {'floor':>9} {'max rel':>9} {'NMSE dB':>8} {'cosine':>10}  "
                   f"{'local':>9} {'l.floor':>9}  worst")
        first_div, first_wrong = self.first_divergence, self.first_wrong_op
        for s in self.sites:
            mark = "!" if s.diverges or s.local_diverges else " "
            worst = "sum" if s.worst == {"sum": True} else ",".join(f"{k}{v}" for k, v in s.worst.items())
            tags = []
            if s.site == first_div:
                tags.append("<- first divergence")
            if s.site == first_wrong:
                tags.append("<- FIRST WRONG OP")
            if s.summary:
                tags.append("(printed elements and sum only)")
            out.append(f"{mark} {s.site:<{width}}  {_fmt(s.max_abs):>9} {_fmt(s.floor):>9} {_fmt(s.max_rel):>9} "
                       f"{_fmt(s.nmse_db, '.1f'):>8} {_fmt(s.cosine, '.8f'):>10}  {_fmt(s.local_max_abs):>9} "
                       f"{_fmt(s.local_floor):>9}  {worst} {' '.join(tags)}".rstrip())
            if s.logits is not None and s.logits.get("kl_max") is not None:
                g = s.logits
                out.append(f"  {'':<{width}}  top-{g['k']} overlap min {g['topk_overlap_min']:.2f}, KL max "
                           f"{g['kl_max']:.3g} nats, argmax agrees at {g['argmax_agree']:.0%} of positions")
        if self.missing:
            out.append(f"not provided by the other side ({len(self.missing)}): " + _listing(self.missing))
        for note in self.notes:
            out.append(f"note: {note}")
        out.append(self.headline())
        out += self.diagnosis_lines()
        return "\n".join(out)

    def markdown(self) -> str:
        """The report for a pull request: the verdict, the diagnosis, and the sites in a table."""
        verdict = "OK" if self.exit_status == 0 else "DIVERGES"
        out = [f"### refprism compare: {verdict}", "",
               f"`{self.model}` against **{self.against}** ({self.dtype}), {len(self.tokens)} tokens.", "",
               f"**{self.headline()}**", ""]
        out += [f"- {line.removeprefix('diagnosis: ')}" for line in self.diagnosis_lines()]
        if not self.tokens_match:
            return "\n".join(out) + "\n"
        out += ["", f"Floors: {self.floors.get('method', '')}", "",
                "| site | max abs | floor | max rel | NMSE dB | cosine | local | local floor | |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for s in self.sites:
            tag = " ".join(t for t, on in (("first divergence", s.site == self.first_divergence),
                                           ("**first wrong op**", s.site == self.first_wrong_op),
                                           ("diverges", (s.diverges or s.local_diverges)
                                            and s.site not in (self.first_divergence, self.first_wrong_op))) if on)
            out.append(f"| `{s.site}` | {_fmt(s.max_abs)} | {_fmt(s.floor)} | {_fmt(s.max_rel)} | "
                       f"{_fmt(s.nmse_db, '.1f')} | {_fmt(s.cosine, '.8f')} | {_fmt(s.local_max_abs)} | "
                       f"{_fmt(s.local_floor)} | {tag} |")
        if self.missing:
            out += ["", f"Not provided by the other side: {_listing(self.missing)}"]
        out += [f"- note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _fmt(x, spec=".2e"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _listing(names, limit=12):
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------ compare


def compare(model, prompt=None, *, against, names=None, dtype=None, top_k: int = 5,
            kv_cache: str | None = None) -> CompareResult:
    """Check another Gemma implementation against refprism; see the module docstring and docs/compare.md.

    model:   a refprism Model (any dtype: the reference runs in float64 on its weights) or a path / hub id
    prompt:  text or token ids; None takes the token ids the other side ran (a dump or a Capture holds them)
    against: "hf" (HF transformers live on the model's directory), an HF model object in memory, "tl"
             (TransformerLens' Bridge on the model's directory), "llama.cpp" (the model must be a .gguf file; text
             is tokenized by llama.cpp), a dump file (.npz / .safetensors), or a Capture
    names:   a dump's naming scheme: "refprism" (default), "hf", "tl", "llama.cpp", or a JSON name map (path)
    dtype:   the other side's arithmetic (float32, bfloat16, float16, float64): for "hf" / "tl" the dtype it runs
             in (default float32); for a dump or capture the default is the dtype it reports. llama.cpp computes
             in float32 with its own roundings (`GgmlArithmetic`, from the GGUF's weight types and kv_cache)
    kv_cache: llama.cpp's KV cache type, "f16" (its default) or "f32": the one it runs with (--against
             llama.cpp) or ran with (a dump in llama.cpp's names)
    """
    from .model import Model, load

    if not isinstance(model, Model):
        model = load(model)
    cfg = model.config
    llama = against == "llama.cpp" or (names == "llama.cpp" and not isinstance(against, Capture))
    if kv_cache is not None and not llama:
        raise InputError("--kv-cache is llama.cpp's: it applies to --against llama.cpp and to dumps with --names "
                         "llama.cpp")
    tokens = None if prompt is None else model.encode(prompt)
    capture = _capture(model, against, tokens, names=names, dtype=dtype, prompt=prompt,
                       kv_cache=kv_cache or "f16")
    if tokens is None:
        tokens = model.encode(capture.tokens.tolist())
    other_dtype = dtype or capture.dtype
    profile = profile_of(other_dtype, capture.arithmetic)
    result = CompareResult(model=model.name, against=capture.source, dtype=other_dtype,
                           tokens=[int(t) for t in tokens], pieces=[model.piece(t) for t in tokens],
                           their_tokens=[int(t) for t in capture.tokens],
                           their_pieces=[model.piece(t) if 0 <= t < cfg.vocab_size else f"#{t}"
                                         for t in capture.tokens.tolist()])
    if not result.tokens_match:
        result.notes = list(capture.notes)
        result.diagnosis = _token_diagnosis(result.tokens, result.their_tokens, cfg.bos_token_id)
        return result
    T = len(tokens)
    shapes = expected_shapes(cfg, T)
    theirs, ignored = _checked_arrays(capture, shapes)
    result.notes = list(capture.notes) + ignored
    summaries = {n: s for n, s in capture.summaries.items() if n in shapes and n not in theirs}
    if not theirs and not summaries:
        raise InputError(f"{capture.source} provides no site of this model to compare (expected names like "
                         "blocks.0.attn.q or logits)")
    runs = _run_all(model, tokens, theirs, profile)
    letters = symbolic_shapes(cfg)
    for name in letters:
        if name in theirs:
            result.sites.append(_site(cfg, name, letters[name], theirs[name], runs, profile, T, top_k))
        elif name in summaries:
            result.sites.append(_summary_site(cfg, name, letters[name], summaries[name], runs, profile))
        else:
            result.missing.append(name)
    result.floors = {"profile": profile.dtype, "safety": SAFETY, "slack": SLACK, "unit_roundoff": profile.u,
                     "method": _floor_method(profile)}
    if profile.ggml is not None:  # llama.cpp's arithmetic, as the floors model it
        g = profile.ggml
        result.floors["llama.cpp"] = {"weights": g.weights, "kv_cache": g.kv_cache, "activations": g.activations}
    wrong = result.first_wrong_op
    if wrong is not None:
        result.diagnosis = diagnose(model, tokens, wrong, theirs, runs, profile,
                                    next(s for s in result.sites if s.site == wrong).local_floor)
    return result


def _floor_method(profile: Profile) -> str:
    base = (f"floor = {SAFETY:g} x |honest - reference| + {SLACK:g} u max|reference|, u = {profile.u:.3g}; "
            "local floor the same with the honest op on the reference's inputs; ")
    if profile.ggml is not None:
        g = profile.ggml
        kinds = sorted(set(g.activations.values()))
        rows = (f"each product's input rows converted per weight type ({', '.join(kinds)})" if kinds
                else "float32 products")
        return base + (f"honest = refprism float32 computing as llama.cpp's CPU backend on {g.weights} weights: "
                       f"{rows}, {g.kv_cache} KV cache, GELU through an f16 table, ggml's RoPE angles")
    how = {"float64": "honest = refprism float32 (float32 RoPE angles), its errors scaled by 2**-29",
           "float32": "honest = refprism float32 with float32 RoPE angles",
           "bfloat16": "honest = refprism with bfloat16 weights and every site rounded to bfloat16 (torch's roundings)",
           "float16": "honest = refprism with float16 weights and every site rounded to float16 (torch's roundings)"}
    return base + how[profile.dtype]


def _capture(model, against, tokens, *, names, dtype, prompt=None, kv_cache="f16") -> Capture:
    """The other side as a Capture (see `compare`)."""
    if isinstance(against, Capture):
        return against
    if isinstance(against, str) and against in ("hf", "tl", "llama.cpp"):
        if tokens is None:
            raise InputError(f"--against {against} runs the other side live: give the prompt (text, --ids or "
                             "--prompt-file)")
        gguf = str(model.name).lower().endswith(".gguf")
        if against == "llama.cpp":
            if not gguf:
                raise InputError("--against llama.cpp runs llama.cpp on the --model file: give --model as a .gguf "
                                 "file")
            if dtype not in (None, "float32"):
                raise InputError(_GGML_DTYPE.format(dtype=dtype))
            from .other import llamacpp

            # Text goes to llama.cpp's own tokenizer (its ids are then compared with ours); ids run as given.
            return llamacpp.capture(model.name, prompt if isinstance(prompt, str) else tokens.tolist(),
                                    cache_type=kv_cache)
        if gguf:
            raise InputError(f"--against {against} loads the checkpoint with transformers: give --model as a "
                             "safetensors model directory or hub id, not a .gguf file")
        from .weights import resolve_model_dir

        directory, _ = resolve_model_dir(model.name)
        if against == "hf":
            from .other import hf

            return hf.capture(directory, tokens, dtype=dtype or "float32", cfg=model.config)
        from .other import tl

        return tl.capture(directory, tokens, dtype=dtype or "float32")
    if hasattr(against, "config") and hasattr(against, "forward") and not isinstance(against, (str, bytes)):
        from .other import hf

        if tokens is None:
            raise InputError("an HF model object runs live: give the prompt (text or token ids)")
        return hf.capture(against, tokens, cfg=model.config)
    if isinstance(against, str) or hasattr(against, "__fspath__"):
        from .other.dumps import read_dump

        check_against(against)
        return read_dump(against, model, names=names or "refprism", ids=tokens, kv_cache=kv_cache)
    raise InputError(f"against must be hf, tl, llama.cpp, a dump file, an HF model or a Capture, got a "
                     f"{type(against).__name__}")


LIVE = ("hf", "tl", "llama.cpp")


def check_against(against) -> None:
    """hf, tl, llama.cpp, or an existing .npz / .safetensors file; anything else is refused in one line."""
    from pathlib import Path

    if isinstance(against, str) and against in LIVE:
        return
    text = str(against)
    shown = repr(text) if len(repr(text)) <= 400 else repr(text[:200]) + "..."
    if Path(text).suffix.lower() not in (".npz", ".safetensors"):
        raise InputError(f"unknown --against {shown}: give hf, tl, llama.cpp or a dump file (.npz, .safetensors)")
    if not Path(text).is_file():
        raise InputError(f"no dump file {shown} (--against)")


def _token_diagnosis(ours, theirs, bos) -> list[dict]:
    out = []
    if ours[:1] == [bos] and theirs == ours[1:]:
        out.append({"variant": "missing_bos", "site": "tokens", "explains": True, "max_abs": 0.0, "floor": 0.0,
                    "says": TOKEN_MISTAKES["missing_bos"]})
    if theirs == [bos] + ours:
        out.append({"variant": "double_bos", "site": "tokens", "explains": True, "max_abs": 0.0, "floor": 0.0,
                    "says": TOKEN_MISTAKES["double_bos"]})
    return out


def _checked_arrays(capture: Capture, shapes: dict) -> tuple[dict, list[str]]:
    """The capture's arrays at this model's sites, in float64, each checked against its expected shape
    (a mis-shaped array is an InputError naming it), and a note for each name that is no site of this model."""
    out, notes = {}, []
    for name, a in capture.arrays.items():
        if name not in shapes:
            notes.append(f"{name}: not a site of this model, ignored")
            continue
        a = np.asarray(a)
        if tuple(a.shape) != shapes[name]:
            raise InputError(f"{capture.source}: {name} has shape {list(a.shape)}, this model and prompt give "
                             f"{list(shapes[name])}")
        if not (np.issubdtype(a.dtype, np.floating) or str(a.dtype) == "bfloat16"):  # ml_dtypes' bfloat16
            raise InputError(f"{capture.source}: {name} holds {a.dtype} values, not floats")
        out[name] = a.astype(np.float64)
    return out, notes


def _site(cfg, name, letters, theirs, runs: _Runs, profile: Profile, T, top_k) -> SiteResult:
    mask = compared_mask(cfg, name, T)
    R = runs.R[name]
    e = errors(theirs, R, mask, letters)
    local = errors(theirs, runs.P[name], mask, letters)
    honest = max_abs_error(runs.F[name], R, mask) * profile.scale
    honest_local = max_abs_error(runs.Q[name], R, mask) * profile.scale
    slack = SLACK * profile.u * e["scale"]
    # An op's honest rounding grows with the values it makes: where the other side's values are larger than ours
    # (an upstream mistake fed it larger inputs), its local floor grows with them (never below our own).
    a, _, _ = _compared(theirs, R, mask)
    theirs_scale = float(np.max(np.abs(a))) if a.size and np.isfinite(a).all() else 0.0
    grow = max(1.0, theirs_scale / e["scale"]) if e["scale"] > 0 else 1.0
    return SiteResult(site=name, shape=tuple(np.shape(theirs)), letters=tuple(letters), max_abs=e["max_abs"],
                      max_rel=e["max_rel"], nmse_db=e["nmse_db"], cosine=e["cosine"], worst=e["worst"],
                      floor=SAFETY * honest + slack, local_max_abs=local["max_abs"], local_max_rel=local["max_rel"],
                      local_worst=local["worst"], local_floor=(SAFETY * honest_local + slack) * grow,
                      scale=e["scale"], nonfinite=e["nonfinite"],
                      logits=logit_metrics(theirs, R, top_k) if name.startswith("logits") else None)


def _summary_site(cfg, name, letters, summary, runs: _Runs, profile: Profile) -> SiteResult:
    """A site the other side printed only in part (llama.cpp's llama-debug: some elements and the sum): its
    printed elements, by their index in the whole tensor, and its sum over the rows it holds (`Summary.rows`),
    each against a floor derived as for whole sites, plus what the printing itself may cost (`Summary.resolution`;
    for a total summed in float32 as it ran, `running_sum_rounding`); the worse of the two, relative to its floor,
    is the site's error. No local error (a replay needs the whole array)."""
    R = np.asarray(runs.R[name], dtype=np.float64)
    F = np.asarray(runs.F[name], dtype=np.float64)
    scale = float(np.abs(R).max())
    idx = list(summary.elements)
    theirs = np.array([summary.elements[i] for i in idx], dtype=np.float64)
    ours = np.array([R[i] for i in idx], dtype=np.float64)
    honest = np.array([F[i] for i in idx], dtype=np.float64)
    e = errors(theirs, ours)
    floor = SAFETY * profile.scale * max_abs_error(honest, ours) + SLACK * profile.u * scale + summary.resolution
    max_abs = e["max_abs"]
    worst = dict(zip(letters, (int(i) for i in idx[e["worst"]["axis0"]]))) if idx else {}  # NumPy ints too
    if summary.total is not None:  # the sum over the rows printed: its own floor, derived the same way
        axis = symbolic_shapes(cfg)[name].index("T")
        rows = list(summary.rows) if summary.rows is not None else slice(None)
        Rs, Fs = np.take(R, rows, axis=axis) if summary.rows is not None else R, \
            np.take(F, rows, axis=axis) if summary.rows is not None else F
        sum_err = abs(summary.total - float(Rs.sum())) if math.isfinite(summary.total) else math.inf
        # The honest run's sum is one draw whose errors may happen to cancel. Errors of its sizes that do not cancel
        # by luck sum to about the root of their squares (independent) or to their own sum (one sign), times
        # SAFETY; or, correlated (an error in q moves a whole row of scores), to at most the sum of their sizes.
        d = Fs - Rs
        spread = max(SAFETY * max(abs(float(d.sum())), float(np.sqrt(np.vdot(d, d)))), float(np.abs(d).sum()))
        sum_floor = (profile.scale * spread + SLACK * profile.u * float(np.abs(Rs).sum())
                     + summary.total_resolution)
        if summary.total_sum == "float32":
            sum_floor += running_sum_rounding(Rs, letters, summary.total_order)
        if not idx or sum_err * floor > max_abs * sum_floor:  # the sum is the worse, relative to its floor
            max_abs, floor, worst = sum_err, sum_floor, {"sum": True}
    return SiteResult(site=name, shape=tuple(summary.shape), letters=tuple(letters), max_abs=max_abs,
                      max_rel=max_abs / scale if scale > 0 else math.inf, nmse_db=math.nan, cosine=math.nan,
                      worst=worst, floor=floor, local_max_abs=None, local_max_rel=None, local_worst=None,
                      local_floor=None, scale=scale, summary=True)


def running_sum_rounding(x, letters, order=None) -> float:
    """The most a running float32 sum of x's elements can differ from their exact sum by its own roundings.

    Math:   s_k = fl(s_{k-1} + x_k) has |s_k - (s_{k-1} + x_k)| <= u32 |s_k|, so |fl(sum) - sum| <= u32 sum_k |s_k|
            (to first order), with s_k the partial sums, here of the reference's x in the order the tool summed
    order:  x's axes in that order, slowest first, as letters of `letters` (None: x's own order)
    Shapes: x [...] (axes `letters`) -> a float
    """
    x = np.asarray(x, dtype=np.float64)
    if order is not None:
        x = x.transpose([list(letters).index(a) for a in order])
    return UNIT_ROUNDOFF["float32"] * float(np.abs(np.cumsum(x.ravel())).sum())


# ------------------------------------------------------------------------------------------------ diagnosis


def diagnose(model, tokens, wrong: str, theirs: dict, runs: _Runs, profile: Profile, floor: float) -> list[dict]:
    """Try every applicable catalogued mistake at the first wrong op and say which reproduce the other side.

    The op's local error covers the ops from just after the previous site the other side provides up to `wrong`
    (its *span*: everything the replay had to compute with our own arithmetic). Each mistake acts at the span's
    sites where it applies, in a replay resumed at the op's layer and stopped at `wrong` (one layer's work, not a
    forward pass), and its value there is compared with the other side's: it explains the other side when its
    error is within the same local floor (for a rounding mistake, see `Mistake.rounds_to`). Never claims a cause
    that does not reproduce.
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
    resume = None if order[start] == "embed" else (layer if layer is not None else cfg.n_layers - 1, runs.Pflow)
    mask = compared_mask(cfg, wrong, len(tokens))
    target = theirs[wrong]
    out = []
    for mistake in candidates(profile):
        if not kinds & set(mistake.kinds):
            continue

        def variant(name, value, record, mistake=mistake):
            l, kind = split_site(name)
            if name not in span or kind not in mistake.kinds:
                return None
            return mistake.compute(Op(name, l, kind, value, record, w64, cfg, tokens))

        kept, acted = {}, []

        def tracking(name, value, record, variant=variant):
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
        e = errors(target, value, mask)
        explains = e["max_abs"] <= floor
        evidence = None
        if mistake.rounds_to in _COARSER[profile.dtype]:
            explains, evidence = _rounded_to(mistake.rounds_to, target, value, floor, mask)
        out.append({"variant": mistake.name, "site": wrong, "acts_at": acted, "explains": bool(explains),
                    "max_abs": _num(e["max_abs"]), "floor": _num(floor), "says": mistake.says,
                    **({"evidence": evidence} if evidence else {})})
    out.sort(key=lambda d: (not d["explains"], d["max_abs"] if d["max_abs"] is not None else math.inf))
    return out


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

