"""Dumps of a Gemma 4 run as the other side: `--names hf` (HF module paths, as forward hooks on HF's own
Gemma4ForCausalLM see them) and `--names llama.cpp` (llama.cpp's gemma4 graph names, llamacpp_debug.GEMMA4_SITES),
on the tiny preset with every feature on (per-layer inputs, KV sharing across both layer types, k_eq_v, the
double-wide MLP, MoE, random layer_scalar / router scale / per_expert_scale / norm weights).

HF dumps are written here from HF's own modules (hooks in this file, not refprism's live capture), read back and
checked against the live capture (`sides.hf.capture_gemma4`, its own hooks): the same arrays at every site both
have. A mistake planted in HF's model (as tests/test_compare_gemma4.py plants them) reaches the dump and is found at
its first wrong op and named. llama.cpp dumps are written from llama.cpp's own run (llama-cpp-python with a graph
callback, the one llama-debug prints from: `llama_graph_dump` here) on the tiny F32 GGUF that
tests/test_compare_gemma4_llamacpp.py runs, read back, checked against llama-debug's print of the same llama.cpp
and compared (exit 0); a mistake planted in that dump is found at its site and named."""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest
import torch
from test_compare_gemma4 import _no_layer_scalar, _no_per_expert_scale, _no_v_norm
from test_compare_gemma4_llamacpp import PROMPT

import refprism
from refprism.crosscheck import compare
from refprism.crosscheck.sides import dumps
from refprism.crosscheck.sides import hf as other_hf
from refprism.errors import InputError

IDS = [2, 455, 17, 301, 88, 260, 41, 7, 130]  # longer than the window of 4


@pytest.fixture(scope="module")
def g4dir(checkpoint):
    return checkpoint("tiny-gemma4")


@pytest.fixture(scope="module")
def g4(g4dir):
    return refprism.load(g4dir)


def hf_module_dump(hf, ids, *, inputs=True, extras=True) -> dict:
    """What a PyTorch port's dumper writes: every module's output (a tuple's first element) under its module path;
    with inputs, every module's first input as `path:in`; with extras, the router's top-k weights and index (its
    output [1] and [2]) as `path:top_k_weights` / `:top_k_index`, and the model's outputs (logits, hidden_states.i,
    attentions.l). Each tensor is cloned when the hook sees it (HF scales a layer's output in place)."""
    got, hooks = {}, []

    def keep(name, t):
        if torch.is_tensor(t):
            got[name] = t.detach().clone()

    for name, module in hf.named_modules():
        if not name:
            continue
        hooks.append(module.register_forward_hook(
            lambda m, a, o, name=name: keep(name, o[0] if isinstance(o, tuple) else o)))
        if inputs:
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: keep(name + ":in", a[0]) if a
                                                          else None))
        if extras and name.endswith(".router"):
            def top_k(m, a, o, name=name):  # returns None: the router's output is left as it is
                keep(name + ":top_k_weights", o[1])
                keep(name + ":top_k_index", o[2])

            hooks.append(module.register_forward_hook(top_k))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), use_cache=False, output_hidden_states=True, output_attentions=extras)
    finally:
        for h in hooks:
            h.remove()
    got["logits"] = out.logits
    if extras:
        got.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
        got.update({f"attentions.{i}": a for i, a in enumerate(out.attentions)})
    arrays = {k: v.numpy() for k, v in got.items()}
    return {**arrays, "input_ids": np.asarray([ids])}


