"""refprism compare --against hf on Gemma 4 (the tiny preset with every feature on): an honest HF run is within
every floor; each Gemma 4 trap, planted in HF's own torch model (a patched module, buffer, attribute or the
modeling file's rotation function: never refprism code), is found at its first wrong op and named by the
catalogue's Gemma 4 entries (crosscheck.catalogue.GEMMA4_CATALOGUE), which a test checks all have a case here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import refprism
from refprism.crosscheck import compare
from refprism.crosscheck.catalogue import GEMMA4_CATALOGUE
from refprism.crosscheck.sides import hf as other_hf

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


CASES = {
    "norm_one_plus_w": (_one_plus_w, "blocks.2.attn.out"),
    "v_norm_missing": (_no_v_norm, "blocks.3.attn.v"),
    "query_scale_head_dim_4": (_head_dim_scale, "blocks.1.attn.scores"),
    "layer_scalar_missing": (_no_layer_scalar, "blocks.2.resid_post"),
    "per_expert_scale_dropped": (_no_per_expert_scale, "blocks.4.moe.topk.weight"),
    "topk_not_renormalised": (_not_renormalised, "blocks.0.moe.topk.weight"),
    "rope_partial_contiguous": (_contiguous_rope, "blocks.1.attn.q"),
}


def test_every_gemma4_mistake_has_a_case():
    assert set(CASES) == {m.name for m in GEMMA4_CATALOGUE}


@pytest.mark.parametrize("mistake", sorted(CASES))
def test_each_gemma4_mistake_is_found_and_diagnosed(g4dir, mistake, monkeypatch):
    breaker, site = CASES[mistake]
    hf = other_hf.load(g4dir)
    if mistake == "rope_partial_contiguous":
        breaker(hf, monkeypatch)
    else:
        breaker(hf)
    r = compare(refprism.load(g4dir), IDS, against=hf)
    assert r.exit_status == 1
    assert r.first_wrong_op == site, (r.first_wrong_op, r.table())
    explained = [d["variant"] for d in r.diagnosis if d["explains"]]
    assert explained == [mistake], r.diagnosis


@pytest.mark.parametrize("against, names", [("tl", None), ("llama.cpp", None), ("x.npz", "hf"), ("x.npz", "tl")])
def test_unmapped_sides_refuse_gemma4_in_one_line(g4dir, against, names):
    from refprism.errors import InputError

    with pytest.raises(InputError, match="comparing Gemma 4 against .* not supported yet") as e:
        compare(refprism.load(g4dir), IDS, against=against, names=names)
    assert "\n" not in str(e.value)
