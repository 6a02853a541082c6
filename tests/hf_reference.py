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


def hf_gemma4_record(model, ids) -> dict[str, np.ndarray]:
    """Gemma4ForCausalLM (eager attention, eager experts) or Gemma4UnifiedForCausalLM (the same decoder without
    per-layer embeddings and MoE) on ids [T], with hooks; {refprism record name: array}.

    Module outputs and inputs are stored (cloned: Gemma4TextDecoderLayer scales its output in place by
    layer_scalar), eager_attention_forward is wrapped for q, k, v after HF's norms and RoPE and for the pattern;
    the scores are recomputed as eager does. The router's outputs are its own (logits from router.proj, top-k
    index and weight from its return value). HF's expert loop keeps no per-expert tensors: each selected expert's
    gate, up, act and output are recomputed in torch from HF's own experts weights and its own input
    (pre_feedforward_layernorm_2's output). Norm scales, which HF never forms, are s = sqrt(mean(x^2) + eps) of
    HF's own norm inputs, in float64.
    """
    import torch

    g4 = gemma4_module(model)
    tm = model.model
    cfg = model.config
    eps = cfg.rms_norm_eps
    ple = getattr(tm, "hidden_size_per_layer_input", 0)  # Gemma4Unified*: no PLE or MoE attributes at all
    got: dict = {}
    hooks = []

    def keep(name, t):
        got[name] = t.detach().clone()

    def out(name):
        return lambda mod, args, o: keep(name, o[0] if isinstance(o, tuple) else o)

    def inp(name):
        return lambda mod, args, kwargs: keep(name, args[0] if args else kwargs["hidden_states"])

    def on(module, name, *, pre=False):
        if pre:
            hooks.append(module.register_forward_pre_hook(inp(name), with_kwargs=True))
        else:
            hooks.append(module.register_forward_hook(out(name)))

    on(tm.embed_tokens, "embed")
    if ple:
        on(tm.embed_tokens_per_layer, "ple.token")
        on(tm.per_layer_projection_norm, "ple.model_proj", pre=True)
        original_project = tm.project_per_layer_inputs

        def project(*args, **kwargs):
            result = original_project(*args, **kwargs)
            keep("ple.input", result)
            return result

        tm.project_per_layer_inputs = project
    for l, layer in enumerate(tm.layers):
        b = f"blocks.{l}."
        a = layer.self_attn
        on(layer, b + "resid_pre", pre=True)
        on(layer, b + "resid_post")
        on(layer.input_layernorm, b + "ln1.out")
        on(a.q_proj, b + "attn.q_pre")
        if not a.is_kv_shared_layer:
            on(a.k_proj, b + "attn.k_pre")
            on(a.v_proj if a.v_proj is not None else a.k_proj, b + "attn.v_pre")
        on(a.o_proj, b + "attn.z", pre=True)
        on(a.o_proj, b + "attn.o_proj")
        on(layer.post_attention_layernorm, b + "attn.out")
        on(layer.pre_feedforward_layernorm, b + "resid_mid", pre=True)
        on(layer.pre_feedforward_layernorm, b + "ln2.out")
        on(layer.mlp.gate_proj, b + "mlp.gate")
        on(layer.mlp.up_proj, b + "mlp.up")
        on(layer.mlp.down_proj, b + "mlp.act", pre=True)
        on(layer.mlp.down_proj, b + "mlp.down")
        moe = getattr(layer, "enable_moe_block", False)
        on(layer.post_feedforward_layernorm, b + ("mlp.sum" if moe else "mlp.down"), pre=True)
        on(layer.post_feedforward_layernorm, b + "mlp.out")
        if moe:
            on(layer.post_feedforward_layernorm_1, b + "mlp.dense")
            on(layer.router.proj, b + "moe.router.logits")
            def router(mod, args, o, b=b):  # (probabilities, top-k weights, top-k index); returns None: o unchanged
                keep(b + "moe.topk.weight", o[1])
                keep(b + "moe.topk.index", o[2])

            hooks.append(layer.router.register_forward_hook(router))
            on(layer.pre_feedforward_layernorm_2, b + "ln2_moe.out")
            on(layer.experts, b + "moe.down")
            on(layer.post_feedforward_layernorm_2, b + "moe.out")
        if ple:
            on(layer.per_layer_input_gate, b + "resid_mlp", pre=True)
            on(layer.per_layer_input_gate, b + "ple.gate")
            on(layer.per_layer_projection, b + "ple.act", pre=True)
            on(layer.per_layer_projection, b + "ple.proj")
            on(layer.post_per_layer_input_norm, b + "ple.out")
    on(tm.norm, "ln_final.out")
    on(model.lm_head, "logits_uncapped" if cfg.final_logit_softcapping is not None else "logits")

    original = g4.eager_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        b = f"blocks.{module.layer_idx}."
        keep(b + "attn.q", query)
        if not module.is_kv_shared_layer:
            keep(b + "attn.k", key)
            keep(b + "attn.v", value)
        with torch.no_grad():
            keep(b + "attn.scores", torch.matmul(query, g4.repeat_kv(key, module.num_key_value_groups)
                                                 .transpose(2, 3)) * kwargs.get("scaling", module.scaling))
        o, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
        keep(b + "attn.pattern", weights)
        return o, weights

    g4.eager_attention_forward = spy
    try:
        with torch.no_grad():
            # output_hidden_states: transformers 5.24's _maybe_slice_kv_shared_inputs slices per_layer_inputs even
            # when there are none (KV sharing without per-layer embeddings: a TypeError); asking for the hidden
            # states turns that slicing off and changes nothing else
            got["logits"] = model(torch.tensor([list(map(int, ids))]), use_cache=False,
                                  output_hidden_states=True).logits
    finally:
        g4.eager_attention_forward = original
        for h in hooks:
            h.remove()
        if ple:
            del tm.project_per_layer_inputs
    rec = {}
    T = len(ids)
    for name, t in got.items():
        x = t.double().numpy() if t.dtype.is_floating_point else t.numpy()
        if x.ndim and x.shape[0] == 1:
            x = x[0]
        rec[name] = x
    L, P = cfg.num_hidden_layers, ple
    for name in ("ple.token", "ple.model_proj", "ple.input"):
        if name in rec:
            rec[name] = rec[name].reshape(T, L, P)
    rms = lambda x: np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, axis=-1) + eps)  # noqa: E731
    for l, layer in enumerate(tm.layers):
        b = f"blocks.{l}."
        a = layer.self_attn
        H = a.head_dim
        for site in ("moe.router.logits", "moe.topk.index", "moe.topk.weight", "ln2_moe.out", "moe.down"):
            if b + site in rec:  # HF runs the router and the experts on [B*T, ...] rows: no batch axis
                rec[b + site] = rec[b + site].reshape(T, -1)
        for site in ("attn.q_pre", "attn.k_pre", "attn.v_pre", "attn.z"):
            if b + site in rec:
                rec[b + site] = rec[b + site].reshape(T, -1, H)
        for site in ("attn.q", "attn.k", "attn.v"):  # [heads, T, H] as the attention function receives them
            if b + site in rec:
                rec[b + site] = rec[b + site].transpose(1, 0, 2)
        if b + "resid_mlp" not in rec:  # no per-layer input: HF scales this very tensor in place by layer_scalar;
            # it is resid_mid + mlp.out, HF's own add (done again in the model's dtype)
            dt = got[b + "resid_mid"].dtype
            rec[b + "resid_mlp"] = (got[b + "resid_mid"] + got[b + "mlp.out"].to(dt)).double().numpy()[0]
        rec[b + "ln1.scale"] = rms(rec[b + "resid_pre"])
        rec[b + "ln2.scale"] = rms(rec[b + "resid_mid"])
        rec[b + "ln1_post.scale"] = rms(rec[b + "attn.o_proj"])
        moe = getattr(layer, "enable_moe_block", False)
        rec[b + "ln2_post.scale"] = rms(rec[b + ("mlp.sum" if moe else "mlp.down")])
        rec[b + "attn.q_norm.scale"] = rms(rec[b + "attn.q_pre"])
        if not a.is_kv_shared_layer:
            rec[b + "attn.k_norm.scale"] = rms(rec[b + "attn.k_pre"])
            rec[b + "attn.v_norm.scale"] = rms(rec[b + "attn.v_pre"])
        if moe:
            rec[b + "ln2_post1.scale"] = rms(rec[b + "mlp.down"])
            rec[b + "moe.router.scale"] = rms(rec[b + "resid_mid"])
            rec[b + "ln2_moe.scale"] = rms(rec[b + "resid_mid"])
            rec[b + "ln2_post2.scale"] = rms(rec[b + "moe.down"])
            with torch.no_grad():  # each selected expert, from HF's weights and HF's own input
                h2 = torch.tensor(rec[b + "ln2_moe.out"], dtype=layer.experts.gate_up_proj.dtype)
                idx = torch.tensor(rec[b + "moe.topk.index"])
                gu = layer.experts.gate_up_proj[idx]  # [T, J, 2I, D]
                gate, up = torch.einsum("tjfd,td->tjf", gu, h2).chunk(2, dim=-1)
                act = layer.experts.act_fn(gate) * up
                expert_out = torch.einsum("tjdf,tjf->tjd", layer.experts.down_proj[idx], act)
            for site, value in (("moe.gate", gate), ("moe.up", up), ("moe.act", act), ("moe.expert_out", expert_out)):
                rec[b + site] = value.double().numpy()
        if ple:
            rec[b + "ple_post.scale"] = rms(rec[b + "ple.proj"])
    if "ple.model_proj" in rec:
        rec["ple.model_proj_norm.scale"] = rms(rec["ple.model_proj"])
    rec["ln_final.scale"] = rms(rec[f"blocks.{len(tm.layers) - 1}.resid_post"])
    return rec


