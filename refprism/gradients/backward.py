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
    router   Gemma 4 MoE: the routing weights w (moe.topk.weight) held: no gradient reaches the router's logits
             (the top-k choice itself is a step function: it never has a gradient)
Everything frozen is the linear map the prisms decompose (grad . embed = the readout, exactly); nothing frozen
is the true gradient.

**Gemma 4** (_gemma4_block): norms scale by w (offset 0), v_norm has no weight, scores are scaled by 1, the
partial RoPE's fixed dims pass the gradient unchanged, a KV-sharing consumer's key and value gradients reach its
producer's attn.k / attn.v (the producer's site holds the sum over itself and its consumers), k_eq_v's
attn.k_pre gets the key path plus attn.v_pre's, the MoE's routing weights pass the gradient to the router
(softmax over E, top-k renormalised, per_expert_scale), the per-layer inputs' gradient collects over the layers
into ple.input and reaches the embedding through ple.model_proj, and layer_scalar scales the gradient leaving
each layer. There `embed` and blocks.0.resid_pre are two gradients: the embedding also feeds the per-layer inputs.
A dropped L{l}.mlp (GradDrop) also drops the layer's per-layer-input branch; layer_scalar stays (it scales the
skip path itself).

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
import threading
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.forward import forward
from refprism.gemma.record import Lazy, Record, axis_sizes, layer_of, symbolic_shapes, whole_but_logits
from refprism.model import Run

