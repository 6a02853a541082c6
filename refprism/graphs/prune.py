"""circuit-tracer's pruning and scores on a sparse adjacency: never a dense N x N matrix, never a sort of the edges.

The adjacency A is held as its nonzero entries (rows i = targets, cols j = sources, values A_ij: the direct
effect of node j on node i's input). Nodes come in circuit-tracer's order: features (here neurons), error nodes
(here the unexplored remainder), tokens (embeddings), logits; `counts` = (n_features, n_errors, n_tokens, n_logits).

Math (circuit-tracer's graph.py, docs/math.md section 7.3):
    Â_ij = |A_ij| / max(sum_j' |A_ij'|, 1e-10)                                  normalize
    I = w Â + w Â^2 + ...  = w [(1 - Â)^-1 - 1]                                 influence (w: logit probabilities
                                                                                 on the logit nodes, 0 elsewhere;
                                                                                 the graph is a DAG: the series ends)
    threshold(x, f): the largest value x* such that the scores >= x*, summed largest first, first reach f sum(x)
    node mask: I_j >= threshold(I, 0.8), tokens and logits always kept
    edge score: S_ij = Â'_ij (I'_i + w_i), Â', I' of A with the dropped nodes' rows and columns zeroed
    edge mask: S_ij >= threshold(S, 0.98); then, until nothing changes, features and errors without a kept outgoing
               edge and features without a kept incoming edge are dropped, with their edges
    replacement = I(tokens) / (I(tokens) + I(errors))
    completeness = sum_i (1 - sum_{j error} Â_ij) (I_i + w_i) / sum_i (I_i + w_i)
Shapes: rows, cols [E] int, values [E]; n nodes; vectors over nodes [N].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refprism.errors import InputError


def normalize(rows, values, n) -> np.ndarray:
    """Â's entries: |A_ij| over the row's total |A_i.| (clamped at 1e-10 as circuit-tracer clamps).

    Math:   Â_ij = |A_ij| / max(sum_j |A_ij|, 1e-10)
    Shapes: rows [E], values [E] -> [E]
    """
    a = np.abs(values)
    total = np.bincount(rows, weights=a, minlength=n)
    return a / np.maximum(total, 1e-10)[rows]


def influence(rows, cols, norm, weights, *, max_iter=1000) -> np.ndarray:
    """Each node's influence on the weighted logits through every path of the DAG.

    Math:   I = sum_{k>=1} w Â^k,  (w Â)_j = sum_i w_i Â_ij   (one bincount per power; stops when a power is 0)
    Shapes: rows, cols, norm [E], weights [N] -> [N]
    """
    n = len(weights)
    current = np.bincount(cols, weights=norm * weights[rows], minlength=n)
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = np.bincount(cols, weights=norm * current[rows], minlength=n)
        total += current
    raise InputError(f"the influence did not converge in {max_iter} steps: the graph has a cycle")


def threshold(scores, fraction) -> float:
    """circuit-tracer's find_threshold by partial selection (np.partition halves the candidates, O(n) expected).

    Math:   with x sorted descending and c_k = sum_{i<=k} x_i / sum x:  k* = min{k : c_k >= f} (the last index if
            none), and the threshold is x_{k*}
    Shapes: scores [n] -> a float
    """
    a = np.asarray(scores, dtype=np.float64).ravel()
    if a.size == 0:
        raise InputError("no scores to threshold")
    need = fraction * a.sum()
    above = 0.0  # the sum of the scores known to rank before the candidates left
    while a.size > 1:
        k = a.size // 2
        part = np.partition(a, a.size - k)  # part[-k:]: the k largest
        top = part[a.size - k:]
        s = top.sum()
        if above + s >= need:
            a = top
        else:
            above += s
            a = part[: a.size - k]
    return float(a[0])


@dataclass
class Pruned:
    """node_mask [N], edge_mask [E] over the adjacency's entries, cumulative [N] (each node's share of the
    influence, summed from the largest: circuit-tracer's cumulative scores), influence [N]."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative: np.ndarray
    influence: np.ndarray


def prune(rows, cols, values, weights, counts, *, node_threshold=0.8, edge_threshold=0.98) -> Pruned:
    """circuit-tracer's prune_graph on the sparse adjacency (the math in the module docstring).

    weights: [N] the logit probabilities on the logit nodes, 0 elsewhere; counts: (features, errors, tokens, logits)
    Shapes: rows, cols, values [E] -> Pruned
    """
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise InputError(f"{name} must be between 0 and 1, got {t}")
    n = len(weights)
    n_feat, n_err, n_tok, n_log = counts
    sources = n_feat + n_err  # features and errors: the nodes that need an outgoing edge
    norm = normalize(rows, values, n)
    infl = influence(rows, cols, norm, weights)
    node_mask = infl >= threshold(infl, node_threshold)
    node_mask[n - n_log - n_tok:] = True
    kept = node_mask[rows] & node_mask[cols]
    pr, pc = rows[kept], cols[kept]
    pnorm = normalize(pr, values[kept], n)
    pinf = influence(pr, pc, pnorm, weights) + weights
    scores = np.zeros(len(values))
    scores[kept] = pnorm * pinf[pr]
    edge_mask = scores >= threshold(scores, edge_threshold) if len(scores) else np.zeros(0, bool)
    while True:
        old = node_mask.copy()
        edge_mask &= node_mask[rows] & node_mask[cols]
        out = np.zeros(n, bool)
        out[cols[edge_mask]] = True
        inc = np.zeros(n, bool)
        inc[rows[edge_mask]] = True
        node_mask[:sources] &= out[:sources]
        node_mask[:n_feat] &= inc[:n_feat]
        if (node_mask == old).all():
            break
    edge_mask &= node_mask[rows] & node_mask[cols]
    order = np.argsort(-infl, kind="stable")  # N nodes (not N^2 edges): circuit-tracer's cumulative scores
    cumulative = np.zeros(n)
    total = infl.sum()
    cumulative[order] = np.cumsum(infl[order]) / (total if total > 0 else 1.0)
    return Pruned(node_mask, edge_mask, cumulative, infl)


def scores(rows, cols, values, weights, counts) -> tuple[float, float]:
    """circuit-tracer's replacement and completeness scores (the module docstring); errors = counts[1] nodes.

    Shapes: rows, cols, values [E], weights [N] -> (replacement, completeness)
    """
    n = len(weights)
    n_feat, n_err, n_tok, _ = counts
    norm = normalize(rows, values, n)
    infl = influence(rows, cols, norm, weights)
    err = slice(n_feat, n_feat + n_err)
    tokens = infl[n_feat + n_err: n_feat + n_err + n_tok].sum()
    errors = infl[err].sum()
    replacement = tokens / (tokens + errors) if tokens + errors > 0 else 1.0
    is_err = (cols >= n_feat) & (cols < n_feat + n_err)
    error_share = np.bincount(rows[is_err], weights=norm[is_err], minlength=n)
    out = infl + weights
    completeness = ((1 - error_share) * out).sum() / out.sum()
    return float(replacement), float(completeness)
