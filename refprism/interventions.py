"""Interventions: patch or ablate any component, and set its frozen prism term beside its causal effect.

A prism term is a *frozen direct* contribution: norm scales, attention patterns and gelu(gate) factors held at
their recorded values. This module measures, for one component replaced by another value, four numbers of one
readout (the logits readout of prisms.logits_readout: targets minus the mean of the foils, pre-cap on Gemma 2):

    prism   = u . (c - c')                         the frozen term of the change (exact, linear; u from prisms.py)
    direct  = f(x) - f(x + d)                      only the norms on the direct path recomputed (the component's
                                                   own post-norm on Gemma 2/3, then the final norm); every later
                                                   component held at its recorded output (no forward pass)
    total   = m(base) - m(patched)                 a re-run with the component replaced (resumed at its layer)
    norm_rescaling = direct - prism                what the recomputed norms did to the term (self-repair by the norm)
    mediated       = total - direct                what later layers did with the change

where c is the component's value in the base run and c' its replacement at the same position, x the final residual
at the readout position, d the change the replacement makes to the residual there, f the readout with the final
norm recomputed, and m the readout of a run. docs/math.md section 3.10 derives each line.

**Sign.** An effect is always "the readout with the component as in the clean prompt minus the readout with it
replaced". Noising (the default) edits the clean run, so effect = m(clean) - m(patched), and under zero ablation
a component that helps the target has a positive effect, the same sign and (frozen) value as its prism term.
Denoising edits the counterfactual run with clean values, so effect = m(patched) - m(counterfactual): the readout
each clean component restores. Every number (prism, direct, total) uses the same sign.

**Components** (the prisms' labels, 0-based): `embed`, `L{l}.attn`, `L{l}.mlp` (a sublayer's output, what the
residual receives), `L{l}H{h}` (the head's z, before W_O), `L{l}H{h}.src{s}` (one head x source term
pattern[h,t,s] v[s] of z, pattern and values of the rest untouched), `L{l}N{n}` (the neuron's activation
gelu(gate) * up). Each is replaced at chosen query positions (default: the readout position).

**Ablations.** zero: c' = 0. mean: the mean of the component over positions 1 .. T-1 of each reference prompt
(or of the prompt itself): position 0 reads only itself and carries Gemma's attention sink, so its activations
are outliers by orders of magnitude and are left out of every mean; for a head x source term, the mean term over
every (query, source) edge of those positions. resample: the component's value in the counterfactual prompt at
the same position (same token count); noising or denoising.

Edits go through the forward pass's one edit hook (forward.forward's edit=), and a re-run resumes at the first
edited layer from the base run's record (resume=): bit for bit a full re-run, at the cost of the layers after it.
Axis letters as in ops.py; C components, Z readout columns, P edited positions, W a component's width (D, H or 1).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from . import ops
from . import prisms as P
from .errors import InputError
from .model import Run, check_text
from .record import everything_but

KINDS = ("embed", "attn", "mlp", "head", "edge", "neuron")
ABLATIONS = ("zero", "mean", "resample")
DIRECTIONS = ("noising", "denoising")
LABEL_FORMS = "embed, L{l}.attn, L{l}.mlp, L{l}H{h}, L{l}H{h}.src{s} or L{l}N{n}"
_LABEL = re.compile(r"(embed)|L(\d+)\.(attn|mlp)|L(\d+)H(\d+)(?:\.src(\d+))?|L(\d+)N(\d+)")


# ------------------------------------------------------------------------------------------------- components


@dataclass(frozen=True, eq=False)
class Group:
    """Components of one kind at one layer, one row each: the unit every computation here is vectorized over.

    kind:   embed | attn | mlp (one component: a residual part) | head | edge (head x source) | neuron
    layer:  -1 for embed
    index:  [C] the head or neuron of each row (0 for embed, attn, mlp)
    source: [C] the source position of each edge (-1 otherwise)
    """

    kind: str
    layer: int
    index: np.ndarray
    source: np.ndarray

    def __len__(self):
        return len(self.index)

    @property
    def labels(self) -> list[str]:
        l = self.layer
        if self.kind == "embed":
            return ["embed"]
        if self.kind in ("attn", "mlp"):
            return [f"L{l}.{self.kind}"]
        if self.kind == "head":
            return [f"L{l}H{h}" for h in self.index]
        if self.kind == "edge":
            return [f"L{l}H{h}.src{s}" for h, s in zip(self.index, self.source)]
        return [f"L{l}N{n}" for n in self.index]

    @property
    def site(self) -> str:
        """The recorded site the edit replaces."""
        b = f"blocks.{self.layer}."
        return {"embed": "embed", "attn": b + "attn.out", "mlp": b + "mlp.out", "head": b + "attn.z",
                "edge": b + "attn.z", "neuron": b + "mlp.act"}[self.kind]

    def take(self, rows) -> Group:
        rows = np.asarray(rows, dtype=int)
        return Group(self.kind, self.layer, self.index[rows], self.source[rows])


def _group(kind, layer=-1, index=(0,), source=None) -> Group:
    index = np.asarray(index, dtype=int)
    source = np.full(len(index), -1) if source is None else np.asarray(source, dtype=int)
    return Group(kind, layer, index, source)


def parse_component(config, label, *, T, source=None) -> Group:
    """A prism label -> a Group of one; an unknown label or an index out of range is a one-line InputError.

    source: a head's source position given apart (the CLI's --source): L{l}H{h} with source s is L{l}H{h}.src{s}.
    """
    if not isinstance(label, str) or not (m := _LABEL.fullmatch(label.strip())):
        raise InputError(f"component {label!r} is not a component label: use {LABEL_FORMS} (0-based)")
    embed, la, kind, lh, h, s, ln, n = m.groups()
    if source is not None:
        if h is None:
            raise InputError(f"--source picks a head's source token: component {label!r} is not a head (L{{l}}H{{h}})")
        if s is not None:
            raise InputError(f"component {label!r} already names its source: drop --source")
        s = source
    if embed:
        return _group("embed")
    layer = int(la or lh or ln)
    if not 0 <= layer < config.n_layers:
        raise InputError(f"layer {layer} is out of range (the model has layers 0 .. {config.n_layers - 1})")
    if kind:
        return _group(kind, layer)
    if n is not None:
        n = int(n)
        if not 0 <= n < config.d_mlp:
            raise InputError(f"neuron {n} is out of range (layer {layer} has neurons 0 .. {config.d_mlp - 1})")
        return _group("neuron", layer, [n])
    h = int(h)
    if not 0 <= h < config.n_heads:
        raise InputError(f"head {h} is out of range (layer {layer} has heads 0 .. {config.n_heads - 1})")
    if s is None:
        return _group("head", layer, [h])
    s = int(s)
    if not 0 <= s < T:
        raise InputError(f"source {s} is out of range: the prompt has positions 0 .. {T - 1}")
    return _group("edge", layer, [h], [s])


LEVELS = "residual, heads, head-source:L, neurons:L or neurons"


def level_groups(config, level: str, position: int) -> list[Group]:
    """The components of a validation level, in label order.

    residual: embed, L{l}.attn, L{l}.mlp;  heads: every L{l}H{h};  head-source:L: L{L}H{h}.src{s} for s <= the
    readout position (head-major, as attention_prism);  neurons:L: L{L}N{n};  neurons: every layer's neurons.
    """
    L, N, F = config.n_layers, config.n_heads, config.d_mlp
    kind, _, arg = str(level).partition(":")
    if kind in ("residual", "heads", "neurons") and not arg:
        if kind == "residual":
            return [_group("embed")] + [_group(k, l) for l in range(L) for k in ("attn", "mlp")]
        if kind == "heads":
            return [_group("head", l, range(N)) for l in range(L)]
        return [_group("neuron", l, range(F)) for l in range(L)]
    if kind in ("head-source", "neurons") and arg:
        if not (arg.isascii() and arg.isdigit()):
            raise InputError(f"--level {level!r}: the layer after ':' is a number, e.g. {kind}:3")
        l = int(arg)
        if not 0 <= l < L:
            raise InputError(f"layer {l} is out of range (the model has layers 0 .. {L - 1})")
        if kind == "neurons":
            return [_group("neuron", l, range(F))]
        h, s = np.divmod(np.arange(N * (position + 1)), position + 1)
        return [_group("edge", l, h, s)]
    raise InputError(f"--level {level!r} is not a level: use {LEVELS}")


# ------------------------------------------------------------------------------------------------- activations


def activation(model, record, g: Group, t: int) -> np.ndarray:
    """The components' values at query position t in a run's record.

    Math:   embed, attn, mlp: the residual part x[t] (embed, attn.out, mlp.out)          -> [1, D]
            head h:           z[t, h]                                                     -> [C, H]
            edge (h, s):      pattern[h, t, s] v[s, kv(h)]  (0 for s > t)                 -> [C, H]
            neuron n:         act[t, n] = gelu(gate[t, n]) up[t, n]                       -> [C, 1]
    """
    b = f"blocks.{g.layer}."
    if g.kind in ("embed", "attn", "mlp"):
        return record[g.site][t][None]
    if g.kind == "head":
        return record[b + "attn.z"][t][g.index]
    if g.kind == "neuron":
        return record[b + "mlp.act"][t][g.index][:, None]
    kv = ops.kv_index(model.config.n_heads, model.config.n_kv_heads)
    weight = record[b + "attn.pattern"][g.index, t, g.source] * (g.source <= t)  # [C] (causal: 0 for s > t)
    return weight[:, None] * record[b + "attn.v"][g.source, kv[g.index]]


def mean_activation(model, runs, g: Group) -> np.ndarray:
    """The components' mean over positions 1 .. T-1 of every run (position 0, the attention sink, left out).

    Math:   heads, neurons, residual parts: mean_{run, t >= 1} activation(t)
            edge of head h: the mean term over every edge (t, s) with t >= 1 that the mask allows,
                            sum_{t >= 1} z[t, h] / #edges   (the terms of query t sum to z[t, h])
    Shapes: -> [C, W]
    """
    total, count = None, 0
    for run in runs:
        rec, T = run.record, len(run.tokens)
        if T < 2:
            continue
        if g.kind == "edge":
            b = f"blocks.{g.layer}."
            part = rec[b + "attn.z"][1:, g.index].sum(axis=0)  # [C, H]
            window = model.config.sliding_window if model.config.is_sliding(g.layer) else None
            n = int(ops.causal_mask(T, window)[1:].sum())
        else:
            part = sum(activation(model, rec, g, t) for t in range(1, T))
            n = T - 1
        total = part if total is None else total + part
        count += n
    if count == 0:
        raise InputError("the mean set is empty: a mean is taken over positions 1 .. T-1 of each reference prompt "
                         "(position 0, the attention sink, is left out), so give a prompt of at least 2 tokens")
    return total / np.asarray(count, dtype=total.dtype)


# ------------------------------------------------------------------------------------------------- the edit


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

    def __call__(self, name, value, record):
        todo = self.ops.get(name)
        if not todo:
            return value
        value = value.copy()
        for g, t, index, source, vals in todo:
            if g.kind in ("embed", "attn", "mlp"):
                value[t] = vals
            elif g.kind == "head":
                value[t, index] = vals
            elif g.kind == "neuron":
                value[t, index] = vals[:, 0]
            else:
                b = f"blocks.{g.layer}."
                kv = ops.kv_index(self.config.n_heads, self.config.n_kv_heads)
                term = record[b + "attn.pattern"][index, t, source][:, None] * record[b + "attn.v"][source, kv[index]]
                np.add.at(value, (t, index), vals - term)  # several edges may end at one (t, h)
        return value


def rerun(model, base: Run, edit: Edit):
    """The base run re-run with the edit, resumed at its first edited layer from the base run's record (bit for bit
    a full re-run: forward.forward's resume); returns its Record, which keeps every site but the logits (a readout
    needs ln_final.out at one position and a few unembedding rows, not the [T, V] product)."""
    resume = None if edit.first_layer is None else (edit.first_layer, base.record)
    return model.run(base.tokens, edit=edit, resume=resume,
                     record=everything_but(model.config, ("logits", "logits_uncapped"))).record


# ------------------------------------------------------------------------------------------------- the setting


@dataclass
class Setting:
    """What every intervention of one prompt shares: the runs, the readout, the ablation, the sign.

    base:    the run that is edited (the clean prompt for noising, the counterfactual for denoising)
    donor:   the run resample values come from (the other one); None for zero and mean
    means:   the runs a mean is taken over (reference prompts, or the prompt itself)
    readout: prisms.logits_readout at `position` of the base run (u, targets, the whole)
    sign:    +1 noising, -1 denoising (effects are always clean-valued minus replaced)
    at:      the query positions where components are replaced
    """

    model: object = field(repr=False)
    clean: Run = field(repr=False)
    base: Run = field(repr=False)
    donor: Run | None = field(repr=False)
    means: list = field(repr=False)
    readout: P.Readout = field(repr=False)
    ablate: str
    direction: str
    at: tuple[int, ...]
    counterfactual: Run | None = field(default=None, repr=False)

    @property
    def sign(self) -> int:
        return 1 if self.direction == "noising" else -1

    @property
    def position(self) -> int:
        return self.readout.position

    def replacement(self, g: Group) -> np.ndarray:
        """c' at each edited position: [P, C, W]."""
        width = activation(self.model, self.base.record, g, self.position).shape
        if self.ablate == "zero":
            return np.zeros((len(self.at),) + width, dtype=self.model.dtype)
        if self.ablate == "mean":
            return np.broadcast_to(mean_activation(self.model, self.means, g), (len(self.at),) + width)
        return np.stack([activation(self.model, self.donor.record, g, t) for t in self.at])

    def describe(self) -> dict:
        model = self.model
        cf = self.counterfactual
        return {"ablate": self.ablate, "direction": self.direction, "at": list(self.at),
                "counterfactual": None if cf is None else _tokens_json(model, cf.tokens),
                "reference": None if self.ablate != "mean" else
                [_tokens_json(model, r.tokens) for r in self.means]}


