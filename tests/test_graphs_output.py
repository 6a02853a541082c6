"""The graph's outputs: the circuit-tracer / Neuronpedia JSON (jsonschema against its required fields), the CLI, and
the faithfulness check against a forward with the other neurons ablated by an edit written here."""

import json

import jsonschema
import numpy as np
import pytest

import refprism
from refprism import cli
from refprism.graphs import Pruned, faithfulness, graph, graph_json

NODE = {
    "type": "object",
    "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"],
    "properties": {
        "node_id": {"type": "string"}, "feature": {"type": "integer"}, "layer": {"type": "string"},
        "ctx_idx": {"type": "integer"}, "feature_type": {"type": "string"}, "token_prob": {"type": "number"},
        "is_target_logit": {"type": "boolean"}, "run_idx": {"type": "integer"},
        "reverse_ctx_idx": {"type": "integer"}, "jsNodeId": {"type": "string"}, "clerp": {"type": "string"},
        "influence": {"type": ["number", "null"]}, "activation": {"type": ["number", "null"]},
    },
}
SCHEMA = {  # circuit-tracer's frontend/graph_models.py: Model, Metadata, QParams, Node, Link (required fields)
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {"type": "object", "required": ["slug", "scan", "transcoder_list", "prompt_tokens", "prompt"],
                     "properties": {"prompt_tokens": {"type": "array", "items": {"type": "string"}},
                                    "node_threshold": {"type": ["number", "null"]},
                                    "schema_version": {"type": ["integer", "null"]}}},
        "qParams": {"type": "object", "required": ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"]},
        "nodes": {"type": "array", "items": NODE},
        "links": {"type": "array", "items": {"type": "object", "required": ["source", "target", "weight"],
                                             "properties": {"source": {"type": "string"},
                                                            "target": {"type": "string"},
                                                            "weight": {"type": "number"}}}},
    },
}


@pytest.fixture(scope="module")
def model(checkpoint):
    return refprism.load(checkpoint("tiny-gemma2"), dtype="float64")


def _ids(model, T=8, seed=4):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, T)


