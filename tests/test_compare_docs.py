"""docs/compare.md stays true: its PyTorch dump example runs and compares clean, its name map example is valid, and
its catalogue table lists every catalogued mistake."""

from __future__ import annotations

import json
import re
from pathlib import Path

import refprism
from refprism.crosscheck import CATALOGUE, TOKEN_MISTAKES, compare
from refprism.crosscheck.sides.dumps import NameMap

DOC = (Path(__file__).resolve().parents[1] / "docs" / "compare.md").read_text(encoding="utf-8")


def block(after: str, lang: str) -> str:
    """The first ```lang block after the heading or text `after`."""
    rest = DOC[DOC.index(after):]
    return re.search(rf"```{lang}\n(.*?)```", rest, re.S).group(1)


def test_the_pytorch_dump_example_runs_and_compares_clean(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = block("## Dump from your own implementation", "python")
    gemma_2b_ids = "[2, 651, 6037, 3413, 576, 6081, 603]"
    assert gemma_2b_ids in code
    code = code.replace(gemma_2b_ids, "[2, 131, 103, 104, 105, 106, 107]")  # the tiny vocabulary's ids
    exec(compile(code, "docs/compare.md", "exec"), {"MODEL": str(tiny_dir)})
    r = compare(refprism.load(tiny_dir), None, against=str(tmp_path / "dump.npz"), names="hf")
    assert r.exit_status == 0, r.table()
    assert r.pieces == ["<bos>", "The", "▁capital", "▁city", "▁of", "▁France", "▁is"]
    assert {"blocks.0.attn.z", "blocks.1.mlp.act", "blocks.1.attn.pattern", "logits"} <= {s.site for s in r.sites}
    assert any("name no refprism site" in n for n in r.notes)


def test_the_name_map_example_is_valid(tiny):
    m = NameMap.parse(json.loads(block("**A JSON name map**", "json")), tiny.config, "docs")
    assert [e.site for e in m.entries] == ["blocks.{l}.ln1.out", "blocks.{l}.attn.q", "blocks.{l}.attn.scores",
                                           "blocks.{l}.resid_post", "logits"]


def test_the_catalogue_table_lists_every_mistake():
    table = DOC[DOC.index("| mistake | where |"):]
    table = table[: table.index("\n\n")]
    expanded = set(re.findall(r"`([a-z0-9_]+)`", "\n".join(line.split("|")[1] for line in table.splitlines()[2:])))
    for line in table.splitlines()[2:]:  # rows like `embed_scale_in_bfloat16` / `_in_float16` / `_in_float32`
        first = line.split("|")[1]
        base = re.findall(r"`([a-z0-9_]+)`", first)
        for suffix in re.findall(r"`(_[a-z0-9_]+)`", first):
            expanded.add(base[0].rsplit("_in_", 1)[0] + suffix)
    assert {m.name for m in CATALOGUE} | set(TOKEN_MISTAKES) <= expanded


def test_the_catalogue_tables_gemma4_column_says_no_exactly_for_not_on_gemma4():
    from refprism.crosscheck.catalogue import NOT_ON_GEMMA4

    table = DOC[DOC.index("| mistake | where |"):]
    table = table[: table.index("\n\n")]
    no = set()
    for line in table.splitlines()[2:]:
        cells = line.split("|")
        assert cells[-2].strip().startswith(("yes", "no: ")), line
        if cells[-2].strip().startswith("no: "):
            no |= set(re.findall(r"`([a-z0-9_]+)`", cells[1]))
    assert no == set(NOT_ON_GEMMA4)
