"""The error corpus: every bad file and bad argument refprism refuses, one case each, in one table (CASES).

A case builds its bad input in a temporary directory (usually a copy of a good tiny checkpoint, broken), and
names the library call and the CLI arguments that must refuse it with a message matching `message`. For every
case both are checked:

- the library raises a RefprismError subclass whose one-line message matches;
- the CLI, in a process of its own (forked from a server that imported refprism.cli once: CLI_SERVER), exits
  with status 2, prints exactly one line on stderr, `refprism: error: ...` matching the same pattern, no
  traceback, nothing on stdout, and leaves no output file (every case that can writes to --out / --plot in an
  `out` directory that must stay empty).

docs/errors.md shows each case's message as a user sees it; a test checks the two tables agree. To add a case:
append a Case to CASES, run the tests, and add its row to docs/errors.md.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import select
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refprism
from refprism import cli, graphs, interventions, prisms, report
from refprism.errors import AccessError, CheckpointError, ConfigError, InputError, RefprismError

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "errors.md"
PROMPT = "The capital city of France is"  # 7 tokens with the small tokenizer: <bos> The ▁capital ▁city ▁of ▁France ▁is


# ------------------------------------------------------------------------------------------ building bad inputs


@dataclass
class Ctx:
    """Where a case builds: `tmp` (its own directory), `out` (must stay empty), and the good checkpoints."""

    tmp: Path
    checkpoint: Callable  # conftest's cached checkpoint(**overrides) -> good directory (never modify it)

    @property
    def out(self) -> Path:
        path = self.tmp / "out"
        path.mkdir(exist_ok=True)
        return path

    def good(self, **kw) -> Path:
        return self.checkpoint(**kw)

    def copy(self, **kw) -> Path:
        """A private copy of a good checkpoint, to break."""
        dst = self.tmp / "model"
        if not dst.exists():
            shutil.copytree(self.checkpoint(**kw), dst)
        return dst


def edit_config(edit):
    def build(ctx):
        d = ctx.copy()
        hf = json.loads((d / "config.json").read_text())
        edit(hf)
        (d / "config.json").write_text(json.dumps(hf))
        return d
    return build


def gguf_file(*, truncate=False, arch="gemma3"):
    """A GGUF file (written as llama.cpp's converter does, see test_gguf.py), cut in half or of another model."""
    def build(ctx):
        import gguf
        from test_gguf import write_gguf

        path = ctx.tmp / "model.gguf"
        if arch == "gemma3":
            write_gguf(path, "gemma3")
        else:  # a header that names another architecture: enough to be refused by name
            w = gguf.GGUFWriter(str(path), arch)
            w.add_block_count(1)
            w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
            w.close()
        if truncate:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        return path
    return build


def write_file(name, content):
    """Replace (content bytes/str) or delete (None) one file of a copied checkpoint."""
    def build(ctx):
        d = ctx.copy()
        (d / name).unlink(missing_ok=True)
        if content is not None:
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d
    return build


def read_safetensors(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def edit_header(edit):
    """Rewrite model.safetensors' JSON header (the data bytes stay as they are)."""
    def build(ctx):
        d = ctx.copy()
        header, data = read_safetensors(d / "model.safetensors")
        edit(header, len(data))
        write_safetensors(d / "model.safetensors", header, data)
        return d
    return build


def edit_bytes(edit):
    def build(ctx):
        d = ctx.copy()
        path = d / "model.safetensors"
        path.write_bytes(edit(path.read_bytes()))
        return d
    return build


def edit_tensors(edit, *, shards=1, file="model.safetensors"):
    """Load one safetensors file of a copied checkpoint, edit the dict of arrays, save it back."""
    def build(ctx):
        d = ctx.copy(shards=shards)
        tensors = load_file(str(d / file))
        edit(tensors)
        save_file(tensors, str(d / file), metadata={"format": "pt"})
        return d
    return build


def set_value(name, value):
    def edit(t):
        t[name] = t[name].copy()
        t[name].flat[5] = value
    return edit


def offsets_beyond(header, size):
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [size + 64, size + 64 + end - begin]


def overlap(header, size):
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = \
        list(header["model.layers.0.input_layernorm.weight"]["data_offsets"])


def deeply_nested_header(ctx):
    d = ctx.copy()
    _, data = read_safetensors(d / "model.safetensors")
    text = b"[" * 100_000 + b"]" * 100_000
    (d / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)
    return d


def duplicate_across_shards(ctx):
    d = ctx.copy(shards=2)
    first = load_file(str(d / "model-00001-of-00002.safetensors"))
    second = load_file(str(d / "model-00002-of-00002.safetensors"))
    second["model.embed_tokens.weight"] = first["model.embed_tokens.weight"]
    save_file(second, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    return d


def shard_removed(ctx):
    d = ctx.copy(shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    return d


def index_edit(text):
    def build(ctx):
        d = ctx.copy(shards=2)
        path = d / "model.safetensors.index.json"
        path.write_text(text(json.loads(path.read_text())))
        return d
    return build


def bigger_tokenizer(ctx):
    from refprism.checkpoints.synth import build_small_tokenizer

    d = ctx.copy()
    build_small_tokenizer(522).save(str(d / "tokenizer.json"))
    return d


class Detonator:
    """Unpickling this creates the file MARKER: a refused pickle must never be opened."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def marker(ctx) -> Path:
    return ctx.tmp / "UNPICKLED"


def pickled_only(ctx):
    d = ctx.tmp / "pickled"
    d.mkdir()
    shutil.copy(ctx.good() / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Detonator(marker(ctx))))
    return d


def pickle_file(ctx):
    path = ctx.tmp / "model.pt"
    path.write_bytes(pickle.dumps(Detonator(marker(ctx))))
    return path


def unreadable(ctx):
    d = ctx.copy()
    d.chmod(0)
    return d


def prompt_file(content: bytes):
    def build(ctx):
        (ctx.tmp / "prompt.txt").write_bytes(content)
        return ctx.good()
    return build


def existing_out(ctx):
    (ctx.out / "run.npz").write_bytes(b"keep me")
    return ctx.good()


def compare_dump(edit=None, tokens=True, name="d.npz"):
    """A refprism record of PROMPT on the good tiny checkpoint, written as a dump (edit(arrays) may break it)."""
    def build(ctx):
        model = refprism.load(ctx.good())
        run = model.run(PROMPT)
        arrays = dict(run.record)
        if tokens:
            arrays["tokens"] = run.tokens
        if edit is not None:
            edit(arrays)
        np.savez(ctx.tmp / name, **arrays)
        return ctx.good()
    return build


def _only(arrays, keep, **add):
    """Keep one key of a dump's arrays and add others."""
    for key in [k for k in arrays if k != keep]:
        del arrays[key]
    arrays.update(add)


def name_map(text):
    def build(ctx):
        (ctx.tmp / "map.json").write_text(text)
        return compare_dump()(ctx)
    return build


def comparing(prompt=PROMPT, against="{tmp}/d.npz", **kw):
    """refprism.compare as the CLI calls it; a token mismatch (a result, not an exception) refused as the CLI does."""
    def api(target, ctx):
        from refprism.crosscheck import compare

        given = {k: fill(v, target, ctx) for k, v in kw.items()}
        r = compare(refprism.load(target), prompt, against=fill(against, target, ctx), **given)
        if not r.tokens_match:
            raise InputError(r.headline())
    return api


def compare_args(*extra, prompt=(PROMPT,), against="{tmp}/d.npz"):
    return ("compare", *prompt, "--model", "{model}", "--against", against, *extra, "--markdown", "{out}/report.md",
            "--plot", "{out}/fig.png")


# ------------------------------------------------------------------------------------------ library calls


def load_run(target, ctx, **kw):
    """What `refprism record --ids 2,5,7 --model X` does before writing: load, then run."""
    refprism.load(target, **kw).run([2, 5, 7])


def run_prompt(prompt, **kw):
    return lambda target, ctx: refprism.load(target, **kw).run(prompt)


def readout(targets=None, position=-1, versus=(), prompt=PROMPT):
    def api(target, ctx):
        model = refprism.load(target)
        run = model.run(prompt)
        return prisms.logits_readout(model, run, ["▁Paris"] if targets is None else targets, position=position,
                                     versus=versus)
    return api


def patch_call(component, **kw):
    """interventions.patch on the tiny model and PROMPT (zero ablation unless told)."""
    return lambda target, ctx: interventions.patch(refprism.load(target), PROMPT, component,
                                                   **{"ablate": "zero", **kw})


def intervene_at(argv):
    """The CLI's own parsing of --at and --counterfactual(-ids), before the library is reached."""
    from refprism.cli import intervene_cmds

    intervene_cmds._options(cli.build_parser().parse_args(argv))


def then(first, step):
    return lambda target, ctx: step(first(target, ctx))


def cli_args(*argv):
    """The CLI's own helpers, for the refusals that happen before the library is reached."""
    def api(target, ctx):
        args = cli.build_parser().parse_args([fill(a, target, ctx) for a in argv])
        cli._check_text_args(args)
        if getattr(args, "out", None):
            cli.check_out_path(args.out, args.force)
        cli.prompt_of(args)
    return api


def gated(setattr_):
    _hub_raises(setattr_, "GatedRepoError")


def not_found(setattr_):
    _hub_raises(setattr_, "RepositoryNotFoundError")


def _hub_raises(setattr_, error):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    cls = getattr(hf_errors, error)

    def fail(*a, **kw):
        raise cls.__new__(cls)  # the classes want an HTTP response to construct; the type is what matters

    setattr_(huggingface_hub, "snapshot_download", fail)


def little_memory(setattr_):
    """A machine with 1 KB available: every record is too large."""
    import refprism.model

    setattr_(refprism.model, "available_memory", lambda: 1_000)


PATCHES = {"gated": gated, "not_found": not_found, "little_memory": little_memory}


def refuse_access(setattr_):
    """Stands in for chmod 000 in-process (root reads through permissions)."""
    real = os.access
    setattr_(os, "access", lambda path, mode, **kw: False if Path(path).name == "model" else real(path, mode, **kw))


# ------------------------------------------------------------------------------------------ the corpus


@dataclass
class Case:
    name: str  # as listed in docs/errors.md
    build: Callable  # ctx -> the model path (or any path) that {model} stands for
    api: Callable  # (path, ctx) -> must raise `error`
    args: tuple  # CLI argv; {model}, {tmp}, {out} are filled in; bytes are passed as they are
    message: str  # regex, searched in both the library's message and the CLI's line
    error: type = RefprismError
    env: dict = field(default_factory=dict)  # extra environment ({tmp} filled in)
    patch: str | None = None  # a PATCHES key, applied to the library and the CLI process
    lib_patch: Callable | None = None  # a library-only stand-in (for what root cannot see)
    root_skips_cli: bool = False  # chmod does not stop root
    pending_lib: str | None = None  # xfail(strict) reason: the library needs a patch in a file this corpus does not own
    pending_cli: str | None = None  # the same for the CLI
    after: Callable | None = None  # ctx -> True when what must hold after both runs holds
    out_kept: bool = False  # the out directory holds a file the case put there (and must keep as it was)
    needs_weights: str | None = None  # why this InputError can only be found once the weights are read


RECORD = ("record", "--ids", "2,5,7", "--model", "{model}", "--out", "{out}/run.npz")


def transcoders(*, d_extra=0, hook=None, pickled=False):
    """GemmaScope-style params.npz files for every layer of the good tiny model under {tmp}/tc (or SAE Lens
    folders reading `hook`), broken as asked: d_model + d_extra, an object array in layer 0's file."""
    def build(ctx):
        model = ctx.good()
        cfg = refprism.load(model).config
        rng = np.random.default_rng(0)
        D, F = cfg.d_model + d_extra, 8
        for l in range(cfg.n_layers):
            w = {"W_enc": rng.normal(size=(D, F)), "W_dec": rng.normal(size=(F, D)), "b_enc": np.zeros(F),
                 "b_dec": np.zeros(D), "threshold": np.ones(F)}
            d = ctx.tmp / "tc" / f"layer_{l}"
            d.mkdir(parents=True)
            if hook is not None:
                hooks = {"hook_name": f"blocks.{l}.{hook}", "hook_name_out": f"blocks.{l}.hook_mlp_out"}
                (d / "cfg.json").write_text(json.dumps({"architecture": "jumprelu_transcoder", **hooks}))
                save_file(w, str(d / "sae_weights.safetensors"))
            elif pickled and l == 0:
                np.savez(d / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
            else:
                np.savez(d / "params.npz", **w)
        return model
    return build


GRAPH_TC = ("graph", PROMPT, "--model", "{model}", "--out", "{out}/graph.json", "--transcoders", "{tmp}/tc")


def record(*extra):
    return ("record", *extra, "--model", "{model}", "--out", "{out}/run.npz")


def report_args(*extra):
    return ("report", PROMPT, "--model", "{model}", *extra, "--out", "{out}/report.html")


def page(**budget):
    def api(target, ctx):
        model = refprism.load(target)
        report.build_page(model, model.run(PROMPT), ["▁Paris"], **budget)
    return api


def section_file(name, text):
    def build(ctx):
        (ctx.tmp / name).write_text(text)
        return ctx.good()
    return build


def prism(command, *extra, prompt=PROMPT):
    return (command, prompt, "--model", "{model}", *extra, "--plot", "{out}/fig.png")



CASES = [
    # config.json
    Case("config-missing", write_file("config.json", None), load_run, RECORD,
         r"no config\.json at .*config\.json: a model directory needs the HF config\.json", ConfigError),
    Case("config-not-json", write_file("config.json", "{not json"), load_run, RECORD,
         r"config\.json is not valid JSON \(Expecting property name .*\): re-download or repair it", ConfigError),
    Case("config-not-an-object", write_file("config.json", "[1, 2]"), load_run, RECORD,
         r"config\.json holds a list, not a JSON object: re-download", ConfigError),
    Case("config-missing-key", edit_config(lambda hf: hf.pop("vocab_size")), load_run, RECORD,
         r"config\.json is missing the required key 'vocab_size': re-download", ConfigError),
    Case("config-wrong-type", edit_config(lambda hf: hf.update(vocab_size="512")), load_run, RECORD,
         r"config\.json: vocab_size must be an integer, got '512'", ConfigError),
    Case("config-model-type", edit_config(lambda hf: hf.update(model_type="llama")), load_run, RECORD,
         r"config\.json has model_type 'llama'; refprism supports Gemma 1, 2, 3 and 4 text models", ConfigError),
    Case("config-zero-heads", edit_config(lambda hf: hf.update(num_attention_heads=0)), load_run, RECORD,
         r"config\.json: num_attention_heads must be a positive integer, got 0", ConfigError),
    Case("config-heads-not-multiple", edit_config(lambda hf: hf.update(num_key_value_heads=3)), load_run, RECORD,
         r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)", ConfigError),
    Case("config-negative-size", edit_config(lambda hf: hf.update(intermediate_size=-128)), load_run, RECORD,
         r"config\.json: intermediate_size must be a positive integer, got -128", ConfigError),
    Case("config-absurd-layers", edit_config(lambda hf: hf.update(num_hidden_layers=10**12)), load_run, RECORD,
         r"num_hidden_layers is 1000000000000, implausibly many .* is config\.json corrupt\?", ConfigError),
    Case("config-bad-eps", edit_config(lambda hf: hf.update(rms_norm_eps=[1e-6])), load_run, RECORD,
         r"config\.json: rms_norm_eps must be a number, got \[1e-06\]", ConfigError),
    # safetensors files
    Case("safetensors-truncated", edit_bytes(lambda b: b[: len(b) // 2]), load_run, RECORD,
         r"model\.safetensors: tensor .* lies at bytes \d+\.\.\d+, outside the file's \d+ data bytes "
         r"\(truncated file\?\)", CheckpointError),
    Case("safetensors-too-short", edit_bytes(lambda b: b[:5]), load_run, RECORD,
         r"model\.safetensors is not a safetensors file \(only 5 bytes\)", CheckpointError),
    Case("safetensors-header-length", edit_bytes(lambda b: (2**40).to_bytes(8, "little") + b[8:]), load_run, RECORD,
         r"model\.safetensors: the header claims 1099511627776 bytes but the file has \d+ after it "
         r"\(truncated or not safetensors\)", CheckpointError),
    Case("safetensors-header-not-json", edit_bytes(lambda b: b[:8] + b"\xff" * 16 + b[24:]), load_run, RECORD,
         r"model\.safetensors: the safetensors header is not valid JSON \(corrupt file\?\)", CheckpointError),
    Case("safetensors-offsets-outside", edit_header(offsets_beyond), load_run, RECORD,
         r"tensor model\.norm\.weight lies at bytes \d+\.\.\d+, outside the file's \d+ data bytes", CheckpointError),
    Case("safetensors-overlap", edit_header(overlap), load_run, RECORD,
         r"tensors model\.layers\.0\.input_layernorm\.weight and model\.layers\.1\.input_layernorm\.weight overlap",
         CheckpointError),
    Case("safetensors-size-mismatch",
         edit_header(lambda h, size: h["model.norm.weight"].update(shape=[2**40])), load_run, RECORD,
         r"tensor model\.norm\.weight declares shape \[1099511627776\] \(F32\) but 256 bytes", CheckpointError),
    Case("safetensors-dtype-not-a-string",
         edit_header(lambda h, size: h["model.norm.weight"].update(dtype=["F32"])), load_run, RECORD,
         r"tensor model\.norm\.weight in model\.safetensors has dtype \['F32'\]; refprism reads F32", CheckpointError),
    Case("safetensors-header-deeply-nested", deeply_nested_header, load_run, RECORD,
         r"model\.safetensors: the safetensors header is not valid JSON \(corrupt file\?\)", CheckpointError),
    Case("safetensors-dtype", edit_tensors(lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)})),
         load_run, RECORD, r"tensor model\.norm\.weight in model\.safetensors has dtype I32; refprism reads F32, "
         r"BF16 and F16", CheckpointError),
    Case("tensor-shape", edit_tensors(lambda t: t.update({"model.norm.weight": np.zeros(63, np.float32)})),
         load_run, RECORD, r"tensor model\.norm\.weight has shape \[63\], config\.json implies \[64\]",
         CheckpointError),
    Case("tensor-missing", edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), load_run, RECORD,
         r"checkpoint is missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(1 missing in all\)", CheckpointError),
    Case("tensor-unexpected",
         edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})),
         load_run, RECORD, r"checkpoint has unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight "
         r"\(1 in all\): does config.json name the right model_type\?", CheckpointError),
    Case("tensor-nan", edit_tensors(set_value("model.layers.1.mlp.up_proj.weight", np.nan)), load_run, RECORD,
         r"tensor model\.layers\.1\.mlp\.up_proj\.weight contains NaN or inf", CheckpointError),
    Case("tensor-inf-low-memory", edit_tensors(set_value("model.layers.0.self_attn.o_proj.weight", -np.inf)),
         lambda t, ctx: load_run(t, ctx, memory="low"), (*RECORD, "--memory", "low"),
         r"tensor model\.layers\.0\.self_attn\.o_proj\.weight contains NaN or inf", CheckpointError),
    # sharded checkpoints
    Case("index-missing-shard", shard_removed, load_run, RECORD,
         r"model\.safetensors\.index\.json names shard model-00002-of-00002\.safetensors, which is not in ",
         CheckpointError),
    Case("index-duplicate-tensor", duplicate_across_shards, load_run, RECORD,
         r"tensor model\.embed_tokens\.weight is stored twice: in model-00001-of-00002\.safetensors and "
         r"model-00002-of-00002\.safetensors", CheckpointError),
    Case("index-not-json", index_edit(lambda ix: "{oops"), load_run, RECORD,
         r"model\.safetensors\.index\.json is not a valid safetensors index \(", CheckpointError),
    Case("index-shard-outside", index_edit(lambda ix: json.dumps(
        {"weight_map": dict(ix["weight_map"], **{"model.norm.weight": "../elsewhere.safetensors"})})),
         load_run, RECORD, r"model\.safetensors\.index\.json names a shard that is not a plain file name",
         CheckpointError),
    Case("index-deeply-nested", index_edit(lambda ix: "[" * 100_000 + "]" * 100_000), load_run, RECORD,
         r"model\.safetensors\.index\.json is not a valid safetensors index \(maximum recursion depth exceeded",
         CheckpointError),
    Case("index-shard-name-too-long", index_edit(lambda ix: json.dumps(
        {"weight_map": dict(ix["weight_map"], **{"model.norm.weight": "a" * 300 + ".safetensors"})})),
         load_run, RECORD, r"model\.safetensors\.index\.json names shard a+\.safetensors, which is not in ",
         CheckpointError),
    # tokenizer
    Case("tokenizer-missing-text-prompt", write_file("tokenizer.json", None), run_prompt(PROMPT),
         ("record", PROMPT, "--model", "{model}", "--out", "{out}/run.npz"),
         r"model has no tokenizer\.json: give the prompt as token ids", InputError),
    Case("tokenizer-corrupt", write_file("tokenizer.json", "{"), load_run, RECORD,
         r"tokenizer\.json is not a valid tokenizers file \(", CheckpointError),
    Case("tokenizer-larger-than-embedding", bigger_tokenizer, load_run, RECORD,
         r"tokenizer\.json has 522 tokens but the embedding has only 512 rows: use the tokenizer that came with",
         CheckpointError),
    # pickles: refused by name, never opened
    Case("pickle-only-directory", pickled_only, load_run, RECORD,
         r"pickled holds only pickled weights \(pytorch_model\.bin\); refprism never unpickles files: convert",
         CheckpointError, after=lambda ctx: not marker(ctx).exists()),
    Case("pickle-file", pickle_file, load_run, RECORD,
         r"model\.pt is a pickled checkpoint; refprism never unpickles files", CheckpointError,
         after=lambda ctx: not marker(ctx).exists()),
    # GGUF files (llama.cpp's format)
    Case("gguf-truncated", gguf_file(truncate=True), load_run, RECORD,
         r"model\.gguf is not a readable GGUF file \(truncated or corrupt\?\)", CheckpointError),
    Case("gguf-unknown-architecture", gguf_file(arch="llama"), load_run, RECORD,
         r"model\.gguf holds a 'llama' model; refprism reads the GGUF architectures gemma, gemma2, gemma3",
         CheckpointError),
    # paths and the hub
    Case("path-missing", lambda ctx: ctx.tmp / "absent", load_run, RECORD,
         r"no model directory '.*absent' \(and it is not a hub id like google/gemma-2b\)", CheckpointError),
    Case("path-is-a-file", lambda ctx: ctx.good() / "config.json", load_run, RECORD,
         r"config\.json is a file; give the model directory that holds config\.json", CheckpointError),
    Case("directory-unreadable", unreadable, load_run, RECORD,
         r"cannot read the directory .*model: check its permissions", CheckpointError,
         lib_patch=refuse_access, root_skips_cli=True),
    Case("hub-offline-empty-cache", lambda ctx: "google/gemma-2b", load_run, RECORD,
         r"google/gemma-2b is not in the local HF cache and the hub cannot be reached .*: go online once",
         AccessError, env={"HF_HUB_OFFLINE": "1", "HF_HOME": "{tmp}/hf", "HF_HUB_CACHE": "{tmp}/hf/hub"}),
    Case("hub-gated", lambda ctx: "google/gemma-2b", load_run, RECORD,
         r"google/gemma-2b is gated: accept its license on https://huggingface\.co/google/gemma-2b .* set HF_TOKEN",
         AccessError, patch="gated"),
    Case("hub-not-found", lambda ctx: "someone/no-such-model", load_run, RECORD,
         r"no hub model 'someone/no-such-model' \(or it is private and HF_TOKEN lacks access\): check the id",
         AccessError, patch="not_found"),
    Case("hub-id-invalid", lambda ctx: "google/gemma--2b", load_run, RECORD,
         r"'google/gemma--2b' is neither a model directory nor a valid hub id", CheckpointError),
    # prompts
    Case("prompt-too-long", lambda ctx: ctx.good(max_position_embeddings=8), run_prompt(list(range(9))),
         record("--ids", "0,1,2,3,4,5,6,7,8"),
         r"the prompt has 9 tokens; the model's context is 8 tokens: shorten the prompt", InputError),
    Case("prompt-text-too-long", lambda ctx: ctx.good(max_position_embeddings=8), run_prompt(PROMPT + " and a"),
         ("record", PROMPT + " and a", "--model", "{model}", "--out", "{out}/run.npz"),
         r"the prompt has 9 tokens; the model's context is 8 tokens", InputError),
    Case("prompt-file-invalid-utf8", prompt_file(b"The capital \xff city"),
         cli_args("record", "--prompt-file", "{tmp}/prompt.txt", "--out", "{out}/run.npz"),
         record("--prompt-file", "{tmp}/prompt.txt"),
         r"--prompt-file '.*prompt\.txt' is not valid UTF-8: byte offset 12 \(0xff\) invalid start byte; save the "
         r"file as UTF-8", InputError),
    Case("prompt-file-missing", lambda ctx: ctx.good(),
         cli_args("run", "--prompt-file", "{tmp}/absent.txt"), ("run", "--prompt-file", "{tmp}/absent.txt",
                                                                "--model", "{model}"),
         r"cannot read --prompt-file '.*absent\.txt': No such file or directory", InputError),
    Case("prompt-given-twice", lambda ctx: ctx.good(), cli_args("run", "hello", "--ids", "2,3"),
         ("run", "hello", "--ids", "2,3", "--model", "{model}"),
         r"give the prompt once: as text, --ids or --prompt-file \(got text and --ids\)", InputError),
    Case("prompt-missing", lambda ctx: ctx.good(), cli_args("record", "--out", "{out}/run.npz"), record(),
         r"no prompt: give the prompt text, token ids with --ids, or --prompt-file FILE", InputError),
    Case("prompt-invalid-utf8-argument", lambda ctx: ctx.good(), run_prompt("The \udcff city"),
         ("record", b"The \xff city", "--model", "{model}", "--out", "{out}/run.npz"),
         r"the prompt is not valid UTF-8 text: character 4 is a lone surrogate \\udcff \(byte 0xff\)", InputError),
    Case("token-id-out-of-range", lambda ctx: ctx.good(), run_prompt([2, 99999]), record("--ids", "2,99999"),
         r"token id 99999 is out of range: the vocabulary has ids 0 \.\. 511", InputError),
    Case("token-id-negative", lambda ctx: ctx.good(), run_prompt([2, -1]), record("--ids=2,-1"),
         r"token id -1 is out of range: the vocabulary has ids 0 \.\. 511", InputError),
    Case("token-ids-not-integers", lambda ctx: ctx.good(), cli_args("run", "--ids", "2,x"),
         ("run", "--ids", "2,x", "--model", "{model}"),
         r"--ids must be integers separated by commas or spaces, got '2,x'", InputError),
    # targets
    Case("target-unknown-piece", lambda ctx: ctx.good(), readout(["▁Nowhere"]),
         prism("residual", "--targets", "▁Nowhere"),
         r"target '▁Nowhere' is 8 tokens \(▁ N o w h e r e\), not one: pick one piece or an id", InputError),
    Case("target-unknown-character", lambda ctx: ctx.good(), readout(["é"]), prism("residual", "--targets", "é"),
         r"target 'é' is not in the vocabulary", InputError),
    Case("target-id-beyond-vocabulary", lambda ctx: ctx.good(), readout(["#9999"]),
         prism("residual", "--targets", "#9999"),
         r"target id #9999 is beyond the vocabulary \(ids 0 \.\. 511\)", InputError),
    Case("target-id-not-ascii-digits", lambda ctx: ctx.good(), readout(["#²"]), prism("residual", "--targets", "#²"),
         r"target '#²' is", InputError),
    Case("target-several-tokens", lambda ctx: ctx.good(), readout([" Paris London"]),
         prism("residual", "--targets", " Paris London"),
         r"target ' Paris London' is 2 tokens \(▁Paris ▁London\), not one: pick one piece or an id", InputError),
    Case("target-duplicate", lambda ctx: ctx.good(), readout(["▁Paris", "#108"]),
         prism("residual", "--targets", "▁Paris", "#108"),
         r"token ▁Paris \(#108\) is given twice", InputError),
    Case("target-also-a-foil", lambda ctx: ctx.good(), readout(["▁Paris"], versus=["▁Paris"]),
         prism("residual", "--targets", "▁Paris", "--versus", "▁Paris"),
         r"token ▁Paris \(#108\) is both a target and a foil \(--versus\): a target minus itself is 0", InputError),
    Case("targets-empty", lambda ctx: ctx.good(), readout([]), prism("residual", "--targets"),
         r"no targets: give at least one token", InputError),
    Case("target-invalid-utf8", lambda ctx: ctx.good(), readout(["\udcff"]),
         ("residual", PROMPT, "--model", "{model}", "--targets", b"\xff", "--plot", "{out}/fig.png"),
         r"'\\udcff' is not valid UTF-8 text: character 0 is a lone surrogate", InputError),
    Case("pca-one-target", lambda ctx: ctx.good(),
         lambda t, ctx: prisms.unembedding_pca(refprism.load(t), [prisms.Token(108, "▁Paris")]),
         ("pca", "--targets", "▁Paris", "--model", "{model}", "--plot", "{out}/fig.png"),
         r"a 2-D PCA needs at least 2 tokens, got 1", InputError),
    # layers, heads, sources, positions
    Case("layer-out-of-range", lambda ctx: ctx.good(), then(readout(), lambda r: prisms.attention_prism(r, 2)),
         prism("attention", "--layer", "2"), r"layer 2 is out of range \(the model has layers 0 \.\. 1\)", InputError),
    Case("layer-negative", lambda ctx: ctx.good(), then(readout(), lambda r: prisms.mlp_prism(r, -1)),
         prism("mlp", "--layer", "-1"), r"layer -1 is out of range \(the model has layers 0 \.\. 1\)", InputError),
    Case("head-out-of-range", lambda ctx: ctx.good(), then(readout(), lambda r: prisms.through_head(r, 1, 4, 0)),
         prism("chain", "--layer", "1", "--head", "4", "--source", "0"),
         r"head 4 is out of range \(layer 1 has heads 0 \.\. 3\)", InputError),
    Case("source-after-position", lambda ctx: ctx.good(),
         then(readout(position=4), lambda r: prisms.through_head(r, 1, 0, 6)),
         prism("chain", "--layer", "1", "--head", "0", "--source", "6", "--position", "4"),
         r"source 6 is out of range: it must be 0 \.\. 4 \(a head at position 4 reads no later token\)", InputError),
    Case("neuron-out-of-range", lambda ctx: ctx.good(), then(readout(), lambda r: prisms.through_neuron(r, 0, 128)),
         prism("chain", "--layer", "0", "--neuron", "128"),
         r"neuron 128 is out of range \(layer 0 has neurons 0 \.\. 127\)", InputError),
    Case("position-out-of-range", lambda ctx: ctx.good(), readout(position=7), prism("residual", "--position", "7"),
         r"position 7 is out of range for 7 tokens \(use 0 \.\. 6 or -7 \.\. -1\)", InputError),
    Case("position-negative-beyond", lambda ctx: ctx.good(), readout(position=-8),
         prism("residual", "--position=-8"), r"position -8 is out of range for 7 tokens", InputError),
    Case("layer-not-before-readout", lambda ctx: ctx.good(),
         then(then(readout(), lambda r: prisms.through_head(r, 0, 0, 2)), lambda r: prisms.attention_prism(r, 1)),
         prism("chain", "--layer", "0", "--head", "0", "--source", "2", "--split", "attention:1"),
         r"L1\.attn is not part of blocks\.0\.resid_pre, which this readout reads", InputError),
    # output files and options
    Case("out-directory-missing", lambda ctx: ctx.good(),
         cli_args("record", "--ids", "2", "--out", "{out}/no/run.npz"),
         ("record", "--ids", "2", "--model", "{model}", "--out", "{out}/no/run.npz"),
         r"the directory of --out '.*/no/run\.npz' does not exist: create it first", InputError),
    Case("out-exists", existing_out, cli_args("record", "--ids", "2", "--out", "{out}/run.npz"),
         ("record", "--ids", "2", "--model", "{model}", "--out", "{out}/run.npz"),
         r"--out '.*run\.npz' exists: pass --force to replace it", InputError,
         out_kept=True, after=lambda ctx: [p.name for p in ctx.out.iterdir()] == ["run.npz"]
         and (ctx.out / "run.npz").read_bytes() == b"keep me"),
    Case("plot-directory-missing", lambda ctx: ctx.good(),
         lambda t, ctx: cli._check_plot_path(str(ctx.out / "no" / "fig.png")),
         ("residual", PROMPT, "--model", "{model}", "--plot", "{out}/no/fig.png"),
         r"the directory of --plot '.*/no/fig\.png' does not exist: create it first", InputError),
    Case("plot-not-png", lambda ctx: ctx.good(), lambda t, ctx: cli._check_plot_path(str(ctx.out / "fig.jpg")),
         ("residual", PROMPT, "--model", "{model}", "--plot", "{out}/fig.jpg"),
         r"--plot writes a PNG: give a file name ending in \.png, got '.*fig\.jpg'", InputError),
    Case("dtype-unsupported", lambda ctx: ctx.good(), lambda t, ctx: refprism.load(t, dtype="float16"),
         (*RECORD, "--dtype", "float16"),
         r"dtype 'float16' is not supported: use float32 or float64 \(audit mode\)", InputError),
    Case("record-select-unknown", lambda ctx: ctx.good(),
         lambda t, ctx: refprism.load(t).run([2, 5, 7], record=["blocks.*.atn.out"]),
         record("--ids", "2,5,7", "--select", "blocks.*.atn.out"),
         r"record entry 'blocks\.\*\.atn\.out' names no recorded site of this model", InputError),
    Case("record-select-positions", lambda ctx: ctx.good(),
         lambda t, ctx: refprism.load(t).run([2, 5, 7], record=["logits@last"]),
         record("--ids", "2,5,7", "--select", "logits@last"),
         r"record entry 'logits@last': positions after @ are integers, comma separated", InputError),
    Case("record-select-position-out-of-range", lambda ctx: ctx.good(),
         lambda t, ctx: refprism.load(t).run([2, 5, 7], record=["logits@7"]),
         record("--ids", "2,5,7", "--select", "logits@7"),
         r"record entry logits@7: position 7 is out of range for 3 tokens", InputError),
    Case("run-too-large-for-memory", lambda ctx: ctx.good(), lambda t, ctx: load_run(t, ctx, memory="low"), RECORD,
         r"a run of 3 tokens would need about [\d.]+ KB \(record [\d.]+ KB, of which logits [\d.]+ KB; attention "
         r"[\d.]+ KB per layer at T=3\) but .* is available.*: no smaller run of this command fits: free memory",
         InputError,
         patch="little_memory"),
    Case("out-is-a-directory", lambda ctx: ctx.good(), cli_args("report", PROMPT, "--out", "{out}"),
         ("report", PROMPT, "--model", "{model}", "--out", "{out}"),
         r"--out '.*/out' is a directory; give a file name", InputError),
    # the report page
    Case("report-depth-negative", lambda ctx: ctx.good(), page(depth=-1), report_args("--depth", "-1"),
         r"--depth must be an integer of at least 0, got -1", InputError),
    Case("report-top-zero", lambda ctx: ctx.good(), page(top=0), report_args("--top", "0"),
         r"--top must be an integer of at least 1, got 0", InputError),
    Case("report-branch-zero", lambda ctx: ctx.good(), page(branch=0), report_args("--branch", "0"),
         r"--branch must be an integer of at least 1, got 0", InputError),
    Case("report-section-unreadable", lambda ctx: ctx.good(),
         lambda t, ctx: report.load_section("validate", ctx.tmp / "absent.json"),
         report_args("--validate", "{tmp}/absent.json"),
         r"cannot read --validate '.*absent\.json': No such file or directory", InputError),
    Case("report-section-not-json", section_file("compare.json", "{oops"),
         lambda t, ctx: report.load_section("compare", ctx.tmp / "compare.json"),
         report_args("--compare", "{tmp}/compare.json"),
         r"--compare '.*compare\.json' is not valid JSON \(Expecting property name", InputError),
    Case("report-section-lacks-key", section_file("compare.json", json.dumps({"tokens_match": True})),
         lambda t, ctx: report.load_section("compare", ctx.tmp / "compare.json"),
         report_args("--compare", "{tmp}/compare.json"),
         r"--compare '.*compare\.json' lacks the key 'sites' \(a compare JSON has tokens_match, sites, ", InputError),
    Case("report-sweep-not-a-directory", section_file("summary.json", "{}"),
         lambda t, ctx: report.load_section("sweep", ctx.tmp / "summary.json"),
         report_args("--sweep", "{tmp}/summary.json"),
         r"--sweep '.*summary\.json' is not a directory \(give the folder holding summary\.json\)", InputError),
    Case("report-sweep-no-summary", lambda ctx: ctx.good(), lambda t, ctx: report.load_section("sweep", ctx.out),
         report_args("--sweep", "{out}"),
         r"cannot read --sweep '.*/out/summary\.json': No such file or directory", InputError),
    # refprism compare: bad input is exit 2 (a divergence is exit 1, a finding)
    Case("compare-against-unknown", lambda ctx: ctx.good(), comparing(against="foo"), compare_args(against="foo"),
         r"unknown --against 'foo': give hf, tl, llama\.cpp or a dump file \(\.npz, \.safetensors\)", InputError),
    Case("compare-dump-missing", lambda ctx: ctx.good(), comparing(against="{tmp}/absent.npz"),
         compare_args(against="{tmp}/absent.npz"), r"no dump file '.*absent\.npz' \(--against\)", InputError),
    Case("compare-live-without-prompt", lambda ctx: ctx.good(), comparing(prompt=None, against="hf"),
         compare_args(prompt=(), against="hf"),
         r"--against hf runs the other side live: give the prompt \(text, --ids or --prompt-file\)", InputError),
    Case("compare-dump-mis-shaped",
         compare_dump(lambda a: a.update({"blocks.0.attn.q": a["blocks.0.attn.q"].transpose(1, 0, 2)})),
         comparing(), compare_args(),
         r"d\.npz: blocks\.0\.attn\.q has shape \[4, 7, 16\], this model and prompt give \[7, 4, 16\]", InputError),
    Case("compare-dump-no-token-ids", compare_dump(tokens=False), comparing(prompt=None), compare_args(prompt=()),
         r"d\.npz holds no token ids \(an array named tokens or input_ids\): give the prompt the dump was made from",
         InputError),
    Case("compare-dump-pickled", compare_dump(lambda a: a.update({"logits": np.array([None], dtype=object)})),
         comparing(), compare_args(), r"dump d\.npz: holds an object \(pickled\) array; refprism never unpickles",
         InputError),
    Case("compare-dump-no-site", compare_dump(lambda a: _only(a, "tokens", activations=np.zeros(3))),
         comparing(), compare_args(), r"d\.npz: none of its 1 array besides the token ids names a site in the "
         r"refprism scheme \(its names begin activations\): check --names", InputError),
    Case("compare-llamacpp-not-gguf", lambda ctx: ctx.good(), comparing(against="llama.cpp"),
         compare_args(against="llama.cpp"),
         r"--against llama\.cpp runs llama\.cpp on the --model file: give --model as a \.gguf file", InputError),
    Case("compare-llamacpp-not-built", gguf_file(), comparing(against="llama.cpp"),
         compare_args(against="llama.cpp"),
         r"llama-debug of llama\.cpp \(llama-cpp-python 0\.3\.36\) is not built in .*nothing/llama\.cpp/0\.3\.36/bin: "
         r"run python tools/build_llama_cpp\.py", RefprismError, env={"REFPRISM_CACHE": "{tmp}/nothing"}),
    Case("compare-llamacpp-dtype", gguf_file(), comparing(against="llama.cpp", dtype="bfloat16"),
         compare_args("--dtype", "bfloat16", against="llama.cpp"),
         r"llama\.cpp computes in float32 with its own roundings \(the GGUF's weight types and --kv-cache say "
         r"which\), not in bfloat16: leave --dtype out", InputError),
    Case("compare-kv-cache-not-llamacpp", compare_dump(), comparing(kv_cache="f32"), compare_args("--kv-cache", "f32"),
         r"--kv-cache is llama\.cpp's: it applies to --against llama\.cpp and to dumps with --names llama\.cpp",
         InputError),
    Case("compare-tokens-differ", compare_dump(lambda a: a.update({"tokens": a["tokens"][1:]})), comparing(),
         compare_args(), r"tokens differ at position 0: ours 2 \(<bos>\), theirs 131 \(The\) \(7 vs 6 tokens\); "
         r"the other side's tokens are ours without the leading <bos>", InputError),
    Case("compare-names-unknown", compare_dump(), comparing(names="huggingface"),
         compare_args("--names", "huggingface"),
         r"--names must be one of refprism, hf, tl, llama\.cpp or a JSON name map file, got 'huggingface'", InputError),
    Case("compare-name-map-not-json", name_map("{oops"), comparing(names="{tmp}/map.json"),
         compare_args("--names", "{tmp}/map.json"), r"name map map\.json is not valid JSON \(Expecting property name",
         InputError),
    Case("compare-name-map-unknown-site", name_map('{"sites": {"h{l}.q": "blocks.{l}.attn.query"}}'),
         comparing(names="{tmp}/map.json"), compare_args("--names", "{tmp}/map.json"),
         r"map\.json: entry 'h\{l\}\.q' names 'blocks\.\{l\}\.attn\.query', not a refprism site of this model",
         InputError),
    Case("compare-name-map-axes", name_map('{"sites": {"h{l}.q": {"site": "blocks.{l}.attn.q", "axes": "TNN"}}}'),
         comparing(names="{tmp}/map.json"), compare_args("--names", "{tmp}/map.json"),
         r"entry 'h\{l\}\.q': axes 'TNN' must use each of blocks\.\{l\}\.attn\.q's letters TNH once", InputError),
    Case("compare-markdown-directory-missing", compare_dump(),
         lambda t, ctx: cli.compare_cmds._check_markdown_path(str(ctx.out / "no" / "r.md")),
         ("compare", PROMPT, "--model", "{model}", "--against", "{tmp}/d.npz", "--markdown", "{out}/no/r.md"),
         r"cannot write --markdown '.*/no/r\.md': give a file name in an existing directory", InputError),
    # interventions (patch, validate)
    Case("component-unknown-label", lambda ctx: ctx.good(), patch_call("L1X2"),
         prism("patch", "--component", "L1X2", "--ablate", "zero"),
         r"component 'L1X2' is not a component label: use embed, L\{l\}\.attn, L\{l\}\.mlp, L\{l\}H\{h\}, "
         r"L\{l\}H\{h\}\.src\{s\} or L\{l\}N\{n\} \(0-based\)", InputError),
    Case("component-layer-out-of-range", lambda ctx: ctx.good(), patch_call("L2H0"),
         prism("patch", "--component", "L2H0", "--ablate", "zero"),
         r"layer 2 is out of range \(the model has layers 0 \.\. 1\)", InputError),
    Case("component-head-out-of-range", lambda ctx: ctx.good(), patch_call("L1H4"),
         prism("patch", "--component", "L1H4", "--ablate", "zero"),
         r"head 4 is out of range \(layer 1 has heads 0 \.\. 3\)", InputError),
    Case("component-neuron-out-of-range", lambda ctx: ctx.good(), patch_call("L0N128"),
         prism("patch", "--component", "L0N128", "--ablate", "zero"),
         r"neuron 128 is out of range \(layer 0 has neurons 0 \.\. 127\)", InputError),
    Case("component-source-beyond-prompt", lambda ctx: ctx.good(), patch_call("L1H0.src9"),
         prism("patch", "--component", "L1H0.src9", "--ablate", "zero"),
         r"source 9 is out of range: the prompt has positions 0 \.\. 6", InputError),
    Case("component-source-after-position", lambda ctx: ctx.good(), patch_call("L1H0", source=6, position=4),
         prism("patch", "--component", "L1H0", "--source", "6", "--position", "4", "--ablate", "zero"),
         r"source 6 is out of range: it must be 0 \.\. 4 \(a head at position 4 reads no later token\)", InputError),
    Case("component-source-not-a-head", lambda ctx: ctx.good(), patch_call("L0N3", source=2),
         prism("patch", "--component", "L0N3", "--source", "2", "--ablate", "zero"),
         r"--source picks a head's source token: component 'L0N3' is not a head", InputError),
    Case("patch-position-out-of-range", lambda ctx: ctx.good(), patch_call("L1H0", at=[9]),
         prism("patch", "--component", "L1H0", "--at", "9", "--ablate", "zero"),
         r"position 9 is out of range for 7 tokens \(use 0 \.\. 6 or -7 \.\. -1\)", InputError),
    Case("patch-at-not-positions", lambda ctx: ctx.good(),
         lambda t, ctx: intervene_at(["patch", PROMPT, "--component", "L1H0", "--ablate", "zero", "--at", "6;5"]),
         prism("patch", "--component", "L1H0", "--at", "6;5", "--ablate", "zero"),
         r"--at '6;5': give 'all' or positions separated by commas", InputError),
    Case("counterfactual-length-mismatch", lambda ctx: ctx.good(),
         patch_call("L1H0", ablate="resample", counterfactual="The capital of Japan is"),
         prism("patch", "--component", "L1H0", "--ablate", "resample", "--counterfactual", "The capital of Japan is"),
         r"the counterfactual has 6 tokens and the prompt 7: resample patching pairs positions, so both need the "
         r"same token count", InputError),
    Case("resample-without-counterfactual", lambda ctx: ctx.good(), patch_call("L1H0", ablate="resample"),
         prism("patch", "--component", "L1H0", "--ablate", "resample"),
         r"resample ablation needs a counterfactual prompt \(--counterfactual PROMPT2\)", InputError),
    Case("counterfactual-without-resample", lambda ctx: ctx.good(), patch_call("L1H0", counterfactual=PROMPT),
         prism("patch", "--component", "L1H0", "--ablate", "zero", "--counterfactual", PROMPT),
         r"a counterfactual prompt is used only by resample ablation, not by zero", InputError),
    Case("denoising-without-resample", lambda ctx: ctx.good(), patch_call("L1H0", direction="denoising"),
         prism("patch", "--component", "L1H0", "--ablate", "zero", "--direction", "denoising"),
         r"denoising patches clean values into the counterfactual run: it needs --ablate resample", InputError),
    Case("reference-without-mean", lambda ctx: ctx.good(), patch_call("L1H0", reference=[PROMPT]),
         prism("patch", "--component", "L1H0", "--ablate", "zero", "--reference", PROMPT),
         r"reference prompts are used only by mean ablation, not by zero", InputError),
    Case("mean-set-empty", lambda ctx: ctx.good(), patch_call("L1H0", ablate="mean", reference=[""]),
         prism("patch", "--component", "L1H0", "--ablate", "mean", "--reference", ""),
         r"the mean set is empty: a mean is taken over positions 1 \.\. T-1 of each reference prompt", InputError),
    Case("counterfactual-given-twice", lambda ctx: ctx.good(),
         lambda t, ctx: intervene_at(["patch", PROMPT, "--component", "L1H0", "--ablate", "resample",
                                      "--counterfactual", PROMPT, "--counterfactual-ids", "2,3"]),
         prism("patch", "--component", "L1H0", "--ablate", "resample", "--counterfactual", PROMPT,
               "--counterfactual-ids", "2,3"),
         r"give the counterfactual once: --counterfactual or --counterfactual-ids", InputError),
    Case("validate-level-unknown", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.validate(refprism.load(t), PROMPT, level="layers"),
         prism("validate", "--level", "layers", "--ablate", "zero"),
         r"--level 'layers' is not a level: use residual, heads, head-source:L, neurons:L, neurons or "
         r"\(Gemma 4 MoE\) experts:L", InputError),
    Case("validate-level-layer-out-of-range", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.validate(refprism.load(t), PROMPT, level="neurons:5"),
         prism("validate", "--level", "neurons:5", "--ablate", "zero"),
         r"layer 5 is out of range \(the model has layers 0 \.\. 1\)", InputError),
    Case("component-source-given-twice", lambda ctx: ctx.good(), patch_call("L1H0.src2", source=3),
         prism("patch", "--component", "L1H0.src2", "--source", "3", "--ablate", "zero"),
         r"component 'L1H0\.src2' already names its source: drop --source", InputError),
    Case("validate-level-layer-not-a-number", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.validate(refprism.load(t), PROMPT, level="neurons:x"),
         prism("validate", "--level", "neurons:x", "--ablate", "zero"),
         r"--level 'neurons:x': the layer after ':' is a number, e\.g\. neurons:3", InputError),
    Case("graph-batch-size-zero", lambda ctx: ctx.good(),
         lambda t, ctx: graphs.graph(refprism.load(t), PROMPT, batch_size=0),
         ("graph", PROMPT, "--model", "{model}", "--batch-size", "0", "--out", "{out}/graph.json"),
         r"max_nodes >= 0, batch_size, update_interval and explore_k >= 1 are required", InputError),
    Case("graph-threads-zero", lambda ctx: ctx.good(),
         lambda t, ctx: graphs.graph(refprism.load(t), PROMPT, threads=0),
         ("graph", PROMPT, "--model", "{model}", "--threads", "0", "--out", "{out}/graph.json"),
         r"threads 0: the backward passes run at once, one per thread: give a whole number, 1 or more", InputError),
    Case("graph-versus-without-targets", lambda ctx: ctx.good(),
         lambda t, ctx: graphs.graph(refprism.load(t), PROMPT, versus=["#3"]),
         ("graph", PROMPT, "--model", "{model}", "--versus", "#3", "--out", "{out}/graph.json"),
         r"versus needs targets", InputError),
    Case("graph-transcoders-d-model", transcoders(d_extra=2),
         lambda t, ctx: graphs.graph(refprism.load(t), PROMPT, transcoders=ctx.tmp / "tc"), GRAPH_TC,
         r"transcoder \S*layer_0\S*: d_model \d+, the model's is \d+", ConfigError),
    Case("graph-transcoders-unknown-hook", transcoders(hook="hook_attn_out"),
         lambda t, ctx: graphs.graph(refprism.load(t), PROMPT, transcoders=ctx.tmp / "tc"), GRAPH_TC,
         r"transcoder \S*layer_0: unknown input hook 'hook_attn_out' \(known: hook_resid_mid, hook_mlp_in, "
         r"ln2\.hook_normalized, mlp\.hook_in\)", CheckpointError),
    Case("graph-transcoders-pickle", transcoders(pickled=True),
         lambda t, ctx: graphs.graph(refprism.load(t), PROMPT, transcoders=ctx.tmp / "tc"), GRAPH_TC,
         r"transcoder \S*params\.npz: cannot be read \(Object arrays cannot be loaded when allow_pickle=False\)",
         CheckpointError),
    Case("validate-seed-negative", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.validate(refprism.load(t), PROMPT, level="heads", seed=-1),
         prism("validate", "--level", "heads", "--ablate", "zero", "--seed=-1"),
         r"seed must be a non-negative integer, got -1", InputError),
    Case("validate-budget-below-top", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.validate(refprism.load(t), PROMPT, level="heads", top=10, budget=5),
         prism("validate", "--level", "heads", "--ablate", "zero", "--budget", "5"),
         r"budget must be at least (--)?top \(10\), got 5", InputError),
    Case("attribute-eap-ig-without-resample", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.attribute(refprism.load(t), PROMPT, method="eap-ig", level="heads"),
         ("attribute", PROMPT, "--model", "{model}", "--level", "heads", "--ablate", "zero", "--method", "eap-ig"),
         r"eap-ig interpolates the input between the prompt and the counterfactual: it needs --ablate resample",
         InputError),
    Case("attribute-edge-level", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.attribute(refprism.load(t), PROMPT, method="eap", level="residual"),
         ("attribute", PROMPT, "--model", "{model}", "--level", "residual", "--ablate", "zero", "--method", "eap"),
         r"edge attribution scores edges between heads, MLPs and one layer's neurons: use --level heads or "
         r"--level neurons:L, not 'residual'", InputError),
    Case("attribute-components-with-edges", lambda ctx: ctx.good(),
         lambda t, ctx: interventions.attribute(refprism.load(t), PROMPT, method="eap", level="heads",
                                                components=["L0H0"]),
         ("attribute", PROMPT, "--model", "{model}", "--level", "heads", "--ablate", "zero", "--method", "eap",
          "--components", "L0H0"),
         r"every edge of the level: (components=|--components) picks components, not edges", InputError),
]


