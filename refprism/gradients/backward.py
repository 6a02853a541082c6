"""One backward pass over the recorded forward: the gradient of a readout with respect to every recorded site.

The pass runs the forward's ops in reverse, each through its hand-written vector-Jacobian product (ops.*_vjp),
reading the forward values it needs from the run's record (or recomputing them layer by layer for a selective
record). Every gradient carries a leading readout axis Z: one backward pass computes many readout rows at once.

**The gradient of site x** is dR/dx: how the readout R changes when the value that flows on from site x (what an
edit returns there, forward.forward's edit=) is perturbed, everything after it recomputed. Sites that are one
value under two names (blocks.{l}.resid_post and blocks.{l+1}.resid_pre, embed and blocks.0.resid_pre) have one
gradient.

**freeze**: any subset of FREEZABLE. A frozen factor is held at its recorded value: the edge from its input to
the factor is cut, the factor's own site keeps its gradient.
    norm     every RMSNorm scale s (ln1, ln2, the post-norms, q/k norms, the final norm): dR/dx keeps only
             g (1 + w) / s; dR/ds is still recorded
    pattern  every attention pattern: no gradient reaches the scores, q or k (dR/dpattern is still recorded)
    gelu     every gelu(gate) factor of act = gelu(gate) * up: no gradient reaches the gate
    softcap  the soft-caps (Gemma 2's scores, and the final one under readout="logprob"/"capped") as factors
             cap tanh(x / cap) = x r(x) with r held at the recorded x (ops.softcap_factor)
Everything frozen is the linear map the prisms decompose (grad . embed = the readout, exactly); nothing frozen
is the true gradient.

**drop**: layers (ints) whose block the backward skips (AtP*'s GradDrop), or single sublayers ("L3.attn",
"L3.mlp"): the gradient passes a dropped sublayer through the skip path only (resid_mid -> resid_pre for
attention, resid_post -> resid_mid for the MLP), its output (attn.out, mlp.out) gets the gradient of the residual
it adds to, and its inner sites get zero.

**Readouts** at one position p (`position=`), one row per target (minus the mean of the foils, `versus=`), through
the prisms' own target resolution (prisms.resolve_targets, prisms.logits_readout):
    "logit"    the prisms' readout: logits (pre-cap on Gemma 2, as every prism and validate read it)
    "capped"   the model's logits after Gemma 2's final soft-cap (= "logit" on Gemma 1 and 3)
    "logprob"  log-probabilities log_softmax(logits) (after the final soft-cap), minus the foils' mean
    an array   u [Z, D] or [D]: the direction(s) u . x_final[p] at the final residual (blocks.{L-1}.resid_post)
Axis letters as in ops.py; Z readout rows.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.forward import forward
from refprism.gemma.record import Lazy, Record, axis_sizes, symbolic_shapes
from refprism.model import Run

FREEZABLE = ("norm", "pattern", "gelu", "softcap")
READOUTS = ("logit", "capped", "logprob")


@dataclass
class Gradients:
    """The gradient of each readout row with respect to every recorded site: record[name] is [Z, *site shape].

    labels:   one per readout row (the targets' labels, or "u0", "u1", ... for directions)
    value:    [Z] the readout's value in the run (what the gradient is of)
    readout:  "logit", "capped", "logprob" or "direction";  freeze, drop: as asked
    token_embedding: [Z, T, D] the gradient with respect to the embedding rows E[tokens] (before the sqrt(D)
              scale: what torch.autograd.grad gives for HF's inputs_embeds / sqrt(D)... see embedding_gradient)
    """

    model: object = field(repr=False)
    run: Run = field(repr=False)
    labels: list
    value: np.ndarray
    position: int
    readout: str
    freeze: tuple
    drop: tuple
    record: Record = field(repr=False)
    targets: object = field(default=None, repr=False)  # prisms.Targets (None for directions)

    @property
    def token_embedding(self) -> np.ndarray:
        """dR/dE[tokens] [Z, T, D]: through the sqrt(D) embedding scale (ops.embed_vjp)."""
        return ops.embed_vjp(self.record["embed"], self.model.normalizer)


def gradients(model, prompt_or_run, *, targets=None, versus=(), position=-1, readout="logit", freeze=(), drop=(),
              dtype=None, record=None, down_to=0) -> Gradients:
    """The gradient of a readout of the run with respect to every recorded site, in one backward pass.

    model:   a loaded refprism Model;  prompt_or_run: text, token ids, or a Run (a full record is read as it is; a
             selective one is recomputed layer by layer, never more than one layer at a time beyond it)
    targets, versus: the readout's rows, as the prisms take them (None: the run's top token at `position`)
    readout: "logit" (default, pre-cap), "capped", "logprob", or directions u [Z, D] / [D] at the final residual
    freeze:  a subset of FREEZABLE;  drop: layers (or "L{l}.attn" / "L{l}.mlp") the backward skips (GradDrop)
    dtype:   the compute dtype: that of the model (load the model in float64 for a float64 gradient)
    record:  None (every site) or globs of the gradient sites to keep (e.g. ["embed", "blocks.*.attn.z"])
    down_to: stop the backward at this layer (its sites and those after it only): a method that reads one
             layer's gradient need not go further down
    Shapes:  -> Gradients.record[name] [Z, *shape of the site]
    """
    cfg = model.config
    if dtype is not None and np.dtype(dtype) != model.dtype:
        raise InputError(f"the model computes in {model.dtype}, not {np.dtype(dtype)}: load it with "
                         f"refprism.load(..., dtype={np.dtype(dtype).name!r}) for a {np.dtype(dtype).name} gradient")
    freeze = _freeze(freeze)
    drop = _drop(cfg, drop)
    run = prompt_or_run if isinstance(prompt_or_run, Run) else model.run(prompt_or_run)
    p = P.resolve_position(run, position)
    layers = _layer_source(model, run, p)
    top = layers.top  # a record with the final residual, the final norm and the logits at the readout position
    seed, labels, value, kind, tg = _seed(model, run, top, p, targets, versus, readout, freeze)
    keep = None if record is None else ([record] if isinstance(record, str) else list(record))
    if keep is not None:
        names = list(symbolic_shapes(cfg))
        for glob in keep:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise InputError(f"gradient record entry {glob!r} names no recorded site of this model")
    if not isinstance(down_to, (int, np.integer)) or not 0 <= down_to < cfg.n_layers:
        raise InputError(f"down_to {down_to!r}: layers are 0 .. {cfg.n_layers - 1}")
    grads = backward(model, layers, seed, p, freeze=freeze, drop=drop, keep=keep, down_to=int(down_to))
    return Gradients(model, run, labels, value, p, kind, tuple(sorted(freeze)), tuple(sorted(drop)), grads, tg)


def _freeze(freeze) -> frozenset:
    if isinstance(freeze, str):
        freeze = [freeze]
    if freeze is True or freeze == "all":
        return frozenset(FREEZABLE)
    bad = [f for f in freeze if f not in FREEZABLE]
    if bad:
        raise InputError(f"freeze {bad[0]!r} is not one of {', '.join(FREEZABLE)}")
    return frozenset(freeze)


def _drop(cfg, drop) -> frozenset:
    """drop= -> {(layer, "attn" | "mlp")}: a layer l drops both its sublayers; "L{l}.attn" / "L{l}.mlp" one."""
    if isinstance(drop, (int, np.integer, str)):
        drop = [drop]
    out = set()
    for item in drop:
        if isinstance(item, str):
            layer, _, kind = item.partition(".")
            if not (layer[:1] == "L" and layer[1:].isdigit() and kind in ("attn", "mlp")):
                raise InputError(f"drop {item!r}: give layers (ints) or sublayers L{{l}}.attn / L{{l}}.mlp")
            l, kinds = int(layer[1:]), (kind,)
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            l, kinds = int(item), ("attn", "mlp")
        else:
            raise InputError(f"drop {item!r}: give layers (ints) or sublayers L{{l}}.attn / L{{l}}.mlp")
        if not 0 <= l < cfg.n_layers:
            raise InputError(f"drop {item!r}: layers are 0 .. {cfg.n_layers - 1}")
        out.update((l, k) for k in kinds)
    return frozenset(out)


# ------------------------------------------------------------------------------------------------- the seed


@dataclass
class Seed:
    """Where the backward starts: dR/d(ln_final.out)[p] [Z, D], or dR/dx_final[p] [Z, D] for a direction; plus
    the gradients of the logits sites at p ([Z, V], zero elsewhere) for the record."""

    at_norm: np.ndarray | None  # [Z, D] gradient of ln_final.out at p
    at_final: np.ndarray | None  # [Z, D] gradient of the final residual at p (directions)
    logits: dict  # name -> [Z, V] at p


def _seed(model, run, top, p, targets, versus, readout, freeze):
    """The readout's seed, labels and value. Math (row z, ids of the targets and foils, coef [Z, I]):
        logit:   R = coef . l[p, ids],  l = h E^T (pre-cap)              => dR/dh[p] = coef E[ids]
        capped:  R = coef . c[p, ids],  c = softcap(l)                   => dR/dl[p, ids] = coef c'(l)
        logprob: R = coef . (c - logsumexp c)[p, ids]                    => dR/dc[p] = coef (onehot(ids) - softmax c)
        direction u: R = u . x_final[p]                                   => dR/dx_final[p] = u
    """
    cfg, params, dtype = model.config, model.params, model.dtype
    if not isinstance(readout, str):
        u = np.asarray(readout, dtype=dtype)
        u = u[None] if u.ndim == 1 else u
        if u.ndim != 2 or u.shape[1] != cfg.d_model:
            raise InputError(f"a direction readout is u [Z, D] or [D] with D = {cfg.d_model}, got shape "
                             f"{list(np.shape(readout))}")
        if targets is not None or versus:
            raise InputError("a direction readout takes no targets or versus")
        x = top[P.site_name(2 * cfg.n_layers, cfg.n_layers)][p]
        return Seed(None, u, {}), [f"u{z}" for z in range(len(u))], u @ x, "direction", None
    if readout not in READOUTS:
        raise InputError(f"readout {readout!r} is not one of {', '.join(READOUTS)}, or a direction array")
    if targets is None:
        if versus:
            raise InputError("versus needs targets")
        targets = [f"#{int(np.argmax(_raw_logits(model, top, p)))}"]
    tg = targets if isinstance(targets, P.Targets) else P.resolve_targets(model, targets, versus)
    ids, coef = tg.coefficients(dtype)
    cap = cfg.final_softcap
    raw = _raw_logits(model, top, p)  # [V] pre-cap
    V = cfg.vocab_size
    if readout == "logit":
        g_raw = np.zeros((len(coef), V), dtype)
        np.add.at(g_raw, (slice(None), ids), coef)
        value = coef @ raw[ids]
        logits = {"logits_uncapped": g_raw} if cap is not None else {"logits": g_raw}
        if cap is not None:
            logits["logits"] = np.zeros_like(g_raw)  # the pre-cap readout does not read the capped logits
        return Seed(coef @ params.embed_rows(ids), None, logits), tg.labels, value, readout, tg
    capped = raw if cap is None else ops.softcap(raw, cap)
    g_c = np.zeros((len(coef), V), dtype)
    np.add.at(g_c, (slice(None), ids), coef)
    if readout == "logprob":
        z = capped - capped.max()
        logp = z - np.log(np.sum(np.exp(z)))
        value = coef @ logp[ids]
        g_c = g_c - coef.sum(axis=1, keepdims=True) * np.exp(logp)[None, :]
    else:
        value = coef @ capped[ids]
    logits = {"logits": g_c}
    if cap is not None:
        g_raw = ops.softcap_vjp(g_c, raw, cap, frozen="softcap" in freeze)
        logits["logits_uncapped"] = g_raw
    else:
        g_raw = g_c
    if readout == "logprob":
        at_norm = g_raw @ params.embedding()  # [Z, V] @ [V, D]: the tied unembedding's transpose
    else:
        at_norm = g_raw[:, ids] @ params.embed_rows(ids)
    return Seed(at_norm, None, logits), tg.labels, value, readout, tg


def _raw_logits(model, record, p) -> np.ndarray:
    """The pre-cap logits [V] at p: recorded, or ln_final.out[p] E^T (a record kept without logits)."""
    name = "logits_uncapped" if model.config.final_softcap is not None else "logits"
    if name in record:
        return record[name][p]
    return model.params.unembed(record["ln_final.out"][p][None])[0]


# ------------------------------------------------------------------------------------------------- the forward's values


class _Layers:
    """The forward values the backward reads: the run's full record, or (for a selective record) a checkpoint
    run of the residual stream and each layer's sites recomputed when the backward reaches it."""

    def __init__(self, model, run, top, full):
        self.model, self.run, self.top, self.full = model, run, top, full

    def layer(self, l):
        if self.full:
            return self.run.record
        return _one_layer(self.model, self.run.tokens, self.top, l)


def _layer_source(model, run, p) -> _Layers:
    """The run's own record when it holds every site but the logits (then its values are used as they are, an
    edited run's included); else a checkpoint forward of the tokens (a selective record's edits are not replayed)."""
    cfg = model.config
    rec = run.record
    if rec.selection is None or all(dict.__contains__(rec, n) and rec.selection.rows(n, len(run.tokens)) == "all"
                                    for n in symbolic_shapes(cfg) if not n.startswith("logits")):
        return _Layers(model, run, rec, True)
    keep = ["embed", "blocks.*.resid_pre", f"blocks.{cfg.n_layers - 1}.resid_post", "ln_final.scale",
            "ln_final.out", f"logits@{p}"] + ([f"logits_uncapped@{p}"] if cfg.final_softcap is not None else [])
    top = forward(model.params, cfg, run.tokens, normalizer=model.normalizer, record=keep)
    return _Layers(model, run, top, False)


class _Stop(Exception):
    """Raised by the one-layer edit once layer l's sites are recorded: the rest of the pass is not run."""


def _one_layer(model, tokens, top, l) -> Record:
    """Layer l's sites, recomputed from the checkpoint's resid_pre (forward.forward's resume=, and an edit that
    changes nothing and stops the pass at the layer's end): bit for bit the full run's values of that layer."""
    held = {}

    def stop(name, value, record):
        if name == f"blocks.{l}.resid_post":
            held["record"] = record
            raise _Stop
        return value

    try:
        forward(model.params, model.config, tokens, normalizer=model.normalizer, edit=stop, resume=(l, top),
                record=[f"blocks.{l}.*"])
    except _Stop:
        pass
    return held["record"]


# ------------------------------------------------------------------------------------------------- the backward


def backward(model, layers: _Layers, seed: Seed, p: int, *, freeze=frozenset(), drop=frozenset(), keep=None,
             down_to=0, linear_mlp=None) -> Record:
    """Every site's gradient, layer by layer in reverse (docs/math.md section 5).

    Math:   per layer (reverse):  g(resid_mid) = g(resid_post) + ln2^T . geglu^T . W_down^T . post2^T g(resid_post)
                                  g(resid_pre) = g(resid_mid) + ln1^T . [W_Q, W_K, W_V]^T . attn^T . W_O^T . post1^T g
            each ^T the op's VJP (ops.*_vjp), with the frozen factors' edges cut.
    down_to: the lowest layer to go down to (the sites below it, and embed, are not computed when > 0)
    linear_mlp: {layer: vjp} for dropped MLPs replaced by a linear map of resid_mid (a skip transcoder's h W_skip
             under the freeze): g(resid_mid) = g(resid_post) + vjp(g(resid_post)), vjp [Z, T, D] -> [Z, T, D]
    Shapes: seed rows Z -> record[name] [Z, *site shape]
    """
    cfg, params, dtype = model.config, model.params, model.dtype
    eps_frozen = "norm" in freeze
    top = layers.top
    T = top.shape_of("embed")[0] if "embed" in top else len(layers.run.tokens)
    Z = len(seed.at_norm if seed.at_norm is not None else seed.at_final)
    D, H = cfg.d_model, cfg.d_head
    out = Record()

    def put(name, value):
        if keep is None or any(fnmatch.fnmatchcase(name, g) for g in keep):
            out[name] = value

    for name, g in seed.logits.items():  # [Z, V] at p; zero at every other position: built when read
        put(name, Lazy(lambda g=g: _at_position(g, p, T), (Z, T, g.shape[1]), dtype))
    x_final = top[P.site_name(2 * cfg.n_layers, cfg.n_layers)]
    if seed.at_final is not None:
        g_x = np.zeros((Z, T, D), dtype)
        g_x[:, p] = seed.at_final
        put("ln_final.out", np.zeros((Z, T, D), dtype))
        put("ln_final.scale", np.zeros((Z, T), dtype))
    else:
        g_h = np.zeros((Z, T, D), dtype)
        g_h[:, p] = seed.at_norm
        put("ln_final.out", g_h)
        g_x, g_s = ops.rms_norm_vjp(g_h, x_final, top["ln_final.scale"], params.ln_final, frozen=eps_frozen)
        put("ln_final.scale", g_s)
    positions = np.arange(T)
    for l in reversed(range(down_to, cfg.n_layers)):
        b = f"blocks.{l}."
        put(b + "resid_post", g_x)
        rec = None if (l, "attn") in drop and (l, "mlp") in drop else layers.layer(l)
        def w(key, l=l):
            return params.get(l, key)

        # MLP: resid_post = resid_mid + post2(act W_down), act = gelu(gate) * up, gate/up = ln2.out W_gate/W_up
        if (l, "mlp") in drop:  # GradDrop: the skip path only
            _dropped(put, cfg, l, "mlp", g_x, Z, T, dtype)
            if linear_mlp and l in linear_mlp:  # ... plus the linear map that stands for the MLP
                g_x = g_x + linear_mlp[l](g_x)
                put(b + "resid_mid", g_x)
        else:
            put(b + "mlp.out", g_x)
            g = g_x
            if cfg.post_norms:
                g, g_sp = ops.rms_norm_vjp(g, rec[b + "mlp.down"], rec[b + "ln2_post.scale"], w("ln2_post"),
                                           frozen=eps_frozen)
                put(b + "mlp.down", g)
                put(b + "ln2_post.scale", g_sp)
            g_act = g @ w("W_down").T  # [Z, T, F]
            put(b + "mlp.act", g_act)
            g_gate, g_up = ops.geglu_vjp(g_act, rec[b + "mlp.gate"], rec[b + "mlp.up"], frozen="gelu" in freeze)
            del g_act
            put(b + "mlp.gate", g_gate)
            put(b + "mlp.up", g_up)
            g_h = g_up @ w("W_up").T
            if "gelu" not in freeze:
                g_h += g_gate @ w("W_gate").T
            del g_gate, g_up
            put(b + "ln2.out", g_h)
            g_xm, g_s = ops.rms_norm_vjp(g_h, rec[b + "resid_mid"], rec[b + "ln2.scale"], w("ln2"), frozen=eps_frozen)
            put(b + "ln2.scale", g_s)
            g_x = g_x + g_xm  # resid_mid: the skip path plus the MLP's
            put(b + "resid_mid", g_x)

        # Attention: resid_mid = resid_pre + post1(z W_O), z = pattern v, pattern = softmax(softcap(q.k scale))
        if (l, "attn") in drop:
            _dropped(put, cfg, l, "attn", g_x, Z, T, dtype)
            continue
        put(b + "attn.out", g_x)
        g = g_x
        if cfg.post_norms:
            g, g_sp = ops.rms_norm_vjp(g, rec[b + "attn.o_proj"], rec[b + "ln1_post.scale"], w("ln1_post"),
                                       frozen=eps_frozen)
            put(b + "attn.o_proj", g)
            put(b + "ln1_post.scale", g_sp)
        g_z = ops.heads_out_vjp(g, w("W_O"))  # [Z, T, N, H]
        put(b + "attn.z", g_z)
        pattern, v = rec[b + "attn.pattern"], rec[b + "attn.v"]
        g_pattern, g_v = ops.attention_mix_vjp(g_z, pattern, v)
        del g_z
        put(b + "attn.pattern", g_pattern)
        put(b + "attn.v", g_v)
        g_h = ops.project_vjp(g_v, w("W_V"))
        del g_v
        if "pattern" in freeze:  # the pattern held: nothing reaches the scores, q or k
            del g_pattern
            for name in ("attn.scores", "attn.q", "attn.k", "attn.q_pre", "attn.k_pre") + \
                    (("attn.q_norm.scale", "attn.k_norm.scale") if cfg.qk_norm else ()):
                put(b + name, np.zeros((Z,) + _shape(cfg, b + name, T), dtype))
        else:
            g_a = ops.softmax_vjp(g_pattern, pattern)
            del g_pattern
            if cfg.attn_softcap is not None:
                g_a = ops.softcap_vjp(g_a, rec[b + "attn.scores"], cfg.attn_softcap, frozen="softcap" in freeze)
            put(b + "attn.scores", g_a)
            q, k = rec[b + "attn.q"], rec[b + "attn.k"]
            g_q, g_k = ops.attention_scores_vjp(g_a, q, k, cfg.query_pre_attn_scalar ** -0.5)
            del g_a
            put(b + "attn.q", g_q)
            put(b + "attn.k", g_k)
            theta, scale = cfg.rope_of(l)
            cos, sin = ops.rope_tables(positions / scale, H, theta, dtype)
            g_q, g_k = ops.rope_vjp(g_q, cos, sin), ops.rope_vjp(g_k, cos, sin)
            if cfg.qk_norm:  # Gemma 3: each head's q and k normalised over H before RoPE
                g_q, g_sq = ops.rms_norm_vjp(g_q, rec[b + "attn.q_pre"], rec[b + "attn.q_norm.scale"],
                                             w("q_norm"), frozen=eps_frozen)
                g_k, g_sk = ops.rms_norm_vjp(g_k, rec[b + "attn.k_pre"], rec[b + "attn.k_norm.scale"],
                                             w("k_norm"), frozen=eps_frozen)
                put(b + "attn.q_norm.scale", g_sq)
                put(b + "attn.k_norm.scale", g_sk)
            put(b + "attn.q_pre", g_q)
            put(b + "attn.k_pre", g_k)
            g_h += ops.project_vjp(g_q, w("W_Q")) + ops.project_vjp(g_k, w("W_K"))
            del g_q, g_k
        put(b + "ln1.out", g_h)
        g_xp, g_s = ops.rms_norm_vjp(g_h, rec[b + "resid_pre"], rec[b + "ln1.scale"], w("ln1"), frozen=eps_frozen)
        put(b + "ln1.scale", g_s)
        g_x = g_x + g_xp
        put(b + "resid_pre", g_x)
        del rec
    if down_to == 0:
        put("embed", g_x)
    return out


def _dropped(put, cfg, l, kind, g_x, Z, T, dtype):
    """A dropped sublayer: its output gets the gradient of the residual it adds to, its inner sites zero, and
    the residual before it the same gradient as after (the skip path only)."""
    b = f"blocks.{l}."
    inner = ("ln2.", "mlp.", "ln2_post.") if kind == "mlp" else ("ln1.", "attn.", "ln1_post.")
    for name in _block_sites(cfg, l):
        site = name[len(b):]
        if site == kind + ".out":
            put(name, g_x)
        elif site.startswith(inner):
            put(name, np.zeros((Z,) + _shape(cfg, name, T), dtype))
    put(b + ("resid_mid" if kind == "mlp" else "resid_pre"), g_x)


def _at_position(g, p, T):
    full = np.zeros((g.shape[0], T, g.shape[1]), g.dtype)
    full[:, p] = g
    return full


def _block_sites(cfg, l):
    prefix = f"blocks.{l}."
    return [n for n in symbolic_shapes(cfg) if n.startswith(prefix)]


def _shape(cfg, name, T):
    sizes = axis_sizes(cfg, T)
    return tuple(sizes[a] for a in symbolic_shapes(cfg)[name])
