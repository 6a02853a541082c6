"""Interventions on Gemma 4's components (the tiny preset with every feature on): the per-layer input term
L{l}.ple, the MoE's dense branch L{l}.dense and experts L{l}E{e}, dense neurons of a MoE layer and heads (and head x
source edges) of KV-sharing consumers. In float64: a zero ablation's prism term is the prisms' own term of that
component (residual_prism, moe_prism, attention_prism, mlp_prism); on the last layer nothing mediates, so the
total effect (a re-run) equals the direct effect (norms on the direct path recomputed from the record); a
re-run's change at the edited site is the replacement; validate runs on the new levels."""

import numpy as np
import pytest

import refprism
from refprism import prisms as P
from refprism.errors import InputError
from refprism.interventions import parse_component, patch, validate


@pytest.fixture(scope="module")
def g4(checkpoint):
    return refprism.load(checkpoint("tiny-gemma4"), dtype="float64")


IDS = [2, 17, 99, 3, 250, 41, 7, 8, 300, 12, 5]


def _expert(model, layer, p=-1):
    run = model.run(IDS)
    return int(run.record[f"blocks.{layer}.moe.topk.index"][p, 0])


@pytest.mark.parametrize("layer", [3, 6])
def test_zero_ablation_prism_terms_are_the_prisms_terms(g4, layer):
    run = g4.run(IDS)
    r = P.logits_readout(g4, run, ["#9"], versus=["#10"])
    res, moe, mlp = P.residual_prism(r), P.moe_prism(r, layer), P.mlp_prism(r, layer)
    att = P.attention_prism(r, layer)
    e = _expert(g4, layer)
    cases = {f"L{layer}.ple": res.term(f"L{layer}.ple"), f"L{layer}.mlp": res.term(f"L{layer}.mlp"),
             f"L{layer}.attn": res.term(f"L{layer}.attn"), f"L{layer}.dense": moe.term(f"L{layer}.dense"),
             f"L{layer}E{e}": moe.term(f"L{layer}E{e}"), f"L{layer}N5": mlp.term(f"L{layer}N5"),
             f"L{layer}H1.src4": att.term(f"L{layer}H1.src4"), "embed": res.term("embed")}
    for component, term in cases.items():
        pt = patch(g4, IDS, component, targets=["#9"], versus=["#10"])
        np.testing.assert_allclose(pt.prism, term, rtol=1e-9, atol=1e-12, err_msg=component)


@pytest.mark.parametrize("preset, component", [
    ({}, "L6.ple"), ({"hidden_size_per_layer_input": 0}, "L6.mlp"), ({"hidden_size_per_layer_input": 0}, "L6.dense"),
    ({"hidden_size_per_layer_input": 0}, "L6E{e}"), ({"hidden_size_per_layer_input": 0}, "L6N7"),
    ({"hidden_size_per_layer_input": 0}, "L6N150")])
def test_last_layer_total_effect_is_the_direct_effect(checkpoint, preset, component):
    """Layer 6 is a KV-sharing consumer with a double-wide MLP (N150 exists only there) and MoE. After its last
    term only the final norm follows (the per-layer input reads the residual after the MLP, so the MLP's parts
    are checked on the model without per-layer inputs): the re-run's effect must equal the direct effect computed
    from the record, every post-norm on the way recomputed (no mediation)."""
    model = refprism.load(checkpoint("tiny-gemma4", **preset), dtype="float64")
    component = component.format(e=_expert(model, 6))
    for ablate in ("zero", "mean"):
        pt = patch(model, IDS, component, ablate=ablate, targets=["#9"], versus=["#10"])
        np.testing.assert_allclose(pt.total, pt.direct, rtol=1e-9, atol=1e-11, err_msg=component)
        assert np.abs(pt.total).max() > 1e-6, component  # the ablation does something


def test_an_unchosen_expert_changes_nothing(g4):
    run = g4.run(IDS)
    top = run.record["blocks.2.moe.topk.index"][-1]
    e = next(i for i in range(g4.config.n_experts) if i not in top)
    pt = patch(g4, IDS, f"L2E{e}", targets=["#9"])
    assert np.all(pt.prism == 0) and np.all(pt.total == 0)


