#!/usr/bin/env python3
"""Time and size `refprism sweep` on a gemma-2b-shaped random checkpoint: the local backend against Ray.

    python tools/bench_sweeps.py                               # 200 prompts, gemma-2b shape; report on stdout
    python tools/bench_sweeps.py --checkpoint /tmp/g2b-bf16    # an existing HF-layout checkpoint
    python tools/bench_sweeps.py --quick                       # tiny shape, 24 prompts: the harness end to end

The checkpoint is made once if missing (`python tools/make_checkpoint.py DIR --preset gemma-2b --dtype bfloat16
--shards 2`: random weights, the real gemma-2b tokenizer). The data set: the 40 countries of refprism's capitals
data set in 5 phrasings (200 prompts of 7 to 13 tokens), each read at its last token, target the capital versus the
other capitals, role `country`. Each case runs in its own fresh process (this script with --worker), one after the
other (never two gemma-2b-sized jobs at once), and prints one JSON line:

    local        refprism.load(dir) (float32, memory auto: fast when it fits), sweeps.sweep(backend="local")
    ray-W        the driver loads with memory="low" (bf16 maps; it only tokenizes and converts layer by layer
                 into the object store), sweeps.sweep(backend="ray", workers=W) on a local Ray with the
                 machine's CPUs: W actors of CPUs / W BLAS threads each, sharing one copy of the weights

Measured: load seconds, sweep seconds (Ray: from ray.init to the summary, so its start-up is in), prompts per
second over the sweep, the driver's peak RSS (ru_maxrss; with Ray it counts the object store pages the driver
wrote the weights into) and, with Ray, its private RSS (VmRSS - RssShmem) before ray.shutdown, and per actor at
the end VmHWM (peak RSS), VmRSS,
RssShmem (its share of the object store's pages) and VmRSS - RssShmem (what the actor holds privately: the
activations of a pass, its Python and NumPy). One copy of the weights shared by the actors shows as a large
RssShmem in each and a small VmRSS - RssShmem. Results are also compared with the local backend's, prompt by prompt
(bit-identical when an actor has as many BLAS threads as the local run; otherwise within float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "BENCH-RESULT "
PHRASINGS = ["The capital city of {c} is", "The capital of {c} is", "{c}'s capital city is",
             "The name of the capital of {c} is", "Q: What is the capital of {c}? A: The capital is"]
GB = 1e9


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def make_data(folder: Path, model_dir: Path, n: int) -> Path:
    """n prompts: the capitals data set's countries in the phrasings above, roles found with the tokenizer."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT / "tools"))
    from make_datasets import COUNTRIES

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = []
    for phrasing in PHRASINGS:
        for country, capital in COUNTRIES:
            prompt = phrasing.format(c=country)
            pieces = tok.encode(prompt).tokens
            row = {"id": f"{country.lower()}-{PHRASINGS.index(phrasing)}", "prompt": prompt,
                   "targets": ["▁" + capital] if tok.token_to_id("▁" + capital) is not None else ["#5"],
                   "versus": ["▁" + c for _, c in COUNTRIES if c != capital and tok.token_to_id("▁" + c) is not None]}
            where = [i for i, p in enumerate(pieces) if p in ("▁" + country, country)]
            if where:
                row["roles"] = {"country": where[0]}
            rows.append(row)
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n]), "utf-8")
    return path


def worker(spec: dict) -> dict:
    """One case in this fresh process."""
    import refprism
    from refprism import sweeps

    t = time.perf_counter()
    ray_case = spec["case"].startswith("ray")
    model = refprism.load(spec["checkpoint"], memory="low" if ray_case else "auto")
    out = {"case": spec["case"], "load_s": time.perf_counter() - t, "memory_mode": model.params.memory}
    stats = {}
    t = time.perf_counter()
    summary = sweeps.sweep(spec["data"], model, spec["out"], levels=spec["levels"], chunk=spec["chunk"],
                           backend="ray" if ray_case else "local", workers=spec.get("workers"), quiet=True,
                           warn=lambda line: None, stats=stats)
    out["sweep_s"] = time.perf_counter() - t
    out["prompts"] = summary["sweep"]["prompts"]
    out["prompts_per_s"] = out["prompts"] / out["sweep_s"]
    out["driver_peak_rss"] = peak_rss()
    out["actors"] = stats.get("actors", [])
    out["driver"] = stats.get("driver", {})  # Ray: /proc/self/status before ray.shutdown (kB)
    return out


