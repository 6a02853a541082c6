#!/usr/bin/env python3
"""EAP and EAP-IG on Gemma 3 270M against exact edge patches: sizes, costs and agreement (docs/attribution.md).

    python tools/edge_table.py --out DIR [--steps 4] [--sample 40]

On the demo prompt with the counterfactual "Germany" in place of "France" (resample, noising, every position
edited), at level heads (heads and MLPs: refprism.interventions.edge_count edges): EAP (one backward) and EAP-IG
(k interpolated inputs, midpoint rule). The truth is the exact patch of each edge (interventions.edge_patch: the
downstream input copy re-run from its layer): the top --sample/2 edges by |EAP| and a uniform sample of
--sample/2 others (seed 0). Writes DIR/edges.json and DIR/edges.md (agreement over the patched edges:
interventions.agreement, as validate's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import refprism
from refprism.demo import CAPITAL_PROMPT, gguf_path
from refprism.interventions.agreement import agreement
from refprism.interventions.edges import attribute_edges, edge_count, edge_patch, upstream_changes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sample", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = refprism.load(str(gguf_path()), dtype="float32", memory="fast")
    cf = CAPITAL_PROMPT.replace("France", "Germany")
    kw = dict(level="heads", ablate="resample", counterfactual=cf, at="all")
    eap = attribute_edges(model, CAPITAL_PROMPT, method="eap", **kw)
    print(f"eap: {len(eap.labels)} edges, {eap.cost}", file=sys.stderr)
    ig = attribute_edges(model, eap.setting.clean, method="eap-ig", steps=args.steps,
                         **dict(kw, counterfactual=eap.setting.counterfactual))
    print(f"eap-ig: {ig.cost}", file=sys.stderr)
    order = np.argsort(-np.abs(eap.values[:, 0]), kind="stable")
    half = args.sample // 2
    rest = np.random.default_rng(0).choice(order[half:], size=half, replace=False)
    chosen = np.concatenate([order[:half], np.sort(rest)])
    deltas = upstream_changes(eap.setting)
    started = time.perf_counter()
    exact = np.array([edge_patch(eap.setting, eap.labels[i], deltas=deltas)[0] for i in chosen])
    patch_s = time.perf_counter() - started
    rows = {"model": model.name, "prompt": CAPITAL_PROMPT, "counterfactual": cf, "n_edges": len(eap.labels),
            "edge_count": edge_count(model.config), "steps": args.steps, "patched": len(chosen),
            "patch_seconds": patch_s, "cost": {"eap": eap.cost, "eap-ig": ig.cost},
            "agreement": {m: agreement(a.values[chosen, 0], exact, 10) for m, a in (("eap", eap), ("eap-ig", ig))},
            "edges": [{"label": eap.labels[i], "eap": float(eap.values[i, 0]), "eap-ig": float(ig.values[i, 0]),
                       "patch": float(x)} for i, x in zip(chosen, exact)]}
    for m in ("eap", "eap-ig"):
        rows["agreement"][m]["reruns_to_true_top_k"] = None  # a sample: the true top-k is not known
    (out / "edges.json").write_text(json.dumps(rows, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| method | edges | Spearman | Kendall | sign | top-10 P | top-10 R | passes (fwd + bwd) | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in ("eap", "eap-ig"):
        g, c = rows["agreement"][m], rows["cost"][m]
        lines.append(f"| {m} | {len(eap.labels):,} | {fmt(g['spearman'])} | {fmt(g['kendall'])} | "
                     f"{fmt(g['sign_agreement'])} | {g['top_k_precision']:.2f} | {g['top_k_recall']:.2f} | "
                     f"{c['forward']} + {c['backward']} | {c['seconds']:.1f} |")
    lines.append(f"| *edge patch (the truth)* | {len(chosen)} patched |  |  |  |  |  | {len(chosen)} + 0 | "
                 f"{patch_s:.1f} |")
    lines += ["", "top edges by |exact patch| among the patched:", "",
              "| edge | eap | eap-ig | patch |", "|---|---|---|---|"]
    for e in sorted(rows["edges"], key=lambda e: -abs(e["patch"]))[:10]:
        lines.append(f"| `{e['label']}` | {e['eap']:.4f} | {e['eap-ig']:.4f} | {e['patch']:.4f} |")
    lines.append("")
    lines.append(f"Gemma 3 270M (Q4_K_M GGUF dequantized, float32), {CAPITAL_PROMPT!r} against {cf!r}, resample "
                 f"noising at every position, level heads; eap-ig k = {args.steps}; agreement over the "
                 f"{len(chosen)} patched edges (the top {half} by |eap| and {half} sampled). Produced by "
                 f"`python tools/edge_table.py --out DIR --steps {args.steps} --sample {args.sample}`.")
    (out / "edges.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