def test_validate_runs_on_gemma4_levels(g4):
    v = validate(g4, IDS, level="residual", targets=["#9"], versus=["#10"])
    labels = v.labels if hasattr(v, "labels") else v.components
    assert "L3.ple" in labels and len(labels) == 1 + 3 * g4.config.n_layers
    n = validate(g4, IDS, level="neurons:5", targets=["#9"])  # a double-wide consumer layer
    assert len(n.labels if hasattr(n, "labels") else n.components) == 2 * g4.config.d_mlp


def test_gemma4_component_labels_are_checked(g4, checkpoint):
    assert parse_component(g4.config, "L2E3", T=5).kind == "expert"
    assert parse_component(g4.config, "L4.ple", T=5).site == "blocks.4.ple.out"
    with pytest.raises(InputError, match="expert 9 is out of range"):
        parse_component(g4.config, "L2E9", T=5)
    with pytest.raises(InputError, match="neuron 200 is out of range"):
        parse_component(g4.config, "L2N200", T=5)  # F = 96 before the sharing layers
    parse_component(g4.config, "L5N191", T=5)  # 2F on a consumer
    dense = refprism.load(checkpoint("tiny-gemma4", enable_moe_block=False, hidden_size_per_layer_input=0))
    with pytest.raises(InputError, match="no mixture of experts"):
        parse_component(dense.config, "L2E1", T=5)
    with pytest.raises(InputError, match="no per-layer embeddings"):
        parse_component(dense.config, "L2.ple", T=5)


@pytest.mark.parametrize("level", ["residual", "heads", "neurons:5", "experts:1", "head-source:4"])
def test_gemma4_gradxact_is_the_derivative_of_scaling_each_component(checkpoint, level):
    """gradxact(c) = sign g . c (zero replacement) is the derivative of the readout as the component is scaled,
    c -> (1 + e) c, every later op recomputed: checked by central differences of re-runs with the edit
    (interventions.Edit), on every Gemma 4 component kind: the per-layer input parts, a double-wide layer's
    neurons, the experts (their routing weight inside), the heads of KV-sharing consumers and their sources."""
    from refprism.interventions.attribution import attribute
    from refprism.interventions.components import activation, level_groups
    from refprism.interventions.edit import Edit, rerun

    model = refprism.load(checkpoint("tiny-gemma4"), dtype="float64")
    ids = [int(i) for i in np.random.default_rng(3).integers(0, model.config.vocab_size, 9)]
    run = model.run(ids)
    T = len(ids)
    gx = attribute(model, ids, method="gradxact", level=level, targets=["#5"])
    groups = level_groups(model.config, level, T - 1)
    fd, h = [], 1e-5
    for g in groups:
        for r in range(len(g)):
            one = g.take([r])
            c = activation(model, run.record, one, T - 1)[None]  # [P=1, C=1, W]
            vals = [model.params.unembed(rerun(model, run, Edit(model.config, [(one, [T - 1], (1 + e) * c)]))
                                         ["ln_final.out"][[T - 1]])[0, 5] for e in (h, -h)]  # the pre-cap logit
            fd.append((vals[0] - vals[1]) / (2 * h))
    fd = np.asarray(fd)
    assert len(fd) == len(gx.labels) and np.abs(fd).max() > 1e-3
    sign = np.sign(gx.values[np.argmax(np.abs(fd)), 0] / fd[np.argmax(np.abs(fd))])
    np.testing.assert_allclose(gx.values[:, 0], sign * fd, rtol=0, atol=1e-7 * np.abs(fd).max())
    if level == "experts:1":  # the experts the router did not choose at the readout position score 0
        chosen = set(run.record["blocks.1.moe.topk.index"][T - 1].tolist())
        assert all((gx.values[e, 0] == 0) == (e not in chosen) for e in range(model.config.n_experts))
