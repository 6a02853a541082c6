"""`refprism compare` on the command line: the table, --json, --markdown, --plot, and exit 0 / 1 / 2 for CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import refprism
from refprism import cli
from refprism.crosscheck import compare
from refprism.crosscheck.sides import dumps

PROMPT = "The capital city of France is"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def broken_dump(tiny_dir, tmp_path_factory):
    """A dump of a port whose layer-1 GELU is the exact erf one: a finding, exit 1."""
    from refprism.crosscheck.catalogue import gelu_erf

    model = refprism.load(tiny_dir)

    def erf(name, value, record):
        if name == "blocks.1.mlp.act":
            return (gelu_erf(record["blocks.1.mlp.gate"]) * record["blocks.1.mlp.up"]).astype(np.float32)
        return value

    run = model.run(PROMPT, edit=erf)
    path = tmp_path_factory.mktemp("dump") / "port.npz"
    dumps.write_dump(path, {**run.record, "tokens": run.tokens})
    return path


def test_hf_live_agrees_exit_0(tiny_dir, capsys):
    assert cli.main(["compare", PROMPT, "--model", str(tiny_dir), "--against", "hf"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == "tokens: <bos>(2) The(131) ▁capital(103) ▁city(104) ▁of(105) ▁France(106) ▁is(107)"
    assert "every one of 39 sites is within its floor" in out and "FIRST WRONG OP" not in out


def test_json_report(tiny_dir, capsys):
    assert cli.main(["compare", "--ids", "2,131,103", "--model", str(tiny_dir), "--against", "hf", "--json",
                     "--dtype", "bfloat16"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["tokens_match"] and j["dtype"] == "bfloat16" and j["first_divergence"] is None
    assert j["first_wrong_op"] is None and j["diagnosis"] == [] and j["exit_status"] == 0
    assert all({"site", "max_abs", "floor", "local_max_abs", "diverges"} <= set(s) for s in j["sites"])


def test_a_finding_is_exit_1_with_the_wrong_op_marked(tiny_dir, broken_dump, tmp_path, capsys):
    md, png = tmp_path / "report.md", tmp_path / "fig.png"
    assert cli.main(["compare", "--model", str(tiny_dir), "--against", str(broken_dump), "--markdown", str(md),
                     "--plot", str(png)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    row = next(line for line in lines if line.startswith("! blocks.1.mlp.act "))
    assert "<- first divergence" in row and "<- FIRST WRONG OP" in row
    assert lines[-1].startswith("diagnosis: the MLP uses the exact erf GELU; Gemma uses the tanh approximation (the "
                                "other side behaves like refprism with `gelu_exact` at blocks.1.mlp.act")
    assert "first divergence: blocks.1.mlp.act; first wrong op: blocks.1.mlp.act" in captured.out
    text = md.read_text()
    assert text.startswith("### refprism compare: DIVERGES") and "| `blocks.1.mlp.act` |" in text
    assert "**first wrong op**" in text and "gelu_exact" in text
    assert png.read_bytes()[:8] == PNG
    assert f"wrote {md}" in captured.err and f"wrote {png}" in captured.err


def test_exit_status_in_a_fresh_process(tiny_dir, broken_dump):
    """What CI sees: 1 for a divergence, with the report on stdout and nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "REFPRISM_MODEL"}
    r = subprocess.run([sys.executable, "-m", "refprism.cli", "compare", "--model", str(tiny_dir), "--against",
                        str(broken_dump), "--json"], capture_output=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["first_wrong_op"] == "blocks.1.mlp.act" and r.stderr == b""


def test_figure_draws_the_reports_numbers(tiny, broken_dump):
    from refprism.crosscheck.plots import _compare_fig, _series

    r = compare(tiny, None, against=str(broken_dump))
    fig = _compare_fig(r)
    left, right = fig.axes[:2]
    assert left.get_yscale() == "log" and right.get_yscale() == "log"
    red = right.collections[1].get_offsets()  # the sites above their local floor
    assert [int(x) for x in red[:, 0]] == [[s.site for s in r.sites].index(w) for w in r.wrong_ops]
    floors = right.lines[0].get_ydata()
    np.testing.assert_allclose(floors, np.clip(_series(r)[:, 3], left.get_ylim()[0], None))
    assert any("first wrong op: blocks.1.mlp.act" in t.get_text() for t in right.texts)


def test_other_dtype_is_a_choice(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", PROMPT, "--model", str(tiny_dir), "--against", "hf", "--dtype", "int8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "invalid choice: 'int8'" in err
