"""Logit prisms: exact decompositions of a readout of the residual stream, chained to any depth.

One mechanism. Freeze, at their recorded values, every RMSNorm scale, every attention pattern and every
gelu(gate) factor; what remains is linear. A *readout* is a matrix u [Z, D] applied to the residual stream at
one site and position; its value there is u . x. Every prism splits the vector x it reads into parts and reads
each part: values[c] = u . part_c, with sum_c values[c] = u . x exactly (up to float rounding, which is
reported as `residual`). The first readout reads the final residual into the logits:

    logit_t[p] = E[t] . (x_final[p] / s_final[p] * (1 + w_final)) = u_t . x_final[p],
    u_t = E[t] * (1 + w_final) / s_final[p]                                         (logits_readout)

and a readout *pulls back* through a head at a source token, or through a neuron, into a readout of an earlier
residual (through_head, through_neuron), where any prism can split it again. docs/math.md derives each line.

Residual sites: site k = 2l reads `blocks.{l}.resid_pre`, k = 2l + 1 reads `blocks.{l}.resid_mid`, k = 2L reads
the final residual (`blocks.{L-1}.resid_post`). The parts of the residual at site k are `embed` and every
sublayer output before it: `L{j}.attn` (sublayer 2j) and `L{j}.mlp` (sublayer 2j + 1), for 2j (+1) < k.

Labels (0-based): embed, L{l}.attn, L{l}.mlp, L{l}H{h}, L{l}H{h}.src{s}, L{l}N{n}.
Axis letters as in ops.py; Z is the readout axis (one row per target, or per target-minus-foils).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from . import ops
from .errors import InputError
from .model import check_text

# Exactness tolerance of |whole - sum(parts)|: atol + rtol * sum(|parts|), by compute dtype. The parts are dot
# products over D (2048 for gemma-2b) computed in different orders from the whole, so their rounding error is a
# small multiple of eps * sqrt(D) * sum(|parts|); float32's eps is 1.2e-7, float64's 2.2e-16.
TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-4), np.dtype(np.float64): (1e-12, 1e-10)}


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


# ------------------------------------------------------------------------------------------------- results


@dataclass
class Split:
    """A prism's result: labelled parts [C, Z] of a whole [Z]; residual = whole - sum(parts) is reported."""

    prism: str
    readout: Readout = field(repr=False)
    labels: list[str]
    values: np.ndarray  # [C, Z]
    whole: np.ndarray  # [Z]
    whole_label: str
    extras: dict = field(default_factory=dict, repr=False)  # name -> {"labels": [..], "values": [.., Z]}
    decomposes: bool = True  # False for a map: its rows are not parts of the whole

    @property
    def columns(self) -> list[str]:
        return self.readout.targets.labels

    @property
    def residual(self) -> np.ndarray:
        """whole - sum(parts), summed in float64 so the report shows the parts' own rounding."""
        return self.whole.astype(np.float64) - self.values.astype(np.float64).sum(axis=0)

    @property
    def tolerance(self) -> np.ndarray:
        atol, rtol = TOLERANCE[np.dtype(self.values.dtype)]
        return atol + rtol * np.abs(self.values.astype(np.float64)).sum(axis=0)

    @property
    def exact(self) -> bool:
        """True when every |residual| is within the stated tolerance of the compute dtype."""
        return bool(np.all(np.abs(self.residual) <= self.tolerance))

    def term(self, label) -> np.ndarray:
        return self.values[self.labels.index(label)]

    def top(self, n) -> list[int]:
        """Indices of the n parts with the largest max |value| over the columns."""
        return np.argsort(-np.abs(self.values).max(axis=1), kind="stable")[:n].tolist()

    def to_json(self) -> dict:
        """The one JSON schema of every prism (docs/guide.md). A map has "residual": null, "exact": null."""
        model, run, r = self.readout.model, self.readout.run, self.readout
        return {
            "prism": self.prism,
            "model": model.name,
            "dtype": str(model.dtype),
            "tokens": [{"id": int(i), "piece": model.piece(i)} for i in run.tokens],
            "position": int(r.position),
            "site": r.site_name,
            "path": list(r.path),
            "targets": [t.to_json() for t in r.targets.targets],
            "versus": [t.to_json() for t in r.targets.versus],
            "columns": self.columns,
            "whole": {"label": self.whole_label, "values": _floats(self.whole)},
            "components": [{"label": l, "values": _floats(v)} for l, v in zip(self.labels, self.values)],
            "residual": _floats(self.residual) if self.decomposes else None,
            "tolerance": _floats(self.tolerance) if self.decomposes else None,
            "exact": self.exact if self.decomposes else None,
            "extras": {k: {"labels": v["labels"], "values": [_floats(row) for row in v["values"]]}
                       for k, v in self.extras.items()},
        }

    def table(self, top=None) -> str:
        """A text table: the whole, the parts (the `top` largest if given, in label order), the residual."""
        rows = range(len(self.labels)) if top is None else sorted(self.top(top))
        cols = self.columns
        width = max(12, *(len(c) + 2 for c in cols))
        others = f"({len(self.labels) - len(rows)} others)"
        name_w = max([len(self.whole_label), len(others), *(len(self.labels[i]) for i in rows)]) + 2
        head = " " * name_w + "".join(f"{c:>{width}}" for c in cols)
        line = lambda label, vals: f"{label:<{name_w}}" + "".join(f"{v:>{width}.4f}" for v in vals)  # noqa: E731
        out = [head, line(self.whole_label, self.whole), "-" * len(head)]
        out += [line(self.labels[i], self.values[i]) for i in rows]
        if top is not None and top < len(self.labels):
            rest = np.delete(self.values, rows, axis=0).sum(axis=0)
            out.append(line(others, rest))
        if self.decomposes:
            out += ["-" * len(head), line("residual", self.residual)]
            out.append(f"exact: {'yes' if self.exact else 'NO'} (|residual| <= {self.tolerance.max():.2g} "
                       f"required in {self.values.dtype})")
        return "\n".join(out)


