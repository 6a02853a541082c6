"""Property tests of the recorded forward pass over random tiny shapes (built in memory, no files)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refprism.checkpoints.synth import make_config, random_tensor, tensor_shapes
from refprism.gemma.config import Config
from refprism.gemma.forward import forward
from refprism.gemma.record import RECORD_TABLE, expected_shapes
from refprism.gemma.weights import Weights


@st.composite
def models(draw):
    K = draw(st.integers(1, 3))
    N = K * draw(st.integers(1, 3))  # N a multiple of K; K = 1 (gemma-2b's MQA) included
    hf = make_config("tiny", num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=N,
                     num_key_value_heads=K, head_dim=2 * draw(st.integers(1, 6)),
                     hidden_size=draw(st.integers(2, 24)), intermediate_size=draw(st.integers(1, 40)),
                     vocab_size=draw(st.integers(8, 64)), max_position_embeddings=32)
    seed = draw(st.integers(0, 2**16))
    return hf, seed


def build(hf, seed, dtype):
    tensors = {n: random_tensor(n, s, seed=seed) for n, s in tensor_shapes(hf).items()}
    cfg = Config.from_hf(hf)
    return cfg, Weights.from_arrays(tensors, cfg, dtype)


@settings(max_examples=40, deadline=None)
@given(models(), st.integers(1, 12), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**16))
def test_record_names_shapes_dtype_finite(model, T, dtype, seed):
    hf, wseed = model
    cfg, params = build(hf, wseed, dtype)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, T)
    rec = forward(params, cfg, tokens)
    want = expected_shapes(cfg, T)
    assert set(rec) == set(want)
    for name, shape in want.items():
        assert rec[name].shape == shape, name
        assert rec[name].dtype == dtype, f"{name} is {rec[name].dtype}, not {np.dtype(dtype)}"
        assert np.all(np.isfinite(rec[name])), name
    for l in range(cfg.n_layers):  # the residual adds, exactly as recorded
        b = f"blocks.{l}."
        np.testing.assert_array_equal(rec[b + "resid_mid"], rec[b + "resid_pre"] + rec[b + "attn.out"])
        np.testing.assert_array_equal(rec[b + "resid_post"], rec[b + "resid_mid"] + rec[b + "mlp.out"])
        np.testing.assert_allclose(rec[b + "attn.pattern"].sum(-1), 1, rtol=1e-5)
    np.testing.assert_array_equal(rec["embed"], rec["blocks.0.resid_pre"])


@settings(max_examples=25, deadline=None)
@given(models(), st.integers(2, 12), st.integers(0, 2**16))
def test_causality_prefix_runs_agree(model, T, seed):
    """Position t never sees tokens after t: a prefix's run equals the full run's first rows."""
    hf, wseed = model
    cfg, params = build(hf, wseed, np.float64)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, T)
    k = T // 2
    full, prefix = forward(params, cfg, tokens), forward(params, cfg, tokens[:k])
    np.testing.assert_allclose(prefix["logits"], full["logits"][:k], rtol=1e-10, atol=1e-10)


def test_record_table_has_every_required_name():
    required = {"embed", "blocks.{l}.resid_pre", "blocks.{l}.ln1.scale", "blocks.{l}.attn.q", "blocks.{l}.attn.k",
                "blocks.{l}.attn.v", "blocks.{l}.attn.pattern", "blocks.{l}.attn.z", "blocks.{l}.attn.out",
                "blocks.{l}.resid_mid", "blocks.{l}.ln2.scale", "blocks.{l}.mlp.gate", "blocks.{l}.mlp.up",
                "blocks.{l}.mlp.act", "blocks.{l}.mlp.out", "blocks.{l}.resid_post", "ln_final.scale", "logits"}
    table = {name: shape for name, shape, _, _ in RECORD_TABLE}
    assert required <= set(table)
    assert table["blocks.{l}.attn.pattern"] == ("N", "T", "S") and table["blocks.{l}.attn.k"] == ("T", "K", "H")


def test_real_run_matches_table(tiny):
    run = tiny.run([2, 10, 20, 30, 40])
    assert {n: a.shape for n, a in run.record.items()} == expected_shapes(tiny.config, 5)


def test_normalizer_rounding_option(checkpoint):
    import refprism

    d = checkpoint(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    exact = refprism.load(d, dtype="float64")
    bf16 = refprism.load(d, dtype="float64", normalizer_dtype="bfloat16")
    assert exact.normalizer == np.sqrt(48.0)  # 6.928203...
    assert bf16.normalizer == 6.9375  # the nearest bfloat16 (8 significant bits)
    e, b = exact.run([2, 5, 9]), bf16.run([2, 5, 9])
    np.testing.assert_allclose(b.record["embed"], e.record["embed"] * (6.9375 / np.sqrt(48.0)), rtol=1e-14)
    assert not np.allclose(e.logits, b.logits, rtol=1e-6)
