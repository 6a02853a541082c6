"""Every VJP of ops.py against central finite differences in float64, along random directions, including the
saturated regimes (a near one-hot softmax row, a soft-cap near its cap, large |gate|).

The check is jax's check_grads / torch.autograd.gradcheck: for f: x -> y and a random output cotangent g and input
direction d, <vjp(g), d> must equal <g, (f(x + h d) - f(x - h d)) / 2h>. Central differences in float64 with
h = 1e-6 err by O(h^2 |f'''|) + O(eps / h) ~ 1e-10 relative on these O(1) values: we require 1e-7 relative to
|<vjp(g), d>| + 1e-9 (a wrong derivative is off by O(1)).
"""

import numpy as np
import pytest

from refprism.gemma import ops

RNG = np.random.default_rng(18)
Z = 3


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws from its own generator: the same numbers whichever tests run (-k) and in whatever order."""
    global RNG
    RNG = np.random.default_rng(18)


def check(name, f, x, vjp_value, g, *, h=1e-6, rtol=1e-7, atol=1e-9):
    """vjp_value = dR/dx for R = <g, f(x)> (rows z); compare each row's <., d> with central differences."""
    d = RNG.standard_normal(x.shape)
    diff = (f(x + h * d) - f(x - h * d)) / (2 * h)
    fd = (g.reshape(len(g), -1) * diff.ravel()).sum(axis=1)
    an = (vjp_value.reshape(len(vjp_value), -1) * d.ravel()).sum(axis=1)
    err = np.abs(fd - an)
    assert np.all(err <= atol + rtol * np.abs(an).max()), f"{name}: VJP {an} vs central differences {fd}"
    assert np.abs(an).max() > 1e-6, f"{name}: the test direction sees no gradient"
    return float((err / np.abs(an).max()).max())


@pytest.mark.parametrize("offset", [1, 0])
@pytest.mark.parametrize("frozen", [False, True])
def test_rms_norm_vjp(offset, frozen):
    x = RNG.standard_normal((5, 8)) * 3
    w = RNG.standard_normal(8) * 0.3
    eps = 1e-6
    s0 = ops.rms_scale(x, eps=eps)
    g = RNG.standard_normal((Z, 5, 8))
    gain = offset + w

    def f(xx):  # frozen: the scale held at its recorded value
        s = s0 if frozen else ops.rms_scale(xx, eps=eps)
        return xx / s[:, None] * gain

    gx, gs = ops.rms_norm_vjp(g, x, s0, w, offset=offset, frozen=frozen)
    check("rms_norm x", f, x, gx, g)
    check("rms_norm s", lambda ss: x / ss[:, None] * gain, s0, gs, g)


def test_rms_norm_vjp_per_head_and_no_weight():
    x = RNG.standard_normal((4, 3, 6))  # q [T, N, H], normalised over H (Gemma 3's q/k norms)
    s0 = ops.rms_scale(x, eps=1e-6)
    g = RNG.standard_normal((Z, 4, 3, 6))
    gx, _ = ops.rms_norm_vjp(g, x, s0, None)  # Gemma 4's v norm: no weight, gain 1
    check("rms_norm per head", lambda xx: xx / ops.rms_scale(xx, eps=1e-6)[..., None], x, gx, g)


def test_rms_norm_vjp_is_zero_along_x_when_not_frozen():
    # the norm is scale invariant (eps = 0): the true gradient is orthogonal to x (a wrong ds/dx would not be)
    x = RNG.standard_normal((2, 7))
    s = ops.rms_scale(x, eps=0.0)
    gx, _ = ops.rms_norm_vjp(RNG.standard_normal((Z, 2, 7)), x, s, RNG.standard_normal(7))
    assert np.abs(np.einsum("ztd,td->zt", gx, x)).max() < 1e-12


def test_rope_vjp():
    T, N, H = 6, 2, 8
    cos, sin = ops.rope_tables(np.arange(T), H, 10000.0, np.float64)
    x = RNG.standard_normal((T, N, H))
    g = RNG.standard_normal((Z, T, N, H))
    check("rope", lambda xx: ops.rope(xx, cos, sin), x, ops.rope_vjp(g, cos, sin), g)


