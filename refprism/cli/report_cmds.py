"""`refprism report`: one self-contained HTML page to explore a prompt's prisms by clicking (refprism/report/)."""

from __future__ import annotations

import sys

from refprism.cli.common import _common, _readout, check_out_path, path_text

# `--memory auto` for the page: its prisms and chains read every layer's weights many times over, which low
# memory converts anew at each read (gemma-2b shape, 2 cores: 223 s low, 60 s fast; docs/performance.md)
REPORT_WORK = "many"


def register(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page to explore the prompt's prisms by clicking "
                                      "(offline, no server)")
    _common(p, REPORT_WORK)
    p.add_argument("--position", type=int, default=-1, help="the position whose logits are split (default: last)")
    p.add_argument("--targets", nargs="*", metavar="TOKEN",
                   help="target tokens: pieces (▁Paris), one-token text, or ids (#7127); default: the top 5")
    p.add_argument("--versus", nargs="+", metavar="TOKEN",
                   help="foils: each target minus the foil (or minus the mean of several foils)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the HTML file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--depth", type=int, default=2,
                   help="pull-back steps precomputed: 0 the logits' prisms only, 1 adds every head x source chain, "
                        "2 (default) opens the largest chains once more")
    p.add_argument("--top", type=int, default=50, help="neurons shown per MLP prism (default 50; the rest summed)")
    p.add_argument("--branch", type=int, default=2,
                   help="below depth 1, how many of the largest parts and children each panel opens (default 2)")
    p.add_argument("--validate", metavar="FILE.json", help="add the interventions section: a `validate` JSON file")
    p.add_argument("--compare", metavar="FILE.json", help="add the comparison section: a `compare` JSON file")
    p.add_argument("--sweep", metavar="DIR", help="add the sweep section: DIR/summary.json of a sweep")
    g = p.add_argument_group("the attribution graph (docs/graphs.md)")
    g.add_argument("--graph", action="store_true",
                   help="add the graph panel: the pruned attribution graph of the prediction at --position (its "
                        "logits: --targets/--versus when given, else circuit-tracer's top tokens), every node "
                        "clickable for its exact edges and its input's prism split")
    g.add_argument("--max-nodes", type=int, default=7500,
                   help="with --graph: neurons explored, in influence order (default 7500, as `refprism graph`)")
    g.add_argument("--node-threshold", type=float, default=0.8, help="with --graph: pruning's node threshold (0.8)")
    g.add_argument("--edge-threshold", type=float, default=0.98, help="with --graph: pruning's edge threshold (0.98)")
    g.add_argument("--graph-nodes", type=int, default=200,
                   help="with --graph: nodes drawn at most (every logit, then by influence; default 200)")
    g.add_argument("--graph-edges", type=int, default=1000,
                   help="with --graph: edges drawn at most (the largest |weight|; default 1000)")
    p.set_defaults(func=cmd_report, plot=None)


def check_graph_args(args) -> None:
    """The --graph options' refusals, made before any weight is read."""
    from refprism.errors import InputError

    if not args.graph:
        return
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.versus and not args.targets:
        raise InputError("--graph --versus needs --targets: the graph's default logits are circuit-tracer's top "
                         "tokens, which take no foils")
    for name, least in (("max_nodes", 0), ("graph_nodes", 1), ("graph_edges", 0)):
        if getattr(args, name) < least:
            raise InputError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")


def cmd_report(args) -> int:
    from refprism import report

    report.check_budget(args.depth, args.top, args.branch)
    check_graph_args(args)
    out = check_out_path(args.out, args.force)
    sections = {kind: report.load_section(kind, getattr(args, kind))
                for kind in ("validate", "compare", "sweep") if getattr(args, kind) is not None}
    readout = _readout(args, work=REPORT_WORK)
    if args.graph:
        from refprism.graphs import graph, graph_view

        args.progress.phase(f"building the attribution graph (--max-nodes {args.max_nodes}; a run with a full record)")
        g = graph(readout.model, readout.run.tokens, position=readout.position, targets=args.targets,
                  versus=args.versus or (), max_nodes=args.max_nodes)
        sections["graph"] = graph_view(g, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                                       max_nodes=args.graph_nodes, max_edges=args.graph_edges)
    args.progress.phase(f"computing the page's prisms and chains (--depth {args.depth}, --branch {args.branch})")
    page = report.write_report(out, readout.model, readout.run, readout.targets, position=readout.position,
                               depth=args.depth, top=args.top, branch=args.branch, **sections)
    print(f"wrote {path_text(page)} ({page.stat().st_size / 1e6:.2f} MB): open it in any browser, offline",
          file=sys.stderr)
    return 0
