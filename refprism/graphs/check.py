"""The pruned graph checked by interventions: keep its neurons (features), ablate every other one, re-run the model.

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

The transcoder basis (docs/math.md 7.5): the check runs the replacement model, every MLP output replaced by its
transcoder's, recomputed from the live input (nothing frozen: norm scales, patterns and gates live), with the error
node held at its value in the graph:

        mlp.out_l[t] <- sum_f a'_f[t] W_dec[f] + b_dec + h[t] W_skip + err_l[t]     (h W_skip: skip transcoders)
        a'_f[t] = r_f (0, or mean_{s=1..T-1} act_f[s] of the run)   for the ablated features (l, t, f)
        a'_f[t] = gate(pre_f[t]) pre_f[t], pre = h W_enc + b_enc    for every other feature (live, the BOS rule kept)

with h = resid_mid c (c live) and err_l[t] = mlp.out_l[t] - (act W_dec + b_dec + h W_skip) of the clean run, so
that with nothing ablated the replacement forward is the clean forward (to rounding). Ablated: the active features
(the graph's feature nodes, and the ones its remainder nodes stand for) at positions <= p that are not in the
pruned graph (a kept remainder keeps its unexplored features live). Held in every run: the error nodes, whether the
pruned graph kept them or not (circuit-tracer counts them as what the replacement does not explain: replacement and
completeness score them, reported beside), and the bias nodes b_dec and b_enc (counted with the tokens, which
pruning always keeps). Features inactive in the clean run are no nodes: they stay live. none: every active feature
at positions <= p ablated, the errors and biases held.
"""

from __future__ import annotations

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.graphs.build import _transcode
from refprism.interventions.components import EMPTY_MEAN_SET, Group, mean_activation
from refprism.interventions.edit import Edit, rerun

ABLATIONS = ("zero", "mean")


def faithfulness(g, *, pruned=None, ablation="zero", scores=None) -> dict:
    """The fraction of the readout the pruned graph's neurons (features) recover when every other one is ablated,
    beside the graph's own replacement and completeness scores (scores: g.scores() when already computed).

    Shapes: -> {"recovered": float, "per_logit": [Z], "clean", "kept", "none": [Z], "ablation", "replacement",
                "completeness", neurons: "kept_neurons", "ablated_neurons"; transcoders: "kept_features",
                "ablated_features", "held_errors", "held_errors_outside"}
    """
    if ablation not in ABLATIONS:
        raise InputError(f"ablation {ablation!r} is not one of {', '.join(ABLATIONS)}")
    pr = g.pruned() if pruned is None else pruned
    replacement, completeness = g.scores() if scores is None else scores
    scores = {"replacement": replacement, "completeness": completeness}
    if g.basis == "transcoders":
        return {**_faithfulness_transcoders(g, pr, ablation), **scores}
    model, run = g.model, g.run
    cfg = model.config
    if cfg.gemma4:
        return {**_gemma4(g, pr, ablation), **scores}
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
    fill = _fill(model, run, keep.shape, ablation)
    read = [f"ln_final.out@{g.read_at}"]  # all _readout reads: the neuron edits read no site of the re-run
    kept = _readout(g, rerun(model, run, _ablate(model.config, keep, fill), read))
    none = _readout(g, rerun(model, run, _ablate(model.config, np.zeros_like(keep), fill), read))
    return {**_recovered(g, clean, kept, none), "ablation": ablation, "kept_neurons": int(keep.sum()),
            "ablated_neurons": int((~keep).sum()), **scores}


def _recovered(g, clean, kept, none) -> dict:
    """recovered = sum_z w_z (kept_z - none_z) / sum_z w_z (clean_z - none_z), and per logit."""
    w = g.logit_weights
    per = (kept - none) / np.where(clean != none, clean - none, np.nan)
    recovered = float(w @ (kept - none) / (w @ (clean - none)))
    return {"recovered": recovered, "per_logit": per.tolist(), "clean": clean.tolist(), "kept": kept.tolist(),
            "none": none.tolist()}


def _faithfulness_transcoders(g, pr, ablation) -> dict:
    """The module docstring's replacement-model check: the active features outside the pruned graph ablated."""
    model, run, tc = g.model, g.run, g.transcoders
    rec = run.record
    T = g.read_at + 1
    clean_act, err, fill = [], [], []
    for l, t_l in enumerate(tc.layers):
        _, _, act, recon = _transcode(model, rec, l, t_l, tc.input_hook, g.zero_positions)
        clean_act.append(act)
        err.append(np.asarray(rec[f"blocks.{l}.mlp.out"]) - recon)
        if ablation == "mean":
            if len(run.tokens) < 2:
                raise EMPTY_MEAN_SET
            fill.append(act[1:].mean(axis=0))  # interventions.mean_activation's positions 1 .. T-1
        else:
            fill.append(np.zeros(act.shape[1], act.dtype))
    active = np.stack([a[:T] != 0 for a in clean_act])  # [L, T, F] the feature nodes and the remainders' features
    keep = np.zeros_like(active)
    on = pr.node_mask & (g.kind == "feature")
    keep[g.layer[on], g.position[on], g.index[on]] = True
    explored = np.zeros_like(active)
    ff = g.kind == "feature"
    explored[g.layer[ff], g.position[ff], g.index[ff]] = True
    for i in np.flatnonzero(pr.node_mask & (g.kind == "remainder")):
        keep[g.layer[i], g.position[i]] |= active[g.layer[i], g.position[i]] & ~explored[g.layer[i], g.position[i]]
    ablate = active & ~keep
    clean = _readout(g, rec)
    kept = _readout(g, rerun(model, run, _Replacement(g, err, fill, ablate)))
    none = _readout(g, rerun(model, run, _Replacement(g, err, fill, active)))
    errors = g.kind == "error"
    return {**_recovered(g, clean, kept, none), "ablation": ablation, "kept_features": int((active & keep).sum()),
            "ablated_features": int(ablate.sum()), "held_errors": int(errors.sum()),
            "held_errors_outside": int((errors & ~pr.node_mask).sum())}


