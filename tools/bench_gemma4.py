"""The gemma4 suite of tools/bench.py: refprism against HF transformers' Gemma 4 on the E2B and 26B-A4B shapes.

    python tools/bench.py --suite gemma4 --out docs/performance.md    # E2B and 26B-A4B shapes, T = 7 and 128
    python tools/bench.py --suite gemma4 --quick --out /tmp/perf.md   # tiny-gemma4, 1 run, T = 7: the harness

Each shape is a bf16 random checkpoint (refprism.checkpoints.synth, written once under $TMPDIR/refprism-bench and
reused), measured as the forward suite measures gemma-2b: every measurement in a fresh process (`bench.py --worker
SPEC`), medians over --runs processes, cases interleaved within a run. HF: `AutoModelForCausalLM` (the config's own
class, Gemma4ForCausalLM for gemma4_text), float32, eager, two forwards under no_grad with use_cache=False.
refprism: `refprism.load(dir, dtype="float32", memory=MODE)` for the forward suite's modes (fast, low), two
full-record forwards (`model.run`, every activation kept). The prism set is not run here (the forward suite times
it on gemma-2b). The 1-minute load average (`os.getloadavg`, what `uptime` prints) is read before every child.

Fewer layers than released, when the released shape does not fit: HF holds every weight in float32, which is 20 GB
for E2B (5.1 B parameters, 2.35 B of them the per-layer embedding table) and 104 GB for 26B-A4B; the machine has
24 GiB shared with other work. `reduced_config` keeps every width, the vocabulary, the layer-type pattern (its
period), the KV-sharing split (whole periods of producers, then whole periods of consumers), the double-wide MLP
and the MoE; the per-layer table shrinks with L, as it does in the released model (one 256-wide slice per layer).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# preset -> layers used (of the released count): the largest pattern-preserving count whose float32 copy (HF's,
# and refprism's fast mode) stays near 9.5 GB, so that one process fits beside the other work on 24 GiB
SHAPES = {"gemma-4-e2b": 15, "gemma-4-26b-a4b": 2}
QUICK_SHAPES = {"tiny-gemma4": 7}  # every Gemma 4 feature on, all 7 layers: the harness end to end in seconds
LIMITS = {7: 0.6, 128: 1.0}  # refprism fast forward / HF forward (issue 17's targets, as on Gemma 1)
RSS_LIMIT = 1.0  # refprism peak RSS / HF peak RSS, both modes


# ------------------------------------------------------------------------------------------ shapes


def period_of(layer_types: list[str]) -> int:
    """The length of the layer-type pattern's period: the sliding layers up to and including the first full one."""
    return layer_types.index("full_attention") + 1


