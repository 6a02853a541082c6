"""Fuzzing the readers and the CLI: whatever the bytes or the arguments, refprism succeeds or raises RefprismError.

Fixed budgets (derandomized, so a run is the same every time): 150 safetensors, 150 config.json, 100 index and
300 CLI examples, about 15 s in all.

- The safetensors, config.json and index readers get a valid tiny checkpoint with one file mutated: bytes
  flipped, truncated or spliced, or JSON values replaced by random JSON (shapes, offsets, dtypes, config values,
  the index's weight_map). `refprism.load` must return a model or raise a RefprismError; any other exception or
  a load that allocates more than a few MB (traced by tracemalloc, which sees NumPy's buffers) fails the test.
  (No time limits: on a loaded machine slowness is not a failure; speed is measured by tools/bench*.py.)
- Headers that declare huge tensors are refused before anything is mapped or allocated: checked in a fresh
  process against its peak resident memory (ru_maxrss).
- `refprism.cli.main` gets random argument lists built from the real option names, numbers (negative, huge)
  and strings (empty, unicode, lone surrogates); it must return 0 or 2 (or exit 0 / 2 from argparse).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import refprism
from refprism import cli
from refprism.errors import RefprismError

# The two readers' fuzzers find exceptions that only a patch to refprism/gemma/weights.py fixes (the error corpus has a
# case for each: safetensors-dtype-not-a-string, index-shard-name-too-long, and the deeply nested JSON ones).
NEEDS_WEIGHTS_PATCH = pytest.mark.xfail(strict=True, reason="needs weights.py patch: read_header hashes a "
                                        "non-string dtype; safetensors_files' is_file raises OSError for long names")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
TRACED_LIMIT = 16 * 2**20  # the tiny model is 0.4 MB in float32; a header's lie would show as far more


def load_or_refuse(model_dir: Path):
    """refprism.load must succeed or raise RefprismError, within the traced memory limit."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]  # what is alive already (hypothesis' own data, the sources)
    try:
        model = refprism.load(model_dir, memory="fast")
        model.run([2, 5])
    except RefprismError as e:
        assert "\n" not in str(e), repr(str(e))
    finally:
        grew = tracemalloc.get_traced_memory()[1] - before
    assert grew < TRACED_LIMIT, f"loading allocated {grew / 2**20:.0f} MB"


@pytest.fixture
def traced():
    """tracemalloc on for one reader's fuzz test (it slows every allocation: not for the CLI fuzz)."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.fixture(scope="module")
def sources(checkpoint):
    """The valid files every mutation starts from: a single-file and a two-shard tiny checkpoint, and tiny Gemma 2
    and 3 ones (their config keys: windows, soft-caps, layer types, RoPE per layer type)."""
    return {"single": checkpoint(), "sharded": checkpoint(shards=2), "gemma2": checkpoint("tiny-gemma2"),
            "gemma3": checkpoint("tiny-gemma3")}


class Workdir:
    """A fresh model directory per example: the mutated file written, the others linked to the valid ones."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def make(self, source: Path, files: dict[str, bytes | None]) -> Path:
        self.n += 1
        d = self.root / f"m{self.n}"
        d.mkdir()
        for path in source.iterdir():
            if path.name not in files and path.name != "tokenizer.json":  # no tokenizer: faster, and not fuzzed here
                (d / path.name).symlink_to(path)
        for name, data in files.items():
            if data is not None:
                (d / name).write_bytes(data)
        return d

    def clean(self):
        for d in self.root.iterdir():
            shutil.rmtree(d)


@pytest.fixture
def workdir(tmp_path):
    return Workdir(tmp_path)


# ------------------------------------------------------------------------------------------ strategies

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)


def near_ints(n):
    """Integers around n: off by a little, by a lot, negative, zero, and beyond any file."""
    return st.sampled_from([0, -1, 1, n - 1, n, n + 1, 2 * n, 2**31, 2**40, 2**63, 2**64 + 5, -2**63])


def mutate_bytes(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "zero-run"]))
    head = 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else len(data)
    where = st.integers(0, max(0, min(len(data), head + 64) - 1))  # mostly the header: the data is just numbers
    if kind == "flip":
        out = bytearray(data)
        for pos, byte in draw(st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=8)):
            if pos < len(out):
                out[pos] = byte
        return bytes(out)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "splice":
        a = draw(where)
        return data[:a] + draw(st.binary(max_size=32)) + data[a + draw(st.integers(0, 32)):]
    a = draw(where)
    return data[:a] + b"\0" * draw(st.integers(1, 16)) + data[a + 16:]


