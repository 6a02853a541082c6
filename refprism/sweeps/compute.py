"""One chunk of prompts: a packed pass, each prompt's readout split at every level asked for (`Levels`), and with
--validate the interventions of each prompt (`Validation`). Pure computation: the Ray backend runs it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refprism import prisms
from refprism.errors import InputError
from refprism.gemma.record import Selection
from refprism.sweeps.rows import OTHER, Item, _is_int

# ------------------------------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class Levels:
    """What each prompt gets: `residual`, `heads`, `head-source`, `neurons:K` (module docstring)."""

    residual: bool = False
    heads: bool = False
    head_source: bool = False
    neurons: int = 0  # K of neurons:K; 0: not asked for

    @classmethod
    def parse(cls, text: str) -> "Levels":
        found = {}
        for part in str(text).split(","):
            name, colon, k = part.strip().partition(":")
            if name == "neurons" and k.isascii() and k.isdigit() and int(k) > 0:
                found["neurons"] = int(k)
            elif name in ("residual", "heads", "head-source") and not colon:
                found[name.replace("-", "_")] = True
            else:
                raise InputError(f"--levels: {part.strip()!r} is not a level (use residual, heads, head-source, "
                                 "neurons:K with K >= 1, comma separated)")
        return cls(**found)

    def __str__(self) -> str:
        names = [n for n, on in (("residual", self.residual), ("heads", self.heads),
                                 ("head-source", self.head_source)) if on]
        return ",".join(names + ([f"neurons:{self.neurons}"] if self.neurons else []))

    @property
    def attention(self) -> bool:
        return self.heads or self.head_source


@dataclass(frozen=True)
class Validation:
    """--validate LEVEL [--ablate MODE] [--validate-top N] [--validate-methods M,M [--validate-steps K]]:
    refprism.interventions.validate per prompt, with the attribution methods beside the prism (methods=)."""

    level: str
    ablate: object = None
    top: int | None = None
    methods: tuple = ()
    steps: int | None = None

    def to_json(self) -> dict:
        return {"level": self.level, "ablate": self.ablate, "top": self.top, "methods": list(self.methods),
                "steps": self.steps}

    def check(self, model) -> None:
        """The level and the ablation as refprism.interventions reads them (one-line errors naming --validate)."""
        from refprism import interventions

        try:
            interventions.level_groups(model.config, self.level, 0)
        except InputError as e:
            raise InputError(str(e).replace("--level", "--validate", 1)) from None
        if self.ablate is not None and self.ablate not in interventions.ABLATIONS:
            raise InputError(f"--ablate {self.ablate!r} is not one of zero, mean, resample")
        if self.top is not None and (not _is_int(self.top) or self.top < 1):
            raise InputError(f"--validate-top must be an integer >= 1, got {self.top!r}")
        if self.steps is not None and not self.methods:
            raise InputError("--validate-steps goes with --validate-methods")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise InputError(f"--validate-steps must be an integer >= 1, got {self.steps!r}")
        for m in self.methods:
            if m not in interventions.METHODS:
                raise InputError(f"--validate-methods: {m!r} is not one of {', '.join(interventions.METHODS)}")
            if m in interventions.QK_METHODS and (self.ablate != "resample" or self.level != "heads"):
                raise InputError(f"--validate-methods {m} needs --validate heads and --ablate resample")
            if m == "gradxact" and self.ablate == "resample":
                raise InputError("--validate-methods gradxact linearises zero or mean ablation; with resample use atp")


# ------------------------------------------------------------------------------------------------- one prompt


@dataclass
class Terms:
    """One split of one prompt as numbers: parts values [C, Z] of whole [Z], residual = whole - sum(parts)
    (float64) beside its tolerance. The keys of Split.to_json, without the model (what a worker sends back)."""

    prism: str
    whole_label: str
    whole: np.ndarray  # [Z]
    labels: list[str]
    values: np.ndarray  # [C, Z]
    residual: np.ndarray  # [Z] float64
    tolerance: np.ndarray  # [Z] float64

    @classmethod
    def of(cls, split, prism=None) -> "Terms":
        return cls(prism or split.prism, split.whole_label, split.whole, list(split.labels), split.values,
                   split.residual, split.tolerance)

    @classmethod
    def regrouped(cls, prism, split, labels, rows) -> "Terms":
        """Sums of groups of a finer split's parts (in float64): rows[g] lists the parts of group g. The residual
        is recomputed against the groups shown; the tolerance is the finer split's."""
        values = np.stack([split.values[r].astype(np.float64).sum(axis=0) for r in rows])
        residual = split.whole.astype(np.float64) - values.sum(axis=0)
        return cls(prism, split.whole_label, split.whole, list(labels), values, residual, split.tolerance)

    @property
    def exact(self) -> bool:
        return bool(np.all(np.abs(self.residual) <= self.tolerance))

    def to_json(self) -> dict:
        return {"prism": self.prism, "whole": {"label": self.whole_label, "values": _floats(self.whole)},
                "components": [{"label": l, "values": _floats(v)} for l, v in zip(self.labels, self.values)],
                "residual": _floats(self.residual), "tolerance": _floats(self.tolerance), "exact": self.exact}


