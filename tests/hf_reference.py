"""HF transformers' GemmaForCausalLM (eager attention) run with hooks, its tensors named like refprism's record.

Independent torch code: it reads HF's own modules' inputs and outputs, applies HF's own RoPE function, and
never calls refprism. Used by the parity and prism cross-check tests.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers.models.gemma import modeling_gemma

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_hf(model_dir, dtype="float32"):
    model, info = transformers.GemmaForCausalLM.from_pretrained(
        str(model_dir), dtype=TORCH_DTYPES[dtype], attn_implementation="eager", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def hook_makers(got: dict):
    """(out_hook, in_hook): makers of forward hooks storing a module's output / first input in `got` by name."""

    def out_hook(name):
        def f(module, inputs, output):
            got[name] = output[0] if isinstance(output, tuple) else output
        return f

    def in_hook(name):
        def f(module, inputs):
            got[name] = inputs[0]
        return f

    return out_hook, in_hook


def hf_record(model, ids) -> dict[str, np.ndarray]:
    """One HF forward over ids [T]; returns {refprism record name: array without the batch axis}."""
    cfg = model.config
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    got: dict[str, torch.Tensor] = {}
    hooks = []

    out_hook, in_hook = hook_makers(got)

    for l, layer in enumerate(model.model.layers):
        p = f"blocks.{l}."
        a, m = layer.self_attn, layer.mlp
        hooks += [
            layer.input_layernorm.register_forward_hook(out_hook(p + "ln1.out")),
            a.q_proj.register_forward_hook(out_hook(p + "q_pre")),
            a.k_proj.register_forward_hook(out_hook(p + "k_pre")),
            a.v_proj.register_forward_hook(out_hook(p + "attn.v")),
            a.o_proj.register_forward_pre_hook(in_hook(p + "attn.z")),
            a.o_proj.register_forward_hook(out_hook(p + "attn.out")),
            layer.post_attention_layernorm.register_forward_hook(out_hook(p + "ln2.out")),
            m.gate_proj.register_forward_hook(out_hook(p + "mlp.gate")),
            m.up_proj.register_forward_hook(out_hook(p + "mlp.up")),
            m.down_proj.register_forward_pre_hook(in_hook(p + "mlp.act")),
            m.register_forward_hook(out_hook(p + "mlp.out")),
            layer.register_forward_hook(out_hook(p + "resid_post")),
        ]
    hooks.append(model.model.norm.register_forward_hook(out_hook("ln_final.out")))
    input_ids = torch.tensor([list(map(int, ids))])
    try:
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True, output_attentions=True)
            T = input_ids.shape[1]
            position_ids = torch.arange(T)[None]
            cos, sin = model.model.rotary_emb(out.hidden_states[0], position_ids)
            rec = {"embed": out.hidden_states[0], "logits": out.logits}
            eps = cfg.rms_norm_eps
            for l in range(cfg.num_hidden_layers):
                p = f"blocks.{l}."
                x = out.hidden_states[l]
                rec[p + "resid_pre"] = x
                rec[p + "ln1.scale"] = torch.sqrt(x.pow(2).mean(-1) + eps)
                rec[p + "attn.q_pre"] = got[p + "q_pre"].view(1, T, N, H)
                rec[p + "attn.k_pre"] = got[p + "k_pre"].view(1, T, K, H)
                q = got[p + "q_pre"].view(1, T, N, H).transpose(1, 2)
                k = got[p + "k_pre"].view(1, T, K, H).transpose(1, 2)
                q, k = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin)  # HF's own split-half RoPE
                rec[p + "attn.q"] = q.transpose(1, 2)
                rec[p + "attn.k"] = k.transpose(1, 2)
                rec[p + "attn.v"] = got[p + "attn.v"].view(1, T, K, H)
                rec[p + "attn.scores"] = (q @ modeling_gemma.repeat_kv(k, N // K).transpose(2, 3)) * H ** -0.5
                rec[p + "attn.pattern"] = out.attentions[l]
                rec[p + "attn.z"] = got[p + "attn.z"].view(1, T, N, H)
                rec[p + "attn.out"] = got[p + "attn.out"]
                mid = x + got[p + "attn.out"]
                rec[p + "resid_mid"] = mid
                rec[p + "ln2.scale"] = torch.sqrt(mid.pow(2).mean(-1) + eps)
                for name in ("ln1.out", "ln2.out", "mlp.gate", "mlp.up", "mlp.act", "mlp.out", "resid_post"):
                    rec[p + name] = got[p + name]
            last = got[f"blocks.{cfg.num_hidden_layers - 1}.resid_post"]
            rec["ln_final.scale"] = torch.sqrt(last.pow(2).mean(-1) + eps)
            rec["ln_final.out"] = got["ln_final.out"]
    finally:
        for h in hooks:
            h.remove()
    return {name: t[0].double().numpy() for name, t in rec.items()}