def _sites(model, kinds, layers=None):
    L = model.config.n_layers
    return {f"blocks.{l}.{k}" for l in (range(L) if layers is None else layers) for k in kinds}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_hf_names_dump_of_hf_gemma4_reads_back_as_the_live_capture_and_is_within_every_floor(g4dir, g4, tmp_path,
                                                                                             suffix):
    """Every module's output and input, the router's top-k and the model's outputs: read back with --names hf,
    each site is bit for bit what the live capture (its own hooks) holds, but ple.input, which HF forms in no
    module (here the sum of two module outputs, in float64: within 1e-6); the live capture's only extras are what
    eager attention alone sees (q and k after RoPE, the scores). Compared: exit 0."""
    hf = other_hf.load(g4dir)
    path = tmp_path / f"hf{suffix}"
    dumps.write_dump(path, hf_module_dump(hf, IDS))
    cap = dumps.read_dump(path, g4, names="hf")
    live = other_hf.capture(hf, IDS, cfg=g4.config)
    cfg = g4.config
    assert set(live.arrays) - set(cap.arrays) == (_sites(g4, ("attn.q", "attn.scores"))
                                                  | _sites(g4, ("attn.k",), [l for l in range(7) if cfg.has_kv(l)]))
    assert set(cap.arrays) <= set(live.arrays)
    for name, a in cap.arrays.items():
        if name == "ple.input":
            np.testing.assert_allclose(a, live.arrays[name], rtol=0, atol=1e-6 * np.abs(a).max())
        else:
            np.testing.assert_array_equal(a, live.arrays[name], err_msg=name)
    # the per-layer geometry: a full layer's heads are 32 wide, k_eq_v's one product is k_pre and v_pre
    assert cap.arrays["blocks.1.attn.q_pre"].shape == (9, 4, 32)
    assert cap.arrays["blocks.2.attn.q_pre"].shape == (9, 4, 16)
    np.testing.assert_array_equal(cap.arrays["blocks.1.attn.v_pre"], cap.arrays["blocks.1.attn.k_pre"])
    assert any("top_k_index" in n and "through their weights" in n for n in cap.notes)
    r = compare(g4, None, against=str(path), names="hf")
    assert r.exit_status == 0 and r.first_divergence is None, r.table()
    assert r.tokens == IDS and len(r.sites) == len(cap.arrays) == len(live.arrays) - 18 == 208


def test_a_dump_of_module_outputs_alone_derives_what_no_output_holds(g4dir, g4, tmp_path):
    """Module outputs only (no inputs, no tuples, no model outputs): ple.model_proj is per_layer_model_projection's
    output / sqrt(D), ple.input (norm output + token) / sqrt(2), ple.act the layer's act_fn output times
    ple.input[:, l], mlp.act act_fn x up_proj; each within 1e-6 of the live capture's. The router's output is its
    probabilities, no site: a note says how to save the top-k. Compared: exit 0."""
    hf = other_hf.load(g4dir)
    dumps.write_dump(tmp_path / "outs.npz", hf_module_dump(hf, IDS, inputs=False, extras=False))
    cap = dumps.read_dump(tmp_path / "outs.npz", g4, names="hf")
    live = other_hf.capture(hf, IDS, cfg=g4.config)
    derived = {"ple.model_proj", "ple.input"} | _sites(g4, ("ple.act", "mlp.act"))
    assert derived <= set(cap.arrays)
    for name in derived:
        a = cap.arrays[name]
        np.testing.assert_allclose(a, live.arrays[name], rtol=0, atol=1e-6 * np.abs(a).max(), err_msg=name)
    assert not _sites(g4, ("moe.topk.weight", "attn.pattern", "resid_pre", "resid_mid", "attn.z")) & set(cap.arrays)
    assert any("save its [1] as model.layers.{l}.router:top_k_weights" in n for n in cap.notes)
    # ignored: what no site holds, model.rotary_emb and per layer q_norm (7), k_norm (4 with their own k),
    # router.norm (7), experts.act_fn (7: its last expert's call); not the arrays the derived sites were made of
    ignored = next(n for n in cap.notes if "ignored" in n)
    assert ignored.startswith("26 arrays of the dump name no refprism site"), ignored
    r = compare(g4, IDS, against=str(tmp_path / "outs.npz"), names="hf")
    assert r.exit_status == 0, r.table()


def _no_post_attention_norm(hf):
    hf.model.layers[0].post_attention_layernorm = torch.nn.Identity()  # the module path stays: its output is o_proj's


