"""Edge attribution (refprism/interventions/edges.py) against exact edge patches, node-level AtP and a brute count.

- EAP of an edge is the first-order term of its exact patch (built with the forward's edit hook, independently of
  the backward): with the counterfactual a small step eps away, |eap - patch| / |patch| shrinks like eps (10x
  smaller for a 10x smaller step), on every kind of edge (q, k, v of a grouped head, MLP, neuron, logits).
- Summed over the edges out of a node, EAP is the node's AtP (1e-10 relative, float64): the downstream input
  copies are every reader of the residual stream. The edges into the logits are AtP with every later layer
  dropped from the backward.
- EAP-IG (interpolated inputs, midpoint rule) converges as 1/k^2 to its integral, and its edges out of the
  embedding sum to the readout's clean minus counterfactual difference (completeness) as k grows.
- The edge count formula equals a brute enumeration of "u writes before d reads" on small shapes, and gives the
  EAP literature's 32,491 for GPT-2 small (12 x 12) and 74,218 for Gemma 2 2B (26 layers x 8 heads).
"""

import dataclasses

import numpy as np
import pytest

import refprism
from refprism.errors import InputError
from refprism.interventions.attribution import attribute, linear_scores
from refprism.interventions.components import level_groups
from refprism.interventions.edges import (
    attribute_edges,
    downstream_nodes,
    edge_count,
    edge_patch,
    edges,
    upstream_changes,
    upstream_nodes,
)


def _ids(model, seed, T=8):
    return [int(i) for i in np.random.default_rng(seed).integers(0, model.config.vocab_size, T)]


@pytest.fixture(scope="module")
def models(checkpoint):
    return {p: refprism.load(checkpoint(p), dtype="float64") for p in ("tiny", "tiny-gemma2", "tiny-gemma3")}


def _nearby(model, ids, eps, seed=0):
    d = np.random.default_rng(seed).standard_normal((len(ids), model.config.d_model))
    return model.run(ids, edit=lambda name, v, r: v + eps * d if name == "embed" else v)


def _brute_count(L, N, F, neurons):
    """Every (u, d) pair of the compute order: u is written at step a, d reads at step b, an edge iff a <= b,
    with steps 0 (embedding), then per layer: attention reads, heads write, MLP reads, MLP writes."""
    ups, downs = [("embed", 0)], []
    step = 0
    for l in range(L):
        downs += [("qkv", step)] * (3 * N)
        step += 1
        ups += [("head", step)] * N
        m = F if l == neurons else 1
        downs += [("mlp", step)] * m
        step += 1
        ups += [("mlp", step)] * m
    downs.append(("logits", step))
    return sum(1 for _, a in ups for _, b in downs if a <= b)


def test_edge_count_is_the_brute_enumeration_and_the_literature_counts(models):
    cfg = models["tiny"].config
    for L, N, F, neurons in [(2, 4, 128, None), (3, 2, 5, 1), (4, 3, 7, 0), (1, 1, 3, 0)]:
        c = dataclasses.replace(cfg, n_layers=L, n_heads=N, n_kv_heads=1, d_mlp=F, layer_types=())
        assert edge_count(c, neurons) == _brute_count(L, N, F, neurons) == len(edges(c, neurons))
        assert len(upstream_nodes(c, neurons)) == 1 + L * N + L + (F - 1 if neurons is not None else 0)
        assert len(downstream_nodes(c, neurons)) == 3 * N * L + L + 1 + (F - 1 if neurons is not None else 0)
    gpt2 = dataclasses.replace(cfg, n_layers=12, n_heads=12, n_kv_heads=12, layer_types=())
    gemma2_2b = dataclasses.replace(cfg, n_layers=26, n_heads=8, n_kv_heads=4, layer_types=())
    assert edge_count(gpt2) == 32_491
    assert edge_count(gemma2_2b) == 74_218


@pytest.mark.parametrize("preset, direction", [("tiny", "noising"), ("tiny-gemma2", "noising"),
                                               ("tiny-gemma3", "noising"), ("tiny-gemma3", "denoising")])
def test_eap_summed_over_a_nodes_out_edges_is_its_node_atp(models, preset, direction, monkeypatch):
    import refprism.interventions.edges as E

    monkeypatch.setattr(E, "NEURON_CHUNK", 48)  # the split layer's 128 neurons in three blocks (48, 48, 32)
    model = models[preset]
    ids, cf = _ids(model, 1), _ids(model, 2)
    kw = dict(targets=["#5"], versus=["#3"], ablate="resample", counterfactual=cf, at="all", direction=direction)
    for level in ("heads", "neurons:1"):
        e = attribute_edges(model, ids, method="eap", level=level, **kw)
        by_up = {}
        for u, v in zip(e.upstream, e.values):
            by_up[u] = by_up.get(u, 0) + v
        nodes = attribute(model, ids, method="atp", level="heads", **kw)
        scale = np.abs(nodes.values).max()
        for label, v in zip(nodes.labels, nodes.values):
            np.testing.assert_allclose(by_up[label], v, rtol=0, atol=1e-10 * scale, err_msg=label)
        other = "neurons:1" if level == "heads" else "residual"
        nodes = attribute(model, ids, method="atp", level=other, **kw)
        for label, v in zip(nodes.labels, nodes.values):
            if label in by_up:
                np.testing.assert_allclose(by_up[label], v, rtol=0, atol=1e-10 * scale, err_msg=label)
        assert ("L1N7" in by_up) == (level == "neurons:1") and ("L1.mlp" in by_up) == (level == "heads")
        assert "L0.mlp" in by_up and "embed" in by_up


