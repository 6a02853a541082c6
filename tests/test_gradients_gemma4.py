"""refprism.gradients on Gemma 4 (tiny-gemma4: every feature on, every scalar that starts at 1 randomised).

The Gemma 4 backward (gradients.backward._gemma4_block, _moe_vjp, ple_inputs_vjp) against independent references:
- the true gradient at every recorded float site, against central differences of the forward with that site
  perturbed by the forward's own edit hook (the forward is HF's to 1e-9 in float64: test_parity_gemma4.py), and
  against torch autograd on HF's Gemma4ForCausalLM in float64 (tests/hf_reference.gemma4_float64: HF's float32
  norms, softmaxes and RoPE tables patched) at every site of the gradient record, on tiny-gemma4, on it without
  k_eq_v and on tiny-gemma4-unified (Gemma4UnifiedForCausalLM);
- each freeze switch alone, against differences of a forward holding that factor (norm scales, pattern, gelu
  factors of the MLP, the experts and the per-layer inputs, the routing weights);
- everything frozen: grad . x = the readout at every residual site, and grad x activation = the prisms' terms.

Five-point central differences in float64 with h = 1e-4: O(h^4) ~ 1e-10 plus rounding O(eps / h) ~ 1e-12 on
O(1) readouts; 1e-7 of the directional derivative's size leaves that margin, and a wrong or missing derivative
is O(1) off.
"""

import functools

import numpy as np
import pytest

import refprism
from refprism import prisms as P
from refprism.gemma import ops
from refprism.gemma.record import symbolic_shapes
from refprism.gradients.backward import FREEZABLE, gradients

TARGETS, FOILS = ["#5", "#11"], ["#3"]
POSITION = 6


@pytest.fixture(scope="module")
def model(checkpoint):
    return refprism.load(checkpoint("tiny-gemma4"), dtype="float64")


def _ids(model, T=9, seed=4):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, T)


def _readout(model, rec, coef, tids):
    name = "logits_uncapped" if model.config.final_softcap is not None else "logits"
    return coef @ rec[name][POSITION, tids]


def _directional(model, ids, site, d, coef, tids, hold=None, h=1e-4):
    """The directional derivative of the readout along d at `site`: the five-point central stencil, error
    O(h^4) (the per-layer inputs' norm over P = 16 has a small scale and a large third derivative, where the
    three-point stencil's O(h^2) error reaches 1e-6 relative at h = 1e-5) plus rounding O(eps / h)."""
    def value(step):
        def edit(name, v, record):
            if hold is not None:
                v = hold(name, v, record)
            return v + step * d if name == site else v
        return _readout(model, model.run(ids, edit=edit).record, coef, tids)

    return (8 * (value(h) - value(-h)) - (value(2 * h) - value(-2 * h))) / (12 * h)


def test_the_model_has_every_gemma4_feature(model):
    cfg = model.config
    assert cfg.gemma4 and cfg.ple and cfg.moe and cfg.norm_offset == 0
    assert any(not cfg.has_kv(l) for l in range(cfg.n_layers)), "no KV-sharing consumer"
    assert any(cfg.k_eq_v_at(l) for l in range(cfg.n_layers)), "no k_eq_v layer"
    assert any(cfg.rope_partial_of(l) < 1 for l in range(cfg.n_layers)), "no partial RoPE"
    assert len({cfg.mlp_width_of(l) for l in range(cfg.n_layers)}) == 2, "no double-wide MLP"
    scalars = [float(model.params.get(l, "layer_scalar")[0]) for l in range(cfg.n_layers)]
    assert all(abs(s - 1) > 1e-3 for s in scalars), scalars


def _routing_margin(model, run):
    """The smallest gap, over the MoE layers and positions, between the k-th and (k+1)-th router logits: the
    top-k choice is a step function, and a difference step must not cross it."""
    cfg = model.config
    gaps = []
    for l in range(cfg.n_layers):
        r = np.sort(run.record[f"blocks.{l}.moe.router.logits"], axis=-1)[:, ::-1]
        gaps.append((r[:, cfg.top_k - 1] - r[:, cfg.top_k]).min())
    return min(gaps)


def _smooth_ids(model):
    """A prompt whose routing is 0.004 away from every tie (the difference steps, 2e-4 along N(0, 1) directions,
    move the router logits by ~1e-3 at most; the tiny model's logits are O(0.3))."""
    for seed in range(400):
        ids = _ids(model, seed=seed)
        if _routing_margin(model, model.run(ids)) > 0.004:
            return ids
    raise AssertionError("no prompt with routing away from ties")


