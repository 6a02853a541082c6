"""Benchmark (not a test): the attribution graph of Gemma 3 270M (the demo's GGUF) on the demo's capital-city prompt,
max_nodes neurons explored: wall time per phase, peak RSS (ru_maxrss), backward passes, the pruned graph's size,
scores and faithfulness (zero and mean ablation of every neuron outside it). Prints one JSON line.

    python tools/bench_graph.py [--max-nodes 5000] [--prompt TEXT] [--dtype float32] [--out graph.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-nodes", type=int, default=5000)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=256)
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
    t0 = time.perf_counter()
    g = graph(model, prompt, max_nodes=args.max_nodes, batch_size=args.batch_size)
    t_graph = time.perf_counter() - t0
    rss_graph = peak_rss()
    t0 = time.perf_counter()
    pr = g.pruned()
    replacement, completeness = g.scores()
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    faith = {a: faithfulness(g, pruned=pr, ablation=a, scores=(replacement, completeness))["recovered"]
             for a in ("zero", "mean")}
    t_check = time.perf_counter() - t0
    targets = np.flatnonzero(~np.isnan(g.input))
    err = float(np.abs(g.row_sums()[targets] - g.input[targets]).max())
    if args.out:
        write_graph_json(g, args.out, faithfulness=faith)
    print(json.dumps({
        "model": model.name, "dtype": args.dtype, "prompt": prompt, "T": int(len(g.run.tokens)),
        "max_nodes": args.max_nodes, "explored": g.explored, "neurons": g.n_neurons, "nodes": g.n,
        "edges": int(len(g.values)), "logits": g.logit_labels, "backward_passes": g.passes,
        "largest_pass_rows": g.batch_rows, "seconds": {"load": round(t_load, 2), "graph": round(t_graph, 2),
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