def gemma4_module(model):
    """The transformers module whose code `model` runs: modeling_gemma4 (Gemma4ForCausalLM) or
    modeling_gemma4_unified (Gemma4UnifiedForCausalLM: the same attention, MLP, norm and RoPE code, copied there by
    transformers' modular generation, so it must be hooked and patched in that module)."""
    if type(model).__module__.endswith("modeling_gemma4_unified"):
        from transformers.models.gemma4_unified import modeling_gemma4_unified as module
    else:
        from transformers.models.gemma4 import modeling_gemma4 as module
    return module


def gemma4_float64(model, on_scale=None):
    """A float64 Gemma4ForCausalLM computing in float64 where HF computes in float32 whatever the model's dtype:
    Gemma4RMSNorm (`.float()`), the softmaxes (eager attention's and the router's `dtype=torch.float32`) and the
    RoPE tables (float32 inv_freq and angles). Returns an undo function. The module's own code runs otherwise.

    The norm forms its scale s = sqrt(mean(x^2) + eps) [..., 1] as a tensor of its own, y = x / s (* w), as
    refprism's rms_scale / rms_apply do; on_scale(norm, s), if given, is called with each norm module and that
    tensor as it is formed (the autograd tests keep it: it is refprism's `...scale` site)."""
    import torch

    g4 = gemma4_module(model)
    unified = g4.__name__.endswith("unified")
    norm_class = g4.Gemma4UnifiedRMSNorm if unified else g4.Gemma4RMSNorm
    rope_class = g4.Gemma4UnifiedTextRotaryEmbedding if unified else g4.Gemma4TextRotaryEmbedding
    norm_forward, rope_forward, softmax = norm_class.forward, rope_class.forward, torch.nn.functional.softmax

    def norm(self, x):
        s = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if on_scale is not None:
            on_scale(self, s)
        y = x / s
        return y * self.weight if self.with_scale else y

    cfg = model.config

    def rope(self, x, position_ids, layer_type):
        H = cfg.per_layer_config[layer_type].head_dim
        params = cfg.rope_parameters[layer_type]
        j = torch.arange(0, H, 2, dtype=torch.float64)
        inv = params["rope_theta"] ** (-j / H)
        if params.get("rope_type") == "proportional":
            inv[int(params.get("partial_rotary_factor", 1.0) * H // 2):] = 0
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def soft(x, dim=None, dtype=None, **kw):
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype, **kw)

    norm_class.forward, rope_class.forward, torch.nn.functional.softmax = norm, rope, soft

    def undo():
        norm_class.forward, rope_class.forward = norm_forward, rope_forward
        torch.nn.functional.softmax = softmax

    return undo
