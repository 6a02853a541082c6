"""The numbers the docs quote from a run are checked against a run (or against the source they come from), so
that they cannot drift: compare.md's opening example, the guide's digit ids, the --memory costs in --help,
README and docs/performance.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import refprism
from refprism.crosscheck import compare
from refprism.crosscheck.sides import hf as other_hf

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _number(text: str) -> float:
    return float(text)


def test_compare_md_opening_example_is_what_compare_prints(tiny_dir):
    """The example is HF on the tiny Gemma 1 checkpoint with layer 1's act_fn swapped for nn.GELU(). Every line
    quoted must be a line of today's table: the sites, the marks, the worst positions of the diverging sites, the
    verdict; a number that measures the mistake (>= 1e-4) to its 3 printed digits (1%); the rounding-level numbers
    (errors, floors) to within a factor of 1.5, since they are rounding errors whose pattern follows the BLAS
    build's summation order (a floor computed another way moves by more: 1.85e-05 -> 1.30e-05)."""
    import torch

    doc = (DOCS / "compare.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(  site .*?)```", doc, re.S).group(1)
    hf = other_hf.load(tiny_dir, "float32")
    hf.model.layers[1].mlp.act_fn = torch.nn.GELU()
    table = compare(refprism.load(tiny_dir), "The capital city of France is", against=hf).table().splitlines()
    rows = {line.split()[1 if line.startswith("!") else 0]: line for line in table if line.strip()}
    quoted = [line for line in block.splitlines() if re.match(r"[! ] blocks\.", line)]
    assert len(quoted) == 3
    for line in quoted:
        site = line.split()[1 if line.startswith("!") else 0]
        ours = rows[site]
        assert line[0] == ours[0], (line, ours)
        a, b = line.split(), ours.split()
        assert a[-1] == b[-1] or a[-1].startswith("T"), (line, ours)
        for x, y in zip(a[:10], b[:10]):
            if re.fullmatch(r"-?\d\.\d+e[-+]\d+", x):
                x, y = _number(x), _number(y)
                if abs(y) >= 1e-4:
                    assert abs(x - y) <= 0.01 * abs(y), (site, x, y)
                else:
                    assert y / 1.5 <= x <= 1.5 * y or x == y == 0, (site, x, y)
        if line.startswith("!"):
            assert a[9] == b[9], (line, ours)  # where the mistake is worst
    verdict = [line for line in block.splitlines() if line.startswith(("first divergence", "diagnosis"))]
    assert verdict[0] in table and table[-1].startswith(verdict[1][:80])


def test_guide_digit_ids_are_the_tokenizers():
    """The guide lists gemma-2b's ids of the digits 0-9 (not a range: they are not consecutive)."""
    from conftest import shared_tokenizer
    from tokenizers import Tokenizer

    folder = shared_tokenizer()  # part of the test environment: its absence fails, never skips
    guide = (DOCS / "guide.md").read_text(encoding="utf-8")
    listed = re.search(r"the digits 0-9 are single tokens ((?:\d+, ){9}\d+)", guide).group(1)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert [int(i) for i in listed.split(", ")] == [tok.token_to_id(str(d)) for d in range(10)]


def _table_peaks():
    """docs/performance.md's CLI table: the low and fast peak RSS (GB) of every row."""
    doc = (DOCS / "performance.md").read_text(encoding="utf-8")
    section = doc[doc.index("## The CLI's --memory modes"):]
    section = section[:section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    peaks = [re.findall(r"([\d.]+) GB", line) for line in rows]
    assert rows and all(len(p) == 2 for p in peaks)
    return {float(p[0]) for p in peaks}, {float(p[1]) for p in peaks}


def test_memory_costs_in_help_and_readme_are_the_measured_ones():
    from refprism.cli.common import memory_help

    low, fast = _table_peaks()
    assert len(low) == len(fast) == 1  # the peak is the weights' and one layer's, whatever the command
    low, fast = low.pop(), fast.pop()
    for text in (memory_help("one"), memory_help("many"), README):
        assert f"{low} GB peak" in text and f"{fast} GB peak" in text, text
    assert "a fifth of fast's" in README and 0.18 <= low / fast <= 0.22


@pytest.mark.parametrize("command, mode", [("run", "low"), ("residual", "low"), ("attention", "low"),
                                           ("patch", "low"), ("report", "fast")])
def test_auto_is_the_measured_choice(command, mode):
    """The table's `auto picks` column is what --memory auto does for that command (cli.common.memory_mode)."""
    from refprism.cli import build_parser
    from refprism.cli.common import memory_mode
    from refprism.cli.report_cmds import REPORT_WORK

    doc = (DOCS / "performance.md").read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if line.startswith(f"| `{command}"))
    assert row.rstrip(" |").endswith(mode)
    work = REPORT_WORK if command == "report" else "one"
    assert {"low": "low", "auto": "fast"}[memory_mode("auto", work)] == mode
    assert ("one forward pass" if work == "one" else "many forward passes") in \
        build_parser()._subparsers._group_actions[0].choices[command].format_help().replace("\n", " ").replace(
            "                        ", "")