def test_eap_edges_into_the_logits_are_atp_with_later_layers_dropped(models):
    assert_logit_edges_are_atp_with_later_layers_dropped(models["tiny-gemma2"])


def assert_logit_edges_are_atp_with_later_layers_dropped(model):
    """The edges u -> logits (heads level, resample) equal each head's AtP with its layer's MLP and every later
    layer dropped from the backward (the skip path only): the direct path's gradient (test_edges_gemma4 too)."""
    from refprism.gradients.backward import gradients

    ids, cf = _ids(model, 3), _ids(model, 4)
    kw = dict(targets=["#5"], versus=["#3"], ablate="resample", counterfactual=cf, at="all")
    e = attribute_edges(model, ids, method="eap", level="heads", **kw)
    into = {u: v for u, d, v in zip(e.upstream, e.downstream, e.values) if d == "logits"}
    s = e.setting
    L = model.config.n_layers
    for g in level_groups(model.config, "heads", s.position):
        drop = [f"L{g.layer}.mlp", *range(g.layer + 1, L)]
        rec = gradients(model, s.base, targets=s.readout.targets, position=s.position, drop=drop).record
        np.testing.assert_allclose(np.stack([into[lab] for lab in g.labels]), linear_scores(s, [g], record=rec),
                                   rtol=1e-10)
    assert np.abs(np.stack(list(into.values()))).max() > 1e-4


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_eap_is_the_first_order_term_of_the_exact_edge_patch(models, preset):
    model = models[preset]
    ids = _ids(model, 5)
    clean = model.run(ids)
    labels = ["L0H1->L1H2.q", "L0H1->L1H3.k", "L0H2->L1H1.v", "embed->L1H0.k", "L0.mlp->L1H3.v", "L0H3->L0.mlp",
              "L0H0->logits", "embed->L1.mlp", "L1.mlp->logits"]
    gaps = []
    for eps in (1e-2, 1e-3):
        other = _nearby(model, ids, eps)
        e = attribute_edges(model, clean, method="eap", level="heads", targets=["#5"], versus=["#3"],
                            ablate="resample", counterfactual=other, at="all")
        deltas = upstream_changes(e.setting)
        rel = []
        for label in labels:
            exact = edge_patch(e.setting, label, deltas=deltas)
            assert np.abs(exact).max() > 1e-9 * eps, label  # the edge carries an effect of the step's size
            rel.append(np.abs(e.values[e.labels.index(label)] - exact).max() / np.abs(exact).max())
        gaps.append(np.array(rel))
    ratio = gaps[0] / gaps[1]
    assert np.all((ratio > 5) & (ratio < 20)), dict(zip(labels, ratio))  # O(eps)
    assert gaps[1].max() < 0.05


def test_eap_with_a_split_layer_matches_patches_of_neuron_edges(models):
    model = models["tiny-gemma3"]
    ids = _ids(model, 6)
    clean = model.run(ids)
    labels = ["L0H1->L1N3", "L1N3->L2H0.k", "L1N5->L2H1.q", "L1N2->logits", "embed->L1N0"]
    gaps = []
    for eps in (1e-2, 1e-3):
        e = attribute_edges(model, clean, method="eap", level="neurons:1", targets=["#5"], ablate="resample",
                            counterfactual=_nearby(model, ids, eps, seed=1), at="all")
        rel = []
        for label in labels:
            exact = edge_patch(e.setting, label, neurons=1)
            rel.append(np.abs(e.values[e.labels.index(label)] - exact).max() / np.abs(exact).max())
        gaps.append(np.array(rel))
    assert np.all((gaps[0] / gaps[1] > 5) & (gaps[0] / gaps[1] < 20)), gaps


def test_eap_ig_converges_and_its_embedding_edges_are_complete(models):
    model = models["tiny-gemma2"]
    ids, cf = _ids(model, 7), _ids(model, 8)
    kw = dict(level="heads", targets=["#5"], versus=["#3"], ablate="resample", counterfactual=cf, at="all")
    runs = {k: attribute_edges(model, ids, method="eap-ig", steps=k, **kw) for k in (8, 16, 32, 64, 128)}
    # |v_k - v_2k| ~ (3/4) c / k^2 for the midpoint rule: each doubling of k divides it by 4 (from k = 16: this
    # random model's integrand needs k >= 16 to reach the asymptotic regime; measured 9.4 from 8 to 16)
    steps = {k: np.abs(runs[k].values - runs[2 * k].values).max() for k in (16, 32, 64)}
    assert 3.5 < steps[16] / steps[32] < 4.5 and 3.5 < steps[32] / steps[64] < 4.5, steps
    s = runs[8].setting
    from refprism.interventions.setting import Readings

    r = Readings(s)
    whole = r.of_record(s.clean.record)[0] - r.of_record(s.counterfactual.record)[0]
    out_of_embed = {k: sum(v for u, v in zip(a.upstream, a.values) if u == "embed") for k, a in runs.items()}
    gaps = [np.abs(out_of_embed[k] - whole).max() for k in (8, 16, 32)]
    assert gaps[0] / gaps[1] > 3 and gaps[1] / gaps[2] > 3, gaps
    assert gaps[2] < 0.02 * np.abs(whole).max()
    eap = attribute_edges(model, ids, method="eap", **kw)
    assert np.abs(sum(v for u, v in zip(eap.upstream, eap.values) if u == "embed") - whole).max() > 10 * gaps[2]
    assert runs[8].cost["backward"] == 8 and runs[8].rule == "midpoint"