def test_true_gradient_at_every_site_equals_central_differences(model):
    cfg = model.config
    ids = _smooth_ids(model)
    clean = model.run(ids)
    g = gradients(model, clean, targets=TARGETS, versus=FOILS, position=POSITION)
    tids, coef = g.targets.coefficients(np.float64)
    rng = np.random.default_rng(0)
    names = [n for n in symbolic_shapes(cfg) if not n.startswith("logits") and n != "ln_final.out"
             and clean.record[n].dtype.kind == "f"]
    assert len(names) > 200
    checked = big = 0
    for name in names + ["ln_final.out"]:
        d = rng.standard_normal(clean.record[name].shape)
        fd = _directional(model, ids, name, d, coef, tids)
        an = g.record[name].reshape(len(coef), -1) @ d.ravel()
        scale = max(np.abs(an).max(), np.abs(fd).max())
        if name.endswith("moe.router.logits") or name.endswith("moe.topk.weight"):
            assert scale > 1e-6, f"{name}: the routing carries no gradient"
        # the stencil's rounding is eps |R| / h ~ 1e-10 absolute: a floor of 1e-9 |R| for sites of small gradient
        assert np.abs(fd - an).max() <= 1e-7 * scale + 1e-9 * np.abs(g.value).max(), (name, fd, an)
        checked += 1
        big += scale > 1e-3 * np.abs(g.value).max()
    assert checked == len(names) + 1 and big > 0.8 * checked, (big, checked)  # most sites checked at 1e-7


def _hold(model, clean, switch):
    """A forward edit holding one factor at the clean run's value (the forward's edit= hook)."""
    def edit(name, value, record):
        if switch == "norm" and name.endswith(".scale"):
            return clean.record[name].copy()
        if switch == "pattern" and name.endswith("attn.pattern"):
            return clean.record[name].copy()
        if switch == "gelu":
            for act, gate, up in (("mlp.act", "mlp.gate", "mlp.up"), ("moe.act", "moe.gate", "moe.up")):
                if name.endswith(act):
                    return ops.gelu_tanh(clean.record[name.replace(act, gate)]) * record[name.replace(act, up)]
            if name.endswith("ple.act"):  # act = gelu(gate_clean) * ple.input[:, l] (this run's input)
                l = int(name.split(".")[1])
                return ops.gelu_tanh(clean.record[name.replace("ple.act", "ple.gate")]) * record["ple.input"][:, l]
        if switch == "router" and name.endswith(("moe.topk.weight", "moe.topk.index")):  # the choice, too
            return clean.record[name].copy()
        return value
    return edit


@pytest.mark.parametrize("switch", [s for s in FREEZABLE if s != "softcap"])  # Gemma 4: no attention soft-cap
def test_each_freeze_switch_equals_differences_of_a_forward_with_the_factor_held(model, switch):
    cfg = model.config
    ids = _smooth_ids(model)
    clean = model.run(ids)
    g = gradients(model, clean, targets=TARGETS, versus=FOILS, position=POSITION, freeze=[switch])
    true = gradients(model, clean, targets=TARGETS, versus=FOILS, position=POSITION)
    tids, coef = g.targets.coefficients(np.float64)
    hold = _hold(model, clean, switch)
    rng = np.random.default_rng(1)
    producer = next(cfg.kv_source(l) for l in range(cfg.n_layers) if not cfg.has_kv(l))
    moe_layer = 1
    sites = ["embed", "ple.model_proj", "blocks.0.ln1.out", "blocks.1.resid_mid", f"blocks.{producer}.attn.k_pre",
             f"blocks.{moe_layer}.resid_mid"]
    for site in sites:
        d = rng.standard_normal(clean.record[site].shape)
        fd = _directional(model, ids, site, d, coef, tids, hold)
        an = g.record[site].reshape(len(coef), -1) @ d.ravel()
        assert np.abs(fd - an).max() <= 1e-7 * np.abs(an).max(), (site, fd, an)
    # the switch changes something (at the embedding, which every factor's path reaches)
    diff = np.abs(g.record["embed"] - true.record["embed"]).max()
    assert diff > 1e-4 * np.abs(true.record["embed"]).max(), f"{switch} changes nothing"