def _tokens_json(model, ids) -> list[dict]:
    return [{"id": int(i), "piece": model.piece(i)} for i in ids]


def _as_run(model, prompt, what) -> Run:
    """A prompt (text or ids) -> a run with the full record; a given Run is used as it is (it must be full)."""
    if isinstance(prompt, Run):
        if prompt.record.selection is not None:
            raise InputError(f"{what} is a run with a selective record: interventions need the full record")
        return prompt
    if isinstance(prompt, str):
        check_text(prompt, what)
    return model.run(prompt)


def setting(model, prompt, *, targets=None, versus=(), position=-1, at=None, ablate="zero", counterfactual=None,
            reference=None, direction="noising") -> Setting:
    """Run what an intervention needs and check every argument (one-line InputErrors).

    targets: None -> the clean prompt's top token, versus the counterfactual's top token (resample, when it
             differs) or else the clean prompt's second token: one logit difference.
    at:      None (the readout position), "all", an int or a list of positions (negative from the end).
    """
    if ablate not in ABLATIONS:
        raise InputError(f"ablation {ablate!r} is not one of {', '.join(ABLATIONS)}")
    if direction not in DIRECTIONS:
        raise InputError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    if ablate == "resample" and counterfactual is None:
        raise InputError("resample ablation needs a counterfactual prompt (--counterfactual PROMPT2) to take the "
                         "component's value from")
    if ablate != "resample" and counterfactual is not None:
        raise InputError(f"a counterfactual prompt is used only by resample ablation, not by {ablate}: drop it or "
                         "use --ablate resample")
    if direction == "denoising" and ablate != "resample":
        raise InputError("denoising patches clean values into the counterfactual run: it needs --ablate resample "
                         "and --counterfactual")
    if ablate != "mean" and reference is not None:
        raise InputError(f"reference prompts are used only by mean ablation, not by {ablate}: drop them or use "
                         "--ablate mean")
    clean = _as_run(model, prompt, "the prompt")
    cf = None
    if counterfactual is not None:
        cf = _as_run(model, counterfactual, "the counterfactual")
        if len(cf.tokens) != len(clean.tokens):
            raise InputError(f"the counterfactual has {len(cf.tokens)} tokens and the prompt {len(clean.tokens)}: "
                             "resample patching pairs positions, so both need the same token count")
    base = clean if direction == "noising" else cf
    if reference is not None:
        if isinstance(reference, (str, Run)) or not hasattr(reference, "__iter__") or \
                (len(reference) and all(isinstance(i, (int, np.integer)) for i in reference)):
            reference = [reference]  # one prompt (text, a run, or token ids), not a list of them
        means = [_as_run(model, r, f"reference prompt {i}") for i, r in enumerate(reference)]
        if not means:
            raise InputError("the mean set is empty: give at least one reference prompt (or none, for the mean over "
                             "the prompt's own positions)")
    else:
        means = [clean]
    p = P.resolve_position(base, position)
    if targets is None:
        first = int(np.argmax(clean.logits[p]))
        foil = int(np.argmax(cf.logits[p])) if cf is not None else first
        if foil == first:
            foil = int(np.argsort(-clean.logits[p], kind="stable")[1])
        targets, versus = [f"#{first}"], [f"#{foil}"]
    readout = P.logits_readout(model, base, targets, position=p, versus=versus)
    return Setting(model, clean, base, cf if direction == "noising" else clean, means, readout, ablate, direction,
                   _positions(at, len(base.tokens), p), counterfactual=cf)


