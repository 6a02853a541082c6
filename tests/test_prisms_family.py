"""The prisms on Gemma 2 and 3: post-norm scales frozen like every other norm scale, pre-cap logits decomposed
exactly, every level exact, and the frozen re-run agrees (written from the HF tensors, with the post-norms)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from test_prisms import assert_exact

import refprism
from refprism import prisms as P


@pytest.fixture(scope="module")
def family64(checkpoint):
    return {preset: refprism.load(checkpoint(preset, num_key_value_heads=kv), dtype="float64")
            for preset, kv in (("tiny-gemma2", 1), ("tiny-gemma3", 2))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["tiny-gemma2", "tiny-gemma3"]), st.lists(st.integers(0, 511), min_size=1, max_size=12),
       st.lists(st.integers(0, 511), min_size=1, max_size=3, unique=True), st.integers(0, 2),
       st.lists(st.integers(0, 10**6), min_size=8, max_size=8))
def test_every_level_is_exact_on_gemma_2_and_3(family64, preset, ids, targets, n_versus, picks):
    model = family64[preset]
    run = model.run([2] + ids)
    p = picks[0] % len(run.tokens)
    versus = [f"#{(t + 7) % 512}" for t in targets[:n_versus] if (t + 7) % 512 not in targets]
    r = P.logits_readout(model, run, [f"#{t}" for t in targets], position=p, versus=versus)
    raw = run.record.get("logits_uncapped", run.logits)
    ids_, coef = r.targets.coefficients(np.float64)
    np.testing.assert_array_equal(r.whole, coef @ raw[p, ids_])  # the pre-cap logits on Gemma 2
    res = P.residual_prism(r)
    assert_exact(res)
    for l in range(model.config.n_layers):
        att, mlp = P.attention_prism(r, l), P.mlp_prism(r, l)
        assert_exact(att), assert_exact(mlp)
        np.testing.assert_allclose(att.whole, res.term(f"L{l}.attn"), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(mlp.whole, res.term(f"L{l}.mlp"), rtol=1e-12, atol=1e-14)
    L, N, F = model.config.n_layers, model.config.n_heads, model.config.d_mlp
    r1 = P.through_head(r, L - 1, picks[1] % N, picks[2] % (p + 1))
    assert_exact(P.residual_prism(r1))
    r2 = P.through_neuron(r1, picks[3] % (L - 1), picks[4] % F)
    np.testing.assert_allclose(r2.whole, P.mlp_prism(r1, int(r2.path[-1][1:].split("N")[0])).term(r2.path[-1]),
                               rtol=1e-12, atol=1e-15)
    assert_exact(P.residual_prism(r2))


def test_gemma2_shows_the_capped_logits_beside(family64):
    model = family64["tiny-gemma2"]
    run = model.run("The capital city of France is")
    res = P.residual_prism(P.logits_readout(model, run, ["▁Paris", "▁Tokyo"]))
    capped = res.extras["softcapped"]["values"][0]
    np.testing.assert_allclose(capped, 5.0 * np.tanh(res.whole / 5.0), rtol=1e-12)
    np.testing.assert_array_equal(capped, run.logits[-1, [108, 116]])


def test_independence_through_post_norms(checkpoint):
    """Removing head h's value at source s (post-norm scale frozen) changes the pre-cap logits by the term."""
    d = checkpoint("tiny-gemma2", num_key_value_heads=1)
    model = refprism.load(d, dtype="float64")
    run = model.run("The capital city of France is")
    t = {k: v.astype(np.float64) for k, v in load_file(str(d / "model.safetensors")).items()}
    rec, cfg, p, ids = run.record, model.config, 6, [108, 109, 116]
    r = P.logits_readout(model, run, [f"#{i}" for i in ids], position=p)
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.d_head

    def logits_without(l, h, s):
        q = f"model.layers.{l}."
        parts = [rec["embed"][p]] + [rec[f"blocks.{j}.{k}.out"][p] for j in range(cfg.n_layers)
                                     for k in ("attn", "mlp")]
        z = np.zeros((N, H))
        hn = (rec[f"blocks.{l}.resid_pre"] / rec[f"blocks.{l}.ln1.scale"][:, None]
              * (1 + t[q + "input_layernorm.weight"]))
        v = (hn @ t[q + "self_attn.v_proj.weight"].T).reshape(-1, K, H)
        for n in range(N):
            w = rec[f"blocks.{l}.attn.pattern"][n, p].copy()
            if n == h:
                w[s] = 0
            z[n] = w @ v[:, n // (N // K)]
        o = z.reshape(-1) @ t[q + "self_attn.o_proj.weight"].T
        parts[1 + 2 * l] = o / rec[f"blocks.{l}.ln1_post.scale"][p] * (1 + t[q + "post_attention_layernorm.weight"])
        x = sum(parts)
        y = x / rec["ln_final.scale"][p] * (1 + t["model.norm.weight"])
        return y @ t["model.embed_tokens.weight"][ids].T

    base = run.record["logits_uncapped"][p, ids]
    for l in range(cfg.n_layers):
        att = P.attention_prism(r, l)
        for h in range(N):
            for s in (0, 3, 6):
                np.testing.assert_allclose(base - logits_without(l, h, s), att.term(f"L{l}H{h}.src{s}"),
                                           rtol=1e-9, atol=1e-12)
