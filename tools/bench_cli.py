#!/usr/bin/env python3
"""The CLI's --memory modes measured: docs/performance.md's table "The CLI's --memory modes".

    python tools/make_checkpoint.py /tmp/g2b --preset gemma-2b --dtype bfloat16 --shards 2
    nice python tools/bench_cli.py --checkpoint /tmp/g2b > cli_modes.md

Each `refprism` command is a fresh process, so each mode's load is paid at every command. For each mode (low,
fast) this runs, one process after the other:

1. the library's load and forward: `refprism.load(checkpoint, memory=MODE)` and two `model.run(prompt)` calls,
   timed inside the process (load excludes the imports; forward 1 is the first call, forward 2 the second), with
   the process's peak RSS (ru_maxrss);
2. every command of COMMANDS as `python -m refprism.cli COMMAND ... --memory MODE`, timed from outside: the wall
   time and the peak RSS of the child (`os.wait4`'s ru_maxrss, what `/usr/bin/time -v` reports).

It prints the Markdown to paste: the command line, the date, the load average before and after (the walls depend
on what else the machine runs; the peaks do not), the library's load / forward table and the commands' table.
A command that fails stops the script (exit 1) with its stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT = "The capital city of France is"
# (label in the table, arguments after the prompt). The last column of the table is what --memory auto picks.
COMMANDS = [
    ("run", ["run"], []),
    ("residual --targets ▁Paris ▁London", ["residual"], ["--targets", "▁Paris", "▁London"]),
    ("attention --layer 14 --targets ▁Paris ▁London", ["attention"], ["--layer", "14", "--targets", "▁Paris",
                                                                      "▁London"]),
    ("patch --component L14H5 --ablate zero --targets ▁Paris", ["patch"], ["--component", "L14H5", "--ablate",
                                                                           "zero", "--targets", "▁Paris"]),
    ("report --out page.html", ["report"], ["--out", "{tmp}/page.html", "--force"]),
]
MODES = ("low", "fast")

LIBRARY = """
import json, resource, sys, time
t0 = time.perf_counter()
import refprism
imports = time.perf_counter() - t0
t0 = time.perf_counter()
model = refprism.load(sys.argv[1], memory=sys.argv[2])
load = time.perf_counter() - t0
forwards = []
for _ in range(2):
    t0 = time.perf_counter()
    model.run(sys.argv[3])
    forwards.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"imports": imports, "load": load, "forward": forwards, "peak": peak}))
"""


def measured(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one child process (os.wait4 reads its own rusage)."""
    start = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"bench_cli: {' '.join(argv)} failed (exit {code}):\n{err}")
    return wall, usage.ru_maxrss * 1024, out


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cli.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (make_checkpoint.py's gemma-2b)")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args(argv)
    from refprism.cli.common import memory_mode
    from refprism.cli.report_cmds import REPORT_WORK

    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    library = {}
    for mode in MODES:
        _, peak, out = measured([sys.executable, "-c", LIBRARY, args.checkpoint, mode, args.prompt])
        library[mode] = json.loads(out) | {"peak": peak}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for label, command, rest in COMMANDS:
            cells = {}
            for mode in MODES:
                argv = [sys.executable, "-m", "refprism.cli", *command, args.prompt, "--model", args.checkpoint,
                        "--memory", mode, *[a.format(tmp=tmp) for a in rest]]
                wall, peak, _ = measured(argv)
                cells[mode] = (wall, peak)
                print(f"{label} [{mode}]: {wall:.1f} s, {gb(peak)}", file=sys.stderr, flush=True)
            work = REPORT_WORK if command[0] == "report" else "one"
            auto = {"low": "low", "auto": "fast"}[memory_mode("auto", work)]  # auto: fast when it fits
            rows.append((label, cells, auto))
    load_after = os.getloadavg()

    print(f"`nice python tools/bench_cli.py --checkpoint {args.checkpoint}`, started {started}; load average "
          f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores.\n")
    print("| library, one process | load | forward 1 | forward 2 | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode in MODES:
        r = library[mode]
        print(f"| {mode}: `refprism.load(..., memory=\"{mode}\")`, `model.run(prompt)` x 2 | {r['load']:.1f} s | "
              f"{r['forward'][0]:.1f} s | {r['forward'][1]:.1f} s | {gb(r['peak'])} |")
    print()
    print("| command | low: wall | fast: wall | low: peak RSS | fast: peak RSS | `auto` picks |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, cells, auto in rows:
        print(f"| `{label}` | {cells['low'][0]:.1f} s | {cells['fast'][0]:.1f} s | {gb(cells['low'][1])} | "
              f"{gb(cells['fast'][1])} | {auto} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