FREEZABLE = ("norm", "pattern", "gelu", "softcap", "router")
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
             selective one is recomputed layer by layer, never more than one layer at a time beyond it). A prompt
             runs with the full record, its logits only at `position` (Model.run's positions=)
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
    run = prompt_or_run if isinstance(prompt_or_run, Run) else model.run_reading(prompt_or_run, position)
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
        if not self.full:
            return _one_layer(self.model, self.run.tokens, self.top, l)
        rec = self.run.record
        if _recipes(self.model.config, rec, l):
            # a long prompt's full record keeps most of layer l as recipes (record.Lazy), and the backward's reads
            # would recompute each chain once per read (mlp.down alone recomputes gate, up and act; mlp.gate and
            # mlp.up again): one pass of the layer from its resid_pre computes each site once, the same bits
            return _one_layer(self.model, self.run.tokens, rec, l)
        return rec


class _Held(_Layers):
    """A full record's values for many backward passes over one run (the graphs' rows, graphs.build): each site
    resolved on its first read and kept, so a long prompt's recipes (record.Lazy) are computed once per run, not
    once per pass, and no layer is recomputed whole (_Layers.layer's one-layer forward, per pass: at T = 1,024 it
    was 45% of a graph's time, for the few attention sites a pass with every MLP dropped reads). The same values
    (a recipe recomputes its site bit for bit); only what is read is kept. Safe for concurrent passes: a site is
    resolved under a lock."""

    def __init__(self, layers: _Layers):
        super().__init__(layers.model, layers.run, layers.top, layers.full)
        self._values = _Resolved(layers.run.record) if layers.full else None

    def layer(self, l):
        return self._values if self.full else super().layer(l)


class _Resolved:
    """A record read with each value resolved once: a Lazy entry computed on its first read, then kept."""

    def __init__(self, rec):
        self.rec, self.values, self.lock = rec, {}, threading.Lock()

    def __contains__(self, name):
        return name in self.rec

    def __getitem__(self, name):
        with self.lock:
            if name not in self.values:
                self.values[name] = self.rec[name]
            return self.values[name]


# Recipes that cost no weight product (the neuron activations from gate and up; the scores from q and k, read
# only through Gemma 2's soft-cap): a layer with only these is read from the record as it is
_CHEAP_RECIPES = ("mlp.act", "attn.scores", "moe.act")


def _recipes(cfg, rec, l) -> bool:
    """Whether the full record keeps a site of layer l, other than _CHEAP_RECIPES, as a recipe (record.Lazy)."""
    b = f"blocks.{l}."
    return any(isinstance(dict.get(rec, n), Lazy) for n in symbolic_shapes(cfg)
               if n.startswith(b) and not n.endswith(_CHEAP_RECIPES))


def _layer_source(model, run, p, *, held=False) -> _Layers:
    """The run's own record when it holds every site but the logits (then its values are used as they are, an
    edited run's included); else a checkpoint forward of the tokens (a selective record's edits are not replayed).
    held: a full record read through _Held (for many passes over the run)."""
    cfg = model.config
    rec = run.record
    if whole_but_logits(cfg, rec, len(run.tokens)):
        return _Held(_Layers(model, run, rec, True)) if held else _Layers(model, run, rec, True)
    keep = ["embed", "blocks.*.resid_pre", f"blocks.{cfg.n_layers - 1}.resid_post", "ln_final.scale",
            "ln_final.out", f"logits@{p}"] + ([f"logits_uncapped@{p}"] if cfg.final_softcap is not None else [])
    if cfg.ple:  # Gemma 4: a resumed layer reads the per-layer inputs; the backward ends through them
        keep += ["ple.*"]
    for src in sorted({cfg.kv_source(l) for l in range(cfg.n_layers) if not cfg.has_kv(l)}):
        keep += [f"blocks.{src}.attn.k", f"blocks.{src}.attn.v"]  # KV sharing: what a resumed consumer attends
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


class _Window:
    """A record read at positions 0 .. T-1 only: every T and S axis sliced (views, nothing copied)."""

    def __init__(self, rec, T, shapes):
        self.rec, self.T, self.shapes = rec, T, shapes

    def __contains__(self, name):
        return name in self.rec

    def __getitem__(self, name):
        value = self.rec[name]
        axes = self.shapes.get(name)
        if axes is None:
            return value
        return value[tuple(slice(0, self.T) if a in ("T", "S") else slice(None) for a in axes)]


class _WindowLayers:
    """_Layers read through a _Window: the forward values of a backward truncated to positions 0 .. T-1."""

    def __init__(self, layers, T):
        self.layers, self.run, self.T = layers, layers.run, T
        self.shapes = symbolic_shapes(layers.model.config)
        self.top = _Window(layers.top, T, self.shapes)

    def layer(self, l):
        return _Window(self.layers.layer(l), self.T, self.shapes)


def backward(model, layers: _Layers, seed: Seed, p, *, freeze=frozenset(), drop=frozenset(), keep=None,
             down_to=0, linear_mlp=None, upto=None) -> Record:
    """Every site's gradient, layer by layer in reverse (docs/math.md section 5).

    Math:   per layer (reverse):  g(resid_mid) = g(resid_post) + ln2^T . geglu^T . W_down^T . post2^T g(resid_post)
                                  g(resid_pre) = g(resid_mid) + ln1^T . [W_Q, W_K, W_V]^T . attn^T . W_O^T . post1^T g
            each ^T the op's VJP (ops.*_vjp), with the frozen factors' edges cut.
    down_to: the lowest layer to go down to (the sites below it, and embed, are not computed when > 0)
    linear_mlp: {layer: vjp} for dropped MLPs replaced by a linear map of resid_mid (a skip transcoder's h W_skip
             under the freeze): g(resid_mid) = g(resid_post) + vjp(g(resid_post)), vjp [Z, T, D] -> [Z, T, D]
    p:       the seed's position, or one position per row [Z] (rows at several positions in one pass)
    upto:    None (every position), or compute positions 0 .. upto - 1 only (upto > every row's position): the
             readout at p reads no position after p (causal attention, per-position norms and MLPs), so every
             site's gradient there is exactly zero, for any freeze; each site's T and S axes are then upto long
    Shapes: seed rows Z -> record[name] [Z, *site shape] (T, S -> upto with upto)
    """
    cfg, params, dtype = model.config, model.params, model.dtype
    eps_frozen = "norm" in freeze
    top = layers.top
    T = top.shape_of("embed")[0] if "embed" in top else len(layers.run.tokens)
    Z = len(seed.at_norm if seed.at_norm is not None else seed.at_final)
    rows_at = np.broadcast_to(np.asarray(p), (Z,))
    if upto is not None:
        if not int(rows_at.max()) < upto <= T:
            raise InputError(f"upto {upto}: the rows sit at positions up to {int(rows_at.max())} of {T}")
        T = int(upto)
        layers = _WindowLayers(layers, T)
        top = layers.top
    z_all = np.arange(Z)
    D, H = cfg.d_model, cfg.d_head
    out = Record()

    def kept(name):
        return keep is None or any(fnmatch.fnmatchcase(name, g) for g in keep)

    def put(name, value):
        """Record a kept site's gradient; value: an array, or a function that makes one (a site of zeros is only
        allocated when kept: at T = 1,024 a frozen pattern's zero scores are [Z, N, T, S])."""
        if kept(name):
            out[name] = value() if callable(value) else value

    def wanted(name, freeze):
        """The pattern's gradient: needed unless the pattern is frozen and its gradient not kept."""
        return "pattern" not in freeze or kept(name)

    for name, g in seed.logits.items():  # [Z, V] at p; zero at every other position: built when read
        put(name, Lazy(lambda g=g: _at_position(g, rows_at, T), (Z, T, g.shape[1]), dtype))
    x_final = top[P.site_name(2 * cfg.n_layers, cfg.n_layers)]
    if seed.at_final is not None:
        g_x = np.zeros((Z, T, D), dtype)
        g_x[z_all, rows_at] = seed.at_final
        put("ln_final.out", partial(np.zeros, (Z, T, D), dtype))
        put("ln_final.scale", partial(np.zeros, (Z, T), dtype))
    else:
        g_h = np.zeros((Z, T, D), dtype)
        g_h[z_all, rows_at] = seed.at_norm
        put("ln_final.out", g_h)
        g_x, g_s = ops.rms_norm_vjp(g_h, x_final, top["ln_final.scale"], params.ln_final, offset=cfg.norm_offset,
                                    frozen=eps_frozen, scale_grad=kept("ln_final.scale"))
        put("ln_final.scale", g_s)
    positions = np.arange(T)
    shared = {}  # Gemma 4 KV sharing: producer layer -> [g_k, g_v] summed over its consumers (later layers)
    ropes = {}  # (theta, scale) -> cos, sin [T, H]
    g_ple = np.zeros((Z, T, cfg.n_layers, cfg.d_ple), dtype) if cfg.ple else None  # dR/dple.input, over layers
    for l in reversed(range(down_to, cfg.n_layers)):
        b = f"blocks.{l}."
        put(b + "resid_post", g_x)
        if cfg.gemma4:
            g_x = _gemma4_block(model, layers, l, g_x, put, freeze, drop, shared, g_ple, positions)
            continue
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
                                           frozen=eps_frozen, scale_grad=kept(b + "ln2_post.scale"))
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
            g_xm, g_s = ops.rms_norm_vjp(g_h, rec[b + "resid_mid"], rec[b + "ln2.scale"], w("ln2"), frozen=eps_frozen,
                                         scale_grad=kept(b + "ln2.scale"))
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
                                       frozen=eps_frozen, scale_grad=kept(b + "ln1_post.scale"))
            put(b + "attn.o_proj", g)
            put(b + "ln1_post.scale", g_sp)
        g_z = ops.heads_out_vjp(g, w("W_O"))  # [Z, T, N, H]
        put(b + "attn.z", g_z)
        pattern, v = rec[b + "attn.pattern"], rec[b + "attn.v"]
        g_pattern, g_v = ops.attention_mix_vjp(g_z, pattern, v, pattern_grad=wanted(b + "attn.pattern", freeze))
        del g_z
        put(b + "attn.pattern", g_pattern)
        put(b + "attn.v", g_v)
        g_h = ops.project_vjp(g_v, w("W_V"))
        del g_v
        if "pattern" in freeze:  # the pattern held: nothing reaches the scores, q or k
            del g_pattern
            for name in ("attn.scores", "attn.q", "attn.k", "attn.q_pre", "attn.k_pre") + \
                    (("attn.q_norm.scale", "attn.k_norm.scale") if cfg.qk_norm else ()):
                put(b + name, partial(np.zeros, (Z,) + _shape(cfg, b + name, T), dtype))
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
            if (theta, scale) not in ropes:  # one table per layer type (Gemma 3: sliding and full)
                ropes[theta, scale] = ops.rope_tables(positions / scale, H, theta, dtype)
            cos, sin = ropes[theta, scale]
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
        g_xp, g_s = ops.rms_norm_vjp(g_h, rec[b + "resid_pre"], rec[b + "ln1.scale"], w("ln1"), frozen=eps_frozen,
                                     scale_grad=kept(b + "ln1.scale"))
        put(b + "ln1.scale", g_s)
        g_x = g_x + g_xp
        put(b + "resid_pre", g_x)
        del rec
    if down_to == 0:
        if cfg.ple:
            g_x = g_x + ple_inputs_vjp(model, top, g_ple, put, eps_frozen)
        put("embed", g_x)
    return out


