"""Gemma 4's components as graph nodes (the neuron basis): dense neurons (each layer's own width, the double-wide
MLP included), each selected expert's neurons, the per-layer-input (PLE) neurons, and a PLE token node per layer
and position (docs/math.md section 7.7).

Under the full freeze (build's module docstring, plus the router: gradients.FREEZABLE's "router") layer l is

    resid_post = lam_l (resid_mlp + ple.out),   resid_mlp = resid_mid + mlp.out
    mlp.out  = N_post(N_post1(act W_down) + N_post2(sum_j w_j act_j We_down[e_j]))   (N_post1, N_post2: MoE only)
    ple.out  = N_ple_post(ple.act W_ple_proj),  ple.act = gelu(ple.gate) * ple.input[:, l]
    ple.input[t, l] = (x_0[t] W_ple_model[:, l] / sqrt(D)) w_pln / s_pln[t, l] / sqrt(2) + ple.token[t, l] / sqrt(2)

with every norm a frozen scale, the routing weights w_j and choices e_j frozen, every gelu factor frozen and lam_l
the layer_scalar. So the nodes of (l, t) are
    dense neuron n     value mlp.act[t, n],       input mlp.up[t, n] = u_n . resid_mid_l[t],
                       u_n = W_up[:, n] w_ln2 / s_ln2[t]
    expert neuron      value moe.act[t, j, i] of the expert e = topk.index[t, j] (index e G + i),
      (e, i)           input moe.up[t, j, i] = u . resid_mid_l[t],  u = We_up[e][:, i] w_ln2_moe / s_ln2_moe[t]
    PLE neuron q       value ple.act[t, q],       input ple.input[t, l, q]: linear in the embedding x_0[t] only
    PLE token (l, t)   a source: its edge to PLE neuron q of (l, t) is ple.token[t, l, q] / sqrt(2)
and their output vectors at mlp.out_l[t] (= ple.out_l[t]: with every MLP held both have the gradient
lam_l g(resid_post_l)):
    dense   W_down[n] (w_post / s_post[t]) (w_post1 / s_post1[t])
    expert  w_j We_down[e][i] (w_post / s_post[t]) (w_post2 / s_post2[t])     (the routing weight folded in)
    PLE     W_ple_proj[q] (w_ple_post / s_ple_post[t])
layer_scalar: the backward seeded at the final residual with every sublayer after l dropped multiplies by
lam_l ... lam_{L-1} on its way down to resid_mid_l; a target reading resid_mid_l is seeded with u / that product,
so its gradient there is u. KV sharing and k_eq_v are the backward's own (a consumer's value gradient reaches its
producer's attn.v; v_norm is a frozen scale): nothing here.

build._Context's feature axis per layer is here the flat slot space [dense F_l | expert slots J G | PLE P] (padded
to the widest layer, padding inactive; `setup`), so build._explore and build._assemble run on it unchanged; the
context's feature_rows, target_rows, row_passes, out_vector, total and feature_edges hand Gemma 4 to the functions
of the same names here (written passes mlp.out's gradient on: out_vector carries each kind's frozen norms), and
`finish`
turns the slots into the kinds and indices above and adds the PLE token nodes. Axis letters as in ops.py; J the top-k
slots, G an expert's width, P the per-layer input width.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from refprism import prisms as P

NEW_KINDS = ("expert", "ple", "ple_token")  # Gemma 4's node kinds beside build.KINDS' neuron, remainder, embed, logit
PLE_TOKEN = -5  # a PLE token node's feature id in the JSON ({layer}_-5_{pos}): after circuit-tracer's -1 and -2..-4


@dataclass
class Targets:
    """feature_rows' answer: the residual-reading rows u [Zr, D] (at rows `where` of the Z targets) and the PLE
    neurons q [Zp] (at rows `ple_where`)."""

    u: np.ndarray
    where: np.ndarray
    ple_q: np.ndarray
    ple_where: np.ndarray
    ple_c: np.ndarray | None = None  # [Zp, D] each PLE neuron's c_q: its input is x_0[t] . c_q (target_rows)

    def __len__(self):
        return len(self.where) + len(self.ple_where)


def widths(cfg, l) -> tuple[int, int, int]:
    """(F_l, J G, P) of layer l: the dense MLP's width, the expert slots', the PLE neurons' (0 when absent)."""
    return cfg.mlp_width_of(l), (cfg.top_k * cfg.d_expert if cfg.moe else 0), (cfg.d_ple if cfg.ple else 0)


