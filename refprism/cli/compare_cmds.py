"""`refprism compare`: another Gemma implementation against the reference; exit 0 agree, 1 diverges, 2 bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refprism.cli.common import _check_plot_path, path_text, prompt_of
from refprism.errors import InputError
from refprism.files import atomic_write

OTHER_DTYPES = ("float32", "bfloat16", "float16", "float64")


def register(sub) -> None:
    p = sub.add_parser("compare", help="check another Gemma implementation (HF, TransformerLens, llama.cpp, a dump "
                                       "file) against the reference: the first wrong op and its likely cause")
    p.add_argument("prompt", nargs="?", help="the prompt text (the tokenizer adds BOS); or --ids / --prompt-file; "
                                             "optional with a dump that holds its token ids")
    p.add_argument("--ids", help="the prompt as token ids, comma or space separated (e.g. '2,651,6037')")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt text from a UTF-8 file")
    p.add_argument("--model", default=None,
                   help="model directory, hub id or .gguf file (default: $REFPRISM_MODEL, else google/gemma-2b)")
    p.add_argument("--against", required=True, metavar="hf|tl|llama.cpp|FILE",
                   help="the other side: hf (transformers, live), tl (TransformerLens' Bridge, live), llama.cpp "
                        "(llama.cpp on the .gguf --model: its logits and llama-debug's dump; needs python "
                        "tools/build_llama_cpp.py), or a dump file (.npz / .safetensors)")
    p.add_argument("--names", default="refprism", metavar="refprism|hf|tl|llama.cpp|MAP.json",
                   help="how a dump names its arrays (default refprism); a JSON name map for your own port")
    p.add_argument("--dtype", default=None, choices=OTHER_DTYPES,
                   help="the OTHER side's arithmetic (its floors): for hf/tl the dtype it runs in (default "
                        "float32); for a dump, default the dump's own dtype; llama.cpp's is its own (float32 with "
                        "its GGUF's roundings). refprism itself runs in float64")
    p.add_argument("--kv-cache", default=None, choices=["f16", "f32"],
                   help="llama.cpp's KV cache type (default f16, llama.cpp's): the one --against llama.cpp runs "
                        "with, or a dump with --names llama.cpp was made with (its floors round keys, values and "
                        "their products' other factor to it)")
    p.add_argument("--llama-cpp", metavar="DIR", default=None,
                   help="with --against llama.cpp: a folder holding your own build's llama-debug (e.g. build/bin), "
                        "checked instead of the cached build; its printed logits stand for the logits")
    p.add_argument("--memory", default="auto", choices=["auto", "fast", "low"],
                   help="refprism's weight memory mode (as for every command)")
    p.add_argument("--top-k", type=int, default=5, help="k of the logits' top-k overlap (default 5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON only")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown (for a pull request)")
    p.add_argument("--plot", metavar="FILE.png", help="also write error and floor along the depth as a PNG")
    p.set_defaults(func=cmd_compare)


def _check_markdown_path(path: str) -> Path:
    out = Path(path)
    if "\0" in path or not path or out.is_dir() or not out.parent.is_dir():
        raise InputError(f"cannot write --markdown {path_text(path)}: give a file name in an existing directory")
    return out


def cmd_compare(args) -> int:
    from refprism.crosscheck import check_against, compare
    from refprism.model import load

    check_against(args.against)
    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    if args.plot:
        _check_plot_path(args.plot)
    if args.markdown:
        _check_markdown_path(args.markdown)
    if args.llama_cpp is not None:
        if args.against != "llama.cpp":
            raise InputError("--llama-cpp names a llama.cpp build to run: it applies to --against llama.cpp only")
        from refprism.crosscheck.sides.llamacpp import tool

        tool("llama-debug", args.llama_cpp)  # your build's folder holds it, before any weights are read
    given = any(v is not None for v in (args.prompt, args.ids, args.prompt_file))
    prompt = prompt_of(args) if given else None  # None: the dump's own token ids
    model = load(args.model, dtype="float32", memory=args.memory)
    result = compare(model, prompt, against=args.against, names=args.names, dtype=args.dtype, top_k=args.top_k,
                     kv_cache=args.kv_cache, llama_cpp=args.llama_cpp)
    if not result.tokens_match:  # nothing was compared: one line, exit 2, like every refusal
        raise InputError(result.headline())
    if args.plot:
        from refprism.crosscheck.plots import compare_figure

        compare_figure(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.markdown:
        text = result.markdown()
        atomic_write(Path(args.markdown), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {args.markdown}", file=sys.stderr)
    print(json.dumps(result.to_json()) if args.json else result.table())
    return result.exit_status
