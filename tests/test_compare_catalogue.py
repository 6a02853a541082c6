"""Every catalogued mistake, made independently in HF transformers, is found and diagnosed by `refprism.compare`.

Each case takes a tiny checkpoint, loads it with HF's own Gemma classes, breaks one thing in torch (a patched
module, buffer, attribute or module-level function of the family's modeling file: never refprism code) and
compares: the first wrong op must be exactly the op that was broken and the diagnosis must name the mistake
(and no mistake that does not reproduce). A test checks that every catalogue entry has a case here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import refprism
from refprism.crosscheck import CATALOGUE, TOKEN_MISTAKES, catalogue, compare, replay
from refprism.crosscheck.sides import hf as other_hf

IDS = [2, 455, 17, 301, 88, 260, 41, 7, 130]  # BOS first; longer than the tiny window of 4


def hf_of(d, dtype="float32"):
    """A fresh HF model (patches never leak between cases)."""
    return other_hf.load(d, dtype)


def family(model):
    import sys

    return sys.modules[type(model.model.layers[0].self_attn).__module__]


def layer(model, l):
    return model.model.layers[l]


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------ the broken models
# Each maker takes the HF model and pytest's monkeypatch and breaks one thing.


def norm_w(model, mp):
    """Layer 1's MLP input norm (Gemma 1: post_attention_layernorm) scales by w instead of 1 + w."""
    norm = layer(model, 1).post_attention_layernorm
    mp.setattr(norm, "forward", lambda x: (_rms(x.float(), norm.eps) * norm.weight.float()).type_as(x))


def norm_in_float16(model, mp):
    """Layer 0's input norm computed in float16 step by step (no upcast): x**2 overflows beyond |x| = 256."""
    norm = layer(model, 0).input_layernorm
    mp.setattr(norm, "forward", lambda x: _rms(x, norm.eps) * (1.0 + norm.weight))


def norm_weights_swapped(model, mp):
    """Gemma 2 layer 1: post_attention_layernorm and pre_feedforward_layernorm hold each other's weights."""
    a, b = layer(model, 1).post_attention_layernorm, layer(model, 1).pre_feedforward_layernorm
    with torch.no_grad():
        wa = a.weight.clone()
        a.weight.copy_(b.weight)
        b.weight.copy_(wa)


def post_norm_missing(model, mp):
    mp.setattr(layer(model, 0), "post_attention_layernorm", torch.nn.Identity())


def embed_scale(value):
    def make(model, mp):
        model.model.embed_tokens.embed_scale.fill_(value)
    return make


def gelu_exact(model, mp):
    mp.setattr(layer(model, 1).mlp, "act_fn", torch.nn.GELU())  # approximate="none": erf


def geglu_swapped(model, mp):
    m = layer(model, 0).mlp
    mp.setattr(m, "forward", lambda x: m.down_proj(m.act_fn(m.up_proj(x)) * m.gate_proj(x)))


def _rope_patch(rotate):
    def make(model, mp):
        fam = family(model)
        mp.setattr(fam, "apply_rotary_pos_emb",
                   lambda q, k, cos, sin, unsqueeze_dim=1: (rotate(q, cos, sin), rotate(k, cos, sin)))
    return make


def _interleaved(x, cos, sin):
    """Llama's original RoPE: pairs (2i, 2i+1) rotated by angle i."""
    c, s = cos[:, None, :, : x.shape[-1] // 2], sin[:, None, :, : x.shape[-1] // 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2)


def _inv_freq(base, dim, scale=1.0):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)) / scale


def rope_base(base, buffer="inv_freq"):
    def make(model, mp):
        getattr(model.model.rotary_emb, buffer).copy_(_inv_freq(base, model.config.head_dim))
    return make


def rope_positions_from_1(model, mp):
    rot = model.model.rotary_emb
    real = rot.forward
    mp.setattr(rot, "forward", lambda x, position_ids, *a: real(x, position_ids + 1, *a))