def feature_id(cfg, l, kind, index) -> int:
    """A node's feature id in layer l's one index space (the JSON's {layer}_{feature}_{pos}): dense neurons
    [0, F_l), expert neurons F_l + e G + i, PLE neurons F_l + E G + q; a PLE token node PLE_TOKEN."""
    F = cfg.mlp_width_of(l)
    if kind == "neuron":
        return int(index)
    if kind == "expert":
        return F + int(index)
    if kind == "ple":
        return F + (cfg.n_experts * cfg.d_expert if cfg.moe else 0) + int(index)
    return PLE_TOKEN


def label(cfg, kind, l, index, t) -> str:
    """L{l}E{e}N{i}@{t} (expert e's neuron i), L{l}P{q}@{t} (PLE neuron q), L{l}.ple_token@{t}."""
    if kind == "expert":
        e, i = divmod(int(index), cfg.d_expert)
        return f"L{l}E{e}N{i}@{t}"
    if kind == "ple":
        return f"L{l}P{int(index)}@{t}"
    return f"L{l}.ple_token@{t}"


def setup(ctx):
    """build._Context's values on Gemma 4 (after its dense neurons' act, inp of width F_l): the flat slots' act,
    inp [T, F_max] per layer, active [L, T, F_max], the widths w and the layer_scalars lam."""
    cfg, rec, params = ctx.cfg, ctx.run.record, ctx.model.params
    L = cfg.n_layers
    ctx.w = [widths(cfg, l) for l in range(L)]
    ctx.F = max(sum(w) for w in ctx.w)
    ctx.lam = np.array([float(params.get(l, "layer_scalar")[0]) for l in range(L)])
    acts, inps = [], []
    ctx.active = np.zeros((L, ctx.T, ctx.F), bool)
    for l in range(L):
        F, JG, Pw = ctx.w[l]
        a, x = [ctx.act[l]], [ctx.inp[l]]
        if cfg.moe:
            a.append(np.asarray(rec[f"blocks.{l}.moe.act"]).reshape(-1, JG))
            x.append(np.asarray(rec[f"blocks.{l}.moe.up"]).reshape(-1, JG))
        if cfg.ple:
            a.append(np.asarray(rec[f"blocks.{l}.ple.act"]))
            x.append(np.asarray(rec["ple.input"])[:, l])
        pad = ctx.F - F - JG - Pw
        acts.append(np.pad(np.concatenate(a, axis=1), ((0, 0), (0, pad))))
        inps.append(np.pad(np.concatenate(x, axis=1), ((0, 0), (0, pad)), constant_values=np.nan))
        ctx.active[l, :, : F + JG + Pw] = True
    ctx.act, ctx.inp = acts, inps


def feature_rows(ctx, l, t, n) -> Targets:
    """The targets n (slots) of layer l at position t: residual rows u [Zr, D] (dense, expert) and PLE q."""
    cfg, params, rec, model = ctx.cfg, ctx.model.params, ctx.run.record, ctx.model
    F, JG, _ = ctx.w[l]
    n = np.asarray(n)
    u = np.zeros((len(n), cfg.d_model), model.dtype)
    dense, expert, ple = n < F, (n >= F) & (n < F + JG), n >= F + JG
    if dense.any():
        scale = P.gain(model, params.get(l, "ln2")) / rec[f"blocks.{l}.ln2.scale"][t]
        u[dense] = (params.get(l, "W_up")[:, n[dense]] * scale[:, None]).T
    if expert.any():
        j, i = np.divmod(n[expert] - F, cfg.d_expert)
        e = rec[f"blocks.{l}.moe.topk.index"][t, j]
        scale = P.gain(model, params.get(l, "ln2_moe")) / rec[f"blocks.{l}.ln2_moe.scale"][t]
        u[expert] = params.get(l, "We_up")[e, :, i] * scale[None, :]
    res = np.flatnonzero(~ple)
    return Targets(u[res], res, n[ple] - F - JG, np.flatnonzero(ple))