def header_of(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header, rest: bytes, pad=True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + rest


# ------------------------------------------------------------------------------------------ readers


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_fuzz_safetensors(sources, workdir, traced, data):
    source = sources["single"]
    raw = (source / "model.safetensors").read_bytes()
    header, rest = header_of(raw)
    names = sorted(k for k in header if k != "__metadata__")
    how = data.draw(st.sampled_from(["bytes", "field", "entry", "header"]), label="how")
    if how == "bytes":
        mutated = mutate_bytes(raw, data.draw)
    else:
        header = json.loads(json.dumps(header))
        name = data.draw(st.sampled_from(names), label="tensor")
        entry = header[name]
        if how == "field":
            key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
            begin, end = entry["data_offsets"]
            value = data.draw({
                "dtype": st.sampled_from(["F32", "BF16", "F16", "F64", "I32", "U8", "BOOL", "f32", ""]) | json_values,
                "shape": st.lists(near_ints(64), max_size=3) | json_values,
                "data_offsets": st.tuples(near_ints(begin), near_ints(end)).map(list) | json_values,
            }[key], label="value")
            entry[key] = value
        elif how == "entry":
            action = data.draw(st.sampled_from(["delete", "replace", "rename", "duplicate-range"]), label="action")
            if action == "delete":
                del header[name]
            elif action == "replace":
                header[name] = data.draw(json_values, label="entry")
            elif action == "rename":
                header[data.draw(st.text(max_size=20), label="new name")] = header.pop(name)
            else:
                other = header[data.draw(st.sampled_from(names), label="other")]
                other["data_offsets"] = list(entry["data_offsets"])
        else:
            header = data.draw(json_values, label="header") if data.draw(st.booleans()) else \
                dict(header, __metadata__=data.draw(json_values, label="metadata"))
        mutated = with_header(header, rest, pad=data.draw(st.booleans(), label="pad"))
    load_or_refuse(workdir.make(source, {"model.safetensors": mutated}))
    workdir.clean()


CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_parameters", "rope_scaling", "model_type", "hidden_act", "hidden_activation",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
               # Gemma 2 / 3
               "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern", "layer_types",
               "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq",
               "use_bidirectional_attention"]


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_fuzz_config(sources, workdir, traced, data):
    source = sources[data.draw(st.sampled_from(["single", "gemma2", "gemma3"]), label="family")]
    raw = (source / "config.json").read_bytes()
    if data.draw(st.integers(0, 4), label="raw bytes?") == 0:
        mutated = mutate_bytes(raw, data.draw)
    else:
        hf = json.loads(raw)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
            value = data.draw(st.sampled_from(["delete"]) | near_ints(hf.get(key) if isinstance(hf.get(key), int)
                                                                     else 8) | json_values, label="value")
            if value == "delete":
                hf.pop(key, None)
            else:
                hf[key] = value
        mutated = json.dumps(hf).encode()
    load_or_refuse(workdir.make(source, {"config.json": mutated}))
    workdir.clean()


@settings(max_examples=100, **SETTINGS)
@given(st.data())
def test_fuzz_index(sources, workdir, traced, data):
    source = sources["sharded"]
    raw = (source / "model.safetensors.index.json").read_bytes()
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    how = data.draw(st.sampled_from(["bytes", "value", "map", "whole"]), label="how")
    index = json.loads(raw)
    if how == "bytes":
        mutated = mutate_bytes(raw, data.draw)
    else:
        weight_map = index["weight_map"]
        if how == "value":
            name = data.draw(st.sampled_from(sorted(weight_map)), label="tensor")
            weight_map[name] = data.draw(st.sampled_from(shards + ["", ".", "..", "../x.safetensors",
                                                                   "config.json", "a" * 300, "x\0y"])
                                         | json_values, label="shard")
        elif how == "map":
            index["weight_map"] = data.draw(json_values, label="weight_map")
        else:
            index = data.draw(json_values, label="index")
        mutated = json.dumps(index).encode()
    load_or_refuse(workdir.make(source, {"model.safetensors.index.json": mutated}))
    workdir.clean()


# ------------------------------------------------------------------------------------------ declared sizes