def ple_inputs_vjp(model, top, g_ple, put, eps_frozen):
    """Gemma 4: from dR/dple.input [Z, T, L, P] (collected over the layers) to the embedding's share.
    top: the record's ple.model_proj and its norm scale; put(name, gradient) receives each site's gradient (the
    backward's; edges._ple_direct passes a no-op to score embed -> ple on one layer's slice); eps_frozen: the norm
    scale held (the "norm" freeze switch).

    Math:   ple = (rms_norm(model; ple_norm) + token) / sqrt(2),  model = x_0 W_ple_model / sqrt(D)
            dR/dtoken = dR/dple / sqrt(2);  dR/dmodel = rms_norm^T(dR/dple / sqrt(2))
            dR/dx_0 (this path) = sum_{l,q} dR/dmodel[:, :, l, q] W_ple_model[:, l, q] / sqrt(D)
    Shapes: g_ple [Z, T, L, P] -> [Z, T, D]
    """
    cfg, params, dt = model.config, model.params, model.dtype
    put("ple.input", g_ple)
    g = g_ple * np.asarray(2.0 ** -0.5, dt)
    put("ple.token", g)
    g_m, g_s = ops.rms_norm_vjp(g, top["ple.model_proj"], top["ple.model_proj_norm.scale"], params.ple_norm,
                                offset=0, frozen=eps_frozen)
    put("ple.model_proj_norm.scale", g_s)
    put("ple.model_proj", g_m)
    return np.einsum("ztlp,dlp->ztd", g_m, params.ple_model(), optimize=True) * np.asarray(cfg.d_model ** -0.5, dt)


