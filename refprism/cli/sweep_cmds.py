"""`refprism sweep DATA --out DIR`: the prisms over a data set of prompts, aggregated (refprism/sweeps.py)."""

from __future__ import annotations

import importlib.util
import sys

from refprism.cli.common import MODEL_HELP, memory_help, one_line, open_model
from refprism.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("sweep", help="the prisms over a data set of prompts (JSONL or CSV), each prompt's terms and "
                                     "their means with bootstrap intervals; resumable; local or on a Ray cluster")
    p.add_argument("data", help="the data set: .jsonl (one JSON object a line) or .csv with id, prompt (or ids), "
                                "targets, and optionally versus, position, roles, counterfactual (docs/sweeps.md)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the output folder; a re-run with the same folder resumes where it stopped")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64 (audit)")
    p.add_argument("--memory", default="auto", choices=["auto", "fast", "low"],
                   help=memory_help("many") + " (local backend; the Ray driver keeps the weights memory-mapped)")
    p.add_argument("--levels", default="residual,heads",
                   help="what each prompt gets, comma separated: residual, heads, head-source (and by role), "
                        "neurons:K (each layer's top K neurons and the rest); default residual,heads")
    p.add_argument("--validate", metavar="LEVEL",
                   help="also run refprism.interventions.validate at this level on every prompt")
    p.add_argument("--ablate", metavar="MODE", help="with --validate: how components are ablated")
    p.add_argument("--validate-top", type=int, metavar="N", help="with --validate: how many components to check")
    p.add_argument("--validate-methods", metavar="M,M",
                   help="with --validate: attribution methods beside the prism (gradxact, atp, atp*, atp-gd, atp*-gd, "
                        "ig), "
                        "each one's agreement with the totals aggregated with intervals")
    p.add_argument("--validate-steps", type=int, metavar="K", help="with --validate-methods: ig's steps k")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local (default): packed passes in this process; ray: actors on a Ray cluster "
                        "(pip install 'refprism[ray]')")
    p.add_argument("--address", help="with --backend ray: join this cluster (e.g. 10.0.0.1:6379, or auto); "
                                     "default: start a local one")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --backend ray: this many actors, the CPUs split evenly (default: one per node)")
    p.add_argument("--chunk", type=int, default=16, metavar="N",
                   help="prompts per chunk: what is computed and written at once (default 16)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default 0)")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="components per prism in the summary's top list and the printed table (default 10)")
    p.add_argument("--plot", action="store_true", help="write the summary's figures into DIR (matplotlib)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    from refprism import sweeps

    levels = sweeps.Levels.parse(args.levels)
    validate = None
    methods = ()
    if args.validate_methods is not None:
        methods = tuple(m.strip() for m in args.validate_methods.split(",") if m.strip())
        if not methods:
            raise InputError("--validate-methods is empty: give methods separated by commas, e.g. atp,ig")
    if args.validate is not None:
        validate = sweeps.Validation(args.validate, args.ablate, args.validate_top, methods, args.validate_steps)
    elif any(x is not None for x in (args.ablate, args.validate_top, args.validate_methods, args.validate_steps)):
        raise InputError("--ablate, --validate-top, --validate-methods and --validate-steps go with --validate LEVEL")
    if args.backend == "local" and (args.address is not None or args.workers is not None):
        raise InputError("--address and --workers go with --backend ray")
    if args.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise InputError("--backend ray needs Ray: pip install 'refprism[ray]'")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'refprism[plot]'")
    if args.backend == "ray" and not str(args.model or "").lower().endswith(".gguf"):
        args.memory = "low"  # the driver only tokenizes and puts the weights into the store, layer by layer
    model = open_model(args, work="many")  # its weights are read after the data set's rows are checked
    summary = sweeps.sweep(args.data, model, args.out, levels=levels, chunk=args.chunk, backend=args.backend,
                           workers=args.workers, address=args.address, validate=validate, strict=args.strict,
                           quiet=args.quiet, plot=args.plot, bootstrap=args.bootstrap, seed=args.seed, top=args.top,
                           warn=lambda line: print(f"refprism: warning: {one_line(line)}", file=sys.stderr))
    print(summary_table(summary, args.top))
    figures = " and its figures" if args.plot and summary["splits"] else ""
    print(f"wrote {args.out}/summary.json{figures}", file=sys.stderr)
    return 0


def summary_table(summary, top) -> str:
    """The sweep in a few lines: prompts, bad rows, then per prism its top components with interval and sign."""
    s = summary["sweep"]
    lines = [f"sweep of {s['prompts']} prompts ({s['bad_rows']} bad rows skipped)  model {s['model']['name']}  "
             f"dtype {s['dtype']}  levels {s['levels']}",
             f"mean over the prompts [{summary['bootstrap']['confidence']:.0%} bootstrap interval]  share of "
             f"prompts with the mean's sign; columns: {', '.join(summary['columns'])}"]
    for split in summary["splits"]:
        if split["prism"] == "residual":
            w = split["whole"]
            lines.append("\n" + _row(f"whole ({w['label']})", w))
    for prism, rows in summary["top"].items():
        lines.append(f"\ntop {min(top, len(rows))} {prism} components")
        lines += [_row(f"{r['label']}", r) for r in rows[:top]]
    exact = "yes" if summary["exact"] else "NO"
    lines.append(f"\nthe mean terms sum to the mean wholes within the stated tolerance: {exact}")
    methods = (summary.get("validate") or {}).get("methods")
    if methods:
        lines.append("\n--validate-methods: each method's agreement with |total|, mean over the prompts [interval]")
        for m, entry in methods.items():
            cells = []
            for key, name in (("spearman", "Spearman"), ("top_k_recall", "top-k recall"),
                              ("reruns_to_true_top_k", "re-runs to top-k")):
                e = entry["agreement"].get(key)
                cells.append(f"{name} n/a" if e is None else f"{name} {e['mean']:.3f} [{e['ci'][0]:.3f}, "
                                                              f"{e['ci'][1]:.3f}]")
            fwd, bwd = entry["cost"]["forward"], entry["cost"]["backward"]
            cells.append(f"passes {fwd['mean']:.0f} + {bwd['mean']:.0f}")
            lines.append(f"  {m:<10}" + "   ".join(cells))
    return "\n".join(lines)


def _row(label, entry) -> str:
    cells = [f"{m:>9.4f} [{lo:>8.4f}, {hi:>8.4f}] {sign:>4.0%}"
             for m, (lo, hi), sign in zip(entry["mean"], entry["ci"], entry["same_sign"])]
    return f"  {label:<22}" + "   ".join(cells)
