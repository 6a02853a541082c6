#!/usr/bin/env python3
"""refprism's transcoder graph beside circuit-tracer's own, on a tiny random Gemma 2 with random transcoders.

circuit-tracer pins TransformerLens < 3 and transformers <= 4.57.3, which refprism's environment does not have, so
it runs in an environment of its own (a venv that sees the system's torch; numpy 1.x and a matching pyarrow):

    python tools/crosscheck_circuit_tracer.py --make-env /tmp/ct-env        # once: pip into a venv
    python tools/crosscheck_circuit_tracer.py --env /tmp/ct-env [--work DIR] [--seed 0]
    python tools/crosscheck_circuit_tracer.py --env /tmp/ct-env --timing [--runs 3] [--shape ...]   # speed, memory

The first half (this interpreter, refprism) writes the checkpoint (refprism.checkpoints.synth, tiny-gemma2), random
JumpReLU transcoders in circuit-tracer's safetensors layout (W_enc [F, D], activation_function.threshold) reading
ln2.hook_normalized and writing hook_mlp_out as GemmaScope's do, and refprism's graph. The second half (the env's
python running this file with --side ct) loads the checkpoint with transformers, converts it with TransformerLens'
own Gemma conversion, builds circuit-tracer's ReplacementModel with load_transcoder_set, runs `attribute` in float64
and saves its adjacency matrix. Then every edge circuit-tracer has (features, errors, tokens, logits) is compared
with refprism's edge between the same nodes; refprism's extra edges must be only what circuit-tracer leaves out by
its conventions (the bias nodes, and the BOS error it zeroes). circuit-tracer's edges are float32 numbers (its
adjacency is float32 even for a float64 model), so each must be refprism's float64 edge to within float32's
rounding: |difference| <= 2^-23 (|edge| + 1e-10 max |edge|). TransformerLens' Gemma conversion adds the norms' 1 in
float32; the float64 sum replaces it here, so the two forwards agree to ~1e-15. Prints the max differences and
OK / NOT OK (exit 0 / 1).

--timing: the issue's speed target, side by side. One random Gemma 2 shape (TIMING_SHAPE, overridable), random
JumpReLU transcoders (same layout and hooks as above, float32) and one prompt, written once; then each side runs as
a process of its own, in float32, with the same node budget (refprism's max_nodes = circuit-tracer's
max_feature_nodes), batch size and update interval, --runs times, alternating which side goes first. Each process
reports its load time, its graph time (refprism.graph vs circuit-tracer's attribute; pruning is not timed on
either side) and its peak RSS (ru_maxrss: imports, load and graph), the RSS once the model and transcoders are
loaded, and the peak during the graph (VmHWM after a reset at that point: /proc/self/clear_refs), whose
difference is what the graph itself adds. Prints the medians, the
ratios and `uptime`'s load averages beside each run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

F = 96  # features per layer
# --timing's default shape: Gemma 2's layout (sliding / global, both soft-caps, GQA) at a size two CPU cores run
# in seconds to minutes per side; HF config keys, as checkpoints.synth.make_config takes them
TIMING_SHAPE = {"num_hidden_layers": 6, "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096, "sliding_window": 16,
                "query_pre_attn_scalar": 64, "max_position_embeddings": 512}


def make_env(env: Path) -> int:
    """A venv that sees the system's packages (torch) with circuit-tracer's pins installed over them."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["circuit-tracer==0.5.0", "transformer-lens<3", "transformers<=4.57.3"], check=True)
    subprocess.run(pip + ["pyarrow==21.0.0"], check=True)  # datasets' pyarrow, built for numpy 1.x too
    return 0