def fill(arg, model, ctx):
    if isinstance(arg, bytes):
        return arg
    return arg.format(model=model, tmp=ctx.tmp, out=ctx.out)


def params(pending):
    return [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=True, reason=pending(case))]
                         if pending(case) else []) for case in CASES]


# ------------------------------------------------------------------------------------------ the checks


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-z0-9-]+", n) for n in names)


@pytest.mark.parametrize("case", params(lambda case: case.pending_lib))
def test_library_refuses(case, checkpoint, tmp_path, monkeypatch):
    ctx = Ctx(tmp_path, checkpoint)
    target = case.build(ctx)
    try:
        for key, value in case.env.items():
            monkeypatch.setenv(key, value.format(tmp=tmp_path))
        if "HF_HUB_CACHE" in case.env:  # huggingface_hub read the environment at import (conftest): its constant
            import huggingface_hub.constants

            cache = case.env["HF_HUB_CACHE"].format(tmp=tmp_path)
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        if case.patch:
            PATCHES[case.patch](monkeypatch.setattr)
        if case.lib_patch:
            case.lib_patch(monkeypatch.setattr)
        with pytest.raises(RefprismError) as e:
            case.api(target, ctx)
        monkeypatch.undo()
    finally:
        _restore(target)
    assert isinstance(e.value, case.error), f"{type(e.value).__name__}: {e.value}"
    message = str(e.value)
    assert re.search(case.message, message), message
    assert "\n" not in message and "\r" not in message and len(message) < 1000, message
    assert case.after is None or case.after(ctx)