def test_all_frozen_is_linear_and_gives_the_residual_prism(model):
    cfg = model.config
    ids = _ids(model)
    run = model.run(ids)
    g = gradients(model, run, targets=TARGETS, versus=FOILS, position=POSITION, freeze=FREEZABLE)
    readout = P.logits_readout(model, run, TARGETS, versus=FOILS, position=POSITION)
    np.testing.assert_allclose(g.value, readout.whole, rtol=1e-14)
    # Everything frozen, the readout is affine in each residual site x: R = grad . x + R(x := 0), where R(0) comes
    # from a forward holding every factor at the clean run's value and setting that site to zero (the forward's
    # edit hook). (Gemma 4 is not homogeneous: the per-layer inputs' token piece and the KV-sharing consumers'
    # values, computed below the site, enter after it as constants.)
    holds = [_hold(model, run, s) for s in FREEZABLE if s != "softcap"]
    tids, coef = g.targets.coefficients(np.float64)
    sites = ["embed"] + [f"blocks.{l}.{r}" for l in range(cfg.n_layers)
                         for r in ("resid_pre", "resid_mid", "resid_mlp", "resid_post")]
    for name in sites:
        def edit(site, v, record, name=name):
            for hold in holds:
                v = hold(site, v, record)
            return np.zeros_like(v) if site == name else v
        r0 = _readout(model, model.run(ids, edit=edit).record, coef, tids)
        dot = np.einsum("ztd,td->z", g.record[name], run.record[name]) + r0
        np.testing.assert_allclose(dot, g.value, rtol=1e-10, err_msg=name)
    token = np.einsum("ztlq,tlq->z", g.record["ple.token"], run.record["ple.token"])
    dot = np.einsum("ztd,td->z", g.record["embed"], run.record["embed"]) + token
    np.testing.assert_allclose(dot, g.value, rtol=1e-10)  # below every consumer: only the token piece is constant
    # grad x activation of each residual part, every later layer dropped (no path through them), = its prism term
    split = P.residual_prism(readout)
    parts = dict(zip(split.labels, split.values))
    everything = gradients(model, run, targets=TARGETS, versus=FOILS, position=POSITION, freeze=FREEZABLE,
                           drop=range(cfg.n_layers))
    tol = 1e-10 * np.abs(readout.whole).max()
    for label, term in parts.items():
        if label == "embed" or not label.endswith((".attn", ".mlp", ".ple")):
            continue
        l, kind = int(label[1:].split(".")[0]), label.split(".")[1]
        site = f"blocks.{l}.{kind}.out"
        gx = np.einsum("ztd,td->z", everything.record[site], run.record[site])
        assert np.abs(gx - term).max() <= tol, label
    assert sum(label.endswith((".attn", ".mlp", ".ple")) for label in parts) == 3 * cfg.n_layers


def test_selective_record_is_recomputed_layer_by_layer(model):
    ids = _ids(model, 11, 2)
    full = gradients(model, model.run(ids), targets=TARGETS, versus=FOILS, readout="logprob", position=5)
    sel = gradients(model, model.run(ids, record=["logits@-1"]), targets=TARGETS, versus=FOILS, readout="logprob",
                    position=5)
    # a difference of log-probabilities (|log p| ~ 5) from logits at p that the checkpoint pass computes as a
    # 1-row product (another summation order than the [T, V] one): absolute rounding, ~1e-15 (seen 9e-16, 1.8e-15)
    np.testing.assert_allclose(sel.value, full.value, rtol=1e-14, atol=1e-13)
    assert set(sel.record) == set(full.record)
    for name in full.record:
        np.testing.assert_allclose(sel.record[name], full.record[name], rtol=0,
                                   atol=1e-13 * max(1.0, np.abs(full.record[name]).max()), err_msg=name)


