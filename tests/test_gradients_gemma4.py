"""refprism.gradients on Gemma 4 (tiny-gemma4: every feature on, every scalar that starts at 1 randomised).

The Gemma 4 backward (gradients.backward._gemma4_block, _moe_vjp, _ple_inputs_vjp) against independent references:
- the true gradient at every recorded float site, against central differences of the forward with that site
  perturbed by the forward's own edit hook (the forward is HF's to 1e-9 in float64: test_parity_gemma4.py), and
  against torch autograd on HF's Gemma4ForCausalLM in float64 (tests/hf_reference.gemma4_float64: HF's float32
  norms, softmaxes and RoPE tables patched) at the embedding and every layer's input and output;
- each freeze switch alone, against differences of a forward holding that factor (norm scales, pattern, gelu
  factors of the MLP, the experts and the per-layer inputs, the routing weights);
- everything frozen: grad . x = the readout at every residual site, and grad x activation = the prisms' terms.

Five-point central differences in float64 with h = 1e-4: O(h^4) ~ 1e-10 plus rounding O(eps / h) ~ 1e-12 on
O(1) readouts; 1e-7 of the directional derivative's size leaves that margin, and a wrong or missing derivative
is O(1) off.
"""

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


def test_gradient_equals_torch_autograd_on_hf_float64(checkpoint, model):
    """HF's Gemma4ForCausalLM in float64 (hf_reference.gemma4_float64 patches the float32 norms, softmaxes and
    RoPE tables), torch.autograd on the capped logits' readout: the gradient at the scaled embedding (both its
    paths: the layers and the per-layer inputs), every layer's input and output, the attention and MLP outputs
    and the final norm's output, and each layer's module outputs that are refprism sites as they are (ln1.out,
    q_pre, k_pre, o_proj, ln2.out, the MLP's gate, up and down, the MoE's dense branch, router logits, experts'
    input, sum and post-norm, the per-layer input's gate, projection and output) and inputs (attn.z, resid_mid,
    mlp.act, resid_mlp, ple.act), within 1e-8 of each site's largest |gradient|. HF's autograd is first checked
    against central differences of its own forward along one direction."""
    import torch
    import transformers
    from hf_reference import gemma4_float64

    d = checkpoint("tiny-gemma4")
    hf = transformers.Gemma4ForCausalLM.from_pretrained(str(d), dtype=torch.float64, attn_implementation="eager",
                                                        experts_implementation="eager").eval()
    cfg = model.config
    ids = _smooth_ids(model)
    ours = gradients(model, model.run(ids), targets=TARGETS, versus=FOILS, position=POSITION, readout="capped")
    tids, coef = ours.targets.coefficients(np.float64)
    tm = hf.model
    undo = gemma4_float64(hf)
    try:
        def run(shift=None):
            kept, hooks = {}, []

            def keep(name, shifted=False):
                def hook(mod, args, out):
                    t = out[0] if isinstance(out, tuple) else out
                    if shifted and shift is not None:
                        t = t + torch.from_numpy(shift)[None]
                    if t.requires_grad:  # (not in the no_grad difference runs)
                        t.retain_grad()
                    kept[name] = t
                    return t if not isinstance(out, tuple) else (t, *out[1:])
                return hook

            def keep_input(name):  # a module's input: the tensor itself (every reader's gradient in its .grad)
                def hook(mod, args, kwargs):
                    t = args[0] if args else kwargs["hidden_states"]
                    if t.requires_grad:
                        t.retain_grad()
                    kept[name] = t
                return hook

            hooks.append(tm.embed_tokens.register_forward_hook(keep("embed", shifted=True)))
            for l, layer in enumerate(tm.layers):
                b = f"blocks.{l}."
                a = layer.self_attn
                hooks.append(layer.register_forward_hook(keep(b + "resid_post")))
                hooks.append(layer.post_attention_layernorm.register_forward_hook(keep(b + "attn.out")))
                hooks.append(layer.post_feedforward_layernorm.register_forward_hook(keep(b + "mlp.out")))
                # module outputs that are refprism sites as they are (up to a reshape): each one's whole gradient
                inner = [(layer.input_layernorm, "ln1.out"), (a.q_proj, "attn.q_pre"), (a.o_proj, "attn.o_proj"),
                         (layer.pre_feedforward_layernorm, "ln2.out"), (layer.mlp.gate_proj, "mlp.gate"),
                         (layer.mlp.up_proj, "mlp.up"), (layer.mlp.down_proj, "mlp.down")]
                if not a.is_kv_shared_layer:  # (on a k_eq_v layer the k_proj output is V's input too: both paths)
                    inner.append((a.k_proj, "attn.k_pre"))
                if getattr(layer, "enable_moe_block", False):
                    inner += [(layer.post_feedforward_layernorm_1, "mlp.dense"),
                              (layer.router.proj, "moe.router.logits"),
                              (layer.pre_feedforward_layernorm_2, "ln2_moe.out"), (layer.experts, "moe.down"),
                              (layer.post_feedforward_layernorm_2, "moe.out")]
                if cfg.ple:
                    inner += [(layer.per_layer_input_gate, "ple.gate"), (layer.per_layer_projection, "ple.proj"),
                              (layer.post_per_layer_input_norm, "ple.out")]
                hooks += [module.register_forward_hook(keep(b + site)) for module, site in inner]
                inputs = [(a.o_proj, "attn.z"), (layer.pre_feedforward_layernorm, "resid_mid"),
                          (layer.mlp.down_proj, "mlp.act")]
                if cfg.ple:
                    inputs += [(layer.per_layer_input_gate, "resid_mlp"), (layer.per_layer_projection, "ple.act")]
                hooks += [module.register_forward_pre_hook(keep_input(b + site), with_kwargs=True)
                          for module, site in inputs]
            hooks.append(tm.norm.register_forward_hook(keep("ln_final.out")))
            try:
                logits = hf(torch.tensor([list(map(int, ids))]), use_cache=False, output_hidden_states=True).logits
            finally:
                for h in hooks:
                    h.remove()
            readout = logits[0, POSITION, torch.from_numpy(tids)] @ torch.from_numpy(coef).T
            return readout, kept

        # HF's own autograd against its own central differences (along one direction at the embedding)
        u = np.random.default_rng(7).standard_normal((len(ids), cfg.d_model))
        readout, kept = run()
        grads = {}
        for z in range(len(coef)):
            for t in kept.values():
                t.grad = None
            readout[z].backward(retain_graph=True)
            for name, t in kept.items():  # [1, T, ...] or flattened [T, ...]: refprism's layout by a reshape
                grads.setdefault(name, []).append(t.grad.numpy().reshape(ours.record[name].shape[1:]).copy())
        grads = {name: np.stack(g) for name, g in grads.items()}
        with torch.no_grad():
            h = 1e-5
            fd = (run(h * u)[0] - run(-h * u)[0]).numpy() / (2 * h)
        an = grads["embed"].reshape(len(coef), -1) @ u.ravel()
        np.testing.assert_allclose(an, fd, rtol=1e-7)
    finally:
        undo()
    for name, theirs in grads.items():
        scale = np.abs(theirs).max()
        assert scale > 1e-6, name
        assert np.abs(ours.record[name] - theirs).max() <= 1e-8 * scale, name
    producers = sum(cfg.has_kv(l) for l in range(cfg.n_layers))
    per_moe = 5 * cfg.n_layers if cfg.moe else 0
    assert len(grads) == (3 + 7 + 3 + 5 * cfg.ple) * cfg.n_layers + producers + per_moe + 2, sorted(grads)


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
