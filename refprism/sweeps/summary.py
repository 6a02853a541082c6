"""summary.json: each component's mean term over the prompts with a percentile-bootstrap interval and the share of
same-sign prompts, the mean residual beside its tolerance, the aggregated neurons and the validate columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refprism.errors import InputError
from refprism.sweeps.compute import Levels, _floats
from refprism.sweeps.folder import read_neurons, read_prompts
from refprism.sweeps.rows import OTHER

CONFIDENCE = 0.95


MAX_RESAMPLES = 100_000  # bootstrap resamples: the [B, n] counts and [B, 4096] means stay in memory


def summarize(folder, *, bootstrap=1000, seed=0, top=10) -> dict:
    """summary.json of a sweep folder: per split (prism, whole) the mean of every component with its bootstrap
    interval and sign agreement, the residual of the means beside its tolerance, and the top components of each
    prism across the data set. A pure function of the folder's files (and bootstrap, seed, top)."""
    folder = Path(folder)
    manifest = json.loads((folder / "sweep.json").read_text("utf-8"))
    prompts = read_prompts(folder)
    errors = (folder / "errors.jsonl").read_text("utf-8").splitlines() if (folder / "errors.jsonl").exists() else []
    tables = _tables(prompts, folder, Levels.parse(manifest["levels"]))
    n = len(prompts)
    columns = _column_labels(prompts)
    # every whole and component of every table as one matrix [n, M]: one set of resamples serves all
    arrays = [a for t in tables for a in [t["whole"], *t["values"]]]  # each [n, Z]
    flat = np.concatenate(arrays, axis=1) if arrays else np.zeros((n, 0))  # [n, M]
    stats = mean_interval_sign(flat, resamples=bootstrap, seed=seed)
    at = 0
    splits = []
    for t in tables:
        Z = t["whole"].shape[1]
        entries = []
        for _ in range(len(t["labels"]) + 1):
            entries.append({k: v[at:at + Z] for k, v in stats.items()})
            at += Z
        whole, parts = entries[0], entries[1:]
        means = np.array([p["mean"] for p in parts]).reshape(-1, Z)
        residual = whole["mean"] - means.sum(axis=0)
        # |mean r_i| <= mean tol_i; the means themselves are float64 sums: 1e-12 of their size is plenty for that
        tolerance = t["tolerance"].mean(axis=0) + 1e-12 * (np.abs(whole["mean"]) + np.abs(means).sum(axis=0))
        named = t.get("named") or [None] * len(parts)  # head-role: in how many prompts each role is named
        split = {"prism": t["prism"], "whole": {"label": t["whole_label"], **_entry(whole)},
                 "components": [{"label": l, **_entry(p), **({} if k is None else {"prompts_named": k})}
                                for l, p, k in zip(t["labels"], parts, named)],
                 "residual": _floats(residual), "tolerance": _floats(tolerance),
                 "exact": bool(np.all(np.abs(residual) <= tolerance))}
        splits.append(split)
    summary = {
        "sweep": {"data": manifest["data"], "model": manifest["model"], "dtype": manifest["dtype"],
                  "levels": manifest["levels"], "prompts": n, "bad_rows": len(errors)},
        "columns": columns,
        "bootstrap": {"resamples": bootstrap, "seed": seed, "confidence": CONFIDENCE, "method": "percentile"},
        "splits": splits,
        "top": top_components(splits, top),
        "exact": all(s["exact"] for s in splits),
    }
    validations = [p["validate"] for p in prompts if p.get("validate")]
    if validations:
        summary["validate"] = validation_summary(validations, bootstrap=bootstrap, seed=seed)
    return summary


# The agreement metrics of a validation that are averaged over prompts (refprism.interventions.Validation).
AGREEMENT = ("spearman", "kendall", "sign_agreement", "top_k_precision", "top_k_recall", "reruns_to_true_top_k")


EFFECTS = ("prism", "direct", "total", "norm_rescaling", "mediated")