def _ple_c(ctx, l, t, q) -> np.ndarray:
    """c_q [Zp, D] of PLE neurons q [Zp] of layer l at positions t [Zp]: ple[t, l, q] = x_0[t] . c_q + token / sqrt(2),
    c_q = W_ple_model[:, l, q] / sqrt(D) w_pln[q] / s_pln[t, l] / sqrt(2) (the projection norm's scale frozen)."""
    cfg, rec, params, dt = ctx.cfg, ctx.run.record, ctx.model.params, ctx.model.dtype
    s = rec["ple.model_proj_norm.scale"][t, l]
    c = params.ple_model()[:, l, q].T * (params.ple_norm[q] / s)[:, None]
    return c * np.asarray(cfg.d_model ** -0.5 * 2.0 ** -0.5, dt)


def target_rows(ctx, l, t, n) -> Targets:
    """build._Context.target_rows on Gemma 4: the slots n [Z] of layer l at positions t [Z] (nondecreasing) as
    residual rows u (dense, expert: feature_rows position by position) and PLE neurons with their c_q."""
    parts = [feature_rows(ctx, l, int(s), n[t == s]) for s in np.unique(t)]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    u = np.concatenate([p.u for p in parts])
    where = np.concatenate([p.where + o for p, o in zip(parts, offsets)])
    ple_q = np.concatenate([p.ple_q for p in parts])
    ple_where = np.concatenate([p.ple_where + o for p, o in zip(parts, offsets)])
    return Targets(u, where, ple_q, ple_where, _ple_c(ctx, l, t[ple_where], ple_q) if len(ple_q) else None)


def row_passes(ctx, l, t, u: Targets) -> list:
    """build._Context.row_passes of Gemma 4 targets: the residual rows through ctx.row_passes seeded at
    u / (lam_l ... lam_{L-1}) (the backward multiplies by each layer_scalar it passes); a PLE neuron's gradient is
    c_q at embed[t] and zero at every mlp.out (its input reads no residual). Returns the plan [(a, b, S, grads)]
    over the Z targets in order, as build's does (grads() runs the pass)."""
    dt = ctx.model.dtype
    Z = len(u)
    is_ple = np.zeros(Z, bool)
    is_ple[u.ple_where] = True
    ple_row = np.full(Z, -1)
    ple_row[u.ple_where] = np.arange(len(u.ple_where))
    lam = np.asarray(np.prod(ctx.lam[l:]), dt)

    def combined(A, B, sub=None):
        S = int(t[B - 1]) + 1
        g = {m: np.zeros((B - A, S, ctx.cfg.d_model), dt) for m in range(-1, l)}
        if sub is not None:
            a_, b_, S_, grads = sub
            rows = u.where[a_:b_] - A
            for m, v in grads().items():
                g[m][rows, :S_] = v
        for z in np.flatnonzero(is_ple[A:B]):
            g[-1][z, t[A + z]] = u.ple_c[ple_row[A + z]]
        return g

    plan, A = [], 0
    if len(u.where):
        for sub in ctx.row_passes(l, t[u.where], u.u / lam):
            B = int(u.where[sub[1] - 1]) + 1
            plan.append((A, B, int(t[B - 1]) + 1, partial(combined, A, B, sub)))
            A = B
    if A < Z:  # PLE rows after the last residual row
        plan.append((A, Z, int(t[Z - 1]) + 1, partial(combined, A, Z)))
    return plan


def out_vector(ctx, m, s, f):
    """build._Context.out_vector on Gemma 4: the slots f [k] of layer m at positions s [k] -> their output vectors
    d [k, D] at mlp.out (the module docstring's, each with its frozen norms; an expert's routing weight) and values."""
    cfg, rec, params, model = ctx.cfg, ctx.run.record, ctx.model.params, ctx.model
    b = f"blocks.{m}."
    F, JG, _ = ctx.w[m]

    def frozen(key, scale_site, at):
        return P.gain(model, params.get(m, key))[None, :] / rec[b + scale_site][at][:, None]

    d = np.zeros((len(f), cfg.d_model), model.dtype)
    dense, expert, ple = f < F, (f >= F) & (f < F + JG), f >= F + JG
    if dense.any():
        x = params.get(m, "W_down")[f[dense]] * frozen("ln2_post", "ln2_post.scale", s[dense])
        d[dense] = x * frozen("ln2_post1", "ln2_post1.scale", s[dense]) if cfg.moe else x
    if expert.any():
        j, i = np.divmod(f[expert] - F, cfg.d_expert)
        se = s[expert]
        e = rec[b + "moe.topk.index"][se, j]
        w = rec[b + "moe.topk.weight"][se, j][:, None]
        d[expert] = (w * params.get(m, "We_down")[e, i] * frozen("ln2_post", "ln2_post.scale", se)
                     * frozen("ln2_post2", "ln2_post2.scale", se))
    if ple.any():
        d[ple] = params.get(m, "W_ple_proj")[f[ple] - F - JG] * frozen("ple_post", "ple_post.scale", s[ple])
    return d, ctx.act[m][s, f]