def _restore(target):
    """Give back permissions taken for a case, so the temporary directory can be removed."""
    if isinstance(target, Path) and target.is_dir():
        target.chmod(0o755)


# Run in every CLI process of the corpus: the file {mark} is created when a model's weights are read, so that a
# refusal of an argument can be shown to come before the load (test_cli_refuses_arguments_before_the_weights).
WATCH_WEIGHTS = """
import refprism.model as _m
_read = _m.Model.load_weights
def _watched(self, _read=_read):
    if self.deferred is not None:
        open({mark!r}, "w").close()
    return _read(self)
_m.Model.load_weights = _watched
"""


# A fresh `python -c` spends about a second importing refprism.cli (numpy, ml_dtypes, ...), most of what each case's
# process costs. So the cases' processes are forked from a server process that has done that import once and nothing
# else: each case still runs in a process of its own, made before it touched anything, with its environment set
# before any import of its own, its stdin /dev/null (as pytest gives a fresh process) and its stdout and stderr files,
# ending as a `python -c` ends (sys.exit, a traceback for an uncaught exception, atexit). Nothing the server imported
# reads the cases' variables (HF_*, REFPRISM_*) at import time: huggingface_hub, which does, it must not import.
CLI_SERVER = r"""
import json, os, sys
import refprism.cli
assert "huggingface_hub" not in sys.modules, "the CLI server must not import huggingface_hub (it reads HF_* once)"
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the case's process: it never returns to this loop (its code ends with sys.exit)
        os.environ.clear()
        os.environ.update(job["env"])
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], write), (2, job["stderr"], write)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = ["-c", *(os.fsdecode(bytes.fromhex(arg)) for arg in job["argv"])]
        exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        sys.exit(0)
    status = os.waitpid(pid, 0)[1]
    os.write(1, (json.dumps(os.waitstatus_to_exitcode(status)) + "\n").encode())
"""


