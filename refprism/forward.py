"""The Gemma forward pass (Gemma 1, 2 and 3 text) over refprism's parameter layout, recording every activation.

No KV cache, no sampling, no batch axis. Each line is one equation of docs/math.md.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .config import Config
from .record import Record
from .weights import Weights


def embed_normalizer(d_model: int, dtype, round_to=None):
    """The embedding scale sqrt(D), as a scalar of the compute dtype.

    Gemma trap: the embedding is multiplied by sqrt(D) and this constant is rounded in the dtype the model runs
    in. HF transformers rounds it to the model's dtype (sqrt(2048) = 45.254834 in float32, 45.25 in bfloat16);
    the original JAX code rounds it to the parameters' dtype. refprism uses the compute dtype by default (equal
    to HF at the same dtype); `round_to="bfloat16"` reproduces a bf16 run's 45.25 exactly.
    """
    value = np.sqrt(np.float64(d_model))
    if round_to is not None:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

        value = np.float64(np.asarray(value).astype(round_to))
    return np.asarray(value, dtype=dtype)


def forward(params: Weights, cfg: Config, tokens, *, normalizer=None) -> Record:
    """Run tokens [T] through the model; return the Record of every activation (see record.RECORD_TABLE).

    Math:   x_0 = E[tokens] * sqrt(D)
            x_{l+1/2} = x_l + post1_l(attn_l(rms_norm(x_l; ln1_l)))
            x_{l+1}   = x_{l+1/2} + post2_l(mlp_l(rms_norm(x_{l+1/2}; ln2_l)))
            logits    = rms_norm(x_L; ln_final) E^T          (tied unembedding)
            post1/post2 are the identity in Gemma 1 and rms_norm(.; ln1_post / ln2_post) in Gemma 2/3;
            Gemma 2 soft-caps the logits: cap * tanh(logits / cap).
    Shapes: tokens [T] int -> record (logits [T, V])
    """
    dtype = params.dtype
    eps = cfg.rms_norm_eps
    tokens = np.asarray(tokens, dtype=np.int64)
    T = tokens.shape[0]
    if normalizer is None:
        normalizer = embed_normalizer(cfg.d_model, dtype)
    rec = Record()

    x = params.embed_rows(tokens) * normalizer  # [T, D]
    rec["embed"] = x
    ropes = {}  # (theta, scale) -> cos, sin [T, H]: Gemma 3 has one RoPE for full and one for sliding layers

    for l in range(cfg.n_layers):
        p = params.block(l, scratch=True)  # low-memory mode: converted now, into buffers the next layer reuses
        name = f"blocks.{l}."
        rec[name + "resid_pre"] = x

        # Attention: RMSNorm (1 + w) -> q, k, v per head -> (Gemma 3: q, k norms) -> split-half RoPE on q, k
        # -> causal softmax (Gemma 2: soft-capped scores; sliding layers: a window) -> o_proj (-> Gemma 2/3 post-norm)
        h, s1 = ops.rms_norm(x, p["ln1"], eps=eps)
        q = np.einsum("td,dnh->tnh", h, p["W_Q"], optimize=True)  # [T, N, H]
        k = np.einsum("td,dkh->tkh", h, p["W_K"], optimize=True)  # [T, K, H]
        v = np.einsum("td,dkh->tkh", h, p["W_V"], optimize=True)  # [T, K, H]
        if cfg.qk_norm:  # Gemma 3: each head's q and k normalised over H, (1 + w) as every Gemma norm
            q, sq = ops.rms_norm(q, p["q_norm"], eps=eps)
            k, sk = ops.rms_norm(k, p["k_norm"], eps=eps)
            rec.update({name + "attn.q_norm.scale": sq, name + "attn.k_norm.scale": sk})
        theta, scale = cfg.rope_of(l)
        if (theta, scale) not in ropes:
            ropes[theta, scale] = ops.rope_tables(np.arange(T) / scale, cfg.d_head, theta, dtype)
        cos, sin = ropes[theta, scale]
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        scores, pattern, z = ops.attention(  # [N, T, S] twice, [T, N, H]
            q, k, v, scale=cfg.query_pre_attn_scalar ** -0.5, cap=cfg.attn_softcap,
            window=cfg.sliding_window if cfg.is_sliding(l) else None)
        attn_out = np.einsum("tnh,nhd->td", z, p["W_O"], optimize=True)  # [T, D]
        rec.update({name + "ln1.scale": s1, name + "ln1.out": h, name + "attn.q": q, name + "attn.k": k,
                    name + "attn.v": v, name + "attn.scores": scores, name + "attn.pattern": pattern,
                    name + "attn.z": z})
        if cfg.post_norms:  # Gemma 2/3: the attention output is normalised before the residual add
            rec[name + "attn.o_proj"] = attn_out
            attn_out, rec[name + "ln1_post.scale"] = ops.rms_norm(attn_out, p["ln1_post"], eps=eps)
        rec[name + "attn.out"] = attn_out
        x = x + attn_out
        rec[name + "resid_mid"] = x

        # MLP: RMSNorm (1 + w) -> GeGLU gelu_tanh(gate) * up -> down (-> Gemma 2/3 post-norm)
        h, s2 = ops.rms_norm(x, p["ln2"], eps=eps)
        gate, up, act = ops.geglu(h, p["W_gate"], p["W_up"])  # [T, F] each
        mlp_out = act @ p["W_down"]  # [T, D]
        rec.update({name + "ln2.scale": s2, name + "ln2.out": h, name + "mlp.gate": gate, name + "mlp.up": up,
                    name + "mlp.act": act})
        if cfg.post_norms:
            rec[name + "mlp.down"] = mlp_out
            mlp_out, rec[name + "ln2_post.scale"] = ops.rms_norm(mlp_out, p["ln2_post"], eps=eps)
        rec[name + "mlp.out"] = mlp_out
        x = x + mlp_out
        rec[name + "resid_post"] = x

    h, s = ops.rms_norm(x, params.ln_final, eps=eps)
    rec["ln_final.scale"] = s
    rec["ln_final.out"] = h
    logits = params.unembed(h)  # [T, V] = h E^T: Gemma trap: the unembedding is the embedding itself (tied)
    if cfg.final_softcap is not None:  # Gemma 2: the prisms decompose these pre-cap logits exactly
        rec["logits_uncapped"] = logits
        logits = ops.softcap(logits, cfg.final_softcap)
    rec["logits"] = logits
    return rec
