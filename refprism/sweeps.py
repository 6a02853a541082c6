"""Sweeps: the logit prisms of every prompt of a data set, and their means over the set with bootstrap intervals.

One prompt is an anecdote; "this head moves the country into the capital's logit" is a claim about a data set.
`sweep` (the `refprism sweep` command) reads a JSONL or CSV file of prompts, runs them in packed passes
(`Model.run_many`), splits each prompt's readout with the prisms of refprism/prisms.py, writes one line per prompt
as each chunk of prompts is done, and aggregates (docs/sweeps.md).

Data, one row per prompt:
    id              unique name of the row (a string or an integer)
    prompt | ids    the text (the tokenizer adds BOS) or the token ids
    targets         token specs as prisms.resolve_token reads them: ▁Paris, one-token text, #7127
    versus          optional foils: each column reads target - mean(foils)
    position        optional read position (default -1, the last token)
    roles           optional {"country": 5}: names of source positions, so that head x source terms aggregate
                    by role across prompts of different lengths; the sources without a role form "other"
    counterfactual  optional: passed to refprism.interventions.validate with --validate

Levels, what each prompt gets (`Levels.parse("residual,heads,head-source,neurons:10")`):
    residual     embed, L{l}.attn, L{l}.mlp                       whole: the logit (or logit difference)
    heads        L{l}H{h}: each head, sources summed               whole: the L{l}.attn term
    head-source  L{l}H{h}.src{s}, and by role: L{l}H{h}.{role}, L{l}H{h}.other     whole: the L{l}.attn term
    neurons:K    each prompt's K neurons of largest |term| in each layer, L{l}N{n}, and L{l}N.rest, the sum of
                 its other neurons                                 whole: the L{l}.mlp term

Aggregation (summary.json). For a component c and column z, x_i = the term of prompt i, i = 1 .. n:
    mean       m = (1/n) sum_i x_i
    interval   percentile bootstrap: B resamples of the n prompts drawn with replacement, as counts
               w_b ~ Multinomial(n; 1/n, ..., 1/n); the resample means m_b = (1/n) sum_i w_bi x_i; the 95% interval
               is [2.5th, 97.5th percentile of m_b]. One set of resamples serves every component (a resample is a
               set of prompts), so intervals of different components come from the same draws.
    same_sign  (1/n) #{i : sign(x_i) = sign(m)}, the share of prompts that agree with the sign of the mean.
Exactness holds for the means. Every prompt's parts sum to its whole up to rounding,
whole_i = sum_c x_ic + r_i with |r_i| <= tol_i, and the mean is linear, so

    mean_i whole_i = sum_c mean_i x_ic + mean_i r_i,    |mean_i r_i| <= mean_i tol_i:

the mean terms decompose the mean whole, and summary.json reports that residual beside its tolerance. A role
that a prompt does not name is an empty set of its sources: its term there is 0, which keeps every prompt's sum.

Neurons across the data set. Each prompt keeps its own top K in prompts.jsonl, but a neuron in one prompt's top K
is usually not in every other's. The sweep therefore also keeps every neuron's exact term of every prompt, in
binary side files (neurons/part-*.npz, [P, L, F, Z]), and the summary aggregates, per layer, the union U_l of
the prompts' top-K sets and the K neurons of largest |mean| (a neuron that matters a little in every prompt but
most in none), each with its exact term in every prompt, plus L{l}N.rest = the sum over the neurons outside U_l.

Output folder (`--out DIR`): sweep.json (the settings; a re-run must match them), prompts.jsonl, prompts.parquet/
(long format, one part per chunk; pyarrow), neurons/ and neurons.parquet (with neurons:K: every neuron's term,
and the aggregated neurons' terms in long format), errors.jsonl, summary.json, *.png (--plot).
A chunk is committed by appending its lines to prompts.jsonl in one write, after its side files are in place
(each written whole, then renamed); a re-run skips the committed chunks and drops a torn last write.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import prisms
from .errors import InputError, OutputError
from .files import atomic_write
from .record import Selection

FIELDS = ("id", "prompt", "ids", "targets", "versus", "counterfactual", "position", "roles")
ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
OTHER = "other"  # the sources of a prompt without a role
FORMAT = 1  # of the output folder; sweep.json records it
CONFIDENCE = 0.95
MAX_RESAMPLES = 100_000  # bootstrap resamples: the [B, n] counts and [B, 4096] means stay in memory
DATASETS = ("capitals", "additions")  # shipped in refprism/data/ (tools/make_datasets.py writes and checks them)


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Row:
    """One row of the data set as read, before the model; `line` is where it starts in the file (1-based)."""

    line: int
    id: str
    prompt: object  # text, or a tuple of token ids
    targets: tuple
    versus: tuple = ()
    position: int | None = None
    roles: tuple[tuple[str, int], ...] = ()
    counterfactual: object = None


@dataclass(frozen=True)
class BadRow:
    """A row the sweep skips, with its line number and why (errors.jsonl)."""

    line: int
    id: str | None
    error: str

    def to_json(self) -> dict:
        return {"line": self.line, "id": self.id, "error": self.error}


class _Bad(Exception):
    """A row's fields do not fit the format (becomes a BadRow)."""