class CliServer:
    """One CLI_SERVER process; run() sends it one case and waits for that case's process to end."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, "-c", CLI_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)

    def run(self, argv, env, code, logs: Path, *, timeout=300) -> subprocess.CompletedProcess:
        out, err = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
        job = {"argv": [os.fsencode(a).hex() for a in argv], "env": env, "code": code, "stdout": str(out),
               "stderr": str(err)}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()
            raise subprocess.TimeoutExpired(argv, timeout)
        line = self.proc.stdout.readline()
        assert line, f"the CLI server ended (exit {self.proc.wait()})"
        return subprocess.CompletedProcess(argv, json.loads(line), out.read_bytes(), err.read_bytes())

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def _run_cli(case, ctx, target, servers, logs):
    env = {k: v for k, v in os.environ.items() if k != "REFPRISM_MODEL"}
    env.update({"HF_HUB_OFFLINE": "1", **{k: v.format(tmp=ctx.tmp) for k, v in case.env.items()}})
    argv = [fill(a, target, ctx) for a in case.args]
    code = "import sys\n" + WATCH_WEIGHTS.format(mark=str(ctx.tmp / "weights-read"))
    if case.patch:  # a process of its own still, with the hub call replaced before main runs
        code += (f"sys.path.insert(0, {str(HERE)!r}); from test_errors import PATCHES; "
                 f"PATCHES[{case.patch!r}](setattr)\n")
    code += "from refprism.cli import main; sys.exit(main(sys.argv[1:]))\n"
    server = servers.get()
    try:
        return server.run(argv, env, code, logs / case.name)  # its stdout and stderr beside, not in, ctx.tmp
    finally:
        servers.put(server)


@pytest.fixture(scope="module")
def cli_results(checkpoint, tmp_path_factory):
    """Every case's CLI run, each in a process of its own (forked by a CliServer), a few at a time."""
    jobs = {}
    for case in CASES:
        ctx = Ctx(tmp_path_factory.mktemp(case.name), checkpoint)
        if case.root_skips_cli and os.geteuid() == 0:
            continue
        jobs[case.name] = (ctx, case.build(ctx))
    n = max(2, 2 * (os.cpu_count() or 1))
    base = {k: v for k, v in os.environ.items() if k != "REFPRISM_MODEL"}
    servers, logs = queue.Queue(), tmp_path_factory.mktemp("cli-io")
    for _ in range(n):
        servers.put(CliServer(base))
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = {name: pool.submit(_run_cli, next(c for c in CASES if c.name == name), ctx, target, servers,
                                   logs)
                       for name, (ctx, target) in jobs.items()}
            results = {name: (jobs[name][0], f.result()) for name, f in futures.items()}
    finally:
        ends = [server.close() for server in list(servers.queue)]
        for _ctx, target in jobs.values():
            _restore(target)
    assert ends == [0] * n, f"a CLI server failed: exits {ends}"
    return results


