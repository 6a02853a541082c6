"""The `refprism` command. Every subcommand shares --model / --dtype and a prompt (text or --ids).

Errors: one line `refprism: error: ...` on stderr and exit status 2; never a traceback, never a half file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError, RefprismError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) that names the subcommand's --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text (the tokenizer adds BOS); or use --ids")
    p.add_argument("--ids", help="the prompt as token ids, comma or space separated (e.g. '2,651,6037')")
    p.add_argument("--model", default=None,
                   help="model directory or hub id (default: $REFPRISM_MODEL, else google/gemma-2b)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64 (audit)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refprism", description="NumPy reference gemma-2b with exact logit prisms.")
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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except RefprismError as e:
        print(f"refprism: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("refprism: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("refprism: error: out of memory (try a shorter prompt or a machine with more RAM)", file=sys.stderr)
        return 1


# -------------------------------------------------------------------------------------------------- helpers


def prompt_of(args):
    """The prompt as given: text, or the list of ids from --ids (exactly one of the two)."""
    if args.ids is not None and args.prompt is not None:
        raise InputError("give the prompt as text or as --ids, not both")
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"--ids must be integers separated by commas or spaces, got {args.ids!r}") from None
        if not ids:
            raise InputError("--ids is empty")
        return ids
    if args.prompt is None:
        raise InputError("no prompt: give the prompt text, or token ids with --ids")
    return args.prompt


def load_model(args):
    from .model import load

    return load(args.model, dtype=args.dtype)


def check_out_path(path: str, force: bool) -> Path:
    out = Path(path)
    if not out.parent.is_dir():
        raise InputError(f"the directory of --out {path!r} does not exist")
    if out.exists() and not force:
        raise InputError(f"{path} exists: pass --force to replace it")
    if out.is_dir():
        raise InputError(f"--out {path!r} is a directory; give a file name")
    return out


def atomic_write(out: Path, write) -> None:
    """Call write(file_object) on a temporary file beside `out`, then rename it over `out`."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    model = load_model(args)
    run = model.run(prompt_of(args))
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
    note = "  (empty prompt: the BOS-only run)" if isinstance(prompt_of(args), str) and not prompt_of(args) else ""
    print(f"model {model.name}  dtype {model.dtype}  T={len(run.tokens)}{note}")
    print("tokens: " + " ".join(f"{p}({i})" for i, p in zip(run.tokens, run.pieces)))
    print(f"next token (top {k}):")
    for rank, i in enumerate(top, 1):
        print(f"  {rank:>3}  {model.piece(i):<20} #{int(i):<8} logit {last[i]:>10.4f}  p {probs[i]:.4f}")
    return 0


def cmd_record(args) -> int:
    out = check_out_path(args.out, args.force)
    model = load_model(args)
    run = model.run(prompt_of(args))
    arrays = dict(run.record)
    arrays["tokens"] = run.tokens
    arrays["config"] = np.array(json.dumps(model.config.to_dict()))
    atomic_write(out, lambda f: np.savez(f, **arrays))
    print(f"wrote {len(run.record)} activations for {len(run.tokens)} tokens to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
