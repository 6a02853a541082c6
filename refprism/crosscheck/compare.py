"""`refprism.compare`: check another Gemma implementation against the reference, site by site, and name the first
op that is wrong and what the mistake probably is.

The other side arrives as a `capture.Capture` (HF transformers live, TransformerLens, llama.cpp, or a dump file,
all in refprism's names and layout). Four refprism passes over the same tokens do the rest:

    R  reference       refprism in float64 on the checkpoint's weights                         what every site should be
    P  replay          float64, each site's value replaced by the other side's before it      local error = |P - theirs|
                       flows on (`forward`'s edit hook): every op runs on the other side's
                       inputs, so its error is that op's alone
    F  honest run      an honest implementation at the other side's dtype (`Profile`)          floor = |F - R|
    Q  honest replay   the same, each op run on R's values                                     local floor = |Q - R|

A site *diverges* when its error exceeds its floor; the *first wrong op* is the first site, in forward order,
whose local error exceeds its local floor, even when every later site differs too (their values flow on in P, so
a mistake does not spread into the local errors after it). At the first wrong op, each catalogued mistake
(`CATALOGUE`: a variant of that op, computed from the inputs P recorded) is checked against the other side there;
those that reproduce it within the floor are the diagnosis.

Metrics of a site, a = the other side's array, b = the reference's (R, or P for the local error), over the
compared elements (all of them, except the scores: only the sources a query may see, since masked scores are
the mask's value in some implementations and are never read):

    max_abs  = max |a - b|                          max_rel = max_abs / max |b|   (relative to the site's scale)
    nmse_db  = 10 log10(sum (a - b)^2 / sum b^2)    cosine  = sum a b / (|a| |b|)
    worst    = argmax |a - b|, as indices in the site's axis letters (T position, N head, H channel, ...)
    logits only: top-k overlap |topk(a[t]) & topk(b[t])| / k; KL(softmax(b[t]) || softmax(a[t])) in nats;
                 argmax agreement over positions

Floors (`floors`): floor = SAFETY * max|F - R| + SLACK * u * max|R|, with u the unit roundoff of the other
side's dtype (docs/compare.md says why these constants).
"""

from __future__ import annotations

import math

import numpy as np

from refprism.crosscheck.capture import Capture
from refprism.crosscheck.catalogue import _token_diagnosis, diagnose
from refprism.crosscheck.floors import (
    _GGML_DTYPE,
    SAFETY,
    SLACK,
    Profile,
    _compared,
    compared_mask,
    errors,
    logit_metrics,
    max_abs_error,
    profile_of,
    summary_errors,
)
from refprism.crosscheck.replay import _run_all, _Runs
from refprism.crosscheck.result import CompareResult, SiteResult
from refprism.errors import InputError
from refprism.gemma.record import expected_shapes, symbolic_shapes

# ------------------------------------------------------------------------------------------------ compare