HF_PLANTS = {  # tests/test_compare_gemma4.py's breakers of HF's own model -> the first wrong op
    "v_norm_missing": (_no_v_norm, "blocks.3.attn.v"),  # v_norm's output is its input
    "post_norm_missing": (_no_post_attention_norm, "blocks.0.attn.out"),  # a Gemma 1-3 entry, run on Gemma 4
    "layer_scalar_missing": (_no_layer_scalar, "blocks.2.resid_post"),
    "per_expert_scale_dropped": (_no_per_expert_scale, "blocks.4.moe.topk.weight"),  # the router's output [1]
}


@pytest.mark.parametrize("mistake", sorted(HF_PLANTS))
def test_a_mistake_planted_in_hf_reaches_the_dump_and_is_found(g4dir, g4, tmp_path, mistake):
    breaker, site = HF_PLANTS[mistake]
    hf = other_hf.load(g4dir)
    breaker(hf)
    dumps.write_dump(tmp_path / "broken.npz", hf_module_dump(hf, IDS))
    r = compare(g4, IDS, against=str(tmp_path / "broken.npz"), names="hf")
    assert r.exit_status == 1
    assert r.first_wrong_op == site, r.table()
    assert [d["variant"] for d in r.diagnosis if d["explains"]] == [mistake], r.diagnosis


def test_hf_names_that_are_mis_shaped_or_unknown_are_named(g4dir, g4, tmp_path):
    """A mis-shaped array is one line naming its key and the site's shape at that layer (a sliding layer's heads
    are 16 wide, a full layer's 32); names that are no site (a consumer's k_proj, a layer beyond the model, a
    module refprism has no site for) are listed in a note; a dump of nothing but those is one line."""
    hf = other_hf.load(g4dir)
    good = hf_module_dump(hf, IDS)
    T = len(IDS)
    cases = [("model.layers.1.self_attn.q_proj", np.zeros((1, T, 4 * 16), np.float32),
              r"model\.layers\.1\.self_attn\.q_proj has shape \[9, 64\]: blocks\.1\.attn\.q_pre needs a last axis "
              r"of 4 heads x 32 = 128"),
             ("model.layers.2.self_attn.v_norm", np.zeros((1, T, 2, 32), np.float32),
              r"model\.layers\.2\.self_attn\.v_norm has shape \[9, 2, 32\] \(batch axis dropped\); "
              r"blocks\.2\.attn\.v of this model is \[T, 2, 16\]"),
             ("model.layers.4.router:top_k_weights", np.zeros((T, 3), np.float32),
              r"model\.layers\.4\.router:top_k_weights has shape \[9, 3\] .*blocks\.4\.moe\.topk\.weight of this "
              r"model is \[T, 2\]"),
             ("model.embed_tokens_per_layer", np.zeros((1, T, 100), np.float32),
              r"model\.embed_tokens_per_layer has shape \[9, 100\]: ple\.token needs a last axis of 7 layers x 16")]
    _each_refused_in_one_line(g4, tmp_path, good, cases, IDS, "hf")
    odd = {"model.layers.5.self_attn.k_proj": good["model.layers.3.self_attn.k_proj"],  # 5 is a consumer
           "model.layers.7.input_layernorm": good["model.layers.0.input_layernorm"],  # 7 layers: 0-6
           "model.layers.0.self_attn.q_norm": good["model.layers.0.self_attn.q_norm"]}  # before RoPE: no site
    dumps.write_dump(tmp_path / "odd.npz", {**odd, "model.embed_tokens": good["model.embed_tokens"],
                                            "input_ids": good["input_ids"]})
    cap = dumps.read_dump(tmp_path / "odd.npz", g4, names="hf")
    assert set(cap.arrays) == {"embed"}
    assert "3 arrays of the dump name no refprism site in the hf scheme, ignored: " + ", ".join(odd) in cap.notes
    dumps.write_dump(tmp_path / "none.npz", {**odd, "input_ids": good["input_ids"]})
    with pytest.raises(InputError, match=r"none of its 3 arrays besides the token ids names a site in the hf "
                                         r"scheme \(its names begin model\.layers\.0\.self_attn\.q_norm") as e:
        compare(g4, IDS, against=str(tmp_path / "none.npz"), names="hf")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ llama.cpp's names