def _gemma4_block(model, layers, l, g_x, put, freeze, drop, shared, g_ple, positions):
    """One Gemma 4 layer's VJP (forward.forward's Gemma 4 branches, in reverse); -> dR/dresid_pre.

    Math:   resid_post = layer_scalar (resid_mlp + ple.out),  resid_mlp = resid_mid + mlp.out
            ple.out = rms_norm((gelu(resid_mlp W_pg) * ple[:, l]) W_pp; ple_post)
            mlp.out = rms_norm(mlp.down; ln2_post)  or, MoE, rms_norm(rms_norm(mlp.down; post1) + moe.out; ln2_post)
            moe.out = rms_norm(sum_j w_j out_j; post2),  w_j = p_j / sum_i p_i * c_j  (p = softmax(router), c the
                      per-expert scales) =>  dR/dp_j = (c_j dR/dw_j - sum_i w_i dR/dw_i) / sum_i p_i
            resid_mid = resid_pre + rms_norm(o_proj; ln1_post);  every norm's gain is w (offset 0)
            q = rope(rms_norm(ln1.out W_Q; q_norm));  k = rope(rms_norm(k_pre; k_norm));  v = v_pre / s_v
    Each ^T the op's VJP (ops.*_vjp), the frozen factors' edges cut as in `backward`.
    Shapes: g_x [Z, T, D] -> [Z, T, D]
    """
    cfg, params, dtype = model.config, model.params, model.dtype
    eps_frozen = "norm" in freeze
    b = f"blocks.{l}."
    Z, T, D = g_x.shape

    def w(key):
        return params.get(l, key)

    def norm(g, x_name, s_name, weight):
        g_in, g_s = ops.rms_norm_vjp(g, rec[b + x_name], rec[b + s_name], weight, offset=0, frozen=eps_frozen)
        put(b + s_name, g_s)
        return g_in

    def zeros(name):
        put(b + name, partial(np.zeros, (Z,) + _shape(cfg, b + name, T), dtype))

    rec = layers.layer(l)
    g = g_x * w("layer_scalar").astype(dtype)  # dR/d(resid_mlp + ple.out)
    if (l, "mlp") in drop:  # GradDrop: the MLP and the per-layer-input branch skipped; layer_scalar kept
        for name in _block_sites(cfg, l):
            site = name[len(b):]
            if site in ("mlp.out", "ple.out", "resid_mlp", "resid_mid"):
                put(name, g)
            elif site.startswith(("ln2.", "mlp.", "ln2_post", "moe.", "ln2_moe.", "ple.", "ple_post.")):
                put(name, partial(np.zeros, (Z,) + _shape(cfg, name, T), dtype))
        g_mid = g
    else:
        if cfg.ple:  # resid_post / layer_scalar = resid_mlp + rms_norm((gelu(gate) * ple_l) W_pp; ple_post)
            put(b + "ple.out", g)
            g_proj = norm(g, "ple.proj", "ple_post.scale", w("ple_post"))
            put(b + "ple.proj", g_proj)
            g_act = g_proj @ w("W_ple_proj").T  # [Z, T, P]
            put(b + "ple.act", g_act)
            g_gate, g_in = ops.geglu_vjp(g_act, rec[b + "ple.gate"], layers.top["ple.input"][:, l],
                                         frozen="gelu" in freeze)
            put(b + "ple.gate", g_gate)
            g_ple[:, :, l] += g_in
            if "gelu" not in freeze:  # the gate reads resid_mlp: the gelu factor's own path
                g = g + g_gate @ w("W_ple_gate").T
        put(b + "resid_mlp", g)
        put(b + "mlp.out", g)
        g_mid = g  # the skip path
        g_sum = norm(g, "mlp.sum" if cfg.moe else "mlp.down", "ln2_post.scale", w("ln2_post"))
        if cfg.moe:
            put(b + "mlp.sum", g_sum)
            put(b + "mlp.dense", g_sum)
            put(b + "moe.out", g_sum)
            g_mid = g_mid + _moe_vjp(model, rec, l, g_sum, put, norm, freeze)
            g_sum = norm(g_sum, "mlp.down", "ln2_post1.scale", w("ln2_post1"))
        put(b + "mlp.down", g_sum)
        g_act = g_sum @ w("W_down").T  # [Z, T, F]
        put(b + "mlp.act", g_act)
        g_gate, g_up = ops.geglu_vjp(g_act, rec[b + "mlp.gate"], rec[b + "mlp.up"], frozen="gelu" in freeze)
        put(b + "mlp.gate", g_gate)
        put(b + "mlp.up", g_up)
        g_h = g_up @ w("W_up").T
        if "gelu" not in freeze:
            g_h += g_gate @ w("W_gate").T
        put(b + "ln2.out", g_h)
        g_mid = g_mid + norm(g_h, "resid_mid", "ln2.scale", w("ln2"))
    put(b + "resid_mid", g_mid)

    # Attention: resid_mid = resid_pre + rms_norm(z W_O; ln1_post), z = pattern v, pattern = softmax(q . k)
    H = cfg.head_dim_of(l)
    theta, scale = cfg.rope_of(l)
    cos, sin = ops.rope_tables(positions / scale, H, theta, dtype, cfg.rope_partial_of(l))

    def producer_kv(g_k, g_v):
        """A producer's k and v sites (its own gradient plus its consumers') down to ln1.out."""
        g_k0, g_v0 = shared.pop(l, (0, 0))
        g_k, g_v = g_k + g_k0, g_v + g_v0
        put(b + "attn.k", g_k)
        put(b + "attn.v", g_v)
        g_vp = norm(g_v, "attn.v_pre", "attn.v_norm.scale", None)  # v_norm: no learned scale
        put(b + "attn.v_pre", g_vp)
        g_kp = norm(ops.rope_vjp(g_k, cos, sin), "attn.k_pre", "attn.k_norm.scale", w("k_norm"))
        if cfg.k_eq_v_at(l):  # v_pre is k_pre's value flowing on: k_pre's gradient is both paths'
            g_kp = g_kp + g_vp
            put(b + "attn.k_pre", g_kp)
            return ops.project_vjp(g_kp, w("W_K"))
        put(b + "attn.k_pre", g_kp)
        return ops.project_vjp(g_kp, w("W_K")) + ops.project_vjp(g_vp, w("W_V"))

    if (l, "attn") in drop:
        for name in _block_sites(cfg, l):
            site = name[len(b):]
            if site == "attn.out":
                put(name, g_mid)
            elif site.startswith(("ln1.", "attn.", "ln1_post.")):
                put(name, partial(np.zeros, (Z,) + _shape(cfg, name, T), dtype))
        g_pre = g_mid
        if cfg.has_kv(l) and l in shared:  # its consumers' key and value gradients are theirs: not dropped
            zero = np.zeros((Z, T) + _shape(cfg, b + "attn.k", T)[1:], dtype)
            g_h = producer_kv(zero, zero)
            put(b + "ln1.out", g_h)
            g_pre = g_mid + norm(g_h, "resid_pre", "ln1.scale", w("ln1"))
        put(b + "resid_pre", g_pre)
        return g_pre
    put(b + "attn.out", g_mid)
    g_o = norm(g_mid, "attn.o_proj", "ln1_post.scale", w("ln1_post"))
    put(b + "attn.o_proj", g_o)
    g_z = ops.heads_out_vjp(g_o, w("W_O"))  # [Z, T, N, H]
    put(b + "attn.z", g_z)
    src = cfg.kv_source(l)
    kv = rec if src == l else layers.top  # the producer's k, v (the full record, or kept by _layer_source)
    k, v = kv[f"blocks.{src}.attn.k"], kv[f"blocks.{src}.attn.v"]
    pattern = rec[b + "attn.pattern"]
    g_pattern, g_v = ops.attention_mix_vjp(g_z, pattern, v)
    del g_z
    put(b + "attn.pattern", g_pattern)
    if "pattern" in freeze:  # the pattern held: nothing reaches the scores, q or k
        for name in ("attn.scores", "attn.q", "attn.q_pre", "attn.q_norm.scale"):
            zeros(name)
        g_h, g_k = np.zeros((Z, T, D), dtype), np.zeros_like(g_v)
    else:
        g_a = ops.softmax_vjp(g_pattern, pattern)
        put(b + "attn.scores", g_a)
        g_q, g_k = ops.attention_scores_vjp(g_a, rec[b + "attn.q"], k, cfg.query_pre_attn_scalar ** -0.5)
        del g_a
        put(b + "attn.q", g_q)
        g_q = norm(ops.rope_vjp(g_q, cos, sin), "attn.q_pre", "attn.q_norm.scale", w("q_norm"))
        put(b + "attn.q_pre", g_q)
        g_h = ops.project_vjp(g_q, w("W_Q"))
    del g_pattern
    if src != l:  # a KV-sharing consumer: its key and value gradients go to the producer's sites
        acc = shared.setdefault(src, [0, 0])
        acc[0] = acc[0] + g_k
        acc[1] = acc[1] + g_v
    else:
        g_h = g_h + producer_kv(g_k, g_v)
    put(b + "ln1.out", g_h)
    g_pre = g_mid + norm(g_h, "resid_pre", "ln1.scale", w("ln1"))
    put(b + "resid_pre", g_pre)
    return g_pre