def compare(model, prompt=None, *, against, names=None, dtype=None, top_k: int = 5,
            kv_cache: str | None = None, llama_cpp=None) -> CompareResult:
    """Check another Gemma implementation against refprism; see the module docstring and docs/compare.md.

    model:   a refprism Model (any dtype: the reference runs in float64 on its weights) or a path / hub id
    prompt:  text or token ids; None takes the token ids the other side ran (a dump or a Capture holds them)
    against: "hf" (HF transformers live on the model's directory), an HF model object in memory, "tl"
             (TransformerLens' Bridge on the model's directory), "llama.cpp" (the model must be a .gguf file; text
             is tokenized by llama.cpp), a dump file (.npz / .safetensors), or a Capture
    names:   a dump's naming scheme: "refprism" (default), "hf", "tl", "llama.cpp", or a JSON name map (path)
    dtype:   the other side's arithmetic (float32, bfloat16, float16, float64): for "hf" / "tl" the dtype it runs
             in (default float32); for a dump or capture the default is the dtype it reports. llama.cpp computes
             in float32 with its own roundings (`GgmlArithmetic`, from the GGUF's weight types and kv_cache)
    kv_cache: llama.cpp's KV cache type, "f16" (its default) or "f32": the one it runs with (--against
             llama.cpp) or ran with (a dump in llama.cpp's names)
    llama_cpp: with against="llama.cpp", a folder holding your own build's llama-debug, run instead of the cached
             build (tools/build_llama_cpp.py); every site, the logits too, is then what it prints
    """
    from refprism.model import Model, load

    if not isinstance(model, Model):
        model = load(model)
    cfg = model.config
    llama = against == "llama.cpp" or (names == "llama.cpp" and not isinstance(against, Capture))
    if kv_cache is not None and not llama:
        raise InputError("--kv-cache is llama.cpp's: it applies to --against llama.cpp and to dumps with --names "
                         "llama.cpp")
    if llama_cpp is not None and against != "llama.cpp":
        raise InputError("--llama-cpp names a llama.cpp build to run: it applies to --against llama.cpp only")
    tokens = None if prompt is None else model.encode(prompt)
    capture = _capture(model, against, tokens, names=names, dtype=dtype, prompt=prompt,
                       kv_cache=kv_cache or "f16", llama_cpp=llama_cpp)
    if tokens is None:
        tokens = model.encode(capture.tokens.tolist())
    other_dtype = dtype or capture.dtype
    profile = profile_of(other_dtype, capture.arithmetic)
    result = CompareResult(model=model.name, against=capture.source, dtype=other_dtype,
                           tokens=[int(t) for t in tokens], pieces=[model.piece(t) for t in tokens],
                           their_tokens=[int(t) for t in capture.tokens],
                           their_pieces=[model.piece(t) if 0 <= t < cfg.vocab_size else f"#{t}"
                                         for t in capture.tokens.tolist()])
    if not result.tokens_match:
        result.notes = list(capture.notes)
        result.diagnosis = _token_diagnosis(result.tokens, result.their_tokens, cfg.bos_token_id)
        return result
    T = len(tokens)
    shapes = expected_shapes(cfg, T)
    theirs, ignored = _checked_arrays(capture, shapes)
    result.notes = list(capture.notes) + ignored
    summaries = {n: s for n, s in capture.summaries.items() if n in shapes and n not in theirs}
    if not theirs and not summaries:
        raise InputError(f"{capture.source} provides no site of this model to compare (expected names like "
                         "blocks.0.attn.q or logits)")
    runs = _run_all(model, tokens, theirs, profile)
    letters = symbolic_shapes(cfg)
    for name in letters:
        if name in theirs:
            result.sites.append(_site(cfg, name, letters[name], theirs[name], runs, profile, T, top_k))
        elif name in summaries:
            result.sites.append(_summary_site(cfg, name, letters[name], summaries[name], runs, profile))
        else:
            result.missing.append(name)
    result.floors = {"profile": profile.dtype, "safety": SAFETY, "slack": SLACK, "unit_roundoff": profile.u,
                     "method": _floor_method(profile)}
    if profile.ggml is not None:  # llama.cpp's arithmetic, as the floors model it
        g = profile.ggml
        result.floors["llama.cpp"] = {"weights": g.weights, "kv_cache": g.kv_cache, "activations": g.activations}
    wrong, first = result.first_wrong_op, result.first_divergence
    if wrong is not None:
        result.diagnosis = diagnose(model, tokens, wrong, theirs, runs, profile,
                                    next(s for s in result.sites if s.site == wrong).local_floor)
    elif first is not None and first in summaries:  # printed in part: no replay, so the mistakes meet the print
        result.diagnosis = diagnose(model, tokens, first, theirs, runs, profile, math.nan, printed=summaries[first])
    return result


