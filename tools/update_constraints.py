#!/usr/bin/env python3
"""Write tools/constraints.txt: the exact version of every package tools/test.sh installs, as installed here.

    python tools/update_constraints.py            # rewrite tools/constraints.txt from this environment
    python tools/update_constraints.py --check    # exit 1 if the environment differs from the file

tools/test.sh installs refprism's extras with `pip install -c tools/constraints.txt`, so CI on a fresh machine gets
the versions the suite last passed with, not whatever is newest that day: a new release of a test dependency
(pytest 9.2 changed pytest.approx on nested data) cannot turn main red unnoticed. To move a version on purpose:
install it, run `bash tools/test.sh`, then run this script and commit the file with the change.

The set is the closure of refprism's own requirements and the extras EXTRAS (the ones tools/test.sh installs),
read from the installed packages' metadata; torch stays at the CPU build the workplace serves (pyproject).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tools" / "constraints.txt"
EXTRAS = ("test", "lint", "crosscheck", "plot", "browser", "llamacpp", "tl", "sweep", "ray", "notebooks")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras) -> dict[str, str]:
    """Every installed distribution `root[extras]` needs, transitively: normalized name -> version."""
    seen: dict[str, str] = {}
    todo = [(root, tuple(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency of a dependency, not installed: not part of the set
        key = _norm(dist.metadata["Name"])
        if key != _norm(root):
            seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            if _norm(req.name) not in seen:
                todo.append((req.name, tuple(req.extras)))
    return seen


def render(pins: dict[str, str]) -> str:
    head = ("# The versions tools/test.sh installs (pip install -c tools/constraints.txt). Written by\n"
            "# tools/update_constraints.py from an environment whose `bash tools/test.sh` passed; update on purpose.\n")
    # a local version label (torch 2.13.0+cpu) is left out: ==2.13.0 matches the build this workplace serves
    return head + "".join(f"{name}=={version.split('+')[0]}\n" for name, version in sorted(pins.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare the environment with the file; write nothing")
    args = ap.parse_args(argv)
    text = render(closure("refprism", EXTRAS))
    if args.check:
        if OUT.read_text() != text:
            print("tools/constraints.txt differs from this environment: run python tools/update_constraints.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({text.count(chr(10)) - 2} packages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