def test_gradient_drop_keeps_the_consumers_key_value_path(model):
    """GradDrop of a producer's attention: the producer's own attention is skipped, but what its KV-sharing
    consumers read from its k and v still reaches its input (that path is theirs), checked by differences with
    the producer's own attention output held at the clean value and its consumers computing."""
    cfg = model.config
    producer = next(cfg.kv_source(l) for l in range(cfg.n_layers) if not cfg.has_kv(l))
    ids = _ids(model)
    clean = model.run(ids)
    u = np.random.default_rng(5).standard_normal((1, cfg.d_model))
    g = gradients(model, clean, readout=u, position=POSITION, drop=[f"L{producer}.attn"])
    b = f"blocks.{producer}."
    assert np.all(g.record[b + "attn.z"] == 0) and np.any(g.record[b + "attn.k"] != 0)

    def hold(name, value, record):  # the dropped sublayer's own output held: only the consumers read its k, v
        return clean.record[name].copy() if name == b + "attn.out" else value

    x = f"blocks.{cfg.n_layers - 1}.resid_post"
    d = np.random.default_rng(6).standard_normal(clean.record[b + "ln1.out"].shape)

    def value(step):
        def edit(name, v, record):
            v = hold(name, v, record)
            return v + step * d if name == b + "ln1.out" else v
        return u @ model.run(ids, edit=edit).record[x][POSITION]

    fd = (value(1e-5) - value(-1e-5)) / 2e-5
    an = g.record[b + "ln1.out"].reshape(1, -1) @ d.ravel()
    np.testing.assert_allclose(an, fd, rtol=1e-7)


# Gemma 4 against HF's autograd: every feature on; HF's own copy of the decoder without PLE and MoE
# (Gemma4UnifiedForCausalLM); and a V projection of its own on the full layers (no k_eq_v)
HF_PRESETS = [("tiny-gemma4", {}), ("tiny-gemma4-unified", {}), ("tiny-gemma4", {"attention_k_eq_v": False})]

# recorded sites that have no tensor in HF's computation, with the reason (none: every site of the gradient record is
# compared; the integer top-k indices are not in it, and are compared as the routing HF chose)
NO_HF_TENSOR: dict[str, str] = {}


def _heads(g):
    """HF's attention layout [1, heads, T, H] -> refprism's [T, heads, H]."""
    return g[0].transpose(1, 0, 2)


def _slots(g, *, tok, slot, T, J, part=slice(None)):
    """One expert's rows g[:, part] [n, width] (HF's order: torch.where over [J, T]) -> refprism's [T, J, width],
    0 at the other experts' slots."""
    out = np.zeros((T, J, g[:, part].shape[-1]))
    out[tok, slot] = g[:, part]
    return out