def total(ctx, m) -> np.ndarray:
    """sum over every slot of layer m of act d [T, D] = mlp.out_m + ple.out_m: under the freeze the MLP's output is
    exactly the sum of its dense and expert neurons' vectors, the PLE branch's of its neurons'."""
    rec = ctx.run.record
    if m not in ctx._total:
        x = np.asarray(rec[f"blocks.{m}.mlp.out"])[: ctx.T]
        if ctx.cfg.ple:
            x = x + np.asarray(rec[f"blocks.{m}.ple.out"])[: ctx.T]
        ctx._total[m] = x
    return ctx._total[m]


def feature_edges(ctx, m, g_out) -> np.ndarray:
    """[Z, S, D] gradients at mlp.out of layer m (= at ple.out: every MLP held) -> [Z, S, F_max] edges from its
    slots (the module docstring's output vectors)."""
    cfg, rec, params, model = ctx.cfg, ctx.run.record, ctx.model.params, ctx.model
    Z, S, _ = g_out.shape
    b = f"blocks.{m}."
    F, JG, Pw = ctx.w[m]

    def frozen(key, scale_site):  # a frozen RMSNorm: w / s[t]
        return P.gain(model, params.get(m, key))[None, :] / rec[b + scale_site][:S, None]

    g = g_out * frozen("ln2_post", "ln2_post.scale")[None]
    g_dense = g * frozen("ln2_post1", "ln2_post1.scale")[None] if cfg.moe else g
    parts = [ctx.act[m][None, :S, :F] * (g_dense @ params.get(m, "W_down").T)]
    if cfg.moe:
        g_moe = g * frozen("ln2_post2", "ln2_post2.scale")[None]
        top = rec[b + "moe.topk.index"][:S]
        We_down = params.get(m, "We_down")
        ex = np.zeros((Z, S, cfg.top_k, cfg.d_expert), g_out.dtype)
        for e in np.unique(top):  # each selected expert once, over its (token, slot) pairs
            s, j = np.nonzero(top == e)
            ex[:, s, j] = g_moe[:, s] @ We_down[e].T
        wts = rec[b + "moe.topk.weight"][:S, :, None]
        parts.append((ex * (wts * rec[b + "moe.act"][:S])[None]).reshape(Z, S, JG))
    if cfg.ple:
        g_ple = g_out * frozen("ple_post", "ple_post.scale")[None]
        parts.append(ctx.act[m][None, :S, F + JG: F + JG + Pw] * (g_ple @ params.get(m, "W_ple_proj").T))
    edges = np.concatenate(parts, axis=2)
    return np.pad(edges, ((0, 0), (0, 0), (0, ctx.F - edges.shape[2])))