def validation_summary(validations, *, bootstrap=1000, seed=0) -> dict:
    """--validate over the data set: each agreement metric's mean over prompts with its bootstrap interval, the
    faithfulness curve's k80/k90, and per component (by label, over the prompts that validated it) the mean of
    its prism term, direct and total effect and the gap's parts, with intervals and sign agreement. With
    --validate-methods also "methods": per method (and "prism") each agreement metric's mean and interval and
    the mean cost (passes, seconds with its interval), and each component's mean score under the method's name.

    Math:   as for the prisms' terms (mean_interval_sign), over the prompts' validations; a metric that is NaN in
            a prompt (e.g. a rank correlation of constant values) is left out of that metric's mean.
    """
    out = {"prompts": len(validations), "level": validations[0].get("level"), "ablate": validations[0].get("ablate"),
           "direction": validations[0].get("direction"), "agreement": {}, "components": []}
    metrics = {m: [v["agreement"][m] for v in validations if v["agreement"].get(m) is not None] for m in AGREEMENT}
    faith = {k: [v["faithfulness"][k] for v in validations if isinstance(v.get("faithfulness"), dict)
                 and v["faithfulness"].get(k) is not None] for k in ("k80", "k90")}
    for name, values in {**metrics, **faith}.items():
        x = np.asarray([float(v) for v in values], dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size:
            st = mean_interval_sign(x[:, None], resamples=bootstrap, seed=seed)
            out["agreement"][name] = {"mean": float(st["mean"][0]), "ci": [float(st["lo"][0]), float(st["hi"][0])],
                                      "prompts": int(x.size)}
    methods = list(validations[0].get("methods") or {})
    if methods:
        out["methods"] = {m: _method_summary([v["methods"][m] for v in validations if m in v.get("methods", {})],
                                             bootstrap, seed) for m in methods}
    by_label: dict[str, list] = {}
    for v in validations:
        for c in v["components"]:
            by_label.setdefault(c["label"], []).append(c)
    for label, rows in by_label.items():
        entry = {"label": label, "prompts": len(rows)}
        for key in EFFECTS:
            st = mean_interval_sign(np.asarray([r[key] for r in rows], dtype=np.float64), resamples=bootstrap,
                                    seed=seed)
            entry[key] = _entry(st)
        for m in methods:
            got = [r[m] for r in rows if m in r]
            if got:
                entry[m] = _entry(mean_interval_sign(np.asarray(got, dtype=np.float64), resamples=bootstrap,
                                                     seed=seed))
        out["components"].append(entry)
    return out


def _mean_ci(values, bootstrap, seed) -> dict | None:
    x = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return None
    st = mean_interval_sign(x[:, None], resamples=bootstrap, seed=seed)
    return {"mean": float(st["mean"][0]), "ci": [float(st["lo"][0]), float(st["hi"][0])], "prompts": int(x.size)}


def _method_summary(entries, bootstrap, seed) -> dict:
    """One method over the prompts: each agreement metric (AGREEMENT) and each cost (forward and backward passes,
    seconds) as mean, bootstrap interval and the number of prompts with a value (None where no prompt has one)."""
    return {"agreement": {k: _mean_ci([e["agreement"].get(k) for e in entries], bootstrap, seed) for k in AGREEMENT},
            "cost": {k: _mean_ci([e["cost"].get(k) for e in entries], bootstrap, seed)
                     for k in ("forward", "backward", "seconds")}}


def mean_interval_sign(x, *, resamples=1000, seed=0) -> dict[str, np.ndarray]:
    """Per column of x [n, M]: mean, percentile-bootstrap interval (lo, hi) and the share of rows with the
    mean's sign (module docstring).

    Math:   m = (1/n) sum_i x_i;   w_b ~ Multinomial(n; 1/n ...), m_b = (1/n) w_b . x   (b = 1 .. B)
            lo, hi = the (1 - CONFIDENCE)/2 and (1 + CONFIDENCE)/2 quantiles of m_b;  same = mean_i [sign x_i = sign m]
    Shapes: x [n, M] -> mean, lo, hi, same_sign [M]
    """
    x = np.asarray(x, dtype=np.float64)
    n, M = x.shape
    if n == 0:
        nan = np.full(M, np.nan)
        return {"mean": nan, "lo": nan, "hi": nan, "same_sign": nan}
    mean = x.mean(axis=0)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    lo, hi = np.empty(M), np.empty(M)
    q = [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]
    for a in range(0, M, 4096):  # [B, 4096] resample means at a time
        means = counts @ x[:, a:a + 4096] / n
        lo[a:a + 4096], hi[a:a + 4096] = np.quantile(means, q, axis=0)
    same = (np.sign(x) == np.sign(mean)).mean(axis=0)
    return {"mean": mean, "lo": lo, "hi": hi, "same_sign": same}


def _entry(s) -> dict:
    return {"mean": _floats(s["mean"]), "ci": [[float(a), float(b)] for a, b in zip(s["lo"], s["hi"])],
            "same_sign": _floats(s["same_sign"])}


def _column_labels(prompts) -> list[str]:
    if not prompts:
        return []
    Z = len(prompts[0]["targets"])
    foils = {bool(p["versus"]) for p in prompts}
    tail = " - mean(versus)" if foils == {True} else "" if foils == {False} else " - mean(versus, where given)"
    return [f"target {z}{tail}" for z in range(Z)]


def _tables(prompts, folder, levels) -> list[dict]:
    """Per split (prism, whole label): labels [C], values [C] of [n, Z], wholes [n, Z], per-prompt tolerances
    [n, Z], in the prompts' split order. head-source splits (by source index) are not aggregated: prompts
    differ in length; their roles are (head-role)."""
    n = len(prompts)
    if n == 0:
        return []
    keys = [(s["prism"], s["whole"]["label"]) for s in prompts[0]["splits"] if s["prism"] != "head-source"]
    splits = [{(s["prism"], s["whole"]["label"]): s for s in p["splits"]} for p in prompts]
    roles = list(dict.fromkeys(name for p in prompts for name in p["roles"]))
    neurons = read_neurons(folder) if levels.neurons else None
    if neurons is not None and not np.array_equal(neurons[0], [p["index"] for p in prompts]):
        raise InputError(f"{folder}/neurons does not match prompts.jsonl: delete the folder to start over")
    tables = []
    for prism, whole_label in keys:
        got = [s[prism, whole_label] for s in splits]
        table = {"prism": prism, "whole_label": whole_label,
                 "whole": np.array([s["whole"]["values"] for s in got]),
                 "tolerance": np.array([s["tolerance"] for s in got])}
        Z = table["whole"].shape[1]
        if prism == "neurons":
            layer = int(whole_label[1:].split(".")[0])
            table.update(_neuron_table(got, neurons[1][:, layer], layer, levels.neurons))
        else:
            values = [{c["label"]: c["values"] for c in s["components"]} for s in got]
            if prism == "head-role":
                heads = list(dict.fromkeys(label.split(".")[0] for label in values[0]))
                labels = [f"{h}.{r}" for h in heads for r in roles + [OTHER]]
                table["named"] = [sum(r in p["roles"] for p in prompts) if r != OTHER else None
                                  for h in heads for r in roles + [OTHER]]
            else:
                labels = list(values[0])
            table["labels"] = labels
            table["values"] = [np.array([v.get(label, [0.0] * Z) for v in values]) for label in labels]
        tables.append(table)
    return tables


def _neuron_table(got, terms, layer, k) -> dict:
    """A layer's neurons across the data set: the union of the prompts' top-K and the K of largest |mean|, each
    with its exact term in every prompt (terms [n, F, Z] from the side files), and L{l}N.rest for the others."""
    union = {int(c["label"][len(f"L{layer}N"):]) for s in got for c in s["components"]
             if not c["label"].endswith(".rest")}
    mean = terms.astype(np.float64).mean(axis=0)  # [F, Z]
    union |= set(np.argsort(-np.abs(mean).max(axis=1), kind="stable")[:k].tolist())
    chosen = sorted(union)
    rest = np.ones(terms.shape[1], dtype=bool)
    rest[chosen] = False
    values = [terms[:, n].astype(np.float64) for n in chosen] + [terms[:, rest].astype(np.float64).sum(axis=1)]
    return {"labels": [f"L{layer}N{n}" for n in chosen] + [f"L{layer}N.rest"], "values": values}


def top_components(splits, top) -> dict[str, list]:
    """Per prism, the `top` components across the data set with the largest max |mean| over columns (not the
    .rest of the neurons: it is many neurons)."""
    out = {}
    for split in splits:
        for c in split["components"]:
            if not c["label"].endswith(".rest"):
                out.setdefault(split["prism"], []).append({"label": c["label"], "of": split["whole"]["label"],
                                                            **{k: c[k] for k in ("mean", "ci", "same_sign")}})
    return {prism: sorted(rows, key=lambda r: -max(abs(m) for m in r["mean"]))[:top] for prism, rows in out.items()}