def _hf_sites(hf, keep, routes):
    """Hooks on HF's Gemma 4 that hand every tensor of its forward which is a refprism site to
    keep(name, tensor, layout=None) (layout: that tensor's gradient [1, ...] -> refprism's shape, else a reshape; a
    site given several pieces is their sum: the experts' slots) and each MoE layer's top-k index to routes[layer].
    Returns (on_scale for hf_reference.gemma4_float64, remove)."""
    import torch
    from hf_reference import gemma4_module

    g4 = gemma4_module(hf)
    tm = hf.model
    ple = getattr(tm, "hidden_size_per_layer_input", 0)  # Gemma4Unified*: no PLE or MoE attributes at all
    hooks = []

    def on(module, name, layout=None):  # the module's output
        hooks.append(module.register_forward_hook(
            lambda mod, args, out: keep(name, out[0] if isinstance(out, tuple) else out, layout)))

    def on_input(module, name, alias=False):  # the module's input; alias: a view of its own is passed on instead,
        def hook(mod, args, kwargs):  # whose gradient is this reader's alone
            x = args[0] if args else kwargs["hidden_states"]
            if alias:
                x = x.view_as(x)
                args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            keep(name, x)
            return args, kwargs
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    norms = {tm.norm: "ln_final.scale"}  # each RMSNorm's s = sqrt(mean(x^2) + eps): refprism's `.scale` site
    on(tm.embed_tokens, "embed")
    on(tm.norm, "ln_final.out")
    if ple:
        norms[tm.per_layer_projection_norm] = "ple.model_proj_norm.scale"
        on(tm.embed_tokens_per_layer, "ple.token")
        on_input(tm.per_layer_projection_norm, "ple.model_proj")
        project = tm.project_per_layer_inputs

        def project_per_layer_inputs(*args, **kwargs):
            out = project(*args, **kwargs)
            keep("ple.input", out)
            return out

        tm.project_per_layer_inputs = project_per_layer_inputs
    for l, layer in enumerate(tm.layers):
        b = f"blocks.{l}."
        a = layer.self_attn
        moe = getattr(layer, "enable_moe_block", False)
        norms.update({layer.input_layernorm: b + "ln1.scale", layer.post_attention_layernorm: b + "ln1_post.scale",
                      layer.pre_feedforward_layernorm: b + "ln2.scale",
                      layer.post_feedforward_layernorm: b + "ln2_post.scale", a.q_norm: b + "attn.q_norm.scale"})
        # the layer's input: an alias, so that layer 0's is the layers' path alone (the embedding feeds the PLE too)
        on_input(layer, b + "resid_pre", alias=True)
        on(layer, b + "resid_post")
        on(layer.input_layernorm, b + "ln1.out")
        on(a.q_proj, b + "attn.q_pre")
        on_input(a.o_proj, b + "attn.z")
        on(a.o_proj, b + "attn.o_proj")
        on(layer.post_attention_layernorm, b + "attn.out")
        if not a.is_kv_shared_layer:
            norms.update({a.k_norm: b + "attn.k_norm.scale", a.v_norm: b + "attn.v_norm.scale"})
            on(a.k_proj, b + "attn.k_pre")  # (on a k_eq_v layer the k_proj output is V's input too: both paths)
            on_input(a.v_norm, b + "attn.v_pre", alias=True)  # V's path alone (k_eq_v: v_pre is k_pre's tensor)
        on_input(layer.pre_feedforward_layernorm, b + "resid_mid")
        on(layer.pre_feedforward_layernorm, b + "ln2.out")
        on(layer.mlp.gate_proj, b + "mlp.gate")
        on(layer.mlp.up_proj, b + "mlp.up")
        on_input(layer.mlp.down_proj, b + "mlp.act")
        on(layer.mlp.down_proj, b + "mlp.down")
        on(layer.post_feedforward_layernorm, b + "mlp.out")
        if ple:
            norms[layer.post_per_layer_input_norm] = b + "ple_post.scale"
            on_input(layer.per_layer_input_gate, b + "resid_mlp")
            on(layer.per_layer_input_gate, b + "ple.gate")
            on_input(layer.per_layer_projection, b + "ple.act")
            on(layer.per_layer_projection, b + "ple.proj")
            on(layer.post_per_layer_input_norm, b + "ple.out")
        else:  # resid_mlp = resid_mid + mlp.out is the tensor HF scales in place by layer_scalar (no tensor of its
            on(layer.post_feedforward_layernorm, b + "resid_mlp")  # own): its gradient is the addend mlp.out's
        if moe:
            norms.update({layer.post_feedforward_layernorm_1: b + "ln2_post1.scale",
                          layer.pre_feedforward_layernorm_2: b + "ln2_moe.scale",
                          layer.post_feedforward_layernorm_2: b + "ln2_post2.scale",
                          layer.router.norm: b + "moe.router.scale"})
            on_input(layer.post_feedforward_layernorm, b + "mlp.sum")
            on(layer.post_feedforward_layernorm_1, b + "mlp.dense")
            on(layer.router.proj, b + "moe.router.logits")

            def router(mod, args, out, b=b):  # (probabilities, top-k weights [T, J], top-k index [T, J])
                keep(b + "moe.topk.weight", out[1])
                routes[b] = out[2].numpy().copy()

            hooks.append(layer.router.register_forward_hook(router))
            on(layer.pre_feedforward_layernorm_2, b + "ln2_moe.out")
            on(layer.experts, b + "moe.down")
            on(layer.post_feedforward_layernorm_2, b + "moe.out")
            hooks += _expert_slots(layer.experts, b, keep)

    original = g4.eager_attention_forward

    def attention(module, query, key, value, *args, **kwargs):
        b = f"blocks.{module.layer_idx}."
        keep(b + "attn.q", query, _heads)
        if not module.is_kv_shared_layer:  # a consumer's k and v are its producer's tensors: kept there
            keep(b + "attn.k", key, _heads)
            keep(b + "attn.v", value, _heads)
        softmax = torch.nn.functional.softmax

        def pattern(x, *a, **kw):  # eager's one softmax: of the scores plus the mask (a constant: same gradient)
            keep(b + "attn.scores", x)
            p = softmax(x, *a, **kw)
            keep(b + "attn.pattern", p)
            return p

        torch.nn.functional.softmax = pattern
        try:
            return original(module, query, key, value, *args, **kwargs)
        finally:
            torch.nn.functional.softmax = softmax

    g4.eager_attention_forward = attention

    def remove():
        g4.eager_attention_forward = original
        for h in hooks:
            h.remove()
        if ple:
            del tm.project_per_layer_inputs

    return (lambda norm, s: keep(norms[norm], s)), remove