def _positions(at, T, p) -> tuple[int, ...]:
    if at is None:
        return (p,)
    if isinstance(at, str) and at == "all":
        return tuple(range(T))
    items = [at] if isinstance(at, (int, np.integer)) else list(at)
    if not items or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
        raise InputError(f"edit positions must be 'all', an integer or a list of integers, got {at!r}")
    for t in items:
        if not -T <= t < T:
            raise InputError(f"position {t} is out of range for {T} tokens (use 0 .. {T - 1} or -{T} .. -1)")
    return tuple(sorted({int(t) % T for t in items}))


# ------------------------------------------------------------------------------------------------- the numbers


class Readings:
    """The readout of a run's final norm output, and of final residual vectors with the final norm recomputed.

    Math:   m(run) = coef . (ln_final.out[p] E[ids]^T)           (pre-cap on Gemma 2: the prisms' readout)
            f(x)   = coef . (rms_norm(x; ln_final) E[ids]^T)       (the final norm recomputed for each x)
            Gemma 2 also: the same through the soft-cap, cap * tanh(l / cap) per logit, then coef.
            log-probabilities (when asked): log_softmax over the whole vocabulary (capped on Gemma 2), per target.
    Only the readout's rows of E are read, except for log-probabilities (one [D] x [D, V] product per vector).
    """

    def __init__(self, setting: Setting):
        model = setting.model
        self.model, self.p = model, setting.position
        self.ids, self.coef = setting.readout.targets.coefficients(model.dtype)
        self.E = model.params.embed_rows(self.ids)  # [I, D]
        self.cap = model.config.final_softcap
        self.n_targets = len(setting.readout.targets.targets)

    def of_record(self, record, *, logprob=False):
        """(pre-cap readout [Z], capped readout [Z] or None, log-probs of the targets [n] or None)."""
        h = record["ln_final.out"][self.p]
        return self._read(h[None], logprob)

    def of_residual(self, xs, *, logprob=False):
        """f(x) for final residuals xs [C, D]: (pre-cap [C, Z], capped [C, Z] or None, log-probs [C, n] or None)."""
        y, _ = ops.rms_norm(xs, self.model.params.ln_final, eps=self.model.config.rms_norm_eps)
        return self._read(y, logprob, rows=True)

    def _read(self, h, logprob, rows=False):
        logits = h @ self.E.T  # [C, I]
        capped = None if self.cap is None else ops.softcap(logits, self.cap) @ self.coef.T
        lp = None
        if logprob:
            full = self.model.params.unembed(h)  # [C, V]
            if self.cap is not None:
                full = ops.softcap(full, self.cap)
            lp = np.stack([_log_softmax(row)[self.ids[: self.n_targets]] for row in full])
        out = (logits @ self.coef.T, capped, lp)
        return out if rows else tuple(None if v is None else v[0] for v in out)


