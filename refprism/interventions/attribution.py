"""Attribution methods on the backward pass: each component's estimated effect of being replaced, at the levels
validate knows (residual, heads, head-source:L, neurons:L, neurons), labelled as validate labels them.

Every score estimates the same number as validate's total effect: "the readout with the component as in the base
run minus the readout with it replaced" (times the sign: +1 noising, -1 denoising; interventions' convention),
for the same readout (the prisms' logits readout, pre-cap on Gemma 2), ablation and positions, so a score and a
total sit side by side. With c the component at the edited positions t of the base run and c' its replacement
(interventions.Setting.replacement), g = dR/dc from one backward pass of the base run:

    gradxact   sign * sum_t g(t) . c(t)                 zero ablation: the linearisation of zeroing (grad x act);
                                                         mean ablation: g . (c - mean)
    atp        sign * sum_t g(t) . (c(t) - c'(t))         attribution patching; noising: g at the clean run,
                                                         (clean - corrupt) . g; denoising: g at the counterfactual,
                                                         the TransformerLens demo's form (scores labelled)
    atp-gd     mean over l != layer(c) of |atp with layer l's block dropped from the backward|: AtP*'s GradDrop,
                                                         unsigned, large where effects that cancel in AtP are large
    atp*       heads under resample only: AtP*'s QK fix alone, its estimate of patching the head through its inputs,
               each row's softmax recomputed for the other run's query and for each other-run key alone, the values
               linear (signed; no GradDrop); see qk_fixed_scores
    atp*-gd    AtP* in full (Kramar et al. 2024): the QK fix with GradDrop applied to its gradient part, the mean over
               l != layer(c) of |atp* with layer l's block dropped from the backward| (unsigned; heads, resample)
    ig         sign * sum_t (c(t) - c'(t)) . (1/k) sum_i g_i(t),  g_i the gradient of a run with the component at
                                                         c' + (i + 1/2)/k (c - c') (everything downstream recomputed):
                                                         the midpoint rule for the path integral, which is the total
                                                         effect exactly (error O(1/k^2))

    eap, eap-ig  the edges between components (edge attribution patching, and its integrated-gradients form on
                 interpolated inputs): refprism/interventions/edges.py; attribute() hands them over

Cost (Attribution.cost): the forward and backward passes each method ran, and seconds.
Axis letters as in ops.py; C components, Z readout columns, P edited positions, W a component's width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gradients.backward import gradients
from refprism.interventions.agreement import agreement
from refprism.interventions.components import RESIDUAL_LIKE, Group, activation, level_groups
from refprism.interventions.edges import EDGE_METHODS, attribute_edges, check_edge_method, edge_level
from refprism.interventions.edit import Edit, rerun
from refprism.interventions.setting import Setting, setting
from refprism.model import Run

METHODS = ("gradxact", "atp", "atp*", "atp-gd", "atp*-gd", "ig")
QK_METHODS = ("atp*", "atp*-gd")  # the QK fix: heads level, resample
UNSIGNED = ("atp-gd", "atp*-gd")  # GradDrop's mean of |.|: its sign says nothing


@dataclass
class Attribution:
    """One method's score for every component of a level: values [C, Z] under validate's labels."""

    setting: Setting = field(repr=False)
    method: str
    level: str
    labels: list[str]
    values: np.ndarray  # [C, Z]
    cost: dict  # {"forward": passes, "backward": passes, "seconds": s}
    steps: int | None = None  # ig's k

    @property
    def columns(self) -> list[str]:
        return self.setting.readout.targets.labels

    def to_json(self) -> dict:
        from refprism.interventions.patching import _header

        out = _header(self.setting, "attribute")
        out.update({"method": self.method, "level": self.level, "steps": self.steps, "cost": self.cost,
                    "components": [{"label": l, "values": [float(x) for x in v]}
                                   for l, v in zip(self.labels, self.values)]})
        return out

    def table(self, top=20) -> str:
        order = np.argsort(-np.abs(self.values[:, 0]), kind="stable")[:top]
        width = max(12, *(len(c) + 2 for c in self.columns))
        s = self.setting
        out = [f"{self.method} on {self.level} ({s.ablate} ablation, {s.direction}; {len(self.labels)} components; "
               f"{self.cost['forward']} forward + {self.cost['backward']} backward passes, "
               f"{self.cost['seconds']:.2f} s)",
               f"{'component':<18}" + "".join(f"{c:>{width}}" for c in self.columns)]
        out += [f"{self.labels[i]:<18}" + "".join(f"{v:>{width}.4f}" for v in self.values[i]) for i in order]
        return "\n".join(out)


def attribute(model, prompt, *, method="atp", level="heads", targets=None, versus=(), position=-1, at=None,
              ablate="zero", counterfactual=None, reference=None, direction="noising", steps=8,
              max_reruns=1024, components=None) -> Attribution:
    """Score every component of a level by one attribution method (module docstring); arguments as validate's.
    The edge methods (eap, eap-ig) score the edges between components instead: edges.attribute_edges, an
    EdgeAttribution.

    steps: ig's k (midpoint rule);  max_reruns: ig costs components x steps re-runs (and backward passes): more
           than this is refused before any is run (None: no limit)
    components: labels of the level's components to score (validate --methods: the ones validate re-ran); the
           result holds those, in the level's order. None: every component of the level
    """
    check_method(method, level, ablate, steps)
    if method in EDGE_METHODS and components is not None:
        raise InputError(f"{method} scores every edge of the level: components= picks components, not edges")
    if method in EDGE_METHODS:  # the edges between components: edges.py
        return attribute_edges(model, prompt, method=method, level=level, targets=targets, versus=versus,
                               position=position, at=at, ablate=ablate, counterfactual=counterfactual,
                               reference=reference, direction=direction, steps=steps)
    # every method here reads the logits at the readout position only: its runs unembed only there
    s = setting(model, prompt, targets=targets, versus=versus, position=position, at=at, ablate=ablate,
                counterfactual=counterfactual, reference=reference, direction=direction, readout_logits_only=True)
    groups = level_groups(model.config, level, s.position)
    if components is not None:
        groups = only_components(groups, components, level)
    C = sum(len(g) for g in groups)
    if method == "ig" and max_reruns is not None and C * steps > max_reruns:
        raise InputError(f"ig on {level} would run {C} components x {steps} steps = {C * steps} re-runs (at most "
                         f"{max_reruns}): pick a smaller level, fewer steps or a few components (components=, the "
                         f"CLI's --components), or raise max_reruns")
    started = time.perf_counter()
    if method in ("gradxact", "atp"):
        values, cost = linear_scores(s, groups), {"forward": 2 if s.donor is not None else 1, "backward": 1}
    elif method == "atp-gd":
        values, cost = graddrop_scores(s, groups)
    elif method == "atp*-gd":
        values, cost = graddrop_scores(s, groups, score=qk_fixed_scores)
        cost["forward"] = 2
    elif method == "atp*":
        values, cost = qk_fixed_scores(s, groups), {"forward": 2, "backward": 1}
    else:
        values, cost = ig_scores(s, groups, int(steps))
    cost["seconds"] = time.perf_counter() - started
    labels = [label for g in groups for label in g.labels]
    return Attribution(s, method, str(level), labels, values, cost, int(steps) if method == "ig" else None)


def check_method(method, level, ablate, steps) -> None:
    """attribute's checks that need no run (the CLI makes them before the weights are read): the method, and
    what it needs of the level, the ablation and the steps. Edge methods: edges.check_edge_method and the level."""
    if method in EDGE_METHODS:
        check_edge_method(method, level, ablate, steps)
        edge_level(None, level)
        return
    if method not in METHODS:
        raise InputError(f"method {method!r} is not one of {', '.join(METHODS + EDGE_METHODS)}")
    if method in QK_METHODS and (ablate != "resample" or str(level) != "heads"):
        raise InputError(f"{method} estimates a head's patch through its queries, keys and values: it needs --level "
                         "heads and --ablate resample (the other run's q, k and v)")
    if method == "gradxact" and ablate == "resample":
        raise InputError("gradxact linearises zero or mean ablation; for a counterfactual use --method atp")
    if method == "ig" and (not isinstance(steps, (int, np.integer)) or steps < 1):
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def only_components(groups, labels, level) -> list[Group]:
    """The level's groups cut down to the components named by `labels` (each group keeps its rows in order; a
    group left empty is dropped); a label not in the level is a one-line InputError."""
    wanted = set(labels)
    known = {label for g in groups for label in g.labels}
    missing = [label for label in labels if label not in known]
    if missing:
        raise InputError(f"component {missing[0]!r} is not a component of level {level}")
    out = []
    for g in groups:
        rows = [r for r, label in enumerate(g.labels) if label in wanted]
        if rows:
            out.append(g.take(rows))
    return out


def _base_gradients(s: Setting, run=None, **kwargs):
    return gradients(s.model, s.base if run is None else run, targets=s.readout.targets, position=s.position,
                     **kwargs)


def changes(s: Setting, g: Group) -> np.ndarray:
    """c - c' at every edited position: [P, C, W] (0 for an edge whose source is after its query)."""
    repl = s.replacement(g)
    acts = np.stack([activation(s.model, s.base.record, g, t) for t in s.at])  # [P, C, W]
    delta = acts - repl
    if g.kind == "edge":
        delta = delta * (g.source[None, :] <= np.asarray(s.at)[:, None])[..., None]
    return delta