def _expert_slots(experts, b, keep):
    """Hooks on HF's expert loop (Gemma4TextExperts.forward: per expert e hit, rows (slot, token) = torch.where of
    its one-hot mask [J, T]; gate, up = linear(rows, gate_up_proj[e]).chunk(2); out = linear(act, down_proj[e])):
    torch's linear is wrapped while it runs, and each call's weight tells the expert (by value) and the kind."""
    import torch

    state = {}

    def start(mod, args):
        _, index, _ = args
        T, J = index.shape
        linear = state["linear"] = torch.nn.functional.linear

        def spy(x, w, *rest):
            y = linear(x, w, *rest)
            for e in range(experts.num_experts):
                slot, tok = (i.numpy() for i in torch.where((index == e).T))  # HF's rows of expert e
                place = functools.partial(_slots, tok=tok, slot=slot, T=T, J=J)  # (g, part) -> [T, J, width]
                if w.shape == experts.gate_up_proj.shape[1:] and torch.equal(w, experts.gate_up_proj[e]):
                    G = w.shape[0] // 2
                    keep(b + "moe.gate", y, functools.partial(place, part=slice(None, G)))
                    keep(b + "moe.up", y, functools.partial(place, part=slice(G, None)))
                elif w.shape == experts.down_proj.shape[1:] and torch.equal(w, experts.down_proj[e]):
                    keep(b + "moe.act", x, place)
                    keep(b + "moe.expert_out", y, place)
            return y

        torch.nn.functional.linear = spy

    def stop(mod, args, out):
        torch.nn.functional.linear = state.pop("linear")

    return [experts.register_forward_pre_hook(start), experts.register_forward_hook(stop)]


