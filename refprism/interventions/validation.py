"""`validate`: every component of a level patched; prism, direct and total side by side, their agreement, and the
faithfulness curve (the readout recovered as components are restored in each ranking's order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from refprism.errors import InputError
from refprism.interventions.agreement import agreement, binomial_upper
from refprism.interventions.components import level_groups
from refprism.interventions.edit import Edit, rerun
from refprism.interventions.patching import _floats, _header, _Split
from refprism.interventions.setting import Readings, Setting, deltas, direct_effects, prism_terms, setting, total_effect


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


def check_budget(top, budget, seed, *, flags=False) -> None:
    """validate's checks of top, budget and seed (named as the CLI's --top, --budget, --seed with flags=True)."""
    name = (lambda n: f"--{n}") if flags else (lambda n: n)  # noqa: E731
    if not isinstance(top, (int, np.integer)) or top < 1:
        raise InputError(f"{name('top')} must be at least 1, got {top!r}")
    if not isinstance(budget, (int, np.integer)) or budget < top:
        raise InputError(f"{name('budget')} must be at least {name('top')} ({top}), got {budget!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"{name('seed')} must be a non-negative integer, got {seed!r}")


def validate(model, prompt, *, level="heads", targets=None, versus=(), position=-1, at=None, ablate="zero",
             counterfactual=None, reference=None, direction="noising", top=10, budget=256, seed=0, column=0,
             faithfulness=True, logprob=False, methods=(), steps=8):
    """Every component of a level: prism beside direct and total effect, their agreement, circuit faithfulness.

    methods: attribution methods to set beside them (interventions.attribution.METHODS: gradxact, atp, atp*,
            atp-gd, atp*-gd, ig), each scoring the re-run components, with its agreement with the totals and its
            cost; then the result is a `MethodsValidation` holding this Validation (`.validation`) and one
            Attribution per method. steps: ig's (ig re-runs each scored component k times: at most budget x steps
            re-runs).

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
    if methods:  # the same validate, then each method on its components, runs and readout
        from refprism.interventions.attribution import validate_methods

        return validate_methods(model, prompt, methods=methods, level=level, steps=steps, targets=targets,
                                versus=versus, position=position, at=at, ablate=ablate,
                                counterfactual=counterfactual, reference=reference, direction=direction, top=top,
                                budget=budget, seed=seed, column=column, faithfulness=faithfulness, logprob=logprob)
    check_budget(top, budget, seed)
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
