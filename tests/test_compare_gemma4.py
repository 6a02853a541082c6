"""refprism compare --against hf on Gemma 4 (the tiny preset with every feature on): an honest HF run is within
every floor; each Gemma 4 trap, planted in HF's own torch model (a patched module, buffer, attribute or the
modeling file's rotation function: never refprism code), is found at its first wrong op and named by the
catalogue's Gemma 4 entries (crosscheck.catalogue.GEMMA4_CATALOGUE), which a test checks all have a case here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import refprism
from refprism.checkpoints.synth import make_config
from refprism.crosscheck import compare
from refprism.crosscheck.catalogue import GEMMA4_CATALOGUE
from refprism.crosscheck.sides import hf as other_hf
from refprism.gemma.config import Config

IDS = [2, 455, 17, 301, 88, 260, 41, 7, 130]  # longer than the window of 4


@pytest.fixture(scope="module")
def g4dir(checkpoint):
    return checkpoint("tiny-gemma4")


def test_hf_gemma4_is_within_every_floor(g4dir):
    ours = refprism.load(g4dir)
    hf = other_hf.load(g4dir)
    for T, seed in [(1, 0), (9, 1), (17, 2)]:
        ids = [2] + np.random.default_rng(seed).integers(3, 512, T - 1).tolist()
        r = compare(ours, ids, against=hf)
        assert r.exit_status == 0, r.table()
        assert r.sites[-1].logits["argmax_agree"] == 1.0
        # HF forms no norm scales and keeps no per-expert tensors (its expert loop); the chosen experts are integers
        assert all(m.endswith(".scale") or ".moe." in m for m in r.missing), r.missing


def test_hf_gemma4_unified_is_within_every_floor_and_its_layer_scalar_is_named(checkpoint):
    """Gemma 4 unified (Gemma4UnifiedForCausalLM, its own modeling module: the decoder without PLE and MoE) is
    captured like Gemma 4: an honest run within every floor (no MoE note), a layer_scalar left at 1 found at
    that layer's output and named."""
    d = checkpoint("tiny-gemma4-unified")
    ours, hf = refprism.load(d), other_hf.load(d)
    assert type(hf).__name__ == "Gemma4UnifiedForCausalLM"
    r = compare(ours, IDS, against=hf)
    assert r.exit_status == 0, r.table()
    assert all(m.endswith((".scale", ".resid_mlp")) for m in r.missing), r.missing
    assert not any("expert" in n for n in r.notes)
    hf.model.layers[2].layer_scalar.fill_(1.0)
    r = compare(ours, IDS, against=hf)
    assert r.exit_status == 1
    assert r.first_wrong_op == "blocks.2.resid_post"
    assert [d["variant"] for d in r.diagnosis if d["explains"]] == ["layer_scalar_missing"], r.diagnosis


def _one_plus_w(hf):
    n = hf.model.layers[2].post_attention_layernorm
    f = n.forward
    n.forward = lambda x: f(x) + n._norm(x.float()).type_as(x)


def _no_v_norm(hf):
    hf.model.layers[3].self_attn.v_norm.forward = lambda x: x


def _head_dim_scale(hf):
    a = hf.model.layers[1].self_attn
    a.scaling = a.head_dim ** -0.5


def _no_layer_scalar(hf):
    hf.model.layers[2].layer_scalar.fill_(1.0)


def _no_per_expert_scale(hf):
    hf.model.layers[4].router.per_expert_scale.data.fill_(1.0)


def _not_renormalised(hf):
    router = hf.model.layers[0].router

    def forward(x):
        x = router.norm(x) * router.scale * router.scalar_root_size
        prob = torch.nn.functional.softmax(router.proj(x), dim=-1, dtype=torch.float32)
        w, i = torch.topk(prob, k=router.config.top_k_experts, dim=-1)
        return prob, w * router.per_expert_scale[i], i

    router.forward = forward