@pytest.mark.parametrize("preset, overrides", HF_PRESETS)
def test_gradient_equals_torch_autograd_on_hf_float64(checkpoint, preset, overrides):
    """HF's Gemma4ForCausalLM (or Gemma4UnifiedForCausalLM) in float64 (hf_reference.gemma4_float64 patches the
    float32 norms, softmaxes and RoPE tables), torch.autograd on the capped logits' readout, at every site of
    refprism's gradient record: module outputs and inputs (forward hooks), each norm's scale s as the patched norm
    forms it, q, k, v after norms and RoPE and the scores (+ the constant mask) and pattern at eager attention's
    softmax, each selected expert's gate, up, act and output at torch's linear inside HF's expert loop (placed by
    HF's own routing, which must be refprism's), the top-k weights, the per-layer inputs' pieces and the logits;
    within 1e-8 of each site's largest |gradient|. (Without per-layer inputs, resid_mlp = resid_mid + mlp.out has no
    tensor of its own, HF scales it in place by layer_scalar: it is compared with mlp.out's, a sum's gradient being
    each addend's.) HF's autograd is first checked against central differences of its own forward along one
    direction."""
    import torch
    import transformers
    from hf_reference import gemma4_float64

    d = checkpoint(preset, **overrides)
    model = refprism.load(d, dtype="float64")
    cls = transformers.Gemma4UnifiedForCausalLM if preset.endswith("unified") else transformers.Gemma4ForCausalLM
    hf = cls.from_pretrained(str(d), dtype=torch.float64, attn_implementation="eager",
                             experts_implementation="eager").eval()
    cfg = model.config
    ids = _smooth_ids(model) if cfg.moe else _ids(model)
    run = model.run(ids)
    ours = gradients(model, run, targets=TARGETS, versus=FOILS, position=POSITION, readout="capped")
    tids, coef = ours.targets.coefficients(np.float64)
    logits = "logits_uncapped" if cfg.final_softcap is not None else "logits"

    def forward(shift=None, keep=None, routes=None):
        hooks, on_scale = [], None
        if keep is not None:
            on_scale, remove = _hf_sites(hf, keep, routes)
            hooks.append(remove)
            hooks.append(hf.lm_head.register_forward_hook(lambda mod, args, out: keep(logits, out)).remove)
        if shift is not None:  # the embedding moved along shift (the difference runs)
            hooks.append(hf.model.embed_tokens.register_forward_hook(
                lambda mod, args, out: out + torch.from_numpy(shift)[None]).remove)
        hooks.append(gemma4_float64(hf, on_scale=on_scale))
        try:
            # output_hidden_states: see hf_reference.hf_gemma4_record (the KV-shared layers' slicing stays off)
            out = hf(torch.tensor([list(map(int, ids))]), use_cache=False, output_hidden_states=True).logits
        finally:
            for undo in reversed(hooks):
                undo()
        if keep is not None and logits != "logits":
            keep("logits", out)
        return out[0, POSITION, torch.from_numpy(tids)] @ torch.from_numpy(coef).T

    kept, routes = {}, {}

    def keep(name, t, layout=None):
        t.retain_grad()
        kept.setdefault(name, []).append((t, layout))

    readout = forward(keep=keep, routes=routes)
    for b, index in routes.items():  # the slots are refprism's (HF's torch.topk and route_topk: by falling prob)
        np.testing.assert_array_equal(index, run.record[b + "moe.topk.index"], err_msg=b)
    grads = {name: [] for name in kept}
    for z in range(len(coef)):
        for pieces in kept.values():
            for t, _ in pieces:
                t.grad = None
        readout[z].backward(retain_graph=True)
        for name, pieces in kept.items():
            shape = ours.record[name].shape[1:]
            grads[name].append(sum(layout(t.grad.numpy()) if layout else t.grad.numpy().reshape(shape)
                                   for t, layout in pieces))
    grads = {name: np.stack(g) for name, g in grads.items()}
    # HF's own autograd against its own central differences (along one direction at the embedding)
    u = np.random.default_rng(7).standard_normal((len(ids), cfg.d_model))
    with torch.no_grad():  # the five-point stencil of _directional
        h = 1e-4
        step = lambda k: forward(shift=k * h * u).numpy()  # noqa: E731
        fd = (8 * (step(1) - step(-1)) - (step(2) - step(-2))) / (12 * h)
    np.testing.assert_allclose(grads["embed"].reshape(len(coef), -1) @ u.ravel(), fd, rtol=1e-7)

    assert set(grads) == set(ours.record) - set(NO_HF_TENSOR), (
        sorted(set(ours.record) - set(grads)), sorted(set(grads) - set(ours.record)))
    worst = (0.0, None)
    for name, theirs in sorted(grads.items()):
        scale = np.abs(theirs).max()
        if name.endswith("ln1.scale"):
            # ln1.out feeds only q, k and v, each RMS-normed per head after it: the readout sees ln1's scale only
            # through those norms' eps, and its gradient -sum_d g(ln1.out) ln1.out / s (1e-8 .. 1e-6) is what is
            # left of terms that cancel; both sides' rounding is relative to those terms, so they are the scale
            out = name[:-len("scale")] + "out"
            terms = np.abs(grads[out] * run.record[out][None]).sum(-1) / run.record[name][None]
            assert scale > 1e-9 and terms.max() > 1e3 * scale, (name, scale, terms.max())
            scale = max(scale, terms.max())
        assert scale > 1e-6, (name, scale)  # every gradient is a real one (not 0 on both sides)
        err = np.abs(ours.record[name] - theirs).max() / scale
        worst = max(worst, (err, name))
        assert err <= 1e-8, (name, err, ours.record[name].ravel()[:4], theirs.ravel()[:4])
    print(f"{preset} {overrides}: {len(grads)} of {len(ours.record)} sites, worst {worst[0]:.1e} at {worst[1]}")


def test_float32_stays_float32_and_close_to_float64(checkpoint):
    """No site's gradient is silently promoted, and float32 is float64's within 1e-3 of the record's largest
    gradient (per site, the near-zero ln1.scale gradients are rounding noise: q, k, v are normed after it)."""
    m32 = refprism.load(checkpoint("tiny-gemma4"))
    m64 = refprism.load(checkpoint("tiny-gemma4"), dtype="float64")
    ids = _smooth_ids(m64)
    g32 = gradients(m32, ids, targets=TARGETS, versus=FOILS, position=POSITION)
    g64 = gradients(m64, ids, targets=TARGETS, versus=FOILS, position=POSITION)
    assert set(g32.record) == set(g64.record)
    top = max(np.abs(g64.record[n]).max() for n in g64.record)
    for name in g32.record:
        assert g32.record[name].dtype == np.float32, name
        assert np.abs(g32.record[name] - g64.record[name]).max() <= 1e-3 * top, name


@pytest.mark.parametrize("freeze", [(), FREEZABLE])
def test_backward_truncated_to_the_rows_positions_equals_the_full_one(model, freeze):
    """Gemma 4 (KV sharing, per-layer inputs, experts): as test_gradients' check_truncated."""
    from test_gradients import check_truncated

    check_truncated(model, _ids(model), freeze)
