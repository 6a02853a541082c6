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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text (the tokenizer adds BOS); or use --ids / --prompt-file")
    p.add_argument("--ids", help="the prompt as token ids, comma or space separated (e.g. '2,651,6037')")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="read the prompt text from a UTF-8 file, exactly as stored (a final newline is part of it)")
    p.add_argument("--model", default=None,
                   help="model directory or hub id (default: $REFPRISM_MODEL, else google/gemma-2b)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64 (audit)")
    p.add_argument("--memory", default="auto", choices=["auto", "fast", "low"],
                   help="fast: convert all weights at load; low: convert each layer when used (about a third of "
                        "the memory, slower); auto (default): fast when it fits in available memory")


def _prism_common(p):
    _common(p)
    p.add_argument("--position", type=int, default=-1, help="the position whose logits are split (default: last)")
    p.add_argument("--targets", nargs="*", metavar="TOKEN",  # "*": a bare --targets reaches the library's refusal
                   help="target tokens: pieces (▁Paris), one-token text, or ids (#7127); default: the top 5")
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


def load_model(args):
    from refprism.model import load

    return load(args.model, dtype=args.dtype, memory=args.memory)


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


def _readout(args):
    """Load, run, resolve targets (default: the top 5 at the position) -> the logits readout."""
    from refprism import prisms

    if args.plot:
        _check_plot_path(args.plot)
    prompt = prompt_of(args)
    args.empty_prompt = prompt == ""  # the BOS-only run: said so in the output
    model = load_model(args)
    run = model.run(prompt, positions=args.position)  # every activation, the logits only where they are read
    p = prisms.resolve_position(run, args.position)
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
        print("tokens: " + " ".join(f"{i}:{p}" for i, p in enumerate(r.run.pieces)) + note)
        print("targets: " + ", ".join(f"{t.piece} #{t.id}" for t in r.targets.targets + r.targets.versus))
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
