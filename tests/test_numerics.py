"""Numerical robustness: softmax, norms and GELU at extreme magnitudes; a model whose float32 squares overflow;
and the CLI's warning when a float32 prism misses its stated tolerance."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refprism import cli, prisms
from refprism.checkpoints.synth import make_config, random_tensor, tensor_shapes
from refprism.gemma import ops
from refprism.gemma.config import Config
from refprism.gemma.forward import forward
from refprism.gemma.weights import Weights

F32_MAX = np.finfo(np.float32).max  # 3.4e38; x * x overflows for |x| > 1.8e19


# ------------------------------------------------------------------------------------------ causal_softmax


@pytest.mark.parametrize("scale", [1e30, float(F32_MAX)])
def test_causal_softmax_of_huge_scores(scale):
    rng = np.random.default_rng(0)
    scores = (rng.choice([-1.0, 1.0], (3, 6, 6)) * scale).astype(np.float32)
    scores[0] = np.float32(scale)  # a head whose every score is the same huge value: uniform over s <= t
    pattern = ops.causal_softmax(scores)
    assert pattern.dtype == np.float32 and np.all(np.isfinite(pattern))
    np.testing.assert_allclose(pattern.sum(-1), 1, rtol=1e-6)
    assert np.all(pattern[:, np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)  # the causal mask
    np.testing.assert_allclose(pattern[0], np.tril(np.ones((6, 6))) / np.arange(1, 7)[:, None], rtol=1e-6)
    # mixed signs: each row's mass sits on its +scale sources, shared equally
    top = scores[1] == scores[1].max(-1, keepdims=True)
    for t in range(6):
        allowed = np.arange(6) <= t
        winners = allowed & (scores[1, t] == scores[1, t, allowed].max())
        np.testing.assert_allclose(pattern[1, t][winners], 1 / winners.sum(), rtol=1e-6)
    assert top.any()


# ------------------------------------------------------------------------------------------ rms_norm


def naive_rms(x, eps):
    eps = np.asarray(eps, dtype=x.dtype)
    return np.sqrt(np.mean(x * x, axis=-1) + eps)


def test_rms_norm_where_squares_overflow_float32():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 64))
    x = (base * 1e20).astype(np.float32)
    w = (0.3 * rng.standard_normal(64)).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.all(np.isinf(naive_rms(x, 1e-6)))  # what the naive formula gives: s = inf, y = 0
    y, s = ops.rms_norm(x, w, eps=1e-6)
    assert y.dtype == s.dtype == np.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(s))
    x64 = x.astype(np.float64)  # float64 squares 1e40 without overflow: the reference
    np.testing.assert_allclose(s, naive_rms(x64, 1e-6), rtol=1e-6)
    np.testing.assert_allclose(y, x64 / naive_rms(x64, 1e-6)[:, None] * (1 + w.astype(np.float64)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("value, eps, s_expected", [
    (float(F32_MAX), 1e-6, float(F32_MAX)),  # the largest float32: s = |x|, y = sign(x)
    (-1e-30, 1e-6, 1e-3),  # squares underflow: s = sqrt(eps), y = x / sqrt(eps)
    (0.0, 1e-6, 1e-3),  # a zero row: s = sqrt(eps), y = 0
    (1e-30, 0.0, 1e-30),  # no eps, squares underflow: still s = |x|, y = sign(x)
])
def test_rms_norm_constant_rows_at_the_extremes(value, eps, s_expected):
    x = np.full((1, 8), value, np.float32)
    y, s = ops.rms_norm(x, np.zeros(8, np.float32), eps=eps)
    assert y.dtype == s.dtype == np.float32
    np.testing.assert_allclose(s, [s_expected], rtol=1e-6)
    np.testing.assert_allclose(y, np.full((1, 8), value / s_expected), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([np.float32, np.float64]), st.integers(-15, 15), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_rms_norm_equals_the_naive_formula_bit_for_bit_in_range(dtype, exponent, D, seed):
    """The stable form divides by powers of 2 only, so where x*x neither overflows nor underflows (|x| ~ 10**±15,
    inside float32's 1e-19 .. 1.8e19) it is the same number, bit for bit: HF parity is untouched."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, D)) * 10.0 ** exponent).astype(dtype)
    w = rng.standard_normal(D).astype(dtype)
    y, s = ops.rms_norm(x, w, eps=1e-6)
    s_naive = naive_rms(x, 1e-6)
    np.testing.assert_array_equal(s, s_naive)
    np.testing.assert_array_equal(y, x / s_naive[:, None] * (1 + w))


def test_gelu_tanh_of_huge_values_float32():
    x = np.array([-1e30, -1e20, -10.0, 10.0, 1e20, 1e30], np.float32)
    with np.errstate(over="ignore"):  # x**3 overflows to inf inside tanh's argument, which is fine: tanh(inf) = 1
        g = ops.gelu_tanh(x)
    assert g.dtype == np.float32 and np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[[0, 1]], 0)
    np.testing.assert_allclose(g[3:], x[3:], rtol=1e-6)


