#!/usr/bin/env python3
"""Time one readout's gradient, and attribution patching over every head: refprism against HF transformers.

    python tools/bench_gradients.py --shape 270m                 # Gemma 3 270M's shape (random weights), T = 128, 512
    python tools/bench_gradients.py --shape gemma-2b --atp       # gemma-2b's shape, T = 16, plus AtP over all heads
    python tools/bench_gradients.py --shape 270m --lengths 16 --runs 1

Two measurements, each side in its own fresh process (this script as `--worker SIDE T DIR`, one JSON line out):

gradient (issue 18, target a): the forward + the backward of one logit, float32, no weight gradients
    refprism  refprism.load(dir, memory="fast"), refprism.gradients(model, ids, targets=[t]): the forward with the
              full record but the logits at the readout's position only (Model.run_reading), then the backward
              (every site's gradient, one readout row)
    refprism-run  the same from model.run(ids) (the full record, the logits at every position), then
              refprism.gradients(model, run, targets=[t])
    hf        AutoModelForCausalLM (eager, float32), inputs_embeds = embed(ids) with requires_grad, one forward,
              torch.autograd.grad(logits[0, -1, t], inputs_embeds)
    hf-keep1  the same with logits_to_keep=1 (HF unembeds the last position only, and its backward skips the
              [T, V] product too): the like-for-like of `refprism`
atp (target b, refprism only, --atp): attribute(model, ids, method="atp", level="heads", at="all",
              ablate="resample", counterfactual=other ids): every head at every position patched from the other
              run, i.e. two full-record forwards (clean, corrupt) and one backward; its seconds divided by one
              full-record forward's (model.run(ids)) in the same process are its forward-pass equivalents

Seconds: the median over --runs processes of the second call (the first warms up). Peak RSS: the process's
high-water mark (ru_maxrss, with the load and the resident pages of memory-mapped files), and the high-water mark
of the timed second call alone (VmHWM reset through /proc/self/clear_refs just before it: the weights plus what
the forward and backward add). The checkpoint is made once (refprism.checkpoints.synth) under --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                  query_pre_attn_scalar=256, max_position_embeddings=32768,
                  layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)])
SHAPES = {  # name -> (preset, overrides, stored dtype, default lengths, default folder)
    "270m": ("tiny-gemma3", SHAPE_270M, "float32", [128, 512], Path("/tmp/refprism-bench-270m-shape")),
    "gemma-2b": ("gemma-2b", {}, "bfloat16", [16], Path(tempfile.gettempdir()) / "refprism-bench" / "gemma-2b-bf16"),
}
TARGET = 7  # the readout's token id


def _status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def _reset_peak():
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ids(T):
    import numpy as np

    clean = np.random.default_rng(0).integers(3, 1000, T)
    other = np.random.default_rng(1).integers(3, 1000, T)
    other[0] = clean[0]
    return clean, other


def worker(side, T, d):
    ours = side in ("refprism", "refprism-run", "atp")
    if ours:
        import refprism  # noqa: F401  (before NumPy, as the CLI does: its OPENBLAS_THREAD_TIMEOUT default applies)
    clean, other = _ids(T)
    out = {"side": side, "T": T}
    if ours:
        import refprism

        model = refprism.load(d, memory="fast")
    else:
        import torch
        import transformers

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        for p in model.parameters():
            p.requires_grad_(False)  # no weight gradients: autograd keeps nothing for them
    out["load_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def timed(fn):
        """fn twice; the second call's seconds and its own high-water mark."""
        fn()
        reset = _reset_peak()
        t0 = time.perf_counter()
        res = fn()
        seconds = time.perf_counter() - t0
        return seconds, (_status_kb("VmHWM") / 2**20 if reset else None), res

    if side in ("refprism", "refprism-run"):
        parts = {}

        def grad():
            t0 = time.perf_counter()
            run = model.run_reading(clean, -1) if side == "refprism" else model.run(clean)
            t1 = time.perf_counter()  # (refprism.gradients(model, clean, ...) is these two steps)
            refprism.gradients(model, run, targets=[f"#{TARGET}"])
            parts.update(forward=t1 - t0, backward=time.perf_counter() - t1)

        out["seconds"], out["call_peak_gb"], _ = timed(grad)
        out.update(parts)
    elif side in ("hf", "hf-keep1"):
        import torch

        keep = {"logits_to_keep": 1} if side == "hf-keep1" else {}

        def grad():
            e = model.get_input_embeddings()(torch.tensor([clean.tolist()])).detach().requires_grad_(True)
            logit = model(inputs_embeds=e, use_cache=False, **keep).logits[0, -1, TARGET]
            return torch.autograd.grad(logit, e)

        out["seconds"], out["call_peak_gb"], _ = timed(grad)
    else:  # atp
        from refprism.interventions.attribution import attribute

        out["forward"], _, _ = timed(lambda: model.run(clean))
        out["seconds"], out["call_peak_gb"], a = timed(
            lambda: attribute(model, clean, method="atp", level="heads", at="all", ablate="resample",
                              counterfactual=other))
        out["equivalents"] = out["seconds"] / out["forward"]
        out["components"], out["positions"], out["cost"] = len(a.labels), len(a.setting.at), a.cost
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


