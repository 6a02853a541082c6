"""HF transformers as the other side of a comparison: a Gemma model run live with hooks, named like refprism.

Two entry points:

    capture(model_or_dir, ids, dtype=)  run HF's GemmaForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM (eager
                                        attention) once and return a `Capture` of every site it computes
    scheme_hf(name, array, cfg)         one tensor named by its HF module path (what a forward hook sees) ->
                                        [(refprism site, array in refprism's layout)]: the `--names hf` of dumps

The live capture is itself an HF-named dump made in memory: forward hooks store module outputs (and a few
modules' inputs, written `path:in`) under their module paths, the eager attention function is wrapped to see
its arguments (`path:query`, `:key`, `:attn_weights`), and `scheme_hf` maps the lot. So every live comparison
also tests the scheme that dumps use.

HF module path                                  Gemma 1                  Gemma 2 / 3
model.embed_tokens                              embed                    embed
model.layers.{l}:in                             blocks.{l}.resid_pre     blocks.{l}.resid_pre
model.layers.{l}.input_layernorm                ln1.out                  ln1.out
model.layers.{l}.self_attn.q_proj / k_proj      attn.q_pre / k_pre       attn.q_pre / k_pre       [T, heads*H] split
model.layers.{l}.self_attn.v_proj               attn.v                   attn.v
model.layers.{l}.self_attn:query / :key         attn.q / attn.k          attn.q / attn.k          after q/k norm, RoPE
model.layers.{l}.self_attn:scores               attn.scores              attn.scores              q.k * scaling
model.layers.{l}.self_attn:attn_weights         attn.pattern             attn.pattern             (or attentions.{l})
model.layers.{l}.self_attn.o_proj:in            attn.z                   attn.z
model.layers.{l}.self_attn.o_proj (or self_attn) attn.out                attn.o_proj
model.layers.{l}.post_attention_layernorm       ln2.out (MLP input!)     attn.out (post-norm)
model.layers.{l}.post_attention_layernorm:in    resid_mid                attn.o_proj
model.layers.{l}.pre_feedforward_layernorm      -                        ln2.out
model.layers.{l}.pre_feedforward_layernorm:in   -                        resid_mid
model.layers.{l}.mlp.gate_proj / up_proj        mlp.gate / mlp.up        mlp.gate / mlp.up
model.layers.{l}.mlp.down_proj:in               mlp.act                  mlp.act
model.layers.{l}.mlp.down_proj (or mlp)         mlp.out                  mlp.down
model.layers.{l}.post_feedforward_layernorm     -                        mlp.out
model.layers.{l}.post_feedforward_layernorm:in  -                        mlp.down
model.layers.{l}                                blocks.{l}.resid_post    blocks.{l}.resid_post
model.norm                                      ln_final.out             ln_final.out
lm_head                                         logits                   Gemma 2: logits_uncapped; Gemma 3: logits
logits                                          logits                   logits (after Gemma 2's final soft-cap)
hidden_states.{i}                               embed (i = 0) and blocks.{i}.resid_pre (i < L)

Gemma trap: HF's `post_attention_layernorm` is the MLP's input norm in Gemma 1 but the attention's output norm in
Gemma 2/3 (`weights.norm_names`); the table maps it by model_type.

Gemma 4 has its own table (`_GEMMA4_LAYER_SITES`, read by `scheme_hf` for a dump; the live capture is
`capture_gemma4`, whose own hooks a test holds the scheme to): v_norm's output is attn.v, k_proj on a k_eq_v layer
is k_pre and v_pre, a KV-sharing consumer has no k / v, the MoE's and the per-layer input's modules, the router's
top-k weights as the port `router:top_k_weights` (its output [1]), and `derived_hf` forms ple.input, which no
module outputs.

Not captured: the RMSNorm scales s (HF never forms them; the replay uses refprism's scale of HF's own input, so a
norm's mistakes show at its output) and `mlp.act_fn`'s output gelu(gate) alone (refprism's `mlp.act` is
gelu(gate) * up, down_proj's input; a dump that has act_fn's and up_proj's outputs but not down_proj's input gets
mlp.act as their product, `derived_hf`). The scores are not a tensor HF keeps: the wrapper recomputes them as eager
attention does, `matmul(query, repeat_kv(key)^T) * scaling`, with the family module's own repeat_kv, in the
model's dtype, before the soft-cap and the mask.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from refprism.crosscheck.capture import Capture
from refprism.errors import CheckpointError, InputError
from refprism.gemma.config import MODEL_TYPES, UNIFIED_GEMMA4, Config

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise InputError(f"HF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load(model_dir, dtype: str = "float32"):
    """The checkpoint in `model_dir` through AutoModelForCausalLM, eager attention, in `dtype`, loaded strictly
    (a missing, unexpected or mis-shaped tensor is a CheckpointError naming it)."""
    try:
        import transformers
    except ImportError:
        raise InputError("comparing against HF needs torch and transformers: pip install 'refprism[crosscheck]'") \
            from None
    from transformers.utils import logging as hf_logging

    torch_dtype = _torch_dtype(dtype)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no progress bars or legacy-config warnings on a report's stderr
    hf_logging.disable_progress_bar()
    try:
        # Gemma 4's MoE: the eager experts loop (the other implementations sum in other orders)
        extra = {"experts_implementation": "eager"} if _model_type(model_dir) in ("gemma4", "gemma4_text") else {}
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, attn_implementation="eager", output_loading_info=True, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"HF transformers cannot load {model_dir}: {str(e).splitlines()[0][:200]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise CheckpointError(f"HF loaded {model_dir} with {kind.replace('_', ' ')}: {sorted(info[kind])[:3]}")
    return model.eval()


def _model_type(model_dir):
    import json

    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


NOTES_GEMMA4 = ["HF never forms the RMSNorm scales: the replay uses refprism's scale of HF's own input there",
                "Gemma 4: HF's expert loop keeps no per-expert tensors (moe.gate/up/act/expert_out): the replay "
                "computes them; its output (moe.down), the router's logits and top-k weights are HF's (the chosen "
                "experts, integers, are compared through their weights)",
                "attn.scores: recomputed from the query and key HF's eager attention received, as eager computes "
                "them (matmul(query, repeat_kv(key)^T) * scaling)"]


def capture_gemma4(model, ids) -> tuple[dict, str]:
    """One hooked forward of an HF Gemma4ForCausalLM or Gemma4UnifiedForCausalLM (eager attention; its layer
    output scaled in place by layer_scalar, so every stored tensor is a clone) -> ({refprism site: array}, dtype).
    What HF computes as a tensor: module outputs and inputs, eager attention's query / key / value (after HF's
    norms and RoPE) and weights, the router's logits, top-k index and weights, the experts' summed output, the
    per-layer inputs."""
    import importlib

    import torch

    # the modeling module of the model's own class: Gemma4ForCausalLM's, or Gemma 4 unified's, whose generated file
    # has its own copy of eager_attention_forward (the same code) and decoder layers without PLE and MoE
    g4 = importlib.import_module(type(model).__module__)
    tm, hf_cfg = model.model, model.config
    got: dict = {}
    hooks = []

    def keep(name, t):
        got[name] = t.detach().clone()

    def on(module, name, *, pre=False):
        if pre:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs: keep(name, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        else:
            hooks.append(module.register_forward_hook(
                lambda mod, args, o: keep(name, o[0] if isinstance(o, tuple) else o)))

    on(tm.embed_tokens, "embed")
    projected = None
    if getattr(tm, "hidden_size_per_layer_input", 0):
        on(tm.embed_tokens_per_layer, "ple.token")
        on(tm.per_layer_projection_norm, "ple.model_proj", pre=True)
        projected = tm.project_per_layer_inputs

        def project(*args, **kwargs):
            out = projected(*args, **kwargs)
            keep("ple.input", out)
            return out

        tm.project_per_layer_inputs = project
    for l, layer in enumerate(tm.layers):
        b, a = f"blocks.{l}.", layer.self_attn
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

            def router(mod, args, o, b=b):  # (probabilities, top-k weights, top-k index); o unchanged
                keep(b + "moe.topk.weight", o[1])
                keep(b + "moe.topk.index", o[2])

            hooks.append(layer.router.register_forward_hook(router))
            on(layer.pre_feedforward_layernorm_2, b + "ln2_moe.out")
            on(layer.experts, b + "moe.down")
            on(layer.post_feedforward_layernorm_2, b + "moe.out")
        if getattr(layer, "hidden_size_per_layer_input", 0):
            on(layer.per_layer_input_gate, b + "resid_mlp", pre=True)
            on(layer.per_layer_input_gate, b + "ple.gate")
            on(layer.per_layer_projection, b + "ple.act", pre=True)
            on(layer.per_layer_projection, b + "ple.proj")
            on(layer.post_per_layer_input_norm, b + "ple.out")
    on(tm.norm, "ln_final.out")
    on(model.lm_head, "logits_uncapped" if hf_cfg.final_logit_softcapping is not None else "logits")
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
        out, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
        keep(b + "attn.pattern", weights)
        return out, weights

    before = model.config._attn_implementation
    g4.eager_attention_forward = spy
    try:
        if before != "eager":
            model.set_attn_implementation("eager")
        with torch.no_grad():
            # output_hidden_states: transformers 5.24's _maybe_slice_kv_shared_inputs slices per_layer_inputs even
            # when a KV-sharing model has none; asking for the hidden states turns that slicing off
            got["logits"] = model(torch.tensor([list(map(int, ids))]), use_cache=False,
                                  output_hidden_states=True).logits
    finally:
        g4.eager_attention_forward = original
        for h in hooks:
            h.remove()
        if projected is not None:
            del tm.project_per_layer_inputs
        if before != "eager":
            model.set_attn_implementation(before)
    T = len(ids)
    L, P = hf_cfg.num_hidden_layers, getattr(hf_cfg, "hidden_size_per_layer_input", 0)
    arrays = {}
    for name, t in got.items():
        x = (t.double().numpy() if t.dtype == torch.float64 else t.float().numpy()) if t.dtype.is_floating_point \
            else t.numpy()
        arrays[name] = x[0] if x.ndim and x.shape[0] == 1 and name.split(".")[-1] not in ("index", "weight",
                                                                                          "logits") else x
    for name in ("ple.token", "ple.model_proj", "ple.input"):
        if name in arrays:
            arrays[name] = arrays[name].reshape(T, L, P)
    for l, layer in enumerate(tm.layers):
        b, H = f"blocks.{l}.", layer.self_attn.head_dim
        for site in ("moe.router.logits", "moe.topk.index", "moe.topk.weight", "ln2_moe.out", "moe.down"):
            if b + site in arrays:  # HF runs the router and the experts on [B*T, ...] rows
                arrays[b + site] = arrays[b + site].reshape(T, -1)
        for site in ("attn.q_pre", "attn.k_pre", "attn.v_pre", "attn.z"):
            if b + site in arrays:
                arrays[b + site] = arrays[b + site].reshape(T, -1, H)
        for site in ("attn.q", "attn.k", "attn.v"):  # [heads, T, H] as the attention function receives them
            if b + site in arrays:
                arrays[b + site] = arrays[b + site].transpose(1, 0, 2)
    if arrays["logits"].ndim == 3:
        arrays["logits"] = arrays["logits"][0]
    for l in range(L):  # the choice is compared through its weights (a float site); an integer cannot flow on
        arrays.pop(f"blocks.{l}.moe.topk.index", None)
    return arrays, str(next(model.parameters()).dtype).removeprefix("torch.")


def _hook_makers(got: dict):
    """(out_hook, in_hook): makers of forward hooks storing a module's output / first input in `got` by name
    (in_hook is a pre-hook registered with_kwargs=True: a decoder layer may get hidden_states by keyword)."""

    def out_hook(name):
        def f(module, inputs, output):
            got[name] = output[0] if isinstance(output, tuple) else output
        return f

    def in_hook(name):
        def f(module, args, kwargs):
            got[name] = args[0] if args else kwargs["hidden_states"]
        return f

    return out_hook, in_hook


def config_of(model) -> Config:
    """refprism's Config of an HF model object (its config.to_dict(), read like a config.json)."""
    hf = model.config.to_dict()
    if hf.get("model_type") not in MODEL_TYPES + (UNIFIED_GEMMA4,):
        raise InputError(f"the HF model is a {hf.get('model_type')!r}; compare takes Gemma 1, 2, 3 and 4 text models "
                         f"(model_type {', '.join(MODEL_TYPES + (UNIFIED_GEMMA4,))})")
    return Config.from_hf(hf)