@pytest.mark.parametrize("scale", [1.0, 8.0])  # 8: |gate| up to ~25, tanh saturated
@pytest.mark.parametrize("frozen", [False, True])
def test_geglu_vjp(scale, frozen):
    gate = RNG.standard_normal((4, 6)) * scale
    up = RNG.standard_normal((4, 6))
    g = RNG.standard_normal((Z, 4, 6))
    G0 = ops.gelu_tanh(gate)
    g_gate, g_up = ops.geglu_vjp(g, gate, up, frozen=frozen)
    f_gate = (lambda gg: G0 * up) if frozen else (lambda gg: ops.gelu_tanh(gg) * up)
    if frozen:
        assert np.all(g_gate == 0)
    else:
        check("geglu gate", f_gate, gate, g_gate, g)
    check("geglu up", lambda uu: G0 * uu, up, g_up, g)


def test_gelu_grad_large_gate_is_exact():
    x = np.array([-40.0, -12.0, 12.0, 40.0])
    np.testing.assert_array_equal(ops.gelu_tanh_grad(x), [0.0, 0.0, 1.0, 1.0])  # no 0 * inf, no nan


@pytest.mark.parametrize("spread", [1.0, 4.5])  # 4.5: |x| near 9 = 0.9 * cap of 10, tanh' ~ 0.1 .. 0.3
def test_softcap_vjp(spread):
    cap = 10.0
    x = RNG.standard_normal((3, 5)) * spread
    g = RNG.standard_normal((Z, 3, 5))
    check("softcap", lambda xx: ops.softcap(xx, cap), x, ops.softcap_vjp(g, x, cap), g)
    r = ops.softcap_factor(x, cap)
    check("softcap frozen", lambda xx: xx * r, x, ops.softcap_vjp(g, x, cap, frozen=True), g)
    np.testing.assert_allclose(x * r, ops.softcap(x, cap), rtol=1e-14)
    assert ops.softcap_factor(np.zeros(1), cap)[0] == 1.0


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("sharp", [0.0, 8.0])  # 8: every row near one-hot on its own position (p > 0.9)
def test_softmax_vjp(window, sharp):
    N, T = 2, 7
    a = RNG.standard_normal((N, T, T)) + sharp * np.eye(T)
    g = RNG.standard_normal((Z, N, T, T))
    pattern = ops.causal_softmax(a, window)
    if sharp > 1:
        assert pattern.max(axis=-1).min() > 0.9
    err = check("softmax", lambda aa: ops.causal_softmax(aa, window), a, ops.softmax_vjp(g, pattern), g)
    assert err < 1e-7
    masked = ~ops.causal_mask(T, window)
    assert np.all(ops.softmax_vjp(g, pattern)[:, :, masked] == 0)


@pytest.mark.parametrize("NK", [(4, 2), (4, 1), (2, 2)])
def test_attention_mix_and_scores_vjp(NK):
    N, K = NK
    T, H = 5, 4
    q, k, v = RNG.standard_normal((T, N, H)), RNG.standard_normal((T, K, H)), RNG.standard_normal((T, K, H))
    pattern = ops.causal_softmax(RNG.standard_normal((N, T, T)))
    g = RNG.standard_normal((Z, T, N, H))
    g_p, g_v = ops.attention_mix_vjp(g, pattern, v)
    def mix(pp, vv):
        return ops.attention_mix(pp, vv, banded=False)  # (every source read)
    check("mix pattern", lambda pp: mix(pp, v), pattern, g_p, g)
    check("mix v", lambda vv: mix(pattern, vv), v, g_v, g)
    gs = RNG.standard_normal((Z, N, T, T))
    g_q, g_k = ops.attention_scores_vjp(gs, q, k, 0.3)
    check("scores q", lambda qq: ops.attention_scores(qq, k, 0.3), q, g_q, gs)
    check("scores k", lambda kk: ops.attention_scores(q, kk, 0.3), k, g_k, gs)