def _log_softmax(row):
    z = np.asarray(row, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def deltas(setting: Setting, g: Group) -> tuple[np.ndarray, np.ndarray]:
    """(c - c' at the readout position [C, W], c' at every edited position [P, C, W]); c - c' is 0 when the
    readout position is not edited (or an edge's source is after it)."""
    repl = setting.replacement(g)
    p = setting.position
    if p not in setting.at:
        return np.zeros_like(repl[0]), repl
    delta = activation(setting.model, setting.base.record, g, p) - repl[setting.at.index(p)]
    if g.kind == "edge":
        delta = delta * (g.source <= p)[:, None]
    return delta, repl


def prism_terms(setting: Setting, g: Group, delta) -> np.ndarray:
    """The frozen term of each component's change, through the prisms' own readout.

    Math:   residual parts: u . (c - c')
            head / edge:    u_pre . ((c - c') W_O[h])           u_pre = prisms.through_post_norm(u)  (Gemma 2/3)
            neuron:         (c - c') (W_down[n] . u_pre)
            times the sign (+1 noising, -1 denoising)
    Shapes: delta [C, W] -> [C, Z]
    """
    r, params = setting.readout, setting.model.params
    if g.kind in ("embed", "attn", "mlp"):
        terms = delta @ r.u.T
    elif g.kind == "neuron":
        u = P.through_post_norm(r, g.layer, "mlp")
        terms = delta * (params.get(g.layer, "W_down")[g.index] @ u.T)
    else:
        u = P.through_post_norm(r, g.layer, "attn")
        rz = np.einsum("zd,nhd->nhz", u, params.get(g.layer, "W_O"), optimize=True)  # W_O^h u per head: [N, H, Z]
        terms = np.einsum("ch,chz->cz", delta, rz[g.index])
    return setting.sign * terms


def residual_changes(setting: Setting, g: Group, delta, rows=slice(None)) -> np.ndarray:
    """d: the change each replacement makes to the residual stream at the readout position, with the component's
    own post-norm recomputed (Gemma 2/3), every other component as recorded.

    Math:   residual parts:  d = c' - c
            head / edge:     o' = o + (c' - c) W_O[h];   d = rms_norm(o'; ln1_post) - rms_norm(o; ln1_post)
            neuron:          a' = down + (c' - c) W_down[n];   d = rms_norm(a'; ln2_post) - rms_norm(down; ln2_post)
            (Gemma 1 has no post-norms: d = (c' - c) W_O[h], or (c' - c) W_down[n])
    Shapes: delta [C, W] -> d [C, D]
    """
    model, rec, p = setting.model, setting.base.record, setting.position
    cfg, params = model.config, model.params
    minus = -delta[rows]
    if g.kind in ("embed", "attn", "mlp"):
        return minus
    b = f"blocks.{g.layer}."
    if g.kind == "neuron":
        change = minus * params.get(g.layer, "W_down")[g.index[rows]]  # [C, D]
        pre, post = "mlp.down", "ln2_post"
    else:
        W_O, heads = params.get(g.layer, "W_O"), g.index[rows]
        change = np.empty((len(heads), cfg.d_model), dtype=minus.dtype)
        for h in np.unique(heads):  # (c' - c) W_O[h], one product per head (no [C, H, D] gather of W_O)
            change[heads == h] = minus[heads == h] @ W_O[h]
        pre, post = "attn.o_proj", "ln1_post"
    if not cfg.post_norms:
        return change
    before = rec[b + pre][p]  # [D], the sublayer's output before its post-norm
    w, eps = params.get(g.layer, post), cfg.rms_norm_eps
    return ops.rms_norm(before[None] + change, w, eps=eps)[0] - ops.rms_norm(before[None], w, eps=eps)[0]


CHUNK = 2048  # components per [C, D] block when computing direct effects (16,384 neurons x D: 2 GB at once)


def direct_effects(setting: Setting, readings: Readings, g: Group, delta):
    """direct = f(x) - f(x + d) for each component (times the sign), from recorded arrays only; and the same with
    the final norm still frozen, which isolates what the component's own post-norm did.

    Math:   direct     = f(x) - f(x + d)            (the post-norm in d, and the final norm, recomputed)
            post_only  = -u . d                     (the post-norm recomputed, the final norm frozen; Gemma 2/3
                                                     heads, edges, neurons: the others have no post-norm of their
                                                     own on the direct path, and post_only is the prism term)
    Returns (direct [C, Z], post_only [C, Z] or None, capped direct [C, Z] or None without a final soft-cap).
    """
    cfg = setting.model.config
    x = setting.base.record[P.site_name(2 * cfg.n_layers, cfg.n_layers)][setting.position]
    own_norm = cfg.post_norms and g.kind in ("head", "edge", "neuron")
    f0, c0, _ = readings.of_residual(x[None])
    out, post, capped = [], [], []
    for a in range(0, len(g), CHUNK):
        d = residual_changes(setting, g, delta, slice(a, a + CHUNK))
        f1, c1, _ = readings.of_residual(x[None] + d)
        out.append(f0 - f1)
        post.append(-(d @ setting.readout.u.T))
        capped.append(None if c0 is None else c0 - c1)
    sign = setting.sign
    return (sign * np.concatenate(out), sign * np.concatenate(post) if own_norm else None,
            None if c0 is None else sign * np.concatenate(capped))


def total_effect(setting: Setting, readings: Readings, changes, base_reading, *, logprob=False):
    """One re-run with the changes (resumed at the first edited layer): (total [Z], capped total [Z] or None,
    log-prob change of each target [n] or None, the patched run's readings)."""
    record = rerun(setting.model, setting.base, Edit(setting.model.config, changes))
    m, c, lp = readings.of_record(record, logprob=logprob)
    m0, c0, lp0 = base_reading
    s = setting.sign
    return (s * (m0 - m), None if c is None else s * (c0 - c), None if lp is None else s * (lp0 - lp),
            (m, c, lp))


# ------------------------------------------------------------------------------------------------- patch


class _Split:
    """The parts of a total effect that follow from the measured ones (Patch and Validation share them):
    norm_rescaling = direct - prism (= post_norm_rescaling + final_norm_rescaling), mediated = total - direct."""

    @property
    def norm_rescaling(self):
        return self.direct - self.prism

    @property
    def final_norm_rescaling(self):
        return self.norm_rescaling - self.post_norm_rescaling

    @property
    def mediated(self):
        return self.total - self.direct

    @property
    def columns(self):
        return self.setting.readout.targets.labels


@dataclass
class Patch(_Split):
    """One component, replaced: its prism term, direct and total effects, and the gap between them explained.

    Every number is "readout with the component clean minus readout with it replaced" (see the module docstring);
    values are per readout column [Z]. norm_rescaling = direct - prism = post_norm_rescaling (the component's own
    Gemma 2/3 post-norm; 0 where it has none) + final_norm_rescaling; mediated = total - direct.
    """

    setting: Setting = field(repr=False)
    component: str
    prism: np.ndarray
    direct: np.ndarray
    total: np.ndarray
    post_norm_rescaling: np.ndarray  # post_only - prism (direct_effects), 0 without an own post-norm
    base_value: np.ndarray  # m(base) [Z]
    patched_value: np.ndarray  # m(patched) [Z]
    capped: dict | None = None  # Gemma 2: {"direct", "total", "base", "patched"} through the final soft-cap
    logprob: dict = field(default_factory=dict)  # {"base", "patched", "direct", "total"} per target

    def to_json(self) -> dict:
        out = _header(self.setting, "patch")
        out.update({
            "component": self.component,
            "base": _floats(self.base_value), "patched": _floats(self.patched_value),
            "prism": _floats(self.prism), "direct": _floats(self.direct), "total": _floats(self.total),
            "norm_rescaling": _floats(self.norm_rescaling), "mediated": _floats(self.mediated),
            "post_norm_rescaling": _floats(self.post_norm_rescaling),
            "final_norm_rescaling": _floats(self.final_norm_rescaling),
            "softcapped": None if self.capped is None else {k: _floats(v) for k, v in self.capped.items()},
            "logprob": {"targets": [t.piece for t in self.setting.readout.targets.targets],
                        **{k: _floats(v) for k, v in self.logprob.items()}},
        })
        return out

    def table(self) -> str:
        cols = self.columns
        width = max(12, *(len(c) + 2 for c in cols))
        name_w = 38
        line = lambda label, vals: f"{label:<{name_w}}" + "".join(f"{v:>{width}.4f}" for v in vals)  # noqa: E731
        head = " " * name_w + "".join(f"{c:>{width}}" for c in cols)
        rule = "-" * len(head)
        base, patched = ("clean", "patched") if self.setting.direction == "noising" else ("counterfactual", "patched")
        out = [head, line(f"readout, {base} run", self.base_value), line(f"readout, {patched} run",
                                                                           self.patched_value), rule,
               line("prism (frozen term)", self.prism), line("direct (post/final norms recomputed)", self.direct),
               line("total (full re-run)", self.total), rule,
               line("norm rescaling = direct - prism", self.norm_rescaling),
               line("  of which the post-norm", self.post_norm_rescaling),
               line("  of which the final norm", self.final_norm_rescaling),
               line("mediated = total - direct", self.mediated)]
        if self.capped is not None:
            out += [rule, line("soft-capped readout: direct", self.capped["direct"]),
                    line("soft-capped readout: total", self.capped["total"])]
        names = [t.piece for t in self.setting.readout.targets.targets]
        out += ["", "log-probability of each target: base, patched, direct effect, total effect"]
        for i, name in enumerate(names):
            lp = self.logprob
            out.append(f"  {name:<20} {lp['base'][i]:>10.4f} {lp['patched'][i]:>10.4f} {lp['direct'][i]:>10.4f} "
                       f"{lp['total'][i]:>10.4f}")
        return "\n".join(out)


def patch(model, prompt, component, *, targets=None, versus=(), position=-1, at=None, ablate="zero",
          counterfactual=None, reference=None, direction="noising", source=None) -> Patch:
    """Replace one component and measure its prism term, direct and total effects on the readout.

    model:     a loaded refprism Model
    prompt:    text, token ids, or a Run with the full record (the clean prompt)
    component: a prism label: embed, L{l}.attn, L{l}.mlp, L{l}H{h}, L{l}H{h}.src{s}, L{l}N{n}
    targets, versus: the readout's columns (prisms.logits_readout); None: top token minus the runner-up (or
               minus the counterfactual's top token)
    position:  the readout position (default: last);  at: where the component is replaced (default: position)
    ablate:    "zero", "mean" (over `reference` prompts, or the prompt's own positions 1 .. T-1) or "resample"
               (from `counterfactual`, the same token count)
    direction: "noising" (edit the clean run) or "denoising" (edit the counterfactual run with clean values)
    Every effect = readout with the component clean - readout with it replaced (so the sign does not depend on
    the direction); see the module docstring.
    """
    s = setting(model, prompt, targets=targets, versus=versus, position=position, at=at, ablate=ablate,
                counterfactual=counterfactual, reference=reference, direction=direction)
    g = parse_component(model.config, component, T=len(s.base.tokens), source=source)
    if g.kind == "edge" and g.source[0] > max(s.at):
        raise InputError(f"source {g.source[0]} is out of range: it must be 0 .. {max(s.at)} (a head at position "
                         f"{max(s.at)} reads no later token)")
    readings = Readings(s)
    delta, repl = deltas(s, g)
    prism = prism_terms(s, g, delta)[0]
    direct, post_only, capped_direct = direct_effects(s, readings, g, delta)
    base_reading = readings.of_record(s.base.record, logprob=True)
    total, capped_total, lp_total, (m, c, lp) = total_effect(s, readings, [(g, s.at, repl)], base_reading,
                                                             logprob=True)
    x = s.base.record[P.site_name(2 * model.config.n_layers, model.config.n_layers)][s.position]
    lp_x = readings.of_residual(np.stack([x, x + residual_changes(s, g, delta)[0]]), logprob=True)[2]
    capped = None
    if capped_direct is not None:
        capped = {"base": base_reading[1], "patched": c, "direct": capped_direct[0], "total": capped_total}
    post = np.zeros_like(prism) if post_only is None else post_only[0] - prism
    return Patch(s, g.labels[0], prism, direct[0], total, post, base_reading[0], m, capped,
                 {"base": base_reading[2], "patched": lp, "direct": s.sign * (lp_x[0] - lp_x[1]), "total": lp_total})


# ------------------------------------------------------------------------------------------------- agreement


def ranks(a) -> np.ndarray:
    """Ranks 1 .. n, ties given their average rank (as Spearman's rho with ties needs)."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    r = np.empty(len(a))
    start = 0
    for i in range(1, len(a) + 1):
        if i == len(a) or sorted_a[i] != sorted_a[start]:
            r[order[start:i]] = (start + 1 + i) / 2  # the mean of ranks start+1 .. i
            start = i
    return r


def spearman(a, b) -> float | None:
    """Spearman's rho: the Pearson correlation of the ranks (ties averaged); None when a side is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def kendall(a, b) -> float | None:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b)) over all pairs (O(n^2),
    in blocks of rows); None when a side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    s = ties_a = ties_b = 0
    for i in range(0, n, 512):
        da = np.sign(a[i:i + 512, None] - a[None, :])  # [block, n]
        db = np.sign(b[i:i + 512, None] - b[None, :])
        upper = np.arange(i, min(i + 512, n))[:, None] < np.arange(n)[None, :]  # each pair once
        s += int((da * db)[upper].sum())
        ties_a += int((da == 0)[upper].sum())
        ties_b += int((db == 0)[upper].sum())
    n0 = n * (n - 1) // 2
    den = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return None if den == 0 else s / den


