"""refprism.graphs on Gemma 4 (tiny-gemma4: PLE, KV sharing across both layer types, double-wide MLP, k_eq_v, MoE,
random layer_scalar, router and per-expert scales): the new node kinds (graphs.gemma4), exact rows, every kind of
edge against a forward with the factors held, the JSON ids, faithfulness, the refusals.

- Edges: circuit-tracer's check as tests/test_graphs.py runs it for Gemma 1-3. A forward edit holds every norm
  scale (the v_norm, router and PLE projection norms' included), every attention pattern, the router's top-k
  choices and weights, and every neuron's activation (mlp.act, moe.act, ple.act) at the clean run's values; one
  source's activation is doubled (a PLE token node: its ple.token[t, l] doubled; an embedding: embed[t]). The change
  of every target's input (mlp.up, moe.up at its slot, ple.input, the demeaned pre-cap logit) is that source's
  column. float64: 1e-10 of the largest input, as for Gemma 1-3.
- Row sums: every node's incoming edges sum to its input within 1e-10 of the largest input.
"""

import json

import jsonschema
import numpy as np
import pytest
from test_gradients_gemma4 import _routing_margin
from test_graphs_output import SCHEMA

import refprism
from refprism.graphs import Pruned, edge_heads, faithfulness, graph, graph_json, node_split
from refprism.graphs import gemma4 as G4


@pytest.fixture(scope="module")
def model(checkpoint):
    """tiny-gemma4 with narrower MLPs and experts (every feature still on), so that a whole graph is ~2,000 nodes."""
    return refprism.load(checkpoint("tiny-gemma4", intermediate_size=16, moe_intermediate_size=8), dtype="float64")


def _prompt(model, T=6):
    """A prompt whose routing is 0.004 away from every tie (test_gradients_gemma4's margin): the edits below hold
    the routing, the faithfulness re-runs do not."""
    for seed in range(400):
        ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, T)
        if _routing_margin(model, model.run(ids)) > 0.004:
            return ids
    raise AssertionError("no prompt with routing away from ties")


@pytest.fixture(scope="module")
def full(model):
    """Every node explored."""
    return graph(model, _prompt(model), max_nodes=10 ** 6)


@pytest.fixture(scope="module")
def partial(model):
    """300 nodes explored in influence order: remainder nodes."""
    return graph(model, _prompt(model), max_nodes=300, batch_size=64, update_interval=2)


def _column(g, j):
    col = np.zeros(g.n)
    m = g.cols == j
    col[g.rows[m]] = g.values[m]
    return col


def _slot(rec, l, t, e):
    return int(np.flatnonzero(rec[f"blocks.{l}.moe.topk.index"][t] == e)[0])


def _inputs_with_source_doubled(g, j):
    """Each target's input in a forward with every factor and every neuron held at the clean run's value and
    source j doubled (forward edits and the run's record only: none of graphs' code)."""
    model, run = g.model, g.run
    cfg, rec = model.config, run.record
    kind, l, t, n = g.kind[j], int(g.layer[j]), int(g.position[j]), int(g.index[j])
    held = ("attn.pattern", "mlp.act", "moe.act", "ple.act", "moe.topk.index", "moe.topk.weight")
    here = (g.layer == l) & (g.position == t)
    rest = {}  # a remainder: every neuron of (l, t) that is no node, by site
    if kind == "remainder":
        rest["mlp.act"] = np.setdiff1d(np.arange(cfg.mlp_width_of(l)), g.index[here & (g.kind == "neuron")])
        rest["ple.act"] = np.setdiff1d(np.arange(cfg.d_ple), g.index[here & (g.kind == "ple")])
        slots = [(_slot(rec, l, t, e), i) for e, i in (divmod(int(x), cfg.d_expert)
                                                       for x in g.index[here & (g.kind == "expert")])]
        moe = np.ones((cfg.top_k, cfg.d_expert), bool)
        for j, i in slots:
            moe[j, i] = False
        rest["moe.act"] = moe

    def edit(name, value, record):
        site = name.split(".", 2)[-1]
        if name.endswith("scale") or site in held:
            out = rec[name].copy()
            if kind == "remainder" and name == f"blocks.{l}.{site}" and site in rest:
                out[t, rest[site]] *= 2
            elif name == f"blocks.{l}.mlp.act" and kind == "neuron":
                out[t, n] *= 2
            elif name == f"blocks.{l}.moe.act" and kind == "expert":
                e, i = divmod(n, cfg.d_expert)
                out[t, _slot(rec, l, t, e), i] *= 2
            elif name == f"blocks.{l}.ple.act" and kind == "ple":
                out[t, n] *= 2
            return out
        if (name == "embed" and kind == "embed") or (name == "ple.token" and kind == "ple_token"):
            out = value.copy()
            if kind == "embed":
                out[t] *= 2
            else:
                out[t, l] *= 2
            return out
        return value

    edited = model.run(run.tokens, edit=edit).record
    change = np.zeros(g.n)
    for i in np.flatnonzero(np.isin(g.kind, ("neuron", "expert", "ple"))):
        li, ti, ni = int(g.layer[i]), int(g.position[i]), int(g.index[i])
        if g.kind[i] == "neuron":
            where = (f"blocks.{li}.mlp.up", (ti, ni))
        elif g.kind[i] == "expert":
            e, k = divmod(ni, cfg.d_expert)
            where = (f"blocks.{li}.moe.up", (ti, _slot(rec, li, ti, e), k))
        else:
            where = ("ple.input", (ti, li, ni))
        change[i] = edited[where[0]][where[1]] - rec[where[0]][where[1]]
    logits = np.flatnonzero(g.kind == "logit")
    new, old = edited["logits_uncapped"][g.read_at], rec["logits_uncapped"][g.read_at]
    change[logits] = (new[g.index[logits]] - new.mean()) - (old[g.index[logits]] - old.mean())
    return change