def _floats(a):
    return [float(x) for x in np.asarray(a).ravel()]


# ------------------------------------------------------------------------------------------------- prisms


def residual_parts(readout) -> tuple[list[str], np.ndarray]:
    """The parts of the residual at the readout's site and position: embed and each earlier sublayer output.

    Math:   x_site[p] = embed[p] + sum_{sublayers i < site} out_i[p]
    Shapes: -> labels [C], vectors [C, D]
    """
    rec, p = readout.run.record, readout.position
    labels, vectors = ["embed"], [rec["embed"][p]]
    for i in range(readout.site):
        l, kind = divmod(i, 2)
        labels.append(f"L{l}.{'mlp' if kind else 'attn'}")
        vectors.append(rec[f"blocks.{l}.{'mlp' if kind else 'attn'}.out"][p])
    return labels, np.stack(vectors)


def residual_prism(readout) -> Split:
    """Split a readout into the residual parts it reads (the post's per-layer plot; a chain's last step).

    Math:   whole = sum_c u . part_c   (the parts of x_site[p], see residual_parts)
    For the logits readout it also reports, per part, the direct effect with the final norm recomputed
    (logit(x) - logit(x - c)) and the logit lens beside the frozen running sum (see `_beyond_frozen`).
    """
    labels, vectors = residual_parts(readout)
    split = Split("residual" if readout.is_logits else "chain", readout, labels, readout.value_of(vectors),
                  readout.whole, readout.whole_label)
    if readout.is_logits:
        split.extras.update(_beyond_frozen(readout, labels, vectors, split.values))
    return split


def _beyond_frozen(readout, labels, vectors, values) -> dict:
    """What freezing the final norm hides, for the logits readout.

    Math:   f(x) = (E[t] - mean E[f]) . (x / s(x) * (1 + w_final)),  s(x) = sqrt(mean(x^2) + eps) recomputed
            direct_effect[c]      = f(x) - f(x - part_c)
            logit_lens[c]         = f(x_c), x_c = the recorded residual after part c (embed, resid_mid, resid_post)
            frozen_running_sum[c] = sum_{c' <= c} values[c']
            (all pre-cap on Gemma 2; extras["softcapped"] holds the model's capped logits for the whole)
    """
    model, rec, p = readout.model, readout.run.record, readout.position
    cfg, dtype = model.config, model.dtype
    ids, coef = readout.targets.coefficients(dtype)
    W = coef @ model.params.embed_rows(ids)  # [Z, D]
    w = model.params.ln_final

    def f(xs):  # [C, D] -> [C, Z]
        y, _ = ops.rms_norm(xs, w, eps=cfg.rms_norm_eps)
        return y @ W.T

    x = rec[site_name(2 * cfg.n_layers, cfg.n_layers)][p]  # the final residual
    direct = f(x)[None, :] - f(x[None, :] - vectors)
    running = [rec["embed"][p]]
    for i in range(2 * cfg.n_layers):
        l, kind = divmod(i, 2)
        running.append(rec[f"blocks.{l}.resid_{'post' if kind else 'mid'}"][p])
    lens = f(np.stack(running))
    extras = {
        "direct_effect": {"labels": labels, "values": direct},
        "logit_lens": {"labels": labels, "values": lens},
        "frozen_running_sum": {"labels": labels, "values": np.cumsum(values, axis=0)},
    }
    if cfg.final_softcap is not None:  # Gemma 2: cap * tanh(logit / cap), not linear, so shown beside the whole
        extras["softcapped"] = {"labels": [f"logits after the soft-cap {cfg.final_softcap:g} tanh(l / "
                                           f"{cfg.final_softcap:g})"], "values": (coef @ rec["logits"][p, ids])[None]}
    return extras