# ------------------------------------------------------------------------------------------ a whole model


def test_huge_embedding_forward_stays_finite_and_agrees_with_float64():
    """embed x 1e20: the residual stream's squares overflow float32 (1e40 > 3.4e38); every norm must not."""
    hf = make_config("tiny")
    tensors = {n: random_tensor(n, s, seed=3) for n, s in tensor_shapes(hf).items()}
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * np.float32(1e20)
    cfg = Config.from_hf(hf)
    tokens = [2, 17, 99, 300, 5]
    rec32 = forward(Weights.from_arrays(tensors, cfg, np.float32), cfg, tokens)
    rec64 = forward(Weights.from_arrays(tensors, cfg, np.float64), cfg, tokens)
    assert np.abs(rec32["blocks.1.resid_mid"]).max() > 1.9e19  # the squares really do overflow float32
    for name, a in rec32.items():
        assert a.dtype == np.float32, name
        assert np.all(np.isfinite(a)), f"{name} is not finite"
    for name in ("blocks.0.ln1.scale", "ln_final.scale", "blocks.1.attn.pattern", "blocks.1.mlp.act", "logits"):
        np.testing.assert_allclose(rec32[name], rec64[name], rtol=2e-5, atol=1e-6 * np.abs(rec64[name]).max(),
                                   err_msg=name)


# ------------------------------------------------------------------------------------------ the CLI's warning

PROMPT = "The capital city of France is"


def test_no_warning_when_exact(tiny_dir, capsys):
    assert cli.main(["residual", PROMPT, "--model", str(tiny_dir), "--targets", "▁Paris"]) == 0
    out = capsys.readouterr()
    assert "exact: yes" in out.out and out.err == ""


@pytest.mark.parametrize("dtype, advice", [("float32", "rerun with --dtype float64"),
                                           ("float64", "float64 should not miss it")])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_warning_when_a_split_misses_its_tolerance(tiny_dir, capsys, monkeypatch, dtype, advice, json_flag):
    """A residual beyond the tolerance is shown and warned about in one stderr line; the exit status stays 0."""
    off = {np.dtype(np.float32): 0.5, np.dtype(np.float64): 1e-6}
    monkeypatch.setattr(prisms.Split, "residual", property(
        lambda self: np.full(self.whole.shape, off[np.dtype(self.values.dtype)])))
    code = cli.main(["attention", PROMPT, "--model", str(tiny_dir), "--layer", "1", "--targets", "▁Paris",
                     "--dtype", dtype, *json_flag])
    out = capsys.readouterr()
    assert code == 0
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("refprism: warning: the attention prism's residual "), out.err
    assert f"exceeds the {dtype} tolerance" in lines[0] and advice in lines[0], lines[0]
    if json_flag:
        assert '"exact": false' in out.out
    else:
        assert "exact: NO" in out.out


def test_warning_names_the_worst_column(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(prisms.Split, "tolerance", property(lambda self: np.full(self.whole.shape, 1e-3)))
    monkeypatch.setattr(prisms.Split, "residual", property(lambda self: np.array([0.0, -0.25, 0.01])))
    assert cli.main(["residual", PROMPT, "--model", str(tiny_dir), "--targets", "▁Paris", "▁London", "▁Tokyo"]) == 0
    err = capsys.readouterr().err
    assert "residual -0.25 (column ▁London) exceeds the float32 tolerance 0.001; rerun with --dtype float64" in err
