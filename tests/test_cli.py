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


# ------------------------------------------------------------------------------ what a newcomer sees (issue 22)


def _events(stderr: str) -> list[str]:
    """stderr as output events: each line, and each in-place redraw of a bar (a carriage return)."""
    return [e for line in stderr.split("\n") for e in line.split("\r") if e.strip()]


def test_a_real_size_load_is_never_silent(gemma3_q4_gguf):
    """Gemma 3 270M (a 253 MB GGUF, ~15 s to load here) says what it does on stderr, one event per tensor
    dequantized and per layer converted, so no stretch of the load longer than one tensor's work goes silent
    (counted, not timed); stdout holds only the JSON."""
    r = refprism_cmd("run", "The capital of France is", "--model", gemma3_q4_gguf, "--top", "2", "--json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)  # nothing but the JSON on stdout
    events = _events(r.stderr)
    phases = [e for e in events if e.startswith("refprism: ") and e.endswith(" ...")]
    assert [p.split()[1] for p in phases] == ["reading", "loading", "running"], phases
    dequantized = [e for e in events if e.startswith("refprism: dequantizing [")]
    converted = [e for e in events if e.startswith("refprism: converting [")]
    # 18 layers of 11 tensors (Gemma 3: q/k norms, 4 norms, 7 matrices), the embedding and the final norm
    assert len(dequantized) == 18 * 13 + 2 and dequantized[-1].endswith(" 236/236"), dequantized[-3:]
    assert len(converted) == 18 + 1 and converted[-1].endswith(" 19/19"), converted
    assert len(events) == len(phases) + len(dequantized) + len(converted), events


def test_small_models_load_silently(tiny_dir):
    r = refprism_cmd("run", "The capital city of France is", "--model", tiny_dir, "--top", "2")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_progress_bar_events(capsys):
    from refprism.cli.common import Progress

    p = Progress(True)
    p.phase("loading")
    for i in range(1, 4):
        p("converting", i, 3)
    err = capsys.readouterr().err
    assert _events(err) == ["refprism: loading ...", "refprism: converting [##########....................] 1/3",
                            "refprism: converting [####################..........] 2/3",
                            "refprism: converting [##############################] 3/3"]
    assert err.endswith("3/3\n")
    quiet = Progress(False)
    quiet.phase("x"), quiet("converting", 1, 1)
    assert capsys.readouterr().err == ""


def _watch_weights(monkeypatch):
    """Model.load_weights, made to fail: a refusal that gets past it was made after reading the weights."""
    import refprism.model

    def read(self):
        if self.deferred is not None:
            raise AssertionError("the weights were read before the refusal")
        return self.params

    monkeypatch.setattr(refprism.model.Model, "load_weights", read)


P = "The capital city of France is"


@pytest.mark.parametrize("args, message", [
    (["residual", P, "--position", "7"], "position 7 is out of range for 7 tokens"),
    (["residual", P, "--targets", "▁Nowhere-at-all"], "not one"),
    (["residual", P, "--versus", "#99999"], r"target id #99999 is beyond the vocabulary"),
    (["residual", P, "--targets", "▁Paris", "--versus", "▁Paris"], "both a target and a foil"),
    (["attention", P, "--layer", "2"], r"layer 2 is out of range \(the model has layers 0 .. 1\)"),
    (["mlp", P, "--layer", "-1"], "layer -1 is out of range"),
    (["chain", P, "--layer", "1", "--head", "4", "--source", "5"], "head 4 is out of range"),
    (["chain", P, "--layer", "1", "--head", "1", "--source", "7"], "source 7 is out of range"),
    (["chain", P, "--layer", "1", "--head", "1", "--source", "5", "--then", "head:1:0:0"],
     r"L1.attn is not part of blocks.1.resid_pre"),
    (["chain", P, "--layer", "1", "--neuron", "128"], "neuron 128 is out of range"),
    (["chain", P, "--layer", "1", "--neuron", "3", "--then", "neuron:0:999"], "neuron 999 is out of range"),
    (["chain", P, "--layer", "1", "--head", "1", "--source", "5", "--split", "mlp:1"], "L1.mlp is not part of"),
    (["chain", P, "--layer", "1", "--head", "1", "--source", "5", "--split", "heads"], "--split 'heads'"),
    (["chain", P, "--layer", "1", "--head", "1", "--source", "5", "--then", "head:0:1"], "expected head:LAYER"),
    (["map", P, "--layer", "1", "--head", "1", "--source", "5", "--inputs", "▁Nowhere-at-all"], "not one"),
    (["pca", "--targets", "#1", "#99999"], "beyond the vocabulary"),
    (["run", "--ids", "2,99999"], "token id 99999 is out of range"),
    (["record", "--ids", "2,5", "--out", "{tmp}/r.npz", "--select", "blocks.*.atn.out"], "names no recorded site"),
    (["record", "--ids", "2,5", "--out", "{tmp}/r.npz", "--position", "2"], "position 2 is out of range"),
    (["patch", P, "--component", "L2H0", "--ablate", "zero"], "layer 2"),
    (["patch", P, "--component", "L1H1.src7", "--ablate", "zero"], "source"),
    (["patch", P, "--component", "L1H1", "--ablate", "resample", "--counterfactual", "The capital of France is"],
     "the counterfactual has 6 tokens and the prompt 7"),
    (["patch", P, "--component", "L1H1", "--ablate", "mean", "--reference", ""], "the mean set is empty"),
    (["patch", P, "--component", "L1H1", "--ablate", "zero", "--at", "9"], "9"),
    (["validate", P, "--level", "neurons:5", "--ablate", "zero"], "5"),
    (["validate", P, "--level", "heads", "--ablate", "zero", "--top", "0"], "^--top must be at least 1, got 0"),
    (["report", P, "--out", "{tmp}/p.html", "--targets", "▁Paris", "▁Paris"], "given twice"),
    (["compare", P, "--against", "hf", "--model", "{tmp}/m.gguf"], "not a .gguf file"),
    (["compare", P, "--against", "llama.cpp"], "give --model as a .gguf file"),
    (["sweep", "{tmp}/bad.jsonl", "--out", "{tmp}/sweep"], "nothing ran: all 1 rows of .* are bad"),
])
def test_arguments_are_checked_before_the_weights(tiny_dir, tmp_path, monkeypatch, capsys, args, message):
    """A wrong argument is refused before any weight is read (a real-size load takes 15-20 s)."""
    import re

    _watch_weights(monkeypatch)
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "x", "targets": ["zzzzzz"]}\n')
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("refprism: error: ") and re.search(message, err[len("refprism: error: "):]), err


