#!/usr/bin/env python3
"""Refresh or strip the outputs of the tutorial notebooks (notebooks/*.ipynb).

    python tools/notebooks.py --refresh                 # run every notebook from a clean kernel, store its outputs
    python tools/notebooks.py --refresh notebooks/02_the_post.ipynb
    python tools/notebooks.py --strip                   # remove every output (and execution count)

The notebooks are stored with their outputs, figures included, so that they read on a code-hosting page without
running. `--refresh` executes each one top to bottom in a fresh `python3` kernel (nbclient, which nbmake uses
too), in the notebooks' folder, and writes it back in place with the new outputs, printing how long each took;
a notebook whose cell fails is left as it was and the command exits 1. Figures are stored small: each PNG output
is scaled to at most 1200 pixels wide and re-encoded with a 64-colour palette (refprism's figures are flat
colours and text, so they lose nothing a reader sees). CI runs them with nbmake
(`python -m pytest --nbmake notebooks`, in tools/test.sh), which executes them the same way without writing.
Needs the `notebooks` extra (`pip install -e ".[notebooks]"`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
TIMEOUT = 900  # seconds per cell: generous, a notebook takes a few minutes on 2 cores in all
MAX_WIDTH, COLOURS = 1200, 64  # stored figures


def notebooks(given: list[str]) -> list[Path]:
    paths = [Path(p) for p in given] if given else sorted(FOLDER.glob("*.ipynb"))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"notebooks.py: no such notebook {missing[0]}")
    return paths


def strip(nb) -> None:
    """Remove outputs and execution counts; keep the cells' sources and the notebook's kernel metadata."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)


def small_png(data: str) -> str:
    """A base64 PNG scaled to at most MAX_WIDTH pixels wide and palette-encoded (returned as base64)."""
    import base64
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
    image = image.quantize(colors=COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode("ascii")


def shrink_figures(nb) -> None:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                data["image/png"] = small_png(data["image/png"])


def refresh(path: Path) -> float:
    """Execute the notebook from a clean kernel in its folder and write it back with its outputs; return seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    strip(nb)
    start = time.perf_counter()
    NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    shrink_figures(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="notebooks.py", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--refresh", action="store_true", help="execute and store the outputs")
    action.add_argument("--strip", action="store_true", help="remove the outputs")
    parser.add_argument("notebook", nargs="*", help="notebooks (default: every notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    import nbformat

    status = 0
    for path in notebooks(args.notebook):
        if args.strip:
            nb = nbformat.read(path, as_version=4)
            strip(nb)
            nbformat.write(nb, path)
            print(f"{path}: outputs removed")
            continue
        try:
            seconds = refresh(path)
        except Exception as e:  # nbclient's CellExecutionError (and a dead kernel): report it, keep the file
            print(f"{path}: FAILED, left unchanged\n{e}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: executed in {seconds:.0f} s, {path.stat().st_size / 1e3:.0f} kB")
    return status


if __name__ == "__main__":
    sys.exit(main())
