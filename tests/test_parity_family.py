"""Gemma 2 and Gemma 3 (text): refprism's forward pass equals HF transformers' Gemma2ForCausalLM and
Gemma3ForCausalLM (eager), activation by activation, on random checkpoints that exercise sliding windows (prompts
longer than the window), soft-capping (Gemma 2), q/k norms and two RoPE bases (Gemma 3).

Tolerances as in test_parity_hf.py: float32 logits within 1e-5 (2e-5 for Gemma 2's tanh soft-caps, whose
derivative near 0 is 1: they do not amplify rounding), activations within 2e-5 absolute + 2e-5 relative.
"""

import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close
from hf_reference import hf_record
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3

import refprism
from refprism.gemma.record import expected_shapes

CLASSES = {"gemma2": (transformers.Gemma2ForCausalLM, modeling_gemma2),
           "gemma3_text": (transformers.Gemma3ForCausalLM, modeling_gemma3)}


def hf_family_record(model, ids):
    """HF forward with hooks; returns {refprism record name: array} (tests/hf_reference.py)."""
    return hf_record(model, ids)


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("kv", [1, 2])
def test_family_matches_hf_activation_by_activation(checkpoint, preset, kv):
    d = checkpoint(preset, num_key_value_heads=kv)
    ours = refprism.load(d)
    cls = CLASSES[ours.config.model_type][0]
    hf, info = cls.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    assert ours.config.sliding_window == 4 and "sliding_attention" in ours.config.layer_types
    for T, seed in [(1, 0), (9, 1), (17, 2)]:  # longer than the window of 4
        ids = np.random.default_rng(seed).integers(0, ours.config.vocab_size, T)
        run, ref = ours.run(ids), hf_family_record(hf, ids)
        names = expected_shapes(ours.config, T)
        assert set(names) <= set(ref), sorted(set(names) - set(ref))
        assert_close(f"{preset} T={T} logits", run.logits, ref["logits"], atol=2e-5)
        for name in names:
            assert run.record[name].dtype == np.float32
            assert_close(f"{preset} T={T} {name}", run.record[name], ref[name], atol=2e-5, rtol=2e-5)
        if T > 4:  # the window bites: a sliding layer's last query sees exactly the last 4 sources
            pat = run.record["blocks.0.attn.pattern"]
            assert np.all(pat[:, -1, : T - 4] == 0) and np.all(pat[:, -1, T - 4:] > 0)
            assert np.all(run.record["blocks.1.attn.pattern"][:, -1] > 0)  # the full layer sees all


def test_gemma2_softcaps_bend(checkpoint):
    ours = refprism.load(checkpoint("tiny-gemma2"))
    run = ours.run(np.arange(2, 14))
    raw = run.record["logits_uncapped"]
    np.testing.assert_allclose(run.logits, 5.0 * np.tanh(raw / 5.0), rtol=1e-6)
    assert np.abs(raw).max() > 2.5  # the cap is not a no-op at this size


def test_gemma3_linear_rope_scaling_matches_hf(tmp_path):
    """Gemma 3 4B+ scale the full layers' RoPE linearly (rope_scaling {"rope_type": "linear", "factor": 8}):
    angles / factor on full layers only, the sliding layers' local RoPE untouched."""
    from refprism.checkpoints.synth import make_config, write_checkpoint

    hf_cfg = make_config("tiny-gemma3")
    hf_cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    d = write_checkpoint(tmp_path / "m", hf_cfg)
    ours = refprism.load(d)
    assert ours.config.rope_scale == 4.0 and ours.config.rope_of(1) == (1_000_000.0, 4.0)
    assert ours.config.rope_of(0) == (10_000.0, 1.0)
    hf = transformers.Gemma3ForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(7).integers(0, ours.config.vocab_size, 13)
    run = ours.run(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids.tolist()])).logits[0].numpy()
    assert_close("gemma3 linear rope logits", run.logits, ref, atol=2e-5)
    unscaled = write_checkpoint(tmp_path / "u", make_config("tiny-gemma3"))
    assert np.abs(refprism.load(unscaled).run(ids).logits - run.logits).max() > 1e-3  # the factor is not a no-op
