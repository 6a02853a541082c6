#!/usr/bin/env python3
"""Time one readout's gradient: refprism's forward + backward against HF transformers' forward +
torch.autograd.grad of the same readout with respect to the embeddings (float32, no weight gradients).

    python tools/bench_gradients.py                      # Gemma 3 270M's shape (random weights), T = 128 and 512
    python tools/bench_gradients.py --lengths 16 --runs 1

Each measurement runs in its own fresh process (this script as `--worker SIDE T DIR`, printing one JSON line):
    refprism  refprism.load(dir) (fast), model.run(ids) (full record), refprism.gradients(model, run, targets=[t])
              (every site's gradient, one readout row)
    hf        AutoModelForCausalLM (eager, float32), inputs_embeds = embed(ids) with requires_grad, one forward,
              torch.autograd.grad(logits[0, -1, t], inputs_embeds)
Seconds are the median over --runs processes of the second call (the first warms up); peak RSS is the process's
high-water mark after it (ru_maxrss). The checkpoint is made once (refprism.checkpoints.synth) under --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
             query_pre_attn_scalar=256, max_position_embeddings=32768,
             layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)])


def worker(side, T, d):
    import numpy as np

    ids = np.random.default_rng(0).integers(3, 1000, T)
    target = 7
    if side == "refprism":
        import refprism

        model = refprism.load(d)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            run = model.run(ids)
            refprism.gradients(model, run, targets=[f"#{target}"])
            times.append(time.perf_counter() - t0)
    else:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            e = model.get_input_embeddings()(torch.tensor([ids.tolist()])).detach().requires_grad_(True)
            logit = model(inputs_embeds=e).logits[0, -1, target]
            torch.autograd.grad(logit, e)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"side": side, "T": T, "seconds": times[1], "first": times[0],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--dir", type=Path, default=Path("/tmp/refprism-bench-270m-shape"))
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.worker[2])
    if not (args.dir / "config.json").exists():
        from refprism.checkpoints.synth import make_config, write_checkpoint

        write_checkpoint(args.dir, make_config("tiny-gemma3", **SHAPE), tokenizer=None)  # ids only
    print("| T | side | seconds (fwd + bwd) | peak RSS GB |\n| --- | --- | --- | --- |")
    for T in args.lengths:
        res = {}
        for side in ("refprism", "hf"):
            rows = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--worker", side, str(T), str(args.dir)],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(f"| {T} | {side} | failed (exit {out.returncode}) | |")
                    break
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if rows:
                res[side] = (statistics.median(r["seconds"] for r in rows), max(r["peak_rss_gb"] for r in rows))
                print(f"| {T} | {side} | {res[side][0]:.2f} | {res[side][1]:.2f} |", flush=True)
        if len(res) == 2:
            ratio = res["refprism"][0] / res["hf"][0], res["refprism"][1] / res["hf"][1]
            print(f"| {T} | ratio | {ratio[0]:.2f} | {ratio[1]:.2f} |")


if __name__ == "__main__":
    main()