def _contiguous_rope(hf, monkeypatch):
    from transformers.models.gemma4 import modeling_gemma4 as g4

    original = g4.apply_rotary_pos_emb

    def rope(x, cos, sin, unsqueeze_dim=1):
        H = x.shape[-1]
        if H != 32:  # sliding layers: HF's own
            return original(x, cos, sin, unsqueeze_dim)
        R = 4  # int(0.25 * 32 // 2): NeoX's partial rotary over the first 2R dims, frequencies theta^(-2i/2R)
        pos = torch.arange(x.shape[1], dtype=torch.float32)[:, None]
        inv = 1.0 / (1e6 ** (torch.arange(0, 2 * R, 2, dtype=torch.float32) / (2 * R)))
        ang = torch.cat([pos * inv, pos * inv], dim=-1)[None, :, None, :]
        head = x[..., : 2 * R]
        rot = torch.cat([-head[..., R:], head[..., :R]], dim=-1)
        return torch.cat([head * ang.cos() + rot * ang.sin(), x[..., 2 * R:]], dim=-1)

    monkeypatch.setattr(g4, "apply_rotary_pos_emb", rope)


def _llama_cpp_producer(hf):
    """Consumer 5 (sliding) reads layer 2's keys and values, not layer 3's: HF's own store moved (llama.cpp's rule
    on this layout, S F S S | F S F)."""
    hf.model.layers[3].self_attn.store_full_length_kv = False
    hf.model.layers[2].self_attn.store_full_length_kv = True


def _first_producer(hf):
    """Consumer 5 (sliding) reads layer 0's keys and values: the first sliding layer's store kept, the later ones'
    dropped."""
    hf.model.layers[3].self_attn.store_full_length_kv = False
    hf.model.layers[2].self_attn.store_full_length_kv = False
    hf.model.layers[0].self_attn.store_full_length_kv = True


def _post_norm_skipped(module):
    """A post-norm of layer 0 replaced by the identity (a port that skips it)."""
    def make(hf, mp):
        mp.setattr(hf.model.layers[0], module, torch.nn.Identity())
    return make


def _exact_gelu(where):
    """nn.GELU() (erf) in layer 0's MLP, its experts or its per-layer input gate."""
    def make(hf, mp):
        lay = hf.model.layers[0]
        mp.setattr({"mlp": lay.mlp, "experts": lay.experts, "ple": lay}[where], "act_fn", torch.nn.GELU())
    return make


def _geglu_swapped(hf, mp):
    m = hf.model.layers[0].mlp
    mp.setattr(m, "forward", lambda x: m.down_proj(m.act_fn(m.up_proj(x)) * m.gate_proj(x)))


def _swapped_norm_weights(hf, mp):
    """Layer 1: post_attention_layernorm and pre_feedforward_layernorm hold each other's weights."""
    a, b = hf.model.layers[1].post_attention_layernorm, hf.model.layers[1].pre_feedforward_layernorm
    with torch.no_grad():
        wa = a.weight.clone()
        a.weight.copy_(b.weight)
        b.weight.copy_(wa)


def _embed_scale(value, which="embed_tokens"):
    def make(hf, mp):
        getattr(hf.model, which).embed_scale.fill_(value)
    return make


def _rope(rotate):
    """HF's rotation (one tensor at a time in Gemma 4: q, then k) replaced by `rotate`, on every layer."""
    def make(hf, mp):
        from transformers.models.gemma4 import modeling_gemma4 as g4

        mp.setattr(g4, "apply_rotary_pos_emb", lambda x, cos, sin, unsqueeze_dim=1: rotate(
            x, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)))
    return make


def _interleaved(x, cos, sin):
    """Llama's original RoPE: pairs (2i, 2i+1) rotated by angle i (Gemma 4's frequencies, zero beyond R on a full
    layer)."""
    c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2)


def _inv_freq(layer_type, base=None, rotated=None):
    """Set HF's RoPE frequencies of one layer type: theta^(-2i/H) for the first `rotated` pairs (all by default),
    0 beyond (Gemma 4's proportional RoPE on full layers: 4 of 16 pairs)."""
    def make(hf, mp):
        buf = getattr(hf.model.rotary_emb, f"{layer_type}_inv_freq")
        H = 2 * len(buf)
        inv = 1.0 / (base ** (torch.arange(0, H, 2, dtype=torch.float) / H))
        inv[len(buf) if rotated is None else rotated:] = 0
        buf.copy_(inv)
    return make