def finish(g, ctx):
    """The assembled graph's slots as Gemma 4 nodes: kinds neuron / expert / ple and their indices (module
    docstring), and a PLE token node for each (l, t) with an explored PLE neuron, placed before the embeddings
    (circuit-tracer's token group), with its edges ple.token[t, l, q] / sqrt(2) into those neurons' rows."""
    cfg, rec = ctx.cfg, ctx.run.record
    kind, index = g.kind.astype(object), g.index.copy()
    flat = np.flatnonzero(g.kind == "neuron")
    l, t, n = g.layer[flat], g.position[flat], g.index[flat]
    F, JG = np.array([w[0] for w in ctx.w])[l], np.array([w[1] for w in ctx.w])[l]
    expert, ple_slot = (n >= F) & (n < F + JG), n >= F + JG
    if cfg.moe and expert.any():
        top = np.stack([rec[f"blocks.{m}.moe.topk.index"][: ctx.T] for m in range(cfg.n_layers)])  # [L, T, J]
        j, k = np.divmod(n[expert] - F[expert], cfg.d_expert)
        kind[flat[expert]] = "expert"
        index[flat[expert]] = top[l[expert], t[expert], j] * cfg.d_expert + k
    kind[flat[ple_slot]] = "ple"
    index[flat[ple_slot]] = n[ple_slot] - F[ple_slot] - JG[ple_slot]
    ple = flat[ple_slot]
    codes, inverse = np.unique(g.layer[ple] * ctx.T + g.position[ple], return_inverse=True)
    emb0 = int(np.flatnonzero(g.kind == "embed")[0])
    k = len(codes)
    is_ple = np.zeros(g.n, bool)
    is_ple[ple] = True
    on_ple = is_ple[g.rows]
    keep = ~on_ple  # a PLE row keeps one of _assemble's edges: its own embedding's
    keep[on_ple] = g.cols[on_ple] == emb0 + g.position[g.rows[on_ple]]
    shift = lambda a: np.where(a >= emb0, a + k, a)  # noqa: E731  (no PLE neuron is >= emb0)
    token = np.asarray(rec["ple.token"])[g.position[ple], g.layer[ple], index[ple].astype(int)] if cfg.ple \
        else np.zeros(0)
    rows = np.concatenate([shift(g.rows[keep]), ple]).astype(g.rows.dtype)
    cols = np.concatenate([shift(g.cols[keep]), emb0 + inverse]).astype(g.cols.dtype)
    # the edge ple.token / sqrt 2 in the values' own dtype (a float64 token term would promote every edge)
    values = np.concatenate([g.values[keep], (token * 2.0 ** -0.5).astype(g.values.dtype, copy=False)])
    order = np.lexsort((cols, rows))

    def insert(a, fill):
        return np.concatenate([a[:emb0], np.asarray(fill, dtype=a.dtype), a[emb0:]])

    g.kind = insert(kind.astype("<U16"), ["ple_token"] * k)
    g.layer = insert(g.layer, codes // ctx.T)
    g.position = insert(g.position, codes % ctx.T)
    g.index = insert(index.astype(g.index.dtype), [PLE_TOKEN] * k)
    g.activation = insert(g.activation, [np.nan] * k)
    g.input = insert(g.input, [np.nan] * k)
    g.rows, g.cols, g.values = rows[order], cols[order], values[order]
    return g


# ------------------------------------------------------------------------------------------------- faithfulness


def kept_nodes(g, pr) -> dict:
    """The pruned graph's Gemma 4 neurons to keep, by site: dense [L, T, F_max], expert [L, T, E, G] (by expert
    id: a re-run whose router picks another expert ablates it), ple [L, T, P]. A kept remainder node keeps the
    unexplored neurons of its (l, t), the clean run's experts'."""
    cfg = g.model.config
    L, T = cfg.n_layers, g.read_at + 1
    E, G = (cfg.n_experts, cfg.d_expert) if cfg.moe else (0, 0)
    keep = {"neuron": np.zeros((L, T, max(cfg.mlp_width_of(l) for l in range(L))), bool),
            "expert": np.zeros((L, T, E, G), bool), "ple": np.zeros((L, T, cfg.d_ple if cfg.ple else 0), bool)}
    explored = {k: np.zeros_like(v) for k, v in keep.items()}
    for k in keep:
        for mask, target in ((g.kind == k, explored[k]), (pr.node_mask & (g.kind == k), keep[k])):
            idx = np.flatnonzero(mask)
            if k == "expert":
                target[g.layer[idx], g.position[idx], g.index[idx] // G, g.index[idx] % G] = True
            else:
                target[g.layer[idx], g.position[idx], g.index[idx]] = True
    rec = g.run.record
    for i in np.flatnonzero(pr.node_mask & (g.kind == "remainder")):
        l, t = int(g.layer[i]), int(g.position[i])
        keep["neuron"][l, t, : cfg.mlp_width_of(l)] |= ~explored["neuron"][l, t, : cfg.mlp_width_of(l)]
        keep["ple"][l, t] |= ~explored["ple"][l, t]
        if cfg.moe:
            for e in rec[f"blocks.{l}.moe.topk.index"][t]:
                keep["expert"][l, t, e] |= ~explored["expert"][l, t, e]
    return keep


def ablation_edit(g, keep: dict, ablation: str):
    """A forward edit (forward.forward's edit=) that sets every neuron at positions <= p outside keep to zero or
    to its mean over positions 1 .. T-1 of the clean run: mlp.act and ple.act per neuron, moe.act per (expert,
    neuron) of the expert the re-run's own router picked (its mean over the positions that picked it, else 0)."""
    cfg, rec = g.model.config, g.run.record
    T = g.read_at + 1

    def fill(name, shape):
        if ablation == "zero":
            return np.zeros(shape, rec[name].dtype)
        return np.broadcast_to(np.asarray(rec[name])[1:].mean(axis=0), shape)

    def expert_mean(l, e):
        top, act = rec[f"blocks.{l}.moe.topk.index"][1:], rec[f"blocks.{l}.moe.act"][1:]
        t, j = np.nonzero(top == e)
        return act[t, j].mean(axis=0) if len(t) else np.zeros(cfg.d_expert, act.dtype)

    def edit(name, value, record):
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "blocks" or ".".join(parts[2:]) not in ("mlp.act", "ple.act", "moe.act"):
            return value
        l, site = int(parts[1]), ".".join(parts[2:])
        out = value.copy()
        if site == "mlp.act":
            k = keep["neuron"][l, :, : value.shape[1]]
            out[:T] = np.where(k, value[:T], fill(name, (T, value.shape[1])))
        elif site == "ple.act":
            out[:T] = np.where(keep["ple"][l], value[:T], fill(name, (T, value.shape[1])))
        else:
            top = record[f"blocks.{l}.moe.topk.index"][:T]  # this run's choice
            k = keep["expert"][l, np.arange(T)[:, None], top]  # [T, J, G]
            if ablation == "zero":
                f = np.zeros_like(value[:T])
            else:
                means = np.stack([expert_mean(l, e) for e in range(cfg.n_experts)])
                f = means[top]
            out[:T] = np.where(k, value[:T], f)
        return out

    return edit


def rerouted(g, record) -> int:
    """How many (layer, position <= p, slot) of a re-run chose another expert than the clean run."""
    cfg = g.model.config
    if not cfg.moe:
        return 0
    T = g.read_at + 1
    name = "blocks.{}.moe.topk.index"
    return int(sum((record[name.format(l)][:T] != g.run.record[name.format(l)][:T]).sum()
                   for l in range(cfg.n_layers)))


# ------------------------------------------------------------------------------------------------- edge_heads


def _slots(g, ctx, i) -> np.ndarray:
    """The context slots of node i of (l, t): one for a neuron, expert or PLE neuron; a remainder's unexplored."""
    kind, l, t, n = str(g.kind[i]), int(g.layer[i]), int(g.position[i]), int(g.index[i])
    F, JG, _ = ctx.w[l]
    if kind == "neuron":
        return np.array([n])
    if kind == "expert":
        e, k = divmod(n, ctx.cfg.d_expert)
        j = int(np.flatnonzero(ctx.run.record[f"blocks.{l}.moe.topk.index"][t] == e)[0])
        return np.array([F + j * ctx.cfg.d_expert + k])
    if kind == "ple":
        return np.array([F + JG + n])
    here = np.flatnonzero((g.layer == l) & (g.position == t) & np.isin(g.kind, ("neuron", "expert", "ple")))
    done = np.concatenate([_slots(g, ctx, int(x)) for x in here]) if len(here) else np.zeros(0, int)
    rest = ctx.active[l, t].copy()
    rest[done] = False
    return np.flatnonzero(rest)


def edge_heads(g, ctx, target, source, layer, by_source=False):
    """build.edge_heads on Gemma 4: one edge split over layer m's heads (and source tokens).

    Math:   the frozen model is linear, so the part of A_ij through head h of layer m is g_i(z_m[., h]) . z_j[., h]
            (z_j: the source alone through the frozen model, `_alone`; a consumer's z reads its producer's v_j), and
            the rest, skip, is the edge of a backward with layer m's attention dropped (its consumers' key / value
            paths kept): skip + sum_h heads[h] = A_ij. (On Gemma 4 resid_pre_m is no cut: a consumer after m reads
            its producer's input before m.)
    Shapes: -> (skip: float, heads [N] or [N, S])
    """
    from refprism.errors import InputError
    from refprism.gemma import ops
    from refprism.gradients.backward import FREEZABLE, Seed, backward

    model, run, cfg = g.model, g.run, g.model.config
    L = cfg.n_layers
    tk, sk = str(g.kind[target]), str(g.kind[source])
    if tk not in ("neuron", "expert", "logit") or sk not in ("neuron", "expert", "ple", "remainder", "embed"):
        raise InputError("edge_heads takes a neuron, expert neuron or logit target (a PLE neuron's input reads no "
                         "head) and a neuron, expert or PLE neuron, remainder or embedding source")
    lt, ls = int(g.layer[target]), int(g.layer[source])
    if not ls < layer <= min(lt, L - 1):
        raise InputError(f"layer {layer} lies on no path from {g.label(source)} to {g.label(target)}")
    t, s0 = int(g.position[target]), int(g.position[source])
    if tk == "logit":
        u = g.logit_u[[int(target - np.flatnonzero(g.kind == "logit")[0])]]
    else:
        u = feature_rows(ctx, lt, t, _slots(g, ctx, target)).u / np.asarray(np.prod(ctx.lam[lt:]), model.dtype)
    drop = {(m, "mlp") for m in range(L)} | {(m, "attn") for m in range(lt + 1, L)}
    b = f"blocks.{layer}."
    seed = Seed(None, u, {})
    g_z = backward(model, ctx.layers, seed, t, freeze=frozenset(FREEZABLE), drop=frozenset(drop),
                   keep=[b + "attn.z"])[b + "attn.z"][0]  # [T, N, H]
    g_skip = backward(model, ctx.layers, seed, t, freeze=frozenset(FREEZABLE), drop=frozenset(drop | {(layer, "attn")}),
                      keep=["embed", f"blocks.{ls}.mlp.out"])
    if sk == "embed":
        skip = float(g_skip["embed"][0, s0] @ run.record["embed"][s0])
    else:
        edges = feature_edges(ctx, ls, g_skip[f"blocks.{ls}.mlp.out"][:, : s0 + 1])
        skip = float(edges[0, s0, _slots(g, ctx, source)].sum())
    alone = _alone(g, ctx, source)
    if not by_source:
        return skip, np.einsum("tnh,tnh->n", g_z, alone[b + "attn.z"])
    kv = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(layer))
    v = alone[f"blocks.{cfg.kv_source(layer)}.attn.v"][:, kv]  # [S, N, H]: a consumer's are its producer's
    return skip, np.einsum("nts,tnh,snh->ns", run.record[b + "attn.pattern"], g_z, v)


def _alone(g, ctx, source):
    """The frozen forward of one source alone: embeddings and PLE tokens zero but the source's, every norm scale,
    pattern and top-k choice and weight held, every neuron's act (mlp.act, moe.act, ple.act) zero but the
    source's slots. Linear and without biases: exactly the source's own contribution at every site."""
    rec = ctx.run.record
    kind, l, t = str(g.kind[source]), int(g.layer[source]), int(g.position[source])
    slots = _slots(g, ctx, source) if kind != "embed" else np.zeros(0, int)
    F, JG, _ = ctx.w[l] if kind != "embed" else (0, 0, 0)
    on = {"mlp.act": slots[slots < F], "moe.act": slots[(slots >= F) & (slots < F + JG)] - F,
          "ple.act": slots[slots >= F + JG] - F - JG}
    held = ("attn.pattern", "moe.topk.index", "moe.topk.weight")

    def edit(name, value, record):
        site = name.split(".", 2)[-1]
        if name == "embed":
            out = np.zeros_like(value)
            if kind == "embed":
                out[t] = rec["embed"][t]
            return out
        if name == "ple.token":
            return np.zeros_like(value)
        if name.endswith("scale") or site in held:
            return rec[name].copy()
        if site in on:
            out = np.zeros_like(value)
            if name == f"blocks.{l}.{site}" and len(on[site]):
                flat = out.reshape(out.shape[0], -1)
                flat[t, on[site]] = np.asarray(rec[name]).reshape(out.shape[0], -1)[t, on[site]]
            return out
        return value

    return ctx.model.run(ctx.run.tokens, edit=edit).record
