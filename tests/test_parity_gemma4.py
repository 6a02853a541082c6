"""Gemma 4 (text): refprism's forward pass equals HF transformers' Gemma4ForCausalLM (eager attention, eager
experts) activation by activation, on the tiny random checkpoint with every feature on (refprism.synth
"tiny-gemma4": per-layer embeddings, KV sharing across both layer types, double-wide MLP, k_eq_v, two head
geometries with proportional RoPE, MoE, random layer_scalar / norm weights / router scales), with prompts longer
than the sliding window. The same test family as tests/test_parity_family.py, with the bound stated relative to
each tensor's size: float32 logits and activations within 1e-5 of the tensor's largest value (at least 1e-5
absolute). Why relative: the residual stream grows over the seven layers (three sublayer terms a layer, times
layer_scalar) and attention at scale 1 reads q.k of O(1) to O(3); both float32 sides then lie up to ~2e-5 from the
float64 result on the last layers (measured), in either direction. The float64 test is the exact one: every site
within 1e-9 of its size of HF's float64 (HF's float32 norms, softmaxes and RoPE patched to float64).
"""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close
from hf_reference import hf_gemma4_record

import refprism
from refprism.checkpoints.synth import make_config, write_checkpoint
from refprism.errors import CheckpointError, ConfigError
from refprism.gemma.record import expected_shapes


def _hf(d):
    unified = json.loads((d / "config.json").read_text())["model_type"] == "gemma4_unified_text"
    cls = transformers.Gemma4UnifiedForCausalLM if unified else transformers.Gemma4ForCausalLM
    hf, info = cls.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return hf.eval()


@pytest.mark.parametrize("preset, overrides", [
    ("tiny-gemma4", {}), ("tiny-gemma4", {"attention_k_eq_v": False}),
    ("tiny-gemma4", {"enable_moe_block": False, "hidden_size_per_layer_input": 0}),
    ("tiny-gemma4-unified", {}),  # Gemma4UnifiedForCausalLM: HF's own copy of the decoder, without PLE and MoE
])
def test_gemma4_matches_hf_activation_by_activation(checkpoint, preset, overrides):
    """float32 against HF's float32 at every site, to 1e-5 of the site's scale; where the two float32 roundings
    part by more (seen 1.08e-5 at blocks.4.ple.out on an AMD EPYC, torch's AVX2 kernels), refprism's float32 is held
    to 1e-5 of the float64 truth instead (its own float64 run, which test_gemma4_float64_matches_hf_float64 ties
    to HF's float64 at 1e-9), with HF's float32 within 1e-5 of that truth too: both roundings of one function are
    bounded, and which of them HF's kernels happen to match is not asked."""
    d = checkpoint(preset, **overrides)
    ours, exact = refprism.load(d), refprism.load(d, dtype="float64")
    hf = _hf(d)
    assert type(hf).__name__ == ("Gemma4UnifiedForCausalLM" if preset == "tiny-gemma4-unified" else
                                 "Gemma4ForCausalLM")
    cfg = ours.config
    assert cfg.head_dim_of(1) == 32 and cfg.head_dim_of(0) == 16 and [cfg.kv_source(l) for l in (4, 5, 6)] == [1, 3, 1]
    for T, seed in [(1, 0), (9, 1), (17, 2)]:  # longer than the window of 4
        ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, T)
        run, ref, truth = ours.run(ids), hf_gemma4_record(hf, ids), exact.run(ids).record
        names = expected_shapes(cfg, T)
        assert set(names) <= set(ref), sorted(set(names) - set(ref))
        for name in names:
            if name.endswith("topk.index"):
                np.testing.assert_array_equal(run.record[name], ref[name], err_msg=name)
                continue
            assert run.record[name].dtype == np.float32, name
            scale = max(1.0, np.abs(ref[name]).max())
            if np.abs(run.record[name].astype(np.float64) - ref[name]).max() > 1e-5 * scale:
                assert_close(f"gemma4 T={T} {name} (HF's float32 to our float64)", truth[name], ref[name],
                             atol=1e-5 * scale)  # the same function as HF's: a mistake fails here
                assert_close(f"gemma4 T={T} {name} (our float32 to our float64)", run.record[name], truth[name],
                             atol=1e-5 * scale)
                continue
            assert_close(f"gemma4 T={T} {name}", run.record[name], ref[name], atol=1e-5 * scale)


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-unified"])
def test_gemma4_float64_matches_hf_float64(checkpoint, preset):
    """float64 against HF run in float64 throughout (tests/hf_reference.gemma4_float64 patches HF's float32 norms,
    softmaxes and RoPE tables): every site within 1e-9 relative to its size (float64 rounding only)."""
    from hf_reference import gemma4_float64

    d = checkpoint(preset)
    ours = refprism.load(d, dtype="float64")
    cls = transformers.Gemma4UnifiedForCausalLM if preset == "tiny-gemma4-unified" else transformers.Gemma4ForCausalLM
    hf = cls.from_pretrained(str(d), dtype=torch.float64, attn_implementation="eager",
                             experts_implementation="eager").eval()
    undo = gemma4_float64(hf)
    try:
        for T, seed in [(9, 1), (17, 2)]:
            ids = np.random.default_rng(seed).integers(0, ours.config.vocab_size, T)
            run, ref = ours.run(ids), hf_gemma4_record(hf, ids)
            for name in expected_shapes(ours.config, T):
                if name.endswith("topk.index"):
                    np.testing.assert_array_equal(run.record[name], ref[name], err_msg=name)
                    continue
                assert run.record[name].dtype == np.float64, name
                scale = np.abs(ref[name]).max()
                assert_close(f"float64 T={T} {name}", run.record[name], ref[name], atol=1e-9 * scale)
    finally:
        undo()


