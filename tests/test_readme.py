"""The README's Python tour, executed: every ```python block in order, in one namespace, on a small local
checkpoint of gemma-2b's shape where it matters (the real tokenizer, 18 layers, 8 heads) in place of the hub id.

A README that no longer matches the code fails here: a renamed function, a changed signature, a removed name.
The values the tour states in its comments (the token ids of its prompt) are checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from refprism.checkpoints.synth import make_config, write_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.fixture(scope="module")
def gemma2b_like(tmp_path_factory):
    """gemma-2b's vocabulary and tokenizer, depth and head count; a small width (a few seconds to write and run)."""
    config = make_config("tiny", vocab_size=256000, hidden_size=32, intermediate_size=64, num_hidden_layers=18,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=8)
    return write_checkpoint(tmp_path_factory.mktemp("readme") / "model", config)


def test_the_readme_has_its_python_tour():
    blocks = BLOCK.findall(README.read_text())
    assert len(blocks) >= 3 and "refprism.load(" in blocks[0], "the README lost its Python tour"


def test_the_readme_python_tour_runs(gemma2b_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tour writes report.html into the working directory
    blocks = BLOCK.findall(README.read_text())
    code = "\n".join(blocks).replace('"google/gemma-2b"', repr(str(gemma2b_like)))
    assert repr(str(gemma2b_like)) in code, "the tour no longer loads google/gemma-2b: update this test's stand-in"
    namespace = {"text": "The capital city of France is " * 8}  # the tour's long prompt, named but not written out
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (the README is this repository's own text)

    run = namespace["run"]
    stated = re.search(r"run\.tokens\s+# (\[[\d, ]+\])", README.read_text())
    assert stated, "the tour no longer states its prompt's token ids"
    assert run.tokens.tolist() == eval(stated.group(1))  # the real tokenizer, as the comment says
    assert (tmp_path / "report.html").stat().st_size > 0
    res, model = namespace["res"], namespace["model"]
    assert res.exact  # the parts sum to the whole within the stated tolerance, as the tour says
    ids = {piece: model.tokenizer.token_to_id(piece) for piece in ("▁Paris", "▁London", "▁Tokyo")}
    logits = run.logits[-1].astype(np.float64)  # "whole = the model's raw logit differences"
    np.testing.assert_allclose(res.whole, [logits[ids["▁Paris"]] - logits[ids["▁Tokyo"]],
                                           logits[ids["▁London"]] - logits[ids["▁Tokyo"]]], rtol=1e-5, atol=1e-5)