def _floor_method(profile: Profile) -> str:
    base = (f"floor = {SAFETY:g} x |honest - reference| + {SLACK:g} u max|reference|, u = {profile.u:.3g}; "
            "local floor the same with the honest op on the reference's inputs; ")
    if profile.ggml is not None:
        g = profile.ggml
        kinds = sorted(set(g.activations.values()))
        rows = (f"each product's input rows converted per weight type ({', '.join(kinds)})" if kinds
                else "float32 products")
        return base + (f"honest = refprism float32 computing as llama.cpp's CPU backend on {g.weights} weights: "
                       f"{rows}, {g.kv_cache} KV cache, GELU through an f16 table, ggml's RoPE angles")
    how = {"float64": "honest = refprism float32 (float32 RoPE angles), its errors scaled by 2**-29",
           "float32": "honest = refprism float32 with float32 RoPE angles",
           "bfloat16": "honest = refprism with bfloat16 weights and every site rounded to bfloat16 (torch's roundings)",
           "float16": "honest = refprism with float16 weights and every site rounded to float16 (torch's roundings)"}
    return base + how[profile.dtype]


def _capture(model, against, tokens, *, names, dtype, prompt=None, kv_cache="f16", llama_cpp=None) -> Capture:
    """The other side as a Capture (see `compare`)."""
    if isinstance(against, Capture):
        return against
    if isinstance(against, str) and against in ("hf", "tl", "llama.cpp"):
        if tokens is None:
            raise InputError(f"--against {against} runs the other side live: give the prompt (text, --ids or "
                             "--prompt-file)")
        gguf = str(model.name).lower().endswith(".gguf")
        if against == "llama.cpp":
            if not gguf:
                raise InputError("--against llama.cpp runs llama.cpp on the --model file: give --model as a .gguf "
                                 "file")
            if dtype not in (None, "float32"):
                raise InputError(_GGML_DTYPE.format(dtype=dtype))
            from refprism.crosscheck.sides import llamacpp

            # Text goes to llama.cpp's own tokenizer (its ids are then compared with ours); ids run as given.
            return llamacpp.capture(model.name, prompt if isinstance(prompt, str) else tokens.tolist(),
                                    cache_type=kv_cache, bin_dir=llama_cpp,
                                    own_build=llama_cpp is not None)
        if gguf:
            raise InputError(f"--against {against} loads the checkpoint with transformers: give --model as a "
                             "safetensors model directory or hub id, not a .gguf file")
        from refprism.checkpoints.safetensors import resolve_model_dir

        directory, _ = resolve_model_dir(model.name)
        if against == "hf":
            from refprism.crosscheck.sides import hf

            return hf.capture(directory, tokens, dtype=dtype or "float32", cfg=model.config)
        from refprism.crosscheck.sides import tl

        return tl.capture(directory, tokens, dtype=dtype or "float32")
    if hasattr(against, "run_with_cache") and hasattr(against, "original_model"):  # a booted TransformerBridge
        from refprism.crosscheck.sides import tl

        if tokens is None:
            raise InputError("a TransformerBridge runs live: give the prompt (text or token ids)")
        return tl.capture(against, tokens)
    if hasattr(against, "config") and hasattr(against, "forward") and not isinstance(against, (str, bytes)):
        from refprism.crosscheck.sides import hf

        if tokens is None:
            raise InputError("an HF model object runs live: give the prompt (text or token ids)")
        return hf.capture(against, tokens, cfg=model.config)
    if isinstance(against, str) or hasattr(against, "__fspath__"):
        from refprism.crosscheck.sides.dumps import read_dump

        check_against(against)
        return read_dump(against, model, names=names or "refprism", ids=tokens, kv_cache=kv_cache)
    raise InputError(f"against must be hf, tl, llama.cpp, a dump file, an HF model or a Capture, got a "
                     f"{type(against).__name__}")


LIVE = ("hf", "tl", "llama.cpp")


def check_against(against) -> None:
    """hf, tl, llama.cpp, or an existing .npz / .safetensors file; anything else is refused in one line."""
    from pathlib import Path

    if isinstance(against, str) and against in LIVE:
        return
    text = str(against)
    shown = repr(text) if len(repr(text)) <= 400 else repr(text[:200]) + "..."
    if Path(text).suffix.lower() not in (".npz", ".safetensors"):
        raise InputError(f"unknown --against {shown}: give hf, tl, llama.cpp or a dump file (.npz, .safetensors)")
    if not Path(text).is_file():
        raise InputError(f"no dump file {shown} (--against)")


