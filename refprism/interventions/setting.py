"""The setting of an intervention (prompt, readout, ablation, direction, positions) and the numbers of one
component under it: its prism term, its direct effect (norms on the direct path recomputed) and its total effect
(a re-run). The package docstring (refprism.interventions) defines each number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.record import whole_but_logits
from refprism.interventions.components import Group, activation, chosen, mean_activation
from refprism.interventions.edit import Edit, rerun
from refprism.model import Run, check_text

ABLATIONS = ("zero", "mean", "resample")
DIRECTIONS = ("noising", "denoising")


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


def _as_run(model, prompt, what, position=None) -> Run:
    """A prompt (text or ids) -> a run with the full record (the logits only at `position` when one is given and
    in range; out of range, the full run, and the setting's own error follows); a given Run is used as it is (it
    must be full)."""
    if isinstance(prompt, Run):  # (its logits may be kept at some positions only: a run this function made)
        if not whole_but_logits(model.config, prompt.record, len(prompt.tokens)):
            raise InputError(f"{what} is a run with a selective record: interventions need the full record")
        return prompt
    if isinstance(prompt, str):
        check_text(prompt, what)
    return model.run(prompt) if position is None else model.run_reading(prompt, position)


def _packed_pair(model, prompt, counterfactual, position):
    """(clean, counterfactual) runs from one packed pass (each with its logits at `position` only), or None where
    _as_run makes them one by one: no counterfactual, no `position` (readout_logits_only off), either one a Run,
    different lengths (the setting's own error follows), or `position` out of range."""
    if counterfactual is None or position is None or isinstance(prompt, Run) or isinstance(counterfactual, Run):
        return None
    for p, what in ((prompt, "the prompt"), (counterfactual, "the counterfactual")):
        if isinstance(p, str):
            check_text(p, what)
    tokens = [model.encode(prompt), model.encode(counterfactual)]
    T = len(tokens[0])
    if len(tokens[1]) != T or isinstance(position, bool) or not isinstance(position, (int, np.integer)) or \
            not -T <= position < T:
        return None
    return tuple(model.run_many(tokens, positions=[int(position)], pack_tokens=2 * T))


def check_options(ablate, direction, counterfactual, reference) -> None:
    """The checks of `setting` that need no run: the ablation, the direction and the prompts they go with."""
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


def setting(model, prompt, *, targets=None, versus=(), position=-1, at=None, ablate="zero", counterfactual=None,
            reference=None, direction="noising", readout_logits_only=False) -> Setting:
    """Run what an intervention needs and check every argument (one-line InputErrors).

    targets: None -> the clean prompt's top token, versus the counterfactual's top token (resample, when it
             differs) or else the clean prompt's second token: one logit difference.
    at:      None (the readout position), "all", an int or a list of positions (negative from the end).
    readout_logits_only: the prompt's and the counterfactual's runs made here unembed only at the readout
             position (every other site whole): for a caller that reads the logits nowhere else (the gradient
             methods of attribution.attribute), the [T, V] product at the other positions is skipped. The same
             record but the logits; the readout's value is that row computed alone (equal to float rounding: a
             1-row product sums in another order than the [T, V] one); a given Run is used as it is. Both
             prompts given as text or ids, of one length: the two runs are one packed pass (Model.run_many: the
             weights read once for both, each run equal to its own within float rounding).
    """
    check_options(ablate, direction, counterfactual, reference)
    at_readout = (-1 if position is None else position) if readout_logits_only else None
    pair = _packed_pair(model, prompt, counterfactual, at_readout)
    clean = pair[0] if pair else _as_run(model, prompt, "the prompt", at_readout)
    cf = None
    if counterfactual is not None:
        cf = pair[1] if pair else _as_run(model, counterfactual, "the counterfactual", at_readout)
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
        y = _norm(self.model, xs, self.model.params.ln_final)
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


def _norm(model, x, w):
    """rms_norm(x; w) with the model's gain (1 + w on Gemma 1-3, w on Gemma 4), the scale recomputed."""
    return ops.rms_apply(x, ops.rms_scale(x, eps=model.config.rms_norm_eps), w, model.config.norm_offset)


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
    if g.kind == "expert":  # an expert the router did not choose at p has no slot to replace: nothing changes
        delta = delta * chosen(setting.base.record, g, p)[:, None]
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
    cfg = setting.model.config
    if g.kind in ("embed", "attn", "mlp", "ple"):  # Gemma 4: times the layer_scalars after the part
        terms = (delta @ r.u.T) * P.layer_scale(r, max(g.layer, 0))
    elif g.kind == "dense":  # Gemma 4 MoE: the dense branch after its own post-norm, before ln2_post
        terms = delta @ P.through_post_norm(r, g.layer, "mlp").T
    elif g.kind == "expert":  # w_j u_exp . (c - c'), the router's weight of the slot at the readout position
        rec, p = setting.base.record, setting.position
        top, weight = rec[f"blocks.{g.layer}.moe.topk.index"][p], rec[f"blocks.{g.layer}.moe.topk.weight"][p]
        w = np.array([weight[top == e][0] if e in top else 0 for e in g.index], dtype=delta.dtype)
        terms = w[:, None] * (delta @ P.through_post_norm(r, g.layer, "expert").T)
    elif g.kind == "neuron":
        u = P.through_post_norm(r, g.layer, "dense" if cfg.moe else "mlp")
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
            Gemma 4: every d times the layer_scalars after the part (prisms.layer_scale); MoE: a dense neuron's
            change passes ln2_post1, an expert's (times its router weight) ln2_post2, then the sum passes ln2_post
    Shapes: delta [C, W] -> d [C, D]
    """
    model, rec, p = setting.model, setting.base.record, setting.position
    cfg, params = model.config, model.params
    minus = -delta[rows]
    scale = P.layer_scale(setting.readout, max(g.layer, 0))  # Gemma 4: the layer_scalars after the part (else 1)
    if g.kind in ("embed", "attn", "mlp", "ple"):
        return minus * scale
    b = f"blocks.{g.layer}."
    norm = lambda x, key: _norm(model, x, params.get(g.layer, key))  # noqa: E731
    if g.kind in ("dense", "expert"):  # Gemma 4 MoE: the branch changes, then ln2_post of their sum
        if g.kind == "expert":
            top, weight = rec[b + "moe.topk.index"][p], rec[b + "moe.topk.weight"][p]
            w = np.array([weight[top == e][0] if e in top else 0 for e in g.index[rows]], dtype=minus.dtype)
            down = rec[b + "moe.down"][p]
            branch = norm(down[None] + w[:, None] * minus, "ln2_post2") - norm(down[None], "ln2_post2")
        else:
            branch = minus
        total = rec[b + "mlp.sum"][p]
        return (norm(total[None] + branch, "ln2_post") - norm(total[None], "ln2_post")) * scale
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
    if g.kind == "neuron" and cfg.moe:  # Gemma 4 MoE: down -> ln2_post1 (the dense branch) -> + experts -> ln2_post
        dense = norm(before[None] + change, "ln2_post1") - norm(before[None], "ln2_post1")
        total = rec[b + "mlp.sum"][p]
        return (norm(total[None] + dense, "ln2_post") - norm(total[None], "ln2_post")) * scale
    return (norm(before[None] + change, post) - norm(before[None], post)) * scale


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
    own_norm = cfg.post_norms and g.kind in ("head", "edge", "neuron", "dense", "expert")
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


