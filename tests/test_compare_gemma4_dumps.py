"""Dumps of a Gemma 4 run as the other side: `--names hf` (HF module paths, as forward hooks on HF's own
Gemma4ForCausalLM see them) and `--names llama.cpp` (llama.cpp's gemma4 graph names, llamacpp_debug.GEMMA4_SITES),
on the tiny preset with every feature on (per-layer inputs, KV sharing across both layer types, k_eq_v, the
double-wide MLP, MoE, random layer_scalar / router scale / per_expert_scale / norm weights).

HF dumps are written here from HF's own modules (hooks in this file, not refprism's live capture), read back and
checked against the live capture (`sides.hf.capture_gemma4`, its own hooks): the same arrays at every site both
have. A mistake planted in HF's model (as tests/test_compare_gemma4.py plants them) reaches the dump and is found at
its first wrong op and named. llama.cpp dumps are refprism's record under llama.cpp's names, written by a hand
inverse of the map (numpy layouts spelled out here), as tests/test_compare_others.py does for Gemma 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_compare_gemma4 import _no_layer_scalar, _no_per_expert_scale, _no_v_norm

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


HF_PLANTS = {  # tests/test_compare_gemma4.py's breakers of HF's own model -> the first wrong op
    "v_norm_missing": (_no_v_norm, "blocks.3.attn.v"),  # v_norm's output is its input
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
    for key, bad, message in cases:
        dumps.write_dump(tmp_path / "bad.npz", {**good, key: bad})
        with pytest.raises(InputError, match=message) as e:
            compare(g4, IDS, against=str(tmp_path / "bad.npz"), names="hf")
        assert "\n" not in str(e.value)
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
