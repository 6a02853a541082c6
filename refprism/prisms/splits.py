"""The prisms: a readout's value split into exact parts (`Split`: values, labels, whole, residual and the
tolerance it meets). residual_prism (embed and every sublayer), attention_prism (head x source), mlp_prism
(neurons), head_split, apply_map (any vectors through the readout), and the unembedding PCA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refprism.errors import InputError
from refprism.gemma import ops
from refprism.prisms.readouts import (
    Readout,
    Token,
    expert_neuron_terms,
    expert_terms,
    gain,
    head_source_terms,
    layer_scale,
    neuron_terms,
    ple_terms,
    resolve_token,
    site_name,
)

# Exactness tolerance of |whole - sum(parts)|: atol + rtol * sum(|parts|), by compute dtype. The parts are dot
# products over D (2048 for gemma-2b) computed in different orders from the whole, so their rounding error is a
# small multiple of eps * sqrt(D) * sum(|parts|); float32's eps is 1.2e-7, float64's 2.2e-16.
TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-4), np.dtype(np.float64): (1e-12, 1e-10)}


@dataclass
class Split:
    """A prism's result: labelled parts [C, Z] of a whole [Z]; residual = whole - sum(parts) is reported."""

    prism: str
    readout: Readout = field(repr=False)
    labels: list[str]
    values: np.ndarray  # [C, Z]
    whole: np.ndarray  # [Z]
    whole_label: str
    extras: dict = field(default_factory=dict, repr=False)  # name -> {"labels": [..], "values": [.., Z]}
    decomposes: bool = True  # False for a map: its rows are not parts of the whole

    @property
    def columns(self) -> list[str]:
        return self.readout.targets.labels

    @property
    def residual(self) -> np.ndarray:
        """whole - sum(parts), summed in float64 so the report shows the parts' own rounding."""
        return self.whole.astype(np.float64) - self.values.astype(np.float64).sum(axis=0)

    @property
    def tolerance(self) -> np.ndarray:
        atol, rtol = TOLERANCE[np.dtype(self.values.dtype)]
        return atol + rtol * np.abs(self.values.astype(np.float64)).sum(axis=0)

    @property
    def exact(self) -> bool:
        """True when every |residual| is within the stated tolerance of the compute dtype."""
        return bool(np.all(np.abs(self.residual) <= self.tolerance))

    def term(self, label) -> np.ndarray:
        return self.values[self.labels.index(label)]

    def top(self, n) -> list[int]:
        """Indices of the n parts with the largest max |value| over the columns."""
        return np.argsort(-np.abs(self.values).max(axis=1), kind="stable")[:n].tolist()

    def to_json(self) -> dict:
        """The one JSON schema of every prism (docs/guide.md). A map has "residual": null, "exact": null."""
        model, run, r = self.readout.model, self.readout.run, self.readout
        return {
            "prism": self.prism,
            "model": model.name,
            "dtype": str(model.dtype),
            "tokens": [{"id": int(i), "piece": model.piece(i)} for i in run.tokens],
            "position": int(r.position),
            "site": r.site_name,
            "path": list(r.path),
            "targets": [t.to_json() for t in r.targets.targets],
            "versus": [t.to_json() for t in r.targets.versus],
            "columns": self.columns,
            "whole": {"label": self.whole_label, "values": _floats(self.whole)},
            "components": [{"label": l, "values": _floats(v)} for l, v in zip(self.labels, self.values)],
            "residual": _floats(self.residual) if self.decomposes else None,
            "tolerance": _floats(self.tolerance) if self.decomposes else None,
            "exact": self.exact if self.decomposes else None,
            "extras": {k: {"labels": v["labels"], "values": [_floats(row) for row in v["values"]]}
                       for k, v in self.extras.items()},
        }

    def table(self, top=None) -> str:
        """A text table: the whole, the parts (the `top` largest if given, in label order), the residual."""
        rows = range(len(self.labels)) if top is None else sorted(self.top(top))
        cols = self.columns
        width = max(12, *(len(c) + 2 for c in cols))
        others = f"({len(self.labels) - len(rows)} others)"
        name_w = max([len(self.whole_label), len(others), *(len(self.labels[i]) for i in rows)]) + 2
        head = " " * name_w + "".join(f"{c:>{width}}" for c in cols)
        line = lambda label, vals: f"{label:<{name_w}}" + "".join(f"{v:>{width}.4f}" for v in vals)  # noqa: E731
        out = [head, line(self.whole_label, self.whole), "-" * len(head)]
        out += [line(self.labels[i], self.values[i]) for i in rows]
        if top is not None and top < len(self.labels):
            rest = np.delete(self.values, rows, axis=0).sum(axis=0)
            out.append(line(others, rest))
        if self.decomposes:
            out += ["-" * len(head), line("residual", self.residual)]
            out.append(f"exact: {'yes' if self.exact else 'NO'} (|residual| <= {self.tolerance.max():.2g} "
                       f"required in {self.values.dtype})")
        return "\n".join(out)


