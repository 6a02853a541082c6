"""What every `refprism` command shares: the prompt arguments, loading, one-line errors, output paths, printing.

Errors: one line `refprism: error: ...` on stderr and exit status 2; never a traceback, never a half file
(docs/errors.md lists every refusal with its message). A prism whose parts miss their whole by more than the
stated tolerance is reported but not refused: a one-line `refprism: warning: ...` on stderr, exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from refprism.errors import InputError
from refprism.model import check_text


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) that names the subcommand's --help."""

    def error(self, message):
        self.exit(2, f"refprism: error: {one_line(message)} (see {self.prog} --help)\n")


MODEL_HELP = "model directory, .gguf file or hub id (default: $REFPRISM_MODEL, else google/gemma-2b)"


def memory_help(work: str) -> str:
    """--memory's help: what each mode costs (measured on the gemma-2b shape, docs/performance.md) and what auto
    means for this command's work (memory_mode)."""
    auto = ("low, this command runs one forward pass" if work == "one"
            else "fast when it fits in available memory, this command runs many forward passes")
    return ("low: weights stay memory-mapped, each layer converted when it runs (gemma-2b shape: 2.1 GB peak, "
            "load ~1 s, each forward pass converts again); fast: every weight converted at load (10.5 GB peak, a "
            f"load of 13 s or more, then each forward pass ~3x faster); auto (default): {auto}. A .gguf file is "
            "always dequantized into memory")


def _common(p: argparse.ArgumentParser, work: str = "one") -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text (the tokenizer adds BOS); or use --ids / --prompt-file")
    p.add_argument("--ids", help="the prompt as token ids, comma or space separated (e.g. '2,651,6037')")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="read the prompt text from a UTF-8 file, exactly as stored (a final newline is part of it)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64 (audit)")
    p.add_argument("--memory", default="auto", choices=["auto", "fast", "low"], help=memory_help(work))


def _prism_common(p, targets_default="the top 5", work="one"):
    _common(p, work)
    p.add_argument("--position", type=int, default=-1, help="the position whose logits are split (default: last)")
    p.add_argument("--targets", nargs="*", metavar="TOKEN",  # "*": a bare --targets reaches the library's refusal
                   help=f"target tokens: pieces (▁Paris), one-token text, or ids (#7127); default: {targets_default}")
    p.add_argument("--versus", nargs="+", metavar="TOKEN",
                   help="foils: each target minus the foil (or minus the mean of several foils)")
    p.add_argument("--json", action="store_true", help="print JSON only (one schema for every prism)")
    p.add_argument("--plot", metavar="FILE.png", help="write the prism's figure to this PNG file")


def _head_args(p):
    p.add_argument("--layer", type=int, required=True, help="the layer of the first step (0-based)")
    p.add_argument("--head", type=int, help="the query head (0-based); with --source")
    p.add_argument("--source", type=int, help="the source token position (0-based, <= position)")
    p.add_argument("--neuron", type=int, help="pull back through this MLP neuron instead of a head")


def one_line(message) -> str:
    """A message as one line: any line break shown as an escape (a file name or argument may hold one)."""
    text = str(message)
    for brk, shown in (("\r\n", "\\r\\n"), ("\n", "\\n"), ("\r", "\\r")):
        text = text.replace(brk, shown)
    return "".join(c if c.isprintable() or c in " \t" else c.encode("unicode_escape").decode() for c in text)