def test_gemma4_features_are_not_no_ops(checkpoint):
    """Each feature the tiny preset turns on changes the logits: the parity above tests each of them."""
    base = refprism.load(checkpoint("tiny-gemma4"))
    ids = np.arange(3, 15)
    logits = base.run(ids).logits
    cfg = base.config
    assert cfg.moe and cfg.ple and cfg.k_eq_v and cfg.double_wide_mlp and cfg.n_kv_shared == 3
    assert cfg.rope_partial == 0.25 and cfg.query_pre_attn_scalar == 1.0 and cfg.norm_offset == 0.0
    p = base.params
    for l in range(cfg.n_layers):  # the scalars that start at 1 are random
        assert abs(float(p.block(l)["layer_scalar"][0]) - 1) > 1e-3
        assert np.abs(p.block(l)["per_expert_scale"] - 1).max() > 1e-3
        assert np.abs(p.block(l)["router_scale"] - 1).max() > 1e-3
    run = base.run(ids)
    assert np.abs(run.record["logits_uncapped"]).max() > 2.5  # the soft-cap of 5 bends
    # MoE: the experts' term is not negligible beside the dense branch
    assert np.abs(run.record["blocks.2.moe.out"]).mean() > 0.1 * np.abs(run.record["blocks.2.mlp.dense"]).mean()
    for name, kw in [("no k_eq_v", {"attention_k_eq_v": False}), ("no sharing", {"num_kv_shared_layers": 0}),
                     ("no MoE", {"enable_moe_block": False})]:
        other = refprism.load(checkpoint("tiny-gemma4", **kw)).run(ids).logits
        assert np.abs(other - logits).max() > 1e-3, name


def test_gemma4_moe_computes_only_the_selected_experts(checkpoint):
    """NaN weights in an expert that no position selects at its layer leave every recorded site and the logits
    bit for bit as they were (a forward that ran every expert and weighted the unselected ones by 0 would carry
    NaN * 0 = NaN); the same NaN in a selected expert reaches the logits (so this test can fail). The NaNs are
    put in the loaded weights (the loader refuses a file holding any)."""
    d = checkpoint("tiny-gemma4")
    ids = np.array([2, 17])  # two positions x top 2 of 4 experts: some expert of some layer is never chosen
    model = refprism.load(d)
    run, cfg = model.run(ids), model.config
    chosen = {l: set(run.record[f"blocks.{l}.moe.topk.index"].ravel().tolist()) for l in range(cfg.n_layers)}
    l, idle = next((l, e) for l in range(cfg.n_layers) for e in range(cfg.n_experts) if e not in chosen[l])
    busy = min(chosen[l])

    def poisoned(e):
        model = refprism.load(d)
        block = model.params.block(l)
        for key in ("We_gate", "We_up", "We_down"):
            block[key][e] = np.nan
        assert np.isnan(model.params.block(l)["We_down"][e]).all()  # the weights the forward reads
        return model.run(ids)

    quiet = poisoned(idle)
    assert set(quiet.record) == set(run.record)
    for name, value in run.record.items():
        np.testing.assert_array_equal(quiet.record[name], value, err_msg=name)
    np.testing.assert_array_equal(quiet.logits, run.logits)
    loud = poisoned(busy)
    assert np.isnan(loud.record[f"blocks.{l}.moe.out"]).any() and np.isnan(loud.logits).any()