@dataclass
class PromptResult:
    """What a chunk's computation returns for one prompt."""

    index: int
    terms: list[Terms]
    neurons: np.ndarray | None = None  # [L, F, Z]: every neuron's term (neurons:K), for the summary's union
    validate: dict | None = None


def compute_chunk(model, items, levels: Levels, *, validate: Validation | None = None) -> list[PromptResult]:
    """The prisms of a chunk of prompts: packed passes recording only what the levels read, then each prompt's
    splits. Prompts are grouped by their read position counted from the end (a packed pass records the same
    relative positions for all its prompts); results come back in the items' order.

    Per prompt: prisms.logits_readout at its position; residual_prism; attention_prism of every layer (heads:
    prisms.head_split; head-source: every term, and regrouped by role); neurons: every neuron's term
    (`neuron_terms_many`, prisms.neuron_terms for the whole chunk at once), the top K kept per layer.
    """
    L = model.config.n_layers
    done = {}
    for offset in sorted({it.position - len(it.tokens) for it in items}):
        group = [it for it in items if it.position - len(it.tokens) == offset]
        # needs() keeps the logits at the read position only; one Selection object for the whole chunk, so its
        # per-(name, length) lookups are made once, not once per packing trial
        record = Selection(prisms.needs(model, position=offset, residual=levels.residual,
                                        attention=range(L) if levels.attention else (),
                                        mlp=range(L) if levels.neurons else ()))
        runs = model.run_many([list(it.tokens) for it in group], record=record)
        readouts = [prisms.logits_readout(model, run, it.targets, position=it.position) for it, run in zip(group, runs)]
        neurons = neuron_terms_many(readouts) if levels.neurons else [None] * len(group)
        for it, readout, terms in zip(group, readouts, neurons):
            checked = None if validate is None else _validate_one(model, it, validate)
            done[it.index] = PromptResult(it.index, _prompt_terms(readout, it, levels, terms), terms, checked)
    return [done[it.index] for it in items]


def _prompt_terms(readout, item: Item, levels: Levels, neurons) -> list[Terms]:
    L = readout.model.config.n_layers
    out = {"residual": [], "heads": [], "head-source": [], "head-role": [], "neurons": []}
    if levels.residual:
        out["residual"].append(Terms.of(prisms.residual_prism(readout)))
    for l in range(L) if levels.attention else ():
        att = prisms.attention_prism(readout, l)
        if levels.heads:
            out["heads"].append(Terms.of(prisms.head_split(att), prism="heads"))
        if levels.head_source:
            out["head-source"].append(Terms.of(att, prism="head-source"))
            out["head-role"].append(by_role(att, item.roles))
    for l in range(L) if levels.neurons else ():
        out["neurons"].append(top_neurons(readout, l, neurons[l], levels.neurons))
    return [t for kind in out.values() for t in kind]


