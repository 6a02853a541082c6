"""Pure math of a Gemma layer (Gemma 1, 2, 3), over NumPy arrays. No batch axis.

Axis legend (the same letters in every einsum of refprism):
    T query position   S source position   D model width      N query heads    K key/value heads
    H head width       F MLP width         V vocabulary       L layers         C components

Every function keeps its input's float dtype: constants are cast to x.dtype first, because NumPy 2 promotes
float32 * float64 to float64 silently.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def rms_norm(x, w, *, eps):
    """Gemma RMSNorm with unit offset: rms_scale, then rms_apply (the forward pass records s between the two).

    Math:   y = x / s * (1 + w),   s = sqrt(mean(x**2) + eps)
            Gemma trap: the checkpoint stores w, applied as (1 + w) (a zero w is the identity scale).
    Shapes: x [T, D], w [D] -> y [T, D], s [T]
    """
    s = rms_scale(x, eps=eps)
    return rms_apply(x, s, w), s


def rms_scale(x, *, eps):
    """The RMSNorm scale s = sqrt(mean(x**2) + eps) over the last axis.

    Stable: s = c * sqrt(mean((x / c)**2) + eps / c**2),  c = the power of 2 with c <= m < 2c,
            m = max(max|x|, sqrt(eps)). Dividing by a power of 2 is exact, so this is the same s, bit for bit,
            whenever x**2 neither overflows nor underflows; where it would (float32 |x| > 1.8e19: x**2 = inf and
            the naive s = inf), s stays finite.
    Shapes: x [..., D] -> s [...]
    """
    eps = np.asarray(eps, dtype=x.dtype)
    m = np.maximum(np.abs(x).max(axis=-1), np.sqrt(eps))  # [T]
    _, k = np.frexp(m)  # m = f * 2**k, 0.5 <= f < 1 (k = 0 for m = 0, inf or nan)
    c = np.ldexp(np.ones_like(m), k - 1)  # [T], c = 2**(k - 1) <= m, in x's dtype
    xc = x / c[..., None]  # exact; |xc| < 2
    return c * np.sqrt(np.mean(xc * xc, axis=-1) + eps / c / c)  # eps / c / c, not eps / c**2: may under/overflow


def rms_apply(x, s, w, offset=1):
    """Apply a (possibly frozen) RMSNorm scale: y = x / s * (offset + w).

    Math:   Gemma 1-3: y = x / s * (1 + w);  Gemma 4 (offset 0, Config.norm_offset): y = x / s * w
            Gemma trap: a Gemma 4 norm scales by w itself (its weights start at 1); w = None is a norm without a
            learned scale (Gemma 4's v_norm and the router's norm): y = x / s
    Shapes: x [..., D], s [...], w [D] or None -> y [..., D]
    """
    if w is None:
        return x / s[..., None]
    if offset == 0:
        return x / s[..., None] * w.astype(x.dtype)
    return x / s[..., None] * (1 + w.astype(x.dtype))


def rope_tables(positions, d_head, theta, dtype, partial=1.0):
    """cos and sin of the rotary angles, in float64 then rounded once to `dtype`.

    Math:   inv_freq_i = theta ** (-2i / H),  i = 0 .. H/2 - 1
            angle[t, i] = positions[t] * inv_freq_i,  repeated for both halves: [.., H/2] -> [.., H]
            Gemma 4's "proportional" RoPE (partial = p < 1, full layers): only i < R = int(p * H // 2) rotate,
            inv_freq_i = 0 for i >= R (cos 1, sin 0: those dims pass unchanged). The pairs stay (i, i + H/2) over
            the whole head: with H = 512, p = 0.25 dims [0, 64) and [256, 320) rotate, with the frequencies
            theta ** (-2i / 512) (HF: _compute_proportional_rope_parameters). Gemma trap: not the contiguous
            first p*H dims of NeoX-style partial rotary.
    Shapes: positions [T] -> cos [T, H], sin [T, H]
    """
    inv_freq = float(theta) ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)  # [H/2]
    if partial != 1.0:
        inv_freq[int(partial * d_head // 2):] = 0.0
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, H/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, H]: split-half layout
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rotate_half(x):
    """Split-half rotation partner: [x1, x2] -> [-x2, x1] over the last axis (Gemma/HF, not interleaved).

    Shapes: x [..., H] -> [..., H]
    """
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def rope(x, cos, sin):
    """Rotary position embedding, split-half convention (Gemma trap: not Llama's interleaved pairs).

    Math:   rope(x)[t] = x[t] * cos[t] + rotate_half(x[t]) * sin[t]
            (dimension i is rotated together with dimension i + H/2 by angle[t, i])
            Computed as the two halves, x1 cos - x2 sin and x2 cos + x1 sin, with no rotated copy of x: the same
            numbers bit for bit (x*cos + (-x2)*sin is x*cos - x2*sin exactly).
    Shapes: x [T, heads, H], cos/sin [T, H] -> [T, heads, H]
    """
    half = x.shape[-1] // 2
    out = x * cos[:, None, :]
    out[..., :half] -= x[..., half:] * sin[:, None, :half]
    out[..., half:] += x[..., :half] * sin[:, None, half:]
    return out


def gelu_tanh(x):
    """GELU, tanh approximation (Gemma trap: not the exact erf GELU).

    Math:   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            evaluated in that order (0.044715 x x x left to right), in place in one temporary.
    Shapes: any -> same
    """
    c = np.asarray(np.sqrt(2.0 / np.pi), dtype=x.dtype)
    k = np.asarray(0.044715, dtype=x.dtype)
    half = np.asarray(0.5, dtype=x.dtype)
    scalar = np.ndim(x) == 0
    x = np.asarray(x)
    t = np.multiply(k, x, out=np.empty_like(x))  # (an array even for one value: the steps below are in place)
    t *= x
    t *= x
    t += x
    t *= c
    np.tanh(t, out=t)
    t += 1
    out = np.multiply(half, x, out=np.empty_like(x))
    out *= t
    return out[()] if scalar else out


def causal_mask(T, window=None):
    """Which sources each query position sees: s <= t, and t - s < window on a sliding-window layer.

    Shapes: -> [T, S=T] bool
    """
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = s <= t
    if window is not None:
        allowed &= s > t - window  # Gemma 2/3 sliding layers (HF: kv_idx > q_idx - sliding_window)
    return allowed


def softcap(x, cap):
    """Soft-capping (Gemma 2): cap * tanh(x / cap), close to x for |x| << cap, bounded by cap.

    Shapes: any -> same
    """
    cap = np.asarray(cap, dtype=x.dtype)
    return cap * np.tanh(x / cap)


# A product x W of a few rows x against a wide W (a short prompt's weight products; its unembedding, [7, D] x
# [D, 262144]) runs near W's streaming rate when cut into column slices of at most this many multiply-adds
# (M N K) each: OpenBLAS's small-matrix kernels (its SkylakeX build) take such products without first packing W,
# which one big product does (2-2.5x slower at T = 7 on an AVX-512 Xeon, docs/performance.md; with the Haswell
# kernels, which have no small-matrix path, 32-column slices of [7, 2816] x [2816, 262144] took 0.52 s on one
# thread against 0.63 s for wider slices, which give the big product's bits).
SLICE_MNK = 1_000_000

# The slices of a product that streams fewer bytes of W than this run on the calling thread alone: waking a pool
# thread costs more than it saves there ([7, 1536] x [1536, 1024], 6.3 MB: 0.66 ms on one thread, 0.78 ms on two;
# 12.6 MB: 1.15 against 0.83 ms), and a thread that is slow to wake stalls the product (up to 16 ms seen).
SLICE_THREAD_BYTES = 8 << 20


def slice_width(T: int, K: int) -> int | None:
    """The column-slice width `matmul` uses for x [T, K]: the largest power of two (at most 4096) with
    T * width * K <= SLICE_MNK, or None (one product) when that is under 8."""
    width = 4096
    while width >= 8 and T * width * K > SLICE_MNK:
        width //= 2
    return width if width >= 8 else None


def matmul(x: np.ndarray, W: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x W for x [T, K], W [K, N] with any strides BLAS takes (a transposed view of a stored [N, K] included).

    Few rows (slice_width): in column slices W[:, i : i + width] at multiples of the width, each its own BLAS
    product, so an output's bits depend only on x and its slice (not on where a caller's W starts if at a multiple
    of 4096: weights.unembed's chunks), all in one batched product (_slices_product). Only where W's columns are
    contiguous in memory (W.strides[0] == itemsize: a transposed view of a stored [N, K], as W_gate, the experts
    and the unembedding): a slice of a row-major W reads `width` floats of every row, 1.2-3.5 GB/s against
    6.4-8.2 GB/s for one product (W_Q, W_O: [2048, 2048] at T = 16, [1536, 2048] at T = 7, one thread).
    Otherwise one BLAS product.
    Shapes: x [T, K], W [K, N] -> out [T, N]
    """
    T, K = x.shape
    N = W.shape[1]
    if out is None:
        out = np.empty((T, N), np.result_type(x, W))
    width = slice_width(T, K)
    if width is None or N <= width or W.strides[0] != W.itemsize:
        return np.matmul(x, W, out=out)
    whole = N // width  # whole slices in one batched product; a last narrower one on its own
    _slices_product(x, W, out, width, whole)
    if whole * width < N:
        np.matmul(x, W[:, whole * width:], out=out[:, whole * width:])
    return out


def _slices_product(x, W, out, width, n):
    """The first n column slices of matmul's x W as batched np.matmul calls over [n, K, width] views of W and out
    (splitting the column axis is a view, never a copy): one BLAS call per slice, made from C (a Python loop over
    the slices cost about 6% more at T = 7, and holds the GIL between calls). With threads() > 1 and at least two
    rows and a W of at least SLICE_THREAD_BYTES, the slices are cut into 8 runs a thread, which the threads (the
    calling one included) take in turn: a batched
    np.matmul releases the GIL, and OpenBLAS runs each small-kernel slice on the thread that calls it, so the runs
    stream W side by side (a [16, 2048] x [2048, 16384] MLP product: 4.6 -> 10.3 GB/s on two threads,
    docs/performance.md). The same BLAS
    call per slice whatever the thread count: the same bits."""
    Wb = W[:, :n * width].reshape(W.shape[0], n, width).transpose(1, 0, 2)
    ob = out[:, :n * width].reshape(out.shape[0], n, width).transpose(1, 0, 2)
    # one row: a matrix-vector product OpenBLAS may thread itself; inside `each`'s tasks: on the task's own thread;
    # a small W (SLICE_THREAD_BYTES): on this thread
    small = n * width * W.shape[0] * W.itemsize < SLICE_THREAD_BYTES
    k = min(threads(), n) if x.shape[0] > 1 and not small and not getattr(_TASK, "serial", False) else 1
    if k == 1:
        np.matmul(x, Wb, out=ob)
        return
    m = min(n, 8 * k)  # runs, taken in turn by whichever thread is free: a late or slowed thread takes fewer
    cuts = [n * i // m for i in range(m + 1)]
    runs = queue.SimpleQueue()  # thread-safe without relying on the GIL
    for i in range(m):
        runs.put(i)

    def work():
        while True:
            try:
                i = runs.get_nowait()
            except queue.Empty:
                return
            np.matmul(x, Wb[cuts[i]:cuts[i + 1]], out=ob[cuts[i]:cuts[i + 1]])

    helpers = _submit(k - 1, work)
    work()
    for helper in helpers:
        helper.result()


_TASK = threading.local()  # .serial: this thread is running one of `each`'s tasks


def each(items, fn) -> None:
    """fn(item) for every item, on threads() threads that take the items in turn as they come free (the calling
    one included): many small independent products, such as a mixture of experts' experts, side by side. Inside a
    task the products run on the task's own thread (matmul's slices are not threaded again; the same BLAS call
    per slice, so the same bits as one thread). fn must write only its own item's outputs. An exception in a task
    is raised here once every thread has stopped."""
    items = list(items)
    k = min(threads(), len(items))
    if k <= 1 or getattr(_TASK, "serial", False):
        for item in items:
            fn(item)
        return
    todo = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)

    def work():
        _TASK.serial = True
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                fn(items[i])
        finally:
            _TASK.serial = False

    helpers = _submit(k - 1, work)
    try:
        work()
    finally:
        for helper in helpers:
            helper.exception()  # waits
    for helper in helpers:
        helper.result()


def threads() -> int:
    """How many threads matmul's slices run on: REFPRISM_THREADS, else OPENBLAS_NUM_THREADS, else
    OMP_NUM_THREADS, else the CPUs this process may run on. Read at every call (a few microseconds against a
    product of thousands of slices), so a caller may change it between runs."""
    for key in ("REFPRISM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_POOL: list = [None, 0]  # the worker pool of _slices_product and its size
_POOL_LOCK = threading.Lock()


def _submit(workers: int, fn) -> list:
    """fn on each of `workers` threads of a process-wide pool (made again, larger, when a call wants more workers
    than it has: a call that wants fewer submits fewer tasks, so the slices of a narrow product and `each`'s
    experts, which want different counts, share one pool; the check and the submits under one lock, so no caller
    submits to a pool another has just shut down). Its tasks never wait on other tasks (single BLAS calls, or
    `each`'s serial tasks), so callers on many threads (graphs' passes) may share it."""
    with _POOL_LOCK:
        if _POOL[1] < workers:
            if _POOL[0] is not None:
                _POOL[0].shutdown(wait=False)
            _POOL[:] = [ThreadPoolExecutor(workers, thread_name_prefix="refprism-matmul"), workers]
        return [_POOL[0].submit(fn) for _ in range(workers)]


def _forget_pool():
    """A forked child has none of its parent's threads: it makes its own pool when it first needs one."""
    global _POOL_LOCK
    _POOL[:] = [None, 0]
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def zeros(shape, dtype, *, sparse_from=2**20):
    """A zero array whose pages are only made resident when written (for arrays of at least `sparse_from` bytes).

    The banded softmax writes a long prompt's pattern only near the diagonal (and within the window on sliding
    layers); the rest stays zero. An anonymous memory map of 4 KiB pages (NumPy's own zeros ask the kernel for
    2 MiB pages, which the band would touch whole) leaves those zeros unbacked: a sliding layer of Gemma 3 at
    T = 2048 keeps about 60% of its pattern's bytes.
    """
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n < sparse_from:
        return np.zeros(shape, dtype)
    try:
        import mmap

        buffer = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (ImportError, AttributeError, OSError, ValueError):
        return np.zeros(shape, dtype)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


# Query rows per block of the banded softmax and mixing: each block reads only the sources its rows may see.
ROW_BLOCK = 128


def source_range(r0, r1, window=None):
    """The sources that query rows r0 .. r1-1 may see together: [c0, r1) (causal; within the window if any)."""
    return (0 if window is None else max(0, r0 - window + 1)), r1


def causal_softmax(scores, window=None, *, cap=None, row_block=ROW_BLOCK):
    """Softmax over the sources a query may see (causal; within the window on a sliding-window layer).

    Math:   a = softcap(scores, cap) if cap else scores                       (Gemma 2 caps the scores first)
            pattern[n, t, s] = exp(a[n,t,s] - m) / sum_{s' allowed} exp(a[n,t,s'] - m)  for allowed s, else 0
            with m = max over allowed s of a[n, t, s] (subtracted for stability; it cancels).
    Banded: query rows go in blocks of `row_block`; a block reads only its sources [c0, r1) (source_range), where
            its masked entries are -inf (exp gives 0), and writes only there: the rest of the pattern stays the
            zeros it starts as. A long prompt's sliding layers (Gemma 2/3: window 512 or 1024 of T sources) and the
            upper triangle of the full layers cost nothing, and no temporary is larger than one block.
    Shapes: scores [N, T, S] (T == S) -> pattern [N, T, S]
    """
    N, T, S = scores.shape
    pattern = zeros(scores.shape, scores.dtype)
    for r0 in range(0, T, row_block):
        r1 = min(T, r0 + row_block)
        c0, c1 = source_range(r0, r1, window)
        pattern[:, r0:r1, c0:c1] = _softmax_block(scores[:, r0:r1, c0:c1].copy(), r0, c0, window, cap)
    return pattern


def _softmax_block(e, r0, c0, window, cap):
    """causal_softmax on one block of query rows r0.. and their sources c0.. (e [N, rows, sources]), in place."""
    if cap is not None:  # cap * tanh(x / cap), in place
        capv = np.asarray(cap, dtype=e.dtype)
        np.divide(e, capv, out=e)
        np.tanh(e, out=e)
        np.multiply(e, capv, out=e)
    t, s = np.arange(r0, r0 + e.shape[1])[:, None], np.arange(c0, c0 + e.shape[2])[None, :]
    blocked = s > t if window is None else (s > t) | (s <= t - window)
    np.copyto(e, np.asarray(-np.inf, dtype=e.dtype), where=blocked)
    with np.errstate(over="ignore"):  # a - m may pass -inf for scores near -float max: exp gives the same 0
        np.subtract(e, e.max(axis=-1, keepdims=True), out=e)
    np.exp(e, out=e)
    np.divide(e, e.sum(axis=-1, keepdims=True), out=e)
    return e


def kv_index(n_heads, n_kv_heads):
    """Which key/value head each query head reads: heads are grouped consecutively (HF repeat_kv).

    gemma-2b: N = 8, K = 1 -> [0, 0, 0, 0, 0, 0, 0, 0] (multi-query attention); gemma-7b: N = K = 16 -> identity.
    Shapes: -> [N] int
    """
    return np.arange(n_heads) // (n_heads // n_kv_heads)


def attention_scores(q, k, scale, window=None, *, row_block=ROW_BLOCK):
    """Attention scores as BLAS products per key/value head, over the query heads that share it.

    Math:   scores[n, t, s] = (q[t, n] . k[s, kv(n)]) * scale
            For kv head j, the G = N / K query heads n = jG .. jG + G - 1 give products [G*rows, H] @ [H, sources]
            (q laid out head-major once, [N, T, H]: a copy of q's size, small beside the scores). They go in the
            blocks of causal_softmax: per block of `row_block` query rows, first its band of sources [c0, r1)
            (source_range), then the sources outside it (masked later, recorded all the same). attention_pattern
            computes the bands with the same products, so its pattern is, bit for bit, causal_softmax of these
            scores with the same window.
    Shapes: q [T, N, H], k [S, K, H] -> scores [N, T, S]
    """
    T, N, H = q.shape
    S = k.shape[0]
    qn = np.ascontiguousarray(q.transpose(1, 0, 2))  # [N, T, H]
    scores = np.empty((N, T, S), dtype=q.dtype)
    if T != S:  # not a causal square (no band): one product per kv head
        _score_block(qn, k, scale, 0, T, 0, S, out=scores)
        return scores
    for r0 in range(0, T, row_block):
        r1 = min(T, r0 + row_block)
        c0, c1 = source_range(r0, r1, window)
        for a, b in ((c0, c1), (0, c0), (c1, S)):  # the band first, then what is masked
            if b > a:
                _score_block(qn, k, scale, r0, r1, a, b, out=scores[:, r0:r1, a:b])
    return scores


def attention_pattern(q, k, scale, window=None, *, cap=None, row_block=ROW_BLOCK):
    """causal_softmax(attention_scores(q, k, scale, window), window, cap=cap), bit for bit, without the scores.

    Math:   as attention_scores and causal_softmax; each block of query rows computes only its band of scores
            (the same products as attention_scores) and turns it into pattern rows at once: the masked scores
            are never computed and no [N, T, S] scores array is made. The forward pass uses it when nobody reads
            the scores then (the record keeps them lazily: attention_scores again, on the recorded q and k).
    Shapes: q [T, N, H], k [S, K, H] -> pattern [N, T, S] (T == S)
    """
    T, N, H = q.shape
    qn = np.ascontiguousarray(q.transpose(1, 0, 2))  # [N, T, H]
    pattern = zeros((N, T, k.shape[0]), q.dtype)
    for r0 in range(0, T, row_block):
        r1 = min(T, r0 + row_block)
        c0, c1 = source_range(r0, r1, window)
        e = np.empty((N, r1 - r0, c1 - c0), dtype=q.dtype)
        _score_block(qn, k, scale, r0, r1, c0, c1, out=e)
        pattern[:, r0:r1, c0:c1] = _softmax_block(e, r0, c0, window, cap)
    return pattern


def _score_block(qn, k, scale, r0, r1, c0, c1, *, out):
    """out[n, t - r0, s - c0] = (qn[n, t] . k[s, kv(n)]) * scale for t in [r0, r1), s in [c0, c1).

    One product [G*rows, H] @ [H, sources] per kv head into a fresh array (the same call, so the same bits,
    whatever `out` is), then scaled into `out`."""
    N, _, H = qn.shape
    K = k.shape[1]
    G = N // K
    rows, cols = r1 - r0, c1 - c0
    for j in range(K):
        heads = slice(j * G, (j + 1) * G)
        block = np.matmul(qn[heads, r0:r1].reshape(G * rows, H), k[c0:c1, j, :].T)
        np.multiply(block.reshape(G, rows, cols), np.asarray(scale, dtype=qn.dtype), out=out[heads])


def attention_mix(pattern, v, out=None, *, window=None, banded=True, row_block=ROW_BLOCK):
    """The pattern-weighted values, as BLAS products over the sources each block of query rows may see.

    Math:   z[t, n] = sum_s pattern[n, t, s] v[s, kv(n)]   (pattern[n, t, s] = 0 outside s <= t, t - s < window)
            For query rows r0 .. r1-1 and kv head j: pattern[jG:(j+1)G, r0:r1, c0:r1] @ v[c0:r1, j] with
            [c0, r1) = source_range(r0, r1, window): the sources outside are exact zeros of the pattern.
    banded: False for a pattern that may hold weight outside the band (one an edit replaced, e.g. another
            implementation's in a replay): then every source of every row is read.
    out:    an optional [N, T, H] array (or a view of one) to write into.
    Shapes: pattern [N, T, S], v [S, K, H] -> z [T, N, H] (a transposed view of an [N, T, H] array)
    """
    N, T, S = pattern.shape
    K, H = v.shape[1], v.shape[2]
    G = N // K
    if out is None:
        out = np.empty((N, T, H), dtype=v.dtype)
    for r0 in range(0, T, row_block if banded else T):
        r1 = min(T, r0 + row_block) if banded else T
        c0, c1 = source_range(r0, r1, window) if banded else (0, S)
        for j in range(K):
            heads = slice(j * G, (j + 1) * G)
            np.matmul(pattern[heads, r0:r1, c0:c1], v[c0:c1, j, :], out=out[heads, r0:r1])
    return out.transpose(1, 0, 2)


def attention(q, k, v, *, scale=None, cap=None, window=None):
    """Causal multi-head attention with key/value heads shared by groups of query heads.

    Math:   scores[n, t, s] = q[t, n] . k[s, kv(n)] * scale     (Gemma 1: scale = H ** -0.5;
                                                               Gemma 2/3: query_pre_attn_scalar ** -0.5)
            pattern = causal_softmax(softcap(scores, cap) if cap else scores, window)
            z[t, n] = sum_s pattern[n, t, s] v[s, kv(n)]
    The forward pass calls the three steps itself (attention_scores, causal_softmax, attention_mix) so that it can
    record, and let an edit replace, the scores and the pattern in between.
    Shapes: q [T, N, H], k [S, K, H], v [S, K, H] -> scores [N, T, S], pattern [N, T, S], z [T, N, H]
    """
    H = q.shape[2]
    scores = attention_scores(q, k, H ** -0.5 if scale is None else scale, window)
    pattern = causal_softmax(scores, window, cap=cap)
    return scores, pattern, attention_mix(pattern, v, window=window)


def geglu(x, W_gate, W_up):
    """Gated GELU MLP input: the neuron activations.

    Math:   gate = x W_gate,  up = x W_up,  act = gelu_tanh(gate) * up
    Shapes: x [T, D], W_gate/W_up [D, F] -> gate, up, act [T, F]
    """
    gate = x @ W_gate
    up = x @ W_up
    return gate, up, gelu_tanh(gate) * up


def route_topk(logits, k, expert_scale):
    """Gemma 4's MoE router after its logits: softmax over the experts, the k most probable, renormalised over
    the k, times each chosen expert's scale (HF: Gemma4TextRouter).

    Math:   p = softmax(r) over the E experts;  top = the k largest p (ties: the lower expert first)
            w_j = p[top_j] / sum_j' p[top_j'] * c[top_j]          (c = per_expert_scale; top-k before renormalising)
    Shapes: logits [T, E], expert_scale [E] -> top [T, k] (int), w [T, k]
    """
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, top, axis=-1)
    return top, w / w.sum(axis=-1, keepdims=True) * expert_scale[top]


# ------------------------------------------------------------------------------------ vector-Jacobian products
#
# The backward pass (refprism/gradients/backward.py) runs these in reverse forward order. Each takes the gradient
# g of the readout with respect to its op's output and returns the gradients with respect to its inputs.
# Gradients carry a leading readout axis Z (one row per readout row: target, or target minus foils), so one pass
# computes many rows: g [Z, *output shape] -> [Z, *input shape]. The forward values they read (x, s, pattern, ...)
# have no Z axis. docs/math.md section 5 derives each line.


def embed_vjp(g, normalizer):
    """Through the sqrt(D) embedding scale: the gradient with respect to the embedding rows E[tokens].

    Math:   x_0 = E[tokens] * sqrt(D)  =>  dR/dE[tokens] = g * sqrt(D)   (the normalizer as the forward rounded it)
    Shapes: g [Z, T, D] -> [Z, T, D]
    """
    return g * np.asarray(normalizer, dtype=g.dtype)


def rms_apply_vjp(g, x, s, w, *, offset=1, scale_grad=True):
    """Through y = x / s * (offset + w) with s an input of its own (the norm scale is a recorded site).

    Math:   dR/dx|_s = g * (offset + w) / s
            dR/ds    = -sum_d g_d x_d (offset + w_d) / s^2  = -sum_d g_d y_d / s
            offset = 1 for every Gemma 1/2/3 norm (the (1 + w) trap); Gemma 4 applies w itself (offset = 0); a norm
            without a weight (Gemma 4's v norm) is w = None: the gain is 1.
    scale_grad: False skips dR/ds (None), for a backward that neither reads nor keeps it
    Shapes: g [Z, ..., D], x [..., D], s [...], w [D] or None -> g_x [Z, ..., D], g_s [Z, ...]
    """
    gain = np.ones((), dtype=g.dtype) if w is None else (np.asarray(offset, dtype=g.dtype) + w.astype(g.dtype))
    gx = g * (gain / s[..., None])
    gs = -np.sum(gx * x, axis=-1) / s if scale_grad else None
    return gx, gs


def rms_scale_vjp(g_s, x, s):
    """Through the norm scale s = sqrt(mean_d x_d^2 + eps): skipped when the norm is frozen.

    Math:   ds/dx_d = x_d / (D s)  =>  dR/dx += g_s * x / (D s)
    Shapes: g_s [Z, ...], x [..., D], s [...] -> [Z, ..., D]
    """
    D = np.asarray(x.shape[-1], dtype=g_s.dtype)
    return g_s[..., None] * (x / (D * s[..., None]))


def rms_norm_vjp(g, x, s, w, *, offset=1, frozen=False, scale_grad=True):
    """RMSNorm's whole VJP: rms_apply_vjp, then (unless the scale is frozen) rms_scale_vjp.

    Math:   dR/dx = g (offset + w) / s + [not frozen] (dR/ds) x / (D s)
    scale_grad: False with frozen skips dR/ds (None): a frozen scale's gradient that nothing keeps
    Shapes: g [Z, ..., D] -> g_x [Z, ..., D], g_s [Z, ...]
    """
    gx, gs = rms_apply_vjp(g, x, s, w, offset=offset, scale_grad=scale_grad or not frozen)
    if not frozen:
        gx = gx + rms_scale_vjp(gs, x, s)
    return gx, gs


def rope_vjp(g, cos, sin):
    """Through split-half RoPE: the transpose of a rotation is the rotation by the opposite angle.

    Math:   rope: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin  (per pair i, i + H/2)
            =>   g_x1 = g1 cos + g2 sin, g_x2 = g2 cos - g1 sin  = rope(g, cos, -sin)
    Shapes: g [Z, T, heads, H], cos/sin [T, H] -> [Z, T, heads, H]
    """
    half = g.shape[-1] // 2
    out = g * cos[:, None, :]
    out[..., :half] += g[..., half:] * sin[:, None, :half]
    out[..., half:] -= g[..., :half] * sin[:, None, half:]
    return out


def gelu_tanh_grad(x):
    """d gelu_tanh / dx.

    Math:   gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
            gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
            (for large |gate| tanh(u) = +-1 exactly: gelu' is 1 or 0, with no 0 * inf)
    Shapes: any -> same
    """
    c = np.asarray(np.sqrt(2.0 / np.pi), dtype=x.dtype)
    k = np.asarray(0.044715, dtype=x.dtype)
    half = np.asarray(0.5, dtype=x.dtype)
    t = np.tanh(c * (x + k * x * x * x))
    return half * (1 + t) + half * x * (1 - t * t) * c * (1 + 3 * k * x * x)


def geglu_vjp(g_act, gate, up, *, frozen=False):
    """Through act = gelu_tanh(gate) * up.

    Math:   dR/dup   = g * gelu(gate)
            dR/dgate = g * up * gelu'(gate)          (0 when the gelu(gate) factor is frozen: act = G_0 * up)
    Shapes: g_act [Z, T, F], gate/up [T, F] -> g_gate [Z, T, F], g_up [Z, T, F]
    """
    if frozen:
        return np.zeros_like(g_act), g_act * gelu_tanh(gate)
    gelu, grad = gelu_tanh_and_grad(gate)
    grad *= up  # up * gelu'(gate)
    return g_act * grad, g_act * gelu


def gelu_tanh_and_grad(x):
    """gelu_tanh(x) and gelu_tanh_grad(x) at once, bit for bit those two functions' values: the same operations
    in the same order, tanh(u) computed once, every step in place (a [T, F] array's temporaries cost more than
    the arithmetic).

    Math:   t = tanh(u),  u = sqrt(2/pi) (x + 0.044715 x^3)
            gelu = (0.5 x) (1 + t);  gelu' = 0.5 (1 + t) + (0.5 x) (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    Shapes: x [...] (an array) -> gelu, gelu' [...]
    """
    c = np.asarray(np.sqrt(2.0 / np.pi), dtype=x.dtype)
    k = np.asarray(0.044715, dtype=x.dtype)
    half = np.asarray(0.5, dtype=x.dtype)
    t = np.multiply(k, x)  # u = c (x + k x x x), as gelu_tanh computes it
    t *= x
    t *= x
    t += x
    t *= c
    np.tanh(t, out=t)
    one_t = np.add(t, 1)  # 1 + t
    gelu = np.multiply(half, x)
    gelu *= one_t
    b = np.multiply(half, x)  # ((0.5 x) (1 - t t)) c (1 + (3k x) x)
    np.multiply(t, t, out=t)
    np.subtract(1, t, out=t)
    b *= t
    b *= c
    np.multiply(3 * k, x, out=t)
    t *= x
    t += 1
    b *= t
    one_t *= half  # 0.5 (1 + t) + b
    one_t += b
    return gelu, one_t


def softcap_factor(x, cap):
    """The soft-cap as a factor: softcap(x, cap) = x * r(x), r = cap tanh(x / cap) / x (r(0) = 1).

    Shapes: any -> same
    """
    capv = np.asarray(cap, dtype=x.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = capv * np.tanh(x / capv) / x
    return np.where(x == 0, np.ones((), dtype=x.dtype), r)


def softcap_vjp(g, x, cap, *, frozen=False):
    """Through y = cap tanh(x / cap).

    Math:   dR/dx = g (1 - tanh(x / cap)^2)                    (true derivative; near the cap it goes to 0)
            frozen: y = x * r(x_0), r held at the recorded x_0 => dR/dx = g r(x_0)      (softcap_factor)
    Shapes: g [Z, ...], x [...] -> [Z, ...]
    """
    if frozen:
        return g * softcap_factor(x, cap)
    t = np.tanh(x / np.asarray(cap, dtype=x.dtype))
    return g * (1 - t * t)


def softmax_vjp(g, pattern):
    """Through each row's softmax (causal, windowed: masked entries have pattern 0 and get gradient 0).

    Math:   p = softmax(a) over the allowed s:  dR/da_s = p_s (g_s - sum_s' p_s' g_s')
    Shapes: g [Z, N, T, S], pattern [N, T, S] -> [Z, N, T, S]
    """
    out = np.multiply(g, pattern)  # (in place from here: pattern * (g - <g, p>) in one [Z, N, T, S] array)
    row = np.sum(out, axis=-1, keepdims=True)
    np.subtract(g, row, out=out)
    out *= pattern
    return out


MIX_BLOCK = 256  # attention_mix_vjp's source block: its queries are the span that reads the block


def attention_mix_vjp(g_z, pattern, v, *, pattern_grad=True):
    """Through z[t, n] = sum_s pattern[n, t, s] v[s, kv(n)] (query heads grouped on their shared kv head).

    Math:   dR/dpattern[n, t, s] = g_z[t, n] . v[s, kv(n)]
            dR/dv[s, k]          = sum_{n: kv(n) = k} sum_t pattern[n, t, s] g_z[t, n]
    pattern_grad: False skips dR/dpattern (None): a backward with the pattern frozen that keeps no pattern gradient
    dR/dv is summed over the queries t that attend to each block of sources s only (pattern[., t, s] != 0: t >= s,
    and within the window): the causal triangle's and the window's zeros are skipped, not multiplied.
    Shapes: g_z [Z, T, N, H], pattern [N, T, S], v [S, K, H] -> g_pattern [Z, N, T, S], g_v [Z, S, K, H]
    """
    Z, _, N, H = g_z.shape
    S, K = v.shape[0], v.shape[1]
    kv = kv_index(N, K)
    g_pattern = np.einsum("ztnh,snh->znts", g_z, v[:, kv, :], optimize=True) if pattern_grad else None
    g_vn = np.zeros((Z, N, S, H), np.result_type(pattern, g_z))  # per query head
    reads = (pattern != 0).any(axis=0)  # [T, S]: which queries read each source
    p_t = pattern.transpose(0, 2, 1)  # [N, S, T] views: matmul reads them in place
    g_t = g_z.transpose(0, 2, 1, 3)  # [Z, N, T, H]
    for s0 in range(0, S, MIX_BLOCK):
        s1 = min(S, s0 + MIX_BLOCK)
        t = np.flatnonzero(reads[:, s0:s1].any(axis=1))
        if len(t):
            t0, t1 = t[0], t[-1] + 1
            np.matmul(p_t[None, :, s0:s1, t0:t1], g_t[:, :, t0:t1], out=g_vn[:, :, s0:s1])  # sum_t p[n,t,s] g[t,n]
    # each kv head's query heads summed in place (no [Z, S, N, H] copy first): the same sums, in the same order
    return g_pattern, g_vn.reshape(Z, K, N // K, S, H).sum(axis=2).transpose(0, 2, 1, 3)


def attention_scores_vjp(g_scores, q, k, scale):
    """Through scores[n, t, s] = (q[t, n] . k[s, kv(n)]) * scale.

    Math:   dR/dq[t, n] = scale sum_s g[n, t, s] k[s, kv(n)]
            dR/dk[s, j] = scale sum_{n: kv(n) = j} sum_t g[n, t, s] q[t, n]
    Shapes: g_scores [Z, N, T, S], q [T, N, H], k [S, K, H] -> g_q [Z, T, N, H], g_k [Z, S, K, H]
    """
    Z, N, _, S = g_scores.shape
    K, H = k.shape[1], k.shape[2]
    kv = kv_index(N, K)
    sc = np.asarray(scale, dtype=g_scores.dtype)
    g_q = sc * np.einsum("znts,snh->ztnh", g_scores, k[:, kv, :], optimize=True)
    g_kn = sc * np.einsum("znts,tnh->zsnh", g_scores, q, optimize=True)
    return g_q, g_kn.reshape(Z, S, K, N // K, H).sum(axis=3)


def route_topk_vjp(g_w, logits, top, expert_scale):
    """Through route_topk's weights w with the choice `top` held (a step function: it has no gradient).

    Math:   w_j = p_j / P * c_j,  P = sum_{i in top} p_i  =>  dR/dp_j = (c_j dR/dw_j - sum_i w_i dR/dw_i) / P
            (j chosen; 0 for the others), then the softmax over all E:  dR/dr_e = p_e (dR/dp_e - sum_e' p_e' dR/dp_e')
    Shapes: g_w [Z, T, k], logits [T, E], top [T, k] -> [Z, T, E]
    """
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    p_top = np.take_along_axis(p, top, axis=-1)  # [T, k]
    c = expert_scale[top]
    w = p_top / p_top.sum(axis=-1, keepdims=True) * c
    g_top = (c[None] * g_w - np.sum(w[None] * g_w, axis=-1, keepdims=True)) / p_top.sum(-1)[None, :, None]
    g_p = np.zeros(g_w.shape[:2] + (logits.shape[-1],), g_w.dtype)
    np.put_along_axis(g_p, np.broadcast_to(top[None], g_top.shape), g_top, axis=-1)
    return p[None] * (g_p - np.sum(g_p * p[None], axis=-1, keepdims=True))


def project_vjp(g, W):
    """Through a per-head projection y[t, j] = x[t] W[:, j] (W_Q, W_K, W_V: [D, heads, H]).

    Math:   dR/dx[t] = sum_j W[:, j] g[t, j]
    Shapes: g [Z, T, heads, H], W [D, heads, H] -> [Z, T, D]
    """
    Z, T = g.shape[:2]
    return g.reshape(Z, T, -1) @ W.reshape(W.shape[0], -1).T


def heads_out_vjp(g, W_O):
    """Through o = sum_n z[t, n] W_O[n] (o_proj).

    Math:   dR/dz[t, n] = W_O[n] g[t]
    Shapes: g [Z, T, D], W_O [N, H, D] -> [Z, T, N, H]
    """
    N, H, D = W_O.shape
    Z, T = g.shape[:2]
    return (g @ W_O.reshape(N * H, D).T).reshape(Z, T, N, H)



def softmax_key_change(g, pattern, s, delta):
    """AtP*'s key fix: the exact change of each row's <g, pattern> when source s's score moves by delta[t].

    Math:   a'[t] = a[t] + delta[t] e_s (a key change at source s moves one score of every row);  with p = the row's
            pattern and e = exp(delta) - 1:  p'_s = p_s (1 + e) / (1 + p_s e),  p'_j = p_j / (1 + p_s e) (j != s), so
                <g, p' - p> = e p_s (g_s - <g, p>) / (1 + p_s e)
            which -> delta p_s (g_s - <g, p>) as delta -> 0: softmax_vjp's term, the plain linear estimate.
            (exp(delta) - 1 as np.expm1, accurate for small delta; a masked source has p_s = 0: no change.)
    Shapes: g [..., T, S] (dR/dpattern), pattern [..., T, S], s int, delta [..., T] -> [..., T]
    """
    p_s = pattern[..., s]
    e = np.expm1(delta)
    return e * p_s * (g[..., s] - np.sum(g * pattern, axis=-1)) / (1 + p_s * e)


def softmax_row_change(g, a, a_new, window=None, *, cap=None):
    """AtP*'s query fix: the exact change of <g, pattern> when a row's scores change (a query change moves a
    whole row): each row's softmax recomputed, soft-cap and mask inside.

    Math:   <g, causal_softmax(a_new) - causal_softmax(a)> per row    (a, a_new: scores before the soft-cap)
    Shapes: g [N, T, S], a/a_new [N, T, S] -> [N, T]
    """
    diff = causal_softmax(a_new, window, cap=cap) - causal_softmax(a, window, cap=cap)
    return np.sum(g * diff, axis=-1)