def test_the_nodes_are_gemma4s_components(model, full):
    cfg, g, rec = model.config, full, full.run.record
    T = g.read_at + 1
    count = {k: int((g.kind == k).sum()) for k in ("neuron", "expert", "ple", "ple_token", "remainder")}
    widths = sum(cfg.mlp_width_of(l) for l in range(cfg.n_layers))
    assert count == {"neuron": widths * T, "expert": cfg.n_layers * T * cfg.top_k * cfg.d_expert,
                     "ple": cfg.n_layers * T * cfg.d_ple, "ple_token": cfg.n_layers * T, "remainder": 0}
    wide = (g.kind == "neuron") & (g.index >= cfg.d_mlp)  # the double-wide layers' second half
    assert set(g.layer[wide]) == {l for l in range(cfg.n_layers) if cfg.mlp_width_of(l) == 2 * cfg.d_mlp}
    # values and inputs are the run's recorded sites
    for i in np.flatnonzero(g.kind == "expert")[::97]:
        l, t, (e, k) = int(g.layer[i]), int(g.position[i]), divmod(int(g.index[i]), cfg.d_expert)
        j = _slot(rec, l, t, e)
        assert g.activation[i] == rec[f"blocks.{l}.moe.act"][t, j, k]
        assert g.input[i] == rec[f"blocks.{l}.moe.up"][t, j, k]
        assert g.label(i) == f"L{l}E{e}N{k}@{t}"
    for i in np.flatnonzero(g.kind == "ple")[::41]:
        l, t, q = int(g.layer[i]), int(g.position[i]), int(g.index[i])
        assert g.activation[i] == rec[f"blocks.{l}.ple.act"][t, q] and g.input[i] == rec["ple.input"][t, l, q]
    # circuit-tracer's groups: features, errors, tokens (PLE tokens with the embeddings), logits, in that order
    n_feat, n_err, n_tok, n_log = g.counts
    assert n_feat == count["neuron"] + count["expert"] + count["ple"]
    assert (n_err, n_log) == (0, int((g.kind == "logit").sum()))
    assert set(g.kind[n_feat: n_feat + n_tok]) == {"ple_token", "embed"} and g.scores() == (1.0, 1.0)


def test_row_sums_are_exact_at_every_node(model, full, partial):
    for g in (full, partial):
        targets = np.flatnonzero(~np.isnan(g.input))
        err = np.abs(g.row_sums()[targets] - g.input[targets]).max()
        assert err <= 1e-10 * np.abs(g.input[targets]).max(), err
        raw = g.run.record["logits_uncapped"][g.read_at]
        logits = g.kind == "logit"
        np.testing.assert_allclose(g.input[logits], raw[g.index[logits]] - raw.mean(), rtol=1e-12)
        assert not np.isin(np.flatnonzero(np.isnan(g.input)), g.rows).any()  # sources take no edges
        for i in np.flatnonzero(g.kind == "ple")[:20]:  # a PLE neuron's row: its embedding and its PLE token
            src, val = g.incoming(i)
            assert sorted(g.kind[src]) == ["embed", "ple_token"], g.label(i)
            assert set(g.position[src]) == {g.position[i]}
        if g is not full:
            assert g.explored == 300 and g.counts[1] > 0