def component_gradient(record, g: Group, at, base=None) -> np.ndarray:
    """dR/dc for the group's components at positions `at`, from a gradient record: [Z, P, C, W].

    Math:   embed, attn, mlp (Gemma 4: ple, dense): dR/d(residual part)[t]; head h and edge (h, s): dR/dz[t, h]
            (an edge's term is added into z[t, h]); neuron n: dR/dact[t, n]; Gemma 4 expert e: dR/dexpert_out[t, j]
            at the slot j that chose e (it carries the routing weight w_j), 0 where the router did not choose e
            (base: the run's record, whose moe.topk.index says which slot; the component's layer routes before it)
    """
    G = record[g.site]
    at = list(at)
    if g.kind in RESIDUAL_LIKE:
        return G[:, at][:, :, None, :]
    if g.kind == "expert":
        top = base[f"blocks.{g.layer}.moe.topk.index"]
        out = np.zeros((G.shape[0], len(at), len(g), G.shape[-1]), G.dtype)
        for i, t in enumerate(at):
            for c, e in enumerate(g.index):
                slot = np.nonzero(top[t] == e)[0]
                if len(slot):
                    out[:, i, c] = G[:, t, int(slot[0])]
        return out
    if g.kind == "neuron":
        return G[:, at][:, :, g.index][..., None]
    return G[:, at][:, :, g.index, :]