def run_case(spec: dict) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result["wall_s"] = wall
            return result
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"case": spec["case"], "failed": f"exit {proc.returncode}", "stderr": tail, "wall_s": wall}


def max_difference(folder, reference) -> float:
    """The largest |a - b| / max(1, |b|) over every number of prompts.jsonl, prompt by prompt (0: bit-identical)."""
    def numbers(x):
        if isinstance(x, dict):
            return [v for k in sorted(x) for v in numbers(x[k])]
        if isinstance(x, list):
            return [v for item in x for v in numbers(item)]
        return [float(x)] if isinstance(x, float) else []

    def by_id(f):
        return {line["id"]: numbers(line) for line in map(json.loads, (f / "prompts.jsonl").read_text().splitlines())}

    ours, theirs = by_id(folder), by_id(reference)
    worst = 0.0
    for ident, b in theirs.items():
        a = ours[ident]
        worst = max([worst] + [abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b)])
    return worst


def report(results, args, checkpoint) -> str:
    lines = [f"# refprism sweep: local vs Ray ({args.prompts} prompts, levels {args.levels}, chunks of {args.chunk})",
             "", f"checkpoint {checkpoint}, {os.cpu_count()} CPUs", "",
             "| case | load s | sweep s | prompts/s | driver peak RSS (private at the end) | per actor: peak RSS / "
             "RSS / shared / RSS - shared |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['case']} | failed ({r['failed']}): {r['stderr']} | | | | |")
            continue
        actors = "; ".join(
            f"{a['memory_kb']['VmHWM'] * 1024 / GB:.2f} / {a['memory_kb']['VmRSS'] * 1024 / GB:.2f} / "
            f"{a['memory_kb']['RssShmem'] * 1024 / GB:.2f} / "
            f"{(a['memory_kb']['VmRSS'] - a['memory_kb']['RssShmem']) * 1024 / GB:.2f} GB" for a in r["actors"]) or "-"
        d = r.get("driver") or {}
        private = f" ({(d['VmRSS'] - d['RssShmem']) * 1024 / GB:.2f} GB)" if "RssShmem" in d else ""
        lines.append(f"| {r['case']} ({r['memory_mode']}) | {r['load_s']:.1f} | {r['sweep_s']:.1f} | "
                     f"{r['prompts_per_s']:.2f} | {r['driver_peak_rss'] / GB:.2f} GB{private} | {actors} |")
    lines += ["", "Against the local backend (OpenBLAS orders a product's sums by its thread count, so the numbers are "
              "bit-identical only when an actor has as many BLAS threads as the local run):"]
    lines += [f"- {r['case']}: summary.json {'bit-identical' if r['summary_equal'] else 'differs'}; largest "
              f"difference of a per-prompt number {r['max_difference']:.2g} (relative to max(1, |value|))"
              for r in results if "summary_equal" in r]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/g2b-bf16"))
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--levels", default="residual,heads,head-source")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--workers", default="1,2", help="the Ray cases: actors, comma separated (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 24 prompts")
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    sys.path.insert(0, str(ROOT))
    from refprism.checkpoints.synth import make_config, write_checkpoint

    preset = "tiny" if args.quick else "gemma-2b"
    work = Path(tempfile.mkdtemp(prefix="bench-sweeps-"))
    try:
        if args.quick:
            args.prompts, args.checkpoint = min(args.prompts, 24), work / "tiny"
        if not (args.checkpoint / "config.json").is_file():
            log(f"writing a {preset}-shaped bf16 checkpoint to {args.checkpoint} ...")
            write_checkpoint(args.checkpoint, make_config(preset), dtype="bfloat16", shards=2)
        data = make_data(work, args.checkpoint, args.prompts)
        cases = [("local", None)] + [(f"ray-{w}", int(w)) for w in args.workers.split(",") if w]
        results = []
        for case, workers in cases:
            log(f"{case} ...")
            spec = {"case": case, "checkpoint": str(args.checkpoint), "data": str(data), "out": str(work / case),
                    "levels": args.levels, "chunk": args.chunk, "workers": workers}
            result = run_case(spec)
            if "failed" not in result and case != "local" and (work / "local" / "summary.json").exists():
                result["summary_equal"] = ((work / case / "summary.json").read_bytes()
                                           == (work / "local" / "summary.json").read_bytes())
                result["max_difference"] = max_difference(work / case, work / "local")
            results.append(result)
            log(f"  {json.dumps(result)}")
        text = report(results, args, args.checkpoint)
        print(text)
        if args.out:
            args.out.write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
