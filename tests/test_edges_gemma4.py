"""Edge attribution on Gemma 4 (tiny-gemma4: KV-sharing consumers, k_eq_v, partial RoPE, per-layer head widths
and kv-head counts, layer_scalar, per-layer inputs, MoE, double-wide MLPs), float64, as tests/test_edges.py checks
Gemma 1-3:
- edge_count equals a brute enumeration (a consumer's k, v edges start before its producer; ple nodes included);
- EAP summed over a node's out-edges is its node-level AtP (1e-10 relative): embed (its per-layer-input path
  included), a producer head, a consumer head, a MoE layer's MLP, a ple node, noising and denoising;
- the edges into the logits are AtP with every later layer dropped;
- EAP is the first-order term of the exact edge patch (|eap - patch| / |patch| ~ eps, 10x smaller for a 10x
  smaller step) on consumer k and v edges, q, the MoE MLP, ple, embed -> ple and the logits;
- a consumer's k edge patched equals a brute forward where only that head sees keys from the patched copy of the
  producer's residual;
- EAP-IG converges as 1/k^2 (on the model without MoE); neurons:L on a double-wide layer (a model without MoE)
  and on a MoE layer (dense neurons and experts), both against AtP and exact patches.
"""

import numpy as np
import pytest
from test_edges import assert_logit_edges_are_atp_with_later_layers_dropped

import refprism
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.interventions.attribution import attribute
from refprism.interventions.edges import (
    attribute_edges,
    downstream_nodes,
    edge_count,
    edge_patch,
    edges,
    parse_edge,
    upstream_changes,
    upstream_nodes,
)


@pytest.fixture(scope="module")
def model(checkpoint):
    return refprism.load(checkpoint("tiny-gemma4"), dtype="float64")


@pytest.fixture(scope="module")
def dense(checkpoint):
    return refprism.load(checkpoint("tiny-gemma4", enable_moe_block=False), dtype="float64")


def _ids(model, seed, T=8):
    return [int(i) for i in np.random.default_rng(seed).integers(0, model.config.vocab_size, T)]


def _nearby(model, ids, eps, seed=0):
    d = np.random.default_rng(seed).standard_normal((len(ids), model.config.d_model))
    return model.run(ids, edit=lambda name, v, r: v + eps * d if name == "embed" else v)


def test_the_model_has_consumers_ple_moe_and_layer_scalars(model):
    cfg = model.config
    assert cfg.ple and cfg.moe and [cfg.kv_source(l) for l in range(cfg.n_layers)] == [0, 1, 2, 3, 1, 3, 1]
    assert len({cfg.head_dim_of(l) for l in range(cfg.n_layers)}) == 2
    assert len({cfg.kv_heads_of(l) for l in range(cfg.n_layers)}) == 2


def _brute_count(cfg, neurons):
    """u (written at step a) -> d (reading at step b) iff a <= b, steps per layer: q/k/v read, heads write, MLP
    reads, MLP writes, ple reads, ple writes; a consumer's k and v read at its producer's first step."""
    ups, downs = [0], []
    first = {}
    step = 0
    for l in range(cfg.n_layers):
        first[l] = step
        N, m = cfg.n_heads, cfg.mlp_width_of(l) if l == neurons else 1
        E = cfg.n_experts if l == neurons and cfg.moe else 0  # a split MoE layer: + E experts, + 1 experts' input
        downs += [step] * N + [first[cfg.kv_source(l)]] * (2 * N)
        ups += [step + 1] * N
        downs += [step + 1] * (m + (E > 0))
        ups += [step + 2] * (m + E)
        downs += [step + 2] if cfg.ple else []
        ups += [step + 3] if cfg.ple else []
        step += 3
    downs.append(step)
    return sum(1 for a in ups for b in downs if a <= b)


