"""Benchmark (not a test): the attribution graph of Gemma 3 270M (the demo's GGUF) on the demo's capital-city prompt,
max_nodes neurons explored: wall time per phase, peak RSS (ru_maxrss), backward passes, the pruned graph's size,
scores and faithfulness (zero and mean ablation of every neuron outside it). Prints one JSON line.

    python tools/bench_graph.py [--max-nodes 5000] [--prompt TEXT] [--tokens T] [--dtype float32] [--out graph.json]
                                [--no-faithfulness] [--threads N]

--threads N: refprism.graph's threads (N backward passes at once, one per worker thread; run with
OPENBLAS_NUM_THREADS=1). The JSON line adds the process's CPU seconds in the graph beside its wall seconds.

--tokens T: the prompt lengthened to T tokens deterministically: its first token (BOS), then fixed pseudo-random
ids (tools/bench.py's prompt_ids: seed and range), then the rest of the prompt, so the readout is still the prompt's
own last position (the capital-city prediction) with T - len(prompt) filler tokens before it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def uptime() -> str:
    """The machine's load averages (1, 5, 15 min): what else ran beside the benchmark."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rows_computed(g) -> int:
    """Target rows the graph computed: the logit rows and every explored neuron's (above layer 0) while exploring,
    then the logit rows and every explored neuron's again for the exact rows."""
    z = int((g.kind == "logit").sum())
    explored = (g.kind == "neuron") | (g.kind == "feature")
    if g.explored == g.n_neurons:  # nothing to explore: the exact rows only
        return z + int(explored.sum())
    return 2 * z + int(explored.sum()) + int((explored & (g.layer > 0)).sum())


def long_prompt(base: list[int], T: int, vocab_size: int) -> np.ndarray:
    """T ids: base[0] (BOS), T - len(base) filler ids from tools/bench.py's prompt_ids, then base[1:]."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import prompt_ids

    if T < len(base):
        raise SystemExit(f"--tokens {T}: the prompt alone has {len(base)} tokens")
    filler = prompt_ids([], T - len(base), vocab_size)
    return np.array(base[:1] + filler + base[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-nodes", type=int, default=5000)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--no-faithfulness", action="store_true", help="skip the two ablated re-runs")
    ap.add_argument("--threads", type=int, default=1, help="refprism.graph's threads (default 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import refprism
    from refprism import demo
    from refprism.graphs import faithfulness, graph, write_graph_json

    prompt = args.prompt or demo.CAPITAL_PROMPT
    t0 = time.perf_counter()
    model = refprism.load(str(demo.gguf_path()), dtype=args.dtype)
    t_load = time.perf_counter() - t0
    rss_load = peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    ids = prompt
    if args.tokens is not None:
        ids = long_prompt(list(model.run(prompt).tokens), args.tokens, model.config.vocab_size)
    g = graph(model, ids, max_nodes=args.max_nodes, batch_size=args.batch_size, threads=args.threads)
    t_graph, cpu_graph = time.perf_counter() - t0, time.process_time() - c0
    rss_graph = peak_rss()
    t0 = time.perf_counter()
    pr = g.pruned()
    replacement, completeness = g.scores()
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    faith = {} if args.no_faithfulness else {
        a: faithfulness(g, pruned=pr, ablation=a, scores=(replacement, completeness))["recovered"]
        for a in ("zero", "mean")}
    t_check = time.perf_counter() - t0
    targets = np.flatnonzero(~np.isnan(g.input))
    err = float(np.abs(g.row_sums()[targets] - g.input[targets]).max())
    if args.out:
        write_graph_json(g, args.out, faithfulness=faith)
    print(json.dumps({
        "model": model.name, "dtype": args.dtype, "prompt": prompt, "uptime": uptime(), "T": int(len(g.run.tokens)),
        "max_nodes": args.max_nodes, "threads": args.threads, "explored": g.explored, "neurons": g.n_neurons,
        "nodes": g.n,
        "edges": int(len(g.values)), "logits": g.logit_labels, "backward_passes": g.passes,
        "largest_pass_rows": g.batch_rows, "rows_computed": rows_computed(g),
        "rows_per_s": round(rows_computed(g) / t_graph, 2),
        "seconds": {"load": round(t_load, 2), "graph": round(t_graph, 2), "graph_cpu": round(cpu_graph, 2),
                    "prune_and_scores": round(t_prune, 2),
                    "faithfulness": round(t_check, 2)},
        "peak_rss_gib": {"after_load": round(rss_load / 2 ** 30, 3), "after_graph": round(rss_graph / 2 ** 30, 3),
                         "end": round(peak_rss() / 2 ** 30, 3)},
        "pruned_nodes": int(pr.node_mask.sum()), "pruned_edges": int(pr.edge_mask.sum()),
        "replacement": replacement, "completeness": completeness, "faithfulness": faith,
        "max_row_sum_error": err, "max_input": float(np.nanmax(np.abs(g.input))),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