def capture(model, ids, *, dtype: str = "float32", cfg: Config | None = None) -> Capture:
    """Run an HF Gemma model on token ids [T] and capture every site it computes, named like refprism.

    model:  a model directory (loaded with `load(model, dtype)`) or an HF model object already in memory, possibly
            modified (that is how a port is debugged); its own dtype is then used and `dtype` is ignored.
            A model that is not set to eager attention is switched to it for the run and switched back.
    cfg:    the reference's Config, which names the sites (default: the HF model's own config; a modified model's
            config may be part of what is wrong, e.g. a final soft-cap set to None)
    Shapes: ids [T] -> Capture with arrays in refprism's layout, no batch axis (see the module's table)
    """
    if isinstance(model, (str, Path)):
        model = load(model, dtype)
    if getattr(model.config, "model_type", None) in ("gemma4_text", UNIFIED_GEMMA4):
        arrays, dt = capture_gemma4(model, ids)
        moe = getattr(model.config, "enable_moe_block", False)
        return Capture(source="hf", tokens=np.asarray(ids, dtype=np.int64), arrays=arrays, dtype=dt,
                       notes=[n for n in NOTES_GEMMA4 if moe or "expert" not in n])
    raw, dt, notes = capture_hf_names(model, ids)
    cfg = cfg or config_of(model)
    arrays = {}
    for name, array in raw.items():
        for site, value in scheme_hf(name, array, cfg):
            arrays[site] = value
    return Capture(source="hf", tokens=np.asarray(ids, dtype=np.int64), arrays=arrays, dtype=dt,
                   notes=notes + NOTES)


