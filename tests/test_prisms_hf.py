"""Cross-check: the residual and attention prisms computed from HF transformers' own hidden states, attention
weights and weights, by a few lines of independent torch code, equal refprism's."""

import numpy as np
import torch
from hf_reference import load_hf

import refprism
from refprism import prisms as P


def test_residual_and_attention_prisms_from_hf_tensors(checkpoint):
    d = checkpoint(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3)
    model = refprism.load(d, dtype="float64")
    hf = load_hf(d, "float64")
    ids = [2, 651 % 512, 40, 77, 108, 300, 41]
    targets = [108, 109, 116]
    p = 6
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        cfg = hf.config
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        E = hf.model.embed_tokens.weight  # [V, D], tied
        hs = out.hidden_states  # embed, after layer 0 .. L-2, final normed
        # the final residual before the norm, and its frozen scale
        layers = hf.model.layers
        x = [hs[0][0]]
        attn_out, v_all = [], []
        for l, layer in enumerate(layers):  # rebuild each sublayer output from HF modules on HF's own inputs
            xl = x[-1]
            a_in = layer.input_layernorm(xl)
            v = layer.self_attn.v_proj(a_in).view(-1, K, H)
            z = torch.einsum("nts,snh->tnh", out.attentions[l][0], v[:, torch.arange(N) // (N // K)])
            a = layer.self_attn.o_proj(z.reshape(len(ids), N * H))
            mid = xl + a
            m = layer.mlp(layer.post_attention_layernorm(mid))
            x.append(mid + m)
            attn_out.append(a), v_all.append(v)
            if l + 1 < len(layers):
                torch.testing.assert_close(x[-1], hs[l + 1][0], rtol=0, atol=1e-9)
        xf = x[-1][p]
        s = torch.sqrt(xf.pow(2).mean() + cfg.rms_norm_eps)
        u = E[targets] * (1 + hf.model.norm.weight) / s  # the logits readout
        torch.testing.assert_close(u @ xf, out.logits[0, p, targets], rtol=1e-6, atol=1e-6)
        residual_hf = [u @ hs[0][0][p]]
        for l in range(len(layers)):
            residual_hf += [u @ attn_out[l][p], u @ (x[l + 1][p] - x[l][p] - attn_out[l][p])]
        l = 2
        Wo = layers[l].self_attn.o_proj.weight.view(-1, N, H)  # [D, N, H]
        heads_hf = torch.stack([
            torch.stack([out.attentions[l][0][h, p, s_] * (u @ (Wo[:, h] @ v_all[l][s_, h // (N // K)]))
                         for s_ in range(p + 1)]) for h in range(N)])  # [N, S, Z]

    run = model.run(ids)
    r = P.logits_readout(model, run, [f"#{t}" for t in targets], position=p)
    res = P.residual_prism(r)
    np.testing.assert_allclose(res.values, torch.stack(residual_hf).numpy(), rtol=1e-6, atol=1e-7)
    att = P.attention_prism(r, l)
    np.testing.assert_allclose(att.values.reshape(N, p + 1, 3), heads_hf.numpy(), rtol=1e-6, atol=1e-7)