def test_gemma4_multimodal_checkpoint_loads_the_text_decoder(checkpoint, tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint: config text_config nested, decoder weights under
    model.language_model.*, a vision tower beside it (ignored, named in the notes)."""
    from safetensors.numpy import load_file, save_file

    d = checkpoint("tiny-gemma4")
    text = json.loads((d / "config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma4", "architectures":
                                                ["Gemma4ForConditionalGeneration"], "text_config": text}))
    renamed = {"model.language_model." + n[len("model."):]: a for n, a in tensors.items()}
    renamed["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = np.zeros((4, 4), np.float32)
    renamed["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(renamed, mm / "model.safetensors", metadata={"format": "pt"})
    ours, mine = refprism.load(mm), refprism.load(d)
    assert ours.config == mine.config
    assert any("vision_tower" in n for n in ours.notes)
    ids = np.arange(2, 12)
    np.testing.assert_array_equal(ours.run(ids).logits, mine.run(ids).logits)


def test_gemma4_unified_multimodal_checkpoint_as_hf_saves_it(checkpoint, tmp_path):
    """Gemma4UnifiedForConditionalGeneration (the 12B's class), built by HF with tiny vision and audio embedders,
    the text decoder's weights from tiny-gemma4-unified, saved by HF: refprism reads config.json's text_config
    and model.language_model.*, ignores the embedders (named in the notes), and equals HF's own multimodal
    forward on a text prompt (its "vision" mask is causal on text) and the text-only checkpoint's run."""
    from safetensors.numpy import load_file

    d = checkpoint("tiny-gemma4-unified")
    text = json.loads((d / "config.json").read_text())
    cfg = transformers.Gemma4UnifiedConfig(
        text_config=transformers.Gemma4UnifiedTextConfig(**{k: v for k, v in text.items() if k not in (
            "architectures", "model_type", "torch_dtype")}),
        vision_config=transformers.Gemma4UnifiedVisionConfig(patch_size=4, pooling_kernel_size=2, mm_embed_dim=64,
                                                             mm_posemb_size=16, output_proj_dims=64),
        audio_config=transformers.Gemma4UnifiedAudioConfig(audio_embed_dim=8))
    hf = transformers.Gemma4UnifiedForConditionalGeneration(cfg).eval()
    weights = {n[len("model."):]: torch.from_numpy(a) for n, a in load_file(d / "model.safetensors").items()}
    missing, unexpected = hf.model.language_model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # layer_scalar, a buffer, is loaded too
    mm = tmp_path / "mm"
    hf.save_pretrained(mm)
    assert json.loads((mm / "config.json").read_text())["model_type"] == "gemma4_unified"
    ours, mine = refprism.load(mm), refprism.load(d)
    assert ours.config == mine.config
    assert any("vision_embedder" in n and "embed_audio" in n for n in ours.notes), ours.notes
    ids = np.arange(2, 13)
    run = ours.run(ids)
    np.testing.assert_array_equal(run.logits, mine.run(ids).logits)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        ref = hf(torch.tensor([ids.tolist()]), use_cache=False).logits[0].double().numpy()
    assert_close("unified multimodal logits", run.logits, ref, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_gemma4_unified_config_reads_as_hf(checkpoint, tmp_path):
    """Gemma4UnifiedTextConfig's own defaults where config.json is silent (window 1024, 262144 positions), and
    PLE / MoE keys in a unified config.json ignored, as HF builds no such modules (its logits unchanged)."""
    from refprism.gemma.config import Config

    hf = make_config("tiny-gemma4-unified")
    for key in ("sliding_window", "max_position_embeddings"):
        del hf[key]
    cfg = Config.from_hf(hf)
    theirs = transformers.Gemma4UnifiedTextConfig(**{k: v for k, v in hf.items() if k not in (
        "architectures", "model_type", "torch_dtype")})
    assert (cfg.sliding_window, cfg.max_positions) == (theirs.sliding_window, theirs.max_position_embeddings) \
        == (1024, 262_144)
    assert (cfg.d_ple, cfg.n_experts, cfg.k_eq_v, cfg.n_kv_shared, cfg.double_wide_mlp) == (0, 0, True, 3, True)
    d = checkpoint("tiny-gemma4-unified")
    extra = {"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 512, "enable_moe_block": True,
             "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 24}
    odd = _refusal(tmp_path / "odd", d, config_edit=lambda c: c.update(extra))
    assert refprism.load(odd).config == refprism.load(d).config
    ids = np.arange(2, 11)
    ref = hf_gemma4_record(_hf(odd), ids)
    run = refprism.load(odd).run(ids)
    assert_close("unified with PLE / MoE keys", run.logits, ref["logits"],
                 atol=1e-5 * max(1.0, np.abs(ref["logits"]).max()))


def test_gemma4_consumer_kv_weights_are_ignored_as_hf_does(checkpoint, tmp_path):
    """Released E2B files carry k/v weights for the KV-sharing layers; HF ignores them, so does refprism."""
    from safetensors.numpy import load_file, save_file

    d = checkpoint("tiny-gemma4")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.5.self_attn.k_proj.weight"] = np.ones((32, 64), np.float32)
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text((d / "config.json").read_text())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    ids = np.arange(2, 9)
    np.testing.assert_array_equal(refprism.load(out).run(ids).logits, refprism.load(d).run(ids).logits)


def _refusal(tmp_path, d, config_edit=None, tensor_edit=None):
    from safetensors.numpy import load_file, save_file

    hf = json.loads((d / "config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    if config_edit:
        config_edit(hf)
    if tensor_edit:
        tensor_edit(tensors)
    out = tmp_path / "bad"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_gemma4_contradicting_fields_are_refused_naming_the_field(checkpoint, tmp_path):
    """Each contradiction is refused in one line naming the config.json field (and the tensor it contradicts)."""
    d = checkpoint("tiny-gemma4")
    v_proj = lambda t: t.update({"model.layers.1.self_attn.v_proj.weight": np.zeros((32, 64), np.float32)})  # noqa: E731
    cases = [
        ("v", {"tensor_edit": v_proj}, CheckpointError, "attention_k_eq_v.*model.layers.1.self_attn.v_proj.weight"),
        ("s", {"config_edit": lambda c: c.update(num_kv_shared_layers=9)}, ConfigError, "num_kv_shared_layers is 9"),
        ("p", {"config_edit": lambda c: c.update(  # leaves the full consumers without a producer
            layer_types=["sliding_attention"] * 4 + ["full_attention"] * 3)}, ConfigError, "num_kv_shared_layers"),
        ("e", {"config_edit": lambda c: c.update(num_experts=8)}, CheckpointError, "num_experts is 8 .*4 experts"),
        ("i", {"config_edit": lambda c: c.update(moe_intermediate_size=12)}, CheckpointError,
         "moe_intermediate_size is 12"),
        ("k", {"config_edit": lambda c: c.update(top_k_experts=5)}, ConfigError,
         "top_k_experts .5. exceeds num_experts .4."),
    ]
    for name, edit, error, message in cases:
        with pytest.raises(error, match=message) as e:
            refprism.load(_refusal(tmp_path / name, d, **edit))
        assert "\n" not in str(e.value), (name, str(e.value))


@pytest.mark.parametrize("model_type, what", [("gemma3n_text", "Gemma 3n"), ("gemma3n", "Gemma 3n")])
def test_gemma3n_is_refused_in_one_line(model_type, what):
    from refprism.gemma.config import Config

    with pytest.raises(ConfigError, match=what) as e:
        Config.from_hf({**make_config("tiny-gemma4"), "model_type": model_type})
    assert "\n" not in str(e.value)


def test_gemma4_vision_bidirectional_is_causal_on_text_as_hf(checkpoint, tmp_path):
    """use_bidirectional_attention "vision" is read (HF's text model is causal with it: only image tokens would
    attend both ways); HF's "all" on the same weights gives other logits, so the key is one HF reads."""
    d = _refusal(tmp_path / "v", checkpoint("tiny-gemma4"), config_edit=lambda c: c.update(
        use_bidirectional_attention="vision"))
    ids = np.arange(2, 11)
    run, hf = refprism.load(d).run(ids), _hf(d)
    assert hf.model.layers[0].self_attn.is_causal
    ref = hf_gemma4_record(hf, ids)
    assert_close("vision logits", run.logits, ref["logits"], atol=1e-5 * max(1.0, np.abs(ref["logits"]).max()))
    everywhere = _hf(_refusal(tmp_path / "a", d, config_edit=lambda c: c.update(use_bidirectional_attention="all")))
    with torch.no_grad():
        other = everywhere(torch.tensor([ids.tolist()]), use_cache=False, output_hidden_states=True).logits[0]
    assert np.abs(other.numpy() - run.logits).max() > 1e-3


def test_gemma4_last_layer_is_forced_full_as_hf(tmp_path):
    """Gemma4TextConfig forces the last layer to full_attention; so does refprism."""
    from refprism.gemma.config import Config

    hf = make_config("tiny-gemma4", layer_types=["sliding_attention", "full_attention"] * 3 + ["sliding_attention"])
    assert Config.from_hf(hf).layer_types[-1] == "full_attention"
    assert transformers.Gemma4TextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type",
                                                                                      "torch_dtype")}).layer_types[-1] \
        == "full_attention"
    d = write_checkpoint(tmp_path / "m", make_config("tiny-gemma4", layer_types=hf["layer_types"]))
    ids = np.arange(2, 10)
    run, ref = refprism.load(d).run(ids), hf_gemma4_record(_hf(d), ids)
    assert_close("forced-full logits", run.logits, ref["logits"], atol=1e-5 * max(1.0, np.abs(ref["logits"]).max()))


def test_gemma4_low_memory_resume_and_packed_equal_the_plain_run(checkpoint):
    """memory="low" (each layer converted when used, the experts' halves into their own buffers) gives the same
    bits; a run resumed at a KV-sharing consumer (its producer before the resume point) equals the full run bit
    for bit; a packed pass equals each prompt's own run within float32 rounding."""
    from refprism.gemma.forward import forward, forward_packed

    d = checkpoint("tiny-gemma4")
    fast, low = refprism.load(d, memory="fast"), refprism.load(d, memory="low")
    ids = np.random.default_rng(3).integers(0, 512, 11)
    run = fast.run(ids)
    np.testing.assert_array_equal(low.run(ids).logits, run.logits)
    cfg = fast.config
    for first in (2, 5):  # 5: a consumer whose producer (3) is before it
        resumed = forward(fast.params, cfg, ids, resume=(first, run.record), normalizer=fast.normalizer)
        np.testing.assert_array_equal(resumed["logits"], run.logits)
        # the record holds every site of the full run, the per-layer inputs (computed before layer 0) too
        assert set(resumed) == set(run.record)
        np.testing.assert_array_equal(resumed["ple.input"], run.record["ple.input"])
    other = np.random.default_rng(4).integers(0, 512, 6)
    packed = forward_packed(fast.params, cfg, [ids, other], normalizer=fast.normalizer)
    for rec, toks in zip(packed, [ids, other]):
        np.testing.assert_allclose(rec["logits"], fast.run(toks).logits, atol=2e-5)


def test_gemma4_edit_sees_every_site_once_in_table_order(checkpoint):
    """The edit is called at every recorded site, in RECORD_TABLE's order (each layer's own sites)."""
    model = refprism.load(checkpoint("tiny-gemma4"))
    names = []
    model.run(np.arange(2, 9), edit=lambda n, v, r: names.append(n) or v)
    assert names == list(expected_shapes(model.config, 7))
    assert "blocks.5.attn.k" not in names and "blocks.3.attn.k" in names  # a consumer computes no k of its own