def capture_hf_names(model, ids) -> tuple[dict, str, list[str]]:
    """One hooked forward of an HF model object -> ({HF module path: array with its batch axis}, dtype, notes):
    what `capture` maps, and what an HF-named dump holds (`refprism.crosscheck.sides.dumps`, `--names hf`)."""
    import torch

    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise InputError(f"{type(model).__name__} is not an HF Gemma causal LM (GemmaForCausalLM, Gemma2ForCausalLM "
                         "or Gemma3ForCausalLM)")
    cfg = config_of(model)
    ids = np.asarray(ids, dtype=np.int64)
    got: dict = {}
    hooks: list = []
    families = {sys.modules[type(layer.self_attn).__module__] for layer in model.model.layers}
    originals = {fam: fam.eager_attention_forward for fam in families}
    before = model.config._attn_implementation
    notes = []
    try:
        _register(model, cfg, got, hooks)
        for fam in families:
            fam.eager_attention_forward = _attention_spy(fam, originals[fam], got)
        if before != "eager":
            model.set_attn_implementation("eager")
            notes.append(f"HF attention switched from {before} to eager for the capture (eager gives the weights)")
        with torch.no_grad():
            got["logits"] = model(torch.tensor([ids.tolist()]), use_cache=False).logits
    finally:  # the model is left as it was: no hook, the family's own attention function, its implementation
        for h in hooks:
            h.remove()
        for fam, fn in originals.items():
            fam.eager_attention_forward = fn
        if before != "eager":
            model.set_attn_implementation(before)
    raw = {}
    for name, tensor in got.items():
        t = tensor.detach()
        raw[name] = t.double().numpy() if t.dtype == torch.float64 else t.float().numpy()  # exact for bf16 / f16
    return raw, str(next(model.parameters()).dtype).removeprefix("torch."), notes


