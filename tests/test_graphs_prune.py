"""refprism.graphs.prune against circuit-tracer's dense algorithm, re-derived here on small hand-built graphs.

The dense reference computes the influence in closed form, w [(1 - Â)^-1 - 1] (a matrix inverse: not the
library's power series), the thresholds with a full sort, cumsum and searchsorted, and the masks on the dense
matrix with rows and columns zeroed, exactly as circuit-tracer's graph.py states them. Influences agree to 1e-12
(float64, N <= 60); masks exactly (the hand graphs keep their scores away from the thresholds' ties).
"""

import numpy as np
import pytest

from refprism.errors import InputError
from refprism.graphs.prune import influence, normalize, prune, scores, threshold


def dense_normalize(A):
    a = np.abs(A)
    return a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)


def dense_influence(A, w):
    An = dense_normalize(A)
    return w @ (np.linalg.inv(np.eye(len(A)) - An) - np.eye(len(A)))


def dense_threshold(x, f):
    s = np.sort(np.ravel(x))[::-1]
    c = np.cumsum(s) / s.sum()
    return s[min(int(np.searchsorted(c, f)), len(s) - 1)]


def dense_prune(A, w, counts, nt=0.8, et=0.98):
    n_feat, n_err, n_tok, n_log = counts
    n = len(A)
    infl = dense_influence(A, w)
    node = infl >= dense_threshold(infl, nt)
    node[n - n_log - n_tok:] = True
    P = A.copy()
    P[~node] = 0
    P[:, ~node] = 0
    Pn = dense_normalize(P)
    S = Pn * (dense_influence(P, w) + w)[:, None]
    edge = S >= dense_threshold(S, et)
    while True:
        old = node.copy()
        edge[~node] = False
        edge[:, ~node] = False
        node[: n_feat + n_err] &= edge[:, : n_feat + n_err].any(0)
        node[:n_feat] &= edge[:n_feat].any(1)
        if (node == old).all():
            break
    edge[~node] = False
    edge[:, ~node] = False
    return node, edge, infl


def random_graph(seed, n_feat=30, n_err=6, n_tok=5, n_log=3, density=0.5):
    """A DAG in circuit-tracer's node order: features read earlier features, errors and tokens; logits read all."""
    rng = np.random.default_rng(seed)
    n = n_feat + n_err + n_tok + n_log
    A = np.zeros((n, n))
    srcs = np.r_[0:n_feat + n_err + n_tok]
    for i in range(n_feat):
        ok = (srcs < i) | (srcs >= n_feat)
        A[i, srcs[ok]] = rng.standard_normal(ok.sum()) * (rng.random(ok.sum()) < density)
    for i in range(n - n_log, n):
        A[i, srcs] = rng.standard_normal(len(srcs)) * (rng.random(len(srcs)) < density)
    w = np.zeros(n)
    w[n - n_log:] = rng.dirichlet(np.ones(n_log)) * 0.9
    return A, w, (n_feat, n_err, n_tok, n_log)


def sparse(A):
    r, c = np.nonzero(A)
    return r, c, A[r, c]


def test_hand_graph_influences_and_masks():
    """tok -> f0 (2), tok -> f1 (1), f0 -> f1 (-3), f1 -> logit (4), f0 -> logit (1), err -> logit (-1).
    Â: f0 row [tok 1]; f1 row [tok 1/4, f0 3/4]; logit row [f1 4/6, f0 1/6, err 1/6];  w_logit = 1.
    I(f1) = 2/3; I(f0) = 1/6 + 2/3 * 3/4 = 2/3; I(err) = 1/6; I(tok) = 2/3 * 1/4 + 2/3 * 1 = 5/6."""
    # order: f0, f1, err, tok, logit
    A = np.zeros((5, 5))
    A[0, 3], A[1, 3], A[1, 0], A[4, 1], A[4, 0], A[4, 2] = 2, 1, -3, 4, 1, -1
    w = np.array([0, 0, 0, 0, 1.0])
    r, c, v = sparse(A)
    infl = influence(r, c, normalize(r, v, 5), w)
    np.testing.assert_allclose(infl, [2 / 3, 2 / 3, 1 / 6, 5 / 6, 0], rtol=1e-14)
    replacement, completeness = scores(r, c, v, w, (2, 1, 1, 1))
    assert replacement == pytest.approx((5 / 6) / (5 / 6 + 1 / 6))
    # completeness: only the logit row reads the error (1/6): (2/3 + 2/3 + 1/6 + 5/6 + 1 (1 - 1/6)) / (10/3)
    assert completeness == pytest.approx((2 / 3 + 2 / 3 + 1 / 6 + 5 / 6 + 5 / 6) / (2 / 3 + 2 / 3 + 1 / 6 + 5 / 6 + 1))
    # node threshold 0.8 of total 7/3: sorted 5/6, 2/3, 2/3, 1/6 -> the cumulative share 0.357, 0.643, 0.929:
    # threshold 2/3 keeps f0, f1 and drops the error node
    out = prune(r, c, v, w, (2, 1, 1, 1))
    assert out.node_mask.tolist() == [True, True, False, True, True]
    node, edge, _ = dense_prune(A, w, (2, 1, 1, 1))
    assert out.node_mask.tolist() == node.tolist()
    assert out.edge_mask.tolist() == edge[r, c].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_prune_equals_the_dense_reference(seed):
    A, w, counts = random_graph(seed)
    r, c, v = sparse(A)
    out = prune(r, c, v, w, counts)
    node, edge, infl = dense_prune(A, w, counts)
    np.testing.assert_allclose(out.influence, infl, rtol=0, atol=1e-12 * np.abs(infl).max())
    assert (out.node_mask == node).all()
    assert (out.edge_mask == edge[r, c]).all()
    assert 0 < out.node_mask[: counts[0]].sum() < counts[0]  # the thresholds did prune something
    assert 0 < out.edge_mask.sum() < len(v)
    ref = np.zeros(len(A))
    order = np.argsort(-infl)
    ref[order] = np.cumsum(infl[order]) / infl.sum()
    np.testing.assert_allclose(out.cumulative, ref, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_the_dense_reference(seed):
    A, w, (nf, ne, nt, nl) = random_graph(seed + 10)
    infl = dense_influence(A, w)
    An = dense_normalize(A)
    rep = infl[nf + ne: nf + ne + nt].sum() / (infl[nf + ne: nf + ne + nt].sum() + infl[nf: nf + ne].sum())
    out = infl + w
    comp = ((1 - An[:, nf: nf + ne].sum(axis=1)) * out).sum() / out.sum()
    mine = scores(*sparse(A), w, (nf, ne, nt, nl))
    np.testing.assert_allclose(mine, [rep, comp], rtol=1e-12)


@pytest.mark.parametrize("f", [0.0, 0.3, 0.8, 0.98, 1.0])
def test_threshold_by_partial_selection_equals_sort_cumsum_searchsorted(f):
    rng = np.random.default_rng(3)
    for x in (rng.random(1001), rng.exponential(size=64) ** 3, np.repeat(rng.random(20), 5), rng.random(1)):
        assert threshold(x, f) == dense_threshold(x, f)


def test_bad_thresholds():
    A, w, counts = random_graph(0)
    with pytest.raises(InputError, match="node_threshold"):
        prune(*sparse(A), w, counts, node_threshold=1.5)