class _GgmlTensor(ctypes.Structure):
    """ggml's `struct ggml_tensor` (ggml/include/ggml.h of the llama.cpp vendored in llama-cpp-python 0.3.36)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def llama_graph_dump(gguf, ids, *, cache_type="f32") -> dict:
    """What a dumper on llama.cpp's graph callback writes (cb_eval, the callback llama-debug prints from), run by
    llama-cpp-python on the ids: every F32 tensor of the graph as llama.cpp computed it, under its graph name, as
    NumPy sees ggml's memory (reverse ne, ne[3] first), the last tensor of a repeated name kept; an unnamed product
    (`node_<i>`) of a weight blk.l.<w>.weight under "<w>-l". Logits at every position: no row is cut."""
    import llama_cpp

    from refprism.crosscheck.sides import llamacpp as L

    got = {}

    def keep(t, ask, _):
        if ask:
            return True  # every tensor, as llama-debug asks
        x = _GgmlTensor.from_address(t)
        if x.type != 0 or not x.data:  # GGML_TYPE_F32 only (the KV cache copies of an f16 cache are f16)
            return True
        name = x.name.decode()
        if name.startswith("node_") and x.src[0]:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", _GgmlTensor.from_address(x.src[0]).name.decode())
            if m is None:
                return True
            name = f"{m[2]}-{m[1]}"
        ne, nb = list(x.ne), list(x.nb)
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + 4  # bytes from the first element to the last
        flat = np.frombuffer((ctypes.c_char * span).from_address(x.data), np.float32)
        got[name] = np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1]).copy()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(keep)
    lib = llama_cpp.llama_cpp
    real = lib.llama_context_default_params

    def with_callback():
        p = real()
        p.cb_eval, p.cb_eval_user_data = callback, None
        return p

    lib.llama_context_default_params = with_callback
    try:
        llm = L._load_llama(gguf, len(ids), cache_type=cache_type)
    finally:
        lib.llama_context_default_params = real
    try:
        llm.eval([int(i) for i in ids])
    finally:
        llm.close()
    return {**got, "tokens": np.asarray(ids)}


@pytest.fixture(scope="module")
def g4llama(g4gguf, tmp_path_factory):
    """(the GGUF's model, its ids of the prompt, the path of llama.cpp's own dump of them, f32 KV cache)."""
    from refprism.crosscheck.sides import llamacpp as L

    ids = L.tokenize(g4gguf, PROMPT)
    path = tmp_path_factory.mktemp("g4dump") / "llama.npz"
    dumps.write_dump(path, llama_graph_dump(g4gguf, ids))
    return refprism.load(g4gguf), ids, path


def test_llamacpp_names_dump_of_llamacpps_own_run_reads_back_and_is_within_every_floor(g4gguf, g4llama,
                                                                                        llama_bin_dir):
    """llama.cpp's own run on the tiny GGUF (every feature on, the S F S F | S F F layout llama.cpp's KV-sharing
    rule takes), dumped from its graph callback and read with --names llama.cpp: every site llama-debug prints of
    the same llama.cpp (placed by the same GEMMA4_SITES) is in the dump, with each printed element at the same
    index (within the print's 5e-5): the per-layer inputs [P, L, T], the experts [G, J, T] and [D, J, T], k_eq_v's
    one product, the double-wide MLP, a KV-sharing consumer's q, scores, pattern and z. Compared site by site
    with replay: exit 0."""
    from refprism.crosscheck.sides import llamacpp as L
    from refprism.crosscheck.sides.llamacpp_debug import PRINTED_RESOLUTION

    model, ids, path = g4llama
    cap = dumps.read_dump(path, model, names="llama.cpp", kv_cache="f32")
    printed = L.debug_dump(g4gguf, PROMPT, cache_type="f32").summaries
    # llama-debug asks for the last logits only (result_norm / result_output cut to row T-1): the dump has them all
    assert set(printed) - set(cap.arrays) == set() and not cap.summaries
    for site, s in printed.items():
        a = cap.arrays[site]
        worst = max(abs(float(a[idx]) - v) for idx, v in s.elements.items())
        assert worst <= PRINTED_RESOLUTION * 1.001 + 1e-6 * np.abs(a).max(), (site, worst)
    cfg = model.config
    T = len(ids)
    assert cap.arrays["ple.token"].shape == cap.arrays["ple.input"].shape == (T, 7, cfg.d_ple)
    assert cap.arrays["blocks.0.moe.gate"].shape == (T, cfg.top_k, cfg.d_expert)
    assert cap.arrays["blocks.0.moe.expert_out"].shape == (T, cfg.top_k, cfg.d_model)
    assert cap.arrays["blocks.4.mlp.act"].shape == (T, 2 * cfg.d_mlp)
    np.testing.assert_array_equal(cap.arrays["blocks.1.attn.k_pre"], cap.arrays["blocks.1.attn.v_pre"])
    for site in ("blocks.4.attn.q", "blocks.4.attn.scores", "blocks.5.attn.pattern", "blocks.6.attn.z",
                 "blocks.0.attn.o_proj", "blocks.3.ple.gate", "blocks.3.ple.proj", "blocks.0.mlp.down"):
        assert site in cap.arrays, site
    assert not any(f"blocks.{l}.attn.{kv}" in cap.arrays for l in (4, 5, 6) for kv in ("k", "v", "k_pre"))
    r = compare(model, None, against=str(path), names="llama.cpp", kv_cache="f32")
    assert r.exit_status == 0 and r.first_divergence is None, r.table()
    assert r.tokens == ids and r.floors["llama.cpp"] == {"weights": "F32", "kv_cache": "f32", "activations": {}}
    assert len(r.sites) == len(cap.arrays)


def _wrong_producer_scores(d, cfg, consumer, producer):
    """kq of `consumer` over the keys of `producer` (llama.cpp's names, NumPy layouts): [N, T, S] = q . k."""
    q, k = d[f"Qcur_pos-{consumer}"].reshape(-1, cfg.n_heads, cfg.head_dim_of(consumer)), \
        d[f"Kcur_pos-{producer}"].reshape(-1, cfg.kv_heads_of(producer), cfg.head_dim_of(producer))
    k = np.repeat(k, cfg.n_heads // k.shape[1], axis=1)
    return np.einsum("tnh,snh->nts", q, k).astype(np.float32)  # attention scale 1


LLAMA_DUMP_PLANTS = {  # a mistake planted in llama.cpp's own dump -> (its first wrong op, the variant naming it)
    # layer 2's attn_post_norm holds the o_proj product itself: a build that skips the post-attention norm
    "post_norm_missing": (lambda d, cfg: {"attn_post_norm-2": d["attn_output-2"].reshape(d["attn_post_norm-2"].shape)},
                          "blocks.2.attn.out"),
    "v_norm_missing": (lambda d, cfg: {"Vcur_normed-3": d["Vcur-3"].reshape(d["Vcur_normed-3"].shape)},
                       "blocks.3.attn.v"),
    "kv_producer_first_of_type": (lambda d, cfg: {"kq-4": _wrong_producer_scores(d, cfg, 4, 0)},
                                  "blocks.4.attn.scores"),
}


@pytest.mark.parametrize("mistake", sorted(LLAMA_DUMP_PLANTS))
def test_a_mistake_planted_in_llamacpps_dump_is_found_and_named(g4llama, tmp_path, mistake):
    """llama.cpp's own dump with one tensor replaced by a port's mistake: layer 3's values left un-normed
    (Vcur_normed = Vcur), consumer 4's scores over layer 0's keys (the first sliding layer, not its producer,
    layer 2: the first of its type), or layer 2's post-attention norm skipped (attn_post_norm = the attn_output
    product). Exit 1 at the planted site and the catalogue names the mistake alone."""
    model, _, path = g4llama
    planted, site = LLAMA_DUMP_PLANTS[mistake]
    d = dumps.load_arrays(path)
    dumps.write_dump(tmp_path / "broken.npz", {**d, **planted(d, model.config)})
    r = compare(model, None, against=str(tmp_path / "broken.npz"), names="llama.cpp", kv_cache="f32")
    assert r.exit_status == 1
    assert r.first_wrong_op == site, r.table()
    assert [x["variant"] for x in r.diagnosis if x["explains"]] == [mistake], r.diagnosis


def test_llamacpp_names_that_are_mis_shaped_are_named_with_their_layers_widths(g4, tmp_path):
    """A llama.cpp-named array of the wrong shape is one line naming it and the shape llama.cpp's tensor has at
    that layer (a full layer's heads are 32 wide, a sliding layer's 16; the per-layer inputs [T, L, P]); names of
    no site (before RoPE, an unnamed node) are left to a note, and a layer beyond the model to it too."""
    T = len(IDS)
    base = {"tokens": np.asarray(IDS), "inp_scaled": np.zeros((T, g4.config.d_model), np.float32)}
    cases = [("Qcur-1", np.zeros((1, 1, T, 4 * 16), np.float32),
              r"Qcur-1: shape \[9, 64\], but llama\.cpp's Qcur for this model is \[T, 128\]"),
             ("Vcur_normed-2", np.zeros((T, 2, 32), np.float32),
              r"Vcur_normed-2: shape \[9, 2, 32\], but llama\.cpp's Vcur_normed for this model is \[T, 2, 16\]"),
             ("inp_per_layer", np.zeros((T, 7, 15), np.float32),
              r"inp_per_layer: shape \[9, 7, 15\], but llama\.cpp's inp_per_layer for this model is \[T, 7, 16\]")]
    _each_refused_in_one_line(g4, tmp_path, base, cases, None, "llama.cpp")
    odd = {"Kcur_normed-0": np.zeros((T, 2, 16), np.float32), "node_17": np.zeros((T, 4), np.float32),
           "l_out-7": base["inp_scaled"]}
    dumps.write_dump(tmp_path / "odd.npz", {**base, **odd})
    cap = dumps.read_dump(tmp_path / "odd.npz", g4, names="llama.cpp")
    assert set(cap.arrays) == {"embed", "blocks.0.resid_pre"}
    assert "3 arrays of the dump name no refprism site in the llama.cpp scheme, ignored: " + ", ".join(odd) \
        in cap.notes


def _each_refused_in_one_line(g4, tmp_path, base, cases, ids, names):
    """Each (key, bad array, message) of cases, put into the dump base: compare refuses it in one line."""
    for key, bad, message in cases:
        dumps.write_dump(tmp_path / "bad.npz", {**base, key: bad})
        with pytest.raises(InputError, match=message) as e:
            compare(g4, ids, against=str(tmp_path / "bad.npz"), names=names)
        assert "\n" not in str(e.value)


def test_a_skipped_post_norm_in_llama_debugs_print_is_named_from_the_print_alone(g4gguf, llama_bin_dir):
    """No replay: llama.cpp's own capture (its logits and llama-debug's print: some elements and the sum of each
    tensor), with layer 0's attn_post_norm print replaced by its attn_output product's, as a build that skips the
    post-attention norm prints there (the sites after it are left as printed). The first divergence is that site,
    and of the variants run on the printed values alone post_norm_missing (a Gemma 1-3 entry) alone reproduces it."""
    import dataclasses

    from refprism.crosscheck.sides import llamacpp as L

    model = refprism.load(g4gguf)
    cap = L.capture(g4gguf, PROMPT, cache_type="f32")
    o_proj = cap.summaries["blocks.0.attn.o_proj"]
    cap.summaries["blocks.0.attn.out"] = dataclasses.replace(o_proj)
    r = compare(model, None, against=cap)  # the capture says its arithmetic (f32 KV cache)
    assert r.exit_status == 1 and r.first_wrong_op is None
    assert r.first_divergence == "blocks.0.attn.out", r.table()
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == ["post_norm_missing"], r.diagnosis
    assert all(d["from"] == "printed" for d in r.diagnosis)