def linear_scores(s: Setting, groups, *, record=None) -> np.ndarray:
    """sign * sum_t g(t) . (c(t) - c'(t)) for every component of the groups: [C, Z] (gradxact, atp)."""
    if record is None:
        record = _base_gradients(s, record=sorted({g.site for g in groups})).record
    out = [s.sign * np.einsum("zpcw,pcw->cz", component_gradient(record, g, s.at, s.base.record), changes(s, g))
           for g in groups]
    return np.concatenate(out)


def graddrop_scores(s: Setting, groups, score=None):
    """AtP*'s GradDrop: the mean over the other layers l of |score with layer l's block dropped from the backward|
    ([C, Z], unsigned); the embedding averages over every layer. score: linear_scores (atp-gd, the default) or
    qk_fixed_scores (atp*-gd: GradDrop on the QK fix's gradient part, dR/dz and with it g_A), each given the
    dropped backward's record.

    Math:   atp-gd(c) = 1 / #{l != layer(c)} sum_{l != layer(c)} |atp_{drop l}(c)|   (atp*-gd: atp*_{drop l})
    """
    score = linear_scores if score is None else score
    L = s.model.config.n_layers
    sites = sorted({g.site for g in groups})
    total = [0] * len(groups)
    for l in range(L):
        record = _base_gradients(s, drop=[l], record=sites).record
        for i, g in enumerate(groups):
            if g.layer != l:
                total[i] = total[i] + np.abs(score(s, [g], record=record))
    values = np.concatenate([t / (L if g.layer < 0 else L - 1) for t, g in zip(total, groups)])
    return values, {"forward": 2 if s.donor is not None else 1, "backward": L}