def refprism_side(work: Path, env: Path, seed: int) -> int:
    import yaml
    from safetensors.numpy import save_file

    import refprism
    from refprism.checkpoints.synth import make_config, write_checkpoint

    hf = make_config("tiny-gemma2")
    ckpt = write_checkpoint(work / "model", hf, dtype="float32", seed=seed)
    model = refprism.load(ckpt, dtype="float64")
    cfg = model.config
    rng = np.random.default_rng(seed)
    D = cfg.d_model
    tc_dir = work / "transcoders"
    tc_dir.mkdir(parents=True, exist_ok=True)
    for l in range(cfg.n_layers):  # float32 values: both sides read the same numbers
        w = {"W_enc": (rng.normal(size=(F, D)) * 3 / np.sqrt(D)).astype(np.float32),
             "W_dec": (rng.normal(size=(F, D)) * 0.3).astype(np.float32),
             "b_enc": (rng.normal(size=F) * 0.2).astype(np.float32),
             "b_dec": (rng.normal(size=D) * 0.2).astype(np.float32),
             "activation_function.threshold": (np.abs(rng.normal(size=F)) * 0.4).astype(np.float32)}
        save_file(w, str(tc_dir / f"layer_{l}.safetensors"))
    (tc_dir / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out"}))
    ids = [2] + list(rng.integers(3, cfg.vocab_size, 6))  # BOS first, as circuit-tracer expects
    g = refprism.graph(model, np.array(ids), transcoders=tc_dir)
    spec = {"checkpoint": str(ckpt), "transcoders": str(tc_dir), "ids": [int(i) for i in ids],
            "n_layers": cfg.n_layers, "d_model": D, "d_head": cfg.d_head, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "d_mlp": cfg.d_mlp, "vocab": cfg.vocab_size,
            "sliding": [bool(cfg.is_sliding(l)) for l in range(cfg.n_layers)], "window": cfg.sliding_window,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "attn_softcap": cfg.attn_softcap,
            "final_softcap": cfg.final_softcap, "eps": cfg.rms_norm_eps, "rope_theta": hf["rope_theta"],
            "out": str(work / "ct.npz")}
    (work / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([str(env / "bin" / "python"), __file__, "--side", "ct", "--work", str(work)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:])
        print("NOT OK: circuit-tracer's side failed")
        return 1
    return compare(g, np.load(work / "ct.npz", allow_pickle=False))


def ct_side(work: Path) -> int:
    import torch
    from circuit_tracer.attribution.attribute import attribute

    s = json.loads((work / "spec.json").read_text())
    model = _ct_model(s, torch.float64)
    tokens = torch.tensor(s["ids"])
    with torch.no_grad():
        logits = model(tokens[None])[0, -1]
    g = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64, verbose=False)
    np.savez(s["out"], adjacency=g.adjacency_matrix.double().numpy(), active=g.active_features.numpy(),
             selected=g.selected_features.numpy(), logit_ids=np.array([t.vocab_idx for t in g.logit_targets]),
             logits=logits.double().numpy())
    return 0


def compare(g, ct) -> int:
    """circuit-tracer's adjacency [targets, sources] against refprism's edges between the same nodes."""
    A, active, selected = ct["adjacency"], ct["active"], ct["selected"]
    L, T = g.model.config.n_layers, g.read_at + 1
    feats = active[selected]
    names = [f"L{l}F{f}@{t}" for l, t, f in feats]
    names += [f"L{l}.err@{t}" for l in range(L) for t in range(T)]
    names += [f"E@{t}" for t in range(T)] + [f"logit{int(i)}" for i in ct["logit_ids"]]
    ours = [g.label(i) if g.kind[i] != "logit" else f"logit{int(g.index[i])}" for i in range(g.n)]
    index = {name: i for i, name in enumerate(ours)}
    missing = [n for n in names if n not in index and not n.endswith(".err@0")]
    raw = g.run.record["logits_uncapped"][g.read_at]
    print(f"nodes: circuit-tracer {len(names)} ({len(feats)} features), refprism {g.n} ({g.counts[0]} features, "
          f"{int((g.kind == 'bias').sum())} bias nodes); logits {sorted(map(int, ct['logit_ids']))} vs "
          f"{sorted(map(int, g.index[g.kind == 'logit']))}")
    ok = not missing and sorted(map(int, ct["logit_ids"])) == sorted(map(int, g.index[g.kind == "logit"]))
    if missing:
        print(f"NOT OK: nodes circuit-tracer has and refprism lacks: {missing[:5]}")
    dense = np.zeros((g.n, g.n))
    dense[g.rows, g.cols] = g.values
    worst, count, scale = 0.0, 0, float(np.abs(g.values).max())
    pairs, by_kind, rel = [], {}, 0.0
    for a, ta in enumerate(names):
        for b, sb in enumerate(names):
            if A[a, b] == 0 and (ta not in index or sb not in index):
                continue
            if sb.endswith(".err@0"):  # circuit-tracer zeroes the BOS error; refprism keeps it as a node
                continue
            mine = dense[index[ta], index[sb]] if ta in index and sb in index else 0.0
            d = abs(mine - A[a, b])
            count += 1
            rel = max(rel, d / (abs(A[a, b]) + 1e-10 * scale))  # circuit-tracer stores its edges in float32
            kind = "error" if ".err@" in sb else "token" if sb.startswith("E@") else "feature"
            by_kind[kind] = max(by_kind.get(kind, 0.0), d)
            if d > worst:
                worst, pairs = d, [(ta, sb, mine, float(A[a, b]))]
    print(f"edges compared: {count}; largest |edge| {scale:.3g}; max |refprism - circuit-tracer| {worst:.3e}")
    print("  by source: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(by_kind.items())))
    for ta, sb, mine, theirs in pairs:
        print(f"  worst: {ta} <- {sb}: refprism {mine:.10g}, circuit-tracer {theirs:.10g}")
    logit_diff = np.abs(g.run.record["logits"][g.read_at] - ct["logits"]).max()
    print(f"final logits: max |refprism - TransformerLens| {logit_diff:.3e} (pre-cap range {raw.min():.3g} .. "
          f"{raw.max():.3g})")
    f32 = bool(np.all(A[A != 0].astype(np.float32) == A[A != 0]))
    print(f"circuit-tracer's edges are float32 numbers: {f32}; max |difference| / (|edge| + 1e-10 max|edge|) "
          f"{rel:.2e} (float32's half ulp: {2.0 ** -24:.2e})")
    ok &= rel <= 2.0 ** -23  # each edge to one float32 rounding of refprism's float64 value
    extra = {ours[i].split("@")[0].split(".")[-1] for i in set(g.cols.tolist())
             if ours[i] not in names or ours[i].endswith(".err@0")}
    print(f"refprism's sources circuit-tracer has not: {sorted(extra)}")
    ok &= extra <= {"b_dec", "b_enc", "err"}
    print("OK" if ok else "NOT OK")
    return 0 if ok else 1


def _write_transcoders(tc_dir: Path, n_layers: int, D: int, F_: int, rng) -> None:
    """--timing's transcoders: pre = h W_enc + b_enc has a standard deviation near 3 (h: the normalized residual),
    the thresholds 5 + |N(0, 0.4^2)| leave about 4% of the features active (an L0 near 80 of 2,048 per position
    at the default shape, GemmaScope's range)."""
    tc_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    for l in range(n_layers):  # float32 values: both sides read the same numbers
        w = {"W_enc": (rng.normal(size=(F_, D)) * 3 / np.sqrt(D)).astype(np.float32),
             "W_dec": (rng.normal(size=(F_, D)) * 0.3 / np.sqrt(F_ / 96)).astype(np.float32),
             "b_enc": (rng.normal(size=F_) * 0.2).astype(np.float32),
             "b_dec": (rng.normal(size=D) * 0.2).astype(np.float32),
             "activation_function.threshold": (np.abs(rng.normal(size=F_)) * 0.4 + 5.0).astype(np.float32)}
        save_file(w, str(tc_dir / f"layer_{l}.safetensors"))
    (tc_dir / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                                        "feature_output_hook: hook_mlp_out\n")


def timing(work: Path, env: Path, args) -> int:
    """Write one shape, transcoders and prompt, then time each side in its own process, alternating (module doc)."""
    import os
    import statistics

    from refprism.checkpoints.synth import make_config, write_checkpoint

    shape = dict(TIMING_SHAPE)
    for kv in args.shape or []:
        k, v = kv.split("=", 1)
        shape[k] = int(v)
    hf = make_config("tiny-gemma2", **shape)
    ckpt = write_checkpoint(work / "model", hf, dtype="float32", seed=args.seed)
    rng = np.random.default_rng(args.seed)
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    _write_transcoders(work / "transcoders", L, D, args.features, rng)
    ids = [2] + [int(i) for i in rng.integers(3, hf["vocab_size"], args.tokens - 1)]  # BOS first
    spec = {"checkpoint": str(ckpt), "transcoders": str(work / "transcoders"), "ids": ids, "n_layers": L,
            "d_model": D, "d_head": hf["head_dim"], "n_heads": hf["num_attention_heads"],
            "n_kv_heads": hf["num_key_value_heads"], "d_mlp": hf["intermediate_size"], "vocab": hf["vocab_size"],
            "sliding": [l % 2 == 0 for l in range(L)], "window": hf["sliding_window"],
            "query_pre_attn_scalar": hf["query_pre_attn_scalar"], "attn_softcap": hf["attn_logit_softcapping"],
            "final_softcap": hf["final_logit_softcapping"], "eps": hf["rms_norm_eps"], "rope_theta": hf["rope_theta"],
            "max_nodes": args.max_nodes, "batch_size": args.batch_size, "update_interval": 4, "dtype": "float32"}
    (work / "spec.json").write_text(json.dumps(spec))
    print(f"shape: {json.dumps(shape)}; {args.features} features per layer; T = {args.tokens}; max_nodes "
          f"{args.max_nodes}, batch {args.batch_size}, update interval 4; float32; runs {args.runs}")
    sides = {"refprism": [sys.executable, __file__, "--side", "refprism-time", "--work", str(work)],
             "circuit-tracer": [str(env / "bin" / "python"), __file__, "--side", "ct-time", "--work", str(work)]}
    renv = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.blas_threads)}  # docs/performance.md: one BLAS thread
    results = {k: [] for k in sides}
    for r in range(args.runs):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            load = os.getloadavg()
            out = subprocess.run(sides[side], capture_output=True, text=True,
                                 env=renv if side == "refprism" else os.environ)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                print(f"NOT OK: {side}'s timing run failed")
                return 1
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["load_before"] = [round(x, 2) for x in load]
            res["load_after"] = [round(x, 2) for x in os.getloadavg()]
            results[side].append(res)
            print(f"run {r + 1} {side:>14}: load {res['load_s']:6.2f} s, graph {res['graph_s']:7.2f} s, peak RSS "
                  f"{res['rss_process_mib']:6.0f} MiB (loaded {res['rss_loaded_mib']:5.0f}, graph "
                  f"{res['rss_graph_mib']:6.0f} MiB); {res['nodes']}; "
                  f"uptime load {res['load_before']} -> {res['load_after']}", flush=True)
    keys = ("load_s", "graph_s", "rss_process_mib", "rss_graph_mib", "rss_loaded_mib")
    med = {side: {k: statistics.median(x[k] for x in v) for k in keys} for side, v in results.items()}
    a, b = med["refprism"], med["circuit-tracer"]
    print(f"medians of {args.runs}: refprism graph {a['graph_s']:.2f} s, peak RSS {a['rss_process_mib']:.0f} MiB "
          f"(graph phase {a['rss_graph_mib']:.0f}); circuit-tracer attribute {b['graph_s']:.2f} s, peak RSS "
          f"{b['rss_process_mib']:.0f} MiB (graph phase {b['rss_graph_mib']:.0f})")
    speed, rss = b["graph_s"] / a["graph_s"], a["rss_process_mib"] / b["rss_process_mib"]
    grown = {k: v["rss_graph_mib"] - v["rss_loaded_mib"] for k, v in med.items()}
    print(f"refprism is {speed:.2f}x faster (target >= 2); its peak RSS is {rss:.2f}x circuit-tracer's (target <= "
          f"0.5); the graph's own growth over the loaded process: refprism {grown['refprism']:.0f} MiB, "
          f"circuit-tracer {grown['circuit-tracer']:.0f} MiB ({grown['refprism'] / grown['circuit-tracer']:.2f}x)")
    (work / "timing.json").write_text(json.dumps({"spec": spec, "shape": shape, "features": args.features,
                                                  "runs": results, "medians": med}, indent=1))
    print("target met" if speed >= 2 and rss <= 0.5 else "target missed")
    return 0


