"""The edit that replaces components' values, through the forward pass's one edit hook (gemma.forward's edit=),
and the re-run that resumes at the first edited layer from the base run's record.
"""

from __future__ import annotations

import numpy as np

from refprism.gemma import ops
from refprism.gemma.record import everything_but
from refprism.interventions.components import RESIDUAL_LIKE
from refprism.model import Run


class Edit:
    """A forward-pass edit (forward.forward's `edit=`) that replaces components' values at positions.

    Built from (group, positions [P], values [P, C, W]) triples, compiled into one vectorized replacement per site:
        residual part at t:  x[t] <- value                      head (t, h): z[t, h] <- value
        neuron (t, n):       act[t, n] <- value
        edge (t, h, s):      z[t, h] <- z[t, h] - pattern[h, t, s] v[s, kv(h)] + value   (this run's pattern and v,
                             so exactly that term is replaced; edges with s > t do not exist and are skipped)
    first_layer: where a re-run may resume (the lowest edited layer); None for the embedding (a full run).
    The value passed in is never modified: the edit returns a changed copy.
    """

    def __init__(self, config, changes):
        self.config = config
        self.ops: dict[str, list] = {}
        layers = []
        for g, positions, values in changes:
            positions = np.asarray(positions, dtype=int)
            values = np.asarray(values)
            t = np.repeat(positions, len(g))  # [P*C], position-major as values [P, C, W]
            rows = np.tile(np.arange(len(g)), len(positions))
            vals = values.reshape(len(positions) * len(g), -1)
            if g.kind == "edge":
                keep = g.source[rows] <= t
                t, rows, vals = t[keep], rows[keep], vals[keep]
            if len(t) == 0:
                continue
            self.ops.setdefault(g.site, []).append((g, t, g.index[rows], g.source[rows], vals))
            layers.append(None if g.kind == "embed" else g.layer)
        self.first_layer = None if (None in layers or not layers) else min(layers)
        self.ops = {site: _merged(todo) for site, todo in self.ops.items()}

    def __call__(self, name, value, record):
        todo = self.ops.get(name)
        if not todo:
            return value
        value = value.copy()
        for g, t, index, source, vals in todo:
            if g.kind in ("embed", "attn", "mlp", "ple", "dense"):
                value[t] = vals
            elif g.kind == "expert":  # Gemma 4: the slot that chose the expert (none: the router did not choose it)
                top = record[f"blocks.{g.layer}.moe.topk.index"]
                for ti, e, v in zip(t, index, vals):
                    slots = np.nonzero(top[ti] == e)[0]
                    if len(slots):
                        value[ti, slots[0]] = v
            elif g.kind == "head":
                value[t, index] = vals
            elif g.kind == "neuron":
                value[t, index] = vals[:, 0]
            else:
                b = f"blocks.{g.layer}."
                cfg = self.config
                kv = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(g.layer))
                v = record[f"blocks.{cfg.kv_source(g.layer)}.attn.v"]  # Gemma 4 consumer: the producer's values
                term = record[b + "attn.pattern"][index, t, source][:, None] * v[source, kv[index]]
                np.add.at(value, (t, index), vals - term)  # several edges may end at one (t, h)
        return value


_SET = ("embed", "attn", "mlp", "ple", "dense", "head", "neuron")  # the kinds whose edit only sets values


def _merged(todo: list) -> list:
    """A site's ops with every run of consecutive setting ops (one kind) merged into one: a single fancy-index
    assignment for any number of groups (faithfulness: one group per (layer, position)). Where several set one
    entry the last one given wins, as applied one after another: only each entry's last occurrence is kept."""
    runs: list[list] = []
    for op in todo:
        if runs and op[0].kind in _SET and runs[-1][0][0].kind == op[0].kind:
            runs[-1].append(op)
        else:
            runs.append([op])
    out = []
    for run in runs:
        if len(run) == 1:
            out.append(run[0])
            continue
        g = run[0][0]
        t, index, source, vals = (np.concatenate([op[k] for op in run]) for k in range(1, 5))
        key = t if g.kind in RESIDUAL_LIKE else t * (int(index.max()) + 1) + index
        _, last = np.unique(key[::-1], return_index=True)  # each entry's last occurrence
        rows = np.sort(len(key) - 1 - last)
        out.append((g, t[rows], index[rows], source[rows], vals[rows]))
    return out


def rerun(model, base: Run, edit: Edit, record=None):
    """The base run re-run with the edit, resumed at its first edited layer from the base run's record (bit for bit
    a full re-run: forward.forward's resume); returns its Record, which keeps every site but the logits (a readout
    needs ln_final.out at one position and a few unembedding rows, not the [T, V] product), or only the sites
    `record` names (Model.run's record=; an edit that reads no site of the pass, as a neuron edit: the same values,
    the rest never kept: at T = 1,024 an edited run's whole record is ~1.4 GB)."""
    resume = None if edit.first_layer is None else (edit.first_layer, base.record)
    keep = everything_but(model.config, ("logits", "logits_uncapped")) if record is None else record
    return model.run(base.tokens, edit=edit, resume=resume, record=keep).record