@pytest.mark.parametrize("overrides", [{"enable_moe_block": False}, {"hidden_size_per_layer_input": 0}],
                         ids=["no-moe (E2B-like)", "no-ple (26B-A4B-like)"])
def test_row_sums_are_exact_without_experts_or_per_layer_inputs(checkpoint, overrides):
    model = refprism.load(checkpoint("tiny-gemma4", intermediate_size=16, moe_intermediate_size=8, **overrides),
                          dtype="float64")
    cfg = model.config
    g = graph(model, np.random.default_rng(2).integers(0, cfg.vocab_size, 4), max_nodes=10 ** 6)
    targets = np.flatnonzero(~np.isnan(g.input))
    assert np.abs(g.row_sums()[targets] - g.input[targets]).max() <= 1e-10 * np.abs(g.input[targets]).max()
    kinds = set(g.kind)
    assert ("expert" in kinds) == cfg.moe and ("ple" in kinds) == ("ple_token" in kinds) == cfg.ple
    col = _column(g, int(np.flatnonzero(g.kind == "neuron")[7]))
    assert np.abs(col - _inputs_with_source_doubled(g, int(np.flatnonzero(g.kind == "neuron")[7]))).max() <= \
        1e-10 * np.nanmax(np.abs(g.input))
    pr = g.pruned()
    everything = Pruned(np.ones(g.n, bool), np.ones(len(g.values), bool), pr.cumulative, pr.influence)
    assert faithfulness(g, pruned=everything)["recovered"] == pytest.approx(1.0, abs=1e-12)
    assert 0 < faithfulness(g)["kept_neurons"] < g.n_neurons


def test_every_new_kind_of_edge_equals_a_frozen_forward_with_the_source_added(model, full):
    g, cfg = full, model.config
    rng = np.random.default_rng(3)
    L = cfg.n_layers
    consumer = min(l for l in range(L) if not cfg.has_kv(l))

    def pick(mask, k):
        return list(rng.choice(np.flatnonzero(mask), k, replace=False))

    below = g.layer < L - 1
    sources = (pick((g.kind == "expert") & below, 2) + pick((g.kind == "ple") & below, 2)
               + pick(g.kind == "ple_token", 2) + pick((g.kind == "neuron") & (g.index >= cfg.d_mlp) & below, 1)
               + pick((g.kind == "neuron") & (g.layer < cfg.kv_source(consumer)), 1) + pick(g.kind == "embed", 1))
    scale = np.nanmax(np.abs(g.input))
    reached_consumers = False
    for j in sources:
        col, change = _column(g, j), _inputs_with_source_doubled(g, j)
        err = np.abs(col - change).max()
        assert err <= 1e-10 * scale, f"source {g.label(j)}: max |edge - change| {err:.2e}"
        assert np.abs(col).max() > 1e-6, g.label(j)  # the source reaches something
        if g.layer[j] < cfg.kv_source(consumer) and g.kind[j] != "ple_token":
            reached_consumers |= bool(np.abs(col[(g.layer >= consumer) & (g.kind != "logit")]).max() > 1e-6)
    assert reached_consumers  # a consumer layer's inputs, read through its producer's values