def qk_norm_missing(model, mp):
    mp.setattr(layer(model, 0).self_attn, "q_norm", torch.nn.Identity())
    mp.setattr(layer(model, 0).self_attn, "k_norm", torch.nn.Identity())


def attention_attr(l, **values):
    def make(model, mp):
        for k, v in values.items():
            mp.setattr(layer(model, l).self_attn, k, v)
    return make


def kv_heads_interleaved(model, mp):
    mp.setattr(family(model), "repeat_kv", lambda h, n: h if n == 1 else h.repeat(1, n, 1, 1))


def sliding_window_missing(model, mp):
    types = list(model.config.layer_types)
    types[0] = "full_attention"  # Gemma 2: the layer type selects only the mask (one RoPE for all layers)
    mp.setattr(model.config, "layer_types", types)


def config_attr(**values):
    def make(model, mp):
        for k, v in values.items():
            mp.setattr(model.config, k, v)
    return make


def causal_mask_missing(model, mp):
    fam = family(model)
    real = fam.eager_attention_forward

    def unmasked(module, q, k, v, mask, *a, **kw):
        return real(module, q, k, v, None if module.layer_idx == 0 else mask, *a, **kw)

    mp.setattr(fam, "eager_attention_forward", unmasked)


def kv_in(dtype):
    """A KV cache in `dtype`: keys rounded after RoPE, values after v_proj."""
    def make(model, mp):
        fam = family(model)
        real = fam.apply_rotary_pos_emb

        def rope(q, k, cos, sin, unsqueeze_dim=1):
            q, k = real(q, k, cos, sin, unsqueeze_dim)
            return q, k.to(dtype).float()

        mp.setattr(fam, "apply_rotary_pos_emb", rope)
        for lay in model.model.layers:
            lay.self_attn.v_proj.register_forward_hook(lambda m, i, o: o.to(dtype).float())
    return make


def float64_but_softmax(model, mp):
    """HF float64 made float64 everywhere but its softmax: every RMSNorm in float64 (HF's upcasts to float32) and
    the RoPE tables in float64 (HF's are float32)."""
    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            mp.setattr(module, "forward", lambda x, m=module: _rms(x, m.eps) * (1.0 + m.weight))
    rot = model.model.rotary_emb
    base = model.config.rope_parameters["rope_theta"]
    H = model.config.head_dim
    inv = 1.0 / (base ** (torch.arange(0, H, 2, dtype=torch.float64) / H))

    def tables(x, position_ids):
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    mp.setattr(rot, "forward", tables)


def unembed_scaled(model, mp):
    model.lm_head.register_forward_hook(lambda m, i, o: o * model.model.embed_tokens.embed_scale)


