#!/usr/bin/env python3
"""Time `validate --level heads` (every head zero-ablated at the last position, one re-run each) in refprism
against the same patches done the usual way: HF transformers with a forward hook, one full forward each.

    python tools/bench_interventions.py                          # gemma-2b shape (/tmp/g2b-bf16), markdown on stdout
    python tools/bench_interventions.py --checkpoint DIR         # another HF-layout Gemma 1 checkpoint
    python tools/bench_interventions.py --quick                  # the tiny shape: the harness end to end

Each side runs in its own fresh Python process (this script with `--worker SPEC`, printing one JSON line), one
after the other, never together (each holds ~10 GB for gemma-2b in float32):

    refprism   refprism.load(dir, memory="fast"); two clean forwards (model.run, the second is "steady");
               refprism.validate(model, run, level="heads", ablate="zero", faithfulness=False): one patch per head,
               each resumed at the head's layer from the clean record and ended at the final norm
    hf         GemmaForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager"); two clean
               forwards; then per head a forward_pre_hook on o_proj that zeroes the head's slice of z at the last
               position, one full forward (use_cache=False, no_grad), the hook removed

Both read the same readout (refprism's default: the clean top token minus the runner-up) and the script checks
that the two sets of total effects agree. Times exclude imports and loading; the target is refprism's patches
taking at most half of HF's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: checkpoint, child processes, machine description)

PROMPT = bench.PROMPT
TARGET = 0.5  # refprism's patches / HF's patches


def worker_refprism(spec: dict) -> dict:
    import refprism
    from refprism import interventions as I

    t = time.perf_counter()
    model = refprism.load(spec["dir"], memory="fast")
    out = {"load_s": time.perf_counter() - t}
    t = time.perf_counter()
    run = model.run(spec["ids"])
    out["forward1_s"] = time.perf_counter() - t
    t = time.perf_counter()
    run = model.run(spec["ids"])
    out["forward2_s"] = time.perf_counter() - t
    t = time.perf_counter()
    v = I.validate(model, run, level="heads", ablate="zero", faithfulness=False)
    out["validate_s"] = time.perf_counter() - t
    out["patches_s"] = v.timing["rerun_seconds"]
    out["n_patches"] = v.timing["reruns"]
    out["labels"] = v.labels
    out["total"] = v.total[:, 0].tolist()
    out["prism"] = v.prism[:, 0].tolist()
    out["target"], out["foil"] = v.setting.readout.targets.targets[0].id, v.setting.readout.targets.versus[0].id
    out["agreement"] = v.agreement
    out["rss_gb"] = bench.peak_rss() / bench.GB
    return out


def worker_hf(spec: dict) -> dict:
    import torch
    from transformers import GemmaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    model = GemmaForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32, attn_implementation="eager").eval()
    out = {"load_s": time.perf_counter() - t}
    ids = torch.tensor([spec["ids"]])
    p, target, foil = len(spec["ids"]) - 1, spec["target"], spec["foil"]
    cfg = model.config
    H = cfg.head_dim

    def readout():
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0, p]
        return float(logits[target] - logits[foil])

    t = time.perf_counter()
    readout()
    out["forward1_s"] = time.perf_counter() - t
    t = time.perf_counter()
    clean = readout()
    out["forward2_s"] = time.perf_counter() - t
    totals = []
    t = time.perf_counter()
    for layer in model.model.layers:
        for h in range(cfg.num_attention_heads):
            def zero_head(module, args, h=h):
                z = args[0].clone()
                z[0, p, h * H:(h + 1) * H] = 0
                return (z,) + tuple(args[1:])

            hook = layer.self_attn.o_proj.register_forward_pre_hook(zero_head)
            try:
                totals.append(clean - readout())
            finally:
                hook.remove()
    out["patches_s"] = time.perf_counter() - t
    out["n_patches"] = len(totals)
    out["total"] = totals
    out["rss_gb"] = bench.peak_rss() / bench.GB
    return out


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = {"refprism": worker_refprism, "hf": worker_hf}[spec["case"]](spec)
    print(bench.RESULT_MARK + json.dumps(result), flush=True)


def report(ours: dict, hf: dict, *, folder: Path, ids: list[int]) -> str:
    def s(x):
        return bench.fmt_seconds(x)

    n = ours["n_patches"]
    rows = [("load", ours["load_s"], hf["load_s"]),
            ("clean forward, first", ours["forward1_s"], hf["forward1_s"]),
            ("clean forward, steady", ours["forward2_s"], hf["forward2_s"]),
            (f"{n} head patches", ours["patches_s"], hf["patches_s"]),
            ("one patch (mean)", ours["patches_s"] / n, hf["patches_s"] / hf["n_patches"])]
    lines = ["| | refprism | HF hooks | refprism / HF |", "| --- | ---: | ---: | ---: |"]
    for name, a, b in rows:
        lines.append(f"| {name} | {s(a)} | {s(b)} | {a / b:.3f}x |")
    lines.append(f"| peak RSS | {ours['rss_gb']:.2f} GB | {hf['rss_gb']:.2f} GB | "
                 f"{ours['rss_gb'] / hf['rss_gb']:.3f}x |")
    ratio = ours["patches_s"] / hf["patches_s"]
    per_forward = ours["patches_s"] / n / ours["forward2_s"]
    import numpy as np

    diff = np.abs(np.asarray(ours["total"]) - np.asarray(hf["total"]))
    scale = np.abs(np.asarray(hf["total"])).max()
    a = ours["agreement"]
    return "\n".join([
        f"`validate --level heads` on {folder} ({n} heads, zero-ablated at the last of {len(ids)} tokens), "
        f"readout #{ours['target']} - #{ours['foil']}",
        "", *lines, "",
        f"- refprism's patches take {ratio:.3f}x HF's time (target <= {TARGET}x: "
        f"{'met' if ratio <= TARGET else 'NOT met'}); one resumed patch costs {per_forward:.2f} of refprism's own "
        f"steady forward.",
        f"- total effects, refprism vs HF: max |difference| {diff.max():.2e} (largest effect {scale:.3g}).",
        f"- agreement of |prism| with |total|: Spearman {a['spearman']:.3f}, Kendall {a['kendall']:.3f}, "
        f"sign agreement {a['sign_agreement']:.3f} (random weights: a harness check, not a finding).",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/g2b-bf16", help="HF-layout checkpoint (written when missing)")
    ap.add_argument("--quick", action="store_true", help="the tiny shape in a temporary folder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            return measure(bench.ensure_checkpoint(Path(tmp) / "tiny", "tiny"))
    return measure(bench.ensure_checkpoint(Path(args.checkpoint), "gemma-2b"))


def measure(folder: Path) -> int:
    ids = bench.base_ids(folder)
    results = {}
    for case in ("refprism", "hf"):  # one after the other: each holds the whole model
        spec = {"case": case, "dir": str(folder), "ids": ids}
        if case == "hf":
            spec.update(target=results["refprism"]["target"], foil=results["refprism"]["foil"])
        bench.log(f"{case} ...")
        results[case] = bench.run_child([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                        timeout=3600)
        if "failed" in results[case]:
            print(f"{case}: {results[case]['failed']}: {results[case].get('stderr', '')}")
            return 1
        bench.log(f"  {case}: {results[case]['patches_s']:.1f} s for {results[case]['n_patches']} patches")
    print(report(results["refprism"], results["hf"], folder=folder, ids=ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
