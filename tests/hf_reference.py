"""HF transformers' Gemma models (Gemma 1, 2, 3; eager attention) run with hooks, their tensors named like
refprism's record. Used by the parity and prism cross-check tests.

The hooks are refprism.other.hf's, the live capture of `refprism compare`: torch code that stores what HF's own
modules compute (module outputs and inputs, the arguments and weights of HF's eager attention function, q and k
after HF's own RoPE) and never calls refprism's NumPy forward pass. The RMSNorm scales, which HF never forms, are
derived here from HF's own norm inputs: s = sqrt(mean(x**2) + eps), in float64.
"""

from __future__ import annotations

import numpy as np

from refprism.crosscheck.sides import hf as other_hf


def load_hf(model_dir, dtype="float32"):
    return other_hf.load(model_dir, dtype)


def hf_record(model, ids) -> dict[str, np.ndarray]:
    """One HF forward over ids [T]; returns {refprism record name: array without the batch axis}."""
    cap = other_hf.capture(model, ids)
    rec = dict(cap.arrays)
    cfg = other_hf.config_of(model)
    rms = lambda x: np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, axis=-1) + cfg.rms_norm_eps)  # noqa: E731
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        rec[p + "ln1.scale"] = rms(rec[p + "resid_pre"])
        rec[p + "ln2.scale"] = rms(rec[p + "resid_mid"])
        if cfg.post_norms:
            rec[p + "ln1_post.scale"] = rms(rec[p + "attn.o_proj"])
            rec[p + "ln2_post.scale"] = rms(rec[p + "mlp.down"])
        if cfg.qk_norm:
            rec[p + "attn.q_norm.scale"] = rms(rec[p + "attn.q_pre"])
            rec[p + "attn.k_norm.scale"] = rms(rec[p + "attn.k_pre"])
    rec["ln_final.scale"] = rms(rec[f"blocks.{cfg.n_layers - 1}.resid_post"])
    return {name: np.asarray(a, dtype=np.float64) for name, a in rec.items()}