HUGE_HEADERS = {
    # name: (tensor to change, its new header entry given (begin, data size)); 2**40 F32 values = 4 TB
    "shape 2**40, offsets to match": lambda b, size: {"dtype": "F32", "shape": [2**40], "data_offsets": [b, b + 2**42]},
    "shape 2**40, offsets of 256 bytes":
        lambda b, size: {"dtype": "F32", "shape": [2**40], "data_offsets": [b, b + 256]},
    "shape [2**31, 2**31, 0]": lambda b, size: {"dtype": "F32", "shape": [2**31, 2**31, 0], "data_offsets": [b, b]},
    "shape 2**62, offsets to 2**64": lambda b, size: {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 2**64]},
}

_MEASURE = r"""
import json, resource, sys
import refprism
from refprism.errors import CheckpointError
results = {}
for name, path in json.loads(sys.argv[1]).items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        refprism.load(path, memory="fast")
        outcome = "loaded"
    except CheckpointError as e:
        outcome = "CheckpointError: " + str(e)
    results[name] = {"outcome": outcome,
                     "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}
print(json.dumps(results))
"""


def test_huge_declared_tensors_fail_fast_without_memory(checkpoint, tmp_path):
    """A header declaring a 4 TB tensor (or a length beyond the file) is refused before anything is mapped:
    in a fresh process, the peak resident memory grows by less than 100 MB (time is the benchmarks' business)."""
    source = checkpoint()
    header, rest = header_of((source / "model.safetensors").read_bytes())
    begin = header["model.norm.weight"]["data_offsets"][0]
    paths = {}
    for i, (name, entry) in enumerate(HUGE_HEADERS.items()):
        h = dict(header, **{"model.norm.weight": entry(begin, len(rest))})
        d = shutil.copytree(source, tmp_path / f"m{i}")
        (d / "model.safetensors").write_bytes(with_header(h, rest))
        paths[name] = str(d)
    d = shutil.copytree(source, tmp_path / "long")
    (d / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    paths["header length 2**62"] = str(d)
    r = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(paths)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    for name, result in json.loads(r.stdout).items():
        assert result["outcome"].startswith("CheckpointError: "), (name, result)
        assert result["grew_kb"] < 100 * 1024, (name, result)


# ------------------------------------------------------------------------------------------ the CLI

PROMPT = "The capital city of France is"
PARSER = cli.build_parser()
SUBCOMMANDS = {name: parser for name, parser in PARSER._subparsers._group_actions[0].choices.items()
               if name not in ("demo", "sweep")}  # command -> its parser: the real option names (demo: its own
# test, a real model; sweep reads a data file, not a prompt, and may start Ray: tests/test_sweeps.py fuzzes it)


def options_of(command) -> dict:
    """--option -> its argparse action, for one subcommand (what a user could type)."""
    return {opt: action for action in SUBCOMMANDS[command]._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


ALL_OPTIONS = sorted({opt for command in SUBCOMMANDS for opt in options_of(command)})
small = st.integers(-8, 8)
numbers = (small | small | st.integers() | st.sampled_from([2**31, 2**63, -2**63, 10**30])).map(str)
texts = st.text(max_size=12) | st.sampled_from(["\udcff", "a\udc80b", "\x00", "-", "--", "#", "#-1", "#²", "é",
                                                 "  ", "\n", "ü" * 50, "~nobody/x", "a" * 300])
tokens = st.sampled_from(["▁Paris", "#108", " Tokyo", "▁London", "▁France", "0", "7", "#511", "#512"]) | texts
VALUES = {  # option -> strategy for its values (a list: some options take several)
    "--ids": st.sampled_from(["2,5,7", "2", "2 9 9 9", "", "2,-1", "2,512"]) | numbers | texts,
    "--prompt-file": st.sampled_from(["prompt.txt", "absent.txt", "", ".", "/dev/null"]) | texts,
    "--dtype": st.sampled_from(["float32", "float64", "float16", "bfloat16"]) | texts,
    "--memory": st.sampled_from(["auto", "fast", "low"]) | texts,
    "--out": st.sampled_from(["run.npz", "no/such/run.npz", "", "."]) | texts,
    "--plot": st.sampled_from(["no/such/fig.png", "fig.jpg", ""]) | texts,  # never a valid PNG: too slow to draw
    "--then": st.builds("head:{}:{}:{}".format, small, small, small) | st.builds("neuron:{}:{}".format, small, small)
              | texts,
    "--split": st.sampled_from(["residual", "attention:0", "mlp:1", "mlp:-1", "attention:x", "mlp:²", "moe:0",
                                "expert:0:1", "ple:1"]) | texts,
    "--part": st.sampled_from(["neurons", "moe", "ple", "expert:0", "expert:x", "neurons:3"]) | texts,
    "--components": st.sampled_from(["L0H1", "L0H1,L1N5", "", ",", "L9H9"]) | texts,
    # compare: dumps and nonsense only (hf, tl and llama.cpp would run other implementations live)
    "--against": st.sampled_from(["run.npz", "absent.npz", "prompt.txt", "run.safetensors", "."]) | texts,
    "--names": st.sampled_from(["refprism", "hf", "tl", "llama.cpp", "map.json", "prompt.txt"]) | texts,
    "--markdown": st.sampled_from(["report.md", "no/such/report.md", "", "."]) | texts,
    "--kv-cache": st.sampled_from(["f16", "f32", "q8_0"]) | texts,
}
LABELS = st.sampled_from(["embed", "L0.attn", "L1.mlp", "L0H1", "L1H3.src2", "L1N5", "L2H0", "L0N128", "L1H0.src9",
                          "L-1H0", "L01H1"])
VALUES.update({  # the interventions' options (patch, validate)
    "--component": LABELS | texts, "--ablate": st.sampled_from(["zero", "mean", "resample"]) | texts,
    "--direction": st.sampled_from(["noising", "denoising"]) | texts,
    "--at": st.sampled_from(["all", "6", "3,6", "-1", "9", "", ",", "6;5"]) | numbers | texts,
    "--level": st.sampled_from(["residual", "heads", "head-source:1", "neurons:0", "neurons", "neurons:5",
                                "head-source:", "neurons:²"]) | texts,
    "--counterfactual": st.sampled_from([PROMPT.replace("France", "Japan"), "Paris", ""]) | texts,
    "--counterfactual-ids": st.sampled_from(["2,5,7", "", "2,-1"]) | numbers | texts,
    "--reference": st.sampled_from([PROMPT, "", "Paris is"]) | texts,
    "--method": st.sampled_from(["gradxact", "atp", "atp*", "atp*-gd", "atp-gd", "ig", "eap", "eap-ig", ""])
    | texts,  # attribute
    "--methods": st.sampled_from(["atp", "atp,ig", "gradxact,atp-gd", "", ",", "eap"]) | texts,  # validate
    "--steps": numbers,
    "--llama-cpp": st.sampled_from(["absent", ".", ""]) | texts,  # compare: a llama.cpp build (refused without one)
    # graph
    "--max-nodes": numbers, "--batch-size": numbers, "--threads": numbers, "--slug": texts,
    "--node-threshold": st.sampled_from(["0.8", "1.5", "-0.1", "nan", "x"]) | numbers | texts,
    "--edge-threshold": st.sampled_from(["0.98", "2", "-1", "inf"]) | numbers | texts,
    "--check": st.sampled_from(["zero", "mean", "resample"]) | texts,
    "--transcoders": st.sampled_from(["tc", "absent", ".", "", "prompt.txt", "tc/layer_*/params.npz"]) | texts,
    "--zero-positions": numbers,
    "--graph-nodes": numbers, "--graph-edges": numbers,  # report --graph
})
for _opt in ("--top", "--top-k", "--position", "--layer", "--head", "--source", "--neuron", "--depth",
             "--branch", "--budget", "--seed"):
    VALUES[_opt] = numbers
for _opt in ("--validate", "--compare"):  # refprism report's sections: a JSON file
    VALUES[_opt] = st.sampled_from([_opt[2:] + ".json", "absent.json", "", ".", "prompt.txt", "sweep"]) | texts
VALUES["--sweep"] = st.sampled_from(["sweep", "absent", ".", "", "prompt.txt", "validate.json"]) | texts
VALUES["--select"] = st.sampled_from(["logits@-1", "blocks.*.attn.out", "blocks.9.x", "logits@99", "@",
                                      "embed@a"]) | texts
for _opt in ("--targets", "--versus", "--inputs"):
    VALUES[_opt] = tokens
GOOD = {  # values that fit the tiny model (T = 7 for PROMPT, 2 layers, 4 heads, 128 neurons): runs that succeed
    "--ids": st.just("2,5,7"), "--prompt-file": st.just("prompt.txt"),
    "--dtype": st.sampled_from(["float32", "float64"]),
    "--memory": st.sampled_from(["auto", "fast", "low"]), "--top": st.integers(1, 6).map(str),
    "--out": st.just("out.npz"), "--position": st.integers(-3, -1).map(str), "--layer": st.integers(0, 1).map(str),
    "--head": st.integers(0, 3).map(str), "--source": st.integers(0, 2).map(str),
    "--neuron": st.integers(0, 127).map(str), "--then": st.sampled_from(["head:0:1:0", "neuron:0:5"]),
    "--split": st.sampled_from(["residual", "mlp:0"]), "--part": st.just("neurons"),
    "--components": st.sampled_from(["L0H1", "L1H2,L0H0"]),
    "--targets": st.sampled_from(["▁Paris", "#108", " Tokyo", "▁London", "7"]),
    "--versus": st.sampled_from(["▁France", "#3"]), "--inputs": st.sampled_from(["▁France", "#9", "▁Japan"]),
    "--depth": st.integers(0, 2).map(str), "--branch": st.integers(1, 3).map(str),
    "--validate": st.just("validate.json"), "--compare": st.just("compare.json"), "--sweep": st.just("sweep"),
    "--select": st.sampled_from(["logits@-1", "blocks.*.attn.out", "blocks.1.attn.pattern@0,-1", "embed"]),
    "--against": st.just("run.npz"), "--names": st.just("refprism"), "--top-k": st.integers(1, 6).map(str),
    "--markdown": st.just("report.md"),
    "--kv-cache": st.sampled_from(["f16", "f32"]),  # refused unless against llama.cpp
    "--component": st.sampled_from(["embed", "L0.attn", "L1.mlp", "L0H1", "L1H3.src2", "L1N5"]),
    "--ablate": st.sampled_from(["zero", "mean", "resample"]), "--direction": st.sampled_from(["noising", "denoising"]),
    "--at": st.sampled_from(["all", "-1", "3,6"]), "--level": st.sampled_from(["residual", "heads", "head-source:1",
                                                                               "neurons:0"]),
    "--counterfactual": st.just(PROMPT.replace("France", "Japan")), "--counterfactual-ids": st.just("2,5,7"),
    "--reference": st.sampled_from([PROMPT, "Paris is"]), "--budget": st.integers(10, 300).map(str),
    "--seed": st.integers(0, 5).map(str),
    "--method": st.sampled_from(["gradxact", "atp", "atp*", "atp*-gd", "atp-gd", "ig", "eap", "eap-ig"]),
    "--methods": st.sampled_from(["atp", "gradxact,atp-gd", "ig"]), "--steps": st.integers(1, 2).map(str),
    "--llama-cpp": st.just("absent"),
    "--max-nodes": st.integers(0, 400).map(str), "--batch-size": st.integers(1, 300).map(str),
    "--threads": st.integers(1, 2).map(str),
    "--slug": st.just("g"), "--node-threshold": st.sampled_from(["0.8", "0.5", "1.0"]),
    "--edge-threshold": st.sampled_from(["0.98", "0.9"]), "--check": st.sampled_from(["zero", "mean"]),
    "--transcoders": st.sampled_from(["tc", "tc/layer_*/params.npz"]), "--zero-positions": st.integers(0, 2).map(str),
    "--graph-nodes": st.integers(1, 50).map(str), "--graph-edges": st.integers(0, 200).map(str),
}


@st.composite
def argument_lists(draw, model):
    """A subcommand with mostly plausible options (each from its real option names), sometimes noise."""
    command = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    wild = draw(st.booleans())  # wild: any value; tame: values that fit the model, so whole runs are reached
    values = VALUES if wild else GOOD
    argv = [command]
    if command != "pca":
        kinds = ["text", "--ids", "--prompt-file"]
        chosen = st.lists(st.sampled_from(kinds), max_size=2) if wild else st.sampled_from(kinds).map(lambda k: [k])
        for kind in draw(chosen):
            if kind == "text":
                argv.append(draw(st.sampled_from([PROMPT, "", "Paris"]) | (texts if wild else st.nothing())))
            else:
                argv += [kind, draw(values[kind])]
    skip = {"--ids", "--prompt-file", "--model"} | (set() if wild else {"--plot"})
    if not wild and command in ("chain", "map"):  # tame: the first step is a head or a neuron, as it must be
        first = draw(st.sampled_from([["--head", "--source"], ["--neuron"]] if command == "chain" else
                                     [["--head", "--source"]]))
        for opt in first:
            argv += [opt, draw(values[opt])]
        skip |= {"--head", "--source", "--neuron"}
    if not wild and command in ("patch", "validate", "attribute"):  # tame: an ablation with the options it takes
        ablate = draw(st.sampled_from(["zero", "mean", "resample"]))
        argv += ["--ablate", ablate]
        if ablate == "mean" and draw(st.booleans()):
            argv += ["--reference", draw(values["--reference"])]
        if ablate == "resample":
            argv += ["--counterfactual", draw(values["--counterfactual"]),
                     "--direction", draw(values["--direction"])]
        skip |= {"--ablate", "--reference", "--counterfactual", "--counterfactual-ids", "--direction"}
        if command == "patch" and draw(st.booleans()):  # --source only with a head
            argv += ["--component", "L1H3", "--source", draw(values["--source"])]
            skip |= {"--component", "--source"}
    for opt, action in options_of(command).items():
        if opt in skip:
            continue
        if draw(st.integers(0, 9)) < (9 if action.required else 3):
            if action.nargs == 0:
                argv.append(opt)
            elif action.nargs in ("+", "*"):
                many = st.lists(values[opt], max_size=3) if wild else st.lists(values[opt], min_size=2, max_size=3,
                                                                                 unique=True)
                argv += [opt, *draw(many)]
            else:
                argv += [opt, draw(values[opt])]
    if wild and draw(st.integers(0, 2)) == 0:  # noise: any option of any command, any values
        argv += [draw(st.sampled_from(ALL_OPTIONS)), *draw(st.lists(numbers | texts, max_size=2))]
    argv += ["--model", model if not wild or draw(st.integers(0, 5)) else draw(texts | st.just("google/gemma-2b"))]
    return argv


def _offline_hub(repo_id, **kw):
    """No network in tests: the hub answers as it does offline with an empty cache (after checking the id)."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    raise hf_errors.LocalEntryNotFoundError("offline")


@pytest.fixture(scope="module")
def prompt_dump(tiny_dir, tmp_path_factory):
    """`refprism record PROMPT` of the tiny model: what `compare --against run.npz` reads."""
    out = tmp_path_factory.mktemp("dump") / "run.npz"
    assert cli.main(["record", PROMPT, "--model", str(tiny_dir), "--out", str(out)]) == 0
    return out


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_fuzz_cli_arguments(tiny_dir, prompt_dump, tmp_path, monkeypatch, data):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", _offline_hub)
    monkeypatch.chdir(tmp_path)  # relative --out / --prompt-file names land here
    (tmp_path / "prompt.txt").write_text(PROMPT)
    from test_report import COMPARE, SWEEP, VALIDATE  # refprism report's sections, as their commands write them

    (tmp_path / "sweep").mkdir(exist_ok=True)
    for name, section in (("validate.json", VALIDATE), ("compare.json", COMPARE), ("sweep/summary.json", SWEEP)):
        (tmp_path / name).write_text(json.dumps(section))
    if not (tmp_path / "run.npz").exists():
        shutil.copy(prompt_dump, tmp_path / "run.npz")
    for l in range(2):  # `graph --transcoders tc`: GemmaScope-style files that fit the tiny model (D = 64, L = 2)
        rng = np.random.default_rng(l)
        (tmp_path / "tc" / f"layer_{l}").mkdir(parents=True, exist_ok=True)
        np.savez(tmp_path / "tc" / f"layer_{l}" / "params.npz", W_enc=rng.normal(size=(64, 16)),
                 W_dec=rng.normal(size=(16, 64)), b_enc=np.zeros(16), b_dec=np.zeros(64), threshold=np.zeros(16))
    argv = data.draw(argument_lists(str(tiny_dir)), label="argv")
    command = argv[0]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as e:  # argparse: bad usage (2) or --help (0)
        code = e.code
    event(f"{command}: exit {code}")
    assert code in (0, 2) or (command == "compare" and code == 1), (argv, code, err.getvalue())  # 1: a finding
    lines = err.getvalue().splitlines()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("refprism: error: "), (argv, err.getvalue())
    else:
        assert not any(line.startswith("refprism: error") for line in lines), (argv, err.getvalue())