def short(text, limit=80) -> str:
    """repr(text), its middle cut out beyond `limit` characters, for echoing what the user typed."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit // 2 - 2] + "..." + r[-(limit // 2 - 1):]


def path_text(path) -> str:
    """A file name as typed, quoted and escaped (a name may hold a line break); only absurd lengths are cut."""
    return short(str(path), limit=400)


def _check_text_args(args) -> None:
    """Token arguments must be text: a lone surrogate is an undecodable byte of the command line."""
    for name in ("targets", "versus", "inputs"):
        for value in getattr(args, name, None) or ():
            check_text(value, f"--{name} {short(value)}")


# A prompt file larger than this is refused before it is read whole (a device like /dev/zero never ends).
PROMPT_FILE_LIMIT = 64 * 2**20


def read_prompt_file(path: str) -> str:
    """The text of --prompt-file, decoded as strict UTF-8; one-line errors naming the file (and the bad byte)."""
    try:
        with open(path, "rb") as f:
            data = f.read(PROMPT_FILE_LIMIT + 1)
    except OSError as e:
        raise InputError(f"cannot read --prompt-file {path_text(path)}: {e.strerror or e}") from None
    except ValueError:  # a NUL character in the name
        raise InputError(f"--prompt-file {path_text(path)} is not a usable file name") from None
    if len(data) > PROMPT_FILE_LIMIT:
        raise InputError(f"--prompt-file {path_text(path)} is over {PROMPT_FILE_LIMIT // 2**20} MiB, far beyond any "
                         "model's context: give a shorter prompt")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--prompt-file {path_text(path)} is not valid UTF-8: byte offset {e.start} "
                         f"(0x{data[e.start]:02x}) {e.reason}; save the file as UTF-8") from None


def prompt_of(args):
    """The prompt as given: text, the list of ids from --ids, or the text of --prompt-file (exactly one)."""
    given = [name for name, value in (("text", args.prompt), ("--ids", args.ids),
                                      ("--prompt-file", args.prompt_file)) if value is not None]
    if len(given) > 1:
        raise InputError(f"give the prompt once: as text, --ids or --prompt-file (got {' and '.join(given)})")
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"--ids must be integers separated by commas or spaces, got {short(args.ids)}") from None
        if not ids:
            raise InputError("--ids is empty: give token ids like 2,651,6037 (or \"\" as text for the BOS-only run)")
        return ids
    if args.prompt_file is not None:
        return read_prompt_file(args.prompt_file)
    if args.prompt is None:
        raise InputError("no prompt: give the prompt text, token ids with --ids, or --prompt-file FILE")
    return args.prompt


def load_model(args, *, work="one", prompt=None, record=None, positions=None, spelling=None):
    """open_model, then (with `prompt`) the run's checks (`Model.check`), then the weights (read_weights)."""
    model = open_model(args, work=work)
    if prompt is not None:
        model.check(prompt, record=record, positions=positions, spelling=spelling or RUN_SPELLING)
    return read_weights(model)


def open_model(args, *, work="one", dtype=None):
    """The model's config, tokenizer and file headers, every one checked; its weights not read yet (`read_weights`).

    work: "one" (a command of one forward pass: `--memory auto` means low) or "many" (many passes: `auto` means
    fast when it fits); see `memory_mode`. A real-size model says on stderr what it is reading (Progress).
    """
    from refprism.model import load

    progress = args.progress = Progress.for_model(args.model, quiet=getattr(args, "quiet", False))
    progress.phase(f"reading {path_text(args.model or os.environ.get('REFPRISM_MODEL') or 'google/gemma-2b')}: "
                   "config, tokenizer, file headers")
    model = load(args.model, dtype=dtype or args.dtype, memory=memory_mode(args.memory, work), defer=True,
                 progress=progress)
    if not progress.on and not getattr(args, "quiet", False) and not Path(str(args.model or "")).exists():
        from refprism.gemma.weights import n_parameters  # a hub id: its size is known from its config

        progress.on = n_parameters(model.config) * 2 >= REAL_SIZE_BYTES
    if model.deferred is not None:  # None: the weights are in already (a model handed over as it is)
        read = model.deferred.read

        def announced(report):  # the weights are read where they are first used: said then, whoever uses them
            from refprism.gemma.weights import n_parameters

            cfg = model.config
            how = ("every weight converted now" if model.memory == "fast"
                   else "--memory low: each layer converted as it runs")
            progress.phase(f"loading {n_parameters(cfg) / 1e9:.2f} B parameters ({cfg.n_layers} layers) in "
                           f"{np.dtype(model.dtype).name}, {how}")
            return read(report)

        model.deferred.read = announced
    return model