def _checked_arrays(capture: Capture, shapes: dict) -> tuple[dict, list[str]]:
    """The capture's arrays at this model's sites, in float64, each checked against its expected shape
    (a mis-shaped array is an InputError naming it), and a note for each name that is no site of this model."""
    out, notes = {}, []
    for name, a in capture.arrays.items():
        if name not in shapes:
            notes.append(f"{name}: not a site of this model, ignored")
            continue
        a = np.asarray(a)
        if tuple(a.shape) != shapes[name]:
            raise InputError(f"{capture.source}: {name} has shape {list(a.shape)}, this model and prompt give "
                             f"{list(shapes[name])}")
        if not (np.issubdtype(a.dtype, np.floating) or str(a.dtype) == "bfloat16"):  # ml_dtypes' bfloat16
            raise InputError(f"{capture.source}: {name} holds {a.dtype} values, not floats")
        out[name] = a.astype(np.float64)
    return out, notes


def _site(cfg, name, letters, theirs, runs: _Runs, profile: Profile, T, top_k) -> SiteResult:
    mask = compared_mask(cfg, name, T)
    R = runs.R[name]
    e = errors(theirs, R, mask, letters)
    local = errors(theirs, runs.P[name], mask, letters)
    honest = max_abs_error(runs.F[name], R, mask) * profile.scale
    honest_local = max_abs_error(runs.Q[name], R, mask) * profile.scale
    slack = SLACK * profile.u * e["scale"]
    # An op's honest rounding grows with the values it makes: where the other side's values are larger than ours
    # (an upstream mistake fed it larger inputs), its local floor grows with them (never below our own).
    a, _, _ = _compared(theirs, R, mask)
    theirs_scale = float(np.max(np.abs(a))) if a.size and np.isfinite(a).all() else 0.0
    grow = max(1.0, theirs_scale / e["scale"]) if e["scale"] > 0 else 1.0
    return SiteResult(site=name, shape=tuple(np.shape(theirs)), letters=tuple(letters), max_abs=e["max_abs"],
                      max_rel=e["max_rel"], nmse_db=e["nmse_db"], cosine=e["cosine"], worst=e["worst"],
                      floor=SAFETY * honest + slack, local_max_abs=local["max_abs"], local_max_rel=local["max_rel"],
                      local_worst=local["worst"], local_floor=(SAFETY * honest_local + slack) * grow,
                      scale=e["scale"], nonfinite=e["nonfinite"],
                      logits=logit_metrics(theirs, R, top_k) if name.startswith("logits") else None)


def _summary_site(cfg, name, letters, summary, runs: _Runs, profile: Profile) -> SiteResult:
    """A site the other side printed only in part (llama.cpp's llama-debug: some elements and the sum): its
    printed elements, by their index in the whole tensor, and its sum over the rows it holds (`Summary.rows`),
    each against a floor derived as for whole sites, plus what the printing itself may cost (`Summary.resolution`;
    for a total summed in float32 as it ran, `running_sum_rounding`); the worse of the two, relative to its floor,
    is the site's error. No local error (a replay needs the whole array)."""
    R = np.asarray(runs.R[name], dtype=np.float64)
    scale = float(np.abs(R).max())
    s = summary_errors(cfg, name, letters, summary, R, runs.R[name], runs.F[name], profile)
    max_abs, floor, worst = s["elements"]
    if s["sum"] is not None and (s["elements"][0] is None or s["sum"][0] * floor > max_abs * s["sum"][1]):
        max_abs, floor, worst = s["sum"]  # the sum is the worse, relative to its floor
    return SiteResult(site=name, shape=tuple(summary.shape), letters=tuple(letters), max_abs=max_abs,
                      max_rel=max_abs / scale if scale > 0 else math.inf, nmse_db=math.nan, cosine=math.nan,
                      worst=worst, floor=floor, local_max_abs=None, local_max_rel=None, local_worst=None,
                      local_floor=None, scale=scale, summary=True)


