"""The data: a JSONL or CSV file of prompts (or a shipped data set by name) read into checked `Row`s, a bad row
kept with its line number and reason, and the rows prepared for a model (`Item`: tokens, targets, roles).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refprism import prisms
from refprism.errors import InputError

FIELDS = ("id", "prompt", "ids", "targets", "versus", "counterfactual", "position", "roles")


ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


OTHER = "other"  # the sources of a prompt without a role


DATASETS = ("capitals", "additions")  # shipped in refprism/sweeps/data/ (tools/make_datasets.py writes and checks them)


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

        return Path(str(resources.files("refprism.sweeps") / "data" / f"{data}.jsonl"))
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
