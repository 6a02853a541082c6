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
    p.set_defaults(func=cmd_report, plot=None)


def cmd_report(args) -> int:
    from refprism import report

    report.check_budget(args.depth, args.top, args.branch)
    out = check_out_path(args.out, args.force)
    sections = {kind: report.load_section(kind, getattr(args, kind))
                for kind in ("validate", "compare", "sweep") if getattr(args, kind) is not None}
    readout = _readout(args, work=REPORT_WORK)
    args.progress.phase(f"computing the page's prisms and chains (--depth {args.depth}, --branch {args.branch})")
    page = report.write_report(out, readout.model, readout.run, readout.targets, position=readout.position,
                               depth=args.depth, top=args.top, branch=args.branch, **sections)
    print(f"wrote {path_text(page)} ({page.stat().st_size / 1e6:.2f} MB): open it in any browser, offline",
          file=sys.stderr)
    return 0