def _router_scale_ones(layer):
    """Layer `layer`'s router without its learned scale (made ones)."""
    def make(hf, mp):
        with torch.no_grad():
            hf.model.layers[layer].router.scale.fill_(1.0)
    return make


def _router_root_d_one(layer):
    """Layer `layer`'s router without its hidden_size ** -0.5 (scalar_root_size made 1)."""
    return lambda hf, mp: mp.setattr(hf.model.layers[layer].router, "scalar_root_size", 1.0)


def _router_reads_expert_input(layer):
    def make(hf, mp):
        block = hf.model.layers[layer]
        real = block.router.forward
        mp.setattr(block.router, "forward", lambda x: real(block.pre_feedforward_layernorm_2(x)))
    return make


def _norm_in_float16(hf, mp):
    """Layer 0's input norm computed in float16 step by step (HF's upcasts to float32): x**2 overflows beyond
    |x| = 256."""
    norm = hf.model.layers[0].input_layernorm
    mp.setattr(norm, "forward", lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight)


def _float64_but_softmax(hf, mp):
    """HF float64 made float64 everywhere (hf_reference.gemma4_float64: the norms, the RoPE tables) but its
    softmaxes, which stay HF's own float32 ones (eager attention's and the router's dtype=torch.float32)."""
    from hf_reference import gemma4_float64, gemma4_module

    g4 = gemma4_module(hf)
    classes = (g4.Gemma4RMSNorm, g4.Gemma4TextRotaryEmbedding)
    undo = gemma4_float64(hf)
    made = [c.forward for c in classes]
    undo()  # torch's softmax as it was
    for c, forward in zip(classes, made):
        mp.setattr(c, "forward", forward)


def _positions_from_1(hf, mp):
    rot = hf.model.rotary_emb
    real = rot.forward
    mp.setattr(rot, "forward", lambda x, position_ids, layer_type: real(x, position_ids + 1, layer_type))


def _no_qk_norm(hf, mp):
    mp.setattr(hf.model.layers[0].self_attn, "q_norm", torch.nn.Identity())
    mp.setattr(hf.model.layers[0].self_attn, "k_norm", torch.nn.Identity())


def _kv_repeat(hf, mp):
    from transformers.models.gemma4 import modeling_gemma4 as g4

    mp.setattr(g4, "repeat_kv", lambda h, n: h if n == 1 else h.repeat(1, n, 1, 1))


def _kv_repeat_at_consumer(hf, mp):
    """Only layer 5 (a sliding KV-sharing consumer, its producer layer 3) repeats its kv heads with .repeat."""
    from transformers.models.gemma4 import modeling_gemma4 as g4

    real, at = g4.repeat_kv, {}
    for lay in hf.model.layers:  # which layer's attention runs (a pre-hook: before any attention function)
        lay.self_attn.register_forward_pre_hook(lambda m, a, kw: at.update(layer=m.layer_idx), with_kwargs=True)
    mp.setattr(g4, "repeat_kv", lambda h, n: h.repeat(1, n, 1, 1) if at.get("layer") == 5 and n > 1 else real(h, n))


def _config(**values):
    def make(hf, mp):
        for k, v in values.items():
            mp.setattr(hf.config, k, v)
    return make


def _unmasked_full_layer(hf, mp):
    """Layer 1 (full attention) attends without its causal mask."""
    from transformers.models.gemma4 import modeling_gemma4 as g4

    real = g4.eager_attention_forward
    mp.setattr(g4, "eager_attention_forward", lambda module, q, k, v, mask, *a, **kw: real(
        module, q, k, v, None if module.layer_idx == 1 else mask, *a, **kw))


def _v_rounded(dtype):
    """Layer 0's values stored in `dtype` (a KV cache of that dtype): v_norm's output rounded."""
    def make(hf, mp):
        hf.model.layers[0].self_attn.v_norm.register_forward_hook(lambda m, i, o: o.to(dtype).float())
    return make


def _unembed_scaled(hf, mp):
    hf.lm_head.register_forward_hook(lambda m, i, o: o * hf.model.embed_tokens.embed_scale)


def _old(breaker):
    return lambda hf, mp: breaker(hf)