def _floats(a):
    return [float(x) for x in np.asarray(a).ravel()]


def residual_parts(readout) -> tuple[list[str], np.ndarray]:
    """The parts of the residual at the readout's site and position: embed and each earlier sublayer output.

    Math:   x_site[p] = embed[p] + sum_{sublayers i < site} out_i[p]
            Gemma 4: x_{l+1} = lambda_l (x_{l+1/2} + mlp_l + ple_l), so each part carries the product of the
            layer_scalars after it (readouts.layer_scale): x_k = prod_{l<k} lambda_l embed + sum_j
            prod_{j<=l<k} lambda_l (attn_j + mlp_j + ple_j), and the per-layer input is a part of its own, L{j}.ple
    Shapes: -> labels [C], vectors [C, D]
    """
    rec, p = readout.run.record, readout.position
    cfg = readout.model.config
    labels, vectors = ["embed"], [rec["embed"][p] * layer_scale(readout, 0)]
    for i in range(readout.site):
        l, kind = divmod(i, 2)
        names = ["attn"] if kind == 0 else (["mlp", "ple"] if cfg.ple else ["mlp"])
        for name in names:
            labels.append(f"L{l}.{name}")
            vectors.append(rec[f"blocks.{l}.{name}.out"][p] * layer_scale(readout, l))
    return labels, np.stack(vectors)


def residual_prism(readout) -> Split:
    """Split a readout into the residual parts it reads (the post's per-layer plot; a chain's last step).

    Math:   whole = sum_c u . part_c   (the parts of x_site[p], see residual_parts)
    For the logits readout it also reports, per part, the direct effect with the final norm recomputed
    (logit(x) - logit(x - c)) and the logit lens beside the frozen running sum (see `_beyond_frozen`).
    """
    labels, vectors = residual_parts(readout)
    split = Split("residual" if readout.is_logits else "chain", readout, labels, readout.value_of(vectors),
                  readout.whole, readout.whole_label)
    if readout.is_logits:
        split.extras.update(_beyond_frozen(readout, labels, vectors, split.values))
    return split