def _register(model, cfg: Config, got: dict, hooks: list) -> None:
    """Forward hooks storing, under HF module paths, every module output and input that is a refprism site."""
    out_hook, in_hook = _hook_makers(got)
    mlp_norm = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
    hooks += [model.model.embed_tokens.register_forward_hook(out_hook("model.embed_tokens")),
              model.model.norm.register_forward_hook(out_hook("model.norm")),
              model.lm_head.register_forward_hook(out_hook("lm_head"))]
    for l, layer in enumerate(model.model.layers):
        p = f"model.layers.{l}"
        a, m = layer.self_attn, layer.mlp
        hooks += [layer.register_forward_pre_hook(in_hook(p + ":in"), with_kwargs=True),
                  layer.register_forward_hook(out_hook(p)),
                  layer.input_layernorm.register_forward_hook(out_hook(p + ".input_layernorm"))]
        hooks += [getattr(a, n).register_forward_hook(out_hook(f"{p}.self_attn.{n}"))
                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        hooks += [a.o_proj.register_forward_pre_hook(in_hook(p + ".self_attn.o_proj:in"), with_kwargs=True),
                  getattr(layer, mlp_norm).register_forward_pre_hook(in_hook(f"{p}.{mlp_norm}:in"), with_kwargs=True),
                  getattr(layer, mlp_norm).register_forward_hook(out_hook(f"{p}.{mlp_norm}")),
                  m.down_proj.register_forward_pre_hook(in_hook(p + ".mlp.down_proj:in"), with_kwargs=True)]
        hooks += [getattr(m, n).register_forward_hook(out_hook(f"{p}.mlp.{n}"))
                  for n in ("gate_proj", "up_proj", "down_proj")]
        if cfg.post_norms:
            hooks += [layer.post_attention_layernorm.register_forward_hook(out_hook(p + ".post_attention_layernorm")),
                      layer.post_feedforward_layernorm.register_forward_hook(
                          out_hook(p + ".post_feedforward_layernorm"))]


NOTES = ["HF never forms the RMSNorm scales: the replay uses refprism's scale of HF's own input there",
         "attn.scores: recomputed from the query and key HF's eager attention received, as eager computes them "
         "(matmul(query, repeat_kv(key)^T) * scaling)"]


def _attention_spy(family, original, got):
    """The family module's eager_attention_forward, wrapped to store its arguments and its weights by layer."""
    import torch

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        p = f"model.layers.{module.layer_idx}.self_attn"
        scaling = kwargs.get("scaling", args[0] if args else None)
        if scaling is None:
            scaling = module.head_dim ** -0.5
        got[p + ":query"], got[p + ":key"] = query, key
        with torch.no_grad():
            got[p + ":scores"] = torch.matmul(query, family.repeat_kv(key, module.num_key_value_groups)
                                              .transpose(2, 3)) * scaling
        out, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
        got[p + ":attn_weights"] = weights
        return out, weights

    return spy


# ------------------------------------------------------------------------------------------ the HF naming scheme

_LAYER = re.compile(r"model\.layers\.(\d+)(?:\.([a-z_.0-9]+?))?(?::(\w+))?$")


def scheme_hf(name: str, array, cfg: Config) -> list[tuple[str, np.ndarray]]:
    """One tensor named by its HF module path -> [(refprism site, array in refprism's layout)] ([] when the name
    is no refprism site, e.g. model.rotary_emb; see the module's table). A leading batch axis of 1 is dropped.

    Shapes: projections [B, T, heads*H] -> [T, heads, H]; attention arguments [B, heads, T, H] -> [T, heads, H];
            weights and scores [B, N, T, S] -> [N, T, S]; everything else [B, T, X] -> [T, X]
    """
    a = np.asarray(array)
    if cfg.gemma4:
        return _scheme_gemma4(name, a, cfg)
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    post = cfg.post_norms
    if _shared_name(name):
        return _scheme_shared(name, name, a, cfg)
    m = _LAYER.fullmatch(name)
    if not m or int(m.group(1)) >= cfg.n_layers:
        return []
    l, module, port = int(m.group(1)), m.group(2) or "", m.group(3) or "out"
    b = f"blocks.{l}."
    site = _LAYER_SITES.get((module, port, post))
    if site is None:
        return []
    if port in ("query", "key", "value"):  # [B, heads, T, H] as the attention function receives them
        return [(b + site, _unbatch(name, a, 3).transpose(1, 0, 2))]
    if site in ("attn.q_pre", "attn.z"):
        return [(b + site, _heads(name, _unbatch(name, a, 2), b + site, N, H))]
    if site in ("attn.k_pre", "attn.v"):
        return [(b + site, _heads(name, _unbatch(name, a, 2), b + site, K, H))]
    if site in ("attn.scores", "attn.pattern"):
        return [(b + site, _unbatch(name, a, 3))]
    return [(b + site, _unbatch(name, a, 2))]


# (module path within the layer, "out" or the port after ":", post_norms) -> refprism site within blocks.{l}.
_LAYER_SITES = {}
for _post in (False, True):
    _LAYER_SITES.update({
        ("", "in", _post): "resid_pre", ("", "out", _post): "resid_post",
        ("input_layernorm", "in", _post): "resid_pre", ("input_layernorm", "out", _post): "ln1.out",
        ("self_attn.q_proj", "out", _post): "attn.q_pre", ("self_attn.k_proj", "out", _post): "attn.k_pre",
        ("self_attn.v_proj", "out", _post): "attn.v", ("self_attn", "query", _post): "attn.q",
        ("self_attn", "key", _post): "attn.k", ("self_attn", "value", _post): "attn.v",
        ("self_attn", "scores", _post): "attn.scores", ("self_attn", "attn_weights", _post): "attn.pattern",
        ("self_attn.o_proj", "in", _post): "attn.z",
        ("self_attn.o_proj", "out", _post): "attn.o_proj" if _post else "attn.out",
        ("self_attn", "out", _post): "attn.o_proj" if _post else "attn.out",
        ("mlp.gate_proj", "out", _post): "mlp.gate", ("mlp.up_proj", "out", _post): "mlp.up",
        ("mlp.down_proj", "in", _post): "mlp.act",
        ("mlp.down_proj", "out", _post): "mlp.down" if _post else "mlp.out",
        ("mlp", "out", _post): "mlp.down" if _post else "mlp.out",
    })
_LAYER_SITES.update({  # Gemma trap: post_attention_layernorm is the MLP's input norm in Gemma 1 only
    ("post_attention_layernorm", "in", False): "resid_mid", ("post_attention_layernorm", "out", False): "ln2.out",
    ("post_attention_layernorm", "in", True): "attn.o_proj", ("post_attention_layernorm", "out", True): "attn.out",
    ("pre_feedforward_layernorm", "in", True): "resid_mid", ("pre_feedforward_layernorm", "out", True): "ln2.out",
    ("post_feedforward_layernorm", "in", True): "mlp.down", ("post_feedforward_layernorm", "out", True): "mlp.out",
})


# ------------------------------------------------------------------------------ the HF naming scheme, Gemma 4

# Gemma 4 (modeling_gemma4: Gemma4TextDecoderLayer and its modules): (module path within model.layers.{l}, "out"
# or the port after ":") -> refprism site within blocks.{l}. The When column of RECORD_TABLE decides which exist
# at a layer (a KV-sharing consumer has no k_proj, k_norm, v_proj, v_norm; a k_eq_v layer has no v_proj).
_GEMMA4_LAYER_SITES = {
    ("", "in"): "resid_pre", ("", "out"): "resid_post",  # the output after `hidden_states *= layer_scalar`
    ("input_layernorm", "in"): "resid_pre", ("input_layernorm", "out"): "ln1.out",
    ("self_attn.q_proj", "out"): "attn.q_pre", ("self_attn.q_norm", "in"): "attn.q_pre",
    ("self_attn.k_proj", "out"): "attn.k_pre", ("self_attn.k_norm", "in"): "attn.k_pre",
    ("self_attn.v_proj", "out"): "attn.v_pre", ("self_attn.v_norm", "in"): "attn.v_pre",
    ("self_attn.v_norm", "out"): "attn.v",  # v_norm: no learned scale, no RoPE after it
    ("self_attn", "query"): "attn.q", ("self_attn", "key"): "attn.k", ("self_attn", "value"): "attn.v",
    ("self_attn", "scores"): "attn.scores", ("self_attn", "attn_weights"): "attn.pattern",
    ("self_attn.o_proj", "in"): "attn.z", ("self_attn.o_proj", "out"): "attn.o_proj",
    ("self_attn", "out"): "attn.o_proj",
    ("post_attention_layernorm", "in"): "attn.o_proj", ("post_attention_layernorm", "out"): "attn.out",
    ("pre_feedforward_layernorm", "in"): "resid_mid", ("pre_feedforward_layernorm", "out"): "ln2.out",
    ("mlp.gate_proj", "out"): "mlp.gate", ("mlp.up_proj", "out"): "mlp.up", ("mlp.down_proj", "in"): "mlp.act",
    ("mlp.down_proj", "out"): "mlp.down", ("mlp", "out"): "mlp.down",
    ("post_feedforward_layernorm", "out"): "mlp.out",  # its input: mlp.down, or mlp.sum on an MoE layer
    # MoE (26B-A4B): the dense MLP's post-norm, the router on resid_mid, the experts on their own pre-norm
    ("post_feedforward_layernorm_1", "in"): "mlp.down", ("post_feedforward_layernorm_1", "out"): "mlp.dense",
    ("router", "in"): "resid_mid", ("router.proj", "out"): "moe.router.logits",
    ("router", "top_k_weights"): "moe.topk.weight",  # the router's output [1]; its output [0] is the softmax
    ("pre_feedforward_layernorm_2", "in"): "resid_mid", ("pre_feedforward_layernorm_2", "out"): "ln2_moe.out",
    ("experts", "in"): "ln2_moe.out", ("experts", "out"): "moe.down",
    ("post_feedforward_layernorm_2", "in"): "moe.down", ("post_feedforward_layernorm_2", "out"): "moe.out",
    # per-layer inputs (E2B / E4B)
    ("per_layer_input_gate", "in"): "resid_mlp", ("per_layer_input_gate", "out"): "ple.gate",
    ("per_layer_projection", "in"): "ple.act", ("per_layer_projection", "out"): "ple.proj",
    ("post_per_layer_input_norm", "in"): "ple.proj", ("post_per_layer_input_norm", "out"): "ple.out",
}


def _scheme_gemma4(name: str, a: np.ndarray, cfg: Config) -> list[tuple[str, np.ndarray]]:
    """`scheme_hf` on Gemma 4 (Gemma4ForCausalLM's module paths; a multimodal checkpoint's
    model.language_model.* the same). Each array is checked against its site's shape at that layer (Gemma 4's
    head width, kv heads and MLP width differ by layer): a mis-shaped one is InputError naming it."""
    from refprism.gemma.record import SITE_LETTERS, axis_sizes, symbolic_shapes

    key = "model." + name[len("model.language_model."):] if name.startswith("model.language_model.") else name
    L, P = cfg.n_layers, cfg.d_ple
    if key == "model.embed_tokens_per_layer" and cfg.ple:  # [B, T, L*P], E_ple[tokens] * sqrt(P)
        return [("ple.token", _layers_apart(name, _unbatch(name, a, 2), L, P))]
    if key == "model.per_layer_projection_norm:in" and cfg.ple:  # [B, T, L, P], embed W / sqrt(D) as reshaped
        return [("ple.model_proj", _checked(name, _unbatch(name, a, 3), "ple.model_proj", cfg))]
    if key in ("model.embed_tokens_per_layer", "model.per_layer_projection_norm:in"):
        return []
    if _shared_name(key):
        return _checked_all(name, _scheme_shared(key, name, a, cfg), cfg)
    m = _LAYER.fullmatch(key)
    if not m or int(m.group(1)) >= L:
        return []
    l, module, port = int(m.group(1)), m.group(2) or "", m.group(3) or "out"
    site = _GEMMA4_LAYER_SITES.get((module, port))
    if module == "post_feedforward_layernorm" and port == "in":
        site = "mlp.sum" if cfg.moe else "mlp.down"
    b = f"blocks.{l}."
    if site is None or b + site not in symbolic_shapes(cfg):
        return []  # not a site at this layer: a consumer's key / value are its producer's
    sizes = axis_sizes(cfg, 0, l)
    letters = SITE_LETTERS[site]
    if port in ("query", "key", "value"):  # [B, heads, T, H] as the attention function receives them
        x = _unbatch(name, a, 3).transpose(1, 0, 2)
    elif port in ("scores", "attn_weights"):
        x = _unbatch(name, a, 3)
    elif len(letters) == 3 and letters[2] == "H":  # projections [B, T, heads*H]; norm inputs [B, T, heads, H]
        heads = sizes[letters[1]]
        x = _unbatch(name, a, 3) if a.ndim == 4 else _unbatch(name, a, 2)
        x = _heads(name, x, b + site, heads, sizes["H"]) if x.ndim == 2 else x
    else:  # [B, T, X]; the router's and the experts' [B*T, X] rows
        x = _unbatch(name, a, 2)
    out = [(b + site, _checked(name, x, b + site, cfg))]
    if (module, port) == ("self_attn.k_proj", "out") and cfg.k_eq_v_at(l):
        out.append((b + "attn.v_pre", out[0][1]))  # k_eq_v: V is the raw k_proj output (there is no v_proj)
    return out


def _shared_name(key) -> bool:
    return key in ("model.embed_tokens", "model.norm", "lm_head:in", "model.norm:in", "lm_head", "logits") or \
        re.fullmatch(r"(hidden_states|attentions)\.\d+", key) is not None


def _scheme_shared(key, name, a, cfg) -> list[tuple[str, np.ndarray]]:
    """The names every family shares (scheme_hf's and _scheme_gemma4's): the embedding, the final norm, the
    lm_head, the model's outputs (hidden_states.{i}, attentions.{i})."""
    if key == "model.embed_tokens":
        return [("embed", _unbatch(name, a, 2))]
    if key in ("model.norm", "lm_head:in"):
        return [("ln_final.out", _unbatch(name, a, 2))]
    if key == "model.norm:in":
        return [(f"blocks.{cfg.n_layers - 1}.resid_post", _unbatch(name, a, 2))]
    if key == "lm_head":
        return [("logits_uncapped" if cfg.final_softcap is not None else "logits", _unbatch(name, a, 2))]
    if key == "logits":
        return [("logits", _unbatch(name, a, 2))]
    kind, i = key.split(".")
    i = int(i)
    if i >= cfg.n_layers:  # the last hidden state is the final norm's output in some transformers versions
        return []
    if kind == "attentions":
        return [(f"blocks.{i}.attn.pattern", _unbatch(name, a, 3))]
    x = _unbatch(name, a, 2)
    return [("embed", x), ("blocks.0.resid_pre", x)] if i == 0 else [(f"blocks.{i}.resid_pre", x)]


def _layers_apart(name, a, L, P):
    """[T, L*P] -> [T, L, P] (HF's .reshape(*ids.shape, L, P): layer-major columns)."""
    if a.shape[-1] != L * P:
        raise InputError(f"{name} has shape {list(a.shape)}: ple.token needs a last axis of {L} layers x {P} = "
                         f"{L * P}")
    return a.reshape(a.shape[0], L, P)


def _checked(name, x, site, cfg):
    """x if it has `site`'s shape at its layer (any number of positions), else InputError naming the dump's key."""
    from refprism.gemma.record import axis_sizes, layer_of, symbolic_shapes

    letters = symbolic_shapes(cfg)[site]
    T = x.shape[letters.index("T")] if x.ndim == len(letters) else 0
    want = [T if c in ("T", "S") else axis_sizes(cfg, T, layer_of(site))[c] for c in letters]
    if list(x.shape) != want:
        raise InputError(f"{name} has shape {list(x.shape)} (batch axis dropped); {site} of this model is "
                         f"[{', '.join(c if c in ('T', 'S') else str(n) for c, n in zip(letters, want))}]")
    return x


def _checked_all(name, pairs, cfg):
    return [(site, _checked(name, x, site, cfg)) for site, x in pairs]


def derived_hf(arrays: dict, cfg: Config, have) -> tuple[dict, list[str], set[str]]:
    """Sites an HF-named dump gives only through two tensors, where it lacks the module input that holds them
    (each product or sum taken in float64 from HF's own factors: one rounding finer than HF's):

        blocks.{l}.mlp.act   = mlp.act_fn's output * mlp.up_proj's        (no mlp.down_proj:in)
      Gemma 4, per-layer inputs (HF forms ple.input in project_per_layer_inputs, no module's output):
        ple.model_proj       = model.per_layer_model_projection's output / sqrt(D), reshaped [T, L, P]
                               (no model.per_layer_projection_norm:in)
        ple.input            = (model.per_layer_projection_norm's output + ple.token) / sqrt(2)
        blocks.{l}.ple.act   = model.layers.{l}.act_fn's output * ple.input[:, l]   (no per_layer_projection:in)

    have: the sites the dump already gives ({site: array}). -> ({site: array}, notes, the dump keys used)"""
    if cfg.gemma4:  # a multimodal checkpoint's text decoder: model.language_model.* read as model.*
        named = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): k
                 for k in arrays}
    else:
        named = {k: k for k in arrays}
    get = lambda key, ndim: _unbatch(named[key], np.asarray(arrays[named[key]]), ndim).astype(np.float64)  # noqa: E731
    out, layers, used, notes = {}, [], set(), []
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}.mlp."
        site = f"blocks.{l}.mlp.act"
        if site in have or p + "act_fn" not in named or p + "up_proj" not in named:
            continue
        gelu, up = get(p + "act_fn", 2), get(p + "up_proj", 2)
        if gelu.shape != up.shape:
            raise InputError(f"{named[p + 'act_fn']} has shape {list(gelu.shape)} but {named[p + 'up_proj']} "
                             f"{list(up.shape)}")
        out[site] = gelu * up
        layers.append(l)
        used.add(named[p + "act_fn"])
    if layers:
        notes.append(f"mlp.act of layers {', '.join(map(str, layers))}: act_fn's output times up_proj's (the dump "
                     "has no down_proj:in)")
    if cfg.gemma4:
        more, more_notes, more_used = _derived_gemma4(named, get, cfg, {**have, **out})
        out.update(more)
        notes += more_notes
        used |= more_used
    return out, notes, used