ROUNDED_48 = {k: float(torch.tensor(math.sqrt(48), dtype=torch.float64).to(t)) for k, t in  # sqrt(D), D = 48
              (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32))}

# case id -> (mistake, the break (hf, monkeypatch), first wrong op, variants that compute the same values here,
# checkpoint overrides of tiny-gemma4, HF's dtype)
CASES = {
    # Gemma 4's own entries (GEMMA4_CATALOGUE)
    "kv_producer_llama_cpp_rule": ("kv_producer_llama_cpp_rule", _old(_llama_cpp_producer), "blocks.5.attn.scores"),
    "kv_producer_first_of_type": ("kv_producer_first_of_type", _old(_first_producer), "blocks.5.attn.scores"),
    "norm_one_plus_w": ("norm_one_plus_w", _old(_one_plus_w), "blocks.2.attn.out"),
    "v_norm_missing": ("v_norm_missing", _old(_no_v_norm), "blocks.3.attn.v"),
    "query_scale_head_dim_4": ("query_scale_head_dim_4", _old(_head_dim_scale), "blocks.1.attn.scores"),
    "layer_scalar_missing": ("layer_scalar_missing", _old(_no_layer_scalar), "blocks.2.resid_post"),
    "router_scale_missing": ("router_scale_missing", _router_scale_ones(0), "blocks.0.moe.router.logits"),
    "router_root_d_missing": ("router_root_d_missing", _router_root_d_one(2),
                              "blocks.2.moe.router.logits"),
    "router_reads_expert_input": ("router_reads_expert_input", _router_reads_expert_input(3),
                                  "blocks.3.moe.router.logits"),
    "per_expert_scale_dropped": ("per_expert_scale_dropped", _old(_no_per_expert_scale), "blocks.4.moe.topk.weight"),
    "topk_not_renormalised": ("topk_not_renormalised", _old(_not_renormalised), "blocks.0.moe.topk.weight"),
    "rope_partial_contiguous": ("rope_partial_contiguous", lambda hf, mp: _contiguous_rope(hf, mp),
                                "blocks.1.attn.q"),
    "rope_proportional_missing": ("rope_proportional_missing", _inv_freq("full_attention", 1e6),
                                  "blocks.1.attn.q"),
    "norm_in_float16": ("norm_in_float16", _norm_in_float16, "blocks.0.ln1.out", (), {"big_embedding": True},
                        "float16"),
    "softmax_in_float32": ("softmax_in_float32", _float64_but_softmax, "blocks.0.attn.pattern", (), {}, "float64"),
    # a port that ignores the proportional RoPE's factor (no released Gemma 4 config has one; Config reads it):
    # HF's full layers given the unscaled frequencies theta^(-2i/H) on their 4 rotated pairs
    "rope_scaling_missing": ("rope_scaling_missing", _inv_freq("full_attention", 1e6, rotated=4), "blocks.1.attn.q",
                             (), {"full_rope_factor": 8.0}),
    # the Gemma 1-3 entries that apply to Gemma 4 (CATALOGUE but catalogue.NOT_ON_GEMMA4), made right for it
    "norm_in_float32": ("norm_in_float32", None, "blocks.0.ln1.out", (), {"hidden_size_per_layer_input": 0},
                        "float64"),  # HF float64 as it is (its RMSNorm upcasts to float32); no PLE: see test below
    "norm_weights_swapped": ("norm_weights_swapped", _swapped_norm_weights, "blocks.1.attn.out"),
    "post_norm_missing": ("post_norm_missing", _post_norm_skipped("post_attention_layernorm"), "blocks.0.attn.out"),
    "post_norm_missing@mlp": ("post_norm_missing", _post_norm_skipped("post_feedforward_layernorm"),
                              "blocks.0.mlp.out"),
    "post_norm_missing@dense": ("post_norm_missing", _post_norm_skipped("post_feedforward_layernorm_1"),
                                "blocks.0.mlp.dense"),
    "post_norm_missing@experts": ("post_norm_missing", _post_norm_skipped("post_feedforward_layernorm_2"),
                                  "blocks.0.moe.out"),
    "post_norm_missing@ple": ("post_norm_missing", _post_norm_skipped("post_per_layer_input_norm"),
                              "blocks.0.ple.out"),
    "embed_scale_missing": ("embed_scale_missing", _embed_scale(1.0), "embed"),
    "embed_scale_missing@ple": ("embed_scale_missing", _embed_scale(1.0, "embed_tokens_per_layer"), "ple.token"),
    "embed_scale_in_bfloat16": ("embed_scale_in_bfloat16", _embed_scale(ROUNDED_48["bfloat16"]), "embed", (),
                                {"hidden_size": 48}),
    "embed_scale_in_float16": ("embed_scale_in_float16", _embed_scale(ROUNDED_48["float16"]), "embed", (),
                               {"hidden_size": 48}),
    "embed_scale_in_float32": ("embed_scale_in_float32", _embed_scale(ROUNDED_48["float32"]), "embed", (),
                               {"hidden_size": 48}, "float64"),
    "gelu_exact": ("gelu_exact", _exact_gelu("mlp"), "blocks.0.mlp.act"),
    # HF's expert loop keeps no per-expert tensor: the first wrong op spans the experts up to their sum, moe.down
    "gelu_exact@experts": ("gelu_exact", _exact_gelu("experts"), "blocks.0.moe.down"),
    "gelu_exact@ple": ("gelu_exact", _exact_gelu("ple"), "blocks.0.ple.act"),
    "geglu_swapped": ("geglu_swapped", _geglu_swapped, "blocks.0.mlp.act"),
    "rope_interleaved": ("rope_interleaved", _rope(_interleaved), "blocks.0.attn.q"),
    "rope_missing": ("rope_missing", _rope(lambda x, cos, sin: x), "blocks.0.attn.q"),
    # Gemma 4's bases are 10^4 on sliding layers and 10^6 on full ones: a base of 10^4 on a full layer is the
    # sliding layers' base there, and the other way round
    "rope_base_10000": ("rope_base_10000", _inv_freq("full_attention", 1e4, rotated=4), "blocks.1.attn.q",
                        ("rope_local_base_on_global",)),
    "rope_base_1000000": ("rope_base_1000000", _inv_freq("sliding_attention", 1e6), "blocks.0.attn.q",
                          ("rope_global_base_on_local",)),
    "rope_local_base_on_global": ("rope_local_base_on_global", _inv_freq("full_attention", 1e4, rotated=4),
                                  "blocks.1.attn.q", ("rope_base_10000",)),
    "rope_global_base_on_local": ("rope_global_base_on_local", _inv_freq("sliding_attention", 1e6),
                                  "blocks.0.attn.q", ("rope_base_1000000",)),
    "rope_positions_from_1": ("rope_positions_from_1", _positions_from_1, "blocks.0.attn.q"),
    "qk_norm_missing": ("qk_norm_missing", _no_qk_norm, "blocks.0.attn.q"),
    "kv_heads_interleaved": ("kv_heads_interleaved", _kv_repeat, "blocks.0.attn.scores"),
    "kv_heads_interleaved@consumer": ("kv_heads_interleaved", _kv_repeat_at_consumer, "blocks.5.attn.scores"),
    "sliding_window_missing": ("sliding_window_missing", _config(sliding_window=4096), "blocks.0.attn.pattern"),
    "sliding_window_plus_one": ("sliding_window_plus_one", _config(sliding_window=5), "blocks.0.attn.pattern"),
    "causal_mask_missing": ("causal_mask_missing", _unmasked_full_layer, "blocks.1.attn.pattern"),
    "kv_in_float16": ("kv_in_float16", _v_rounded(torch.float16), "blocks.0.attn.v"),
    "kv_in_bfloat16": ("kv_in_bfloat16", _v_rounded(torch.bfloat16), "blocks.0.attn.v"),
    "final_softcap_missing": ("final_softcap_missing", _config(final_logit_softcapping=None), "logits"),
    "unembed_scaled": ("unembed_scaled", _unembed_scaled, "logits_uncapped"),  # before the final soft-cap
}