def attention_prism(readout, layer) -> Split:
    """Split layer l's attention term into heads x source tokens (labels L{l}H{h}.src{s}, head-major).

    whole = u . attn.out_l[p] (the parent's L{l}.attn term); extras["heads"] sums each head over sources.
    """
    terms = head_source_terms(readout, layer)  # [N, S, Z]
    N, S, Z = terms.shape
    labels = [f"L{layer}H{h}.src{s}" for h in range(N) for s in range(S)]
    whole = readout.value_of(readout.run.record[f"blocks.{layer}.attn.out"][readout.position])
    split = Split("attention", readout, labels, terms.reshape(N * S, Z), whole, _term_label(readout, f"L{layer}.attn"))
    split.extras["heads"] = {"labels": [f"L{layer}H{h}" for h in range(N)], "values": terms.sum(axis=1)}
    return split


def mlp_prism(readout, layer) -> Split:
    """Split layer l's MLP term into neurons (labels L{l}N{n}); whole = u . mlp.out_l[p]."""
    terms = neuron_terms(readout, layer)  # [F, Z]
    labels = [f"L{layer}N{n}" for n in range(terms.shape[0])]
    whole = readout.value_of(readout.run.record[f"blocks.{layer}.mlp.out"][readout.position])
    return Split("mlp", readout, labels, terms, whole, _term_label(readout, f"L{layer}.mlp"))


def _term_label(readout, label):
    return "/".join(readout.path + (label,))


def head_split(split: Split) -> Split:
    """An attention split summed over sources: one part per head (L{l}H{h})."""
    heads = split.extras["heads"]
    return Split("attention-heads", split.readout, list(heads["labels"]), heads["values"], split.whole,
                 split.whole_label)


def apply_map(readout, vectors, labels, *, own_scale=False) -> Split:
    """Apply a (pulled-back) readout's frozen linear map to other residual vectors, e.g. scaled embeddings.

    Math:   values[m, z] = u_z . y_m                  (the map exactly as frozen at the source token)
            own_scale:    u_z . y_m * s_frozen / s(y_m)   (each input normalised by its own RMS instead of
                          the norm scale frozen into u, e.g. s_ln1 at the source token)
    Not a decomposition: `whole` is the map applied to the actual residual at the source (the parent's term).
    """
    values = readout.value_of(vectors)
    if own_scale:
        eps = np.asarray(readout.model.config.rms_norm_eps, dtype=vectors.dtype)
        values = values * (readout.scale / np.sqrt(np.mean(vectors * vectors, axis=-1) + eps))[:, None]
    return Split("map", readout, list(labels), values, readout.whole, readout.whole_label, decomposes=False)


def scaled_embeddings(model, tokens) -> np.ndarray:
    """E[t] * sqrt(D) (the normalizer of the run), the vectors the first layer reads: [M, D]."""
    return model.params.embed_rows([t.id for t in tokens]) * model.normalizer


def unembedding_pca(model, tokens) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA of the tokens' unembedding rows E[t] (centred): coordinates [M, 2] and explained variance [2]."""
    if len(tokens) < 2:
        raise InputError(f"a 2-D PCA needs at least 2 tokens, got {len(tokens)}")
    X = model.params.embed_rows([t.id for t in tokens]).astype(np.float64)
    X = X - X.mean(axis=0)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    var = S ** 2 / max((S ** 2).sum(), np.finfo(np.float64).tiny)
    return X @ Vt[:2].T, var[:2]
