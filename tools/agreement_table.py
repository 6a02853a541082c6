#!/usr/bin/env python3
"""How gradient x activation, AtP, AtP*, AtP with GradDrop, IG and the prisms agree with patched total effects, on
Gemma 3 270M (the GGUF from PyPI, dequantized to float32): the table of docs/attribution.md and the README.

    python tools/agreement_table.py --out agreement-270m            # every setting below
    python tools/agreement_table.py --out DIR --capitals 10         # the first 10 prompts of the capitals data set

Settings (each one refprism.interventions.validate(..., methods=[...]) per prompt; every component re-run):
    demo, heads, zero ablation           gradxact, atp, atp-gd, ig (k = --steps)
    demo, heads, resample (noising)      atp, atp*, atp*-gd, atp-gd, ig   counterfactual: Germany for France
    demo, neurons:L, zero ablation       gradxact, atp, atp-gd, ig (the totals of the top-k and a sample:
                                                                   --budget, default 64; every method scores
                                                                   those, ig at budget x k re-runs)
    capitals, heads, zero ablation       gradxact, atp, atp-gd     (each prompt: its target versus the mean of the
                                                                   other capitals, as the data set gives them;
                                                                   ig too with --capitals-ig)
    capitals, heads, resample (noising)  atp, atp*, atp-gd         counterfactual: the next prompt of the data set
                                                                   (cyclically) with as many tokens
                                                                   (counterfactual_pairs); ig too with --capitals-ig
Writes DIR/rows.jsonl (one line per prompt and setting, as it goes: a stopped run keeps what it did) and
DIR/table.md (the markdown table: per setting and method the mean over prompts of Spearman, Kendall, sign
agreement, top-k precision and recall, re-runs to the true top-k, passes and seconds; capitals with 95% bootstrap
intervals, refprism.sweeps.summary.mean_interval_sign).
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
from refprism.interventions.attribution import validate_methods
from refprism.sweeps.summary import mean_interval_sign

METRICS = ("spearman", "kendall", "sign_agreement", "top_k_precision", "top_k_recall", "reruns_to_true_top_k")
NAMES = {"spearman": "Spearman", "kendall": "Kendall", "sign_agreement": "sign", "top_k_precision": "top-k P",
         "top_k_recall": "top-k R", "reruns_to_true_top_k": "re-runs to top-k"}


def counterfactual_pairs(ids, lengths) -> dict:
    """Each capitals prompt's counterfactual for resample ablation: the next prompt of the data set, cyclically,
    whose token count is the same (resample needs the two runs position by position); a prompt with no such
    partner is left out. ids [n] in the data set's order, lengths {id: tokens} -> {id: partner id}."""
    out = {}
    for i, a in enumerate(ids):
        for j in range(1, len(ids)):
            b = ids[(i + j) % len(ids)]
            if lengths[b] == lengths[a]:
                out[a] = b
                break
    return out


