"""ops.py against literal hand-computed values, and the identities each op must satisfy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refprism.gemma import ops


def test_rms_norm_literal():
    # deepmind/gemma's own test: rms_norm([0.1, 0.2]) with w = 0 -> x / sqrt(mean(x^2)) = [0.6324429, 1.2648858]
    y, s = ops.rms_norm(np.array([[0.1, 0.2]], np.float32), np.zeros(2, np.float32), eps=1e-6)
    np.testing.assert_allclose(y, [[0.6324429, 1.2648858]], rtol=1e-5)
    np.testing.assert_allclose(s, [np.sqrt(0.025 + 1e-6)], rtol=1e-6)


def test_rms_norm_applies_one_plus_w():
    # (1 + w): w = [0.5, -1] scales by [1.5, 0]; a "w" instead of "1 + w" would give [0.5, -1]
    x = np.array([[3.0, 4.0]])
    y, s = ops.rms_norm(x, np.array([0.5, -1.0]), eps=0.0)
    s_true = np.sqrt((9 + 16) / 2)
    np.testing.assert_allclose(y, [[3 / s_true * 1.5, 0.0]], rtol=1e-12)


def test_rms_norm_of_constant_vector():
    # a constant vector c has rms |c|: the output is sign(c) (1 + w) (eps = 0)
    w = np.array([0.1, -0.2, 0.3, 0.0])
    y, s = ops.rms_norm(np.full((1, 4), -2.5), w, eps=0.0)
    np.testing.assert_allclose(y[0], -(1 + w), rtol=1e-12)
    np.testing.assert_allclose(s, [2.5])


def test_gelu_tanh_literal():
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): values computed by hand (and differing from erf-GELU:
    # exact gelu(1) = 0.8413447, gelu(-1) = -0.1586553)
    x = np.array([-3.0, -1.0, 0.0, 1.0, 2.0])
    expected = [-0.0036373921, -0.1588080, 0.0, 0.8411920, 1.9545977]
    np.testing.assert_allclose(ops.gelu_tanh(x), expected, rtol=1e-6, atol=1e-9)
    assert abs(ops.gelu_tanh(np.array([1.0]))[0] - 0.8413447) > 1e-4  # not the erf GELU


def test_rotate_half_is_split_half():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(ops.rotate_half(x), [-3.0, -4.0, 1.0, 2.0])  # not interleaved [-2, 1, -4, 3]


def test_rope_literal_position_one():
    # H = 4, theta = 10000: inv_freq = [1, 0.01]; at position 1, dims (0, 2) rotate by 1 rad, (1, 3) by 0.01
    cos, sin = ops.rope_tables(np.array([0, 1]), 4, 10000.0, np.float64)
    x = np.array([[[1.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])  # [T=2, 1 head, H=4]
    r = ops.rope(x, cos, sin)
    np.testing.assert_allclose(r[0, 0], [1, 0, 0, 0])
    np.testing.assert_allclose(r[1, 0], [np.cos(1.0), 0, np.sin(1.0), 0], atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8).map(lambda k: 2 * k), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_rope_preserves_norms(H, T, seed):
    x = np.random.default_rng(seed).standard_normal((T, 3, H))
    cos, sin = ops.rope_tables(np.arange(T), H, 10000.0, np.float64)
    np.testing.assert_allclose(np.linalg.norm(ops.rope(x, cos, sin), axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8).map(lambda k: 2 * k), st.integers(0, 50), st.integers(0, 50), st.integers(0, 30),
       st.integers(0, 2**31 - 1))
def test_rope_dot_depends_only_on_relative_position(H, i, j, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 1, H)), rng.standard_normal((1, 1, H))

    def dot(pi, pj):
        cq, sq = ops.rope_tables(np.array([pi]), H, 10000.0, np.float64)
        ck, sk = ops.rope_tables(np.array([pj]), H, 10000.0, np.float64)
        return float(np.sum(ops.rope(q, cq, sq) * ops.rope(k, ck, sk)))

    assert dot(i, j) == pytest.approx(dot(i + shift, j + shift), rel=1e-9, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(0.1, 1e4))
def test_causal_softmax_rows_sum_to_one_and_mask(N, T, seed, scale):
    a = np.random.default_rng(seed).standard_normal((N, T, T)) * scale  # large scales: no overflow either
    p = ops.causal_softmax(a)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert np.all(p[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
    assert np.all(p >= 0) and np.all(np.isfinite(p))


def test_causal_softmax_literal():
    p = ops.causal_softmax(np.array([[[0.0, 5.0], [0.0, np.log(3.0)]]]))
    np.testing.assert_allclose(p[0], [[1.0, 0.0], [0.25, 0.75]])  # row 0 ignores the masked 5.0


def test_kv_index_groups_heads_consecutively():
    np.testing.assert_array_equal(ops.kv_index(8, 1), [0] * 8)  # gemma-2b: one shared kv head
    np.testing.assert_array_equal(ops.kv_index(4, 2), [0, 0, 1, 1])
    np.testing.assert_array_equal(ops.kv_index(16, 16), np.arange(16))  # gemma-7b


def test_attention_shared_kv_equals_explicit_repeat():
    rng = np.random.default_rng(0)
    T, N, K, H = 5, 4, 2, 6
    q, k, v = rng.standard_normal((T, N, H)), rng.standard_normal((T, K, H)), rng.standard_normal((T, K, H))
    scores, pattern, z = ops.attention(q, k, v)
    for n in range(N):  # head n reads kv head n // 2, written out by hand
        kk, vv = k[:, n // 2], v[:, n // 2]
        a = q[:, n] @ kk.T / np.sqrt(H)
        a = np.where(np.tril(np.ones((T, T), bool)), a, -np.inf)
        w = np.exp(a - a.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        np.testing.assert_allclose(pattern[n], w, rtol=1e-12)
        np.testing.assert_allclose(z[:, n], w @ vv, rtol=1e-12)
        np.testing.assert_allclose(scores[n], q[:, n] @ kk.T / np.sqrt(H), rtol=1e-12)


def test_ops_keep_float32():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    y, s = ops.rms_norm(x, w, eps=1e-6)
    assert y.dtype == s.dtype == np.float32
    assert ops.gelu_tanh(x).dtype == np.float32
    cos, sin = ops.rope_tables(np.arange(3), 8, 10000.0, np.float32)
    assert ops.rope(x.reshape(3, 1, 8), cos, sin).dtype == np.float32
    q = rng.standard_normal((3, 2, 4)).astype(np.float32)
    assert all(a.dtype == np.float32 for a in ops.attention(q, q[:, :1], q[:, :1]))
    assert all(a.dtype == np.float32 for a in ops.geglu(x, x.T @ x, x.T @ x))