def qk_fixed_scores(s: Setting, groups, *, record=None) -> np.ndarray:
    """AtP*'s QK fix for heads: patching head n's output at t, estimated through its inputs from the other run O
    (q', k', v'), the softmax exact where AtP's linearisation of it saturates.

    Math:   g_A[t, s] = dR/dz[t, n] . v[s, kv(n)]   (dR/dpattern of the base run B)
            value:  sum_s A[n,t,s] dR/dz[t,n] . (v[s] - v'[s])                               (linear)
            query:  -<g_A[t], softmax(c(q'_t . k_s scale))_s - A[n,t]>                      (the row recomputed:
                    ops.softmax_row_change, soft-cap and mask inside; q' after O's q norm and RoPE)
            keys:   -sum_s <g_A[t], A with only key s moved to k'_s - A[n,t]>                (each key alone, the
                    closed form ops.softmax_key_change: delta = c(q_t . k'_s scale) - c(q_t . k_s scale))
            score = sign * (value + query + keys) summed over the edited positions t; c the soft-cap (Gemma 2)
            The component is head n's output z[:, n]: the other run's key k'_s of kv head kv(n) enters head n's
            rows only (the other query heads sharing that kv head keep their outputs), so nothing is summed over
            them; such a sum belongs to a key node (kv head j's keys patched), which no level has
    record: a gradient record holding the groups' attn.z (graddrop_scores' dropped backwards); None: the base run's
    Shapes: -> [C, Z]
    """
    model, cfg = s.model, s.model.config
    base, other = s.base.record, s.donor.record
    grads = _base_gradients(s, record=[g.site for g in groups]).record if record is None else record
    scale = np.asarray(cfg.query_pre_attn_scalar ** -0.5, dtype=model.dtype)  # Gemma 4: 1
    cap = cfg.attn_softcap
    capped = (lambda x: x) if cap is None else (lambda x: ops.softcap(x, cap))  # noqa: E731
    out = []
    for g in groups:
        b = f"blocks.{g.layer}."
        kb = f"blocks.{cfg.kv_source(g.layer)}."  # Gemma 4 KV sharing: a consumer's keys and values are its producer's
        kv = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(g.layer))
        window = cfg.sliding_window if cfg.is_sliding(g.layer) else None
        A, v, q, k = base[b + "attn.pattern"], base[kb + "attn.v"], base[b + "attn.q"], base[kb + "attn.k"]
        v2, q2, k2 = other[kb + "attn.v"], other[b + "attn.q"], other[kb + "attn.k"]
        g_z = grads[b + "attn.z"]  # [Z, T, N, H]
        Z = g_z.shape[0]
        scores = np.zeros((len(g), Z), dtype=model.dtype)
        for c, n in enumerate(g.index):
            j = kv[n]
            a = ops.attention_scores(q[:, [n]], k[:, [j]], scale)  # [1, T, S] (one head, its kv head)
            a_q = ops.attention_scores(q2[:, [n]], k[:, [j]], scale)  # the other run's queries, these keys
            a_k = ops.attention_scores(q[:, [n]], k2[:, [j]], scale)  # these queries, the other run's keys
            delta = capped(a_k[0]) - capped(a[0])  # [T, S]: each key's move in every row, after the soft-cap
            for t in s.at:
                g_A = np.einsum("zh,sh->zs", g_z[:, t, n], v[:, j])  # [Z, S]
                value = np.einsum("s,zsh->z", A[n, t], g_z[:, t, n][:, None, :] * (v[:, j] - v2[:, j])[None])
                query = _row_change(g_A, a[0], a_q[0], t, window, cap)
                keys = sum(ops.softmax_key_change(g_A, A[n, t][None, :], src, delta[t, src][None])
                           for src in range(t + 1))
                scores[c] += s.sign * (value - query - keys)
        out.append(scores)
    return np.concatenate(out)