def test_edge_count_is_the_brute_enumeration(model, dense):
    for m, neurons in [(model, None), (dense, None), (dense, 4), (dense, 0), (model, 5), (model, 0)]:
        cfg = m.config
        assert edge_count(cfg, neurons) == _brute_count(cfg, neurons) == len(edges(cfg, neurons))
        n = cfg.mlp_width_of(neurons) - 1 if neurons is not None else 0
        E = cfg.n_experts if neurons is not None and cfg.moe else 0
        assert len(upstream_nodes(cfg, neurons)) == 1 + cfg.n_layers * (cfg.n_heads + 2) + n + E
        assert len(downstream_nodes(cfg, neurons)) == cfg.n_layers * (3 * cfg.n_heads + 2) + 1 + n + (E > 0)
    cfg = model.config
    labels = {f"{upstream_nodes(cfg)[i][0]}->{downstream_nodes(cfg)[j][0]}" for i, j in edges(cfg)}
    assert "L0H1->L4H2.k" in labels and "L1H1->L4H2.k" not in labels and "L1H1->L4H2.q" in labels
    assert "L3.ple->L5H0.v" not in labels and "L2.ple->L5H0.v" in labels and "L2.mlp->L2.ple" in labels


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_eap_summed_over_a_nodes_out_edges_is_its_node_atp(model, direction):
    ids, cf = _ids(model, 1), _ids(model, 2)
    kw = dict(targets=["#5"], versus=["#3"], ablate="resample", counterfactual=cf, at="all", direction=direction)
    e = attribute_edges(model, ids, method="eap", level="heads", **kw)
    by_up = {}
    for u, v in zip(e.upstream, e.values):
        by_up[u] = by_up.get(u, 0) + v
    nodes = {}
    for level in ("heads", "residual"):
        a = attribute(model, ids, method="atp", level=level, **kw)
        nodes.update(zip(a.labels, a.values))
    scale = max(np.abs(v).max() for v in nodes.values())
    checked = [lab for lab in nodes if lab in by_up]
    assert {"embed", "L1H0", "L4H2", "L6.mlp", "L3.ple", "L0.ple"} <= set(checked)
    err = max(np.abs(by_up[lab] - nodes[lab]).max() for lab in checked) / scale
    assert err < 1e-10, err
    assert np.abs(nodes["embed"]).max() > 1e-3 * scale and np.abs(nodes["L3.ple"]).max() > 1e-6 * scale


def test_eap_edges_into_the_logits_are_atp_with_later_layers_dropped(model):
    assert_logit_edges_are_atp_with_later_layers_dropped(model)  # (layer_scalars on the direct path included)


LABELS = ["L0H1->L4H2.k", "embed->L6H3.v", "L2H0->L5H1.k", "L0.mlp->L4H0.v", "L3H1->L4H1.q", "L2H1->L3.mlp",
          "L5H2->L5.mlp", "L3.ple->L6.mlp", "L4.mlp->L4.ple", "embed->L2.ple", "L1H3->L3.ple", "L6.ple->logits",
          "L2H2->logits", "embed->logits", "L1H2->L2H0.k", "L0.ple->L1H0.v"]


def _gaps(model, labels, neurons=None, level="heads"):
    ids = _ids(model, 5)
    clean = model.run(ids)
    gaps = []
    for eps in (1e-2, 1e-3):
        e = attribute_edges(model, clean, method="eap", level=level, targets=["#5"], versus=["#3"],
                            ablate="resample", counterfactual=_nearby(model, ids, eps), at="all")
        deltas = upstream_changes(e.setting, neurons)
        rel = []
        for label in labels:
            exact = edge_patch(e.setting, label, neurons, deltas=deltas)
            assert np.abs(exact).max() > 1e-9 * eps, label  # the edge carries an effect of the step's size
            rel.append(np.abs(e.values[e.labels.index(label)] - exact).max() / np.abs(exact).max())
        gaps.append(np.array(rel))
    return gaps


def test_eap_is_the_first_order_term_of_the_exact_edge_patch(model):
    gaps = _gaps(model, LABELS)
    ratio = gaps[0] / gaps[1]
    assert np.all((ratio > 5) & (ratio < 20)), dict(zip(LABELS, ratio))  # O(eps)
    assert gaps[1].max() < 0.05, dict(zip(LABELS, gaps[1]))