def _beyond_frozen(readout, labels, vectors, values) -> dict:
    """What freezing the final norm hides, for the logits readout.

    Math:   f(x) = (E[t] - mean E[f]) . (x / s(x) * (1 + w_final)),  s(x) = sqrt(mean(x^2) + eps) recomputed
            direct_effect[c]      = f(x) - f(x - part_c)
            logit_lens[c]         = f(x_c), x_c = the recorded residual after part c (embed, resid_mid, resid_post)
            frozen_running_sum[c] = sum_{c' <= c} values[c']
            (all pre-cap on Gemma 2; extras["softcapped"] holds the model's capped logits for the whole)
    """
    model, rec, p = readout.model, readout.run.record, readout.position
    cfg, dtype = model.config, model.dtype
    ids, coef = readout.targets.coefficients(dtype)
    W = coef @ model.params.embed_rows(ids)  # [Z, D]
    w = model.params.ln_final

    def f(xs):  # [C, D] -> [C, Z]
        s = ops.rms_scale(xs, eps=cfg.rms_norm_eps)
        return (xs / s[..., None] * gain(model, w)) @ W.T

    x = rec[site_name(2 * cfg.n_layers, cfg.n_layers)][p]  # the final residual
    direct = f(x)[None, :] - f(x[None, :] - vectors)
    running = [rec["embed"][p]]
    for i in range(2 * cfg.n_layers):
        l, kind = divmod(i, 2)
        if kind and cfg.ple:  # Gemma 4: after the MLP (before the per-layer input and layer_scalar), then after
            running.append(rec[f"blocks.{l}.resid_mlp"][p])
        running.append(rec[f"blocks.{l}.resid_{'post' if kind else 'mid'}"][p])
    lens = f(np.stack(running))
    extras = {
        "direct_effect": {"labels": labels, "values": direct},
        "logit_lens": {"labels": labels, "values": lens},
        "frozen_running_sum": {"labels": labels, "values": np.cumsum(values, axis=0)},
    }
    if cfg.final_softcap is not None:  # Gemma 2: cap * tanh(logit / cap), not linear, so shown beside the whole
        extras["softcapped"] = {"labels": [f"logits after the soft-cap {cfg.final_softcap:g} tanh(l / "
                                           f"{cfg.final_softcap:g})"], "values": (coef @ rec["logits"][p, ids])[None]}
    return extras


def attention_prism(readout, layer) -> Split:
    """Split layer l's attention term into heads x source tokens (labels L{l}H{h}.src{s}, head-major).

    whole = u . attn.out_l[p] (the parent's L{l}.attn term); extras["heads"] sums each head over sources.
    """
    terms = head_source_terms(readout, layer)  # [N, S, Z]
    N, S, Z = terms.shape
    labels = [f"L{layer}H{h}.src{s}" for h in range(N) for s in range(S)]
    whole = readout.value_of(readout.run.record[f"blocks.{layer}.attn.out"][readout.position]) * \
        layer_scale(readout, layer)
    split = Split("attention", readout, labels, terms.reshape(N * S, Z), whole, _term_label(readout, f"L{layer}.attn"))
    split.extras["heads"] = {"labels": [f"L{layer}H{h}" for h in range(N)], "values": terms.sum(axis=1)}
    return split


def mlp_prism(readout, layer) -> Split:
    """Split layer l's MLP term into neurons (labels L{l}N{n}); whole = u . mlp.out_l[p].

    Gemma 4 MoE: the dense branch's neurons L{l}N{n} and each selected expert L{l}E{e} (moe_prism splits the
    layer into the dense branch and the experts, expert_prism an expert into its neurons)."""
    terms = neuron_terms(readout, layer)  # [F, Z]
    labels = [f"L{layer}N{n}" for n in range(terms.shape[0])]
    if readout.model.config.moe:
        experts, values = expert_terms(readout, layer)
        labels += [f"L{layer}E{int(e)}" for e in experts]
        terms = np.concatenate([terms, values])
    return Split("mlp", readout, labels, terms, _mlp_whole(readout, layer), _term_label(readout, f"L{layer}.mlp"))


def _mlp_whole(readout, layer):
    return readout.value_of(readout.run.record[f"blocks.{layer}.mlp.out"][readout.position]) * \
        layer_scale(readout, layer)


def moe_prism(readout, layer) -> Split:
    """Gemma 4 MoE: layer l's MLP term split into the dense branch (L{l}.dense) and each selected expert
    (L{l}E{e}, in top-k order); whole = u . mlp.out_l[p] (the post-norm scales frozen).

    Math:   u . mlp.out = u_dense . mlp.down + sum_j w_j u_exp . out_j      (readouts.through_post_norm)
    """
    if not readout.model.config.moe:
        raise InputError("moe_prism needs a mixture-of-experts layer (Gemma 4 26B-A4B); this model has none")
    dense = neuron_terms(readout, layer).sum(axis=0, keepdims=True)
    experts, values = expert_terms(readout, layer)
    labels = [f"L{layer}.dense"] + [f"L{layer}E{int(e)}" for e in experts]
    return Split("moe", readout, labels, np.concatenate([dense, values]), _mlp_whole(readout, layer),
                 _term_label(readout, f"L{layer}.mlp"))


