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
    for t in tt + vv:
        if t.id in seen:
            raise InputError(f"token {t.piece} (#{t.id}) is given twice (as {seen[t.id]!r} and again)")
        seen[t.id] = t.piece
    return Targets(tt, vv)


# ------------------------------------------------------------------------------------------------- inputs


def needs(model, *, position=-1, residual=True, attention=(), mlp=()) -> list[str]:
    """The record entries (record.Selection) that the prisms of one readout at `position` read: pass them as
    `model.run(prompt, record=needs(...))` to run a long prompt without keeping what no prism reads.

    logits_readout: ln_final.scale and the logits (pre-cap on Gemma 2) at the position;
    residual_prism: embed and every sublayer output at the position, and the residual after each (logit lens);
    attention_prism(l): layer l's pattern row at the position, its values at every source, its output (and
        Gemma 2/3's post-norm scale) at the position;
    mlp_prism(l): layer l's neuron activations, output (and post-norm scale) at the position.
    Chains (through_head, through_neuron) read other positions: record those whole.
    """
    cfg, at = model.config, f"@{int(position)}"
    entries = [f"ln_final.scale{at}", f"logits{at}"]  # Gemma 2: the capped logits are shown beside the pre-cap
    entries += [f"logits_uncapped{at}"] if cfg.final_softcap is not None else []
    if residual:
        entries += [f"embed{at}"] + [f"blocks.*.{n}{at}" for n in ("attn.out", "mlp.out", "resid_mid", "resid_post")]
    for l in attention:
        entries += [f"blocks.{l}.attn.pattern{at}", f"blocks.{l}.attn.v", f"blocks.{l}.attn.out{at}"]
        entries += [f"blocks.{l}.ln1_post.scale{at}"] if cfg.post_norms else []
    for l in mlp:
        entries += [f"blocks.{l}.mlp.act{at}", f"blocks.{l}.mlp.out{at}"]
        entries += [f"blocks.{l}.ln2_post.scale{at}"] if cfg.post_norms else []
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

    Math:   u_z = (E[t_z] - mean_f E[f]) * (1 + w_final) / s_final[p]      (final norm scale frozen)
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
    u = (coef @ model.params.embed_rows(ids)) * (1 + model.params.ln_final) / s  # [Z, D]
    raw = run.record["logits_uncapped" if model.config.final_softcap is not None else "logits"]
    whole = coef @ raw[p, ids]  # [Z]
    return Readout(model, run, targets, u, 2 * model.config.n_layers, p, whole, "logits", s)


def _check_layer(readout, layer, kind):
    L = readout.model.config.n_layers
    if not 0 <= layer < L:
        raise InputError(f"layer {layer} is out of range (the model has layers 0 .. {L - 1})")
    sub = 2 * layer + (kind == "mlp")
    if sub >= readout.site:
        raise InputError(f"L{layer}.{kind} is not part of {readout.site_name}, which this readout reads")


def through_post_norm(readout, layer, kind) -> np.ndarray:
    """The readout seen from before a Gemma 2/3 post-norm (the identity on Gemma 1).

    Math:   attn.out_l[p] = o_proj_l[p] / s_post[p] * (1 + w_post)   (s_post frozen: ln1_post or ln2_post)
            u . attn.out_l[p] = u_pre . o_proj_l[p],   u_pre = u * (1 + w_post) / s_post[p]
    Shapes: u [Z, D] -> u_pre [Z, D]
    """
    if not readout.model.config.post_norms:
        return readout.u
    key = "ln1_post" if kind == "attn" else "ln2_post"
    s = readout.run.record[f"blocks.{layer}.{key}.scale"][readout.position]
    return readout.u * (1 + readout.model.params.get(layer, key)) / s


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
    v = rec[b + "attn.v"][: p + 1]  # [S, K, H]
    u = through_post_norm(readout, layer, "attn")
    r = np.einsum("zd,nhd->znh", u, W_O, optimize=True)  # W_O^h u per head: project the readout first
    kv = ops.kv_index(cfg.n_heads, cfg.n_kv_heads)  # the shared kv head of each query head
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
    u = through_post_norm(readout, layer, "mlp")
    return act[:, None] * (u @ W_down.T).T  # (u W_down^T)^T = W_down u: streams the [D, F] rows in order