def reduced_config(preset: str, layers: int) -> dict:
    """The preset's config.json with `layers` layers and every other dimension kept.

    Layer types: the released list's first `layers` entries (whole periods: 4 sliding + 1 full on E2B, 5 + 1 on
    26B-A4B); below one period, the end of the first period (26B-A4B at 2 layers: sliding, full), so that both
    layer types, their two head widths and their two RoPEs are measured. KV sharing (E2B: 20 of 35 layers share):
    the released share of consumers, rounded to whole periods, with at least one period of producers (the last
    producer of each type feeds the consumers) and one of consumers.

    >>> reduced_config("gemma-4-e2b", 15)["num_kv_shared_layers"]
    10
    """
    from refprism.checkpoints.synth import PRESETS, make_config

    full = PRESETS[preset]
    released, types = full["num_hidden_layers"], full["layer_types"]
    if not 1 <= layers <= released:
        raise ValueError(f"{preset} has {released} layers; cannot use {layers}")
    if layers == released:
        return make_config(preset)
    period = period_of(types)
    over = {"num_hidden_layers": layers,
            "layer_types": types[:layers] if layers >= period else types[period - layers:period]}
    shared = full.get("num_kv_shared_layers", 0)
    if shared:
        if layers < 2 * period or layers % period:
            raise ValueError(f"{preset} shares K, V: use whole periods of {period} layers, at least 2 "
                             f"(producers, then consumers); got {layers}")
        periods = min(max(round(shared / released * layers / period), 1), layers // period - 1)
        over["num_kv_shared_layers"] = periods * period
    return make_config(preset, **over)


def shape_info(bench, preset: str, layers: int) -> dict:
    """What the report says of a shape: layers used / released, parameters used / released, KV sharing."""
    from refprism.checkpoints.synth import make_config

    config, released = reduced_config(preset, layers), make_config(preset)
    return {"preset": preset, "layers": layers, "released_layers": released["num_hidden_layers"],
            "parameters": bench.n_parameters(config), "released_parameters": bench.n_parameters(released),
            "kv_shared": config.get("num_kv_shared_layers", 0),
            "released_kv_shared": released.get("num_kv_shared_layers", 0),
            "layer_types": "".join("F" if t == "full_attention" else "S" for t in config["layer_types"])}


def checkpoint_dir(preset: str, layers: int) -> Path:
    return Path(tempfile.gettempdir()) / "refprism-bench" / f"{preset}-L{layers}-bf16"


# ------------------------------------------------------------------------------------------ the suite


def run(bench, shapes: dict, lengths: list[int], runs: int, modes: list[str], skip_hf: bool,
        timeout: float) -> dict:
    """Every child of the suite: {"shapes": [shape_info ...], "results": {(preset, case, T): [child ...]},
    "load": (1-minute load average at the start, at the end)}."""
    infos, folders = [], {}
    for preset, layers in shapes.items():
        config = reduced_config(preset, layers)
        folders[preset] = bench.ensure_checkpoint(checkpoint_dir(preset, layers), preset, config=config)
        infos.append(shape_info(bench, preset, layers))
    cases = ([] if skip_hf else ["hf"]) + [f"refprism-{m}" for m in modes]
    results: dict = {}
    start_load = os.getloadavg()[0]
    for _run in range(runs):  # cases interleaved within a run, as in the forward suite
        for preset, folder in folders.items():
            V = json.loads((folder / "config.json").read_text())["vocab_size"]
            base = bench.base_ids(folder)
            for T in lengths:
                ids = bench.prompt_ids(base, T, V)
                text = bench.PROMPT if T == len(base) else None
                for case in cases:
                    spec = {**bench.case_specs(case, folder, ids, text), "prisms": False}
                    load = os.getloadavg()[0]
                    child = bench.run_child(bench.child_argv(spec), timeout=timeout)
                    child["load1"] = load
                    results.setdefault((preset, case, T), []).append(child)
                    bench.log(f"  {preset} {case} T={T}: " + (
                        f"{child['failed']} {child.get('stderr', '')}" if "failed" in child else
                        f"load {bench.fmt_seconds(child['load_s'])} s, forward {bench.fmt_seconds(child['forward1_s'])}"
                        f" / {bench.fmt_seconds(child['forward2_s'])} s, peak RSS {bench.fmt_gb(child['peak_rss'])} GB"
                        f", load avg {load:.2f}"))
    return {"shapes": infos, "results": results, "cases": cases, "lengths": list(lengths),
            "load": (start_load, os.getloadavg()[0])}


# ------------------------------------------------------------------------------------------ the report


def _label(preset: str) -> str:
    return {"gemma-4-e2b": "E2B", "gemma-4-26b-a4b": "26B-A4B", "tiny-gemma4": "tiny-gemma4"}.get(preset, preset)


def shapes_table(bench, infos: list[dict]) -> list[str]:
    lines = ["| shape | layers used / released | layer types | KV-sharing layers used / released | parameters used "
             "| released | float32 bytes used | released |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in infos:
        lines.append(f"| {_label(s['preset'])} | {s['layers']} / {s['released_layers']} | {s['layer_types']} | "
                     f"{s['kv_shared']} / {s['released_kv_shared']} | {s['parameters'] / 1e9:.3f} B | "
                     f"{s['released_parameters'] / 1e9:.3f} B | {bench.fmt_bytes(4 * s['parameters'])} | "
                     f"{bench.fmt_bytes(4 * s['released_parameters'])} |")
    return lines


def results_table(bench, data: dict) -> list[str]:
    """Per shape, T and case: median load, forward 1, forward 2 (steady) with its ratio to HF, peak RSS and its
    ratio to HF's (both after the forwards)."""
    res = data["results"]
    lines = ["| shape | T | case | load s | forward 1 s | forward 2 s | forward 2 / HF | peak RSS GB | RSS / HF |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in data["shapes"]:
        for T in data["lengths"]:
            hf = res.get((s["preset"], "hf", T), [])
            hf_t, hf_r = bench.summarize(hf, "forward2_s")[0], bench.summarize(hf, "rss_forward")[0]
            for case in data["cases"]:
                children = res.get((s["preset"], case, T), [])
                load, note = bench.summarize(children, "load_s")
                f1, f2 = bench.summarize(children, "forward1_s")[0], bench.summarize(children, "forward2_s")[0]
                rss = bench.summarize(children, "rss_forward")[0]
                mine = case != "hf"
                cell = note if load is None and note else bench.fmt_seconds(load) + (f" ({note})" if note else "")
                lines.append(f"| {_label(s['preset'])} | {T} | {case} | {cell} | {bench.fmt_seconds(f1)} | "
                             f"{bench.fmt_seconds(f2)} | {bench.fmt_ratio(bench.ratio(f2, hf_t)) if mine else '—'} | "
                             f"{bench.fmt_gb(rss)} | {bench.fmt_ratio(bench.ratio(rss, hf_r)) if mine else '—'} |")
    return lines


def targets(bench, data: dict) -> list[tuple[str, str, str, str]]:
    """(what, measured, limit, PASS / FAIL / n/a): fast forward 2 / HF at T = 7 and 128; peak RSS / HF per mode.

    A refprism case that failed is a FAIL; a missing HF reference is n/a."""
    res, rows = data["results"], []

    def row(what, preset, case, metric, T, limit):
        value, note = bench.summarize(res.get((preset, case, T), []), metric)
        ref, _ = bench.summarize(res.get((preset, "hf", T), []), metric)
        if value is None:
            return (what, note or "not measured", f"<= {limit}x", "FAIL" if note else "n/a")
        r = bench.ratio(value, ref)
        return (what, bench.fmt_ratio(r), f"<= {limit}x", bench.verdict(r, limit))

    for s in data["shapes"]:
        p, name = s["preset"], _label(s["preset"])
        for T in data["lengths"]:
            if T in LIMITS and "refprism-fast" in data["cases"]:
                rows.append(row(f"{name} fast forward / HF forward, T={T}", p, "refprism-fast", "forward2_s", T,
                                LIMITS[T]))
            for case in data["cases"]:
                if case != "hf":
                    rows.append(row(f"{name} {case.split('-', 1)[1]} peak RSS / HF peak RSS, T={T}", p, case,
                                    "rss_forward", T, RSS_LIMIT))
    return rows


def raw_table(bench, data: dict) -> list[str]:
    lines = ["| shape | case | T | run | load avg (1 min) | load s | forward 1 s | forward 2 s | peak RSS GB | "
             "top-1 | note |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (preset, case, T), children in data["results"].items():
        for i, c in enumerate(children, 1):
            head = f"| {_label(preset)} | {case} | {T} | {i} | {c.get('load1', 0):.2f} |"
            if "failed" in c:
                note = f"{c['failed']}: {c.get('stderr', '')}".replace("|", "/")
                lines.append(head + f"  |  |  |  |  |  | {note} |")
                continue
            lines.append(head + f" {bench.fmt_seconds(c.get('load_s'))} | {bench.fmt_seconds(c.get('forward1_s'))} | "
                                f"{bench.fmt_seconds(c.get('forward2_s'))} | {bench.fmt_gb(c.get('peak_rss'))} | "
                                f"{c['top'][0] if c.get('top') else '—'} | |")
    return lines


def agreement(data: dict) -> list[str]:
    """Per shape and T: whether each refprism case's top-1 last-position token is HF's (first run of each)."""
    out = []
    for s in data["shapes"]:
        for T in data["lengths"]:
            hf = [c for c in data["results"].get((s["preset"], "hf", T), []) if "top" in c]
            if not hf:
                continue
            parts = []
            for case in data["cases"]:
                mine = [c for c in data["results"].get((s["preset"], case, T), []) if "top" in c]
                if case != "hf" and mine:
                    parts.append(f"{case} {'same' if mine[0]['top'][0] == hf[0]['top'][0] else 'DIFFERENT'}")
            out.append(f"- {_label(s['preset'])}, T={T}: " + ", ".join(parts))
    return out


def render(bench, data: dict, runs: int) -> list[str]:
    start, end = data["load"]
    out = ["## Gemma 4: E2B and 26B-A4B shapes against HF (issue 17)", "",
           "Random bf16 checkpoints (`refprism.checkpoints.synth`, `tools/bench_gemma4.py`), float32 compute on both "
           "sides. HF: `AutoModelForCausalLM` (Gemma4ForCausalLM), eager attention, `use_cache=False`, under "
           "`no_grad`. refprism: `refprism.load(dir, dtype=\"float32\", memory=MODE)`, `model.run(prompt)` recording "
           "every activation. Each number is the median of "
           f"{runs} fresh process(es); forward 2 is the second forward (the steady state) and the targets use it; "
           "peak RSS is `ru_maxrss` after the forwards. Prompts as in the forward suite (T = 7: the capital-city "
           "text; longer: its ids extended by fixed pseudo-random ids).", "",
           "### Shapes", ""]
    out += shapes_table(bench, data["shapes"])
    reduced = [s for s in data["shapes"] if s["layers"] < s["released_layers"]]
    if reduced:
        out += ["", "Fewer layers than released: HF holds every weight in float32, "
                + ", ".join(f"{bench.fmt_bytes(4 * s['released_parameters'])} for {_label(s['preset'])}"
                            for s in reduced)
                + ", and the machine has 24 GiB shared with other work; each shape uses the largest layer count that "
                "keeps its structure and stays near 10 GB a process. Every width, the vocabulary, the MoE (all "
                "experts, top-k), the double-wide consumer MLPs and both layer types (their head widths and RoPEs) "
                "are the released ones; the layer-type period and the KV-sharing split are kept in whole periods "
                "(26B-A4B at 2 layers: one sliding and one full layer, the end of its 6-layer period). The ratio to "
                "HF is per forward of the same shape on both sides: each layer of a type does the same work on both "
                "sides, so a released-depth forward is the same sum with more layers; what changes is the weight "
                "of the embedding and the [T, V] unembedding (V = 262,144) in the total, which is larger here than "
                "in the released depth."]
    out += ["", "### Results", ""] + results_table(bench, data)
    agree = agreement(data)
    if agree:
        out += ["", "Top-1 token at the last position against HF (first run):", ""] + agree
    out += ["", "### Targets", "", "| target | measured | limit | result |", "| --- | ---: | ---: | --- |"]
    out += [f"| {w} | {m} | {lim} | {r} |" for w, m, lim, r in targets(bench, data)]
    m = bench.machine()
    out += ["", f"Load average (1 min, `os.getloadavg`, as `uptime` prints it; {os.cpu_count()} cores, shared): "
                f"{start:.2f} at the start, {end:.2f} at the end; each child's in the raw runs. Versions: torch "
                f"{m['torch']}, transformers {m['transformers']}, NumPy {m['NumPy']} ({m['NumPy BLAS']}).", "",
            "### Raw runs", ""] + raw_table(bench, data)
    return out
