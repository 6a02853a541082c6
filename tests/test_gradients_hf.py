"""The whole-model gradient of a readout with respect to every recorded site, against torch autograd on HF
transformers' own model (tiny Gemma 1, 2, 3 in float64): relative error <= 1e-8 per site.

HF computes RMSNorm, the eager softmax and the RoPE tables in float32 even in a float64 model, so this test's own
copy of HF patches those three in float64 (the same math, written here in torch, not refprism's), and checks the
patched model first: its forward equals refprism's to 1e-12 and its autograd gradient equals central differences
of its own forward. Gradients of intermediate tensors come from retain_grad on the tensors HF's modules pass
(module inputs and outputs, the eager attention function's arguments and values); the norm scales s are the
tensors the patched norm forms. torch is the reference only here: refprism's backward is NumPy.

Tolerance: both sides compute the same float64 function in different orders; the gradients pass through ~20 ops
whose condition numbers on these random O(1) weights are small, so 1e-8 of the site's largest |gradient| leaves
a wide margin above rounding (measured ~1e-14 .. 1e-12) and far below any wrong derivative (O(1)).
"""

import contextlib

import numpy as np
import pytest
import torch
from hf_reference import load_hf
from transformers.models.gemma import modeling_gemma
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3

import refprism
from refprism.gemma.record import expected_shapes
from refprism.gradients.backward import gradients

MODULES = {"gemma": (modeling_gemma, "GemmaRMSNorm", "GemmaRotaryEmbedding"),
           "gemma2": (modeling_gemma2, "Gemma2RMSNorm", "Gemma2RotaryEmbedding"),
           "gemma3_text": (modeling_gemma3, "Gemma3RMSNorm", "Gemma3RotaryEmbedding")}