# Entries that run on Gemma 4 but have no case here yet, and why (none may be left out silently)
NO_CASE = {
}


def _case(case_id):
    """-> mistake, break, site, synonyms, overrides, dtype (the last three default to (), {}, float32)."""
    mistake, brk, site, *rest = CASES[case_id]
    defaults = ((), {}, "float32")
    return (mistake, brk, site, *rest, *defaults[len(rest):])


def test_every_gemma4_mistake_has_a_case():
    """Every entry the diagnosis runs on Gemma 4 (GEMMA4_CATALOGUE and every CATALOGUE entry but NOT_ON_GEMMA4's)
    has a broken HF Gemma 4 here, or a reason in NO_CASE; NOT_ON_GEMMA4's entries do not run."""
    from refprism.crosscheck.catalogue import CATALOGUE, NOT_ON_GEMMA4, candidates
    from refprism.crosscheck.floors import profile_of

    cfg = Config.from_hf(make_config("tiny-gemma4"))
    runs = {m.name for dtype in ("float64", "float32", "float16") for m in candidates(profile_of(dtype), cfg)}
    assert runs == ({m.name for m in CATALOGUE} - set(NOT_ON_GEMMA4)) | {m.name for m in GEMMA4_CATALOGUE}
    assert set(NOT_ON_GEMMA4) < {m.name for m in CATALOGUE}
    assert {_case(c)[0] for c in CASES} | set(NO_CASE) == runs
    assert not {_case(c)[0] for c in CASES} & set(NO_CASE)