@pytest.mark.parametrize("window", [None, 200])
def test_attention_mix_vjp_by_source_blocks_equals_the_plain_sum(window):
    """T = 600 > 2 MIX_BLOCK: dR/dv summed block by block over the queries that read each block (the causal triangle
    and the window skipped) equals the plain sum over every query, kv heads shared; pattern_grad=False gives None."""
    N, K, T, H = 4, 2, 600, 3
    pattern = ops.causal_softmax(RNG.standard_normal((N, T, T)), window)
    g, v = RNG.standard_normal((2, T, N, H)), RNG.standard_normal((T, K, H))
    g_p, g_v = ops.attention_mix_vjp(g, pattern, v)
    plain = np.einsum("nts,ztnh->zsnh", pattern, g).reshape(2, T, K, N // K, H).sum(axis=3)
    np.testing.assert_allclose(g_v, plain, rtol=1e-12, atol=1e-12 * np.abs(plain).max())
    g_p_plain = np.einsum("ztnh,snh->znts", g, v[:, ops.kv_index(N, K)])
    np.testing.assert_allclose(g_p, g_p_plain, rtol=0, atol=1e-12 * np.abs(g_p_plain).max())
    none, g_v2 = ops.attention_mix_vjp(g, pattern, v, pattern_grad=False)
    assert none is None and np.array_equal(g_v2, g_v)


def test_projections_vjp():
    T, D, N, H = 4, 6, 3, 2
    x = RNG.standard_normal((T, D))
    W = RNG.standard_normal((D, N, H))
    W_O = RNG.standard_normal((N, H, D))
    g = RNG.standard_normal((Z, T, N, H))
    check("project", lambda xx: np.einsum("td,dnh->tnh", xx, W), x, ops.project_vjp(g, W), g)
    z = RNG.standard_normal((T, N, H))
    go = RNG.standard_normal((Z, T, D))
    check("heads_out", lambda zz: np.einsum("tnh,nhd->td", zz, W_O), z, ops.heads_out_vjp(go, W_O), go)
    e = RNG.standard_normal((T, D))
    check("embed", lambda ee: ee * np.sqrt(D), e, ops.embed_vjp(go, np.sqrt(D)), go)


@pytest.mark.parametrize("sharp", [1.0, 12.0])
def test_key_fix_closed_form_equals_the_softmax_recomputed_and_tends_to_the_vjp(sharp):
    N, T, s = 2, 7, 3
    a = RNG.standard_normal((N, T, T)) * sharp
    pattern = ops.causal_softmax(a)
    g = RNG.standard_normal((N, T, T))
    for size in (3.0, 0.5, -2.0):
        delta = RNG.standard_normal((N, T)) * size
        moved = a.copy()
        moved[:, :, s] += delta
        brute = np.sum(g * (ops.causal_softmax(moved) - pattern), axis=-1)  # every row recomputed
        closed = ops.softmax_key_change(g, pattern, s, delta)
        np.testing.assert_allclose(closed, brute, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ops.softmax_row_change(g, a, moved), brute, rtol=1e-12, atol=1e-14)
        assert np.all(closed[:, :s] == 0)  # rows before s do not see it (causal)
    vjp = ops.softmax_vjp(g[None], pattern)[0][..., s]  # dR/da_s per row
    direction = RNG.standard_normal((N, T))
    for h in (1e-3, 1e-5):  # the fix -> the linear estimate: error O(h^2)
        err = np.abs(ops.softmax_key_change(g, pattern, s, h * direction) - h * direction * vjp).max()
        assert err <= 10 * h * h * (1 + np.abs(vjp).max()), (h, err)


@pytest.mark.parametrize("sharp", [0.0, 9.0])  # 9: each row's top expert near one-hot (p > 0.9)
def test_route_topk_vjp_with_the_choice_held(sharp):
    """Gemma 4's router: w = softmax(r)[top] / sum softmax(r)[top] * c. The choice top is a step function, held
    by the differences (h is far below the rows' gaps between the k-th and (k+1)-th logits, asserted)."""
    T, E, k = 5, 8, 3
    r = RNG.standard_normal((T, E)) * 2
    r[np.arange(T), RNG.integers(0, E, T)] += sharp
    c = RNG.uniform(0.5, 1.5, E)
    g = RNG.standard_normal((Z, T, k))
    top, w = ops.route_topk(r, k, c)
    gaps = np.sort(r, axis=-1)[:, ::-1]
    assert (gaps[:, k - 1] - gaps[:, k]).min() > 1e-3  # the choice survives the stencil
    p = np.exp(r - r.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sharp:
        assert p.max(-1).min() > 0.9

    def weights(rr):
        again, ww = ops.route_topk(rr, k, c)
        assert np.array_equal(again, top)
        return ww

    check("route_topk", weights, r, ops.route_topk_vjp(g, r, top, c), g)
    np.testing.assert_array_equal(top, np.argsort(-p, axis=-1, kind="stable")[:, :k])  # the k most probable
    np.testing.assert_allclose((w / c[top]).sum(-1), 1, rtol=1e-14)  # renormalised over the k before the scale
