"""HF transformers live against the reference: honest HF runs of Gemma 1, 2 and 3 are within every floor (exit 0)
in float32, bfloat16 and float16, on several head layouts and prompt lengths (longer than the sliding window).

These are the numbers docs/compare.md quotes (worst site per family, its error and floor).
"""

from __future__ import annotations

import numpy as np
import pytest

import refprism
from refprism.crosscheck import compare
from refprism.crosscheck.sides import hf as other_hf
from refprism.gemma.record import symbolic_shapes


def ids_of(T, seed):
    return [2] + np.random.default_rng(seed).integers(3, 512, T - 1).tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_hf_is_within_every_floor(checkpoint, preset, dtype):
    d = checkpoint(preset)
    ours = refprism.load(d)
    hf = other_hf.load(d, dtype)
    for T, seed in [(1, 0), (9, 1), (17, 2)]:
        r = compare(ours, ids_of(T, seed), against=hf, dtype=dtype)
        assert r.exit_status == 0, r.table()
        sites = set(symbolic_shapes(ours.config))
        assert {s.site for s in r.sites} | set(r.missing) == sites
        assert all(".scale" in m for m in r.missing)  # HF provides every site but the norm scales
        assert r.sites[-1].logits["argmax_agree"] == 1.0


@pytest.mark.parametrize("preset,overrides", [("tiny", {"num_key_value_heads": 1, "num_attention_heads": 8,
                                                        "head_dim": 8}),
                                              ("tiny", {"num_key_value_heads": 4}),
                                              ("tiny-gemma2", {"num_key_value_heads": 1}),
                                              ("tiny-gemma3", {"num_key_value_heads": 4})])
def test_hf_head_layouts_are_within_every_floor(checkpoint, preset, overrides):
    d = checkpoint(preset, **overrides)
    r = compare(refprism.load(d), ids_of(13, 3), against="hf")
    assert r.exit_status == 0, r.table()


def test_a_bfloat16_checkpoint_in_bfloat16_and_float32(checkpoint):
    d = checkpoint("tiny-gemma2", dtype="bfloat16")
    ours = refprism.load(d)
    for dtype in ("bfloat16", "float32"):
        assert compare(ours, ids_of(11, 4), against="hf", dtype=dtype).exit_status == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_hf_float64_is_float64_except_its_norms_rope_tables_and_softmax(checkpoint, preset):
    """A finding about HF itself: in a float64 model, its RMSNorm still computes in float32 (x.float()), its RoPE
    tables are float32 (cos and sin of float32 angles) and its eager softmax is float32 (dtype=torch.float32). At
    float64's floors exactly those ops are wrong; the first is the first norm, and the diagnosis says why."""
    d = checkpoint(preset)
    r = compare(refprism.load(d), ids_of(9, 5), against="hf", dtype="float64")
    assert r.first_wrong_op == "blocks.0.ln1.out"
    assert [x["variant"] for x in r.diagnosis if x["explains"]] == ["norm_in_float32"]
    norms = {"ln1.out", "ln2.out", "ln_final.out"} | ({"attn.out", "mlp.out"} if preset != "tiny" else set())
    wrong = {w.split(".", 2)[-1] if w.startswith("blocks.") else w for w in r.wrong_ops}
    assert wrong == norms | {"attn.q", "attn.k", "attn.pattern"}, wrong


def test_the_model_object_is_left_as_it_was(checkpoint):
    """An HF model in sdpa mode is run eagerly for the capture (eager gives the weights), then switched back; the
    module-level attention function is restored."""
    d = checkpoint()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="sdpa")
    family = __import__(type(model.model.layers[0].self_attn).__module__, fromlist=["x"])
    before = family.eager_attention_forward
    r = compare(refprism.load(d), ids_of(9, 6), against=model)
    assert r.exit_status == 0 and any("switched from sdpa to eager" in n for n in r.notes)
    assert model.config._attn_implementation == "sdpa" and family.eager_attention_forward is before


def test_the_post_attention_norm_trap_is_mapped_by_family(checkpoint):
    """HF's post_attention_layernorm is the MLP's input norm in Gemma 1 and the attention's output norm in Gemma 2/3."""
    for preset, site_in, site_out in [("tiny", "blocks.0.resid_mid", "blocks.0.ln2.out"),
                                      ("tiny-gemma3", "blocks.0.attn.o_proj", "blocks.0.attn.out")]:
        cfg = refprism.load(checkpoint(preset)).config
        x = np.zeros((1, 3, cfg.d_model), np.float32)
        assert [s for s, _ in other_hf.scheme_hf("model.layers.0.post_attention_layernorm:in", x, cfg)] == [site_in]
        assert [s for s, _ in other_hf.scheme_hf("model.layers.0.post_attention_layernorm", x, cfg)] == [site_out]


@pytest.mark.slow
def test_real_gemma3_270m_through_hf_is_within_every_floor(gemma3_270m_arrays):
    """Real weights (Gemma 3 270M from the packaged Q4_K_M GGUF, dequantized: the same numbers on both sides) have
    the activations random checkpoints lack (large residual norms, outlier channels): HF float32 and bfloat16 are
    still within every floor, and an exact GELU in one layer is still exactly one wrong op in float32."""
    import copy
    import importlib.util
    from pathlib import Path

    import torch

    from refprism.model import from_arrays

    tools = Path(__file__).resolve().parents[1] / "tools" / "check_gemma3_270m.py"
    spec = importlib.util.spec_from_file_location("check_gemma3_270m", tools)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config, tensors, tok = gemma3_270m_arrays
    ours = from_arrays(config, tensors, tok, name="gemma-3-270m")
    hf = tool.hf_model(config, tensors)
    prompt = "The capital city of France is"
    r = compare(ours, prompt, against=hf)
    assert r.exit_status == 0, r.table()
    assert max(s.max_abs / s.floor for s in r.sites) < 0.6  # a margin, not a near miss
    r = compare(ours, prompt, against=copy.deepcopy(hf).to(torch.bfloat16), dtype="bfloat16")
    assert r.exit_status == 0, r.table()
    hf.model.layers[5].mlp.act_fn = torch.nn.GELU()
    r = compare(ours, prompt, against=hf)
    assert r.wrong_ops == ["blocks.5.mlp.act"]
    assert [d["variant"] for d in r.diagnosis if d["explains"]] == ["gelu_exact"]
