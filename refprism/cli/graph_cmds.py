"""`refprism graph PROMPT --out graph.json [--transcoders PATH]`: the attribution graph (neuron basis, or the
transcoders' features with error and bias nodes), pruned as circuit-tracer prunes, written as the graph JSON that
circuit-tracer's frontend and Neuronpedia open."""

from __future__ import annotations

import sys

from refprism.cli.common import _common, check_out_path, load_model, open_model, prompt_of, read_weights


def register(sub) -> None:
    p = sub.add_parser("graph", help="the attribution graph of a prediction (neurons, exact), as graph JSON")
    _common(p)
    p.add_argument("--out", required=True, metavar="FILE.json", help="write the graph JSON here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--position", type=int, default=-1, help="the position whose prediction is traced (default: last)")
    p.add_argument("--targets", nargs="*", metavar="TOKEN",
                   help="logit nodes: these tokens (default: circuit-tracer's top tokens to 0.95, at most 10)")
    p.add_argument("--versus", nargs="+", metavar="TOKEN", help="foils: each target minus the mean of the foils")
    p.add_argument("--max-nodes", type=int, default=7500, help="neurons explored, in influence order (default 7500)")
    p.add_argument("--batch-size", type=int, default=256, help="target rows of one backward pass (default 256)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="backward passes run at once, one per thread: the same graph, up to N x the passes' memory; "
                        "set OPENBLAS_NUM_THREADS=1 with it (default 1)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: the nodes' influence kept (0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: the edges' influence kept (0.98)")
    p.add_argument("--slug", default=None, help="the graph's slug in the JSON (default: refprism-graph)")
    p.add_argument("--check", choices=["zero", "mean"], default=None,
                   help="ablate every neuron (with --transcoders: every active feature) outside the pruned graph "
                        "and report the readout recovered")
    p.add_argument("--transcoders", default=None, metavar="PATH",
                   help="the transcoder basis: a folder or a file pattern of GemmaScope (params.npz / .safetensors), "
                        "circuit-tracer (config.yaml + layer_{l}.safetensors) or SAE Lens (cfg.json + "
                        "sae_weights.safetensors) transcoders, one per layer (docs/graphs.md)")
    p.add_argument("--zero-positions", type=int, default=1, metavar="N",
                   help="with --transcoders: features at positions < N are zero, as circuit-tracer zeroes BOS (1)")
    p.set_defaults(func=cmd_graph)


def cmd_graph(args) -> int:
    from refprism.errors import InputError
    from refprism.graphs import faithfulness, graph, write_graph_json

    out = check_out_path(args.out, args.force)
    if args.targets is not None and not args.targets:
        raise InputError("--targets needs at least one token")
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.max_nodes < 0 or args.batch_size < 1:  # graph() says the same; here before any weights are read
        raise InputError(f"--max-nodes {args.max_nodes}, --batch-size {args.batch_size}: max_nodes >= 0, batch_size, "
                         "update_interval and explore_k >= 1 are required")
    if args.threads < 1:
        raise InputError(f"--threads {args.threads}: the backward passes run at once, one per thread: give a "
                         "whole number, 1 or more")
    if args.versus and not args.targets:
        raise InputError("--versus: versus needs targets (give --targets: the default logits are circuit-tracer's "
                         "top tokens, which take no foils)")
    if args.zero_positions < 0:
        raise InputError(f"--zero-positions {args.zero_positions}: give 0 or more")
    prompt = prompt_of(args)
    transcoders = None
    if args.transcoders is not None:  # every file read and checked, then against the config: before the weights
        from refprism.graphs.transcoders import read_transcoders

        transcoders = read_transcoders(args.transcoders)
        model = open_model(args)
        transcoders.check(model.config)
        model = read_weights(model)
    else:
        model = load_model(args)
    g = graph(model, prompt, position=args.position, targets=args.targets, versus=args.versus or (),
              max_nodes=args.max_nodes, batch_size=args.batch_size, transcoders=transcoders,
              zero_positions=args.zero_positions, threads=args.threads)
    pr = g.pruned(args.node_threshold, args.edge_threshold)
    replacement, completeness = g.scores()
    faith = (faithfulness(g, pruned=pr, ablation=args.check, scores=(replacement, completeness)) if args.check
             else None)
    write_graph_json(g, out, slug=args.slug, node_threshold=args.node_threshold,
                     edge_threshold=args.edge_threshold, faithfulness=faith)
    what = "neurons" if g.basis == "neurons" else "active features"
    print(f"graph: {g.explored} of {g.n_neurons} {what} explored in {g.passes} backward passes; pruned to "
          f"{int(pr.node_mask.sum())} nodes, {int(pr.edge_mask.sum())} edges; replacement {replacement:.4f}, "
          f"completeness {completeness:.4f}")
    if faith is not None:
        others = (f"{faith['ablated_neurons']} other neurons" if g.basis == "neurons" else
                  f"{faith['ablated_features']} other active features; {faith['held_errors']} error nodes held")
        print(f"faithfulness ({args.check} ablation of the {others}): {faith['recovered']:.4f} of the readout "
              "recovered")
    print(f"wrote {out}", file=sys.stderr)
    return 0