def test_edge_methods_refuse_bad_arguments(models):
    model = models["tiny"]
    ids = _ids(model, 9)
    for kwargs, text in [({"method": "eap", "level": "residual"}, "use --level heads"),
                         ({"method": "eap-ig"}, "needs --ablate resample"),
                         ({"method": "eap", "level": "neurons:9"}, "0 .. 1"),
                         ({"method": "eip"}, "edge method 'eip'")]:
        with pytest.raises(InputError, match=text):
            attribute_edges(model, ids, **kwargs)
    e = attribute_edges(model, ids, method="eap", level="heads", targets=["#5"])
    with pytest.raises(InputError, match="does not exist"):
        edge_patch(e.setting, "L1H0->L0H1.q")
    with pytest.raises(InputError, match="not an edge label"):
        edge_patch(e.setting, "L1H0->L1H1.x")


def test_cli_attribute_eap_lists_each_edge_with_its_ends_and_the_setting(checkpoint, capsys):
    import json

    from refprism import cli

    d = str(checkpoint("tiny-gemma3"))
    ids, cf = "2,5,7,9,11,13", "2,6,7,9,12,13"
    args = ["--model", d, "--ids", ids, "--level", "heads", "--ablate", "resample", "--counterfactual-ids", cf,
            "--targets", "#5", "--at", "all", "--dtype", "float64"]
    assert cli.main(["attribute", *args, "--method", "eap", "--method", "eap-ig", "--steps", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = refprism.load(d, dtype="float64")
    N, L = 4, 3  # the docstring's closed form: 3NL + L + 1 + N (3N L(L-1)/2 + L(L+1)/2 + L) + 3N L(L-1)/2 + ...
    closed = 3 * N * L + L + 1 + N * (3 * N * L * (L - 1) // 2 + L * (L + 1) // 2 + L) + 3 * N * L * (L - 1) // 2 \
        + L * (L - 1) // 2 + L
    assert out["n_edges"] == len(out["edges"]) == edge_count(model.config) == closed == 262
    assert out["ablate"] == "resample" and out["at"] == list(range(6)) and out["methods"]["eap-ig"]["steps"] == 3
    assert out["methods"]["eap-ig"]["rule"] == "midpoint" and out["methods"]["eap"]["cost"]["backward"] == 1
    row = {e["label"]: e for e in out["edges"]}["L0H1->L2H3.k"]
    assert row["upstream"] == "L0H1" and row["downstream"] == "L2H3.k"
    lib = attribute_edges(model, [2, 5, 7, 9, 11, 13], level="heads", ablate="resample",
                          counterfactual=[2, 6, 7, 9, 12, 13], targets=["#5"], at="all")
    np.testing.assert_allclose(row["eap"], lib.values[lib.labels.index("L0H1->L2H3.k")], rtol=1e-12)
    assert cli.main(["attribute", *args, "--method", "eap"]) == 0
    assert "edges" in capsys.readouterr().out


@pytest.mark.parametrize("extra, text", [
    (["--method", "eap-ig", "--ablate", "zero"], "eap-ig interpolates the input"),
    (["--method", "eap", "--ablate", "zero", "--level", "residual"], "use --level heads or --level neurons:L"),
    (["--method", "eap", "--method", "atp", "--ablate", "zero"], "give one kind per command"),
    (["--method", "eap-ig", "--ablate", "resample", "--counterfactual-ids", "2,5,7", "--steps", "0"],
     "steps must be a positive integer"),
    (["--method", "eap", "--ablate", "zero", "--level", "neurons:7"], "layer 7 is out of range"),
])
def test_cli_attribute_eap_refuses_before_the_weights(checkpoint, capsys, monkeypatch, extra, text):
    import refprism.model
    from refprism import cli

    def read(self):
        if self.deferred is not None:
            raise AssertionError("the weights were read before the refusal")
        return self.params

    monkeypatch.setattr(refprism.model.Model, "load_weights", read)
    argv = ["attribute", "--model", str(checkpoint("tiny-gemma3")), "--ids", "2,5,7", "--targets", "#5"]
    if "--level" not in extra:
        argv += ["--level", "heads"]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refprism: error:") and text in err and "\n" not in err, err
