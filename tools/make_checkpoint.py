#!/usr/bin/env python3
"""Write a random-weight Gemma checkpoint in the Hugging Face layout.

    python tools/make_checkpoint.py OUT_DIR --preset tiny
    python tools/make_checkpoint.py /tmp/g2b --preset gemma-2b --dtype bfloat16 --shards 2
    python tools/make_checkpoint.py /tmp/t3 --preset tiny --layers 3 --kv-heads 1 --vocab 1000

A thin wrapper around ``refprism.checkpoints.synth.write_checkpoint``; see that module for the tensors,
their random scales and the tokenizer written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

try:
    from refprism.checkpoints.synth import DTYPES, PRESETS, make_config, tensor_shapes, write_checkpoint
except ImportError as exc:  # pragma: no cover - exercised only without the package
    sys.exit(
        f"make_checkpoint: cannot import refprism ({exc}).\n"
        "Install it from the repository root with `pip install -e .`, "
        "or run with PYTHONPATH set to the repository root."
    )

# Command-line flag -> HF config.json key.
_OVERRIDES = {
    "layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_mlp": "intermediate_size",
    "vocab": "vocab_size",
    "max_positions": "max_position_embeddings",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_checkpoint.py",
        description="Write a random-weight Gemma checkpoint (config.json, safetensors, tokenizer).",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be absent or empty unless --force)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="base config (default: tiny)")
    shape = p.add_argument_group("shape overrides (HF key in brackets)")
    shape.add_argument("--layers", type=int, help="L [num_hidden_layers]")
    shape.add_argument("--d-model", type=int, help="D [hidden_size]")
    shape.add_argument("--heads", type=int, help="N [num_attention_heads]")
    shape.add_argument("--kv-heads", type=int, help="K [num_key_value_heads]")
    shape.add_argument("--head-dim", type=int, help="H [head_dim]")
    shape.add_argument("--d-mlp", type=int, help="F [intermediate_size]")
    shape.add_argument("--vocab", type=int, help="V [vocab_size]")
    shape.add_argument("--max-positions", type=int, help="[max_position_embeddings]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype (default: float32)")
    sharding = p.add_mutually_exclusive_group()
    sharding.add_argument("--shards", type=int, default=1, help="number of safetensors files (default: 1)")
    sharding.add_argument("--max-shard-bytes", type=int, help="close a shard before it passes this many bytes")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    return p


def _progress(config: dict):
    """A bar on stderr while a real-size checkpoint is drawn and written (gemma-2b: ~1 min); none for small ones."""
    from refprism.cli.common import REAL_SIZE_BYTES, Progress

    params = sum(math.prod(s) for s in tensor_shapes(config).values())
    return Progress(params * 2 >= REAL_SIZE_BYTES)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, flag) for flag, key in _OVERRIDES.items() if getattr(args, flag) is not None}
    try:
        config = make_config(args.preset, **overrides)
        start = time.perf_counter()
        out = write_checkpoint(
            args.out_dir,
            config,
            dtype=args.dtype,
            shards=args.shards if args.max_shard_bytes is None else 1,
            max_shard_bytes=args.max_shard_bytes,
            seed=args.seed,
            tokenizer=None if args.no_tokenizer else "auto",
            force=args.force,
            progress=_progress(config),
        )
        seconds = time.perf_counter() - start
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        parser.exit(2, f"make_checkpoint: error: {exc}\n")
    params = sum(math.prod(s) for s in tensor_shapes(config).values())
    files = sorted(f.name for f in out.iterdir())
    print(f"wrote {out} in {seconds:.1f} s: {params:,} parameters, {args.dtype}")
    for name in files:
        print(f"  {name}  {(out / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