@pytest.mark.parametrize("case", params(lambda case: case.pending_cli))
def test_cli_refuses_in_one_line(case, cli_results):
    if case.name not in cli_results:
        pytest.skip("running as root: chmod 000 does not stop root from reading (the library test simulates it)")
    ctx, r = cli_results[case.name]
    err = r.stderr.decode("utf-8", "backslashreplace")
    assert r.returncode == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("refprism: error: "), err
    assert re.search(case.message, lines[0]), lines[0]
    assert r.stdout == b"", r.stdout
    if not case.out_kept:
        assert list(ctx.out.iterdir()) == [], "a refused command left an output file"
    assert case.after is None or case.after(ctx)


# chmod 000 does not stop root (CI runs as root): that case has no CLI run to look at, so it is not a case here
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES
                                  if c.error is InputError and not c.needs_weights
                                  and not (c.root_skips_cli and os.geteuid() == 0)])
def test_cli_refuses_arguments_before_the_weights(case, cli_results):
    """Every argument the CLI can check without the weights is checked before they are read (a real-size model's
    load takes 15-20 s): the refusal comes from a process that never read them."""
    ctx, r = cli_results[case.name]
    assert r.returncode == 2, r.stderr
    assert not (ctx.tmp / "weights-read").exists(), f"{case.name}: refused only after reading the weights"


