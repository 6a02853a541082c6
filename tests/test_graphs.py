"""refprism.graphs: every edge against a forward with the factors held, exact row sums, pruning against a dense
reference, the JSON.

- Edges: circuit-tracer's own check. A forward edit holds every norm scale, attention pattern and MLP activation
  at the clean run's values; one source's activation is doubled there (= its output vector added once at its site);
  the change of every target's input (up[t, n] of each neuron, the demeaned pre-cap logit of each logit node) is
  that source's column of A. float64: a difference of two O(10) runs is exact to ~1e-14; 1e-10 of the largest
  input leaves room for BLAS order, and a wrong edge is O(edge) off.
- Row sums: every node's incoming edges sum to its input within 1e-10 of the largest input (float64).
"""

import numpy as np
import pytest

import refprism
from refprism import prisms as P
from refprism.graphs import edge_heads, graph

PRESETS = ["tiny", "tiny-gemma2", "tiny-gemma3"]


@pytest.fixture(scope="module")
def models(checkpoint):
    return {p: refprism.load(checkpoint(p), dtype="float64") for p in PRESETS}


def _ids(model, T=8, seed=4):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, T)


def _column(g, j):
    col = np.zeros(g.n)
    m = g.cols == j
    col[g.rows[m]] = g.values[m]
    return col


def _inputs_with_source_doubled(g, j):
    """Each target's input in a forward with every factor and every MLP activation held at the clean run's value
    and source j's activation doubled (independent of the graph's code: forward edits and the run's record)."""
    model, run = g.model, g.run
    cfg, rec = model.config, run.record
    kind, l, t, n = g.kind[j], int(g.layer[j]), int(g.position[j]), int(g.index[j])
    explored_here = g.index[(g.kind == "neuron") & (g.layer == l) & (g.position == t)]

    def edit(name, value, record):
        site = name.split(".", 2)[-1]
        if name.endswith("scale") or site == "attn.pattern":
            return rec[name].copy()
        if site == "mlp.act":
            out = rec[name].copy()
            if name == f"blocks.{l}.mlp.act" and kind == "neuron":
                out[t, n] *= 2
            if name == f"blocks.{l}.mlp.act" and kind == "remainder":
                rest = np.ones(out.shape[1], bool)
                rest[explored_here] = False
                out[t, rest] *= 2
            return out
        if name == "embed" and kind == "embed":
            out = value.copy()
            out[t] *= 2
            return out
        return value

    edited = model.run(run.tokens, edit=edit).record
    raw = "logits_uncapped" if cfg.final_softcap is not None else "logits"
    change = np.zeros(g.n)
    for i in np.flatnonzero(g.kind == "neuron"):
        b = f"blocks.{g.layer[i]}.mlp.up"
        change[i] = edited[b][g.position[i], g.index[i]] - rec[b][g.position[i], g.index[i]]
    p = g.read_at
    logits = np.flatnonzero(g.kind == "logit")
    new, old = edited[raw][p], rec[raw][p]
    if g.readout == "demeaned":
        change[logits] = (new[g.index[logits]] - new.mean()) - (old[g.index[logits]] - old.mean())
    return change


@pytest.mark.parametrize("preset", PRESETS)
def test_every_edge_equals_a_frozen_forward_with_the_source_added(models, preset):
    model = models[preset]
    g = graph(model, _ids(model))
    assert g.counts[1] == 0 and g.explored == g.n_neurons  # everything explored: no remainder nodes
    rng = np.random.default_rng(1)
    neurons = np.flatnonzero((g.kind == "neuron") & (g.layer < model.config.n_layers - 1))
    sources = list(rng.choice(neurons, 5, replace=False)) + list(rng.choice(np.flatnonzero(g.kind == "embed"), 2,
                                                                           replace=False))
    scale = np.nanmax(np.abs(g.input))
    for j in sources:
        col, change = _column(g, j), _inputs_with_source_doubled(g, j)
        err = np.abs(col - change).max()
        assert err <= 1e-10 * scale, f"{preset} source {g.label(j)}: max |edge - change| {err:.2e}"
        assert np.abs(col).max() > 1e-3  # the source reaches something


@pytest.mark.parametrize("preset", PRESETS)
def test_row_sums_are_exact_at_every_node(models, preset):
    model = models[preset]
    for kw in ({}, {"max_nodes": 200, "batch_size": 32, "update_interval": 2}):
        g = graph(model, _ids(model, 9, 7), **kw)
        targets = np.flatnonzero(~np.isnan(g.input))
        err = np.abs(g.row_sums()[targets] - g.input[targets]).max()
        assert err <= 1e-10 * np.abs(g.input[targets]).max(), (kw, err)
        raw = g.run.record["logits_uncapped" if model.config.final_softcap else "logits"][g.read_at]
        logits = g.kind == "logit"
        np.testing.assert_allclose(g.input[logits], raw[g.index[logits]] - raw.mean(), rtol=1e-12)
        sources = ~np.isnan(g.input)
        assert not np.isin(np.flatnonzero(~sources), g.rows).any()  # embeddings and remainders take no edges
        if kw:
            assert g.explored == 200 and g.counts[1] > 0