@pytest.fixture(scope="module")
def g4made(checkpoint, tmp_path_factory):
    """overrides -> a tiny Gemma 4 directory. {"full_rope_factor": f}: its full layers' proportional RoPE with
    factor f (frequencies / f), a nested config entry that checkpoint's cache key cannot hold;
    {"big_embedding": True}: its embedding 300 times larger (test_compare_catalogue.big_embedding)."""
    made = {}

    def get(overrides):
        if "big_embedding" in overrides:  # the embedding x 300: the residual stream passes |x| = 256
            from test_compare_catalogue import big_embedding

            if "big" not in made:
                made["big"] = big_embedding(checkpoint("tiny-gemma4"), tmp_path_factory.mktemp("g4big"))
            return made["big"]
        if "full_rope_factor" not in overrides:
            return checkpoint("tiny-gemma4", **overrides)
        f = overrides["full_rope_factor"]
        if f not in made:
            import copy

            from refprism.checkpoints.synth import write_checkpoint

            hf_cfg = copy.deepcopy(make_config("tiny-gemma4"))
            hf_cfg["rope_parameters"]["full_attention"]["factor"] = f
            made[f] = write_checkpoint(tmp_path_factory.mktemp("g4rope") / "model", hf_cfg)
        return made[f]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_gemma4_mistake_is_found_and_diagnosed(g4made, case, monkeypatch):
    mistake, brk, site, synonyms, overrides, dtype = _case(case)
    d = g4made(overrides)
    hf = other_hf.load(d, dtype)
    if brk is not None:
        brk(hf, monkeypatch)
    r = compare(refprism.load(d), IDS, against=hf, dtype=dtype)
    assert r.exit_status == 1
    assert r.first_wrong_op == site, (r.first_wrong_op, r.table())
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert mistake in explained and set(explained) <= {mistake, *synonyms}, r.diagnosis


def test_hf_float64_with_per_layer_inputs_is_located_at_them(g4dir):
    """HF float64 as it is on a model with per-layer inputs: its float32 RMSNorm first shows at ple.input =
    (norm + token) / sqrt(2), whose float64 steps leave no float32 fingerprint: located, and not claimed by
    norm_in_float32 (catalogue's NORM_OUTPUTS_4 note)."""
    r = compare(refprism.load(g4dir), IDS, against=other_hf.load(g4dir, "float64"), dtype="float64")
    assert r.first_wrong_op == "ple.input", r.table()
    assert not any(d["explains"] for d in r.diagnosis), r.diagnosis