def through_head(readout, layer, head, source) -> Readout:
    """Pull the readout back through head h of layer l at source s: a readout of resid_pre_l at s.

    Math:   term = pattern[h,p,s] v[s,kv(h)] . (W_O^h u),   v[s, k] = (x_s / s_ln1[s] * (1 + w_ln1)) W_V^k
              = u' . x_s  with  u' = pattern[h,p,s] (1 + w_ln1) / s_ln1[s] * (W_V^kv(h) W_O^h u)
            (pattern and the ln1 scale at s frozen; Gemma 2/3: u is first taken through the frozen post-attention
            norm, through_post_norm); whole(u') = the parent's L{l}H{h}.src{s} term.
    Shapes: u [Z, D] -> u' [Z, D]
    """
    cfg = readout.model.config
    if not 0 <= head < cfg.n_heads:
        raise InputError(f"head {head} is out of range (layer {layer} has heads 0 .. {cfg.n_heads - 1})")
    if not 0 <= source <= readout.position:
        raise InputError(f"source {source} is out of range: it must be 0 .. {readout.position} "
                         f"(a head at position {readout.position} reads no later token)")
    _check_layer(readout, layer, "attn")
    rec, b = readout.run.record, f"blocks.{layer}."
    params = readout.model.params
    kv = cfg.kv_head(head)
    u_pre = through_post_norm(readout, layer, "attn")  # Gemma 2/3: through the frozen post-attention norm
    r = np.einsum("zd,hd->zh", u_pre, params.get(layer, "W_O")[head])  # W_O^h u: [Z, H]
    weight = rec[b + "attn.pattern"][head, readout.position, source]
    term = weight * (r @ rec[b + "attn.v"][source, kv])  # [Z]: the parent's L{l}H{h}.src{s} term, this one only
    back = np.einsum("zh,dh->zd", r, params.get(layer, "W_V")[:, kv])  # W_V^kv (W_O^h u): [Z, D]
    s = rec[b + "ln1.scale"][source]
    u = weight * back * (1 + params.get(layer, "ln1")) / s
    path = readout.path + (f"L{layer}H{head}.src{source}",)
    return replace(readout, u=u, site=2 * layer, position=source, whole=term, whole_label="/".join(path), scale=s,
                   path=path)


def through_neuron(readout, layer, neuron) -> Readout:
    """Pull the readout back through neuron n of layer l (gelu(gate) frozen): a readout of resid_mid_l at p.

    Math:   term = gelu(gate[p,n]) up[p,n] (W_down[n] . u),   up[p,n] = (x / s_ln2[p] * (1 + w_ln2)) . W_up[:, n]
              = u' . x  with  u' = gelu(gate[p,n]) (W_down[n] . u) W_up[:, n] (1 + w_ln2) / s_ln2[p]
            (Gemma 2/3: u is first taken through the frozen post-feedforward norm, through_post_norm)
    Shapes: u [Z, D] -> u' [Z, D]
    """
    cfg = readout.model.config
    if not 0 <= neuron < cfg.d_mlp:
        raise InputError(f"neuron {neuron} is out of range (layer {layer} has neurons 0 .. {cfg.d_mlp - 1})")
    _check_layer(readout, layer, "mlp")
    rec, b, p = readout.run.record, f"blocks.{layer}.", readout.position
    params = readout.model.params
    g = ops.gelu_tanh(rec[b + "mlp.gate"][p, neuron])  # frozen gate factor
    down = params.get(layer, "W_down")[neuron] @ through_post_norm(readout, layer, "mlp").T  # [Z]
    term = rec[b + "mlp.act"][p, neuron] * down  # [Z]: the parent's L{l}N{n} term, this neuron only
    s = rec[b + "ln2.scale"][p]
    u = (g * down)[:, None] * (params.get(layer, "W_up")[:, neuron] * (1 + params.get(layer, "ln2")) / s)[None, :]
    path = readout.path + (f"L{layer}N{neuron}",)
    return replace(readout, u=u, site=2 * layer + 1, whole=term, whole_label="/".join(path), scale=s, path=path)


