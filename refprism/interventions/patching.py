"""`patch`: one component replaced; its prism term beside its direct and total effects, and the JSON of both
patch and validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.interventions.components import parse_component
from refprism.interventions.setting import (
    Readings,
    Setting,
    _tokens_json,
    deltas,
    direct_effects,
    prism_terms,
    residual_changes,
    setting,
    total_effect,
)


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


def _header(s: Setting, kind: str) -> dict:
    """The prisms' JSON conventions: model, dtype, tokens, position, targets, versus, columns."""
    model, r = s.model, s.readout
    return {"intervention": kind, "model": model.name, "dtype": str(model.dtype),
            "tokens": _tokens_json(model, s.clean.tokens), "position": int(r.position),
            "targets": [t.to_json() for t in r.targets.targets], "versus": [t.to_json() for t in r.targets.versus],
            "columns": r.targets.labels, "sign": "clean minus replaced", **s.describe()}


def _floats(a):
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=np.float64).ravel()]
