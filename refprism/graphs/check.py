"""The pruned graph checked by interventions: keep its neurons, ablate every other neuron, re-run the model.

Math:   R(run) = the logit nodes' readouts at p in a real forward (nothing frozen): u_z . ln_final.out[p] with
        u_z = E[t_z] - mean_v E[v] (demeaned) or E[t_z] - mean_f E[f] (targets), pre-cap
        recovered_z = (R_z(kept) - R_z(none)) / (R_z(clean) - R_z(none))
        kept: every neuron at positions <= p ablated but the pruned graph's (a kept remainder node keeps the
        unexplored neurons it stands for); none: every neuron at positions <= p ablated
        recovered = sum_z w_z (R_z(kept) - R_z(none)) / sum_z w_z (R_z(clean) - R_z(none))   (w: logit weights)
Ablations as interventions does them (interventions.Edit on mlp.act, re-run resumed at layer 0): zero, or the
prompt's own mean over positions 1 .. T-1 (interventions.mean_activation).
Gemma 4 (graphs.gemma4.ablation_edit): the dense neurons (mlp.act), the PLE neurons (ple.act) and the experts'
neurons (moe.act, by the expert the re-run's own router picks: nothing is frozen, so an ablation may reroute; the
count of slots whose expert changed is reported as "rerouted") are the neurons; PLE token nodes and embeddings
are never ablated.
"""

from __future__ import annotations

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.interventions.components import Group, mean_activation
from refprism.interventions.edit import Edit, rerun

ABLATIONS = ("zero", "mean")


def faithfulness(g, *, pruned=None, ablation="zero") -> dict:
    """The fraction of the readout the pruned graph's neurons recover when every other neuron is ablated.

    Shapes: -> {"recovered": float, "per_logit": [Z], "clean", "kept", "none": [Z], "ablation", "kept_neurons"}
    """
    if ablation not in ABLATIONS:
        raise InputError(f"ablation {ablation!r} is not one of {', '.join(ABLATIONS)}")
    if getattr(g, "basis", "neurons") != "neurons":
        raise InputError("faithfulness ablates neurons: a transcoder graph's check is not written yet")
    model, run = g.model, g.run
    cfg = model.config
    pr = g.pruned() if pruned is None else pruned
    if cfg.gemma4:
        return _gemma4(g, pr, ablation)
    L, T, F = cfg.n_layers, g.read_at + 1, cfg.d_mlp
    keep = np.zeros((L, T, F), bool)
    on = pr.node_mask & (g.kind == "neuron")
    keep[g.layer[on], g.position[on], g.index[on]] = True
    explored = np.zeros((L, T, F), bool)
    nn = g.kind == "neuron"
    explored[g.layer[nn], g.position[nn], g.index[nn]] = True
    for i in np.flatnonzero(pr.node_mask & (g.kind == "remainder")):
        keep[g.layer[i], g.position[i]] |= ~explored[g.layer[i], g.position[i]]
    clean = _readout(g, run.record)
    kept = _readout(g, rerun(model, run, _ablate(model, run, keep, ablation)))
    none = _readout(g, rerun(model, run, _ablate(model, run, np.zeros_like(keep), ablation)))
    w = g.logit_weights
    per = (kept - none) / np.where(clean != none, clean - none, np.nan)
    recovered = float(w @ (kept - none) / (w @ (clean - none)))
    return {"recovered": recovered, "per_logit": per.tolist(), "clean": clean.tolist(), "kept": kept.tolist(),
            "none": none.tolist(), "ablation": ablation, "kept_neurons": int(keep.sum()),
            "ablated_neurons": int((~keep).sum())}


def _gemma4(g, pr, ablation) -> dict:
    """faithfulness on Gemma 4: graphs.gemma4's kept neurons and ablation edit, full re-runs."""
    from refprism.graphs import gemma4

    model, run = g.model, g.run
    keep = gemma4.kept_nodes(g, pr)
    kept_rec = model.run(run.tokens, edit=gemma4.ablation_edit(g, keep, ablation)).record
    none_rec = model.run(run.tokens, edit=gemma4.ablation_edit(g, {k: np.zeros_like(v) for k, v in keep.items()},
                                                                ablation)).record
    clean, kept, none = _readout(g, run.record), _readout(g, kept_rec), _readout(g, none_rec)
    w = g.logit_weights
    per = (kept - none) / np.where(clean != none, clean - none, np.nan)
    n_kept = int(sum(v.sum() for v in keep.values()))
    n_all = g.n_neurons  # dense, expert-slot and PLE neurons at positions <= p
    return {"recovered": float(w @ (kept - none) / (w @ (clean - none))), "per_logit": per.tolist(),
            "clean": clean.tolist(), "kept": kept.tolist(), "none": none.tolist(), "ablation": ablation,
            "kept_neurons": n_kept, "ablated_neurons": n_all - n_kept,
            "rerouted": {"kept": gemma4.rerouted(g, kept_rec), "none": gemma4.rerouted(g, none_rec)}}


def _ablate(model, run, keep, ablation) -> Edit:
    """Every neuron not in keep [L, T, F] replaced (zero or its mean), one interventions Group per (layer, position)."""
    changes = []
    L, T, _ = keep.shape
    for l in range(L):
        means = None
        if ablation == "mean":
            means = mean_activation(model, [run], Group("neuron", l, np.arange(keep.shape[2]),
                                                        np.full(keep.shape[2], -1)))[:, 0]
        for t in range(T):
            n = np.flatnonzero(~keep[l, t])
            if len(n) == 0:
                continue
            values = np.zeros((1, len(n), 1), model.dtype) if means is None else means[n][None, :, None]
            changes.append((Group("neuron", l, n, np.full(len(n), -1)), [t], values))
    return Edit(model.config, changes)


def _readout(g, record) -> np.ndarray:
    """The logit nodes' readouts in a real forward: (E[ids] rows as the graph reads them) . ln_final.out[p]."""
    model = g.model
    h = record["ln_final.out"][g.read_at]
    scale = P.gain(model, model.params.ln_final) / g.run.record["ln_final.scale"][g.read_at]
    rows = g.logit_u / scale[None]  # the graph's rows before the frozen final norm: E[t] - mean
    return rows @ h