def data_path(data) -> Path:
    """The data set's file: a path, or the name of a data set that ships with refprism (capitals, additions)."""
    path = Path(data)
    if not path.exists() and str(data) in DATASETS:
        from importlib import resources

        return Path(str(resources.files("refprism") / "data" / f"{data}.jsonl"))
    return path


def read_rows(path) -> list:
    """A JSONL (.jsonl, .ndjson) or CSV (.csv) data set -> Rows and BadRows, in file order.

    A row that cannot be read (malformed JSON, a missing or mistyped field, an unknown field) is a BadRow naming
    its line; blank lines are skipped. A CSV file needs a header of known columns; a cell holding a list is a
    JSON array (["▁Paris"]) or words separated by spaces, `ids` may also be "2,651,6037", `roles` is a JSON object.
    """
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".ndjson", ".csv"):
        raise InputError(f"the data set {path} must be a .jsonl (one JSON object a line) or a .csv file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the data set {path}: {e.strerror or e}") from None
    return _read_csv(data, path) if kind == ".csv" else _read_jsonl(data)


def _read_jsonl(data: bytes) -> list:
    rows = []
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte order mark (some editors write one)
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            rows.append(BadRow(n, None, f"not valid UTF-8 (byte {e.start} of the line)"))
            continue
        except json.JSONDecodeError as e:
            rows.append(BadRow(n, None, f"malformed JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append(BadRow(n, None, 'a row is a JSON object: {"id": ..., "prompt": ..., "targets": [...]}'))
            continue
        rows.append(_row(obj, n))
    return rows


def _read_csv(data: bytes, path: Path) -> list:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"the data set {path} is not valid UTF-8 (byte offset {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return []
    unknown = [h for h in header if h not in FIELDS]
    if unknown or len(set(header)) != len(header):
        what = f"unknown column {unknown[0]!r}" if unknown else "a column named twice"
        raise InputError(f"the data set {path}: {what} in the header (columns: {', '.join(FIELDS)})")
    rows, previous = [], reader.line_num
    for cells in reader:
        start, previous = previous + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            rows.append(BadRow(start, None, f"{len(cells)} cells, but the header has {len(header)} columns"))
            continue
        fields = {h: c for h, c in zip(header, cells) if c != ""}
        try:
            fields = _csv_fields(fields)
        except _Bad as e:
            rows.append(BadRow(start, fields.get("id"), str(e)))
            continue
        rows.append(_row(fields, start))
    return rows


def _csv_fields(fields: dict) -> dict:
    """CSV cells (text) -> the JSONL row's types."""
    out = dict(fields)
    for key in ("targets", "versus"):
        if key in out:
            out[key] = _json_cell(key, out[key]) if out[key].lstrip().startswith("[") else out[key].split()
    if "ids" in out:
        cell = out["ids"]
        if cell.lstrip().startswith("["):
            out["ids"] = _json_cell("ids", cell)
        else:
            try:
                out["ids"] = [int(t) for t in cell.replace(",", " ").split()]
            except ValueError:
                raise _Bad(f"ids {cell!r}: token ids are integers, comma or space separated") from None
    if "position" in out:
        try:
            out["position"] = int(out["position"])
        except ValueError:
            raise _Bad(f"position {out['position']!r} is not an integer") from None
    if "roles" in out:
        out["roles"] = _json_cell("roles", out["roles"])
    return out


def _json_cell(key, cell):
    try:
        return json.loads(cell)
    except json.JSONDecodeError as e:
        raise _Bad(f"{key}: malformed JSON in the cell ({e.msg})") from None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _row(fields: dict, line: int):
    """A row's fields (JSON types) -> Row, or BadRow naming the first problem."""
    rid = fields.get("id")
    ident = str(rid) if (isinstance(rid, str) and rid.strip()) or _is_int(rid) else None
    try:
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise _Bad(f"unknown field {unknown[0]!r} (a row has {', '.join(FIELDS)})")
        if ident is None:
            raise _Bad("every row needs an id: a non-empty string or an integer")
        if ("prompt" in fields) == ("ids" in fields):
            raise _Bad("give the prompt once: as text (prompt) or as token ids (ids)")
        prompt = fields.get("prompt")
        if "ids" in fields:
            ids = fields["ids"]
            if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
                raise _Bad("ids must be a non-empty list of integer token ids")
            prompt = tuple(int(i) for i in ids)
        elif not isinstance(prompt, str):
            raise _Bad("prompt must be text (or give token ids as ids)")
        targets = _tokens(fields.get("targets"), "targets")
        if not targets:
            raise _Bad("every row needs targets: a token (▁Paris, #7127) or a list of them")
        versus = _tokens(fields.get("versus"), "versus")
        position = fields.get("position")
        if position is not None and not _is_int(position):
            raise _Bad("position must be an integer (negative counts from the end)")
        roles = fields.get("roles") or {}
        if not isinstance(roles, dict):
            raise _Bad('roles must be an object of names and source positions, e.g. {"country": 5}')
        for name, at in roles.items():
            if not ROLE_NAME.match(name) or name == OTHER:
                raise _Bad(f"role name {name!r}: use letters, digits, _ or - (starting with a letter), not {OTHER!r}")
            if not _is_int(at):
                raise _Bad(f"role {name!r}: a source position is an integer, got {at!r}")
        cf = fields.get("counterfactual")
        if cf is not None and not (isinstance(cf, str) or (isinstance(cf, list) and all(_is_int(i) for i in cf))):
            raise _Bad("counterfactual must be text or a list of token ids")
    except _Bad as e:
        return BadRow(line, ident, str(e))
    return Row(line, ident, prompt, targets, versus, None if position is None else int(position),
               tuple((k, int(v)) for k, v in roles.items()), tuple(cf) if isinstance(cf, list) else cf)


def _tokens(value, key) -> tuple:
    """A token spec or a list of them (strings, or integers as ids) -> tuple."""
    if value is None:
        return ()
    value = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(value, list) or not all(isinstance(v, str) or _is_int(v) for v in value):
        raise _Bad(f"{key} must be a token (▁Paris, #7127, or an integer id) or a list of them")
    return tuple(value)


@dataclass(frozen=True)
class Item:
    """A row made ready for the model (all a worker needs): token ids, the read position, targets, roles."""

    index: int  # its place among the good rows: the order of prompts.jsonl and of the chunks
    line: int
    id: str
    tokens: tuple[int, ...]
    position: int  # 0 .. T-1
    targets: prisms.Targets
    roles: tuple[tuple[str, int], ...] = ()  # (name, source position 0 .. position)
    counterfactual: object = None


def prepare(model, rows, *, counterfactual=False) -> tuple[list[Item], list[BadRow]]:
    """Tokenize each row and resolve its targets, position and roles with the model; a row that does not fit
    (an unknown target token, a prompt beyond the context, a role after the read position, an id used twice, a
    different number of targets than the first good row) becomes a BadRow. counterfactual: every row needs one
    (resample ablation under --validate), of the prompt's token count; it is kept as token ids."""
    items, bad, seen, first = [], [], {}, None
    for row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            if row.id is not None:
                seen.setdefault(row.id, row.line)
            continue
        try:
            if row.id in seen:
                raise InputError(f"id {row.id!r} is also the id of line {seen[row.id]}: ids must be unique")
            seen[row.id] = row.line
            tokens = model.encode(row.prompt if isinstance(row.prompt, str) else list(row.prompt))
            T = len(tokens)
            p = -1 if row.position is None else row.position
            if not -T <= p < T:
                raise InputError(f"position {p} is out of range for {T} tokens (use 0 .. {T - 1} or -{T} .. -1)")
            p %= T
            targets = prisms.resolve_targets(model, row.targets, row.versus)
            if first is None:
                first = (len(targets.targets), row.line)
            elif len(targets.targets) != first[0]:
                raise InputError(f"{len(targets.targets)} targets, but line {first[1]} has {first[0]}: every row "
                                 "needs the same number of targets (one column each)")
            roles = []
            for name, at in row.roles:
                if not -T <= at < T or at % T > p:
                    raise InputError(f"role {name!r} at {at}: a source is a position 0 .. {p} (at or before the read "
                                     f"position {p}; negative counts from the end of the {T} tokens)")
                if at % T in [s for _, s in roles]:
                    raise InputError(f"role {name!r} names source {at % T}, which another role names too")
                roles.append((name, at % T))
            cf = row.counterfactual
            if counterfactual:
                if cf is None:
                    raise InputError("no counterfactual: --validate with --ablate resample takes each component's "
                                     "value from the row's counterfactual prompt")
                cf = tuple(int(t) for t in model.encode(cf if isinstance(cf, str) else list(cf)))
                if len(cf) != T:
                    raise InputError(f"the counterfactual has {len(cf)} tokens and the prompt {T}: resample "
                                     "ablation pairs positions, so both need the same token count")
        except InputError as e:
            bad.append(BadRow(row.line, row.id, str(e)))
            continue
        items.append(Item(len(items), row.line, row.id, tuple(int(t) for t in tokens), p, targets, tuple(roles),
                          cf))
    return items, bad


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
    """--validate LEVEL [--ablate MODE] [--validate-top N]: refprism.interventions.validate per prompt."""

    level: str
    ablate: object = None
    top: int | None = None

    def to_json(self) -> dict:
        return {"level": self.level, "ablate": self.ablate, "top": self.top}

    def check(self, model) -> None:
        """The level and the ablation as refprism.interventions reads them (one-line errors naming --validate)."""
        from . import interventions

        try:
            interventions.level_groups(model.config, self.level, 0)
        except InputError as e:
            raise InputError(str(e).replace("--level", "--validate", 1)) from None
        if self.ablate is not None and self.ablate not in interventions.ABLATIONS:
            raise InputError(f"--ablate {self.ablate!r} is not one of zero, mean, resample")
        if self.top is not None and (not _is_int(self.top) or self.top < 1):
            raise InputError(f"--validate-top must be an integer >= 1, got {self.top!r}")


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
    from . import interventions

    kw = {"level": v.level}
    counterfactual = None
    if v.ablate == "resample":  # only resampling reads it: token ids (prepare), cut where the prompt is
        counterfactual = list(item.counterfactual[:item.position + 1])
    kw.update({k: x for k, x in (("ablate", v.ablate), ("top", v.top), ("counterfactual", counterfactual))
               if x is not None})
    result = interventions.validate(model, list(item.tokens[:item.position + 1]),
                                    targets=[f"#{t.id}" for t in item.targets.targets],
                                    versus=[f"#{t.id}" for t in item.targets.versus], **kw)
    return result.to_json()


def _floats(a) -> list[float]:
    return [float(x) for x in np.asarray(a).ravel()]


# ------------------------------------------------------------------------------------------------- the sweep


def sweep(data, model, out, *, levels="residual,heads", chunk=16, backend="local", workers=None, address=None,
          validate: Validation | None = None, strict=False, quiet=False, plot=False, bootstrap=1000, seed=0,
          top=10, warn=None, stats=None, _fault=None) -> dict:
    """Run the levels' prisms over every prompt of `data` into the folder `out`, resuming what is done there;
    aggregate into out/summary.json (returned) and, with plot, its figures.

    backend: "local" (packed passes in this process) or "ray" (refprism/sweeps_ray.py: actors holding the
             model, reading the weights zero-copy from Ray's object store; `address` joins a cluster, `workers`
             sets how many actors, default one per node).
    chunk:   prompts per unit of work: what is written at once, what a worker computes at once, and at most what
             an interruption loses.
    strict:  stop at the first bad row (InputError naming its line) instead of reporting it and going on.
    warn:    called with one line per bad row (default: stderr).
    stats:   a dict the Ray backend fills with its actors' reports (sweeps_ray.run_chunks).
    """
    levels = Levels.parse(levels) if isinstance(levels, str) else levels
    for name, value, low, high in (("chunk", chunk, 1, None), ("bootstrap", bootstrap, 1, MAX_RESAMPLES),
                                   ("seed", seed, 0, None), ("top", top, 1, None)):
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"from {low} to {high}"
            raise InputError(f"{name} must be an integer {bound}, got {value!r}")
    if backend not in ("local", "ray"):
        raise InputError(f"backend {backend!r} is not one of local, ray")
    if validate is not None:  # checked before any work: a bad level or ablation is one line, not a failed chunk
        validate.check(model)
    warn = warn or (lambda line: print(f"refprism: warning: {line}", file=sys.stderr))
    data = data_path(data)
    rows = read_rows(data)
    items, bad = prepare(model, rows, counterfactual=validate is not None and validate.ablate == "resample")
    bad.sort(key=lambda b: b.line)
    if strict and bad:
        raise InputError(f"{data} line {bad[0].line}: {bad[0].error} (--strict stops at the first bad row)")
    manifest = {
        "format": FORMAT,
        "data": {"file": data.name, "sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "rows": len(rows)},
        "model": {"name": model.name, "fingerprint": model_fingerprint(model)},
        "dtype": str(model.dtype), "levels": str(levels), "chunk": chunk,
        "validate": None if validate is None else validate.to_json(),
        "parquet": _have_pyarrow(),
    }
    folder = Folder.open(out, manifest)
    folder.write_errors(bad)
    for b in bad:
        warn(f"{data} line {b.line}: {b.error} (skipped; listed in {folder.path / 'errors.jsonl'})")
    plan = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    done = folder.committed(plan)
    todo = [(k, plan[k]) for k in range(len(plan)) if k not in done]
    progress = Progress(len(items), sum(len(plan[k]) for k in done), quiet=quiet)

    def commit(k, results):
        folder.commit(model, levels, plan[k], results)
        progress.update(len(results))
        _test_hold()

    try:
        if backend == "local":
            for k, chunk_items in todo:
                commit(k, compute_chunk(model, chunk_items, levels, validate=validate))
        else:
            from .sweeps_ray import run_chunks

            run_chunks(model, todo, levels, commit, workers=workers, address=address, validate=validate,
                       fault=_fault, stats=stats)
    finally:
        progress.close()
    summary = summarize(folder.path, bootstrap=bootstrap, seed=seed, top=top)
    atomic_write(folder.path / "summary.json",
                 lambda tmp: tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n", "utf-8"))
    if levels.neurons and folder.manifest["parquet"]:
        write_neuron_parquet(folder.path, summary)
    if plot:
        from . import plots_sweeps

        plots_sweeps.write_figures(summary, folder.path)
    return summary


def model_fingerprint(model) -> str:
    """A short hash of the model's config, dtype, norm weights and a few embedding rows: a resumed sweep must
    run the same model (the same checkpoint under another path is the same model)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    h.update(str(model.dtype).encode())
    params, V = model.params, model.config.vocab_size
    arrays = [params.ln_final, params.embed_rows([0, 1, 2, V // 2, V - 1])]
    arrays += [params.get(l, "ln1") for l in range(model.config.n_layers)]
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _test_hold() -> None:
    """Test hook: with REFPRISM_SWEEP_TEST_HOLD="PATH", after each commit create PATH and wait to be killed
    (tests/test_sweeps.py kills the process between chunks and resumes)."""
    path = os.environ.get("REFPRISM_SWEEP_TEST_HOLD")
    if path:
        Path(path).write_text("committed\n")
        while True:
            time.sleep(60)


class Progress:
    """A progress bar with rate and ETA on stderr (tqdm when installed, else a line per chunk); none when quiet."""

    def __init__(self, total, initial=0, *, quiet=False):
        self.total, self.n, self.quiet, self.start, self.bar = total, initial, quiet, time.monotonic(), None
        self.initial = initial
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"sweep: {initial}/{total} prompts done", file=sys.stderr)
            return
        self.bar = tqdm(total=total, initial=initial, unit="prompt", desc="sweep", file=sys.stderr, smoothing=0.1)

    def update(self, n):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet:
            rate = (self.n - self.initial) / max(time.monotonic() - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            print(f"sweep: {self.n}/{self.total} prompts, {rate:.2f} prompts/s, ETA {eta:.0f} s", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------- the folder


@dataclass
class Folder:
    """The output folder of one sweep and its settings (sweep.json); commits chunks, finds what is done."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, out, manifest) -> "Folder":
        """Create the folder, or reopen one holding a sweep of the same settings (anything else is refused)."""
        path = Path(out)
        settings = path / "sweep.json"
        try:
            if settings.is_file():
                old = json.loads(settings.read_text("utf-8"))
                for key in manifest:
                    a, b = old.get(key), manifest[key]
                    if key == "model":
                        a, b = (a or {}).get("fingerprint"), b["fingerprint"]
                    if a != b:
                        raise InputError(f"--out {path} holds a sweep with other settings ({key}: {json.dumps(a)} "
                                         f"there, {json.dumps(b)} now): give another --out, or delete it to start "
                                         "over")
                return cls(path, old)
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise InputError(f"--out {path} exists and is not a sweep folder (no sweep.json): give a new or "
                                 "empty folder")
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot use --out {path}: {e.strerror or e}") from None
        except json.JSONDecodeError:
            raise InputError(f"{settings} is not valid JSON: delete the folder to start over") from None
        atomic_write(settings, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n", "utf-8"))
        return cls(path, manifest)

    def write_errors(self, bad) -> None:
        text = "".join(json.dumps(b.to_json(), ensure_ascii=False) + "\n" for b in bad)
        atomic_write(self.path / "errors.jsonl", lambda tmp: tmp.write_text(text, "utf-8"))

    def committed(self, plan) -> set[int]:
        """The chunks already in prompts.jsonl. A torn last write (an interruption during the append) is cut off;
        anything else out of place means the file was changed by hand, and is refused."""
        path = self.path / "prompts.jsonl"
        if not path.exists():
            return set()
        *lines, tail = path.read_bytes().split(b"\n")  # tail: after the last newline (b"" unless torn)
        chunk = self.manifest["chunk"]
        done, offset, block, block_start = set(), 0, [], 0
        for n, raw in enumerate(lines, start=1):
            try:
                line = json.loads(raw)
                index, ident = line["index"], line["id"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise InputError(f"{path} line {n} is damaged: delete the folder to start over") from None
            k = index // chunk if _is_int(index) else -1
            # each chunk's lines were appended together, in its items' order
            expected = plan[k][len(block)] if 0 <= k < len(plan) and len(block) < len(plan[k]) else None
            if k in done or expected is None or (expected.index, expected.id) != (index, ident) or (
                    block and k != block[0] // chunk):
                raise InputError(f"{path} line {n} does not fit this sweep's chunks (was the file edited?): delete "
                                 "the folder to start over")
            if not block:
                block_start = offset
            block.append(index)
            offset += len(raw) + 1
            if len(block) == len(plan[k]):
                done.add(k)
                block = []
        if block or tail:  # a torn last chunk: lines without the rest of their chunk, or a line without its end
            with open(path, "r+b") as f:
                f.truncate(block_start if block else offset)
        return done

    def commit(self, model, levels, items, results) -> None:
        """Write one chunk: its neuron terms and Parquet part (each whole, then renamed), then its lines appended
        to prompts.jsonl in one write (the commit)."""
        k = items[0].index // self.manifest["chunk"]
        lines = [prompt_json(model, it, res) for it, res in zip(items, results)]
        if levels.neurons:
            (self.path / "neurons").mkdir(exist_ok=True)
            index = np.array([it.index for it in items])
            terms = np.stack([res.neurons for res in results])
            atomic_write(self.path / "neurons" / f"part-{k:06d}.npz", lambda tmp: np.savez(tmp, index=index,
                                                                                           terms=terms))
        if self.manifest["parquet"]:
            (self.path / "prompts.parquet").mkdir(exist_ok=True)
            write_parquet(self.path / "prompts.parquet" / f"part-{k:06d}.parquet", lines)
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        try:
            with open(self.path / "prompts.jsonl", "ab") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"could not append to {self.path / 'prompts.jsonl'}: {e.strerror or e} (a re-run "
                              "resumes from the last whole chunk)") from None


def prompt_json(model, item: Item, result: PromptResult) -> dict:
    """One line of prompts.jsonl: the prompt (id, tokens, position, targets, roles) and every split requested."""
    line = {
        "id": item.id, "index": item.index, "line": item.line,
        "tokens": [{"id": int(t), "piece": model.piece(t)} for t in item.tokens],
        "position": item.position,
        "targets": [t.to_json() for t in item.targets.targets], "versus": [t.to_json() for t in item.targets.versus],
        "columns": item.targets.labels,
        "roles": dict(item.roles),
        "splits": [t.to_json() for t in result.terms],
    }
    if result.validate is not None:
        line["validate"] = result.validate
    return line


PARQUET_COLUMNS = ("id", "index", "line", "prism", "whole_label", "label", "column", "value", "whole")


def write_parquet(path: Path, lines) -> None:
    """The chunk's terms in long format, one row per (prompt, split, component, column): the columns of
    PARQUET_COLUMNS (`pandas.read_parquet(DIR / "prompts.parquet")` reads every part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {name: [] for name in PARQUET_COLUMNS}
    for line in lines:
        for split in line["splits"]:
            whole = split["whole"]
            for comp in split["components"]:
                for z, value in enumerate(comp["values"]):
                    for name, x in zip(PARQUET_COLUMNS, (line["id"], line["index"], line["line"], split["prism"],
                                                         whole["label"], comp["label"], z, value,
                                                         whole["values"][z])):
                        cols[name].append(x)
    types = {"id": pa.string(), "index": pa.int64(), "line": pa.int64(), "prism": pa.string(),
             "whole_label": pa.string(), "label": pa.string(), "column": pa.int32(), "value": pa.float64(),
             "whole": pa.float64()}
    table = pa.table({name: pa.array(cols[name], type=types[name]) for name in PARQUET_COLUMNS})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


NEURON_COLUMNS = ("id", "index", "line", "layer", "label", "column", "value")


def write_neuron_parquet(folder, summary) -> None:
    """neurons.parquet: every prompt's exact term of each neuron the summary aggregates (each layer's union of
    the prompts' top K and the K largest means, and L{l}N.rest), one row per (prompt, neuron, column): the data
    behind the neuron aggregates, for per-group questions (e.g. by the answer's digit) in a data frame."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    prompts = read_prompts(folder)
    _, terms = read_neurons(folder)
    cols = {name: [] for name in NEURON_COLUMNS}
    for split in summary["splits"]:
        if split["prism"] != "neurons":
            continue
        layer = int(split["whole"]["label"][1:].split(".")[0])
        labels = [c["label"] for c in split["components"]]
        chosen = [int(label[len(f"L{layer}N"):]) for label in labels[:-1]]
        rest = np.ones(terms.shape[2], dtype=bool)
        rest[chosen] = False
        values = np.concatenate([terms[:, layer, chosen].astype(np.float64),
                                 terms[:, layer, rest].astype(np.float64).sum(axis=1, keepdims=True)], axis=1)
        for i, p in enumerate(prompts):  # values [n, C, Z]
            for c, label in enumerate(labels):
                for z, v in enumerate(values[i, c]):
                    for name, x in zip(NEURON_COLUMNS, (p["id"], p["index"], p["line"], layer, label, z, float(v))):
                        cols[name].append(x)
    types = {"id": pa.string(), "index": pa.int64(), "line": pa.int64(), "layer": pa.int32(), "label": pa.string(),
             "column": pa.int32(), "value": pa.float64()}
    table = pa.table({name: pa.array(cols[name], type=types[name]) for name in NEURON_COLUMNS})
    atomic_write(folder / "neurons.parquet", lambda tmp: pq.write_table(table, tmp))


# ------------------------------------------------------------------------------------------------- aggregation


def read_prompts(folder) -> list[dict]:
    """prompts.jsonl's lines, in data-set order (a Ray sweep writes chunks as they return)."""
    path = Path(folder) / "prompts.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return sorted((json.loads(line) for line in f), key=lambda line: line["index"])


def read_neurons(folder) -> tuple[np.ndarray, np.ndarray]:
    """Every neuron's term of every prompt from neurons/part-*.npz: (index [n], terms [n, L, F, Z]), in data-set
    order."""
    parts = sorted((Path(folder) / "neurons").glob("part-*.npz"))
    index, terms = [], []
    for part in parts:
        with np.load(part, allow_pickle=False) as z:
            index.append(z["index"])
            terms.append(z["terms"])
    if not parts:
        return np.zeros(0, dtype=int), np.zeros((0, 0, 0, 0))
    index, terms = np.concatenate(index), np.concatenate(terms)
    order = np.argsort(index, kind="stable")
    return index[order], terms[order]


def summarize(folder, *, bootstrap=1000, seed=0, top=10) -> dict:
    """summary.json of a sweep folder: per split (prism, whole) the mean of every component with its bootstrap
    interval and sign agreement, the residual of the means beside its tolerance, and the top components of each
    prism across the data set. A pure function of the folder's files (and bootstrap, seed, top)."""
    folder = Path(folder)
    manifest = json.loads((folder / "sweep.json").read_text("utf-8"))
    prompts = read_prompts(folder)
    errors = (folder / "errors.jsonl").read_text("utf-8").splitlines() if (folder / "errors.jsonl").exists() else []
    tables = _tables(prompts, folder, Levels.parse(manifest["levels"]))
    n = len(prompts)
    columns = _column_labels(prompts)
    # every whole and component of every table as one matrix [n, M]: one set of resamples serves all
    arrays = [a for t in tables for a in [t["whole"], *t["values"]]]  # each [n, Z]
    flat = np.concatenate(arrays, axis=1) if arrays else np.zeros((n, 0))  # [n, M]
    stats = mean_interval_sign(flat, resamples=bootstrap, seed=seed)
    at = 0
    splits = []
    for t in tables:
        Z = t["whole"].shape[1]
        entries = []
        for _ in range(len(t["labels"]) + 1):
            entries.append({k: v[at:at + Z] for k, v in stats.items()})
            at += Z
        whole, parts = entries[0], entries[1:]
        means = np.array([p["mean"] for p in parts]).reshape(-1, Z)
        residual = whole["mean"] - means.sum(axis=0)
        # |mean r_i| <= mean tol_i; the means themselves are float64 sums: 1e-12 of their size is plenty for that
        tolerance = t["tolerance"].mean(axis=0) + 1e-12 * (np.abs(whole["mean"]) + np.abs(means).sum(axis=0))
        named = t.get("named") or [None] * len(parts)  # head-role: in how many prompts each role is named
        split = {"prism": t["prism"], "whole": {"label": t["whole_label"], **_entry(whole)},
                 "components": [{"label": l, **_entry(p), **({} if k is None else {"prompts_named": k})}
                                for l, p, k in zip(t["labels"], parts, named)],
                 "residual": _floats(residual), "tolerance": _floats(tolerance),
                 "exact": bool(np.all(np.abs(residual) <= tolerance))}
        splits.append(split)
    summary = {
        "sweep": {"data": manifest["data"], "model": manifest["model"], "dtype": manifest["dtype"],
                  "levels": manifest["levels"], "prompts": n, "bad_rows": len(errors)},
        "columns": columns,
        "bootstrap": {"resamples": bootstrap, "seed": seed, "confidence": CONFIDENCE, "method": "percentile"},
        "splits": splits,
        "top": top_components(splits, top),
        "exact": all(s["exact"] for s in splits),
    }
    validations = [p["validate"] for p in prompts if p.get("validate")]
    if validations:
        summary["validate"] = validation_summary(validations, bootstrap=bootstrap, seed=seed)
    return summary


# The agreement metrics of a validation that are averaged over prompts (refprism.interventions.Validation).
AGREEMENT = ("spearman", "kendall", "sign_agreement", "top_k_precision", "top_k_recall", "reruns_to_true_top_k")
EFFECTS = ("prism", "direct", "total", "norm_rescaling", "mediated")


def validation_summary(validations, *, bootstrap=1000, seed=0) -> dict:
    """--validate over the data set: each agreement metric's mean over prompts with its bootstrap interval, the
    faithfulness curve's k80/k90, and per component (by label, over the prompts that validated it) the mean of
    its prism term, direct and total effect and the gap's parts, with intervals and sign agreement.

    Math:   as for the prisms' terms (mean_interval_sign), over the prompts' validations; a metric that is NaN in
            a prompt (e.g. a rank correlation of constant values) is left out of that metric's mean.
    """
    out = {"prompts": len(validations), "level": validations[0].get("level"), "ablate": validations[0].get("ablate"),
           "direction": validations[0].get("direction"), "agreement": {}, "components": []}
    metrics = {m: [v["agreement"][m] for v in validations if v["agreement"].get(m) is not None] for m in AGREEMENT}
    faith = {k: [v["faithfulness"][k] for v in validations if isinstance(v.get("faithfulness"), dict)
                 and v["faithfulness"].get(k) is not None] for k in ("k80", "k90")}
    for name, values in {**metrics, **faith}.items():
        x = np.asarray([float(v) for v in values], dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size:
            st = mean_interval_sign(x[:, None], resamples=bootstrap, seed=seed)
            out["agreement"][name] = {"mean": float(st["mean"][0]), "ci": [float(st["lo"][0]), float(st["hi"][0])],
                                      "prompts": int(x.size)}
    by_label: dict[str, list] = {}
    for v in validations:
        for c in v["components"]:
            by_label.setdefault(c["label"], []).append(c)
    for label, rows in by_label.items():
        entry = {"label": label, "prompts": len(rows)}
        for key in EFFECTS:
            st = mean_interval_sign(np.asarray([r[key] for r in rows], dtype=np.float64), resamples=bootstrap,
                                    seed=seed)
            entry[key] = _entry(st)
        out["components"].append(entry)
    return out


def mean_interval_sign(x, *, resamples=1000, seed=0) -> dict[str, np.ndarray]:
    """Per column of x [n, M]: mean, percentile-bootstrap interval (lo, hi) and the share of rows with the
    mean's sign (module docstring).

    Math:   m = (1/n) sum_i x_i;   w_b ~ Multinomial(n; 1/n ...), m_b = (1/n) w_b . x   (b = 1 .. B)
            lo, hi = the (1 - CONFIDENCE)/2 and (1 + CONFIDENCE)/2 quantiles of m_b;  same = mean_i [sign x_i = sign m]
    Shapes: x [n, M] -> mean, lo, hi, same_sign [M]
    """
    x = np.asarray(x, dtype=np.float64)
    n, M = x.shape
    if n == 0:
        nan = np.full(M, np.nan)
        return {"mean": nan, "lo": nan, "hi": nan, "same_sign": nan}
    mean = x.mean(axis=0)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    lo, hi = np.empty(M), np.empty(M)
    q = [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]
    for a in range(0, M, 4096):  # [B, 4096] resample means at a time
        means = counts @ x[:, a:a + 4096] / n
        lo[a:a + 4096], hi[a:a + 4096] = np.quantile(means, q, axis=0)
    same = (np.sign(x) == np.sign(mean)).mean(axis=0)
    return {"mean": mean, "lo": lo, "hi": hi, "same_sign": same}


def _entry(s) -> dict:
    return {"mean": _floats(s["mean"]), "ci": [[float(a), float(b)] for a, b in zip(s["lo"], s["hi"])],
            "same_sign": _floats(s["same_sign"])}


def _column_labels(prompts) -> list[str]:
    if not prompts:
        return []
    Z = len(prompts[0]["targets"])
    foils = {bool(p["versus"]) for p in prompts}
    tail = " - mean(versus)" if foils == {True} else "" if foils == {False} else " - mean(versus, where given)"
    return [f"target {z}{tail}" for z in range(Z)]


def _tables(prompts, folder, levels) -> list[dict]:
    """Per split (prism, whole label): labels [C], values [C] of [n, Z], wholes [n, Z], per-prompt tolerances
    [n, Z], in the prompts' split order. head-source splits (by source index) are not aggregated: prompts
    differ in length; their roles are (head-role)."""
    n = len(prompts)
    if n == 0:
        return []
    keys = [(s["prism"], s["whole"]["label"]) for s in prompts[0]["splits"] if s["prism"] != "head-source"]
    splits = [{(s["prism"], s["whole"]["label"]): s for s in p["splits"]} for p in prompts]
    roles = list(dict.fromkeys(name for p in prompts for name in p["roles"]))
    neurons = read_neurons(folder) if levels.neurons else None
    if neurons is not None and not np.array_equal(neurons[0], [p["index"] for p in prompts]):
        raise InputError(f"{folder}/neurons does not match prompts.jsonl: delete the folder to start over")
    tables = []
    for prism, whole_label in keys:
        got = [s[prism, whole_label] for s in splits]
        table = {"prism": prism, "whole_label": whole_label,
                 "whole": np.array([s["whole"]["values"] for s in got]),
                 "tolerance": np.array([s["tolerance"] for s in got])}
        Z = table["whole"].shape[1]
        if prism == "neurons":
            layer = int(whole_label[1:].split(".")[0])
            table.update(_neuron_table(got, neurons[1][:, layer], layer, levels.neurons))
        else:
            values = [{c["label"]: c["values"] for c in s["components"]} for s in got]
            if prism == "head-role":
                heads = list(dict.fromkeys(label.split(".")[0] for label in values[0]))
                labels = [f"{h}.{r}" for h in heads for r in roles + [OTHER]]
                table["named"] = [sum(r in p["roles"] for p in prompts) if r != OTHER else None
                                  for h in heads for r in roles + [OTHER]]
            else:
                labels = list(values[0])
            table["labels"] = labels
            table["values"] = [np.array([v.get(label, [0.0] * Z) for v in values]) for label in labels]
        tables.append(table)
    return tables


def _neuron_table(got, terms, layer, k) -> dict:
    """A layer's neurons across the data set: the union of the prompts' top-K and the K of largest |mean|, each
    with its exact term in every prompt (terms [n, F, Z] from the side files), and L{l}N.rest for the others."""
    union = {int(c["label"][len(f"L{layer}N"):]) for s in got for c in s["components"]
             if not c["label"].endswith(".rest")}
    mean = terms.astype(np.float64).mean(axis=0)  # [F, Z]
    union |= set(np.argsort(-np.abs(mean).max(axis=1), kind="stable")[:k].tolist())
    chosen = sorted(union)
    rest = np.ones(terms.shape[1], dtype=bool)
    rest[chosen] = False
    values = [terms[:, n].astype(np.float64) for n in chosen] + [terms[:, rest].astype(np.float64).sum(axis=1)]
    return {"labels": [f"L{layer}N{n}" for n in chosen] + [f"L{layer}N.rest"], "values": values}


def top_components(splits, top) -> dict[str, list]:
    """Per prism, the `top` components across the data set with the largest max |mean| over columns (not the
    .rest of the neurons: it is many neurons)."""
    out = {}
    for split in splits:
        for c in split["components"]:
            if not c["label"].endswith(".rest"):
                out.setdefault(split["prism"], []).append({"label": c["label"], "of": split["whole"]["label"],
                                                            **{k: c[k] for k in ("mean", "ci", "same_sign")}})
    return {prism: sorted(rows, key=lambda r: -max(abs(m) for m in r["mean"]))[:top] for prism, rows in out.items()}