def by_role(att, roles) -> Terms:
    """An attention split [N * S parts, head-major] regrouped by role: L{l}H{h}.{role} (the term at the role's
    source) and L{l}H{h}.other (the sum over the sources without a role), head by head."""
    S = att.readout.position + 1
    N = len(att.labels) // S
    layer = att.whole_label.split("/")[-1].split(".")[0]  # "L3" of "L3.attn"
    named = [s for _, s in roles]
    labels, rows = [], []
    for h in range(N):
        for name, s in roles:
            labels.append(f"{layer}H{h}.{name}")
            rows.append([h * S + s])
        labels.append(f"{layer}H{h}.{OTHER}")
        rows.append([h * S + s for s in range(S) if s not in named])
    return Terms.regrouped("head-role", att, labels, rows)


def neuron_terms_many(readouts) -> list[np.ndarray]:
    """prisms.neuron_terms of every layer for many readouts at once: each layer's W_down is read once per chunk,
    not once per prompt (at gemma-2b's shape, 2.4 GB of weights a pass).

    Math:   term_i[n, z] = act_i[p_i, n] (W_down u_iz)[n]           (u through the post-norm on Gemma 2/3)
    Shapes: P readouts of Z rows -> P arrays [L, F, Z]
    """
    model = readouts[0].model
    cfg, dtype = model.config, model.dtype
    P, Z = len(readouts), readouts[0].u.shape[0]
    out = np.empty((P, cfg.n_layers, cfg.d_mlp, Z), dtype=dtype)
    for l in range(cfg.n_layers):
        u = np.concatenate([prisms.through_post_norm(r, l, "mlp") for r in readouts])  # [P*Z, D]
        proj = u @ model.params.get(l, "W_down").T  # [P*Z, F]: W_down u for every readout row
        for i, r in enumerate(readouts):
            act = r.run.record[f"blocks.{l}.mlp.act"][r.position]  # [F]
            out[i, l] = act[:, None] * proj[i * Z:(i + 1) * Z].T
    return list(out)


def top_neurons(readout, layer, terms, k) -> Terms:
    """Layer l's neurons split [F, Z] kept as its k parts of largest max |value| over columns (largest first), and
    L{l}N.rest, the sum of the others (float64). Whole, residual and tolerance are those of all F neurons."""
    whole = readout.value_of(readout.run.record[f"blocks.{layer}.mlp.out"][readout.position])  # as mlp_prism
    t64 = terms.astype(np.float64)
    order = np.argsort(-np.abs(terms).max(axis=1), kind="stable")
    top, others = order[:k], order[k:]
    values = np.concatenate([t64[top], t64[others].sum(axis=0, keepdims=True)])
    atol, rtol = prisms.TOLERANCE[np.dtype(terms.dtype)]
    tolerance = atol + rtol * np.abs(t64).sum(axis=0)
    residual = whole.astype(np.float64) - values.sum(axis=0)
    labels = [f"L{layer}N{n}" for n in top] + [f"L{layer}N.rest"]
    return Terms("neurons", f"L{layer}.mlp", whole, labels, values, residual, tolerance)


def _validate_one(model, item: Item, v: Validation):
    """refprism.interventions.validate on the prompt up to its read position (causal: the same computation at
    that position), with its targets, foils and (for resample ablation) counterfactual; the result's JSON."""
    from refprism import interventions

    kw = {"level": v.level}
    counterfactual = None
    if v.ablate == "resample":  # only resampling reads it: token ids (prepare), cut where the prompt is
        counterfactual = list(item.counterfactual[:item.position + 1])
    kw.update({k: x for k, x in (("ablate", v.ablate), ("top", v.top), ("counterfactual", counterfactual),
                                 ("steps", v.steps)) if x is not None})
    if v.methods:  # a MethodsValidation: its JSON adds each method's column, agreement and cost
        kw["methods"] = list(v.methods)
    result = interventions.validate(model, list(item.tokens[:item.position + 1]),
                                    targets=[f"#{t.id}" for t in item.targets.targets],
                                    versus=[f"#{t.id}" for t in item.targets.versus], **kw)
    return result.to_json()


def _floats(a) -> list[float]:
    return [float(x) for x in np.asarray(a).ravel()]