def _derived_gemma4(named: dict, get, cfg: Config, have: dict) -> tuple[dict, list[str], set[str]]:
    """derived_hf's Gemma 4 sites (per-layer inputs) and notes on what a module-output dump cannot hold."""
    L, P, D = cfg.n_layers, cfg.d_ple, cfg.d_model
    out, notes, used = {}, [], set()
    if cfg.ple:
        proj = "model.per_layer_model_projection"
        if "ple.model_proj" not in have and proj in named:
            out["ple.model_proj"] = _layers_apart(named[proj], get(proj, 2), L, P) * D ** -0.5
            used.add(named[proj])
            notes.append("ple.model_proj: model.per_layer_model_projection's output / sqrt(D) (the dump has no "
                         "model.per_layer_projection_norm:in)")
        norm = "model.per_layer_projection_norm"
        token = have.get("ple.token")
        if "ple.input" not in have and norm in named and token is not None:
            normed = get(norm, 3)
            if normed.shape != token.shape:
                raise InputError(f"{named[norm]} has shape {list(normed.shape)} (batch axis dropped); ple.input of "
                                 f"this model is [T, {L}, {P}]")
            out["ple.input"] = (normed + token.astype(np.float64)) * 2 ** -0.5
            used.add(named[norm])
            notes.append("ple.input: (model.per_layer_projection_norm's output + ple.token) / sqrt(2), as HF's "
                         "project_per_layer_inputs forms it")
        ple_input = have.get("ple.input", out.get("ple.input"))
        layers = []
        for l in range(L):
            act = f"model.layers.{l}.act_fn"
            if f"blocks.{l}.ple.act" in have or act not in named or ple_input is None:
                continue
            gelu = get(act, 2)
            if gelu.shape != ple_input[:, l].shape:
                raise InputError(f"{named[act]} has shape {list(gelu.shape)} (batch axis dropped); "
                                 f"blocks.{l}.ple.gate of this model is [T, {P}]")
            out[f"blocks.{l}.ple.act"] = gelu * ple_input[:, l].astype(np.float64)
            used.add(named[act])
            layers.append(l)
        if layers:
            notes.append(f"ple.act of layers {', '.join(map(str, layers))}: the layer's act_fn output times "
                         "ple.input[:, l] (the dump has no per_layer_projection:in)")
    if cfg.moe:
        index = [named[f"model.layers.{l}.router:top_k_index"] for l in range(L)
                 if f"model.layers.{l}.router:top_k_index" in named]
        used |= set(index)
        if index:
            notes.append("router:top_k_index: the chosen experts (integers) are compared through their weights, "
                         "router:top_k_weights")
        plain = [l for l in range(L) if f"model.layers.{l}.router" in named and f"blocks.{l}.moe.topk.weight"
                 not in have]
        used |= {named[f"model.layers.{l}.router"] for l in plain}
        if plain:
            notes.append("model.layers.{l}.router's output is a tuple (probabilities, top-k weights, top-k index) "
                         "and a module-output dump keeps its probabilities, which are no refprism site: save its "
                         "[1] as model.layers.{l}.router:top_k_weights to compare moe.topk.weight")
        if any(re.fullmatch(r"model\.layers\.\d+\.experts(:in)?", k) for k in named):
            notes.append("HF's expert loop keeps no per-expert tensors (moe.gate/up/act/expert_out): the replay "
                         "computes them from the experts' input")
    return out, notes, used


def _unbatch(name, a, ndim):
    """Drop a leading batch axis of 1 (forward hooks see [1, ...]); refuse a batch of several prompts."""
    if a.ndim == ndim + 1:
        if a.shape[0] != 1:
            raise InputError(f"{name} has a batch of {a.shape[0]} (shape {list(a.shape)}): compare takes one prompt, "
                             "batch 1")
        return a[0]
    if a.ndim != ndim:
        raise InputError(f"{name} has {a.ndim} axes (shape {list(a.shape)}); an HF {name.split(':')[0]} tensor has "
                         f"{ndim} (plus a batch axis of 1)")
    return a


def _heads(name, a, site, heads, H):
    """[T, heads*H] -> [T, heads, H] (HF's .view(..., -1, head_dim): head-major columns)."""
    if a.shape[-1] != heads * H:
        raise InputError(f"{name} has shape {list(a.shape)}: {site} needs a last axis of {heads} heads x {H} = "
                         f"{heads * H}")
    return a.reshape(a.shape[0], heads, H)
