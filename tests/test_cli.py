"""The `refprism run` and `record` commands: output, JSON, the .npz file, one-line errors, no half files."""

import json
import subprocess
import sys

import numpy as np
import pytest

from refprism import cli
from refprism.gemma.record import expected_shapes


def refprism_cmd(*args, env=None):
    """Run the installed console entry point in a fresh process (as a user would)."""
    return subprocess.run([sys.executable, "-m", "refprism.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_run_prints_tokens_and_top_k(tiny_dir, capsys):
    assert cli.main(["run", "The capital city of France is", "--model", str(tiny_dir), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "tokens: <bos>(2) The(" in out and "▁France(" in out
    assert out.count(" logit ") == 3


def test_record_a_selection(tiny_dir, tiny, tmp_path):
    out = tmp_path / "sel.npz"
    assert cli.main(["record", "--ids", "2 5 7 9", "--model", str(tiny_dir), "--out", str(out),
                     "--select", "blocks.1.attn.pattern@-1", "logits@0,-1"]) == 0
    full = tiny.run([2, 5, 7, 9])
    with np.load(out, allow_pickle=False) as z:
        assert set(z.files) == {"blocks.1.attn.pattern", "blocks.1.attn.pattern.positions", "logits",
                                "logits.positions", "tokens", "config"}
        assert z["logits.positions"].tolist() == [0, 3]
        np.testing.assert_array_equal(z["blocks.1.attn.pattern"][:, 0], full.record["blocks.1.attn.pattern"][:, 3])
        np.testing.assert_allclose(z["logits"], full.logits[[0, 3]], rtol=1e-6, atol=1e-6)
    assert cli.main(["record", "--ids", "2 5", "--model", str(tiny_dir), "--out", str(tmp_path / "bad.npz"),
                     "--select", "blocks.*.atn.out"]) == 2
    assert not (tmp_path / "bad.npz").exists()


def test_run_json_matches_api(tiny_dir, tiny, capsys):
    assert cli.main(["run", "--ids", "2,17,33", "--model", str(tiny_dir), "--top", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    logits = tiny.run([2, 17, 33], positions=-1).logits[-1]  # what the command computes: the last position
    assert [t["id"] for t in data["tokens"]] == [2, 17, 33] and data["position"] == 2
    assert [t["id"] for t in data["top"]] == np.argsort(-logits)[:4].tolist()
    assert data["top"][0]["logit"] == pytest.approx(float(logits.max()), rel=1e-6)
    p = np.exp(logits.astype(np.float64) - logits.max())
    assert data["top"][0]["prob"] == pytest.approx(1 / p.sum(), rel=1e-9)
    assert data["dtype"] == "float32"


def test_record_writes_every_activation(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run.npz"
    argv = ["record", "--ids", "2 5 7", "--model", str(tiny_dir), "--out", str(out), "--dtype", "float64"]
    assert cli.main(argv) == 0
    with np.load(out) as f:  # allow_pickle is False by default: nothing in it needs a pickle
        assert f["tokens"].tolist() == [2, 5, 7]
        cfg = json.loads(str(f["config"]))
        assert cfg["n_layers"] == 2
        for name, shape in expected_shapes(__import__("refprism").load(tiny_dir).config, 3).items():
            assert f[name].shape == shape and f[name].dtype == np.float64, name


def test_record_failure_leaves_no_file(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run.npz"

    def broken_write(f, array, **kw):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", broken_write)
    assert cli.main(["record", "--ids", "2", "--model", str(tiny_dir), "--out", str(out)]) == 1
    assert list(tmp_path.iterdir()) == []  # neither the file nor the temporary one
    err = capsys.readouterr().err
    assert err.startswith("refprism: error: could not write") and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1


def test_broken_pipe_is_quiet(checkpoint):
    """`refprism ... | head -1`: the reader closes the pipe after the first line; the command ends with 141 (a
    shell's code for SIGPIPE) and nothing on stderr; the line read is the first line of the full output."""
    import subprocess
    import sys

    model_dir = checkpoint(intermediate_size=2048)  # 2048 neurons: the listing overfills a 64 KiB pipe buffer
    argv = [sys.executable, "-m", "refprism.cli", "mlp", "--ids", "2,5,7", "--layer", "0", "--top", "2048",
            "--model", str(model_dir)]
    full = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0 and len(full.stdout.encode()) > 2 * 65536, (len(full.stdout), full.stderr)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    p.stdout.close()  # the reader leaves
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141, err
    assert err == "" and first == full.stdout.splitlines(keepends=True)[0]


def test_record_refuses_to_overwrite_and_missing_dir(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run.npz"
    out.write_bytes(b"keep me")
    assert cli.main(["record", "--ids", "2", "--model", str(tiny_dir), "--out", str(out)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli.main(["record", "--ids", "2", "--model", str(tiny_dir), "--out", str(tmp_path / "no" / "x.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["run", "--ids", "2,99999"], "token id 99999 is out of range"),
    (["run", "--ids", "2,x"], "--ids must be integers"),
    (["run"], "no prompt"),
    (["run", "hi", "--dtype", "float16"], "float32 or float64"),
    (["run", "hi", "--top", "0"], "--top must be at least 1"),
    (["run", "hi", "--nonsense"], "unrecognized arguments"),
])
def test_errors_are_one_line_exit_2(tiny_dir, args, message):
    r = refprism_cmd(*args, "--model", tiny_dir)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_missing_model_directory(tmp_path):
    r = refprism_cmd("run", "hi", "--model", tmp_path / "absent")
    assert r.returncode == 2 and "no model directory" in r.stderr and "Traceback" not in r.stderr


def test_empty_prompt_is_the_bos_only_run(tiny_dir, capsys):
    assert cli.main(["run", "", "--model", str(tiny_dir), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "T=1  (empty prompt: the BOS-only run)" in out and "tokens: <bos>(2)\n" in out
