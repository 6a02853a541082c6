"""The graph JSON that circuit-tracer's frontend and Neuronpedia open: metadata / qParams / nodes / links.

Node ids as circuit-tracer writes them: a neuron {layer}_{neuron}_{pos} (a feature's slot), a remainder node
{layer}_-1_{pos} (the error node's slot, feature_type "mlp reconstruction error"), an embedding E_{token}_{pos},
a logit {L+1}_{token}_{pos} with the clerp 'Output "piece" (p=...)'. In the transcoder basis: a feature
{layer}_{feature}_{pos} ("cross layer transcoder", circuit-tracer's type for every transcoder feature), an error
node {layer}_-1_{pos}, the unexplored features {layer}_-4_{pos} (both "mlp reconstruction error"), and refprism's
bias nodes (circuit-tracer has none) {layer}_-2_{pos} (b_dec) and {layer}_-3_{pos} (b_enc), feature_type "bias".
Gemma 4 (graphs.gemma4): one feature index space per layer, so that no id collides with circuit-tracer's: a dense
neuron {layer}_{n}_{pos} (n < F_l, the layer's own width), expert e's neuron i {layer}_{F_l + e G + i}_{pos}
(feature_type "mlp expert neuron"), PLE neuron q {layer}_{F_l + E G + q}_{pos} ("per-layer input neuron"), and the
PLE token node {layer}_-5_{pos} ("per-layer token embedding", a source beside the embeddings).
Only the pruned graph's kept nodes and edges
are written (embeddings and logits always); `influence` is circuit-tracer's cumulative influence score.
metadata.info carries refprism's own numbers (basis, explored neurons, passes, scores, exactness).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refprism.files import atomic_write
from refprism.graphs import gemma4 as _gemma4

SCHEMA_VERSION = 1
_GEMMA4_TYPES = {"expert": "mlp expert neuron", "ple": "per-layer input neuron",
                 "ple_token": "per-layer token embedding"}  # graphs.gemma4's kinds


def graph_json(g, *, slug=None, node_threshold=0.8, edge_threshold=0.98, faithfulness=None) -> dict:
    """The pruned graph as circuit-tracer's Model: {metadata, qParams, nodes, links}.

    Shapes: -> a dict (json.dumps-able)
    """
    cfg = g.model.config
    L = cfg.n_layers
    pr = g.pruned(node_threshold, edge_threshold)
    ids = [_node_id(g, i, L) for i in range(g.n)]
    logits = np.flatnonzero(g.kind == "logit")
    probs = _probabilities(g)
    nodes = {}
    for i in np.flatnonzero(pr.node_mask):
        nodes[i] = _node(g, int(i), ids[i], L, float(pr.cumulative[i]), probs, logits)
    m = pr.edge_mask
    links = [{"source": ids[j], "target": ids[i], "weight": float(w)}
             for i, j, w in zip(g.rows[m], g.cols[m], g.values[m]) if i in nodes and j in nodes]
    used = {x["source"] for x in links} | {x["target"] for x in links}
    kept = [n for n in nodes.values() if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    replacement, completeness = g.scores()
    targets = np.flatnonzero(~np.isnan(g.input))
    exact = float(np.abs(g.row_sums()[targets] - g.input[targets]).max()) if len(targets) else 0.0
    info = {"creator": "refprism", "basis": g.basis, "readout": g.readout, "explored_neurons": g.explored,
            "neurons": g.n_neurons, "backward_passes": g.passes, "replacement_score": replacement,
            "completeness_score": completeness, "max_row_sum_error": exact, "edge_threshold": edge_threshold,
            "frozen": ["norm scales", "attention patterns", "gelu(gate) factors"]
            + (["the router's top-k choices and weights"] if cfg.moe else []),
            "left_out": ["the gate path", "the query/key path"]}
    if g.basis == "transcoders":
        tc = g.transcoders
        info.update({"explored_features": g.explored, "active_features": g.n_neurons,
                     "transcoders": {"format": tc.format, "hooks": list(tc.hook_names), "source": tc.source,
                                     "d_sae": tc.layers[0].d_sae, "skip": tc.skip},
                     "frozen": ["norm scales", "attention patterns", "the features' activation gates"],
                     "left_out": ["the activation gates' dependence on their inputs", "the query/key path"]})
    if faithfulness is not None:
        info["faithfulness"] = faithfulness
    transcoder_list = [tc.source for tc in g.transcoders.layers] if g.basis == "transcoders" else []
    metadata = {"slug": slug or "refprism-graph", "scan": g.model.name, "transcoder_list": transcoder_list,
                "prompt_tokens": [g.model.piece(int(t)) for t in g.run.tokens[: g.read_at + 1]],
                "prompt": g.prompt, "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION, "info": info}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": kept, "links": links}


def write_graph_json(g, out, **kwargs) -> Path:
    """graph_json written to `out` atomically (never a half file)."""
    text = json.dumps(graph_json(g, **kwargs), indent=1)
    return atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _probabilities(g) -> np.ndarray:
    """The model's next-token probabilities at the readout position (after Gemma 2's soft-cap), float64."""
    z = np.asarray(g.run.record["logits"][g.read_at], dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _node_id(g, i, L) -> str:
    k, l, t, n = g.kind[i], int(g.layer[i]), int(g.position[i]), int(g.index[i])
    if k in ("expert", "ple", "ple_token"):
        return f"{l}_{_gemma4.feature_id(g.model.config, l, k, n)}_{t}"
    if k in ("neuron", "feature", "bias"):
        return f"{l}_{n}_{t}"
    if k == "remainder":
        return f"{l}_{-1 if g.basis == 'neurons' else -4}_{t}"
    if k == "error":
        return f"{l}_-1_{t}"
    if k == "embed":
        return f"E_{n}_{t}"
    return f"{L + 1}_{n}_{t}"


def _node(g, i, node_id, L, influence, probs, logits) -> dict:
    k, l, t, n = g.kind[i], int(g.layer[i]), int(g.position[i]), int(g.index[i])
    T = g.read_at + 1
    base = {"node_id": node_id, "ctx_idx": t, "run_idx": 0, "reverse_ctx_idx": 0, "token_prob": 0.0,
            "is_target_logit": False, "influence": influence}
    if k == "neuron":
        return {**base, "feature": n, "layer": str(l), "feature_type": "mlp neuron", "jsNodeId": f"{l}_{n}-0",
                "clerp": f"L{l}N{n} at {t} (act {g.activation[i]:.3g})", "activation": float(g.activation[i])}
    if k in _gemma4.NEW_KINDS:
        f = _gemma4.feature_id(g.model.config, l, k, n)
        label = _gemma4.label(g.model.config, k, l, n, t).replace("@", " at ")
        act = None if k == "ple_token" else float(g.activation[i])
        return {**base, "feature": f, "layer": str(l), "feature_type": _GEMMA4_TYPES[k],
                "jsNodeId": f"{l}_{f}-{0 if act is not None else t}", "activation": act,
                "clerp": label + ("" if act is None else f" (act {act:.3g})")}
    if k == "feature":
        return {**base, "feature": n, "layer": str(l), "feature_type": "cross layer transcoder",
                "jsNodeId": f"{l}_{n}-0", "clerp": f"L{l}F{n} at {t} (act {g.activation[i]:.3g})",
                "activation": float(g.activation[i])}
    if k == "remainder":
        f = -1 if g.basis == "neurons" else -4
        return {**base, "feature": f, "layer": str(l), "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{l}_{f}-{t}", "activation": None,
                "clerp": f"the unexplored {'neurons' if g.basis == 'neurons' else 'features'} of L{l} at {t}"}
    if k == "error":
        return {**base, "feature": -1, "layer": str(l), "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{l}_-1-{t}", "clerp": f"the transcoder's error at L{l}, {t}", "activation": None}
    if k == "bias":
        name = "b_dec" if n == -2 else "b_enc"
        return {**base, "feature": n, "layer": str(l), "feature_type": "bias", "jsNodeId": f"{l}_{n}-{t}",
                "clerp": f"the transcoder's {name} at L{l}, {t}", "activation": None}
    if k == "embed":
        return {**base, "feature": t, "layer": "E", "feature_type": "embedding", "jsNodeId": f"E_{n}-{t}",
                "clerp": f"Emb: {g.model.piece(n)!r}", "activation": None}
    p = float(probs[n])
    z = int(i - logits[0])
    return {**base, "feature": n, "layer": str(L + 1), "ctx_idx": T - 1, "feature_type": "logit",
            "token_prob": p, "is_target_logit": z == 0, "jsNodeId": f"L_{n}-{T - 1}",
            "clerp": f'Output "{g.model.piece(n)}" (p={p:.3f})', "activation": float(g.activation[i]),
            "influence": None}
