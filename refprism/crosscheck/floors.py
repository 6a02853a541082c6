"""What an honest implementation's error is at a dtype: profiles, floors' constants and the metrics of a site.

floor = SAFETY * max|F - R| + SLACK * u * max|R| (docs/compare.md): F an honest run at the other side's dtype
(`Profile`, `WeightsAs`), R the float64 reference, u the dtype's unit roundoff. The metrics (`errors`,
`logit_metrics`) are those the package docstring defines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from refprism.crosscheck.capture import GgmlArithmetic
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.config import Config
from refprism.gemma.record import symbolic_shapes

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

    def get(self, l: int, key: str):
        return self._cast(self.params.get(l, key))

    # Gemma 4's per-layer embeddings (gemma.weights.Weights)
    @property
    def ple_norm(self):
        return self._cast(self.params.ple_norm)

    def ple_rows(self, ids):
        return self._cast(self.params.ple_rows(ids))

    def ple_model(self):
        return self._cast(self.params.ple_model())


def split_site(name: str) -> tuple[int | None, str]:
    """'blocks.3.attn.q' -> (3, 'attn.q'); 'logits' -> (None, 'logits')."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def pre_rope(record, cfg: Config, weights, l: int, kind: str):
    """RoPE's input at layer l from a record: q_pre / k_pre, through Gemma 3's q / k norm (with the recorded
    scale) where the model has one. Shapes: -> [T, heads, H]"""
    which = kind[-1]  # "q" or "k"
    x = record[f"blocks.{l}.attn.{which}_pre"]
    if cfg.qk_norm:
        x = ops.rms_apply(x, record[f"blocks.{l}.attn.{which}_norm.scale"], weights.block(l)[f"{which}_norm"],
                          cfg.norm_offset)
    return x


def compared_mask(cfg: Config, name: str, T: int):
    """The elements of a site that are compared: None (all) or, for scores, the [N, T, S] sources each query may
    see (causal, within the window on a sliding layer). Masked scores are never read by the softmax, and some
    implementations hold the mask's value there (HF's eager scores + mask, -inf, finfo.min)."""
    l, kind = split_site(name)
    if kind != "attn.scores":
        return None
    window = cfg.sliding_window if cfg.is_sliding(l) else None
    return np.broadcast_to(ops.causal_mask(T, window), (cfg.n_heads, T, T))


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


def summary_errors(cfg, name, letters, summary, value, R, F, profile: Profile) -> dict:
    """How far a printed summary is from an array `value` of the whole site, with the floors an honest
    implementation would need (the reference R, the honest run F): {"elements": (max_abs, floor, worst) over the
    printed elements, or (None, floor, {}) when none was printed; "sum": (error, floor, {"sum": True}) of the
    printed total over the rows it holds, or None}. `value` is R for the site's own error, or a catalogued
    mistake's value for the diagnosis from printed values (`catalogue.diagnose`)."""
    value = np.asarray(value, dtype=np.float64)
    R = np.asarray(R, dtype=np.float64)
    F = np.asarray(F, dtype=np.float64)
    scale = float(np.abs(R).max())
    idx = list(summary.elements)
    theirs = np.array([summary.elements[i] for i in idx], dtype=np.float64)
    ours = np.array([value[i] for i in idx], dtype=np.float64)
    honest = np.array([F[i] for i in idx], dtype=np.float64)
    ref = np.array([R[i] for i in idx], dtype=np.float64)
    floor = SAFETY * profile.scale * max_abs_error(honest, ref) + SLACK * profile.u * scale + summary.resolution
    out = {"elements": (None, floor, {}), "sum": None}
    if idx:
        e = errors(theirs, ours)
        worst = dict(zip(letters, (int(i) for i in idx[e["worst"]["axis0"]])))  # NumPy ints too
        out["elements"] = (e["max_abs"], floor, worst)
    if summary.total is not None:  # the sum over the rows printed: its own floor, derived the same way
        axis = symbolic_shapes(cfg)[name].index("T")
        rows = list(summary.rows) if summary.rows is not None else None
        take = (lambda a: np.take(a, rows, axis=axis)) if rows is not None else (lambda a: a)
        Vs, Rs, Fs = take(value), take(R), take(F)
        sum_err = abs(summary.total - float(Vs.sum())) if math.isfinite(summary.total) else math.inf
        # The honest run's sum is one draw whose errors may happen to cancel. Errors of its sizes that do not cancel
        # by luck sum to about the root of their squares (independent) or to their own sum (one sign), times
        # SAFETY; or, correlated (an error in q moves a whole row of scores), to at most the sum of their sizes.
        d = Fs - Rs
        spread = max(SAFETY * max(abs(float(d.sum())), float(np.sqrt(np.vdot(d, d)))), float(np.abs(d).sum()))
        sum_floor = (profile.scale * spread + SLACK * profile.u * float(np.abs(Rs).sum())
                     + summary.total_resolution)
        if summary.total_sum == "float32":
            sum_floor += running_sum_rounding(Rs, letters, summary.total_order)
        out["sum"] = (sum_err, sum_floor, {"sum": True})
    return out