def expert_prism(readout, layer, expert) -> Split:
    """Gemma 4 MoE: the term of expert e (one selected at the readout's position) split into its neurons
    (labels L{l}E{e}N{n}); whole = that expert's L{l}E{e} term of moe_prism."""
    if not readout.model.config.moe:
        raise InputError("expert_prism needs a mixture-of-experts layer (Gemma 4 26B-A4B); this model has none")
    experts, values = expert_terms(readout, layer)
    slots = [j for j, e in enumerate(experts) if int(e) == int(expert)]
    if not slots:
        raise InputError(f"expert {expert} is not selected at position {readout.position} of layer {layer} "
                         f"(the router chose {', '.join(map(str, map(int, experts)))})")
    terms = expert_neuron_terms(readout, layer, slots[0])
    labels = [f"L{layer}E{int(expert)}N{n}" for n in range(terms.shape[0])]
    return Split("expert", readout, labels, terms, values[slots[0]], _term_label(readout, f"L{layer}E{int(expert)}"))


def ple_prism(readout, layer) -> Split:
    """Gemma 4: layer l's per-layer-input term split into its token-identity piece (L{l}.ple.token) and its
    piece linear in the embedding (L{l}.ple.embed); whole = u . ple.out_l[p] (readouts.ple_terms)."""
    if not readout.model.config.ple:
        raise InputError("ple_prism needs per-layer embeddings (Gemma 4 E2B / E4B); this model has none")
    values = ple_terms(readout, layer)
    whole = readout.value_of(readout.run.record[f"blocks.{layer}.ple.out"][readout.position]) * \
        layer_scale(readout, layer)
    return Split("ple", readout, [f"L{layer}.ple.token", f"L{layer}.ple.embed"], values, whole,
                 _term_label(readout, f"L{layer}.ple"))


def _term_label(readout, label):
    return "/".join(readout.path + (label,))


def head_split(split: Split) -> Split:
    """An attention split summed over sources: one part per head (L{l}H{h})."""
    heads = split.extras["heads"]
    return Split("attention-heads", split.readout, list(heads["labels"]), heads["values"], split.whole,
                 split.whole_label)


def apply_map(readout, vectors, labels, *, own_scale=False) -> Split:
    """Apply a (pulled-back) readout's frozen linear map to other residual vectors, e.g. scaled embeddings.

    Math:   values[m, z] = u_z . y_m                  (the map exactly as frozen at the source token)
            own_scale:    u_z . y_m * s_frozen / s(y_m)   (each input normalised by its own RMS instead of
                          the norm scale frozen into u, e.g. s_ln1 at the source token)
    Not a decomposition: `whole` is the map applied to the actual residual at the source (the parent's term).
    """
    values = readout.value_of(vectors)
    if own_scale:
        eps = np.asarray(readout.model.config.rms_norm_eps, dtype=vectors.dtype)
        values = values * (readout.scale / np.sqrt(np.mean(vectors * vectors, axis=-1) + eps))[:, None]
    return Split("map", readout, list(labels), values, readout.whole, readout.whole_label, decomposes=False)


def scaled_embeddings(model, tokens) -> np.ndarray:
    """E[t] * sqrt(D) (the normalizer of the run), the vectors the first layer reads: [M, D].

    tokens: Tokens, or anything resolve_token takes (pieces like "▁France", one-token text, ids "#7127")."""
    tokens = [t if isinstance(t, Token) else resolve_token(model, t) for t in tokens]
    return model.params.embed_rows([t.id for t in tokens]) * model.normalizer


def unembedding_pca(model, tokens) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA of the tokens' unembedding rows E[t] (centred): coordinates [M, 2] and explained variance [2]."""
    if len(tokens) < 2:
        raise InputError(f"a 2-D PCA needs at least 2 tokens, got {len(tokens)}")
    X = model.params.embed_rows([t.id for t in tokens]).astype(np.float64)
    X = X - X.mean(axis=0)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    var = S ** 2 / max((S ** 2).sum(), np.finfo(np.float64).tiny)
    return X @ Vt[:2].T, var[:2]