def test_a_consumers_key_edge_patch_is_a_forward_where_only_that_head_sees_the_patched_keys(model):
    cfg, params = model.config, model.params
    ids, cf = _ids(model, 6), _ids(model, 7)
    e = attribute_edges(model, ids, method="eap", level="heads", targets=["#5"], ablate="resample",
                        counterfactual=cf, at="all")
    s = e.setting
    c, n = 4, 2  # consumer layer 4 (producer 1), query head 2; upstream head L0H3
    src = cfg.kv_source(c)
    lam = params.get(0, "layer_scalar")[0]  # L0H3 writes in layer 0, layer 1 reads after layer 0's scalar
    rec = s.base.record
    z = rec["blocks.0.attn.z"].copy()
    z[:, 3] = s.donor.record["blocks.0.attn.z"][:, 3]
    o = np.einsum("tnh,nhd->td", z, params.get(0, "W_O"))
    w = params.get(0, "ln1_post")
    norm = lambda x, w: x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + cfg.rms_norm_eps) * w  # noqa: E731
    dr = lam * (norm(o, w) - norm(rec["blocks.0.attn.o_proj"], w))
    x = rec[f"blocks.{src}.resid_pre"] + dr
    j = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(src))[n]
    k = norm(norm(x, params.get(src, "ln1")) @ params.get(src, "W_K")[:, j], params.get(src, "k_norm"))
    theta, scale = cfg.rope_of(src)
    cos, sin = ops.rope_tables(np.arange(len(ids)) / scale, cfg.head_dim_of(src), theta, model.dtype,
                               cfg.rope_partial_of(src))
    k = ops.rope(k[:, None], cos, sin)[:, 0]
    q = rec[f"blocks.{c}.attn.q"][:, n]
    scores = q @ k.T  # scale 1 on Gemma 4
    scores = np.where(np.tril(np.ones((len(ids),) * 2, bool)), scores, -np.inf)
    if cfg.is_sliding(c):
        T = len(ids)
        scores = np.where(np.arange(T)[:, None] - np.arange(T)[None] < cfg.sliding_window, scores, -np.inf)

    def edit(name, v, record):
        if name == f"blocks.{c}.attn.scores":
            v = v.copy()
            v[n] = scores
        return v

    from refprism.interventions.setting import Readings

    r = Readings(s)
    brute = r.of_record(rec)[0] - r.of_record(model.run(ids, edit=edit).record)[0]
    np.testing.assert_allclose(edge_patch(s, f"L0H3->L{c}H{n}.k"), s.sign * brute, rtol=1e-10, atol=1e-14)
    assert np.abs(brute).max() > 1e-6
    for bad in ("L1H0->L4H2.k", "L2.mlp->L6H0.v", "L1.ple->L4H0.k", "L3H0->L5H1.v"):
        with pytest.raises(InputError, match="does not exist.*shares the keys and values") as ex:
            parse_edge(cfg, bad)
        assert "\n" not in str(ex.value)


def test_eap_ig_converges_and_its_embedding_edges_are_complete(dense):
    """On the model without MoE (the router's top-k choice is a step function of the interpolated input: there
    the readout jumps and no quadrature of the gradient reaches it; measured on tiny-gemma4, completeness stalls at
    0.3 of the difference), with a counterfactual 0.3 away in the embedding (this random model's integrand over a
    whole prompt change needs k > 64 to reach the asymptotic regime). Measured: successive differences fall by
    6.0, 7.6, 5.1 from k = 4; the embedding's edges miss the difference by 3e-4 at k = 32, 7e-5 at k = 64 (of 1.9)."""
    from refprism.interventions.setting import Readings

    model = dense
    ids = _ids(model, 7)
    kw = dict(level="heads", targets=["#5"], versus=["#3"], ablate="resample", counterfactual=_nearby(model, ids, 0.3),
              at="all")
    runs = {k: attribute_edges(model, model.run(ids), method="eap-ig", steps=k, **kw) for k in (8, 16, 32, 64)}
    steps = {k: np.abs(runs[k].values - runs[2 * k].values).max() for k in (8, 16, 32)}
    assert steps[8] / steps[16] > 3.5 and steps[16] / steps[32] > 3.5, steps  # at least the midpoint's 1/k^2
    s = runs[8].setting
    r = Readings(s)
    whole = r.of_record(s.clean.record)[0] - r.of_record(s.counterfactual.record)[0]
    gaps = {k: np.abs(sum(v for u, v in zip(a.upstream, a.values) if u == "embed") - whole).max()
            for k, a in runs.items()}
    assert gaps[8] > gaps[16] > gaps[32] > gaps[64] and gaps[64] < 1e-3 * np.abs(whole).max(), gaps


def test_neurons_on_a_double_wide_layer(dense):
    cfg = dense.config
    assert cfg.mlp_width_of(5) == 2 * cfg.mlp_width_of(0) and not cfg.moe
    labels = ["L0H1->L5N3", "L5N3->L6H0.q", "L0H2->L5N9", "L5N150->L6H1.q", "L5N2->logits", "embed->L5N0",
              "L5N7->L5.ple"]
    gaps = _gaps(dense, labels, neurons=5, level="neurons:5")
    assert np.all((gaps[0] / gaps[1] > 5) & (gaps[0] / gaps[1] < 20)), gaps
    kw = dict(targets=["#5"], ablate="resample", counterfactual=_ids(dense, 2), at="all")
    e = attribute_edges(dense, _ids(dense, 1), method="eap", level="neurons:5", **kw)
    by_up = {}
    for u, v in zip(e.upstream, e.values):
        by_up[u] = by_up.get(u, 0) + v
    a = attribute(dense, _ids(dense, 1), method="atp", level="neurons:5", **kw)
    np.testing.assert_allclose(np.stack([by_up[lab] for lab in a.labels]), a.values, rtol=0,
                               atol=1e-10 * np.abs(a.values).max())
    assert len(a.labels) == 192