def memory_mode(memory: str, work: str) -> str:
    """`--memory auto` by the work: "low" for one forward pass (a new process converts each layer once, at the
    use: the whole conversion of fast mode does not pay for itself, docs/performance.md), the library's auto
    (fast when it fits) for many passes. fast and low as given."""
    if memory != "auto":
        return memory
    return "low" if work == "one" else "auto"


def read_weights(model):
    """Read a deferred model's weights now (a real-size model says so on stderr, with a bar while converting)."""
    model.load_weights()
    return model


def running(args, model, T: int, what: str = "") -> None:
    """The phase line of a forward pass (real-size models only)."""
    args.progress.phase(f"running {T} tokens through {model.config.n_layers} layers{what}")


# A model whose files hold at least this many bytes is real-size: reading it takes more than a moment, and the
# CLI says on stderr what it is doing (the test checkpoints are far smaller; Gemma 3 270M's GGUF is 253 MB).
REAL_SIZE_BYTES = 64 * 2**20


class Progress:
    """What a long command is doing, on stderr (stdout holds only the results, or only the JSON).

    phase(text): one line `refprism: text ...`; progress(what, done, total): a bar `refprism: what [###...] done/
    total`, redrawn in place (a carriage return per update, a newline at the end): one output event per layer or
    tensor read. Silent (`on` False) for small models and with --quiet.
    """

    def __init__(self, on: bool, stream=None):
        self.on, self.stream = on, stream

    @classmethod
    def for_model(cls, model, *, quiet=False) -> "Progress":
        return cls(not quiet and model_bytes(model) >= REAL_SIZE_BYTES)

    def _write(self, text):
        stream = self.stream or sys.stderr
        stream.write(text)
        stream.flush()

    def phase(self, text: str) -> None:
        if self.on:
            self._write(f"refprism: {one_line(text)} ...\n")

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.on:
            return
        width = 30
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        self._write(f"\rrefprism: {what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")


def model_bytes(model) -> int:
    """The size of a model's files on disk (a .gguf file, or a directory's safetensors); 0 for anything else (a
    hub id: open_model judges it by its config)."""
    text = model or os.environ.get("REFPRISM_MODEL") or "google/gemma-2b"
    try:
        path = Path(text).expanduser()
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())
    except (OSError, ValueError, RuntimeError):  # an unusable name: load() refuses it in one line
        pass
    return 0


# The command-line spellings of the memory refusal's ways out (model.preflight offers only those that would fit):
# every command can load with --memory low, compute in float32 and take a shorter prompt; `record` also keeps the
# logits only at --position and records a --select.
RUN_SPELLING = {"low": "use --memory low", "float32": "use --dtype float32",
                "shorten": "give a prompt of at most {tokens} tokens"}
RECORD_SPELLING = {**RUN_SPELLING, "positions": "keep the logits only where you read them (--position -1)",
                   "select": "record only what you read (--select, e.g. --select 'blocks.*.resid_post@-1' logits@-1)"}


def shown(piece: str) -> str:
    """A vocabulary piece as printed in a line of tokens or a list: line breaks and tabs as escapes (\\n, \\t)."""
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def check_out_path(path: str, force: bool) -> Path:
    """--out must name a new file (or, with --force, an existing file) in an existing, writable directory."""
    out = Path(path)
    try:
        if "\0" in path or not path:
            raise InputError(f"--out {path_text(path)} is not a usable file name")
        if not out.parent.is_dir():
            raise InputError(f"the directory of --out {path_text(path)} does not exist: create it first")
        if out.is_dir():
            raise InputError(f"--out {path_text(path)} is a directory; give a file name")
        if out.exists() and not force:
            raise InputError(f"--out {path_text(path)} exists: pass --force to replace it")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write into the directory of --out {path_text(path)}: check its permissions")
    except OSError as e:  # e.g. a name longer than the file system allows
        raise InputError(f"cannot use --out {path_text(path)}: {e.strerror or e}") from None
    return out