def test_compare_refuses_a_gguf_against_hf_before_reading_it(tmp_path, capsys):
    """The model's kind against the other side's is checked before the file is even opened."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    assert cli.main(["compare", P, "--against", "tl", "--model", str(gguf)]) == 2
    assert "loads the checkpoint with transformers" in capsys.readouterr().err


def test_memory_refusal_names_the_cli_ways_out_that_fit(tiny_dir, tmp_path, monkeypatch, capsys):
    """The refusal comes before the weights, computed from config and token count, and names only what would
    fit, spelled as this command's flags."""
    import refprism.model
    from refprism.gemma.record import estimate_bytes

    _watch_weights(monkeypatch)
    tiny = refprism.load(tiny_dir, memory="low", defer=True)
    ids = list(range(2, 60))
    full = estimate_bytes(tiny.config, [58], tiny.dtype)["total"]
    last = estimate_bytes(tiny.config, [58], tiny.dtype, tiny._selection(None, -1, [58]))["total"]
    assert last < full
    room = (last + full) / 2 / refprism.model.MEMORY_SHARE + tiny.deferred.resident  # logits@-1 fits, all not
    monkeypatch.setattr(refprism.model, "available_memory", lambda: int(room))
    argv = ["record", "--ids", ",".join(map(str, ids)), "--model", str(tiny_dir), "--out", str(tmp_path / "r.npz")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "positions=" not in err and "record=" not in err and 'memory="low"' not in err, err
    assert "(--position -1)" in err and "(--select, e.g." in err and "give a prompt of at most " in err, err
    n = int(err.split("give a prompt of at most ")[1].split()[0])
    assert estimate_bytes(tiny.config, [n], tiny.dtype)["total"] <= (room - tiny.deferred.resident) * \
        refprism.model.MEMORY_SHARE < estimate_bytes(tiny.config, [n + 1], tiny.dtype)["total"]
    # each way out named does fit: the same command with --position -1 is not refused (the weights are read)
    with pytest.raises(AssertionError, match="the weights were read"):
        cli.main(argv + ["--position", "-1"])
    # the prism commands record everything (the logits only at --position): --position and --select are not
    # theirs to offer
    monkeypatch.setattr(refprism.model, "available_memory",
                        lambda: int(last / 2 / refprism.model.MEMORY_SHARE + tiny.deferred.resident))
    assert cli.main(["residual", "--ids", ",".join(map(str, ids)), "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert "--select" not in err and "--position" not in err and "give a prompt of at most" in err, err


def test_pieces_with_line_breaks_are_escaped(tiny_dir, capsys, monkeypatch):
    """A piece holding a newline or a tab (the additions prompts hold "\\n") stays on its line."""
    import refprism.model

    real = refprism.model.Model.piece
    monkeypatch.setattr(refprism.model.Model, "piece",
                        lambda self, i: {5: "a\nb", 7: "\tc"}.get(int(i), real(self, i)))
    assert cli.main(["run", "--ids", "2,5,7", "--model", str(tiny_dir), "--top", "512"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "tokens: #2(2) a\\nb(5) \\tc(7)" in lines[1].replace("<bos>", "#2") and "\t" not in out, lines[1]
    assert len(lines) == 3 + 512 and any(" a\\nb " in line for line in lines[3:])


def test_memory_auto_by_the_work():
    from refprism.cli.common import memory_mode

    assert memory_mode("auto", "one") == "low" and memory_mode("auto", "many") == "auto"
    assert memory_mode("fast", "one") == "fast" and memory_mode("low", "many") == "low"