def _row_change(g_A, a, a_new, t, window, cap):
    """<g_A, softmax row t of a_new - of a> [Z] (rows before t computed too: causal_softmax is per row)."""
    rows = ops.softmax_row_change(np.broadcast_to(g_A[:, None, :], (len(g_A), t + 1, a.shape[1])),
                                  np.broadcast_to(a[None, : t + 1], (len(g_A), t + 1, a.shape[1])),
                                  np.broadcast_to(a_new[None, : t + 1], (len(g_A), t + 1, a.shape[1])), window,
                                  cap=cap)
    return rows[:, t]


def ig_scores(s: Setting, groups, k: int):
    """Integrated gradients along each component's own activation, midpoint rule with k steps: [C, Z].

    Math:   IG(c) = sign * sum_t (c(t) - c'(t)) . (1/k) sum_{i<k} dR/dc(t) |_{c' + a_i (c - c')},  a_i = (i + 1/2)/k
            each gradient from a re-run with the component set to that point (interventions.Edit, resumed at its
            layer) and a backward pass down to the component's layer only
    """
    model = s.model
    out, forwards, backwards = [], 0, 0
    for g in groups:
        repl = s.replacement(g)  # [P, C, W]
        delta = changes(s, g)
        scores = np.zeros((len(g), len(s.readout.targets.labels)), dtype=model.dtype)
        for r in range(len(g)):
            one = g.take([r])
            acc = 0
            for i in range(k):
                a = (i + 0.5) / k
                value = repl[:, [r]] + np.asarray(a, dtype=model.dtype) * delta[:, [r]]
                rec = rerun(model, s.base, Edit(model.config, [(one, s.at, value)]))
                run = Run(s.base.tokens, s.base.pieces, rec)
                grads = _base_gradients(s, run, record=[one.site], down_to=max(one.layer, 0))
                acc = acc + component_gradient(grads.record, one, s.at, s.base.record)  # [Z, P, 1, W]
                forwards, backwards = forwards + 1, backwards + 1
            scores[r] = s.sign * np.einsum("zpcw,pcw->z", acc / k, delta[:, [r]])
        out.append(scores)
    return np.concatenate(out), {"forward": forwards + (2 if s.donor is not None else 1), "backward": backwards}


# ------------------------------------------------------------------------------------------------- beside validate


