"""The result of a comparison: one `SiteResult` per compared site and the `CompareResult` that prints them,
names the first wrong op and writes the JSON (exit status 0 / 1 for CI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SiteResult:
    """One site's comparison: the error against the reference with its floor, and the local error (the op alone,
    on the other side's inputs) with its local floor. Errors are absolute; *_rel divide by max |reference|."""

    site: str
    shape: tuple[int, ...]
    letters: tuple[str, ...]
    max_abs: float
    max_rel: float
    nmse_db: float
    cosine: float
    worst: dict
    floor: float
    local_max_abs: float | None
    local_max_rel: float | None
    local_worst: dict | None
    local_floor: float | None
    scale: float = 0.0  # max |reference| at the site
    nonfinite: int = 0
    logits: dict | None = None
    summary: bool = False  # only printed elements and a sum were available (llama.cpp's llama-debug)

    @property
    def diverges(self) -> bool:
        return not self.max_abs <= self.floor

    @property
    def local_diverges(self) -> bool:
        return self.local_max_abs is not None and not self.local_max_abs <= self.local_floor

    def to_json(self) -> dict:
        scale = self.scale
        out = {"site": self.site, "shape": list(self.shape), "axes": "".join(self.letters),
               "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel), "nmse_db": _num(self.nmse_db),
               "cosine": _num(self.cosine), "worst": self.worst, "floor": _num(self.floor),
               "floor_rel": _num(self.floor / scale) if scale else None, "scale": _num(scale),
               "local_max_abs": _num(self.local_max_abs), "local_max_rel": _num(self.local_max_rel),
               "local_worst": self.local_worst, "local_floor": _num(self.local_floor),
               "diverges": self.diverges, "local_diverges": self.local_diverges, "nonfinite": self.nonfinite}
        if self.logits is not None:
            out["logits"] = self.logits
        if self.summary:
            out["summary"] = True
        return out