def test_tl_gemma4_is_within_every_floor_and_a_planted_mistake_is_named(g4dir):
    """TransformerLens 4.3's TransformerBridge (gemma4_text adapter) on the tiny Gemma 4: an honest run is within
    every floor of the 191 sites it hooks; its attn.hook_attn_scores holds the pattern, not the scores (so it is not
    mapped: checked here); layer_scalar removed in the bridge's own HF model is found at the layer's resid_post and
    named alone."""
    from refprism.crosscheck.sides.tl import boot

    ours = refprism.load(g4dir)
    bridge = boot(g4dir)
    r = compare(ours, IDS, against=bridge)
    assert r.exit_status == 0, r.table()
    assert len(r.sites) > 150 and not any(s.site.endswith("attn.scores") for s in r.sites)
    _, cache = bridge.run_with_cache(torch.tensor([IDS]))
    for l in (0, 4):
        np.testing.assert_array_equal(cache[f"blocks.{l}.attn.hook_attn_scores"].numpy(),
                                      cache[f"blocks.{l}.attn.hook_pattern"].numpy())
    _no_layer_scalar(bridge.original_model)
    r = compare(ours, IDS, against=bridge)
    assert r.exit_status == 1 and r.first_wrong_op == "blocks.2.resid_post", r.table()
    assert [d["variant"] for d in r.diagnosis if d["explains"]] == ["layer_scalar_missing"], r.diagnosis


def test_llama_cpp_runs_tiny_gemma4_close_to_refprism_with_ggmls_gelu(checkpoint, tmp_path):
    """llama.cpp's own Gemma 4 (llama-cpp-python 0.3.36, in process) on a tiny GGUF with every feature on, in a
    layer layout llama.cpp's KV-sharing rule takes (the last non-shared layers sliding then full: docs/gemma4.md),
    F32 weights, f32 KV cache; refprism computing ggml's f16 GELU table (crosscheck.ggml.gelu_f16_table). Measured:
    8e-4 of the largest |logit| (docs/gemma4.md: one gate element on an f16 rounding boundary of the GELU table,
    rounded apart by float32 and llama.cpp, carried on by the sliding window). A Gemma 4 trap is O(1) off: the
    port that forgets layer_scalar is shown to miss by far more than the bound."""
    import json

    import llama_cpp
    from safetensors.numpy import load_file
    from test_gguf_gemma4 import write_gemma4_gguf

    from refprism.crosscheck.ggml import gelu_f16_table
    from refprism.crosscheck.sides.llamacpp import _no_extra_buffers, _quiet_stderr

    S, F = "sliding_attention", "full_attention"
    d = checkpoint("tiny-gemma4", layer_types=(S, F, S, F, S, F, F))
    hf, tensors = json.loads((d / "config.json").read_text()), load_file(d / "model.safetensors")
    path = write_gemma4_gguf(tmp_path / "g4.gguf", hf, tensors, split_experts=True, tokenizer_model="llama")
    ours = refprism.load(path)
    ids = list(range(4, 20))
    _no_extra_buffers(llama_cpp)
    with _quiet_stderr():
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, verbose=False,
                              n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                              flash_attn=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])

    def ggml_gelu(name, v, rec):
        for act, gate, up in (("mlp.act", "mlp.gate", "mlp.up"), ("moe.act", "moe.gate", "moe.up")):
            if name.endswith(act):
                return gelu_f16_table(rec[name.replace(act, gate)]) * rec[name.replace(act, up)]
        if name.endswith("ple.act"):
            l = int(name.split(".")[1])
            return gelu_f16_table(rec[name.replace("ple.act", "ple.gate")]) * rec["ple.input"][:, l]
        return v

    mine = ours.run(ids, edit=ggml_gelu).logits
    bound = 3e-3 * np.abs(mine).max()
    assert np.abs(theirs - mine).max() <= bound
    # the bound is narrow enough to catch a Gemma 4 trap: a port that forgets layer_scalar (the catalogue's
    # layer_scalar_missing), planted as an edit dividing each layer's output by its scalar, is far outside it
    def no_layer_scalar(name, v, rec):
        v = ggml_gelu(name, v, rec)
        if name.endswith("resid_post"):
            return v / ours.params.get(int(name.split(".")[1]), "layer_scalar")
        return v

    off = np.abs(theirs - ours.run(ids, edit=no_layer_scalar).logits).max()
    assert off > 10 * bound, off