def softmax64(logits):
    """Probabilities in float64 (display only)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def tokens_json(model, ids):
    return [{"id": int(i), "piece": model.piece(i)} for i in ids]


def _readout(args, check=None, *, work="one"):
    """Check every argument before the weights are read (`check(model, T, p)`: the command's own checks), then
    load, run, resolve targets (default: the top 5 at the position) -> the logits readout."""
    from refprism import prisms

    if args.plot:
        _check_plot_path(args.plot)
    prompt = prompt_of(args)
    args.empty_prompt = prompt == ""  # the BOS-only run: said so in the output
    model = open_model(args, work=work)
    T = len(model.check(prompt, positions=args.position, spelling=RUN_SPELLING))  # logits only where read
    p = args.position % T
    if args.targets is not None:
        prisms.resolve_targets(model, args.targets, args.versus or ())
    else:
        for v in args.versus or ():
            prisms.resolve_token(model, v)
    if check is not None:
        check(model, T, p)
    read_weights(model)
    running(args, model, T)
    run = model.run(prompt, positions=args.position)  # every activation, the logits only where they are read
    targets = args.targets
    if targets is None:  # not given: the top 5 (a bare --targets is refused by resolve_targets)
        targets = [f"#{i}" for i in np.argsort(-run.logits[p], kind="stable")[:5]]
    return prisms.logits_readout(model, run, targets, position=p, versus=args.versus or ())


def _check_plot_path(path):
    out = Path(path)
    try:
        if "\0" in path:
            raise InputError(f"--plot {path_text(path)} is not a usable file name")
        if not out.parent.is_dir():
            raise InputError(f"the directory of --plot {path_text(path)} does not exist: create it first")
    except OSError as e:
        raise InputError(f"cannot use --plot {path_text(path)}: {e.strerror or e}") from None
    if out.suffix.lower() != ".png":
        raise InputError(f"--plot writes a PNG: give a file name ending in .png, got {path_text(path)}")


def _show(args, split, *, top=None, extra=None):
    """Print the split (table or JSON) and write its figure if asked; warn when its parts miss the whole."""
    _warn_if_not_exact(split)
    if args.plot:
        from refprism.prisms import plots

        plots.figure_for(split, args.plot)
    if args.json:
        print(json.dumps(split.to_json()))
    else:
        r = split.readout
        print(f"{split.prism} prism  model {r.model.name}  dtype {r.model.dtype}  position {r.position} "
              f"({r.run.pieces[r.position]})  reading {r.site_name}")
        note = "  (empty prompt: the BOS-only run)" if getattr(args, "empty_prompt", False) else ""
        print("tokens: " + " ".join(f"{i}:{shown(p)}" for i, p in enumerate(r.run.pieces)) + note)
        print("targets: " + ", ".join(f"{shown(t.piece)} #{t.id}" for t in r.targets.targets + r.targets.versus))
        print(split.table(top=top))
        if extra:
            print(extra)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _warn_if_not_exact(split) -> None:
    """One line on stderr when |whole - sum(parts)| exceeds the stated tolerance (the result is still shown)."""
    if not split.decomposes or split.exact:
        return
    dtype = np.dtype(split.values.dtype)
    excess = np.abs(split.residual) - split.tolerance
    z = int(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)))
    what = (f"the {split.prism} prism's residual {split.residual[z]:.3g} (column {split.columns[z]}) exceeds "
            f"the {dtype} tolerance {split.tolerance[z]:.2g}")
    advice = ("rerun with --dtype float64" if dtype == np.float32
              else "float64 should not miss it: please report this with the command")
    print(f"refprism: warning: {one_line(what)}; {advice}", file=sys.stderr)


def _check_top(args):
    if getattr(args, "top", None) is not None and args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")


def _is_int(text) -> bool:
    """An optionally signed run of ASCII digits ('²'.isdigit() is True but int('²') fails)."""
    digits = text[1:] if text[:1] in "+-" else text
    return digits.isascii() and digits.isdigit()