def _moe_vjp(model, rec, l, g_sum, put, norm, freeze):
    """Gemma 4 MoE's VJP from dR/dmoe.out (= dR/dmlp.sum) to its share of dR/dresid_mid.

    Math:   moe.out = rms_norm(down; post2),  down = sum_j w_j out_j,  out_j = (gelu(h2 Wg_e) * (h2 Wu_e)) Wd_e
            h2 = rms_norm(resid_mid; ln2_moe)
            dR/dw_j = dR/ddown . out_j;   dR/dout_j = w_j dR/ddown
            router (unless frozen): w = route_topk(r) with the choice held: dR/dr = ops.route_topk_vjp(dR/dw)
              r = (resid_mid / s_r * router_scale / sqrt(D)) W_router
    Shapes: g_sum [Z, T, D] -> [Z, T, D]
    """
    cfg, params, dt = model.config, model.params, model.dtype
    b = f"blocks.{l}."
    Z, T, D = g_sum.shape
    g_down = norm(g_sum, "moe.down", "ln2_post2.scale", params.get(l, "ln2_post2"))
    put(b + "moe.down", g_down)
    top, wts, out = rec[b + "moe.topk.index"], rec[b + "moe.topk.weight"], rec[b + "moe.expert_out"]
    g_out = g_down[:, :, None, :] * wts[None, :, :, None]  # [Z, T, J, D]
    g_w = np.einsum("ztd,tjd->ztj", g_down, out, optimize=True)
    put(b + "moe.expert_out", g_out)
    put(b + "moe.topk.weight", g_w)
    We_down, We_gate, We_up = (params.get(l, k) for k in ("We_down", "We_gate", "We_up"))
    g_act = np.empty(g_out.shape[:3] + (cfg.d_expert,), dt)
    for e in np.unique(top):  # each selected expert once, over its (token, slot) pairs
        t, j = np.nonzero(top == e)
        g_act[:, t, j] = g_out[:, t, j] @ We_down[e].T
    put(b + "moe.act", g_act)
    g_gate, g_up = ops.geglu_vjp(g_act, rec[b + "moe.gate"], rec[b + "moe.up"], frozen="gelu" in freeze)
    put(b + "moe.gate", g_gate)
    put(b + "moe.up", g_up)
    g_h2 = np.zeros((Z, T, D), dt)
    for e in np.unique(top):  # a token chooses an expert at most once: the t are distinct within e
        t, j = np.nonzero(top == e)
        g_h2[:, t] += g_up[:, t, j] @ We_up[e].T
        if "gelu" not in freeze:
            g_h2[:, t] += g_gate[:, t, j] @ We_gate[e].T
    put(b + "ln2_moe.out", g_h2)
    g_mid = norm(g_h2, "resid_mid", "ln2_moe.scale", params.get(l, "ln2_moe"))
    if "router" in freeze:
        put(b + "moe.router.logits", partial(np.zeros, (Z, T, cfg.n_experts), dt))
        put(b + "moe.router.scale", partial(np.zeros, (Z, T), dt))
        return g_mid
    g_r = ops.route_topk_vjp(g_w, rec[b + "moe.router.logits"], top, params.get(l, "per_expert_scale"))
    put(b + "moe.router.logits", g_r)
    g_n = (g_r @ params.get(l, "W_router").T) * (params.get(l, "router_scale").astype(dt) *
                                                np.asarray(cfg.d_model ** -0.5, dt))
    return g_mid + norm(g_n, "resid_mid", "moe.router.scale", None)


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
            put(name, partial(np.zeros, (Z,) + _shape(cfg, name, T), dtype))
    put(b + ("resid_mid" if kind == "mlp" else "resid_pre"), g_x)


def _at_position(g, p, T):
    full = np.zeros((g.shape[0], T, g.shape[1]), g.dtype)
    full[np.arange(len(g)), p] = g
    return full


def _block_sites(cfg, l):
    prefix = f"blocks.{l}."
    return [n for n in symbolic_shapes(cfg) if n.startswith(prefix)]


def _shape(cfg, name, T):
    sizes = axis_sizes(cfg, T, layer_of(name))  # Gemma 4: each layer's own H, K and F
    return tuple(sizes[a] for a in symbolic_shapes(cfg)[name])