def _measure(side, T, d, runs, threads):
    rows = []
    env = dict(os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                        "MKL_NUM_THREADS")})
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--worker", side, str(T), str(d)], capture_output=True,
                             text=True, env=env)
        if out.returncode:
            print(f"<!-- {side} T={T} failed (exit {out.returncode}): {out.stderr.strip()[-300:]} -->", flush=True)
            return None
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in rows) for k in ("seconds", "forward", "backward", "equivalents")
           if k in rows[0]}
    med.update({k: max(r[k] for r in rows) for k in ("peak_rss_gb", "call_peak_gb", "load_rss_gb")
                if rows[0].get(k) is not None})
    med.update({k: rows[0][k] for k in ("components", "positions", "cost") if k in rows[0]})
    return med


def _uptime():
    return open("/proc/loadavg").read().split()[:3]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="270m")
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="BLAS / OpenMP threads of both sides (NumPy's OpenBLAS, torch.set_num_threads)")
    p.add_argument("--dir", type=Path, help="the checkpoint (made there once); default per shape")
    p.add_argument("--atp", action="store_true", help="also AtP over every head x position (target b)")
    p.add_argument("--no-gradient", action="store_true", help="skip the gradient comparison (target a)")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.worker[2])
    preset, overrides, dtype, lengths, folder = SHAPES[args.shape]
    lengths, folder = args.lengths or lengths, args.dir or folder
    if not (folder / "config.json").exists():
        from refprism.checkpoints.synth import make_config, write_checkpoint

        print(f"writing a {args.shape}-shaped {dtype} checkpoint to {folder} ...", file=sys.stderr, flush=True)
        write_checkpoint(folder, make_config(preset, **overrides), dtype=dtype, shards=1 if dtype == "float32" else 2,
                         tokenizer=None if args.shape == "270m" else "auto")
    print(f"shape {args.shape}, checkpoint {folder}, runs {args.runs}, threads {args.threads}; load average at "
          f"start {' '.join(_uptime())}\n")
    if not args.no_gradient:
        print("| T | side | seconds (fwd + bwd) | fwd s | bwd s | peak RSS GB (process) | peak RSS GB (the call) |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for T in lengths:
            res = {side: _measure(side, T, folder, args.runs, args.threads)
                   for side in ("refprism", "refprism-run", "hf", "hf-keep1")}
            for side, r in res.items():
                if r:
                    fmt = lambda k, r=r: f"{r[k]:.2f}" if r.get(k) is not None else "-"  # noqa: E731
                    print(f"| {T} | {side} | {fmt('seconds')} | {fmt('forward')} | {fmt('backward')} | "
                          f"{fmt('peak_rss_gb')} | {fmt('call_peak_gb')} |", flush=True)
            for x, y in (("refprism", "hf"), ("refprism-run", "hf"), ("refprism", "hf-keep1")):
                a, b = res[x], res[y]
                if a and b:
                    call = (f"{a['call_peak_gb'] / b['call_peak_gb']:.2f}" if a.get("call_peak_gb") and
                            b.get("call_peak_gb") else "-")
                    print(f"| {T} | {x} / {y} | {a['seconds'] / b['seconds']:.2f} | | | "
                          f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f} | {call} |", flush=True)
        print(f"\nload average after the gradients: {' '.join(_uptime())}\n")
    if args.atp:
        print("| T | components x positions | AtP s | one forward s | forward-pass equivalents | passes | "
              "peak RSS GB |\n| --- | --- | --- | --- | --- | --- | --- |")
        for T in lengths:
            r = _measure("atp", T, folder, args.runs, args.threads)
            if r:
                c = r["cost"]
                print(f"| {T} | {r['components']} x {r['positions']} | {r['seconds']:.2f} | {r['forward']:.2f} | "
                      f"{r['equivalents']:.2f} | {c['forward']} fwd + {c['backward']} bwd | "
                      f"{r['peak_rss_gb']:.2f} |", flush=True)
        print(f"\nload average after AtP: {' '.join(_uptime())}")


if __name__ == "__main__":
    main()