def _num(x):
    """A float for JSON: None for NaN and infinities (JSON has neither)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class CompareResult:
    """What `compare` found. `exit_status`: 0 every site within its floor, 1 something diverges (or the tokens)."""

    model: str
    against: str
    dtype: str
    tokens: list[int]
    pieces: list[str]
    their_tokens: list[int]
    their_pieces: list[str]
    sites: list[SiteResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diagnosis: list[dict] = field(default_factory=list)
    floors: dict = field(default_factory=dict)

    @property
    def tokens_match(self) -> bool:
        return self.tokens == self.their_tokens

    @property
    def token_mismatch(self) -> dict | None:
        if self.tokens_match:
            return None
        p = next((i for i, (a, b) in enumerate(zip(self.tokens, self.their_tokens)) if a != b),
                 min(len(self.tokens), len(self.their_tokens)))
        side = lambda ids, pieces: ({"id": ids[p], "piece": pieces[p]} if p < len(ids) else None)  # noqa: E731
        return {"position": p, "ours": side(self.tokens, self.pieces),
                "theirs": side(self.their_tokens, self.their_pieces),
                "lengths": [len(self.tokens), len(self.their_tokens)]}

    @property
    def first_divergence(self) -> str | None:
        return next((s.site for s in self.sites if s.diverges), None)

    @property
    def wrong_ops(self) -> list[str]:
        return [s.site for s in self.sites if s.local_diverges]

    @property
    def first_wrong_op(self) -> str | None:
        ops_ = self.wrong_ops
        return ops_[0] if ops_ else None

    @property
    def exit_status(self) -> int:
        """0: every site within its floor; 1: something diverges (a finding); 2: the token ids differ, so nothing
        could be compared (bad input, as for the command's other refusals)."""
        if not self.tokens_match:
            return 2
        return int(any(s.diverges or s.local_diverges for s in self.sites))

    def to_json(self) -> dict:
        return {"model": self.model, "against": self.against, "dtype": self.dtype,
                "tokens_match": self.tokens_match, "tokens": self.tokens, "their_tokens": self.their_tokens,
                "token_mismatch": self.token_mismatch, "sites": [s.to_json() for s in self.sites],
                "missing": self.missing, "first_divergence": self.first_divergence,
                "first_wrong_op": self.first_wrong_op, "wrong_ops": self.wrong_ops, "diagnosis": self.diagnosis,
                "floors": self.floors, "notes": self.notes, "exit_status": self.exit_status}

    def headline(self) -> str:
        """One line: the verdict."""
        if not self.tokens_match:
            mm = self.token_mismatch
            show = lambda s: "none (shorter)" if s is None else f"{s['id']} ({s['piece']})"  # noqa: E731
            why = "".join(f"; {d['says']}" for d in self.diagnosis if d["explains"])
            return (f"tokens differ at position {mm['position']}: ours {show(mm['ours'])}, theirs "
                    f"{show(mm['theirs'])} ({mm['lengths'][0]} vs {mm['lengths'][1]} tokens){why}; nothing else "
                    "compared")
        if self.exit_status == 0:
            return f"every one of {len(self.sites)} sites is within its floor"
        wrong = self.first_wrong_op
        text = f"first divergence: {self.first_divergence or 'none'}; first wrong op: {wrong or 'none'}"
        first = next((s for s in self.sites if s.site == self.first_divergence), None)
        if wrong is None and first is not None and first.summary:
            text += (" (the first divergence was printed in part: there is no replay there to isolate one op; "
                     "the diagnosis meets the print)")
        elif wrong is None:
            text += " (every op is within its local floor: the divergence is accumulated, not one op's)"
        return text

    def diagnosis_lines(self) -> list[str]:
        lines = []
        explained = [d for d in self.diagnosis if d["explains"]]
        for d in explained:
            if d.get("from") == "printed":
                how = "its printed values" + (f" within {_fmt(d['floor'])}" if d["max_abs"] is not None else "") + \
                    (f", its printed sum within {_fmt(d['sum_floor'])}" if "sum_floor" in d else "")
                lines.append(f"diagnosis: {d['says']} (at the first divergence, printed in part so not replayed, "
                             f"the other side prints what refprism with `{d['variant']}` at {d['site']} computes: "
                             f"{how})")
                continue
            how = d.get("evidence") or f"max abs {_fmt(d['max_abs'])} within the floor {_fmt(d['floor'])}"
            lines.append(f"diagnosis: {d['says']} (the other side behaves like refprism with `{d['variant']}` at "
                         f"{d['site']}: {how})")
        if self.diagnosis and not explained:
            where = self.diagnosis[0]["site"]
            closest = ", ".join(f"{d['variant']} {_fmt(d['max_abs'] if d['max_abs'] is not None else d['sum_error'])}"
                                for d in self.diagnosis[:3])
            lines.append(f"diagnosis: none of the {len(self.diagnosis)} catalogued mistakes that act at {where} "
                         f"reproduces the other side there (closest: {closest})")
        elif not self.diagnosis and self.first_wrong_op:
            lines.append(f"diagnosis: no catalogued mistake acts at {self.first_wrong_op}")
        return lines

    def table(self) -> str:
        """The report as text: header, one row per site (first divergence and first wrong op marked), verdict."""
        out = [f"refprism compare  model {self.model}  against {self.against} ({self.dtype})  "
               f"{len(self.tokens)} tokens",
               "tokens: " + " ".join(f"{p}({i})" for i, p in zip(self.tokens, self.pieces))]
        if not self.tokens_match:
            out.append("their tokens: " + " ".join(f"{p}({i})" for i, p in zip(self.their_tokens, self.their_pieces)))
            out.append(self.headline())
            out += self.diagnosis_lines()
            return "\n".join(out)
        out.append(f"floors: {self.floors.get('method', '')}")
        width = max([len(s.site) for s in self.sites] + [4])
        out.append(f"  {'site':<{width}}  {'max abs':>9} {'floor':>9} {'max rel':>9} {'NMSE dB':>8} {'cosine':>10}  "
                   f"{'local':>9} {'l.floor':>9}  worst")
        first_div, first_wrong = self.first_divergence, self.first_wrong_op
        for s in self.sites:
            mark = "!" if s.diverges or s.local_diverges else " "
            worst = "sum" if s.worst == {"sum": True} else ",".join(f"{k}{v}" for k, v in s.worst.items())
            tags = []
            if s.site == first_div:
                tags.append("<- first divergence")
            if s.site == first_wrong:
                tags.append("<- FIRST WRONG OP")
            if s.summary:
                tags.append("(printed elements and sum only)")
            out.append(f"{mark} {s.site:<{width}}  {_fmt(s.max_abs):>9} {_fmt(s.floor):>9} {_fmt(s.max_rel):>9} "
                       f"{_fmt(s.nmse_db, '.1f'):>8} {_fmt(s.cosine, '.8f'):>10}  {_fmt(s.local_max_abs):>9} "
                       f"{_fmt(s.local_floor):>9}  {worst} {' '.join(tags)}".rstrip())
            if s.logits is not None and s.logits.get("kl_max") is not None:
                g = s.logits
                out.append(f"  {'':<{width}}  top-{g['k']} overlap min {g['topk_overlap_min']:.2f}, KL max "
                           f"{g['kl_max']:.3g} nats, argmax agrees at {g['argmax_agree']:.0%} of positions")
        if self.missing:
            out.append(f"not provided by the other side ({len(self.missing)}): " + _listing(self.missing))
        for note in self.notes:
            out.append(f"note: {note}")
        out.append(self.headline())
        out += self.diagnosis_lines()
        return "\n".join(out)

    def markdown(self) -> str:
        """The report for a pull request: the verdict, the diagnosis, and the sites in a table."""
        verdict = "OK" if self.exit_status == 0 else "DIVERGES"
        out = [f"### refprism compare: {verdict}", "",
               f"`{self.model}` against **{self.against}** ({self.dtype}), {len(self.tokens)} tokens.", "",
               f"**{self.headline()}**", ""]
        out += [f"- {line.removeprefix('diagnosis: ')}" for line in self.diagnosis_lines()]
        if not self.tokens_match:
            return "\n".join(out) + "\n"
        out += ["", f"Floors: {self.floors.get('method', '')}", "",
                "| site | max abs | floor | max rel | NMSE dB | cosine | local | local floor | |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for s in self.sites:
            tag = " ".join(t for t, on in (("first divergence", s.site == self.first_divergence),
                                           ("**first wrong op**", s.site == self.first_wrong_op),
                                           ("diverges", (s.diverges or s.local_diverges)
                                            and s.site not in (self.first_divergence, self.first_wrong_op))) if on)
            out.append(f"| `{s.site}` | {_fmt(s.max_abs)} | {_fmt(s.floor)} | {_fmt(s.max_rel)} | "
                       f"{_fmt(s.nmse_db, '.1f')} | {_fmt(s.cosine, '.8f')} | {_fmt(s.local_max_abs)} | "
                       f"{_fmt(s.local_floor)} | {tag} |")
        if self.missing:
            out += ["", f"Not provided by the other side: {_listing(self.missing)}"]
        out += [f"- note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _fmt(x, spec=".2e"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _listing(names, limit=12):
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")
