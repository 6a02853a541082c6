"""TransformerLens 4.x (TransformerBridge) as the other side of a comparison, on tiny Gemma 1, 2 and 3 checkpoints.

Each checkpoint is booted through the Bridge from its directory (no hub access), run with `run_with_cache`, and
every hook refprism/crosscheck/sides/tl.py maps is compared with refprism's own record of the same ids, in float32.
The same again in compatibility mode (HookedTransformer's processed weights), where the sites the processing changes
must be left out and everything else must still agree. Negative controls show that a wrong mapping fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

import refprism
from refprism.crosscheck.capture import Capture, Summary
from refprism.crosscheck.sides import tl
from refprism.errors import InputError
from refprism.gemma.record import expected_shapes

IDS = [2, 10, 20, 30, 40, 50, 60, 70, 80]  # 9 positions: longer than the Gemma 2/3 presets' window of 4
PRESETS = ["tiny", "tiny-gemma2", "tiny-gemma3"]  # Gemma 1, 2, 3
# float32 against float32: HF's modules and refprism order their sums differently. Measured at most 1.1e-6 of a
# site's largest value; the bound is |diff| <= 1e-5 + 1e-5 |ref| elementwise.
ATOL = RTOL = 1e-5


def reference(model, ids) -> dict:
    return dict(model.run(ids).record)  # every site, attn.q_pre / k_pre (before the q/k norm and RoPE) too


@pytest.fixture(scope="module")
def runs(checkpoint):
    """preset -> (refprism record, plain bridge capture, compatibility-mode capture, config)."""
    out = {}
    for preset in PRESETS:
        path = checkpoint(preset)
        model = refprism.load(path)
        plain = tl.capture(tl.boot(path), IDS)
        bridge = tl.boot(path)
        bridge.enable_compatibility_mode(disable_warnings=True)
        compat = tl.capture(bridge, IDS)
        out[preset] = (reference(model, IDS), plain, compat, model.config)
    return out


def expected_sites(cfg, *, compat: bool) -> set[str]:
    want = set(expected_shapes(cfg, len(IDS)))
    want |= {f"blocks.{l}.attn.{x}_pre" for l in range(cfg.n_layers) for x in "qk"}
    if cfg.attn_softcap is not None:  # Gemma 2: TL's scores are capped and masked
        want -= {f"blocks.{l}.attn.scores" for l in range(cfg.n_layers)}
    if compat:  # fold_ln: ln*.hook_out is x / s; center_unembed (not with soft-capped logits): centred logits
        want -= {n for n in want if n.endswith(("ln1.out", "ln2.out", "ln_final.out"))}
        if cfg.final_softcap is None:
            want.discard("logits")
    return want


@pytest.mark.parametrize("compat", [False, True], ids=["bridge", "compat"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_mapped_hook_is_refprisms_site(runs, preset, compat):
    rec, plain, processed, cfg = runs[preset]
    cap = processed if compat else plain
    assert isinstance(cap, Capture) and cap.source == "tl" and cap.dtype == "float32"
    assert cap.tokens.tolist() == IDS
    assert set(cap.arrays) | set(cap.summaries) == expected_sites(cfg, compat=compat)
    for site, a in cap.arrays.items():
        assert_close(f"{preset} {site}", a, rec[site], atol=ATOL * (1 + np.abs(rec[site]).max()), rtol=RTOL)
    for site, s in cap.summaries.items():  # attn.scores, Gemma 1 and 3: the unmasked entries
        l = int(site.split(".")[1])
        ok = tl.allowed(cfg, l, len(IDS))
        assert site.endswith("attn.scores") and s.total is None and s.shape == rec[site].shape
        assert set(s.elements) == {(n, t, src) for n in range(cfg.n_heads) for t, src in zip(*np.nonzero(ok))}
        idx = tuple(np.array(list(s.elements)).T)
        assert_close(f"{preset} {site}", np.array(list(s.elements.values())), rec[site][idx],
                     atol=ATOL * (1 + np.abs(rec[site]).max()), rtol=RTOL)


@pytest.mark.parametrize("preset", PRESETS)
def test_notes_name_every_convention_that_was_mapped_or_left_out(runs, preset):
    _, plain, compat, cfg = runs[preset]
    text = " ".join(plain.notes)
    assert "hook_normalized" in text and "before RoPE" in text
    assert ("hook_q_normed" in text) == bool(cfg.qk_norm)
    assert ("soft-capped and masked" in text) == (cfg.attn_softcap is not None)
    assert ("logits_uncapped" in text) == (cfg.final_softcap is not None)
    assert "folded" not in text and "centred" not in text
    text = " ".join(compat.notes)
    assert "folded the norm weights" in text
    assert ("centred the unembedding" in text) == (cfg.final_softcap is None)  # TL skips it on capped logits


def test_the_bridges_processing_is_read_from_its_weights(checkpoint):
    bridge = tl.boot(checkpoint("tiny-gemma3"))
    cfg = tl.config_of(bridge)
    assert tl.processing(bridge, cfg) == (False, False)
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_unembed=False)
    assert tl.processing(bridge, cfg) == (True, False)
    bridge = tl.boot(checkpoint("tiny-gemma3"))
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=False, center_unembed=True)
    assert tl.processing(bridge, cfg) == (False, True)
    cap = tl.capture(bridge, IDS)
    assert "blocks.0.ln1.out" in cap.arrays and "logits" not in cap.arrays


def test_a_wrong_mapping_fails(runs, checkpoint):
    """Negative controls on Gemma 3: the hooks next to the right ones, or the right one without its transform."""
    rec, _, _, cfg = runs["tiny-gemma3"]
    bridge = tl.boot(checkpoint("tiny-gemma3"))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor([IDS]))
    wrong = {
        "blocks.1.attn.out": cache["blocks.1.attn.hook_out"][0],  # o_proj, before the post-norm
        "blocks.1.mlp.out": cache["blocks.1.mlp.hook_out"][0],  # down_proj, before the post-norm
        "blocks.1.attn.q": cache["blocks.1.attn.hook_q"][0],  # before RoPE
        "blocks.1.attn.q_pre": cache["blocks.1.attn.hook_rot_q"][0],
        "blocks.1.attn.q_norm.scale": cache["blocks.1.attn.q_norm.hook_scale"][0, ..., 0].reshape(len(IDS), -1),
        "blocks.1.ln1.out": cache["blocks.1.ln1.hook_normalized"][0],  # x / s without (1 + w)
    }
    for site, value in wrong.items():
        with pytest.raises(AssertionError, match="NOT OK"):
            assert_close(site, value.numpy(), rec[site], atol=ATOL * (1 + np.abs(rec[site]).max()), rtol=RTOL)


def test_capture_boots_a_checkpoint_directory(checkpoint, runs):
    rec = runs["tiny"][0]
    cap = tl.capture(checkpoint("tiny"), IDS)  # a path: booted by tl.boot
    assert_close("logits", cap.arrays["logits"], rec["logits"], atol=ATOL * (1 + np.abs(rec["logits"]).max()),
                 rtol=RTOL)


# ------------------------------------------------------------------------------------------------ scheme_tl


def test_scheme_tl_reads_dump_names_with_or_without_the_batch_axis(runs):
    cfg2, cfg3 = runs["tiny-gemma2"][3], runs["tiny-gemma3"][3]
    T, N, H, D, V = 5, cfg3.n_heads, cfg3.d_head, cfg3.d_model, cfg3.vocab_size
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, T, N, H)).astype(np.float32)
    (site, a), = tl.scheme_tl("blocks.2.attn.hook_z", z, cfg3)
    assert site == "blocks.2.attn.z" and np.array_equal(a, z[0])
    (site, a), = tl.scheme_tl("blocks.2.attn.hook_z", z[0], cfg3)  # no batch axis
    assert np.array_equal(a, z[0])
    scale = rng.normal(size=(N, T, 1)).astype(np.float32)
    (site, a), = tl.scheme_tl("blocks.0.attn.q_norm.hook_scale", scale, cfg3)
    assert site == "blocks.0.attn.q_norm.scale" and np.array_equal(a, scale[..., 0].T)  # [N, T, 1] -> [T, N]
    assert tl.scheme_tl("blocks.0.attn.q_norm.hook_scale", scale, runs["tiny"][3]) == []  # Gemma 1: no q norm
    logits = rng.normal(size=(T, V)).astype(np.float32)
    assert tl.scheme_tl("hook_unembed", logits, cfg2)[0][0] == "logits_uncapped"  # Gemma 2: before the cap
    assert tl.scheme_tl("hook_unembed", logits, cfg3)[0][0] == "logits"
    assert tl.scheme_tl("hook_unembed", logits, cfg3, centered_unembed=True) == []
    x = rng.normal(size=(T, D)).astype(np.float32)
    assert tl.scheme_tl("blocks.0.ln1.hook_out", x, cfg3, folded_norms=True) == []
    assert tl.scheme_tl("blocks.0.hook_in", x, cfg3) == []  # an alias of hook_resid_pre: mapped once
    assert tl.scheme_tl("blocks.0.ln1.hook_normalized", x, cfg3) == []
    scores = rng.normal(size=(N, T, T)).astype(np.float32)
    (site, s), = tl.scheme_tl("blocks.0.attn.hook_attn_scores", scores, cfg3)
    assert isinstance(s, Summary) and len(s.elements) == N * tl.allowed(cfg3, 0, T).sum()
    assert tl.scheme_tl("blocks.0.attn.hook_attn_scores", scores, cfg2) == []


def test_scheme_tl_refuses_shapes_that_do_not_fit(runs):
    cfg = runs["tiny-gemma3"][3]
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="hook_z"):
        tl.scheme_tl("blocks.0.attn.hook_z", rng.normal(size=(5, cfg.n_heads, cfg.d_head + 1)), cfg)
    with pytest.raises(InputError, match="batch of 2"):
        tl.scheme_tl("blocks.0.hook_resid_pre", rng.normal(size=(2, 5, cfg.d_model)), cfg)
    with pytest.raises(InputError, match="layer 7"):
        tl.scheme_tl("blocks.7.hook_resid_pre", rng.normal(size=(5, cfg.d_model)), cfg)