def top_set(values, k) -> set[int]:
    """The indices of the k largest |values|, with every index tied with the k-th included."""
    mag = np.abs(np.asarray(values, dtype=np.float64))
    if k >= len(mag):
        return set(range(len(mag)))
    kth = np.sort(mag)[::-1][k - 1]
    return set(np.flatnonzero(mag >= kth).tolist())


def reruns_to_top_k(prism, total, k) -> int:
    """The AtP* cost: verifying components in the order of |prism| (largest first), how many re-runs until every
    one of the true top-k by |total| has been run (ties in |total| broken by index, so exactly k are sought)."""
    order = np.argsort(-np.abs(np.asarray(prism, dtype=np.float64)), kind="stable")
    true = np.argsort(-np.abs(np.asarray(total, dtype=np.float64)), kind="stable")[:k]
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(1, len(order) + 1)
    return int(rank[true].max())


def binomial_upper(x: int, m: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a proportion after x successes in m draws.

    Math:   the p with P(X <= x; m, p) = 1 - confidence (found by bisection; x = 0 gives 1 - (1 - confidence)^(1/m))
    """
    if m <= 0:
        return 1.0
    if x >= m:
        return 1.0
    alpha = 1 - confidence

    def cdf(p):  # P(X <= x) for X ~ Binomial(m, p), summed in log space
        logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * math.log(p)
                + (m - i) * math.log1p(-p) for i in range(x + 1)]
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    lo, hi = x / m, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid <= 0 or cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def agreement(prism, total, k) -> dict:
    """How far the prism ranks components as their total effects do (one readout column).

    spearman, kendall:  rank correlations of |prism| vs |total|
    sign_agreement:     the fraction of components whose prism and total have the same sign (0 matches only 0)
    top_k_precision:    |P & T| / |P|,  top_k_recall: |P & T| / |T|   (P, T: the top-k by |prism| and by |total|,
                        each with its ties at the k-th value, so the two differ only when there are ties)
    reruns_to_true_top_k: re-runs needed to find the true top-k when verifying in prism order (AtP*)
    """
    prism, total = np.asarray(prism, dtype=np.float64), np.asarray(total, dtype=np.float64)
    k = int(min(k, len(prism)))
    Pk, Tk = top_set(prism, k), top_set(total, k)
    both = len(Pk & Tk)
    return {"n": int(len(prism)), "k": k,
            "spearman": spearman(np.abs(prism), np.abs(total)), "kendall": kendall(np.abs(prism), np.abs(total)),
            "sign_agreement": float(np.mean(np.sign(prism) == np.sign(total))),
            "top_k_precision": both / len(Pk), "top_k_recall": both / len(Tk),
            "reruns_to_true_top_k": reruns_to_top_k(prism, total, k)}


# ------------------------------------------------------------------------------------------------- validate


@dataclass
class Validation(_Split):
    """A validation level: every component's prism, direct and total (the totals of the verified ones), the
    agreement of |prism| with |total|, and the circuit-faithfulness curve."""

    setting: Setting = field(repr=False)
    level: str
    labels: list[str]  # every component of the level
    prism: np.ndarray  # [C, Z]
    direct: np.ndarray  # [C, Z]
    total: np.ndarray  # [C, Z], NaN where not verified
    post_norm_rescaling: np.ndarray  # [C, Z], as Patch's
    verified: np.ndarray  # [C] bool
    column: int
    agreement: dict
    sample_bound: dict | None
    faithfulness: dict | None
    capped: dict | None = None  # Gemma 2: {"direct": [C, Z], "total": [C, Z]}
    logprob_total: np.ndarray | None = None  # [C, n targets], NaN where not verified (with logprob=True)
    timing: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = _header(self.setting, "validate")
        rows = np.flatnonzero(self.verified) if not self.verified.all() else np.arange(len(self.labels))
        components = []
        for i in rows:
            c = {"label": self.labels[i], "prism": _floats(self.prism[i]), "direct": _floats(self.direct[i]),
                 "total": _floats(self.total[i]), "norm_rescaling": _floats(self.norm_rescaling[i]),
                 "mediated": _floats(self.mediated[i]), "post_norm_rescaling": _floats(self.post_norm_rescaling[i]),
                 "final_norm_rescaling": _floats(self.final_norm_rescaling[i]), "verified": bool(self.verified[i])}
            if self.logprob_total is not None:
                c["logprob_total"] = _floats(self.logprob_total[i])
            if self.capped is not None:
                c["softcapped"] = {"direct": _floats(self.capped["direct"][i]),
                                   "total": _floats(self.capped["total"][i])}
            components.append(c)
        out.update({"level": self.level, "n_components": len(self.labels), "n_verified": int(self.verified.sum()),
                    "logprob_targets": None if self.logprob_total is None else
                    [t.piece for t in self.setting.readout.targets.targets],
                    "components": components,
                    "agreement": dict(self.agreement, column=self.column, column_label=self.columns[self.column]),
                    "sample_bound": self.sample_bound, "faithfulness": self.faithfulness, "timing": self.timing})
        return out

    def table(self, top=20) -> str:
        z, col = self.column, self.columns[self.column]
        a = self.agreement
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        out = [f"{self.level}: {len(self.labels)} components, {int(self.verified.sum())} re-run; readout column {col}",
               f"agreement of |prism| with |total| over the re-run components (n = {a['n']}, k = {a['k']}):",
               f"  Spearman {fmt(a['spearman'])}   Kendall {fmt(a['kendall'])}   sign agreement "
               f"{a['sign_agreement']:.3f}   top-{a['k']} precision {a['top_k_precision']:.3f}   recall "
               f"{a['top_k_recall']:.3f}"]
        if a.get("reruns_to_true_top_k") is not None:
            out.append(f"  re-runs to find the true top-{a['k']} in prism order: {a['reruns_to_true_top_k']} "
                       f"of {a['n']}")
        if self.sample_bound is not None:
            b = self.sample_bound
            out.append(f"  outside the prism's top-{b['k']}: {b['exceeding']} of {b['sample']} sampled exceed the "
                       f"k-th total |{b['threshold']:.4g}|; 95% upper bound on that fraction {b['upper_bound']:.4f} "
                       f"(about {b['upper_bound_count']:.0f} of {b['outside']})")
        order = [i for i in np.argsort(-np.abs(self.prism[:, z]), kind="stable") if self.verified[i]][:top]
        out.append("")
        out.append("(direct = prism + post-norm + final norm rescaling; total = direct + mediated)")
        out.append(f"{'component':<16}{'prism':>10}{'direct':>10}{'total':>10}{'post-norm':>11}{'final norm':>11}"
                   f"{'mediated':>10}")
        for i in order:
            out.append(f"{self.labels[i]:<16}{self.prism[i, z]:>10.4f}{self.direct[i, z]:>10.4f}"
                       f"{self.total[i, z]:>10.4f}{self.post_norm_rescaling[i, z]:>11.4f}"
                       f"{self.final_norm_rescaling[i, z]:>11.4f}{self.mediated[i, z]:>10.4f}")
        if self.faithfulness is not None:
            f = self.faithfulness
            pts = "  ".join(f"{k}:{v:.2f}" for k, v in zip(f["k"], f["recovered"]))
            out += ["", f"faithfulness (keep the top k by |prism|, {f['ablate']}-ablate the rest; fraction of the "
                        f"readout recovered): {pts}",
                    f"  smallest k recovering 80%: {f['k80']}   90%: {f['k90']}"]
        return "\n".join(out)


def validate(model, prompt, *, level="heads", targets=None, versus=(), position=-1, at=None, ablate="zero",
             counterfactual=None, reference=None, direction="noising", top=10, budget=256, seed=0, column=0,
             faithfulness=True, logprob=False) -> Validation:
    """Every component of a level: prism beside direct and total effect, their agreement, circuit faithfulness.

    level:  residual | heads | head-source:L | neurons:L | neurons (see level_groups)
    top:    k of the top-k metrics (and of the verified top when the level is sampled)
    budget: the most re-runs for totals: a level of at most `budget` components is re-run whole; a larger one
            re-runs the prism's top-k and a uniform random sample (seed) of budget - k of the rest, and reports a
            95% upper bound on the fraction of the rest whose |total| exceeds the k-th verified one's
    column: the readout column the agreement and the faithfulness ranking use (0: the first target)
    faithfulness: run the curve: keep the top-k by |prism| (clean), ablate the rest, for k on a grid
    logprob: also each re-run's change in the targets' log-probabilities (one [D] x [D, V] product per re-run)
    Other arguments as for `patch`. Effects are "clean minus replaced" (module docstring).
    """
    if not isinstance(top, (int, np.integer)) or top < 1:
        raise InputError(f"top must be at least 1, got {top!r}")
    if not isinstance(budget, (int, np.integer)) or budget < top:
        raise InputError(f"budget must be at least top ({top}), got {budget!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    s = setting(model, prompt, targets=targets, versus=versus, position=position, at=at, ablate=ablate,
                counterfactual=counterfactual, reference=reference, direction=direction)
    Z = len(s.readout.targets.labels)
    if not 0 <= column < Z:
        raise InputError(f"column {column} is out of range (the readout has columns 0 .. {Z - 1})")
    groups = level_groups(model.config, level, s.position)
    readings = Readings(s)
    base_reading = readings.of_record(s.base.record, logprob=logprob)
    labels, prism, direct, post, capped, repls = [], [], [], [], [], []
    for g in groups:
        delta, repl = deltas(s, g)
        labels += g.labels
        prism.append(prism_terms(s, g, delta))
        d, post_only, c = direct_effects(s, readings, g, delta)
        post.append(np.zeros_like(d) if post_only is None else post_only - prism[-1])
        direct.append(d), capped.append(c), repls.append(repl)
    prism, direct, post = np.concatenate(prism), np.concatenate(direct), np.concatenate(post)
    C = len(labels)
    offsets = np.cumsum([0] + [len(g) for g in groups])  # group gi holds components offsets[gi] .. offsets[gi+1]-1

    k = min(int(top), C)
    order = np.argsort(-np.abs(prism[:, column]), kind="stable")
    if C <= budget:
        chosen = np.arange(C)
    else:
        rest = order[k:]
        sample = np.random.default_rng(seed).choice(rest, size=min(budget - k, len(rest)), replace=False)
        chosen = np.concatenate([order[:k], np.sort(sample)])
    total = np.full((C, Z), np.nan)
    capped_total = np.full((C, Z), np.nan)
    lp_total = np.full((C, readings.n_targets), np.nan) if logprob else None
    started = time.perf_counter()
    for i in chosen:
        gi = int(np.searchsorted(offsets, i, side="right")) - 1
        r = int(i - offsets[gi])
        g = groups[gi]
        t, ct, lp, _ = total_effect(s, readings, [(g.take([r]), s.at, repls[gi][:, [r]])], base_reading,
                                    logprob=logprob)
        total[i] = t
        if lp is not None:
            lp_total[i] = lp
        if ct is not None:
            capped_total[i] = ct
    rerun_s = time.perf_counter() - started
    verified = np.zeros(C, dtype=bool)
    verified[chosen] = True

    agree = agreement(prism[verified, column], total[verified, column], k)
    bound = None
    if not verified.all():
        agree["reruns_to_true_top_k"] = None  # the true top-k is not known without every total
        top_rows = order[:k]
        threshold = float(np.abs(total[top_rows, column]).min())
        sampled = np.setdiff1d(chosen, top_rows)
        exceeding = int((np.abs(total[sampled, column]) > threshold).sum())
        upper = binomial_upper(exceeding, len(sampled))
        bound = {"k": k, "threshold": threshold, "sample": int(len(sampled)), "exceeding": exceeding,
                 "outside": int(C - k), "upper_bound": upper, "upper_bound_count": upper * (C - k),
                 "confidence": 0.95, "seed": int(seed)}
    faith = None
    if faithfulness:
        started_f = time.perf_counter()
        faith = _faithfulness(s, readings, groups, repls, order, column)
        faith["seconds"] = time.perf_counter() - started_f
    capped_out = None
    if capped[0] is not None:
        capped_out = {"direct": np.concatenate(capped), "total": capped_total}
    timing = {"reruns": int(len(chosen)), "rerun_seconds": rerun_s,
              "seconds_per_rerun": rerun_s / max(1, len(chosen))}
    return Validation(s, str(level), labels, prism, direct, total, post, verified, column, agree, bound, faith,
                      capped_out, lp_total, timing)


def faithfulness_grid(C: int, points: int = 24) -> list[int]:
    """k = 0 .. C when C <= 40; else 0 and about `points` geometric steps up to C (C included)."""
    if C <= 40:
        return list(range(C + 1))
    return sorted({0, C} | {int(round(v)) for v in np.geomspace(1, C, points)})


def _faithfulness(s: Setting, readings, groups, repls, order, column) -> dict:
    """Keep the top-k components by |prism| clean, the rest ablated; the fraction of the readout recovered.

    Math:   C(k): components in the top k at their clean value, the others replaced (noising: the clean run with
            the rest ablated; denoising: the counterfactual run with the top k patched clean)
            recovered(k) = (m(C(k)) - m(C(0))) / (m(C(n)) - m(C(0)))   (one readout column, pre-cap; n components)
    """
    offsets = np.cumsum([0] + [len(g) for g in groups])
    n = int(offsets[-1])
    grid = faithfulness_grid(n)
    m = []
    for k in grid:
        edited = np.ones(n, dtype=bool) if s.direction == "noising" else np.zeros(n, dtype=bool)
        edited[order[:k]] = s.direction != "noising"  # noising: ablate all but the top k; denoising: patch the top k
        changes = []
        for gi, g in enumerate(groups):
            rows = np.flatnonzero(edited[offsets[gi]:offsets[gi + 1]])
            if len(rows):
                changes.append((g.take(rows), s.at, repls[gi][:, rows]))
        record = rerun(s.model, s.base, Edit(s.model.config, changes)) if changes else s.base.record
        m.append(float(readings.of_record(record)[0][column]))
    return recovered_curve(grid, m, ablate=s.ablate, direction=s.direction)


def recovered_curve(grid, m, *, ablate, direction) -> dict:
    """The faithfulness curve from the readouts m(C(k)) on the grid: the fraction recovered and the smallest k on
    the grid that recovers 80% and 90% (None when none does; the fractions are None when m(C(n)) = m(C(0)))."""
    m = np.asarray(m, dtype=np.float64)
    span = m[-1] - m[0]
    rec = (m - m[0]) / span + 0.0 if span != 0 else np.full(len(m), np.nan)  # + 0.0: no -0.0
    first = lambda level: next((int(k) for k, r in zip(grid, rec) if r >= level), None)  # noqa: E731
    return {"ablate": ablate, "direction": direction, "k": [int(k) for k in grid], "readout": [float(v) for v in m],
            "recovered": [None if np.isnan(r) else float(r) for r in rec], "k80": first(0.8), "k90": first(0.9)}


# ------------------------------------------------------------------------------------------------- JSON


def _header(s: Setting, kind: str) -> dict:
    """The prisms' JSON conventions: model, dtype, tokens, position, targets, versus, columns."""
    model, r = s.model, s.readout
    return {"intervention": kind, "model": model.name, "dtype": str(model.dtype),
            "tokens": _tokens_json(model, s.clean.tokens), "position": int(r.position),
            "targets": [t.to_json() for t in r.targets.targets], "versus": [t.to_json() for t in r.targets.versus],
            "columns": r.targets.labels, "sign": "clean minus replaced", **s.describe()}


def _floats(a):
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=np.float64).ravel()]