def test_the_weights_watch_sees_a_load(cli_results):
    """The watch above can fail: a refusal that needs the weights (a prism of a layer beyond a pulled-back
    readout's site needs no weights; the compare of a dump does) is seen reading them."""
    reading = [name for name, (ctx, _) in cli_results.items() if (ctx.tmp / "weights-read").exists()]
    assert reading and set(reading) <= {c.name for c in CASES if c.error is not InputError or c.needs_weights}, reading


# ------------------------------------------------------------------------------------------ docs/errors.md


def _doc_rows():
    """case name -> message, from docs/errors.md's tables (| `name` | ``message`` | what to do |)."""
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|\s*``(.*?)``\s*\|", line)
        if m:
            assert m.group(1) not in rows, f"docs/errors.md lists {m.group(1)} twice"
            rows[m.group(1)] = m.group(2).replace("\\|", "|")
    return rows


def test_docs_list_every_case_with_its_message():
    rows = _doc_rows()
    missing = [c.name for c in CASES if c.name not in rows]
    assert not missing, f"docs/errors.md lacks {missing}"
    extra = sorted(set(rows) - {c.name for c in CASES})
    assert not extra, f"docs/errors.md lists cases the corpus does not have: {extra}"
    for case in CASES:
        assert re.search(case.message, rows[case.name]), f"{case.name}: docs show {rows[case.name]!r}"