def test_remainder_edges_equal_a_forward_with_the_unexplored_neurons_doubled(models):
    model = models["tiny-gemma2"]
    g = graph(model, _ids(model), max_nodes=150, batch_size=40, update_interval=1)
    scale = np.nanmax(np.abs(g.input))
    rem = np.flatnonzero(g.kind == "remainder")
    for j in rem[:: max(1, len(rem) // 4)]:
        err = np.abs(_column(g, j) - _inputs_with_source_doubled(g, j)).max()
        assert err <= 1e-10 * scale, (g.label(j), err)


def test_exploration_follows_influence(models):
    """The first explored batch after the logit rows is the top of the logits' influence (|A| row-normalised)."""
    model = models["tiny"]
    ids = _ids(model)
    full = graph(model, ids)
    q = 64
    g = graph(model, ids, max_nodes=q, batch_size=q, update_interval=1, explore_k=10 ** 6)
    logits = np.flatnonzero(full.kind == "logit")
    m = np.isin(full.rows, logits)
    a = np.abs(full.values[m])
    norm = a / np.bincount(full.rows[m], weights=a, minlength=full.n)[full.rows[m]]
    infl = np.bincount(full.cols[m], weights=norm * full.weights[full.rows[m]], minlength=full.n)
    neurons = np.flatnonzero(full.kind == "neuron")
    top = neurons[np.argsort(-infl[neurons])[:q]]
    want = {(full.layer[i], full.position[i], full.index[i]) for i in top}
    got = {(g.layer[i], g.position[i], g.index[i]) for i in np.flatnonzero(g.kind == "neuron")}
    assert got == want


@pytest.mark.parametrize("preset", PRESETS)
def test_edge_heads_sum_to_the_edge(models, preset):
    model = models[preset]
    cfg = model.config
    g = graph(model, _ids(model))
    logit = int(np.flatnonzero(g.kind == "logit")[0])
    src = int(np.flatnonzero((g.kind == "neuron") & (g.layer == 0) & (g.position == 3))[5])
    edge = _column(g, src)[logit]
    for m in range(1, cfg.n_layers):
        skip, heads = edge_heads(g, logit, src, m)
        assert abs(skip + heads.sum() - edge) <= 1e-10 * max(1.0, abs(edge)), m
        skip2, terms = edge_heads(g, logit, src, m, by_source=True)
        np.testing.assert_allclose(terms.sum(axis=1), heads, rtol=0, atol=1e-12 * max(1.0, abs(edge)))
        assert terms.shape == (cfg.n_heads, g.read_at + 1) and np.abs(heads).max() > 1e-6
    with pytest.raises(refprism.InputError, match="no path"):
        edge_heads(g, logit, src, 0)


def test_targets_and_versus(models):
    model = models["tiny-gemma3"]
    ids = _ids(model)
    g = graph(model, ids, targets=["#5", "#11"], versus=["#3"], max_nodes=300)
    readout = P.logits_readout(model, g.run, ["#5", "#11"], versus=["#3"])
    logits = g.kind == "logit"
    np.testing.assert_allclose(g.input[logits], readout.whole, rtol=1e-12)
    np.testing.assert_allclose(g.row_sums()[logits], readout.whole, rtol=1e-10)
    np.testing.assert_allclose(g.logit_weights, [0.5, 0.5])
    assert g.logit_labels == readout.targets.labels


def test_bad_arguments(models):
    model = models["tiny"]
    with pytest.raises(refprism.InputError, match="versus needs targets"):
        graph(model, _ids(model), versus=["#3"])
    with pytest.raises(refprism.InputError, match="max_nodes"):
        graph(model, _ids(model), batch_size=0)
    for bad in (0, 1.5, True):
        with pytest.raises(refprism.InputError, match="threads"):
            graph(model, _ids(model), threads=bad)
    run = model.run(_ids(model), record=["embed"])
    with pytest.raises(refprism.InputError, match="full record"):
        graph(model, run)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_tiny_byte_budget_gives_the_same_graph_edge_for_edge(models, preset, monkeypatch):
    """ROWS_BYTES = 1: one row per backward pass, each truncated to its row's position, against every row of a
    layer in one pass: the same explored neurons and the same entries (BLAS order aside)."""
    from refprism.graphs import build

    model = models[preset]
    ids = _ids(model, 9, 5)
    kw = {"max_nodes": 120, "batch_size": 512, "update_interval": 1}
    one = graph(model, ids, **kw)
    monkeypatch.setattr(build, "ROWS_BYTES", 1)
    many = graph(model, ids, **kw)
    assert many.batch_rows == 1 and one.batch_rows > 1
    assert many.passes == 2 * len(one.logit_weights) + 120 + int(((one.kind == "neuron") & (one.layer > 0)).sum())
    assert many.passes > 10 * one.passes
    for key in ("kind", "layer", "index", "position", "rows", "cols"):
        np.testing.assert_array_equal(getattr(many, key), getattr(one, key), err_msg=key)
    np.testing.assert_allclose(many.values, one.values, rtol=0, atol=1e-12 * np.abs(one.values).max())
    assert many.rows.dtype == np.int32 and many.cols.dtype == np.int32
    assert (np.diff(many.rows) >= 0).all()  # sorted by (row, col)
    r, c = many.rows.astype(np.int64), many.cols.astype(np.int64)
    assert (np.diff(r * many.n + c) > 0).all()


def _same_bits(a, b):
    for key in ("kind", "layer", "index", "position", "activation", "input", "rows", "cols", "values"):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)  # bit for bit (nan where both are nan)
    assert (a.passes, a.batch_rows) == (b.passes, b.batch_rows)


@pytest.mark.parametrize("preset", PRESETS)
def test_two_threads_give_the_same_graph_bit_for_bit(models, preset):
    """threads=2 runs the passes of an exploration step and the exact rows two at a time: the same nodes, the
    same entries in the same order, the same values to the bit (each pass's values depend on its rows alone)."""
    model = models[preset]
    kw = {"max_nodes": 60, "batch_size": 4, "update_interval": 2}
    one = graph(model, _ids(model, 9, 5), **kw)
    two = graph(model, _ids(model, 9, 5), threads=2, **kw)
    assert one.passes > 20
    _same_bits(one, two)


def test_a_long_prompt_reads_each_recipe_once_with_the_same_bits(checkpoint, monkeypatch):
    """T = 300 (>= record.LONG_PROMPT, with no byte budget: most of each layer's record is recipes, as in a long
    prompt of a real model): the graph's passes read the record through gradients.backward._Held (each site
    resolved once) and give the same graph, bit for bit, as passes that recompute each layer whole from its
    resid_pre (_Layers.layer), with one thread or two; float32."""
    from refprism.gemma import record
    from refprism.gemma.record import LONG_PROMPT, Lazy
    from refprism.graphs import build

    monkeypatch.setattr(record, "LAZY_BUDGET", 0)  # the tiny model's record is far under the budget

    model = refprism.load(checkpoint("tiny-gemma3", max_position_embeddings=512))
    ids = _ids(model, 300, 7)
    run = model.run(ids)
    assert len(ids) >= LONG_PROMPT and isinstance(dict.__getitem__(run.record, "blocks.1.attn.o_proj"), Lazy)
    kw = {"max_nodes": 40, "batch_size": 8, "update_interval": 2}
    held = graph(model, run, **kw)
    two = graph(model, run, threads=2, **kw)
    source = build._layer_source
    monkeypatch.setattr(build, "_layer_source", lambda model, run, p, held=False: source(model, run, p))
    whole = graph(model, run, **kw)
    assert held.values.dtype == np.float32 and held.passes > 8
    _same_bits(held, whole)
    _same_bits(held, two)


@pytest.mark.parametrize("k, widths", [(50, [40, 30, 200, 7, 500]), (16, [300, 300, 300]), (1000, [20, 30])])
def test_the_exploration_keeps_each_rows_largest_edges_over_all_layers(k, widths):
    """build._largest, layer by layer (a partition, then only the values >= each row's smallest kept), keeps the
    same (column, value) entries per row as one partition over every layer's values (continuous: no ties)."""
    from refprism.graphs.build import _largest

    rng = np.random.default_rng(len(widths))
    Z = 5
    layers = [np.abs(rng.standard_normal((Z, n)) * rng.lognormal(0, 2, n)).astype(np.float32) for n in widths]
    layers[-1][1] = 0.0  # a row with nothing to add at the last layer
    c = v = None
    for m, e in enumerate(layers):
        c, v = _largest(c, v, e.copy(), 1000 * m, k)
    every_c = np.concatenate([1000 * m + np.arange(e.shape[1]) for m, e in enumerate(layers)])
    every_v = np.concatenate(layers, axis=1)
    assert c.shape == (Z, min(k, len(every_c)))
    for z in range(Z):
        top = np.argsort(-every_v[z], kind="stable")[: c.shape[1]]
        np.testing.assert_array_equal(np.sort(c[z]), np.sort(every_c[top]))
        np.testing.assert_array_equal(v[z][np.argsort(c[z])], every_v[z][top][np.argsort(every_c[top])])