@dataclass
class MethodsValidation:
    """validate's result with one column per attribution method beside prism, direct and total: each method's
    scores of the components validate re-ran (a level larger than the budget: its top-k by |prism| and the
    sample), its agreement with the totals (interventions.agreement: Spearman, Kendall, sign agreement, top-k
    precision/recall, re-runs to the true top-k) over them, and its cost."""

    validation: object  # interventions.Validation
    methods: dict  # method -> Attribution of the re-run components

    def scores(self, method) -> np.ndarray:
        """The method's scores of the re-run components, in the validation's order: [n verified, Z]."""
        a = self.methods[method]
        row = {label: i for i, label in enumerate(a.labels)}
        v = self.validation
        return a.values[[row[v.labels[i]] for i in np.flatnonzero(v.verified)]]

    def agreement(self, method) -> dict:
        v = self.validation
        k = v.agreement["k"]
        scores = self.scores(method)[:, v.column]
        out = agreement(scores, v.total[v.verified, v.column], k)
        if not v.verified.all():
            out["reruns_to_true_top_k"] = None
        if method in UNSIGNED:  # unsigned by construction: its sign says nothing
            out["sign_agreement"] = None
        return out

    def to_json(self) -> dict:
        out = self.validation.to_json()
        rows = {c["label"]: c for c in out["components"]}
        for m, a in self.methods.items():
            for label, v in zip(a.labels, a.values):
                if label in rows:
                    rows[label][m] = [float(x) for x in v]
        out["methods"] = {m: {"agreement": self.agreement(m), "cost": a.cost, "steps": a.steps}
                          for m, a in self.methods.items()}
        out["methods"]["prism"] = {"agreement": self.validation.agreement,
                                   "cost": {"forward": 1, "backward": 0, "seconds": None}}  # within validate
        return out

    def table(self, top=20) -> str:
        v = self.validation
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        out = [v.table(top=top), "",
               f"each method's agreement with |total| (column {v.columns[v.column]}, n = {v.agreement['n']}, "
               f"k = {v.agreement['k']}) and cost:",
               f"{'method':<10}{'Spearman':>10}{'Kendall':>10}{'sign':>8}{'top-k P':>9}{'top-k R':>9}"
               f"{'re-runs':>9}{'fwd':>6}{'bwd':>6}{'seconds':>9}"]
        rows = [("prism", v.agreement, {"forward": 1, "backward": 0, "seconds": None})]
        rows += [(m, self.agreement(m), a.cost) for m, a in self.methods.items()]
        for m, g, c in rows:
            out.append(f"{m:<10}{fmt(g['spearman']):>10}{fmt(g['kendall']):>10}{fmt(g['sign_agreement']):>8}"
                       f"{g['top_k_precision']:>9.3f}{g['top_k_recall']:>9.3f}"
                       f"{'n/a' if g['reruns_to_true_top_k'] is None else g['reruns_to_true_top_k']:>9}"
                       f"{c['forward']:>6}{c['backward']:>6}"
                       f"{'n/a' if c['seconds'] is None else format(c['seconds'], '.2f'):>9}")
        return "\n".join(out)


def validate_methods(model, prompt, *, methods=("atp",), level="heads", steps=8, **kwargs) -> MethodsValidation:
    """interventions.validate with one column per attribution method (METHODS) on the same runs, readout and
    ablation; kwargs as validate's (targets, versus, position, at, ablate, counterfactual, reference, direction,
    top, budget, seed, column, faithfulness, logprob).

    Each method scores the components validate re-ran (every one of a level within the budget; else the prism's
    top-k and the sample), the only ones it is compared with: ig then costs at most budget x steps re-runs, which
    validate's budget bounds (attribute's max_reruns is not applied).
    """
    from refprism.interventions import validate

    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"method {bad[0] if bad else None!r} is not one of {', '.join(METHODS)}")
    for m in QK_METHODS:
        if m in methods:
            check_method(m, level, kwargs.get("ablate"), steps)
    v = validate(model, prompt, level=level, **kwargs)
    s = v.setting
    same = {"targets": s.readout.targets, "position": s.position, "at": list(s.at), "ablate": s.ablate,
            "counterfactual": s.counterfactual, "reference": s.means if s.ablate == "mean" else None,
            "direction": s.direction}
    scored = None if v.verified.all() else [v.labels[i] for i in np.flatnonzero(v.verified)]
    found = {m: attribute(model, s.clean, method=m, level=level, steps=steps, max_reruns=None, components=scored,
                          **same) for m in methods}
    return MethodsValidation(v, found)