def big_embedding(d, tmp_path, factor=300.0):
    """A copy of a checkpoint whose embedding is `factor` times larger: the residual stream passes |x| = 256."""
    out = tmp_path / "big"
    import shutil

    shutil.copytree(d, out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * np.float32(factor)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# (case id, mistake, checkpoint preset + overrides, HF dtype, the break, first wrong op, variants that may also
# explain it because on this model they compute the same values)
CASES = [
    ("norm_w", "norm_w", ("tiny", {}), "float32", norm_w, "blocks.1.ln2.out", ()),
    ("norm_in_float32", "norm_in_float32", ("tiny", {}), "float64", None, "blocks.0.ln1.out", ()),
    ("norm_in_float16", "norm_in_float16", ("big", {}), "float16", norm_in_float16, "blocks.0.ln1.out", ()),
    ("norm_weights_swapped", "norm_weights_swapped", ("tiny-gemma2", {}), "float32", norm_weights_swapped,
     "blocks.1.attn.out", ()),
    ("post_norm_missing", "post_norm_missing", ("tiny-gemma3", {}), "float32", post_norm_missing,
     "blocks.0.attn.out", ()),
    ("embed_scale_missing", "embed_scale_missing", ("tiny", {}), "float32", embed_scale(1.0), "embed", ()),
    ("embed_scale_in_bfloat16", "embed_scale_in_bfloat16", ("tiny", {"hidden_size": 48}), "float32",
     embed_scale(float(torch.tensor(math.sqrt(48)).bfloat16())), "embed", ()),
    ("embed_scale_in_float16", "embed_scale_in_float16", ("tiny", {"hidden_size": 48}), "float32",
     embed_scale(float(torch.tensor(math.sqrt(48)).half())), "embed", ()),
    ("embed_scale_in_float32", "embed_scale_in_float32", ("tiny", {"hidden_size": 48}), "float64",
     embed_scale(float(np.float32(math.sqrt(48)))), "embed", ()),
    ("gelu_exact", "gelu_exact", ("tiny", {}), "float32", gelu_exact, "blocks.1.mlp.act", ()),
    ("geglu_swapped", "geglu_swapped", ("tiny-gemma2", {}), "float32", geglu_swapped, "blocks.0.mlp.act", ()),
    ("rope_interleaved", "rope_interleaved", ("tiny", {}), "float32", _rope_patch(_interleaved),
     "blocks.0.attn.q", ()),
    ("rope_missing", "rope_missing", ("tiny-gemma2", {}), "float32", _rope_patch(lambda x, c, s: x),
     "blocks.0.attn.q", ()),
    ("rope_base_10000", "rope_base_10000", ("tiny", {"rope_theta": 500.0}), "float32", rope_base(10_000.0),
     "blocks.0.attn.q", ()),
    ("rope_base_1000000", "rope_base_1000000", ("tiny", {}), "float32", rope_base(1_000_000.0),
     "blocks.0.attn.q", ()),
    ("rope_local_base_on_global", "rope_local_base_on_global", ("tiny-gemma3", {}), "float32",
     rope_base(10_000.0, "full_attention_inv_freq"), "blocks.1.attn.q", ("rope_base_10000",)),
    ("rope_global_base_on_local", "rope_global_base_on_local", ("tiny-gemma3", {}), "float32",
     rope_base(1_000_000.0, "sliding_attention_inv_freq"), "blocks.0.attn.q", ("rope_base_1000000",)),
    ("rope_scaling_missing", "rope_scaling_missing", ("tiny-gemma3", {"rope_scaling": "linear4"}), "float32",
     rope_base(1_000_000.0, "full_attention_inv_freq"), "blocks.1.attn.q", ()),
    ("rope_positions_from_1", "rope_positions_from_1", ("tiny", {}), "float32", rope_positions_from_1,
     "blocks.0.attn.q", ()),
    ("qk_norm_missing", "qk_norm_missing", ("tiny-gemma3", {}), "float32", qk_norm_missing, "blocks.0.attn.q", ()),
    ("query_scale_head_dim", "query_scale_head_dim", ("tiny-gemma2", {}), "float32",
     attention_attr(1, scaling=16 ** -0.5), "blocks.1.attn.scores", ()),
    ("query_scale_d_model_over_heads", "query_scale_d_model_over_heads", ("tiny-gemma2", {"hidden_size": 80}),
     "float32", attention_attr(0, scaling=20 ** -0.5), "blocks.0.attn.scores", ()),
    ("query_scale_missing", "query_scale_missing", ("tiny", {}), "float32", attention_attr(1, scaling=1.0),
     "blocks.1.attn.scores", ()),
    ("kv_heads_interleaved", "kv_heads_interleaved", ("tiny", {}), "float32", kv_heads_interleaved,
     "blocks.0.attn.scores", ()),
    ("attn_softcap_missing", "attn_softcap_missing", ("tiny-gemma2", {}), "float32",
     attention_attr(1, attn_logit_softcapping=None), "blocks.1.attn.pattern", ()),
    ("sliding_window_missing", "sliding_window_missing", ("tiny-gemma2", {}), "float32", sliding_window_missing,
     "blocks.0.attn.pattern", ()),
    ("sliding_window_plus_one", "sliding_window_plus_one", ("tiny-gemma2", {}), "float32",
     config_attr(sliding_window=5), "blocks.0.attn.pattern", ()),
    ("causal_mask_missing", "causal_mask_missing", ("tiny", {}), "float32", causal_mask_missing,
     "blocks.0.attn.pattern", ()),
    ("softmax_in_float32", "softmax_in_float32", ("tiny", {}), "float64", float64_but_softmax,
     "blocks.0.attn.pattern", ()),
    ("kv_in_float16", "kv_in_float16", ("tiny", {}), "float32", kv_in(torch.float16), "blocks.0.attn.v", ()),
    ("kv_in_bfloat16", "kv_in_bfloat16", ("tiny", {}), "float32", kv_in(torch.bfloat16), "blocks.0.attn.v", ()),
    ("final_softcap_missing", "final_softcap_missing", ("tiny-gemma2", {}), "float32",
     config_attr(final_logit_softcapping=None), "logits", ()),
    ("unembed_scaled", "unembed_scaled", ("tiny", {}), "float32", unembed_scaled, "logits", ()),
]


@pytest.fixture(scope="module")
def made(checkpoint, tmp_path_factory):
    """(preset, overrides) -> checkpoint directory, including the large-embedding and linear-RoPE variants."""
    cache = {}

    def get(preset, overrides):
        key = (preset, tuple(sorted(overrides.items())))
        if key not in cache:
            if preset == "big":
                cache[key] = big_embedding(checkpoint(), tmp_path_factory.mktemp("big"))
            elif overrides.get("rope_scaling") == "linear4":
                from refprism.checkpoints.synth import make_config, write_checkpoint

                hf_cfg = make_config(preset)
                hf_cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
                cache[key] = write_checkpoint(tmp_path_factory.mktemp("lin") / "m", hf_cfg)
            else:
                cache[key] = checkpoint(preset, **overrides)
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_mistake_is_found_and_diagnosed(case, made, monkeypatch):
    _, mistake, (preset, overrides), dtype, brk, site, synonyms = case
    d = made(preset, overrides)
    ours = refprism.load(d)
    model = hf_of(d, dtype)
    if brk is not None:
        brk(model, monkeypatch)
    r = compare(ours, IDS, against=model, dtype=dtype)
    assert r.tokens_match
    assert r.first_wrong_op == site, (r.first_wrong_op, r.wrong_ops[:5], r.table())
    assert r.exit_status == 1
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert mistake in explained, r.diagnosis
    assert set(explained) <= {mistake, *synonyms}, explained
    for d in r.diagnosis:  # every claim is backed: its error within the floor (or the rounding evidence)
        if d["explains"] and "evidence" not in d:
            assert d["max_abs"] <= d["floor"]
    line = "\n".join(r.diagnosis_lines())
    assert mistake in line and "behaves like refprism" in line


def test_every_catalogue_entry_has_a_broken_implementation():
    tested = {c[1] for c in CASES} | set(TOKEN_TESTS)
    assert tested == {m.name for m in CATALOGUE} | set(TOKEN_MISTAKES)


TOKEN_TESTS = {"missing_bos": lambda ids: ids[1:], "double_bos": lambda ids: [2] + ids}


@pytest.mark.parametrize("mistake", list(TOKEN_TESTS))
def test_token_mistakes_stop_the_comparison_and_are_named(mistake, checkpoint, capsys):
    d = checkpoint()
    theirs = other_hf.capture(hf_of(d), TOKEN_TESTS[mistake](IDS))
    r = compare(refprism.load(d), IDS, against=theirs)
    assert not r.tokens_match and r.exit_status == 2 and r.sites == []
    assert [x["variant"] for x in r.diagnosis if x["explains"]] == [mistake]
    position, ours, theirs = {"missing_bos": (0, "2 (<bos>)", "455 ("),
                              "double_bos": (1, "455 (", "2 (<bos>)")}[mistake]
    assert r.headline().startswith(f"tokens differ at position {position}: ours {ours}")
    assert f"theirs {theirs}" in r.headline() and TOKEN_MISTAKES[mistake] in r.headline()
    assert r.to_json()["token_mismatch"]["position"] == position


def test_one_op_of_one_layer_is_the_first_wrong_op_though_everything_after_differs(checkpoint, monkeypatch):
    """gelu_exact in layer 0 only: every later site differs from the reference, but each later op, run on the
    other side's own inputs, is right: the local errors name exactly one op."""
    d = checkpoint("tiny-gemma3")
    model = hf_of(d)
    monkeypatch.setattr(layer(model, 0).mlp, "act_fn", torch.nn.GELU())
    r = compare(refprism.load(d), IDS, against=model)
    assert r.wrong_ops == ["blocks.0.mlp.act"]
    assert r.first_divergence == "blocks.0.mlp.act"
    after = [s for s in r.sites if [x.site for x in r.sites].index(s.site) > [x.site for x in r.sites].index(
        "blocks.0.mlp.act")]
    assert after and all(s.diverges for s in after), [s.site for s in after if not s.diverges]
    assert [x["variant"] for x in r.diagnosis if x["explains"]] == ["gelu_exact"]


def test_when_no_catalogued_mistake_reproduces_it_says_so(checkpoint, monkeypatch):
    """An uncatalogued mistake (layer 1's up_proj output doubled): the op is found, nothing is claimed."""
    d = checkpoint()
    model = hf_of(d)
    layer(model, 1).mlp.up_proj.register_forward_hook(lambda m, i, o: o * 1.001)
    r = compare(refprism.load(d), IDS, against=model)
    assert r.first_wrong_op == "blocks.1.mlp.up"
    assert not any(x["explains"] for x in r.diagnosis)
    assert "no catalogued mistake acts at blocks.1.mlp.up" in "\n".join(r.diagnosis_lines())


def test_diagnosis_costs_one_layer_per_mistake_not_a_forward_per_site(checkpoint, monkeypatch):
    """The replay stops at the wrong op: trying the mistakes at layer 1 never runs layer 0 again."""
    d = checkpoint()
    model = hf_of(d)
    monkeypatch.setattr(layer(model, 1).mlp, "act_fn", torch.nn.GELU())
    calls = []
    real = replay.forward

    def counting(*a, **kw):
        calls.append(kw.get("resume"))
        return real(*a, **kw)

    monkeypatch.setattr(replay, "forward", counting)  # R, F, P, Q
    monkeypatch.setattr(catalogue, "forward", counting)  # the diagnosis' partial replays
    r = compare(refprism.load(d), IDS, against=model)
    assert r.first_wrong_op == "blocks.1.mlp.act"
    assert len(calls) == 4 + sum(1 for x in r.diagnosis)  # R, F, P, Q, then one partial replay per mistake tried
    assert all(c is not None and c[0] == 1 for c in calls[4:])


# The negative control of the half-precision floors: honest bfloat16 / float16 runs pass (tests/test_compare.py,
# tests/test_compare_hf.py), so a floor wide enough to pass anything would pass too. These mistakes, large (a
# norm scaling by w, a missing post-norm) and small (the RoPE base 10^6 for 10^4: every angle slightly off), must
# still be found at the op that was broken, and diagnosed, with HF computing in that dtype.
HALF_CASES = ["norm_w", "post_norm_missing", "rope_base_1000000", "rope_interleaved"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in HALF_CASES],
                         ids=[c[0] for c in CASES if c[0] in HALF_CASES])
def test_mistakes_are_found_at_half_precision(case, dtype, made, monkeypatch):
    _, mistake, (preset, overrides), _, brk, site, synonyms = case
    d = made(preset, overrides)
    model = hf_of(d, dtype)
    brk(model, monkeypatch)
    r = compare(refprism.load(d), IDS, against=model, dtype=dtype)
    assert r.tokens_match and r.exit_status == 1
    assert r.first_wrong_op == site, (r.first_wrong_op, r.wrong_ops[:5], r.table())
    explained = [x["variant"] for x in r.diagnosis if x["explains"]]
    assert mistake in explained and set(explained) <= {mistake, *synonyms}, r.diagnosis
