"""The output folder: sweep.json, prompts.jsonl (a chunk committed by one append after its side files are in
place), the Parquet files, the neurons' side files, resume after a torn write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refprism.errors import InputError, OutputError
from refprism.files import atomic_write
from refprism.sweeps.compute import PromptResult
from refprism.sweeps.rows import Item, _is_int

FORMAT = 1  # of the output folder; sweep.json records it


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