class _Replacement:
    """The forward edit (forward's edit=) of the module docstring's replacement model: every mlp.out_l at layers
    >= first_layer replaced by the transcoder's output from the live input, err held, the `ablate` [L, T, F]
    features set to fill[l] [F].  A re-run resumes at first_layer (interventions.rerun): below it nothing changes."""

    def __init__(self, g, err, fill, ablate):
        self.g, self.err, self.fill, self.ablate = g, err, fill, ablate
        layers = np.flatnonzero(ablate.any(axis=(1, 2)))
        self.first_layer = int(layers[0]) if len(layers) else 0  # nothing ablated: the whole replacement

    def __call__(self, name, value, record):
        if not name.endswith(".mlp.out") or int(name.split(".")[1]) < self.first_layer:
            return value
        l = int(name.split(".")[1])
        g, tc = self.g, self.g.transcoders
        t_l = tc.layers[l]
        _, _, act, recon = _transcode(g.model, record, l, t_l, tc.input_hook, g.zero_positions)
        T = self.ablate.shape[1]
        new = act[:T].copy()
        new[self.ablate[l]] = np.broadcast_to(self.fill[l], new.shape)[self.ablate[l]]
        out = recon + self.err[l]
        out[:T] += (new - act[:T]) @ t_l.W_dec
        return out.astype(value.dtype, copy=False)


def _gemma4(g, pr, ablation) -> dict:
    """faithfulness on Gemma 4: graphs.gemma4's kept neurons and ablation edit, full re-runs."""
    from refprism.graphs import gemma4

    model, run = g.model, g.run
    keep = gemma4.kept_nodes(g, pr)
    kept_rec = model.run(run.tokens, edit=gemma4.ablation_edit(g, keep, ablation)).record
    none_rec = model.run(run.tokens, edit=gemma4.ablation_edit(g, {k: np.zeros_like(v) for k, v in keep.items()},
                                                                ablation)).record
    clean, kept, none = _readout(g, run.record), _readout(g, kept_rec), _readout(g, none_rec)
    n_kept = int(sum(v.sum() for v in keep.values()))
    n_all = g.n_neurons  # dense, expert-slot and PLE neurons at positions <= p
    return {**_recovered(g, clean, kept, none), "ablation": ablation,
            "kept_neurons": n_kept, "ablated_neurons": n_all - n_kept,
            "rerouted": {"kept": gemma4.rerouted(g, kept_rec), "none": gemma4.rerouted(g, none_rec)}}


def _fill(model, run, shape, ablation) -> np.ndarray:
    """What an ablated neuron (l, t, n) is set to, fill[l, n]: zero, or its mean over positions 1 .. T-1 of the clean
    run (interventions.mean_activation: one read of each layer's mlp.act, shared by the kept and none re-runs).

    Shapes: shape (L, T, F) -> [L, F]
    """
    L, _, F = shape
    if ablation == "zero":
        return np.zeros((L, F), model.dtype)
    return np.stack([mean_activation(model, [run], Group("neuron", l, np.arange(F), np.full(F, -1)))[:, 0]
                     for l in range(L)])


def _ablate(config, keep, fill) -> Edit:
    """Every neuron not in keep [L, T, F] set to fill [L, F]: one interventions Group per (layer, position), which
    the Edit applies as one assignment per layer's mlp.act."""
    changes = []
    L, T, _ = keep.shape
    for l in range(L):
        for t in range(T):
            n = np.flatnonzero(~keep[l, t])
            if len(n) == 0:
                continue
            changes.append((Group("neuron", l, n, np.full(len(n), -1)), [t], fill[l, n][None, :, None]))
    return Edit(config, changes)


def _readout(g, record) -> np.ndarray:
    """The logit nodes' readouts in a real forward: (E[ids] rows as the graph reads them) . ln_final.out[p]."""
    model = g.model
    h = record["ln_final.out"][g.read_at]
    scale = P.gain(model, model.params.ln_final) / g.run.record["ln_final.scale"][g.read_at]
    rows = g.logit_u / scale[None]  # the graph's rows before the frozen final norm: E[t] - mean
    return rows @ h
