"""`refprism compare --against llama.cpp` on Gemma 4: llama.cpp's own gemma4 graph (src/models/gemma4.cpp of the
llama.cpp vendored in llama-cpp-python 0.3.36), run on a tiny Gemma 4 GGUF with every feature on (KV sharing,
k_eq_v, the double-wide MLP on the consumers, MoE, per-layer inputs, proportional RoPE, layer_scalar), F32
weights, in a layer layout llama.cpp's KV-sharing rule takes (docs/gemma4.md). An honest run is within every
floor with either KV cache. A mistake planted in llama.cpp's source (tools/build_llama_cpp.py PLANTS) is found at
its first divergence and named by the catalogue from llama-debug's printed values alone: gemma4.cpp's
layer_output_scale skipped, llama-model.cpp's KV-sharing rule giving a consumer the wrong producer, the router's
input unscaled by 1 / sqrt(D) or taken from the experts' input, its top-k weights unrenormalised or
per_expert_scale dropped; and gemma4.cpp's post-attention norm skipped (a Gemma 1-3 entry, post_norm_missing,
run on Gemma 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import refprism
from refprism.crosscheck import compare
from refprism.crosscheck.sides import dumps

PROMPT = "hello world the cat"  # 16 tokens of the tiny byte-level vocabulary, BOS included
# g4gguf: the tiny F32 Gemma 4 GGUF llama.cpp runs (conftest.py)


@pytest.mark.parametrize("kv_cache", ["f32", "f16"])
def test_honest_tiny_gemma4_is_within_every_floor(g4gguf, llama_bin_dir, kv_cache):
    model = refprism.load(g4gguf)
    cfg = model.config
    r = compare(model, PROMPT, against="llama.cpp", kv_cache=kv_cache)
    assert r.exit_status == 0, r.table()
    assert r.first_wrong_op is None
    compared = {row.site for row in r.sites}
    # every part of Gemma 4 is compared: the per-layer inputs [T, L, P], k_eq_v's one product at k_pre and v_pre,
    # the experts [T, J, G], the double-wide MLP of the consumers, and the logits (in full)
    for site in ("ple.token", "ple.input", "blocks.1.attn.k_pre", "blocks.1.attn.v_pre", "blocks.1.attn.v",
                 "blocks.0.moe.gate", "blocks.0.moe.act", "blocks.0.moe.expert_out", "blocks.0.moe.down",
                 "blocks.4.mlp.act", "blocks.4.ple.gate", "blocks.6.resid_post", "logits"):
        assert site in compared, site
    # a KV-sharing consumer has no k / v of its own: nothing of llama.cpp's is placed there
    assert not any(s.startswith(f"blocks.{l}.attn.{kv}") for s in compared for l in (4, 5, 6) for kv in "kv")
    assert cfg.mlp_width_of(4) == 2 * cfg.d_mlp
    assert r.floors["llama.cpp"]["weights"] == "F32" and r.floors["llama.cpp"]["kv_cache"] == kv_cache
    logits = next(row for row in r.sites if row.site == "logits")
    assert 0 < logits.max_abs <= logits.floor


def test_without_ggmls_gelu_table_the_honest_floor_is_missed(g4gguf, llama_bin_dir, monkeypatch):
    """The floors model llama.cpp, not just any float32 run: with the f16 GELU table taken out of ggml_edit, the
    floors shrink to float32 rounding and llama.cpp's layer-0 GELU output falls outside (the first divergence; a
    printed-only site has no local check, so the first wrong op is where full arrays exist: the logits)."""
    from refprism.crosscheck import ggml

    monkeypatch.setattr(ggml, "gelu_f16_table", lambda x: refprism.gemma.ops.gelu_tanh(np.asarray(x, np.float32)))
    r = compare(refprism.load(g4gguf), PROMPT, against="llama.cpp", kv_cache="f32")
    assert r.exit_status == 1
    assert r.first_divergence in ("blocks.0.mlp.act", "blocks.0.moe.act"), r.table()


def test_planted_layer_scalar_skipped_is_found_and_named(g4gguf, llama_planted):
    """llama.cpp's gemma4.cpp with `cur = ggml_mul(ctx0, cur, model.layers[il].out_scale)` removed (PLANTS
    "gemma4-layer-scalar-skipped"): every site up to layer 0's residual output agrees, and the catalogue's
    layer_scalar_missing alone reproduces what llama-debug printed there."""
    r = compare(refprism.load(g4gguf), PROMPT, against="llama.cpp", kv_cache="f32",
                llama_cpp=llama_planted["gemma4-layer-scalar-skipped"])
    assert r.exit_status == 1
    # printed-only sites have no local check: the divergence is located, and the printed values name it
    assert r.first_divergence == "blocks.0.resid_post", r.table()
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == ["layer_scalar_missing"], r.diagnosis


def test_planted_post_norm_skipped_is_found_and_named(g4gguf, llama_planted):
    """llama.cpp's gemma4.cpp with the post-attention norm's build_norm removed (PLANTS "gemma4-post-norm-skipped",
    as "post-norm-skipped" in gemma3.cpp): every site before layer 0's attn_post_norm agrees, it is the first
    divergence, and from llama-debug's printed values alone a Gemma 1-3 catalogue entry run on Gemma 4,
    post_norm_missing, alone reproduces it."""
    r = compare(refprism.load(g4gguf), PROMPT, against="llama.cpp", kv_cache="f32",
                llama_cpp=llama_planted["gemma4-post-norm-skipped"])
    assert r.exit_status == 1
    assert r.first_divergence == "blocks.0.attn.out", r.table()
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == ["post_norm_missing"], r.diagnosis
    assert all(d["from"] == "printed" for d in r.diagnosis)


def test_planted_wrong_kv_producer_is_found_at_the_consumer_and_named(g4gguf, llama_planted):
    """llama.cpp's KV-sharing rule in src/llama-model.cpp edited so that a sliding consumer reuses the K/V of layer
    (first shared layer) - 4 (PLANTS "gemma4-kv-producer-wrong"): on this layout consumer 4 reads layer 0's cache,
    the first sliding layer, not its producer, layer 2. Every site up to the consumer's own q agrees; its scores
    are the first divergence, and of the catalogue's variants run on llama-debug's printed values alone,
    kv_producer_first_of_type (layer 0's keys) reproduces them, and llama.cpp's own rule (layer 2 here: HF's
    producer, so not applicable) does not."""
    r = compare(refprism.load(g4gguf), PROMPT, against="llama.cpp", kv_cache="f32",
                llama_cpp=llama_planted["gemma4-kv-producer-wrong"])
    assert r.exit_status == 1
    assert r.first_divergence == "blocks.4.attn.scores", r.table()
    agreed = {row.site for row in r.sites if row.max_abs <= row.floor}
    assert {"blocks.3.resid_post", "blocks.4.ln1.out", "blocks.4.attn.q_pre", "blocks.4.attn.q"} <= agreed
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == ["kv_producer_first_of_type"], r.diagnosis
    assert all(d["from"] == "printed" for d in r.diagnosis)


@pytest.mark.parametrize("plant, variant", [("gemma4-topk-not-renormalised", "topk_not_renormalised"),
                                            ("gemma4-per-expert-scale-dropped", "per_expert_scale_dropped")])
def test_planted_routing_mistake_is_found_at_the_experts_sum_and_named(g4gguf, llama_planted, plant, variant):
    """llama.cpp's gemma4.cpp with the router's top-k weights left unrenormalised (build_moe_ffn's norm_w false) or
    without per_expert_scale (ffn_down_exps_s not passed: llama.cpp applies it to each expert's down output).
    llama-debug prints no moe.topk.weight, so every site up to the experts' own outputs agrees (their down product
    is then named ffn_moe_down, still moe.expert_out) and their weighted sum, ffn_moe_out (moe.down), is the first
    divergence; the catalogue's routing variant, applied to that sum, alone reproduces the print."""
    r = compare(refprism.load(g4gguf), PROMPT, against="llama.cpp", kv_cache="f32", llama_cpp=llama_planted[plant])
    assert r.exit_status == 1
    assert r.first_divergence == "blocks.0.moe.down", r.table()
    # the headline does not call a printed-only divergence accumulated: nothing there was replayed
    assert "printed in part" in r.headline() and "accumulated" not in r.headline()
    agreed = {row.site for row in r.sites if row.max_abs <= row.floor}
    assert {"blocks.0.moe.router.logits", "blocks.0.moe.act", "blocks.0.moe.expert_out"} <= agreed
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == [variant], r.diagnosis
    assert all(d["from"] == "printed" for d in r.diagnosis)


@pytest.mark.parametrize("plant, variant", [("gemma4-router-root-d-missing", "router_root_d_missing"),
                                            ("gemma4-router-reads-expert-input", "router_reads_expert_input")])
def test_planted_router_mistake_is_found_at_the_router_and_named(g4gguf, llama_planted, plant, variant):
    """llama.cpp's gemma4.cpp with the router input's ggml_scale by 1 / sqrt(n_embd) deleted, or with the router
    fed the experts' normed input (cur_moe, ffn_norm_2's output) instead of attn_out (the trap gemma4.cpp's own
    comment names): the router's logits (ffn_moe_logits) are the first divergence, and from the printed values
    alone the catalogue's variant alone reproduces them."""
    r = compare(refprism.load(g4gguf), PROMPT, against="llama.cpp", kv_cache="f32", llama_cpp=llama_planted[plant])
    assert r.exit_status == 1
    assert r.first_divergence == "blocks.0.moe.router.logits", r.table()
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == [variant], r.diagnosis


def test_quantized_gemma4_is_refused_in_one_line(g4gguf, tmp_path):
    from refprism.crosscheck.sides import llamacpp
    from refprism.errors import InputError

    q = llamacpp.quantize(g4gguf, tmp_path / "q.gguf", "Q8_0")
    model = refprism.load(q)
    with pytest.raises(InputError, match="Gemma 4 GGUF with .* not supported yet") as e:
        compare(model, PROMPT, against="llama.cpp")
    assert "\n" not in str(e.value)
    # a dump in llama.cpp's names on that model: the same floors, so the same refusal
    dumps.write_dump(tmp_path / "d.npz", {"tokens": np.asarray([2, 5, 7]),
                                          "inp_scaled": np.zeros((3, model.config.d_model), np.float32)})
    with pytest.raises(InputError, match="Gemma 4 GGUF with F16, Q8_0 tensors against llama.cpp is not supported") as e:
        compare(model, None, against=str(tmp_path / "d.npz"), names="llama.cpp")
    assert "\n" not in str(e.value)


def test_cli_compares_a_gemma4_gguf_against_llama_cpp(g4gguf, llama_bin_dir, capsys):
    from refprism import cli

    assert cli.main(["compare", PROMPT, "--model", str(g4gguf), "--against", "llama.cpp", "--kv-cache", "f32",
                     "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["exit_status"] == 0 and j["first_divergence"] is None
    sites = {s["site"] for s in j["sites"]}
    assert {"ple.input", "blocks.0.moe.expert_out", "blocks.6.ple.out", "logits"} <= sites
