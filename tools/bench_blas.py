#!/usr/bin/env python3
"""The rate of the products that bound refprism's short-prompt forward and its backward, in NumPy (OpenBLAS: one
BLAS call, and refprism.gemma.ops.matmul's slices) and in torch (HF's side: MKL on x86), on this machine.

    python tools/bench_blas.py                  # the gemma-2b, E2B and 270M shapes at T = 1, 7, 16, 512
    python tools/bench_blas.py --quick          # small shapes, one repeat: a check that it runs

Each product x W of the MLP and the unembedding is timed over enough distinct copies of W that they exceed the
last-level cache (--bytes, default 1.2 GB), so the rate is that of weights streamed from memory, as in a forward
over many layers. Layouts are those the passes use: the forward reads a stored [N, K] weight as the transposed
view W^T ("x W^T"), the backward the stored weight itself ("g W"). The rate at T = 1 (a matrix-vector product)
is the read bandwidth a product can reach; at T = 7 and 16 refprism's forward and backward are products of this
kind throughout, so their seconds are about the weights' bytes over these rates. Seconds: the best of --repeat.
Threads: OPENBLAS_NUM_THREADS / torch.set_num_threads(--threads) (refprism's slices: REFPRISM_THREADS the same).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = {  # name -> (D, F, V): the MLP's [D, F] products and the [D, V] unembedding
    "gemma-2b": (2048, 16384, 256000),
    "gemma-4-e2b": (1536, 6144, 262144),
    "gemma-3-270m": (640, 2048, 262144),
}
QUICK = {"small": (256, 1024, 4096)}


def products(D, F, V):
    """(label, K, N, layout): x [T, K] times a weight stored [N, K] ("T": read as W^T) or [K, N] ("N")."""
    return [("gate/up x W^T (forward)", D, F, "T"), ("down x W^T (forward)", F, D, "T"),
            ("gate/up g W (backward)", F, D, "N"), ("down g W (backward)", D, F, "N"),
            ("unembed x E^T (forward)", D, V, "T")]


def _best(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rates(T, K, N, layout, copies, repeat, with_torch):
    """GB/s of the weights' bytes (float32) per side: numpy @, ops.matmul, torch @ (or None)."""
    import numpy as np

    from refprism.gemma import ops

    rng = np.random.default_rng(0)
    stored = [rng.random((N, K) if layout == "T" else (K, N), dtype=np.float32) for _ in range(copies)]
    Ws = [w.T for w in stored] if layout == "T" else stored
    x = rng.random((T, K), dtype=np.float32)
    gb = copies * K * N * 4 / 1e9
    out = {"numpy": gb / _best(lambda: [x @ W for W in Ws], repeat),
           "ops.matmul": gb / _best(lambda: [ops.matmul(x, W) for W in Ws], repeat), "torch": None}
    if with_torch:
        import torch

        tw = [torch.from_numpy(w) for w in stored]
        tW = [w.T for w in tw] if layout == "T" else tw
        tx = torch.from_numpy(x)
        with torch.no_grad():
            out["torch"] = gb / _best(lambda: [tx @ W for W in tW], repeat)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 7, 16, 512])
    p.add_argument("--bytes", type=float, default=1.2e9, help="the weights' bytes per timing (copies of W)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-torch", action="store_true", help="NumPy only")
    p.add_argument("--quick", action="store_true", help="small shapes, rows 1 and 7, one repeat")
    args = p.parse_args(argv)
    for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "REFPRISM_THREADS"):
        os.environ[key] = str(args.threads)
    import refprism  # noqa: F401  (before NumPy: its OPENBLAS_THREAD_TIMEOUT default applies, as in the CLI)

    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
        except ImportError:
            print("bench_blas: torch is not installed (pip install torch==2.13.0, or --no-torch)", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else {s: SHAPES[s] for s in args.shapes}
    rows = [1, 7] if args.quick else args.rows
    repeat = 1 if args.quick else args.repeat
    print(f"threads {args.threads}; GB/s of float32 weights streamed (higher is faster); "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}\n")
    print("| shape | product | K x N | T | numpy @ | ops.matmul | torch @ |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, (D, F, V) in shapes.items():
        for label, K, N, layout in products(D, F, V):
            copies = max(1, round(args.bytes / (K * N * 4)))
            for T in rows:
                r = rates(T, K, N, layout, copies, repeat, with_torch)
                cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
                print(f"| {name} | {label} | {K} x {N} | {T} | {cell(r['numpy'])} | {cell(r['ops.matmul'])} | "
                      f"{cell(r['torch'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
