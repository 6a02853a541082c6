"""The graph panel of `refprism report --graph`: the numbers graphs.graph_view embeds are the Graph's own, every
listed edge sum and prism split adds up to the node's input, and in Chromium a click on a node shows them.

Independent of the view's code: the top edges are re-selected here from Graph.incoming / the graph's columns with a
full sort; a neuron's split is checked against the prisms' own chain through that neuron (prisms.through_neuron:
its parts are the split's parts times one factor, term / input), a target logit's against prisms.residual_prism of
prisms.logits_readout, a demeaned logit's sum against the run's recorded pre-cap logits. float64 throughout: the
graph's rows sum to their inputs within 1e-10 of the largest input (docs/graphs.md); the JSON carries every float64
exactly (shortest round-trip text), so the page's numbers are compared with ==.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report_browser import ARTIFACTS, Tab, browser  # noqa: F401  (browser: the Chromium fixture)

import refprism
from refprism import cli, report
from refprism import prisms as P
from refprism.errors import InputError
from refprism.graphs import graph, graph_view

PROMPT = "The capital city of France is"
TARGETS = ["▁Paris", "▁London"]


@pytest.fixture(scope="module")
def models(checkpoint):
    return {p: refprism.load(checkpoint(p), dtype="float64") for p in ("tiny", "tiny-gemma2", "tiny-gemma3")}


def _top(entries_values, entries_ends, k):
    """The k largest |value| (a full stable sort, not the view's partial selection), as (end, value)."""
    order = np.argsort(-np.abs(entries_values), kind="stable")[:k]
    return [(int(entries_ends[o]), float(entries_values[o])) for o in order]


def _shown_index(view):
    return {n["label"]: k for k, n in enumerate(view["nodes"])}


def check_view(g, view):
    """Every embedded number of the view against the Graph (the module docstring)."""
    index = {g.label(i): i for i in range(g.n)}
    scale = np.nanmax(np.abs(g.input))
    pr = g.pruned(view["thresholds"]["node"], view["thresholds"]["edge"])
    sums = g.row_sums()
    local = _shown_index(view)
    assert len(view["nodes"]) <= view["shown"]["max_nodes"] or (g.kind == "logit").sum() > view["shown"]["max_nodes"]
    assert {n["label"] for n in view["nodes"] if n["kind"] == "logit"} == set(g.logit_labels)
    k = view["top"]
    for n in view["nodes"]:
        i = index[n["label"]]
        assert pr.node_mask[i], n["label"]
        assert n["influence"] == float(pr.influence[i])
        if n["kind"] in ("neuron", "feature", "logit", "expert", "ple"):
            assert n["value"] == float(g.activation[i]) and n["input"] == float(g.input[i])
            src, val = g.incoming(i)
            inc = n["incoming"]
            assert [(index[label], v) for label, v, _ in inc["top"]] == _top(val, src, k)
            assert all(shown == local.get(label, -1) for label, _, shown in inc["top"])
            assert inc["count"] == len(val) and inc["others"]["count"] == max(0, len(val) - k)
            assert inc["sum"] == float(sums[i])
            assert abs(inc["sum"] - g.input[i]) <= 1e-10 * scale  # the row sums to the node's input
            assert inc["residual"] == float(g.input[i] - sums[i])
            np.testing.assert_allclose(inc["others"]["sum"] + sum(v for _, v, _ in inc["top"]), inc["sum"],
                                       rtol=0, atol=1e-12 * scale)
        else:
            assert n["value"] is None and n["input"] is None and n["incoming"] is None and n["split"] is None
        m = g.cols == i
        out = n["outgoing"]
        assert [(index[label], v) for label, v, _ in out["top"]] == _top(g.values[m], g.rows[m], k)
        assert out["count"] == int(m.sum())
        np.testing.assert_allclose(out["sum"], g.values[m].sum(), rtol=0, atol=1e-12 * scale)
    labels = np.array([index[n["label"]] for n in view["nodes"]])
    key = g.rows * g.n + g.cols  # graph() sorts its entries by (row, col): one searchsorted finds each
    assert (np.diff(key) > 0).all()
    weights = []
    for t, s, w in view["edges"]:
        e = np.searchsorted(key, labels[t] * g.n + labels[s])
        assert key[e] == labels[t] * g.n + labels[s] and w == float(g.values[e]) and pr.edge_mask[e]
        weights.append(abs(w))
    assert weights == sorted(weights, reverse=True)
    shown = np.isin(g.rows, labels) & np.isin(g.cols, labels) & pr.edge_mask
    assert len(view["edges"]) == min(view["shown"]["max_edges"], int(shown.sum()))
    if len(view["edges"]) < shown.sum():  # the largest |A| among the pruned edges between shown nodes
        assert weights[-1] >= np.sort(np.abs(g.values[shown]))[::-1][len(weights)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_the_embedded_numbers_are_the_graphs(models, preset):
    model = models[preset]
    g = graph(model, PROMPT)
    view = graph_view(g, max_nodes=40, max_edges=150, top=6)
    assert view["shown"]["nodes"] == 40 < view["pruned"]["nodes"]  # the caps bite on these graphs
    assert view["shown"]["edges"] == 150 < view["pruned"]["edges"]
    check_view(g, view)
    # the view's JSON holds nothing that JSON cannot carry exactly (no NaN)
    assert json.loads(json.dumps(view, allow_nan=False)) == view


def test_the_view_of_an_explored_graph_has_remainders(models):
    """With max_nodes below every neuron, remainder nodes are sources with outgoing edges only."""
    g = graph(models["tiny-gemma2"], PROMPT, max_nodes=120, batch_size=32)
    view = graph_view(g, max_nodes=500, max_edges=5000)
    assert view["shown"]["nodes"] == view["pruned"]["nodes"]  # no cap here
    check_view(g, view)
    assert any(n["kind"] == "remainder" for n in view["nodes"])


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_every_split_sums_to_the_input_and_is_the_prisms(models, preset):
    model = models[preset]
    run = model.run(PROMPT)
    p = len(run.tokens) - 1
    root = P.logits_readout(model, run, TARGETS)
    res = P.residual_prism(root)
    for targets in (TARGETS, None):
        g = graph(model, PROMPT, targets=targets)
        view = graph_view(g, max_nodes=60, max_edges=10)
        scale = np.nanmax(np.abs(g.input))
        raw = run.record["logits_uncapped" if model.config.final_softcap else "logits"][p]
        chained = 0
        for n in view["nodes"]:
            sp = n["split"]
            if sp is None:
                continue
            assert abs(sp["sum"] - n["input"]) <= 1e-10 * scale and sp["exact"], n["label"]
            assert sp["whole"] == n["input"] and sp["sum"] == float(np.sum(sp["values"]))
            if n["kind"] == "neuron":
                assert sp["labels"] == report.page.residual_labels(2 * n["layer"] + 1)  # resid_mid of its layer
                if n["position"] == p:  # the prisms' chain through the neuron: the same parts times term / input
                    chain = P.residual_prism(P.through_neuron(root, n["layer"], n["index"]))
                    ratio = chain.whole / n["input"]
                    np.testing.assert_allclose(chain.values, np.outer(sp["values"], ratio), rtol=1e-10,
                                               atol=1e-12 * np.abs(chain.values).max())
                    chained += 1
            elif targets is not None:  # the prisms' residual prism of the logits, column z
                z = TARGETS.index(n["label"])
                assert sp["labels"] == res.labels  # (one row of u against two: BLAS may sum in another order)
                np.testing.assert_allclose(sp["values"], res.values[:, z], rtol=0, atol=1e-13 * scale)
            else:  # the demeaned pre-cap logit, from the run's record
                assert abs(sp["sum"] - (raw[n["index"]] - raw.mean())) <= 1e-10 * scale
        assert chained >= 3


@pytest.mark.parametrize("hook", ["normalized", "resid_mid", "ln2.out"])
def test_feature_splits_take_the_encoder_bias(models, tmp_path, hook):
    """A transcoder feature's input pre = u . resid_mid + b_enc (u: W_enc[:, f] times the hook's input factor):
    the split has the b_enc part and sums to pre, for each of the three places a transcoder reads."""
    from test_graphs_transcoders import _weights, write_circuit_tracer, write_gemmascope, write_sae_lens

    model = models["tiny-gemma2"]
    w = _weights(model.config, seed=5)
    path = {"normalized": lambda: write_gemmascope(tmp_path / "x", w),
            "resid_mid": lambda: write_circuit_tracer(tmp_path / "x", w, hook="hook_resid_mid"),
            "ln2.out": lambda: write_sae_lens(tmp_path / "x", w, architecture="skip_transcoder",
                                              hook="mlp.hook_in")}[hook]()
    g = graph(model, PROMPT, transcoders=path)
    assert g.transcoders.input_hook == hook
    view = graph_view(g, max_nodes=50, max_edges=50)
    scale = np.nanmax(np.abs(g.input))
    features = [n for n in view["nodes"] if n["kind"] == "feature"]
    assert features
    for n in features:
        sp = n["split"]
        assert sp["labels"][-1] == f"L{n['layer']}.b_enc" and sp["labels"][0] == "embed"
        assert sp["values"][-1] == float(g.transcoders.layers[n["layer"]].b_enc[n["index"]])
        assert abs(sp["sum"] - n["input"]) <= 1e-10 * scale
    check_view(g, view)


def test_refusals(models, tiny):
    model = models["tiny-gemma2"]
    g = graph(model, PROMPT)
    for kw, message in (({"max_nodes": 0}, "max_nodes must be an integer of at least 1, got 0"),
                        ({"top": 0}, "top must be an integer of at least 1"),
                        ({"max_edges": 1.5}, "max_edges must be an integer")):
        with pytest.raises(InputError, match=message):
            graph_view(g, **kw)
    view = graph_view(g, max_nodes=20, max_edges=20)
    other = model.run("The capital city of Spain is")
    with pytest.raises(InputError, match="another prompt"):
        report.build_page(model, other, TARGETS, depth=0, graph=view)
    with pytest.raises(InputError, match="another prompt"):
        report.build_page(model, model.run(PROMPT), TARGETS, depth=0, position=-2, graph=view)
    with pytest.raises(InputError, match="the graph is of the model"):
        report.build_page(tiny, tiny.run(PROMPT), TARGETS, depth=0, graph=view)
    broken = {k: v for k, v in view.items() if k != "edges"}
    with pytest.raises(InputError, match="lacks the key 'edges'"):
        report.build_page(model, model.run(PROMPT), TARGETS, depth=0, graph=broken)
    broken = {**view, "nodes": [{k: v for k, v in view["nodes"][0].items() if k != "split"}]}
    with pytest.raises(InputError, match=r"nodes\[0\] lacks the key 'split'"):
        report.build_page(model, model.run(PROMPT), TARGETS, depth=0, graph=broken)


def test_cli(checkpoint, tmp_path, capsys):
    tiny2 = checkpoint("tiny-gemma2")
    out = tmp_path / "r.html"
    args = ["report", PROMPT, "--model", str(tiny2), "--dtype", "float64", "--out", str(out), "--depth", "0"]
    assert cli.main([*args, "--graph", "--graph-nodes", "30", "--graph-edges", "50"]) == 0
    data = report.page_data(out.read_text(encoding="utf-8"))
    view = data["sections"]["graph"]
    model = refprism.load(tiny2, dtype="float64")
    g = graph(model, PROMPT)  # the CLI's defaults: circuit-tracer's logits, 7,500 neurons (all of them here)
    assert view == graph_view(g, max_nodes=30, max_edges=50)
    capsys.readouterr()
    for extra, message in ((["--graph-nodes", "0"], "--graph-nodes must be at least 1, got 0"),
                           (["--edge-threshold", "1.5"], "--edge-threshold must be between 0 and 1"),
                           (["--versus", "▁Tokyo"], "--graph --versus needs --targets")):
        bad = tmp_path / "bad.html"
        assert cli.main([*args[:-4], "--out", str(bad), "--graph", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not bad.exists()
    # Gemma 4: its experts, PLE neurons and PLE token nodes on the page, every number the Graph's
    g4 = checkpoint("tiny-gemma4", intermediate_size=16, moe_intermediate_size=8)
    page4 = tmp_path / "g4.html"
    short = "The capital"
    assert cli.main(["report", short, "--model", str(g4), "--dtype", "float64", "--out", str(page4), "--depth", "0",
                     "--graph", "--max-nodes", "300", "--graph-nodes", "60", "--graph-edges", "80"]) == 0
    view4 = report.page_data(page4.read_text(encoding="utf-8"))["sections"]["graph"]
    g = graph(refprism.load(g4, dtype="float64"), short, max_nodes=300)
    assert view4 == graph_view(g, max_nodes=60, max_edges=80)
    check_view(g, view4)
    assert {"expert", "ple"} & {n["kind"] for n in view4["nodes"]}
    capsys.readouterr()
    # without --graph the page has no graph section
    assert cli.main([*args, "--force"]) == 0
    assert "graph" not in report.page_data(out.read_text(encoding="utf-8"))["sections"]


# ------------------------------------------------------------------------------------------------- the browser


def panel_cells(tab, role):
    return [(label, v) for label, _, v in tab.cells(f"[data-role=graph-panel] td[data-role='{role}']")]


def one(tab, role):
    cells = panel_cells(tab, role)
    assert len(cells) == 1, (role, cells)
    return cells[0][1]


def test_the_graph_in_chromium(browser, models, tmp_path):  # noqa: F811
    model = models["tiny-gemma2"]
    run = model.run(PROMPT)
    g = graph(model, PROMPT, targets=TARGETS)
    view = graph_view(g, max_nodes=60, max_edges=200, top=5)
    page_file = report.write_report(tmp_path / "graph.html", model, run, TARGETS, depth=0, graph=view)
    tab = Tab(browser, page_file.as_uri())
    index = {g.label(i): i for i in range(g.n)}

    # it renders: one circle per shown node, one path per shown edge, the caps said on the page
    ids = tab.page.eval_on_selector_all("[data-section=graph] circle", "els => els.map(e => e.dataset.id)")
    assert ids == [n["id"] for n in view["nodes"]]
    edges = tab.page.eval_on_selector_all("[data-section=graph] path[data-edge]",
                                          "els => els.map(e => [e.dataset.edge, +e.dataset.value])")
    assert [(f"{t},{s}", w) for t, s, w in view["edges"]] == [tuple(e) for e in edges]
    caps = tab.page.inner_text("[data-role=graph-caps]")
    assert f"Shown: 60 of {view['pruned']['nodes']} pruned nodes" in caps and "left out of this page" in caps
    assert "Click a node" in tab.page.inner_text("[data-role=graph-panel]")
    tab.shot("graph-1")

    # a neuron: its value, input, top incoming edges (from the Graph, re-selected here), their sum and residual
    neuron = max((n for n in view["nodes"] if n["kind"] == "neuron" and n["layer"] > 0),
                 key=lambda n: n["influence"])
    i = index[neuron["label"]]
    tab.page.click(f"circle[data-id='{neuron['id']}']")
    assert tab.page.get_attribute("[data-role=graph-panel]", "data-id") == neuron["id"]
    assert one(tab, "g-value") == float(g.activation[i]) and one(tab, "g-input") == float(g.input[i])
    src, val = g.incoming(i)
    assert [(index[label], v) for label, v in panel_cells(tab, "g-in")] == _top(val, src, 5)
    total = one(tab, "g-in-sum")
    assert abs(total - g.input[i]) <= 1e-10 * np.nanmax(np.abs(g.input))
    np.testing.assert_allclose(total, val.sum(), rtol=1e-13)
    assert one(tab, "g-in-residual") == float(g.input[i] - total)
    m = g.cols == i
    assert [(index[label], v) for label, v in panel_cells(tab, "g-out")] == _top(g.values[m], g.rows[m], 5)
    # its split: the prisms' chain through it, divided by term / input (at the readout's position)
    split = panel_cells(tab, "g-split")
    assert [label for label, _ in split] == P.residual_parts(P.logits_readout(model, run, TARGETS))[0][
        : 2 * neuron["layer"] + 2]
    assert abs(one(tab, "g-split-sum") - g.input[i]) <= 1e-10 * np.nanmax(np.abs(g.input))
    assert tab.page.get_attribute("[data-role=g-split-exact]", "data-exact") == "true"
    if neuron["position"] == g.read_at:
        chain = P.residual_prism(P.through_neuron(P.logits_readout(model, run, TARGETS), neuron["layer"],
                                                  neuron["index"]))
        np.testing.assert_allclose(chain.values, np.outer([v for _, v in split], chain.whole / g.input[i]),
                                   rtol=1e-10, atol=1e-12 * np.abs(chain.values).max())
    tab.shot("graph-2-neuron")

    # a logit: its split is the residual prism of that logit (prisms.residual_prism, column z)
    logit = next(n for n in view["nodes"] if n["kind"] == "logit" and n["label"] == TARGETS[1])
    tab.page.click(f"circle[data-id='{logit['id']}']")
    res = P.residual_prism(P.logits_readout(model, run, TARGETS))
    split = panel_cells(tab, "g-split")
    assert [label for label, _ in split] == res.labels
    np.testing.assert_allclose([v for _, v in split], res.values[:, 1], rtol=0, atol=1e-13 * np.abs(res.whole).max())
    assert [v for _, v in split] == view["nodes"][ids.index(logit["id"])]["split"]["values"]  # shown as embedded
    assert one(tab, "g-split-whole") == float(g.input[index[TARGETS[1]]])  # the graph's readout of the logit,
    assert abs(one(tab, "g-split-whole") - res.whole[1]) <= 1e-13 * np.abs(res.whole).max()  # = the recorded logit
    tab.shot("graph-3-logit")

    # following an incoming edge to a shown source opens that node's panel
    target = tab.page.eval_on_selector("[data-role=graph-panel] a[data-goto]", "e => +e.dataset.goto")
    tab.page.click("[data-role=graph-panel] a[data-goto]")
    assert tab.page.get_attribute("[data-role=graph-panel]", "data-node") == str(target)
    tab.close()  # no console error or warning, no request but the file itself
    assert ARTIFACTS.is_dir()


def test_a_gemma4_graph_in_chromium(browser, checkpoint, tmp_path):  # noqa: F811
    """Gemma 4's node kinds on the page: drawn in their own colours, an expert neuron's panel (its exact incoming
    edges and split), a PLE neuron's (two incoming edges, no split); no console error."""
    model = refprism.load(checkpoint("tiny-gemma4", intermediate_size=16, moe_intermediate_size=8), dtype="float64")
    prompt = "The capital"
    run = model.run(prompt)
    g = graph(model, prompt, max_nodes=300)
    view = graph_view(g, max_nodes=80, max_edges=120, top=5)
    top = [f"#{int(np.argmax(run.record['logits'][-1]))}"]
    page_file = report.write_report(tmp_path / "g4.html", model, run, top, depth=0, graph=view)
    tab = Tab(browser, page_file.as_uri())
    index = {g.label(i): i for i in range(g.n)}
    ids = tab.page.eval_on_selector_all("[data-section=graph] circle", "els => els.map(e => e.dataset.id)")
    assert ids == [n["id"] for n in view["nodes"]]
    fills = dict(tab.page.eval_on_selector_all("[data-section=graph] circle",
                                               "els => els.map(e => [e.dataset.kind, e.getAttribute('fill')])"))
    assert fills["expert"] != fills["neuron"] and fills["ple"] != fills["neuron"]
    scale = np.nanmax(np.abs(g.input))
    for kind in ("expert", "ple"):
        node = max((n for n in view["nodes"] if n["kind"] == kind), key=lambda n: n["influence"])
        i = index[node["label"]]
        tab.page.click(f"circle[data-id='{node['id']}']")
        assert tab.page.get_attribute("[data-role=graph-panel]", "data-id") == node["id"]
        assert one(tab, "g-input") == float(g.input[i])
        assert abs(one(tab, "g-in-sum") - g.input[i]) <= 1e-10 * scale
        src, val = g.incoming(i)
        assert [(index[label], v) for label, v in panel_cells(tab, "g-in")] == _top(val, src, 5)
        if kind == "expert":
            assert abs(one(tab, "g-split-sum") - g.input[i]) <= 1e-10 * scale
        else:
            assert len(val) == 2 and not panel_cells(tab, "g-split")
    tab.shot("graph-gemma4")
    tab.close()  # no console error or warning