def _rss_mib() -> tuple[float, float]:
    """(ru_maxrss of the process, VmHWM since the last reset) in MiB."""
    import resource

    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm / 1024


def _reset_peak() -> float:
    """Reset the peak RSS (VmHWM) to the current RSS; returns that RSS in MiB (the loaded model's and runtime's)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024


def refprism_time(work: Path) -> int:
    import time

    t0 = time.perf_counter()
    import refprism
    from refprism.graphs.transcoders import read_transcoders

    s = json.loads((work / "spec.json").read_text())
    model = refprism.load(s["checkpoint"], dtype=s["dtype"])
    ts = read_transcoders(s["transcoders"])
    ids = np.array(s["ids"])
    t1 = time.perf_counter()
    base = _reset_peak()
    g = refprism.graph(model, ids, transcoders=ts, max_nodes=s["max_nodes"], batch_size=s["batch_size"],
                       update_interval=s["update_interval"])
    t2 = time.perf_counter()
    proc, graph_peak = _rss_mib()
    print(json.dumps({"side": "refprism", "load_s": t1 - t0, "graph_s": t2 - t1, "rss_process_mib": proc,
                      "rss_graph_mib": graph_peak, "rss_loaded_mib": base, "passes": g.passes,
                      "nodes": f"{g.n_neurons} active features, {g.explored} explored, {g.n} nodes, "
                               f"{len(g.values)} edges, {g.passes} passes"}))
    return 0


def _ct_model(s, dtype):
    """circuit-tracer's TransformerLens replacement model of the spec's checkpoint and transcoders."""
    import torch
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(s["checkpoint"], torch_dtype=dtype, attn_implementation="eager")
    cfg = HookedTransformerConfig.from_dict({
        "n_layers": s["n_layers"], "d_model": s["d_model"], "n_ctx": max(128, len(s["ids"])), "d_head": s["d_head"],
        "model_name": "gemma-2-tiny-random", "n_heads": s["n_heads"], "d_mlp": s["d_mlp"],
        "act_fn": "gelu_pytorch_tanh", "d_vocab": s["vocab"], "d_vocab_out": s["vocab"], "eps": s["eps"],
        "use_attn_result": False, "use_attn_scale": True, "attn_scale": float(s["query_pre_attn_scalar"]) ** 0.5,
        "use_split_qkv_input": False, "use_hook_mlp_in": False, "use_attn_in": False, "use_local_attn": True,
        "original_architecture": "Gemma2ForCausalLM", "window_size": s["window"],
        "attn_types": ["local" if x else "global" for x in s["sliding"]], "normalization_type": "RMS",
        "positional_embedding_type": "rotary", "rotary_dim": s["d_head"], "rotary_base": s["rope_theta"],
        "final_rms": True, "gated_mlp": True, "n_key_value_heads": s["n_kv_heads"], "default_prepend_bos": False,
        "use_normalization_before_and_after": True, "attn_scores_soft_cap": s["attn_softcap"],
        "output_logits_soft_cap": s["final_softcap"], "rotary_adjacent_pairs": False, "dtype": dtype,
        "device": "cpu", "init_weights": False, "tokenizer_prepends_bos": True,
    })
    tok = AutoTokenizer.from_pretrained(s["checkpoint"])
    model = TransformerLensReplacementModel(cfg, tokenizer=tok)
    sd = convert_gemma_weights(hf, cfg)
    norms = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm",
             "ln2_post": "post_feedforward_layernorm"}
    for l in range(s["n_layers"]):  # TransformerLens adds Gemma's 1 to the norm weights in float32: here in dtype
        for tl_name, hf_name in norms.items():
            sd[f"blocks.{l}.{tl_name}.w"] = getattr(hf.model.layers[l], hf_name).weight.to(dtype) + 1
    sd["ln_final.w"] = hf.model.norm.weight.to(dtype) + 1
    model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    del hf, sd
    paths = {l: str(Path(s["transcoders"]) / f"layer_{l}.safetensors") for l in range(s["n_layers"])}
    ts = load_transcoder_set(paths, scan="refprism-random", feature_input_hook="ln2.hook_normalized",
                             feature_output_hook="hook_mlp_out", device=torch.device("cpu"), dtype=dtype,
                             lazy_encoder=False, lazy_decoder=False)
    model._configure_replacement_model(ts)
    return model


def ct_time(work: Path) -> int:
    import time

    t0 = time.perf_counter()
    import torch
    from circuit_tracer.attribution.attribute import attribute

    s = json.loads((work / "spec.json").read_text())
    model = _ct_model(s, getattr(torch, s["dtype"]))
    tokens = torch.tensor(s["ids"])
    t1 = time.perf_counter()
    base = _reset_peak()
    g = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=s["batch_size"],
                  max_feature_nodes=s["max_nodes"], update_interval=s["update_interval"], verbose=False)
    t2 = time.perf_counter()
    proc, graph_peak = _rss_mib()
    n = g.adjacency_matrix.shape[0]
    print(json.dumps({"side": "circuit-tracer", "load_s": t1 - t0, "graph_s": t2 - t1, "rss_process_mib": proc,
                      "rss_graph_mib": graph_peak, "rss_loaded_mib": base,
                      "nodes": f"{len(g.active_features)} active features, {len(g.selected_features)} explored, "
                               f"{n} nodes, {int((g.adjacency_matrix != 0).sum())} edges"}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-env", type=Path, default=None, metavar="DIR")
    ap.add_argument("--env", type=Path, default=None, metavar="DIR", help="the environment --make-env made")
    ap.add_argument("--work", type=Path, default=Path("/tmp/refprism-ct-crosscheck"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing", action="store_true", help="time both sides, each in its own process (module doc)")
    ap.add_argument("--runs", type=int, default=3, help="--timing: runs of each side, alternating (median)")
    ap.add_argument("--shape", nargs="*", metavar="KEY=INT", help="--timing: HF config keys over TIMING_SHAPE")
    ap.add_argument("--features", type=int, default=2048, help="--timing: transcoder features per layer")
    ap.add_argument("--tokens", type=int, default=24, help="--timing: prompt length (BOS first)")
    ap.add_argument("--max-nodes", type=int, default=1024, help="--timing: the node budget of both sides")
    ap.add_argument("--batch-size", type=int, default=256, help="--timing: rows of one backward pass, both sides")
    ap.add_argument("--blas-threads", type=int, default=1, help="--timing: refprism's OPENBLAS_NUM_THREADS (1)")
    ap.add_argument("--side", choices=["ct", "ct-time", "refprism-time"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_env:
        return make_env(args.make_env)
    if args.side == "ct":
        return ct_side(args.work)
    if args.side == "ct-time":
        return ct_time(args.work)
    if args.side == "refprism-time":
        return refprism_time(args.work)
    if args.env is None:
        ap.error("give --env DIR (made by --make-env DIR)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.timing:
        return timing(args.work, args.env, args)
    return refprism_side(args.work, args.env, args.seed)


if __name__ == "__main__":
    sys.exit(main())