@contextlib.contextmanager
def float64_hf(model_type, captured):
    """Patch HF's RMSNorm, RoPE tables and eager attention to float64 (and capture their tensors) for the block."""
    module, norm_cls, rope_cls = MODULES[model_type]
    norm, rope = getattr(module, norm_cls), getattr(module, rope_cls)
    saved = norm.forward, rope.forward, module.eager_attention_forward

    def norm_forward(self, x):
        s = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x / s * (1.0 + self.weight)
        captured.setdefault("norm", []).append((self, x, s, y))
        return y

    def rope_forward(self, x, position_ids, layer_type=None):
        params = self.config.rope_parameters if layer_type is None else self.config.rope_parameters[layer_type]
        H = self.config.head_dim
        inv = params["rope_theta"] ** (-torch.arange(0, H, 2, dtype=torch.float64) / H)
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def attention(mod, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        groups = mod.num_key_value_groups
        k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        a = scores if softcap is None else torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            a = a + attention_mask
        pattern = torch.softmax(a, dim=-1)
        z = torch.matmul(pattern, v)
        captured.setdefault("attn", []).append((mod, query, key, value, scores, pattern, z))
        return z.transpose(1, 2).contiguous(), pattern

    norm.forward, rope.forward, module.eager_attention_forward = norm_forward, rope_forward, attention
    try:
        yield
    finally:
        norm.forward, rope.forward, module.eager_attention_forward = saved


def hf_sites(hf, model_type, embed):
    """One HF forward from inputs_embeds = refprism's embed (float64): {site name: tensor [1, ...]} of the tensors
    refprism records, each with retain_grad, and the pre-cap and capped logits."""
    cfg = hf.config
    names = {id(m): n for n, m in hf.named_modules()}
    captured, sites, handles = {}, {}, []
    gemma1 = model_type == "gemma"

    def keep(name, t):
        if t.requires_grad:
            t.retain_grad()
        sites[name] = t

    def out_hook(name):
        return lambda mod, inp, out: keep(name, out)

    def in_hook(name):
        return lambda mod, inp: keep(name, inp[0])

    for l, layer in enumerate(hf.model.layers):
        b = f"blocks.{l}."
        a, m = layer.self_attn, layer.mlp
        handles += [a.q_proj.register_forward_hook(out_hook(b + "attn.q_pre")),
                    a.k_proj.register_forward_hook(out_hook(b + "attn.k_pre")),
                    a.v_proj.register_forward_hook(out_hook(b + "attn.v")),
                    a.o_proj.register_forward_hook(out_hook(b + ("attn.out" if gemma1 else "attn.o_proj"))),
                    m.gate_proj.register_forward_hook(out_hook(b + "mlp.gate")),
                    m.up_proj.register_forward_hook(out_hook(b + "mlp.up")),
                    m.down_proj.register_forward_pre_hook(in_hook(b + "mlp.act")),
                    m.down_proj.register_forward_hook(out_hook(b + ("mlp.out" if gemma1 else "mlp.down")))]
    handles.append(hf.lm_head.register_forward_hook(out_hook("logits_uncapped")))
    leaf = torch.tensor(embed[None], requires_grad=True)
    try:
        with float64_hf(model_type, captured):
            logits = hf(inputs_embeds=leaf).logits
    finally:
        for h in handles:
            h.remove()
    sites["embed"] = leaf
    if getattr(cfg, "final_logit_softcapping", None) is None:
        sites["logits"] = sites.pop("logits_uncapped")
    else:
        keep("logits", logits)
    role = {"input_layernorm": ("ln1", "resid_pre"), "post_attention_layernorm": ("ln2", "resid_mid") if gemma1
            else ("ln1_post", None), "pre_feedforward_layernorm": ("ln2", "resid_mid"),
            "post_feedforward_layernorm": ("ln2_post", None), "q_norm": ("attn.q_norm", None),
            "k_norm": ("attn.k_norm", None)}
    L = cfg.num_hidden_layers
    for mod, x, s, y in captured["norm"]:
        name = names[id(mod)]
        if name == "model.norm":
            keep("ln_final.scale", s)
            keep("ln_final.out", y)
            keep(f"blocks.{L - 1}.resid_post", x)
            continue
        parts = name.split(".")
        b, (short, resid) = f"blocks.{parts[2]}.", role[parts[-1]]
        keep(b + short + ".scale", s)
        if resid is not None:
            keep(b + resid, x)
            keep(b + short + ".out", y)
        elif short == "ln1_post":
            keep(b + "attn.out", y)
        elif short == "ln2_post":
            keep(b + "mlp.out", y)
    for mod, q, k, _v, scores, pattern, z in captured["attn"]:
        b = f"blocks.{mod.layer_idx}."
        keep(b + "attn.q", q)
        keep(b + "attn.k", k)
        keep(b + "attn.scores", scores)
        keep(b + "attn.pattern", pattern)
        keep(b + "attn.z", z)
    for l in range(L - 1):
        sites[f"blocks.{l}.resid_post"] = sites[f"blocks.{l + 1}.resid_pre"]
    return sites


def as_site(name, t, cfg, T):
    """HF's tensor [1, ...] (or its gradient) in refprism's layout for site `name`."""
    a = t.detach().numpy()[0]
    H = cfg.d_head
    site = name.split(".", 2)[-1]
    if site in ("attn.q_pre", "attn.k_pre", "attn.v"):
        return a.reshape(T, -1, H)
    if site in ("attn.q", "attn.k", "attn.z"):
        return a.transpose(1, 0, 2)  # [heads, T, H] -> [T, heads, H]
    if site in ("attn.q_norm.scale", "attn.k_norm.scale"):
        return a[..., 0].T  # [heads, T, 1] -> [T, heads]
    if site.endswith("scale"):
        return a[..., 0]
    return a


def readout_of(sites, cfg, p, ids, coef, kind):
    raw = sites["logits_uncapped" if cfg.final_softcap is not None else "logits"][0, p]
    if kind == "logit":
        return [(c * raw[ids]).sum() for c in torch.tensor(coef)]
    lp = torch.log_softmax(sites["logits"][0, p], dim=-1)
    return [(c * lp[ids]).sum() for c in torch.tensor(coef)]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_gradient_equals_torch_autograd_on_hf(checkpoint, preset):
    d = checkpoint(preset)
    ours = refprism.load(d, dtype="float64")
    hf = load_hf(d, "float64")
    cfg = ours.config
    T, p = 9, 7  # longer than Gemma 2/3's window of 4; the readout not at the last position
    ids = np.random.default_rng(18).integers(0, cfg.vocab_size, T)
    run = ours.run(ids)
    names = expected_shapes(cfg, T)
    errors = {}
    for kind in ("logit", "logprob"):
        grads = gradients(ours, run, targets=["#5", "#11"], versus=["#3"], position=p, readout=kind)
        tg_ids, coef = grads.targets.coefficients(np.float64)
        sites = hf_sites(hf, cfg.model_type, run.record["embed"])
        if kind == "logit":  # the patched HF is refprism's function: every site within 1e-12
            for name in names:
                ref = as_site(name, sites[name], cfg, T)
                assert np.abs(ref - run.record[name]).max() <= 1e-12 * max(1.0, np.abs(ref).max()), name
        rows = readout_of(sites, cfg, p, tg_ids, coef, kind)
        np.testing.assert_allclose([r.item() for r in rows], grads.value, rtol=1e-12)
        for z, r in enumerate(rows):
            for t in sites.values():
                t.grad = None
            r.backward(retain_graph=True)
            if kind == "logit" and z == 0:  # the reference's own gradient against central differences
                direction = np.random.default_rng(z).standard_normal((T, cfg.d_model))
                g = sites["embed"].grad.numpy()[0]

                def value(e, tg_ids=tg_ids, coef=coef, kind=kind):
                    with torch.no_grad():
                        s = hf_sites(hf, cfg.model_type, e)
                    return readout_of(s, cfg, p, tg_ids, coef, kind)[0].item()

                h = 1e-6
                fd = (value(run.record["embed"] + h * direction) - value(run.record["embed"] - h * direction)) / (2 * h)
                assert abs(fd - (g * direction).sum()) <= 1e-6 * abs(fd), (fd, (g * direction).sum())
            for name in names:
                t = sites[name]
                ref = np.zeros(names[name]) if t.grad is None else as_site(name, t.grad, cfg, T)
                mine = grads.record[name][z]
                scale = np.abs(ref).max()
                err = np.abs(mine - ref).max() / (scale if scale > 0 else 1.0)
                errors[(kind, z, name)] = err
                assert err <= 1e-8, f"{preset} {kind} row {z} {name}: rel err {err:.2e} (max |grad| {scale:.3g})"
    assert max(errors.values()) <= 1e-8
    print(f"{preset}: max rel err over {len(errors)} (readout, row, site) = {max(errors.values()):.2e}")
