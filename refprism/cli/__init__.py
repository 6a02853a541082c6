"""The `refprism` command, one module per command group; this module only builds the parser and runs it.

    basic.py     run, record, demo
    prism_cmds.py residual, attention, mlp, chain, map, pca
    report_cmds.py report
    compare_cmds.py compare
    sweep_cmds.py sweep
    intervene_cmds.py patch, validate
    graph_cmds.py graph
    common.py    the shared prompt arguments, loading, one-line errors and printing

Errors: one line `refprism: error: ...` on stderr and exit status 2 (bad input; exit 1 for a failed write or a
finding such as `compare`'s divergence); never a traceback, never a half file (docs/errors.md).

The top layer: it may import every capability, and none imports it. It parses and prints; the work is the
library's (each command calls one public function).
"""

from __future__ import annotations

import os
import sys

from refprism.cli import basic, compare_cmds, graph_cmds, intervene_cmds, prism_cmds, report_cmds, sweep_cmds
from refprism.cli.common import (  # noqa: F401
    _check_plot_path,
    _check_text_args,
    _Parser,
    check_out_path,
    one_line,
    prompt_of,
    read_prompt_file,
)
from refprism.errors import RefprismError

GROUPS = (basic, prism_cmds, intervene_cmds, graph_cmds, compare_cmds, sweep_cmds, report_cmds)


def build_parser() -> _Parser:
    parser = _Parser(prog="refprism", description="NumPy reference gemma-2b (and the Gemma 1, 2, 3 and 4 text "
                                                   "family, safetensors or GGUF) with exact logit prisms.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_text_args(args)
        return args.func(args) or 0
    except RefprismError as e:
        print(f"refprism: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("refprism: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("refprism: error: out of memory (try a shorter prompt or --memory low)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `refprism ... | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