# ------------------------------------------------------------------------------------------ what is not an error


def test_without_tokenizer_token_ids_still_work(checkpoint, tmp_path):
    d = shutil.copytree(checkpoint(), tmp_path / "m")
    (d / "tokenizer.json").unlink()
    model = refprism.load(d)
    assert model.run([2, 5, 7]).logits.shape == (3, 512)
    assert model.piece(108) == "#108"
    assert cli.main(["run", "--ids", "2,5,7", "--model", str(d), "--top", "2"]) == 0
    assert cli.main(["residual", "--ids", "2,5,7", "--model", str(d), "--targets", "#108", "--json"]) == 0


@pytest.mark.parametrize("args", [
    ["residual", ""], ["attention", "", "--layer", "1"], ["mlp", "", "--layer", "0"],
    ["chain", "", "--layer", "1", "--head", "0", "--source", "0"], ["run", ""],
    ["map", "", "--layer", "1", "--head", "0", "--source", "0", "--inputs", "#5"],
])
def test_empty_prompt_is_the_bos_only_run_everywhere(tiny_dir, capsys, args):
    assert cli.main([*args, "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "(empty prompt: the BOS-only run)" in out
    assert "<bos>" in out and "The" not in out


@pytest.mark.parametrize("args", [["run", "", "--json"], ["residual", "", "--json"]])
def test_empty_prompt_in_json_is_the_one_token_bos(tiny_dir, capsys, args):
    """The JSON outputs carry no note: their tokens are the one <bos>, as docs/errors.md says."""
    assert cli.main([*args, "--model", str(tiny_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == [{"id": 2, "piece": "<bos>"}]


def test_empty_prompt_file_is_the_bos_only_run(tiny_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert cli.main(["residual", "--prompt-file", str(tmp_path / "empty.txt"), "--model", str(tiny_dir)]) == 0
    assert "tokens: 0:<bos>  (empty prompt: the BOS-only run)" in capsys.readouterr().out


def test_prompt_file_is_read_exactly(tiny_dir, tiny, tmp_path, capsys):
    """UTF-8 text as stored: the same tokens as the text argument, and a final newline is part of the prompt."""
    (tmp_path / "p.txt").write_bytes(PROMPT.encode())
    assert cli.main(["run", "--prompt-file", str(tmp_path / "p.txt"), "--model", str(tiny_dir), "--json"]) == 0
    ids = [t["id"] for t in json.loads(capsys.readouterr().out)["tokens"]]
    assert ids == tiny.run(PROMPT).tokens.tolist()
    (tmp_path / "n.txt").write_bytes((PROMPT + "\n").encode())
    assert cli.main(["run", "--prompt-file", str(tmp_path / "n.txt"), "--model", str(tiny_dir), "--json"]) == 0
    assert [t["id"] for t in json.loads(capsys.readouterr().out)["tokens"]] == ids + [tiny.tokenizer.token_to_id("\n")]


def test_library_refuses_float_and_bool_ids(tiny):
    for bad in ([2, 5.5], [True, 2], b"\x02\x05", 7):
        with pytest.raises(InputError, match="sequence of integer token ids|bytes"):
            tiny.run(bad)


def test_messages_stay_one_line_whatever_the_input(tiny_dir, tmp_path, capsys):
    """A file name with a line break is echoed escaped: the error is still one line."""
    out = tmp_path / "a\nb.npz"
    out.write_bytes(b"x")
    assert cli.main(["record", "--ids", "2", "--model", str(tiny_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "a\\nb.npz" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "hi", "a\nb", "--model", str(tiny_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("refprism: error: unrecognized arguments")