def test_remainder_edges_equal_a_forward_with_every_unexplored_slot_doubled(model, partial):
    """A remainder of (l, t) stands for its unexplored dense, expert and PLE neurons together."""
    g = partial
    scale = np.nanmax(np.abs(g.input))
    rem = np.flatnonzero(g.kind == "remainder")
    assert len(rem) > 10
    reaching = 0
    for j in rem[:: max(1, len(rem) // 6)]:
        col = _column(g, j)
        err = np.abs(col - _inputs_with_source_doubled(g, j)).max()
        assert err <= 1e-10 * scale, (g.label(j), err)
        reaching += np.abs(col).max() > 1e-6  # (position 0 may lie outside every later sliding window)
    assert reaching >= 3


def test_json_ids_do_not_collide_and_name_the_new_kinds(model, partial):
    g = partial
    doc = json.loads(json.dumps(graph_json(g, slug="g4", node_threshold=0.9, edge_threshold=0.99)))
    jsonschema.validate(doc, SCHEMA)
    cfg = model.config
    everything = [G4.feature_id(cfg, int(g.layer[i]), str(g.kind[i]), int(g.index[i]))
                  if g.kind[i] in G4.NEW_KINDS else None for i in range(g.n)]
    from refprism.graphs.export import _node_id

    ids = [_node_id(g, i, cfg.n_layers) for i in range(g.n)]
    assert len(set(ids)) == g.n  # every node its own id
    for i in range(g.n):
        k, l = g.kind[i], int(g.layer[i])
        F = cfg.mlp_width_of(l) if 0 <= l < cfg.n_layers else 0
        if k == "expert":
            assert F <= everything[i] < F + cfg.n_experts * cfg.d_expert
        elif k == "ple":
            assert F + cfg.n_experts * cfg.d_expert <= everything[i] < F + cfg.n_experts * cfg.d_expert + cfg.d_ple
        elif k == "ple_token":
            assert ids[i] == f"{l}_-5_{g.position[i]}"
    types = {n["feature_type"] for n in doc["nodes"]}
    assert {"mlp expert neuron", "per-layer input neuron", "embedding", "logit"} <= types
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    index = {x: i for i, x in enumerate(ids)}
    for link in doc["links"][:: max(1, len(doc["links"]) // 40)]:
        assert link["source"] in by_id and link["target"] in by_id
        m = (g.rows == index[link["target"]]) & (g.cols == index[link["source"]])
        assert link["weight"] == g.values[m][0]
    assert doc["metadata"]["info"]["max_row_sum_error"] <= 1e-10 * np.nanmax(np.abs(g.input))
    assert "the router's top-k choices and weights" in doc["metadata"]["info"]["frozen"]


def _readout_with_kept(g, keep, ablation):
    """The logit nodes' demeaned pre-cap readouts with every neuron outside keep set to 0 or its mean (mlp.act,
    ple.act by position; moe.act by the expert this run's router picked), an edit written here."""
    model, rec0 = g.model, g.run.record
    T = g.read_at + 1

    def fill(name, shape):
        return np.zeros(shape) if ablation == "zero" else np.broadcast_to(rec0[name][1:].mean(axis=0), shape)

    def edit(name, value, record):
        parts = name.split(".")
        if name.endswith((".mlp.act", ".ple.act")):
            l, kind = int(parts[1]), "neuron" if parts[2] == "mlp" else "ple"
            out = value.copy()
            out[:T] = np.where(keep[kind][l, :, : value.shape[1]], value[:T], fill(name, (T, value.shape[1])))
            return out
        if name.endswith(".moe.act"):
            l = int(parts[1])
            out = value.copy()
            top = record[f"blocks.{l}.moe.topk.index"]
            for t in range(T):
                for j, e in enumerate(top[t]):
                    if ablation == "zero":
                        f = 0.0
                    else:
                        tt, jj = np.nonzero(rec0[f"blocks.{l}.moe.topk.index"][1:] == e)
                        f = rec0[f"blocks.{l}.moe.act"][1:][tt, jj].mean(axis=0) if len(tt) else 0.0
                    out[t, j] = np.where(keep["expert"][l, t, e], value[t, j], f)
            return out
        return value

    raw = model.run(g.run.tokens, edit=edit).record["logits_uncapped"][g.read_at]
    logits = g.kind == "logit"
    return raw[g.index[logits]] - raw.mean()


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_faithfulness_equals_a_forward_with_the_other_neurons_ablated(model, partial, ablation):
    g = partial
    pr = g.pruned()
    f = faithfulness(g, pruned=pr, ablation=ablation)
    keep = G4.kept_nodes(g, pr)
    assert keep["expert"].any() and keep["neuron"].any()
    none = {k: np.zeros_like(v) for k, v in keep.items()}
    np.testing.assert_allclose(f["kept"], _readout_with_kept(g, keep, ablation), rtol=1e-10)
    np.testing.assert_allclose(f["none"], _readout_with_kept(g, none, ablation), rtol=1e-10)
    raw = g.run.record["logits_uncapped"][g.read_at]
    np.testing.assert_allclose(f["clean"], raw[g.index[g.kind == "logit"]] - raw.mean(), rtol=1e-12)
    assert 0 < f["kept_neurons"] < g.n_neurons and f["ablated_neurons"] == g.n_neurons - f["kept_neurons"]
    assert set(f["rerouted"]) == {"kept", "none"}
    everything = Pruned(np.ones(g.n, bool), np.ones(len(g.values), bool), pr.cumulative, pr.influence)
    assert faithfulness(g, pruned=everything, ablation=ablation)["recovered"] == pytest.approx(1.0, abs=1e-12)


def test_edge_heads_sum_to_the_edge_through_consumers_experts_and_ple(model, full):
    """skip + sum_h heads = the edge for each new kind of source, at every layer between its ends, consumer layers
    (whose heads read their producer's values) included; the per-source terms sum to the heads."""
    g, cfg = full, model.config
    L = cfg.n_layers
    consumers = [l for l in range(L) if not cfg.has_kv(l)]
    logit = int(np.flatnonzero(g.kind == "logit")[0])
    pos = g.read_at - 1
    picks = [(logit, int(np.flatnonzero((g.kind == k) & (g.layer == 0) & (g.position == pos))[3]))
             for k in ("neuron", "expert", "ple")] + [(logit, int(np.flatnonzero(g.kind == "embed")[pos]))]
    expert_target = int(np.flatnonzero((g.kind == "expert") & (g.layer == consumers[0]) & (g.position == g.read_at))[0])
    picks.append((expert_target, picks[0][1]))
    through_consumer = 0
    for target, src in picks:
        edge = _column(g, src)[target]
        top = min(int(g.layer[target]), L - 1)
        for m in range(int(g.layer[src]) + 1, top + 1):
            skip, heads = edge_heads(g, target, src, m)
            assert abs(skip + heads.sum() - edge) <= 1e-10 * max(1.0, abs(edge)), (g.label(target), g.label(src), m)
            _, terms = edge_heads(g, target, src, m, by_source=True)
            np.testing.assert_allclose(terms.sum(axis=1), heads, rtol=0, atol=1e-12 * max(1.0, abs(edge)))
            through_consumer += m in consumers and np.abs(heads).max() > 1e-6
    assert through_consumer >= 3
    with pytest.raises(refprism.InputError, match="no path"):
        edge_heads(g, logit, picks[0][1], 0)
    ple_target = int(np.flatnonzero(g.kind == "ple")[0])
    with pytest.raises(refprism.InputError, match="PLE neuron's input reads no head"):
        edge_heads(g, ple_target, picks[3][1], 1)


def test_transcoders_refuse_gemma4_in_one_line(checkpoint):
    model = refprism.load(checkpoint("tiny-gemma4"), defer=True)
    with pytest.raises(refprism.InputError, match="^transcoder graphs do not take Gemma 4") as e:
        graph(model, "abc", transcoders="none.safetensors")
    assert "\n" not in str(e.value) and model.deferred is not None


def test_view_splits_of_dense_and_expert_neurons_sum_to_their_inputs(model, partial):
    """graphs.node_split on Gemma 4: a dense or expert neuron's input split by the residual parts at resid_mid (the
    prisms' Gemma 4 parts, layer_scalars folded); a PLE neuron and a PLE token node have none."""
    g = partial
    scale = np.nanmax(np.abs(g.input))
    seen = set()
    for kind in ("neuron", "expert", "ple", "ple_token"):
        for i in np.flatnonzero(g.kind == kind)[:6]:
            sp = node_split(g, int(i))
            if kind in ("ple", "ple_token"):
                assert sp is None
                continue
            assert abs(float(sp.values.sum()) - g.input[i]) <= 1e-10 * scale and sp.exact, g.label(i)
            assert np.abs(sp.values).max() > 0
            seen.add(kind)
    assert seen == {"neuron", "expert"}


def test_a_float32_graph_keeps_float32_edges_and_exact_row_sums(checkpoint):
    """A float32 model's graph stores its edges in float32, the PLE token edges too (a float64 term among them
    would promote every edge), and its rows still sum to their inputs to float32 rounding."""
    model = refprism.load(checkpoint("tiny-gemma4", intermediate_size=16, moe_intermediate_size=8))
    g = graph(model, _prompt(model), max_nodes=200, batch_size=64)
    assert g.values.dtype == np.float32 and (g.kind == "ple_token").any()
    targets = np.flatnonzero(~np.isnan(g.input))
    err = np.abs(g.row_sums()[targets] - g.input[targets]).max()
    assert err <= 1e-5 * np.abs(g.input[targets]).max(), err


def test_two_threads_give_the_same_graph_bit_for_bit(model, partial):
    """threads=2 (experts, PLE neurons and their PLE-only passes among the rows): the same graph to the bit."""
    two = graph(model, _prompt(model), max_nodes=300, batch_size=64, update_interval=2, threads=2)
    assert partial.passes > 10 and two.passes == partial.passes
    for key in ("kind", "layer", "index", "position", "activation", "input", "rows", "cols", "values"):
        np.testing.assert_array_equal(getattr(two, key), getattr(partial, key), err_msg=key)
