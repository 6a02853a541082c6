"""`sweep`: read the data, skip what the output folder already holds, run the rest in chunks (locally or on Ray),
and write the summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from refprism.errors import InputError
from refprism.files import atomic_write
from refprism.sweeps.compute import Levels, Validation, compute_chunk
from refprism.sweeps.folder import FORMAT, Folder, write_neuron_parquet
from refprism.sweeps.rows import _is_int, data_path, prepare, read_rows
from refprism.sweeps.summary import MAX_RESAMPLES, summarize


def sweep(data, model, out, *, levels="residual,heads", chunk=16, backend="local", workers=None, address=None,
          validate: Validation | None = None, strict=False, quiet=False, plot=False, bootstrap=1000, seed=0,
          top=10, warn=None, stats=None, _fault=None) -> dict:
    """Run the levels' prisms over every prompt of `data` into the folder `out`, resuming what is done there;
    aggregate into out/summary.json (returned) and, with plot, its figures.

    backend: "local" (packed passes in this process) or "ray" (refprism/sweeps/ray.py: actors holding the
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
    if not items:  # nothing to compute (and no summary over zero prompts): refused before the weights are read
        for b in bad:
            warn(f"{data} line {b.line}: {b.error}")
        raise InputError(f"nothing ran: all {len(bad)} rows of {data} are bad (each is named above)")
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
            from refprism.sweeps.ray import run_chunks

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
        from refprism.sweeps import plots as plots_sweeps

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
