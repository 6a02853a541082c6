"""The graph view's data: what `refprism report --graph` embeds (refprism.report draws it; this computes it).

Every number the view shows is computed here, in Python, and embedded as a JSON number (shortest round-trip text,
so the browser reads back the same float64); the page only displays them.

Which nodes and edges. The pruned graph (Graph.pruned: circuit-tracer's node and edge thresholds), its nodes as
graph_json keeps them (those with a kept edge, every embedding, every logit). At most `max_nodes` are shown: every
logit, then the rest by influence (largest first); at most `max_edges` of the pruned edges between shown nodes, the
largest |A_ij| first. What is left out is counted (`pruned` beside `shown`), and the page says so.

What each shown node carries (for its side panel):

    value       a neuron's / feature's act, a logit's readout (None for the sources: embeddings, remainders,
                errors, biases)
    input       what its incoming edges sum to (Graph.input; None for the sources)
    incoming    the `top` largest |A_ij| over ALL its sources j (not only the shown ones): [label, A_ij, shown index
                or -1]; the other sources' count and their sum (float64); sum = sum_j A_ij (Graph.row_sums);
                residual = input - sum (0 to float64 rounding: the graph is exact)
    outgoing    the `top` largest |A_kj| over every target k of the node, the rest's count and sum, the total
    split       the node's input split by component with the prisms' readout mechanism (prisms.residual_parts read
                by a Readout, as every prism reads): embed, L0.attn, L0.mlp, ..., the parts of the residual it
                reads, with whole, sum, residual = whole - sum (float64), tolerance and exact (prisms.Split).

The readouts (u [1, D] at a residual site and position; u . x_site[t] is the node's input with every norm scale
frozen, as in graph()):

    logit z       u = Graph.logit_u[z] at the final residual, position p (demeaned or target-minus-foils, pre-cap)
    neuron (l,t,n) u = W_up[:, n] (1 + w_ln2) / s_ln2[t] at resid_mid_l, position t; whole = up[t, n]
    feature (l,t,f) u = W_enc[:, f] c_l[t] at resid_mid_l, position t (c: the transcoder's input factor); the
                  encoder bias b_enc[f] is one more part, so whole = pre[t, f]

The residual split is another exact decomposition of the same input than the incoming edges: by the component
that wrote each part at the node's own position (an attention part carries whatever its heads read from every
earlier position), where the edges go back to the neurons and embeddings that started each path.
"""

from __future__ import annotations

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.graphs.build import input_factor
from refprism.graphs.export import _node_id

FORMAT = 1  # the view's data format (report's SECTION_KEYS["graph"] checks its keys)


