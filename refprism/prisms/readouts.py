"""Readouts: the targets and foils resolved to token ids, the logits readout u [Z, D] at a position, and its
pull-backs through a head at a source token or through a neuron into a readout of an earlier residual.
The package docstring (refprism.prisms) gives the math.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from refprism.errors import InputError
from refprism.gemma import ops
from refprism.model import check_text

# ------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Token:
    id: int
    piece: str

    def to_json(self):
        return {"id": self.id, "piece": self.piece}


@dataclass(frozen=True)
class Targets:
    """The readout's columns: each target, minus the mean of the foils when there are foils.

    Math:   column z reads  E[t_z] - mean_f E[f]   (just E[t_z] without foils)
    """

    targets: tuple[Token, ...]
    versus: tuple[Token, ...] = ()

    @property
    def labels(self) -> list[str]:
        if not self.versus:
            return [t.piece for t in self.targets]
        if len(self.versus) == 1:
            return [f"{t.piece} - {self.versus[0].piece}" for t in self.targets]
        foils = ", ".join(f.piece for f in self.versus)
        return [f"{t.piece} - mean({foils})" for t in self.targets]

    def coefficients(self, dtype) -> tuple[np.ndarray, np.ndarray]:
        """ids [I] and coef [Z, I] with readout row z = sum_i coef[z, i] E[ids[i]]."""
        ids = [t.id for t in self.targets] + [f.id for f in self.versus]
        coef = np.zeros((len(self.targets), len(ids)), dtype=dtype)
        coef[:, : len(self.targets)] = np.eye(len(self.targets), dtype=dtype)
        if self.versus:
            coef[:, len(self.targets):] = -np.asarray(1.0 / len(self.versus), dtype=dtype)
        return np.asarray(ids), coef


def resolve_token(model, spec) -> Token:
    """'#7127' (an id), '▁Paris' (a vocabulary piece) or text that is exactly one token (' Paris') -> Token."""
    V = model.config.vocab_size
    is_id = isinstance(spec, str) and spec[:1] == "#" and spec[1:].isascii() and spec[1:].isdigit()  # '²'.isdigit()
    if (isinstance(spec, (int, np.integer)) and not isinstance(spec, bool)) or is_id:
        i = int(spec[1:]) if isinstance(spec, str) else int(spec)
        if not 0 <= i < V:
            raise InputError(f"target id #{i} is beyond the vocabulary (ids 0 .. {V - 1})")
        return Token(i, model.piece(i))
    if not isinstance(spec, str) or spec == "":
        raise InputError(f"a target is a piece (▁Paris), one-token text or an id (#7127), got {spec!r}")
    check_text(spec, f"target {spec!r}")  # a lone surrogate (an undecodable byte) makes tokenizers raise
    tok = model.tokenizer
    if tok is None:
        raise InputError(f"{model.name} has no tokenizer.json: give targets as ids (#7127)")
    i = tok.token_to_id(spec)
    if i is not None and i < V:
        return Token(int(i), spec)
    ids = tok.encode(spec, add_special_tokens=False).ids
    if len(ids) == 1 and model.piece(ids[0]) != "<unk>":
        return Token(int(ids[0]), model.piece(ids[0]))
    if len(ids) == 1:  # a character the vocabulary lacks (no byte fallback): never silently the <unk> row
        raise InputError(f"target {spec!r} is not in the vocabulary (the tokenizer reads it as <unk>): "
                         "pick a piece or an id")
    if not ids:
        raise InputError(f"target {spec!r} is not in the vocabulary")
    pieces = " ".join(model.piece(j) for j in ids)
    raise InputError(f"target {spec!r} is {len(ids)} tokens ({pieces}), not one: pick one piece or an id")


def resolve_targets(model, targets, versus=()) -> Targets:
    """Resolve target and foil specs; duplicates and an empty target list are refused."""
    if not targets:
        raise InputError("no targets: give at least one token")
    tt = tuple(resolve_token(model, t) for t in targets)
    vv = tuple(resolve_token(model, v) for v in versus or ())
    seen = {}
    for i, t in enumerate(tt + vv):
        if t.id in seen:
            first, again = seen[t.id]
            if (first < len(tt)) != (i < len(tt)):  # once as a target, once as a foil: their difference is 0
                raise InputError(f"token {t.piece} (#{t.id}) is both a target and a foil (--versus): a target "
                                 "minus itself is 0; drop it from one of the two")
            raise InputError(f"token {t.piece} (#{t.id}) is given twice (as {again!r} and again)")
        seen[t.id] = (i, t.piece)
    return Targets(tt, vv)


# ------------------------------------------------------------------------------------------------- inputs


def needs(model, *, position=-1, residual=True, attention=(), mlp=()) -> list[str]:
    """The record entries (record.Selection) that the prisms of one readout at `position` read: pass them as
    `model.run(prompt, record=needs(...))` to run a long prompt without keeping what no prism reads.

    logits_readout: ln_final.scale and the logits (pre-cap on Gemma 2) at the position;
    residual_prism: embed and every sublayer output at the position, and the residual after each (logit lens);
    attention_prism(l): layer l's pattern row at the position, its values at every source, its output (and
        Gemma 2/3's post-norm scale) at the position;
    mlp_prism(l): layer l's neuron activations, output (and post-norm scale) at the position (Gemma 4 MoE: the
        selected experts, their weights and outputs, the two branch post-norm scales).
    Chains (through_head, through_neuron) read other positions: record those whole.
    """
    cfg, at = model.config, f"@{int(position)}"
    entries = [f"ln_final.scale{at}", f"logits{at}"]  # Gemma 2: the capped logits are shown beside the pre-cap
    entries += [f"logits_uncapped{at}"] if cfg.final_softcap is not None else []
    if residual:
        entries += [f"embed{at}"] + [f"blocks.*.{n}{at}" for n in ("attn.out", "mlp.out", "resid_mid", "resid_post")]
        entries += [f"blocks.*.{n}{at}" for n in ("ple.out", "resid_mlp")] if cfg.ple else []  # Gemma 4
    for l in attention:  # Gemma 4 KV-sharing consumer: the values are its producer's
        entries += [f"blocks.{l}.attn.pattern{at}", f"blocks.{cfg.kv_source(l)}.attn.v", f"blocks.{l}.attn.out{at}"]
        entries += [f"blocks.{l}.ln1_post.scale{at}"] if cfg.post_norms else []
    for l in mlp:
        entries += [f"blocks.{l}.mlp.act{at}", f"blocks.{l}.mlp.out{at}"]
        entries += [f"blocks.{l}.ln2_post.scale{at}"] if cfg.post_norms else []
        entries += [f"blocks.{l}.{n}{at}" for n in ("ln2_post1.scale", "ln2_post2.scale", "moe.topk.index",
                                                    "moe.topk.weight", "moe.expert_out")] if cfg.moe else []
    return entries


# ------------------------------------------------------------------------------------------------- readouts


@dataclass(frozen=True)
class Readout:
    """u [Z, D] applied to the residual stream at (site, position); `whole` [Z] is the value it must produce."""

    model: object = field(repr=False)
    run: object = field(repr=False)
    targets: Targets
    u: np.ndarray = field(repr=False)  # [Z, D]
    site: int
    position: int
    whole: np.ndarray  # [Z]
    whole_label: str  # "logits", or the path of terms pulled back through, e.g. "L14H5.src5/L3N1021"
    scale: np.ndarray  # the norm scale frozen into u: s_final[p], s_ln1[s] or s_ln2[p]
    path: tuple[str, ...] = ()  # terms pulled back through, outermost first

    @property
    def is_logits(self) -> bool:
        return not self.path

    @property
    def site_name(self) -> str:
        return site_name(self.site, self.model.config.n_layers)

    def value_of(self, x):
        """u . x for vectors x [C, D] -> [C, Z] (or x [D] -> [Z])."""
        return x @ self.u.T


def site_name(site: int, n_layers: int) -> str:
    if site == 2 * n_layers:
        return f"blocks.{n_layers - 1}.resid_post"
    return f"blocks.{site // 2}.resid_{'pre' if site % 2 == 0 else 'mid'}"


def resolve_position(run, position) -> int:
    T = len(run.tokens)
    p = -1 if position is None else int(position)
    if not -T <= p < T:
        raise InputError(f"position {position} is out of range for {T} tokens (use 0 .. {T - 1} or -{T} .. -1)")
    return p % T


def logits_readout(model, run, targets, *, position=-1, versus=()) -> Readout:
    """The readout whose value at the final residual is the logits (or logit differences) at `position`.

    Math:   u_z = (E[t_z] - mean_f E[f]) * (1 + w_final) / s_final[p]      (final norm scale frozen; Gemma 4: w)
            whole_z = logits[p, t_z] - mean_f logits[p, f]                   (the model's raw logits)
            Gemma 2 soft-caps its logits (cap * tanh(l / cap)), which is not linear: the readout and its whole are
            the pre-cap logits (`logits_uncapped`), decomposed exactly; the capped values are shown beside them.
    Shapes: -> u [Z, D], whole [Z]
    """
    if not isinstance(targets, Targets):
        targets = resolve_targets(model, targets, versus)
    p = resolve_position(run, position)
    dtype = model.dtype
    ids, coef = targets.coefficients(dtype)
    s = run.record["ln_final.scale"][p]
    u = (coef @ model.params.embed_rows(ids)) * gain(model, model.params.ln_final) / s  # [Z, D]
    raw = run.record["logits_uncapped" if model.config.final_softcap is not None else "logits"]
    whole = coef @ raw[p, ids]  # [Z]
    return Readout(model, run, targets, u, 2 * model.config.n_layers, p, whole, "logits", s)


def gain(model, w) -> np.ndarray:
    """An RMSNorm's gain: 1 + w on Gemma 1-3, w itself on Gemma 4 (Config.norm_offset)."""
    return w + np.asarray(model.config.norm_offset, dtype=w.dtype)


def layer_scale(readout, layer):
    """The product of Gemma 4's layer_scalars that a term of layer `layer` passes through before the readout's
    residual: lambda_layer ... lambda_{k-1} for a readout of resid_pre_k or resid_mid_k (1 when the term is in
    layer k itself, and on Gemma 1-3).

    Math:   x_{l+1} = lambda_l (x_{l+1/2} + mlp_l + ple_l)   =>   x_k = prod_{l<k} lambda_l x_0
            + sum_j prod_{j<=l<k} lambda_l (attn_j + mlp_j + ple_j)
    """
    model = readout.model
    one = np.asarray(1, dtype=model.dtype)
    if not model.config.gemma4:
        return one
    for l in range(layer, readout.site // 2):
        one = one * model.params.get(l, "layer_scalar")[0]
    return one


def _check_layer(readout, layer, kind):
    L = readout.model.config.n_layers
    if not 0 <= layer < L:
        raise InputError(f"layer {layer} is out of range (the model has layers 0 .. {L - 1})")
    sub = 2 * layer + (kind != "attn")
    if sub >= readout.site:
        raise InputError(f"L{layer}.{kind} is not part of {readout.site_name}, which this readout reads")


# the post-norms a term passes through, innermost last (Gemma 4 MoE: the dense branch and the experts have their own)
_POST_NORMS = {"attn": ("ln1_post",), "mlp": ("ln2_post",), "dense": ("ln2_post", "ln2_post1"),
               "expert": ("ln2_post", "ln2_post2"), "ple": ("ple_post",)}


def through_post_norm(readout, layer, kind) -> np.ndarray:
    """The readout seen from before a Gemma 2/3/4 post-norm (the identity on Gemma 1), with Gemma 4's
    layer_scalars folded in (layer_scale).

    Math:   attn.out_l[p] = o_proj_l[p] / s_post[p] * (1 + w_post)   (s_post frozen: ln1_post or ln2_post)
            u . attn.out_l[p] = u_pre . o_proj_l[p],   u_pre = u * (1 + w_post) / s_post[p]
            Gemma 4 (gain w, not 1 + w): u_pre = prod lambda * u * w_post / s_post[p]; the MoE's dense branch
            ("dense") and experts ("expert") pass ln2_post then ln2_post1 / ln2_post2; the per-layer input
            ("ple") ple_post.
    Shapes: u [Z, D] -> u_pre [Z, D]
    """
    model = readout.model
    if not model.config.post_norms:
        return readout.u
    u = readout.u * layer_scale(readout, layer)
    for key in _POST_NORMS[kind]:
        s = readout.run.record[f"blocks.{layer}.{key}.scale"][readout.position]
        u = u * gain(model, model.params.get(layer, key)) / s
    return u


def head_source_terms(readout, layer) -> np.ndarray:
    """Each head's and source token's term of layer l's attention output, read by the readout at position p.

    Math:   attn.out_l[p] = sum_h sum_{s<=p} pattern[h,p,s] v[s, kv(h)] W_O^h          (pattern frozen)
            term[h, s, z] = pattern[h,p,s] (v[s, kv(h)] . (W_O^h u_z))                  kv(h) = h // (N/K)
            (Gemma 2/3: u -> u_pre of through_post_norm, the post-attention norm scale frozen)
    Shapes: -> [N, S=p+1, Z]
    """
    _check_layer(readout, layer, "attn")
    cfg, rec, p = readout.model.config, readout.run.record, readout.position
    b = f"blocks.{layer}."
    W_O = readout.model.params.get(layer, "W_O")  # [N, H, D]
    pattern = rec[b + "attn.pattern"][:, p, : p + 1]  # [N, S]
    v = rec[f"blocks.{cfg.kv_source(layer)}.attn.v"][: p + 1]  # [S, K, H] (Gemma 4 consumer: the producer's)
    u = through_post_norm(readout, layer, "attn")
    r = np.einsum("zd,nhd->znh", u, W_O, optimize=True)  # W_O^h u per head: project the readout first
    kv = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(layer))  # the shared kv head of each query head
    return np.einsum("ns,snh,znh->nsz", pattern, v[:, kv, :], r)


def neuron_terms(readout, layer) -> np.ndarray:
    """Each neuron's term of layer l's MLP output, read at position p, without building [F, D].

    Math:   mlp.out_l[p] = sum_n act[p, n] W_down[n, :]
            term[n, z] = act[p, n] (W_down u_z)[n]                       (project the readout first: [F, Z])
            (Gemma 2/3: u -> u_pre of through_post_norm, the post-feedforward norm scale frozen)
    Shapes: -> [F, Z]
    """
    _check_layer(readout, layer, "mlp")
    act = readout.run.record[f"blocks.{layer}.mlp.act"][readout.position]  # [F]
    W_down = readout.model.params.get(layer, "W_down")  # [F, D], a transposed view of the stored [D, F]
    u = through_post_norm(readout, layer, "dense" if readout.model.config.moe else "mlp")
    return act[:, None] * (u @ W_down.T).T  # (u W_down^T)^T = W_down u: streams the [D, F] rows in order


def check_head(readout, layer, head, source) -> None:
    """through_head's argument checks; they read only readout.model.config, .site, .site_name and .position (so
    a command can make them before any weight is read)."""
    cfg = readout.model.config
    if not 0 <= head < cfg.n_heads:
        raise InputError(f"head {head} is out of range (layer {layer} has heads 0 .. {cfg.n_heads - 1})")
    if not 0 <= source <= readout.position:
        raise InputError(f"source {source} is out of range: it must be 0 .. {readout.position} "
                         f"(a head at position {readout.position} reads no later token)")
    _check_layer(readout, layer, "attn")


def check_neuron(readout, layer, neuron) -> None:
    """through_neuron's argument checks (as check_head: config, site and position only)."""
    cfg = readout.model.config
    if not 0 <= neuron < cfg.mlp_width_of(layer):  # Gemma 4's KV-sharing layers may be double-wide
        raise InputError(f"neuron {neuron} is out of range (layer {layer} has neurons 0 .. "
                         f"{cfg.mlp_width_of(layer) - 1})")
    _check_layer(readout, layer, "mlp")


def through_head(readout, layer, head, source) -> Readout:
    """Pull the readout back through head h of layer l at source s: a readout of resid_pre_l at s.

    Math:   term = pattern[h,p,s] v[s,kv(h)] . (W_O^h u),   v[s, k] = (x_s / s_ln1[s] * (1 + w_ln1)) W_V^k
              = u' . x_s  with  u' = pattern[h,p,s] (1 + w_ln1) / s_ln1[s] * (W_V^kv(h) W_O^h u)
            (pattern and the ln1 scale at s frozen; Gemma 2/3: u is first taken through the frozen post-attention
            norm, through_post_norm); whole(u') = the parent's L{l}H{h}.src{s} term.
            Gemma 4: v[s, k] = (x_s / s_ln1[s] * w_ln1) W_V^k / s_v[s, k] (v_norm's scale frozen; W_V = W_K on a
            k_eq_v layer), and on a KV-sharing consumer x_s, s_ln1, W_V and s_v are the PRODUCER's
            (Config.kv_source): u' reads the producer's resid_pre at s, and chains from there.
    Shapes: u [Z, D] -> u' [Z, D]
    """
    check_head(readout, layer, head, source)
    cfg = readout.model.config
    rec, b = readout.run.record, f"blocks.{layer}."
    model = readout.model
    params = model.params
    kv = head // (cfg.n_heads // cfg.kv_heads_of(layer))
    src = cfg.kv_source(layer)  # Gemma 4 KV sharing: the values are the producer layer's
    bs = f"blocks.{src}."
    u_pre = through_post_norm(readout, layer, "attn")  # Gemma 2/3/4: through the frozen post-attention norm
    r = np.einsum("zd,hd->zh", u_pre, params.get(layer, "W_O")[head])  # W_O^h u: [Z, H]
    weight = rec[b + "attn.pattern"][head, readout.position, source]
    term = weight * (r @ rec[bs + "attn.v"][source, kv])  # [Z]: the parent's L{l}H{h}.src{s} term, this one only
    if cfg.gemma4:  # v = rms_norm(v_pre) without a weight (v_norm, its scale frozen); k_eq_v: V is the K projection
        r = r / rec[bs + "attn.v_norm.scale"][source, kv]
    W_V = params.get(src, "W_K" if cfg.k_eq_v_at(src) else "W_V")
    back = np.einsum("zh,dh->zd", r, W_V[:, kv])  # W_V^kv (W_O^h u): [Z, D]
    s = rec[bs + "ln1.scale"][source]
    u = weight * back * gain(model, params.get(src, "ln1")) / s
    path = readout.path + (f"L{layer}H{head}.src{source}",)
    return replace(readout, u=u, site=2 * src, position=source, whole=term, whole_label="/".join(path), scale=s,
                   path=path)


def through_neuron(readout, layer, neuron) -> Readout:
    """Pull the readout back through neuron n of layer l (gelu(gate) frozen): a readout of resid_mid_l at p.

    Math:   term = gelu(gate[p,n]) up[p,n] (W_down[n] . u),   up[p,n] = (x / s_ln2[p] * (1 + w_ln2)) . W_up[:, n]
              = u' . x  with  u' = gelu(gate[p,n]) (W_down[n] . u) W_up[:, n] (1 + w_ln2) / s_ln2[p]
            (Gemma 2/3: u is first taken through the frozen post-feedforward norm, through_post_norm)
    Shapes: u [Z, D] -> u' [Z, D]
    """
    check_neuron(readout, layer, neuron)
    cfg = readout.model.config
    rec, b, p = readout.run.record, f"blocks.{layer}.", readout.position
    params = readout.model.params
    g = ops.gelu_tanh(rec[b + "mlp.gate"][p, neuron])  # frozen gate factor
    kind = "dense" if cfg.moe else "mlp"
    down = params.get(layer, "W_down")[neuron] @ through_post_norm(readout, layer, kind).T  # [Z]
    term = rec[b + "mlp.act"][p, neuron] * down  # [Z]: the parent's L{l}N{n} term, this neuron only
    s = rec[b + "ln2.scale"][p]
    u = (g * down)[:, None] * (params.get(layer, "W_up")[:, neuron] * gain(readout.model, params.get(layer, "ln2"))
                               / s)[None, :]
    path = readout.path + (f"L{layer}N{neuron}",)
    return replace(readout, u=u, site=2 * layer + 1, whole=term, whole_label="/".join(path), scale=s, path=path)




def expert_terms(readout, layer) -> tuple[np.ndarray, np.ndarray]:
    """Gemma 4 MoE: each selected expert's term of layer l's MLP output at position p (norm scales frozen).

    Math:   mlp.out_l = rms_norm(rms_norm(dense; ln2_post1) + rms_norm(sum_j w_j out_j; ln2_post2); ln2_post)
            term[j, z] = w_j (out_j . u_exp_z),  u_exp = through_post_norm(kind "expert")   (e = topk.index[p, j])
    Shapes: -> experts [J] (their ids), terms [J, Z]
    """
    _check_layer(readout, layer, "mlp")
    rec, b, p = readout.run.record, f"blocks.{layer}.", readout.position
    u = through_post_norm(readout, layer, "expert")
    w = rec[b + "moe.topk.weight"][p]  # [J]
    return rec[b + "moe.topk.index"][p], w[:, None] * (rec[b + "moe.expert_out"][p] @ u.T)


def expert_neuron_terms(readout, layer, slot) -> np.ndarray:
    """Gemma 4 MoE: the neurons of the expert in top-k slot j (e = topk.index[p, j]), read at p.

    Math:   term[n, z] = w_j act_j[p, n] (We_down[e][n] . u_exp_z)
    Shapes: -> [G, Z]
    """
    rec, b, p = readout.run.record, f"blocks.{layer}.", readout.position
    e = int(rec[b + "moe.topk.index"][p, slot])
    u = through_post_norm(readout, layer, "expert")
    w = rec[b + "moe.topk.weight"][p, slot]
    act = rec[b + "moe.act"][p, slot]  # [G]
    return (w * act)[:, None] * (readout.model.params.get(layer, "We_down")[e] @ u.T)


def ple_terms(readout, layer) -> np.ndarray:
    """Gemma 4: layer l's per-layer-input term at p split into its token-identity and embedding-linear pieces.

    Math:   ple.out_l = rms_norm((gelu(gate) * ple_l) W_ple_proj; ple_post)     (gelu(gate), s_post frozen)
            ple_l = token_l / sqrt(2) + rms_norm(model_l; ple_norm) / sqrt(2)   (ple.input, split exactly)
            piece[i, z] = sum_q gelu(gate[q]) piece_i[q] (W_ple_proj[q] . u_ple_z),  u_ple = through_post_norm("ple")
            (the embedding-linear piece is linear in x_0 with the ple_norm scale frozen)
    Shapes: -> [2, Z]: token, embed
    """
    _check_layer(readout, layer, "ple")
    model, rec, p = readout.model, readout.run.record, readout.position
    b = f"blocks.{layer}."
    dt = model.dtype
    g = ops.gelu_tanh(rec[b + "ple.gate"][p])  # [P]
    half = np.asarray(2.0 ** -0.5, dt)
    token = rec["ple.token"][p, layer] * half
    s = rec["ple.model_proj_norm.scale"][p, layer]
    embed = rec["ple.model_proj"][p, layer] / s * gain(model, model.params.ple_norm) * half
    r = model.params.get(layer, "W_ple_proj") @ through_post_norm(readout, layer, "ple").T  # [P, Z]
    return np.stack([(g * token) @ r, (g * embed) @ r])