def test_json_has_circuit_tracers_fields_ids_and_exact_weights(model):
    g = graph(model, _ids(model), max_nodes=400, batch_size=64)
    doc = json.loads(json.dumps(graph_json(g, slug="t")))
    jsonschema.validate(doc, SCHEMA)
    L = model.config.n_layers
    ids = {n["node_id"]: n for n in doc["nodes"]}
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit", "mlp neuron"} <= kinds
    for n in doc["nodes"]:
        parts = n["node_id"].split("_")
        if n["feature_type"] == "embedding":
            assert parts[0] == "E" and int(parts[2]) == n["ctx_idx"]
        elif n["feature_type"] == "logit":
            assert parts[0] == str(L + 1) and " (p=" in n["clerp"] and n["clerp"].startswith("Output ")
            p = float(n["clerp"].split("(p=")[1].rstrip(")"))
            assert p == pytest.approx(n["token_prob"], abs=5e-4)
        elif n["feature_type"] == "mlp reconstruction error":
            assert parts[1] == "-1"
        else:
            assert int(parts[0]) < L and int(parts[1]) < model.config.d_mlp and int(parts[2]) == n["ctx_idx"]
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    index = {g.label(i): i for i in range(g.n)}
    assert doc["links"]
    for link in doc["links"][:: max(1, len(doc["links"]) // 50)]:
        assert link["source"] in ids and link["target"] in ids

        def node(node_id):
            a, b, c = node_id.split("_")
            if a == "E":
                return index[f"E@{c}"]
            if int(a) == L + 1:
                return int(np.flatnonzero((g.kind == "logit") & (g.index == int(b)))[0])
            return index[f"L{a}N{b}@{c}" if b != "-1" else f"L{a}.rest@{c}"]

        i, j = node(link["target"]), node(link["source"])
        m = (g.rows == i) & (g.cols == j)
        assert link["weight"] == g.values[m][0]
    info = doc["metadata"]["info"]
    assert info["max_row_sum_error"] <= 1e-10 * np.nanmax(np.abs(g.input))
    assert info["explored_neurons"] == 400 and 0 < info["completeness_score"] < 1


def _readout_with_neurons_kept(g, keep, means=None):
    """The logit nodes' demeaned pre-cap readouts in a forward with every neuron outside keep [L, T, F] set to 0 or
    to its mean over positions 1 .. T-1 (an edit of mlp.act written here)."""
    model, run = g.model, g.run

    def edit(name, value, record):
        if name.endswith("mlp.act"):
            l = int(name.split(".")[1])
            out = value.copy()
            T = keep.shape[1]
            fill = 0.0 if means is None else np.broadcast_to(run.record[name][1:].mean(axis=0), (T, value.shape[1]))
            out[:T] = np.where(keep[l], value[:T], fill)
            return out
        return value

    rec = model.run(run.tokens, edit=edit).record
    raw = rec["logits_uncapped"][g.read_at]
    logits = g.kind == "logit"
    return raw[g.index[logits]] - raw.mean()


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_faithfulness_equals_a_forward_with_the_other_neurons_ablated(model, ablation):
    g = graph(model, _ids(model))
    pr = g.pruned()
    f = faithfulness(g, pruned=pr, ablation=ablation)
    cfg = model.config
    keep = np.zeros((cfg.n_layers, g.read_at + 1, cfg.d_mlp), bool)
    on = pr.node_mask & (g.kind == "neuron")
    keep[g.layer[on], g.position[on], g.index[on]] = True
    means = ablation == "mean" or None
    kept = _readout_with_neurons_kept(g, keep, means)
    none = _readout_with_neurons_kept(g, np.zeros_like(keep), means)
    clean = _readout_with_neurons_kept(g, np.ones_like(keep), means)
    np.testing.assert_allclose(f["kept"], kept, rtol=1e-10)
    np.testing.assert_allclose(f["none"], none, rtol=1e-10)
    np.testing.assert_allclose(f["clean"], clean, rtol=1e-10)
    w = g.logit_weights
    assert f["recovered"] == pytest.approx(w @ (kept - none) / (w @ (clean - none)), rel=1e-10)
    assert f["kept_neurons"] == keep.sum() < keep.size
    everything = Pruned(np.ones(g.n, bool), np.ones(len(g.values), bool), pr.cumulative, pr.influence)
    assert faithfulness(g, pruned=everything, ablation=ablation)["recovered"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_faithfulness_at_a_longer_prompt_equals_ablating_each_neuron_by_hand(checkpoint, ablation):
    """The fast path (one merged assignment per layer, means from one read of the clean record) against a
    reference that sets each ablated neuron (l, t, n) on its own in a forward edit: T = 40, remainders kept."""
    model = refprism.load(checkpoint("tiny-gemma3"), dtype="float64")
    g = graph(model, _ids(model, T=40, seed=9), max_nodes=60)
    pr = g.pruned()
    assert (pr.node_mask & (g.kind == "remainder")).any() and g.explored < g.n_neurons
    f = faithfulness(g, pruned=pr, ablation=ablation)
    cfg, run, p = model.config, g.run, g.read_at
    nodes = [(str(k), int(l), int(t), int(n)) for k, l, t, n, on in
             zip(g.kind, g.layer, g.position, g.index, pr.node_mask)]
    explored = {(l, t, n) for k, l, t, n in nodes if k == "neuron"}
    kept = {(l, t, n) for (k, l, t, n), on in zip(nodes, pr.node_mask) if k == "neuron" and on}
    for (k, l, t, _), on in zip(nodes, pr.node_mask):
        if k == "remainder" and on:
            kept |= {(l, t, n) for n in range(cfg.d_mlp) if (l, t, n) not in explored}

    def readout(keep):
        def edit(name, value, record):
            if not name.endswith(".mlp.act"):
                return value
            l, out = int(name.split(".")[1]), value.copy()
            acts = run.record[name]
            for t in range(p + 1):
                for n in range(cfg.d_mlp):
                    if (l, t, n) not in keep:
                        out[t, n] = 0.0 if ablation == "zero" else sum(acts[s, n] for s in range(1, len(acts))) / (
                            len(acts) - 1)
            return out

        raw = model.run(run.tokens, edit=edit).record["logits"][p]  # Gemma 3: no final cap
        return raw[g.index[g.kind == "logit"]] - raw.mean()

    np.testing.assert_allclose(f["kept"], readout(kept), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f["none"], readout(set()), rtol=1e-10, atol=1e-12)
    assert f["kept_neurons"] == len(kept)


def test_cli_writes_the_graph(model, checkpoint, tmp_path, capsys):
    out = tmp_path / "graph.json"
    assert cli.main(["graph", "--ids", "2 17 33 5 9", "--model", str(checkpoint("tiny-gemma2")), "--out", str(out),
                     "--max-nodes", "300", "--check", "zero"]) == 0
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    printed = capsys.readouterr().out
    assert "300 of" in printed and "recovered" in printed
    assert "faithfulness" in doc["metadata"]["info"]


@pytest.mark.parametrize("args, message", [
    (["--node-threshold", "1.5"], "--node-threshold must be between 0 and 1"),
    (["--targets"], "--targets needs at least one token"),
    (["--versus", "#3"], "versus needs targets"),
    (["--max-nodes", "-1"], "max_nodes"),
])
def test_cli_refusals_are_one_line(checkpoint, tmp_path, capsys, args, message):
    code = cli.main(["graph", "--ids", "2 17 33", "--model", str(checkpoint("tiny-gemma2")), "--out",
                     str(tmp_path / "g.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.json").exists()
