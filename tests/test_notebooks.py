"""The tutorial notebooks as stored: executed top to bottom in one kernel, no error, small figures, linked in order.

nbmake runs them (tools/test.sh: `python -m pytest --nbmake notebooks`); these tests check what a reader sees on a
code-hosting page without running anything, and tools/notebooks.py, which refreshes and strips the outputs.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "notebooks"
READING_ORDER = ["01_forward_op_by_op.ipynb", "02_the_post.ipynb", "03_checking_a_port.ipynb",
                 "04_prisms_and_causal_effects.ipynb", "05_a_circuit.ipynb"]

_spec = importlib.util.spec_from_file_location("notebooks_tool", ROOT / "tools" / "notebooks.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_the_folder_holds_the_notebooks_in_reading_order():
    assert sorted(p.name for p in FOLDER.glob("*.ipynb")) == READING_ORDER


@pytest.mark.parametrize("name", READING_ORDER)
def test_stored_with_the_outputs_of_one_clean_run(name):
    """Every code cell ran, in order, in one kernel (execution counts 1, 2, 3, ...), none failed, and the figures
    are stored small (tools/notebooks.py --refresh scales and palette-encodes them)."""
    nb = nbformat.read(FOLDER / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], "warnings in the outputs"
    for o in outputs:
        if "image/png" in o.get("data", {}):
            raw = base64.b64decode(o.data["image/png"])
            assert len(raw) < 150_000 and Image.open(io.BytesIO(raw)).width <= tool.MAX_WIDTH
    assert (FOLDER / name).stat().st_size < 1_000_000


def test_strip_removes_every_output_and_keeps_the_sources(tmp_path):
    path = tmp_path / READING_ORDER[0]
    shutil.copy(FOLDER / READING_ORDER[0], path)
    before = nbformat.read(path, as_version=4)
    assert any(c.get("outputs") for c in before.cells)
    assert tool.main(["--strip", str(path)]) == 0
    after = nbformat.read(path, as_version=4)
    assert [c.source for c in after.cells] == [c.source for c in before.cells]
    assert all(c.outputs == [] and c.execution_count is None for c in after.cells if c.cell_type == "code")


def test_figures_are_scaled_and_palette_encoded():
    big = Image.new("RGB", (3000, 500), "white")
    for x in range(0, 3000, 7):  # a few thousand colours, as anti-aliased text and lines have
        big.putpixel((x, 250), (x % 256, (3 * x) % 256, 90))
    out = io.BytesIO()
    big.save(out, "PNG")
    small = Image.open(io.BytesIO(base64.b64decode(tool.small_png(base64.b64encode(out.getvalue()).decode()))))
    assert small.size == (tool.MAX_WIDTH, 200) and small.mode == "P"
    assert len(small.getcolors()) <= tool.COLOURS


@pytest.mark.parametrize("doc", ["README.md", "docs/guide.md"])
def test_readme_and_guide_link_the_notebooks_in_reading_order(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    links = re.findall(r"\]\((?:\.\./)?notebooks/([^)]+\.ipynb)\)", text)
    assert [n for i, n in enumerate(links) if n not in links[:i]] == READING_ORDER