def settings(model, layer, capitals, capitals_ig):
    demo = CAPITAL_PROMPT
    out = [("demo", "heads", "zero", demo, {}, ["gradxact", "atp", "atp-gd", "ig"]),
           ("demo", "heads", "resample", demo, {"counterfactual": demo.replace("France", "Germany")},
            ["atp", "atp*", "atp*-gd", "atp-gd", "ig"]),
           ("demo", f"neurons:{layer}", "zero", demo, {}, ["gradxact", "atp", "atp-gd", "ig"])]
    out = [out[0], out[2], out[1]]  # the cheap one first
    rows = [json.loads(line) for line in
            (Path(refprism.__file__).parent / "sweeps" / "data" / "capitals.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    pairs = counterfactual_pairs([r["id"] for r in rows], {r["id"]: len(model.encode(r["prompt"])) for r in rows})
    ig = ["ig"] if capitals_ig else []
    for r in rows[:capitals]:
        readout = {"targets": r["targets"], "versus": r["versus"]}
        out.append((f"capitals:{r['id']}", "heads", "zero", r["prompt"], readout, ["gradxact", "atp", "atp-gd"] + ig))
        if r["id"] in pairs:
            out.append((f"capitals:{r['id']}", "heads", "resample", r["prompt"],
                        {**readout, "counterfactual": by_id[pairs[r["id"]]]["prompt"]}, ["atp", "atp*", "atp-gd"] + ig))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8, help="ig's k (default 8)")
    ap.add_argument("--layer", type=int, default=6, help="the layer of the neurons:L setting (default 6)")
    ap.add_argument("--capitals", type=int, default=40, help="prompts of the capitals data set (default all 40)")
    ap.add_argument("--capitals-ig", action="store_true", help="ig on the capitals prompts too (k x 72 re-runs each)")
    ap.add_argument("--budget", type=int, default=64, help="re-runs of the neurons:L setting (default 64)")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--table-only", action="store_true", help="write table.md from the rows done so far")
    ap.add_argument("--only", choices=["demo", "capitals"], help="run only these settings (e.g. two processes)")
    ap.add_argument("--rows", nargs="*", default=[], help="with --table-only: more rows.jsonl files to include")
    ap.add_argument("--reverse", action="store_true", help="the settings in reverse order (a second process)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    if args.table_only:
        rows = {}  # one row per (prompt, level, ablation): two processes may both have done one
        for path in [rows_path, *map(Path, args.rows)]:
            for x in path.read_text().splitlines() if path.exists() else []:
                r = json.loads(x)
                rows.setdefault((r["prompt_id"], r["level"], r["ablate"]), r)
        rows = list(rows.values())
        (out / "table.md").write_text(table(rows, args))
        print((out / "table.md").read_text())
        return 0
    done = set()
    if rows_path.exists():
        done = {(r["prompt_id"], r["level"], r["ablate"]) for r in map(json.loads, rows_path.read_text().splitlines())}
    t0 = time.perf_counter()
    model = refprism.load(str(gguf_path()), dtype="float32", memory="fast")
    print(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    todo = settings(model, args.layer, args.capitals, args.capitals_ig)
    for pid, level, ablate, prompt, extra, methods in (todo[::-1] if args.reverse else todo):
        if (pid, level, ablate) in done or (args.only and not pid.startswith(args.only)):
            continue
        started = time.perf_counter()
        r = validate_methods(model, prompt, methods=methods, level=level, ablate=ablate, steps=args.steps,
                             top=args.top, budget=args.budget if level.startswith("neurons") else 256,
                             faithfulness=False, **extra)
        v = r.validation
        line = {"prompt_id": pid, "prompt": prompt, "counterfactual": extra.get("counterfactual"), "level": level,
                "ablate": ablate, "n": int(v.verified.sum()),
                "components": len(v.labels), "k": v.agreement["k"], "steps": args.steps,
                "methods": {"prism": {"agreement": v.agreement, "cost": {"forward": 1, "backward": 0, "seconds": None}},
                            **{m: {"agreement": r.agreement(m), "cost": a.cost} for m, a in r.methods.items()}},
                "totals": {"reruns": v.timing["reruns"], "seconds": v.timing["rerun_seconds"]},
                "seconds": time.perf_counter() - started}
        with rows_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{pid} {level} {ablate}: {line['seconds']:.1f} s", file=sys.stderr)
    (out / "table.md").write_text(table([json.loads(x) for x in rows_path.read_text().splitlines()], args))
    print((out / "table.md").read_text())
    return 0


def _fmt(values, interval):
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return "n/a"
    if not interval or x.size < 2:
        return f"{x.mean():.2f}"
    st = mean_interval_sign(x[:, None], resamples=1000, seed=0)
    return f"{st['mean'][0]:.2f} [{st['lo'][0]:.2f}, {st['hi'][0]:.2f}]"


def paired(groups) -> list[str]:
    """Per capitals setting, each method's Spearman minus atp's on the same prompts: mean [95% bootstrap interval]
    of the per-prompt differences (a paired comparison; the intervals of two means overlap more than this)."""
    out = []
    for (where, level, ablate), rs in groups.items():
        if where != "capitals" or len(rs) < 2:
            continue
        cells = []
        for m in rs[0]["methods"]:
            d = [r["methods"][m]["agreement"]["spearman"] - r["methods"]["atp"]["agreement"]["spearman"]
                 for r in rs if m != "atp" and m in r["methods"]]
            if d:
                cells.append(f"{m} {_fmt(d, True)}")
        out.append(f"capitals ({len(rs)}), {level}, {ablate}: Spearman minus atp's, paired over prompts: "
                   + "; ".join(cells) + ".")
    return out + [""] if out else []


def table(rows, args) -> str:
    groups: dict = {}
    for r in rows:
        where = "capitals" if r["prompt_id"].startswith("capitals:") else "demo"
        groups.setdefault((where, r["level"], r["ablate"]), []).append(r)
    out = ["| prompts | level | ablation | method | " + " | ".join(NAMES[m] for m in METRICS)
           + " | passes (fwd + bwd) | seconds |",
           "|---" * (len(METRICS) + 6) + "|"]
    for (where, level, ablate), rs in groups.items():
        label = f"{where} ({len(rs)})" if where == "capitals" else "demo prompt"
        first = rs[0]
        for m in first["methods"]:
            got = [r["methods"][m] for r in rs if m in r["methods"]]
            cells = [_fmt([g["agreement"].get(k) for g in got], where == "capitals") for k in METRICS]
            fwd = np.mean([g["cost"]["forward"] for g in got])
            bwd = np.mean([g["cost"]["backward"] for g in got])
            secs = [g["cost"]["seconds"] for g in got if g["cost"].get("seconds") is not None]
            sec = f"{np.mean(secs):.2f}" if secs else "(in the base run)"
            out.append(f"| {label} | {level} | {ablate} | {m} | " + " | ".join(cells)
                       + f" | {fwd:.0f} + {bwd:.0f} | {sec} |")
        reruns = np.mean([r["totals"]["reruns"] for r in rs])
        secs = np.mean([r["totals"]["seconds"] for r in rs])
        out.append(f"| {label} | {level} | {ablate} | *total (the truth)* | n = {first['n']} of "
                   f"{first['components']}, k = {first['k']} |  |  |  |  |  | {reruns:.0f} + 0 | {secs:.2f} |")
    out += ["", *paired(groups)]
    steps = ", ".join(str(k) for k in sorted({r["steps"] for r in rows}))  # as the rows were run
    out.append(f"Gemma 3 270M (Q4_K_M GGUF dequantized, float32); ig k = {steps}; capitals rows: mean over "
               "prompts [95% bootstrap interval]. Agreement of |method| with |total| (refprism.interventions."
               "agreement). Resample (noising): the demo prompt against France replaced by Germany; each capitals "
               "prompt against the next prompt of the data set with as many tokens (counterfactual_pairs). "
               "Produced by `python tools/agreement_table.py --out DIR "
               f"--steps {steps} --layer {args.layer} --capitals {args.capitals} --budget {args.budget}"
               + (" --capitals-ig" if args.capitals_ig else "") + "`.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