def graph_view(g, *, node_threshold=0.8, edge_threshold=0.98, max_nodes=200, max_edges=1000, top=10) -> dict:
    """The pruned graph as the report's graph panel holds it (the module docstring says what and why).

    Shapes: g with N nodes, E edges -> {"format", "model", "dtype", "tokens", "position", "n_layers", "basis",
            "readout", "scores", "explored", "neurons", "thresholds", "pruned", "shown", "top", "nodes", "edges"}
            nodes: [{"id", "label", "kind", "layer", "position", "index", "piece", "value", "input", "influence",
            "weight", "incoming", "outgoing", "split"}], edges: [[target, source, A]] (indices into nodes)
    """
    for name, value, least in (("max_nodes", max_nodes, 1), ("max_edges", max_edges, 0), ("top", top, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise InputError(f"graph view: {name} must be an integer of at least {least}, got {value!r}")
    model, run = g.model, g.run
    L = model.config.n_layers
    pr = g.pruned(node_threshold, edge_threshold)
    used = np.zeros(g.n, bool)
    used[g.rows[pr.edge_mask]] = used[g.cols[pr.edge_mask]] = True
    kept = pr.node_mask & (used | np.isin(g.kind, ("embed", "logit")))
    logits = np.flatnonzero(g.kind == "logit")
    rest = np.flatnonzero(kept & (g.kind != "logit"))
    rest = rest[np.argsort(-pr.influence[rest], kind="stable")][: max(0, max_nodes - len(logits))]
    shown = np.sort(np.concatenate([rest, logits]))  # circuit-tracer's node order
    local = np.full(g.n, -1)
    local[shown] = np.arange(len(shown))

    pruned_edges = np.flatnonzero(pr.edge_mask & kept[g.rows] & kept[g.cols])
    between = pruned_edges[(local[g.rows[pruned_edges]] >= 0) & (local[g.cols[pruned_edges]] >= 0)]
    between = _largest(between, np.abs(g.values[between]), max_edges)
    edges = [[int(local[g.rows[e]]), int(local[g.cols[e]]), float(g.values[e])] for e in between]

    sums = g.row_sums()
    starts = np.searchsorted(g.rows, np.arange(g.n + 1))  # rows are sorted (graph() sorts its entries)
    out_of = np.isin(g.cols, shown)
    out_e = np.flatnonzero(out_of)
    out_e = out_e[np.argsort(g.cols[out_e], kind="stable")]
    out_starts = np.searchsorted(g.cols[out_e], np.arange(g.n + 1))
    labels = {}

    def label(j):
        if j not in labels:
            labels[j] = g.label(j)
        return labels[j]

    def listing(entries, ends):
        """The `top` largest |A| of the entries (ends: the other node of each), the rest counted and summed."""
        best = _largest(entries, np.abs(g.values[entries]), top)
        others = np.setdiff1d(entries, best, assume_unique=True)
        return {"top": [[label(int(ends[e])), float(g.values[e]), int(local[ends[e]])] for e in best],
                "count": int(len(entries)), "others": {"count": int(len(others)),
                                                       "sum": float(g.values[others].astype(np.float64).sum())},
                "sum": float(g.values[entries].astype(np.float64).sum())}

    nodes = []
    for i in shown:
        i = int(i)
        k = str(g.kind[i])
        has_input = not np.isnan(g.input[i])
        node = {"id": _node_id(g, i, L), "label": label(i), "kind": k, "layer": int(g.layer[i]),
                "position": int(g.position[i]), "index": int(g.index[i]),
                "piece": model.piece(int(g.index[i])) if k in ("embed", "logit") else None,
                "value": _number(g.activation[i]), "input": _number(g.input[i]),
                "influence": float(pr.influence[i]), "weight": float(g.weights[i])}
        if has_input:
            incoming = listing(np.arange(starts[i], starts[i + 1]), g.cols)
            incoming["sum"] = float(sums[i])  # Graph.row_sums: sum_j A_ij in float64
            incoming["residual"] = float(g.input[i] - sums[i])
            node["incoming"] = incoming
        else:
            node["incoming"] = None
        node["outgoing"] = listing(out_e[out_starts[i]: out_starts[i + 1]], g.rows)
        split = node_split(g, i) if has_input else None
        node["split"] = None if split is None else _split_json(split)
        nodes.append(node)

    replacement, completeness = g.scores()
    return {"format": FORMAT, "model": model.name, "dtype": str(model.dtype),
            "tokens": [{"id": int(t), "piece": model.piece(int(t))} for t in run.tokens[: g.read_at + 1]],
            "position": int(g.read_at), "n_layers": L, "basis": g.basis, "readout": g.readout,
            "scores": {"replacement": replacement, "completeness": completeness},
            "explored": int(g.explored), "neurons": int(g.n_neurons),
            "thresholds": {"node": node_threshold, "edge": edge_threshold},
            "pruned": {"nodes": int(kept.sum()), "edges": int(len(pruned_edges))},
            "shown": {"nodes": len(nodes), "edges": len(edges), "max_nodes": int(max_nodes),
                      "max_edges": int(max_edges)},
            "top": int(top), "nodes": nodes, "edges": edges}


def node_split(g, i) -> P.Split | None:
    """Node i's input split by the residual parts its readout reads (the module docstring's readouts); None for a
    source (embedding, remainder, error, bias, PLE token), which has no input, and for a Gemma 4 PLE neuron, whose
    input reads no residual (its two edges, the embedding's and the PLE token's, are its split).

    Math:   input_i = sum_c u_i . part_c(x_site[t])  (+ b_enc[f] for a transcoder feature)
    Shapes: -> Split with Z = 1 column (the node's input)
    """
    model, run = g.model, g.run
    cfg, params, rec = model.config, model.params, run.record
    k, l, t, n = str(g.kind[i]), int(g.layer[i]), int(g.position[i]), int(g.index[i])
    if k == "logit":
        z = int(i - np.flatnonzero(g.kind == "logit")[0])
        u, site, scale = g.logit_u[z: z + 1], 2 * cfg.n_layers, rec["ln_final.scale"][t]
    elif k == "neuron":  # up[t, n] = (x / s_ln2[t] (1 + w_ln2)) . W_up[:, n]: the ln2 scale frozen
        scale = rec[f"blocks.{l}.ln2.scale"][t]
        u = (params.get(l, "W_up")[:, n] * P.gain(model, params.get(l, "ln2")) / scale)[None, :]
        site = 2 * l + 1
    elif k == "expert":  # Gemma 4: moe.up[t, j, i] = (x / s_ln2_moe[t] w_ln2_moe) . We_up[e][:, i]
        e, n_e = divmod(n, cfg.d_expert)
        scale = rec[f"blocks.{l}.ln2_moe.scale"][t]
        u = (params.get(l, "We_up")[e, :, n_e] * P.gain(model, params.get(l, "ln2_moe")) / scale)[None, :]
        site = 2 * l + 1
    elif k == "feature":  # pre[t, f] = (resid_mid c) . W_enc[:, f] + b_enc[f]: c of graphs.build.input_factor
        tc = g.transcoders
        scale = rec[f"blocks.{l}.ln2.scale"][t]
        u = (tc.layers[l].W_enc[:, n] * input_factor(model, rec, l, tc.input_hook)[t])[None, :]
        site = 2 * l + 1
    else:
        return None
    readout = P.Readout(model, run, P.Targets((P.Token(n, g.label(i)),)), u, site, t,
                        np.asarray([g.input[i]]), g.label(i), np.asarray(scale), (g.label(i),))
    labels, vectors = P.residual_parts(readout)
    values = readout.value_of(vectors)  # [C, 1]
    if k == "feature":
        labels = [*labels, f"L{l}.b_enc"]
        values = np.concatenate([values, [[g.transcoders.layers[l].b_enc[n]]]]).astype(values.dtype)
    return P.Split("residual", readout, labels, values, readout.whole.astype(values.dtype), g.label(i))


def _split_json(split) -> dict:
    return {"labels": list(split.labels), "values": [float(v) for v in split.values[:, 0]],
            "whole": float(split.whole[0]), "sum": float(split.values.astype(np.float64).sum()),
            "residual": float(split.residual[0]), "tolerance": float(split.tolerance[0]), "exact": split.exact,
            "dtype": str(split.values.dtype)}


def _largest(entries, keys, k) -> np.ndarray:
    """The k entries of largest key, largest first, ties in the entries' order: a full stable sort's first k, found
    by partial selection (np.partition for the k-th largest) and a sort of those k only.

    Shapes: entries [n], keys [n] -> [min(k, n)]
    """
    if k == 0:
        return entries[:0]
    if len(entries) > k:
        kth = np.partition(keys, len(keys) - k)[len(keys) - k]  # the k-th largest key
        above = np.flatnonzero(keys > kth)
        pick = np.sort(np.concatenate([above, np.flatnonzero(keys == kth)[: k - len(above)]]))
        entries, keys = entries[pick], keys[pick]
    return entries[np.argsort(-keys, kind="stable")]


def _number(x):
    return None if np.isnan(x) else float(x)