def test_neurons_on_a_moe_layer_are_the_dense_neurons_and_the_experts(model):
    """neurons:L on a MoE layer: upstream the dense neurons L{L}N{n} and validate's experts L{L}E{e}; downstream the
    dense neurons and L{L}.experts (the router's and ln2_moe's input)."""
    cfg = model.config
    L = 5
    ups = [u for u, *_ in upstream_nodes(cfg, L)]
    downs = [d for d, *_ in downstream_nodes(cfg, L)]
    assert {f"L{L}E{e}" for e in range(cfg.n_experts)} <= set(ups) and f"L{L}.experts" in downs
    assert f"L{L}.mlp" not in ups + downs and len([u for u in ups if u.startswith(f"L{L}N")]) == 192
    ids = _ids(model, 5)
    rec = model.run(ids).record
    e = [int(x) for x in rec[f"blocks.{L}.moe.topk.index"].reshape(-1)]
    chosen_e = max(set(e), key=e.count)
    labels = [f"L0H1->L{L}N3", f"L{L}N3->L6H0.q", f"L3.ple->L{L}.experts", f"L{L}H2->L{L}.experts",
              f"L{L}E{chosen_e}->logits", f"L{L}E{chosen_e}->L{L}.ple", f"L{L}N7->L6.mlp", f"embed->L{L}N0"]
    gaps = _gaps(model, labels, neurons=L, level=f"neurons:{L}")
    assert np.all((gaps[0] / gaps[1] > 5) & (gaps[0] / gaps[1] < 20)), dict(zip(labels, gaps[0] / gaps[1]))
    kw = dict(targets=["#5"], ablate="resample", counterfactual=_ids(model, 2), at="all")
    ed = attribute_edges(model, _ids(model, 1), method="eap", level=f"neurons:{L}", **kw)
    by_up = {}
    for u, v in zip(ed.upstream, ed.values):
        by_up[u] = by_up.get(u, 0) + v
    nodes = {}
    for level in (f"neurons:{L}", f"experts:{L}", "heads", "residual"):
        a = attribute(model, _ids(model, 1), method="atp", level=level, **kw)
        nodes.update(zip(a.labels, a.values))
    scale = max(np.abs(v).max() for v in nodes.values())
    checked = [lab for lab in nodes if lab in by_up]
    assert {f"L{L}N0", f"L{L}E{chosen_e}", "embed", "L2H1", "L5.ple"} <= set(checked)
    err = max(np.abs(by_up[lab] - nodes[lab]).max() for lab in checked) / scale
    assert err < 1e-10, err
    assert edge_count(cfg, L) == len(edges(cfg, L))


def test_cli_attribute_eap_lists_consumer_and_ple_edges(checkpoint, capsys):
    import json

    from refprism import cli

    d = str(checkpoint("tiny-gemma4"))
    args = ["--model", d, "--ids", "2,5,7,9,11,13", "--level", "heads", "--ablate", "resample",
            "--counterfactual-ids", "2,6,7,9,12,13", "--targets", "#5", "--at", "all", "--dtype", "float64"]
    assert cli.main(["attribute", *args, "--method", "eap", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = refprism.load(d, dtype="float64")
    assert out["n_edges"] == len(out["edges"]) == edge_count(model.config)
    row = {e["label"]: e for e in out["edges"]}
    assert {"L0H1->L4H2.k", "L0.mlp->L6H0.v", "embed->L3.ple", "L3.ple->logits"} <= set(row)
    assert "L2H0->L4H2.k" not in row
    lib = attribute_edges(model, [2, 5, 7, 9, 11, 13], level="heads", ablate="resample",
                          counterfactual=[2, 6, 7, 9, 12, 13], targets=["#5"], at="all")
    np.testing.assert_allclose(row["L0H1->L4H2.k"]["eap"], lib.values[lib.labels.index("L0H1->L4H2.k")],
                               rtol=1e-12)
