"""Edge attribution: EAP and EAP-IG scores for every edge between components, and the exact patch of one edge.

**Nodes** (the EAP literature's graph, Syed et al. 2023, Hanna et al. 2024): upstream nodes write into the residual
stream, downstream nodes read it.
    upstream    embed;  every head L{l}H{h} (its z, validate's head);  every MLP L{l}.mlp (its output, post-norm
                included);  with neurons=m, layer m's MLP is its neurons L{m}N{n} (their act) instead;  Gemma 4 with
                per-layer inputs: every L{l}.ple (ple.out, validate's component)
    downstream  every head's three inputs L{l}H{h}.q, .k, .v;  every MLP L{l}.mlp (its input);  with neurons=m,
                layer m's neurons L{m}N{n} (the input of that neuron's gate and up columns);  Gemma 4: every L{l}.ple
                (its gate's input, resid_mlp);  logits
An edge u -> d exists when d reads the residual stream after u has written into it: u writes at residual index
w(embed) = 0, w(head of l) = 2l + 1 (resid_mid), w(mlp of l) = 2l + 2 (resid_post); d reads at r(head of l) = 2l
(resid_pre), r(mlp of l) = 2l + 1, r(logits) = 2L; the edge is there iff w(u) <= r(d). Labels: `U->D`, e.g.
`L3H1->L14H5.q`, `embed->L0.mlp`, `L17N230->logits`, `L4.ple->L9H0.v`.

**Gemma 4** (three residual indices per layer: resid_pre 3l, resid_mid 3l + 1, resid_mlp 3l + 2; writes, reads):
    heads write at 3l + 1, MLPs at 3l + 2, ple nodes at 3l + 3 (resid_post = lambda_l (resid_mlp + ple.out));
    q reads 3l, an MLP 3l + 1, a ple node 3l + 2, the logits 3L;  k and v of layer l read 3 s, s = kv_source(l):
    a KV-sharing consumer attends over its producer's post-RoPE keys and post-v_norm values, so its .k and .v
    copies are the producer's resid_pre (through the producer's ln1, W_K / W_V of kv head kv(n) among the
    producer's, k_norm / v_norm, RoPE), used for head n of layer l only; edges into them come only from nodes
    written before layer s (parse_edge refuses the others).
    layer_scalar: an upstream write of layer u reaches a reader at index r scaled by gain = prod_{u <= m < r // 3}
    lambda_m (embed: from m = 0); a score carries the gain, the exact patch adds the scaled change.
    The MoE FFN (dense branch, router, experts, their post-norms: output mlp.out) is the one node L{l}.mlp both ways;
    its input copy is resid_mid for every reading path (ln2, the router's norm, ln2_moe). neurons=m on a MoE layer
    splits it: upstream the dense neurons L{m}N{n} (act, through ln2_post1 then ln2_post) and validate's experts
    L{m}E{e} (expert_out at the slot that chose e, weighted by w_j, through ln2_post2 then ln2_post; 0 where the
    base did not choose e); downstream the dense neurons (their gate/up columns of ln2) and one node L{m}.experts
    (the router's and ln2_moe's input), G = g(resid_mid) - g(resid_mlp) - ln2^T(g(ln2.out)).
    The embedding also reaches every ple_l directly (ple.model_proj reads the scaled embedding): that path is part
    of the edge embed -> L{l}.ple (through ple.input[:, l] only, as the forward's edit of `embed` propagates it),
    so embed's out-edges still sum to its AtP, whose gradient at `embed` holds both paths.

**Counts** (edge_count): for L layers of N heads, MLPs whole (Gemma 1-3),
    E = (3NL + L + 1) + N sum_l [3N(L-1-l) + (L-l) + 1] + sum_l [3N(L-1-l) + (L-1-l) + 1]
      = 3NL + L + 1 + N (3N L(L-1)/2 + L(L+1)/2 + L) + 3N L(L-1)/2 + L(L-1)/2 + L
the literature's convention (per query head q, k and v inputs, MLPs as single nodes): GPT-2 small (12 x 12)
32,491, Gemma 2 2B (26 x 8) 74,218. With grouped-query attention the k and v inputs are still one per query head
(as in TransformerLens' ungrouped attention): the k input of query head n is n's own copy of the keys of its
kv head, the other query heads of the group keep theirs.

**An edge's input path** is d's private copy of the residual stream: for a head's q input, the residual that
ln1 normalises and W_Q[:, n] projects for head n only; for k (v), the residual that ln1 normalises and W_K[:, kv(n)]
(W_V) projects for the scores (the values) of query head n only; for an MLP, its ln2 input (Gemma 4: every input of
the FFN); for a neuron, the ln2 input of its gate and up columns; for a ple node, the input of its gate W_ple_gate;
for the logits, the final residual. The input norm is on the path as it is (its scale recomputed: the true
gradient), so a copy's change is normalised with the copy.

**Scores** (each one "the readout with the edge clean minus with it replaced", validate's sign; a the upstream
activation at the edited positions t of the base run, a' its replacement, Setting.replacement):
    eap       sign * sum_t (a(t) - a'(t)) . dR/da(t)|_d        the gradient through d's input path only, one
                                                               backward pass of the base run
    eap-ig    the same with dR/da|_d averaged over k runs whose input embeddings at the edited positions are
              x' + alpha_i (x - x'), alpha_i = (i + 1/2) / k (the midpoint rule, error O(1/k^2), where a
              one-sided Riemann sum's is O(1/k); Hanna et al.'s EAP-IG-inputs); resample ablation only (x, x' the two
              prompts' embeddings; the activation changes a - a' are the end points', as in EAP-IG)
    dR/da|_d through the chain, for a head u = (l, h):  gain W_O[h] . post1^T(G_d),  post1^T the VJP of the head's
    post-norm at the base run (Gemma 2/3/4; the identity on Gemma 1); for a neuron: gain W_down[n] . post2^T(G_d);
    embed, MLPs and ple nodes write into the residual directly: gain G_d; G_d = dR/d(copy of d) [Z, T, D].
Summed over the edges out of u, the G_d add up to dR/d(residual after u) (every reader of the residual is some
d), so sum_d eap(u -> d) is u's node-level AtP exactly; the edges into the logits are AtP with every later layer
dropped from the backward (the skip path only). Every gradient comes from refprism.gradients (one backward,
its freeze switches passed through).

**The exact edge patch** (edge_patch): the base run re-run from d's layer with d's input copy set to
x + gain dr_u, dr_u = r(a') - r(a) the residual change u alone makes (its post-norm recomputed with the other heads
at their recorded values), everything else clean; everything after d recomputed. Built with the forward's one edit
hook (q_pre column, scores row, z column, ln2.out, gate/up columns or the final residual; Gemma 4's FFN: resid_mid
+ gain dr_u with the skip of resid_mlp kept clean; a ple node: resid_mlp + gain dr_u into its gate, the skip of
resid_post kept clean, and for embed -> L{l}.ple also ple.act with ple_l of the patched embedding).
Axis letters as in ops.py; Z readout columns, Y = Z x (downstream nodes of a block), E edges, U upstream nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.record import everything_but
from refprism.gradients.backward import gradients, ple_inputs_vjp
from refprism.interventions.components import _group, activation, chosen
from refprism.interventions.setting import Readings, Setting, _norm, setting
from refprism.model import Run

EDGE_METHODS = ("eap", "eap-ig")
NEURON_CHUNK = 256  # downstream neurons per block of input copies ([Z, 256, T, D] at a time)
PATHS = ("q", "k", "v")


# ------------------------------------------------------------------------------------------------- the graph


def edge_level(config, level) -> int | None:
    """The level of an edge graph: "heads" (heads and whole MLPs: None) or "neurons:L" (layer L's MLP as its
    neurons: L). config None: the form only (the layer's range is checked with a config)."""
    kind, _, arg = str(level).partition(":")
    if kind == "heads" and not arg:
        return None
    if kind == "neurons" and arg:
        if not (arg.isascii() and arg.isdigit()):
            raise InputError(f"--level {level!r}: the layer after ':' is a number, e.g. neurons:3")
        if config is not None and not 0 <= int(arg) < config.n_layers:
            raise InputError(f"--level {level!r}: the layer after ':' is 0 .. {config.n_layers - 1}")
        return int(arg)
    raise InputError(f"edge attribution scores edges between heads, MLPs and one layer's neurons: use --level heads "
                     f"or --level neurons:L, not {level!r}")


def upstream_nodes(config, neurons=None) -> list[tuple[str, str, int, int]]:
    """(label, kind, layer, index) in compute order: embed, each layer's heads, then its MLP (or its neurons),
    then (Gemma 4 with per-layer inputs) its L{l}.ple; kind embed | head | mlp | neuron | ple."""
    out = [("embed", "embed", -1, 0)]
    for l in range(config.n_layers):
        out += [(f"L{l}H{h}", "head", l, h) for h in range(config.n_heads)]
        out += ([(f"L{l}N{n}", "neuron", l, n) for n in range(config.mlp_width_of(l))] if l == neurons
                else [(f"L{l}.mlp", "mlp", l, 0)])
        out += [(f"L{l}E{e}", "expert", l, e) for e in range(config.n_experts)] if l == neurons else []
        out += [(f"L{l}.ple", "ple", l, 0)] if config.ple else []
    return out


def downstream_nodes(config, neurons=None) -> list[tuple[str, str, int, int]]:
    """(label, kind, layer, index) in compute order: each layer's q, k, v inputs (head-major: L{l}H{h}.q, .k, .v),
    then its MLP (or neurons), then (Gemma 4 with per-layer inputs) its L{l}.ple, then logits.
    kind: q | k | v | mlp | neuron | ple | logits."""
    out = []
    for l in range(config.n_layers):
        out += [(f"L{l}H{h}.{p}", p, l, h) for h in range(config.n_heads) for p in PATHS]
        out += ([(f"L{l}N{n}", "neuron", l, n) for n in range(config.mlp_width_of(l))] if l == neurons
                else [(f"L{l}.mlp", "mlp", l, 0)])
        out += [(f"L{l}.experts", "experts", l, 0)] if l == neurons and config.moe else []
        out += [(f"L{l}.ple", "ple", l, 0)] if config.ple else []
    return out + [("logits", "logits", config.n_layers, 0)]


def _slots(config) -> int:
    """Residual indices per layer: 2 (resid_pre, resid_mid) on Gemma 1-3; 3 on Gemma 4 (also resid_mlp)."""
    return 3 if config.gemma4 else 2


def writes(config, kind, layer) -> int:
    """The residual index an upstream node writes into (k = _slots): embed 0, a head of layer l k l + 1
    (resid_mid), an MLP/neuron k l + 2 (Gemma 1-3 resid_post, Gemma 4 resid_mlp), a ple node 3 l + 3 (resid_post)."""
    return 0 if kind == "embed" else _slots(config) * layer + {"head": 1, "mlp": 2, "neuron": 2, "expert": 2,
                                                                "ple": 3}[kind]


def reads(config, kind, layer) -> int:
    """The residual index a downstream node reads: a head's q k l; its k, v k s with s = kv_source(l) (a Gemma 4
    KV-sharing consumer's keys and values are its producer's, from the producer's resid_pre); an MLP/neuron
    k l + 1 (resid_mid); a ple node 3 l + 2 (resid_mlp); logits k L."""
    k = _slots(config)
    if kind in ("k", "v"):
        return k * config.kv_source(layer)
    return k * layer + {"q": 0, "mlp": 1, "neuron": 1, "experts": 1, "ple": 2, "logits": 0}[kind]


def gain(config, params, u_layer, r) -> np.ndarray:
    """Gemma 4's layer_scalar product between an upstream node of layer u_layer (embed: 0) and a reader at
    residual index r: prod_{u <= m < r // 3} lambda_m (resid_post = lambda_m (resid_mlp + ple.out)); 1 before."""
    if not config.gemma4:
        return np.ones((), dtype=params.dtype)
    lam = [params.get(m, "layer_scalar")[0] for m in range(max(u_layer, 0), r // 3)]
    return np.asarray(np.prod(lam), dtype=params.dtype)


def edges(config, neurons=None) -> list[tuple[int, int]]:
    """Every edge as (upstream index, downstream index) into upstream_nodes / downstream_nodes, downstream-major."""
    up, down = upstream_nodes(config, neurons), downstream_nodes(config, neurons)
    w = np.array([writes(config, k, l) for _, k, l, _ in up])
    out = []
    for j, (_, k, l, _) in enumerate(down):
        out += [(int(i), j) for i in np.flatnonzero(w <= reads(config, k, l))]
    return out


def edge_count(config, neurons=None) -> int:
    """The number of edges (module docstring), counted per downstream node: sum_d #{u : w(u) <= r(d)}.

    Math:   Gemma 1-3: a head input of layer l reads 1 + (N + 1) l upstream nodes (embed, every head and MLP before
            it); an MLP of layer l reads 1 + (N + 1) l + N;  the logits 1 + (N + 1) L; each of layer m's MLP nodes
            counts F_m = mlp_width_of(m) times with neurons=m (as an upstream and as a downstream node)
            Gemma 4: with B(l) = 1 + sum_{i<l} (N + F_i + P) the upstream nodes before layer l (P = 1 with per-layer
            inputs, else 0): q of layer l reads B(l), k and v read B(kv_source(l)) (a consumer's, its producer's),
            the MLP B(l) + N, the ple node B(l) + N + F_l, the logits B(L)
    """
    L, N = config.n_layers, config.n_heads
    E = config.n_experts if config.moe else 0
    mult = [config.mlp_width_of(l) + E if l == neurons else 1 for l in range(L)]  # upstream nodes of each FFN
    reads_ = [config.mlp_width_of(l) + (E > 0) if l == neurons else 1 for l in range(L)]  # its downstream nodes
    P = 1 if config.ple else 0
    before = [1 + sum(N + mult[i] + P for i in range(l)) for l in range(L + 1)]  # upstream nodes before layer l
    src = [config.kv_source(l) for l in range(L)]
    total = sum(N * before[l] + 2 * N * before[src[l]] + reads_[l] * (before[l] + N) + P * (before[l] + N + mult[l])
                for l in range(L))
    return int(total + before[L])


# ------------------------------------------------------------------------------------------------- the scores


@dataclass
class EdgeAttribution:
    """One edge method's score for every edge: values [E, Z] under labels `U->D`."""

    setting: Setting = field(repr=False)
    method: str
    level: str
    labels: list[str]  # E edge labels
    upstream: list[str]  # E
    downstream: list[str]  # E
    values: np.ndarray  # [E, Z]
    cost: dict
    steps: int | None = None
    rule: str | None = None  # eap-ig's quadrature

    @property
    def columns(self) -> list[str]:
        return self.setting.readout.targets.labels

    def to_json(self) -> dict:
        from refprism.interventions.patching import _header

        out = _header(self.setting, "attribute")
        out.update({"method": self.method, "level": self.level, "steps": self.steps, "rule": self.rule,
                    "cost": self.cost, "n_edges": len(self.labels),
                    "edges": [{"label": e, "upstream": u, "downstream": d, "values": [float(x) for x in v]}
                              for e, u, d, v in zip(self.labels, self.upstream, self.downstream, self.values)]})
        return out

    def table(self, top=20) -> str:
        order = np.argsort(-np.abs(self.values[:, 0]), kind="stable")[:top]
        width = max(12, *(len(c) + 2 for c in self.columns))
        s = self.setting
        out = [f"{self.method} on the edges of {self.level} ({s.ablate} ablation, {s.direction}; {len(self.labels)} "
               f"edges; {self.cost['forward']} forward + {self.cost['backward']} backward passes, "
               f"{self.cost['seconds']:.2f} s)",
               f"{'edge':<28}" + "".join(f"{c:>{width}}" for c in self.columns)]
        out += [f"{self.labels[i]:<28}" + "".join(f"{v:>{width}.4f}" for v in self.values[i]) for i in order]
        return "\n".join(out)


def check_edge_method(method, level, ablate, steps) -> None:
    """The checks that need no run (the CLI makes them before the weights are read)."""
    if method not in EDGE_METHODS:
        raise InputError(f"edge method {method!r} is not one of {', '.join(EDGE_METHODS)}")
    if method == "eap-ig":
        if ablate != "resample":
            raise InputError("eap-ig interpolates the input between the prompt and the counterfactual: it needs "
                             "--ablate resample and --counterfactual")
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")


def attribute_edges(model, prompt, *, method="eap", level="heads", targets=None, versus=(), position=-1, at=None,
                    ablate="zero", counterfactual=None, reference=None, direction="noising", steps=8,
                    freeze=()) -> EdgeAttribution:
    """Score every edge of the graph (module docstring) by EAP or EAP-IG; arguments as validate's.

    level:  "heads" (heads and whole MLPs) or "neurons:L" (layer L's MLP split into its neurons)
    steps:  eap-ig's k (midpoint rule);  freeze: refprism.gradients' switches (default: the true gradient)
    """
    check_edge_method(method, level, ablate, steps)
    neurons = edge_level(model.config, level)
    s = setting(model, prompt, targets=targets, versus=versus, position=position, at=at, ablate=ablate,
                counterfactual=counterfactual, reference=reference, direction=direction)
    started = time.perf_counter()
    deltas = upstream_changes(s, neurons)
    extra = 2 if s.donor is not None else 1
    if method == "eap":
        values = edge_scores(s, s.base, deltas, neurons, freeze=freeze)
        cost = {"forward": extra, "backward": 1}
    else:
        values = 0
        x, x2 = s.base.record["embed"], s.donor.record["embed"]
        at = list(s.at)
        for i in range(int(steps)):
            alpha = np.asarray((i + 0.5) / steps, dtype=model.dtype)
            point = x.copy()
            point[at] = x2[at] + alpha * (x[at] - x2[at])
            run = model.run(s.base.tokens, edit=lambda name, v, r, point=point: point if name == "embed" else v)
            values = values + edge_scores(s, run, deltas, neurons, freeze=freeze)
        values = values / np.asarray(steps, dtype=model.dtype)
        cost = {"forward": extra + int(steps), "backward": int(steps)}
    cost["seconds"] = time.perf_counter() - started
    up, down = upstream_nodes(model.config, neurons), downstream_nodes(model.config, neurons)
    pairs = edges(model.config, neurons)
    ups, downs = [up[i][0] for i, _ in pairs], [down[j][0] for _, j in pairs]
    return EdgeAttribution(s, method, str(level), [f"{u}->{d}" for u, d in zip(ups, downs)], ups, downs, values,
                           cost, int(steps) if method == "eap-ig" else None,
                           "midpoint" if method == "eap-ig" else None)


def upstream_changes(s: Setting, neurons=None) -> dict:
    """a - a' of every upstream node at every position (0 where not edited), from the base run and the
    replacement: {"embed": [T, D], ("head", l): [T, N, H_l], ("mlp", l): [T, D], ("neuron", l): [T, F_l],
    ("ple", l): [T, D] (Gemma 4's ple.out), ("expert", l): [T, E, D] (a split MoE layer's experts)}."""
    cfg, rec = s.model.config, s.base.record
    T = len(s.base.tokens)
    at = list(s.at)
    out = {}

    def change(g, site, shape):
        d = np.zeros((T,) + shape, dtype=s.model.dtype)
        d[at] = rec[site][at] - s.replacement(g).reshape((len(at),) + shape)
        return d

    out["embed"] = change(_group("embed"), "embed", (cfg.d_model,))
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        out["head", l] = change(_group("head", l, range(cfg.n_heads)), b + "attn.z", (cfg.n_heads, cfg.head_dim_of(l)))
        if l == neurons:
            F = cfg.mlp_width_of(l)
            out["neuron", l] = change(_group("neuron", l, range(F)), b + "mlp.act", (F,))
            if cfg.moe:  # validate's experts: expert_out at the slot that chose e, 0 where the base did not
                g = _group("expert", l, range(cfg.n_experts))
                d = np.zeros((T, cfg.n_experts, cfg.d_model), dtype=s.model.dtype)
                for t, r in zip(at, s.replacement(g)):
                    d[t] = np.where(chosen(rec, g, t)[:, None], activation(s.model, rec, g, t) - r, 0)
                out["expert", l] = d
        else:
            out["mlp", l] = change(_group("mlp", l), b + "mlp.out", (cfg.d_model,))
        if cfg.ple:
            out["ple", l] = change(_group("ple", l), b + "ple.out", (cfg.d_model,))
    return out


def _sites(cfg, neurons):
    sites = [f"blocks.{l}.{n}" for l in range(cfg.n_layers) for n in ("attn.q_pre", "attn.scores", "attn.z")]
    if cfg.gemma4:  # the MLP's and the ple node's input gradients as differences of residual gradients
        sites += [f"blocks.{l}.{n}" for l in range(cfg.n_layers) for n in ("resid_mid", "resid_mlp", "resid_post")]
        sites += ["ple.input"] if cfg.ple else []
    else:
        sites += [f"blocks.{l}.ln2.out" for l in range(cfg.n_layers) if l != neurons]
    sites += [f"blocks.{neurons}.mlp.gate", f"blocks.{neurons}.mlp.up"] if neurons is not None else []
    sites += [f"blocks.{neurons}.ln2.out"] if neurons is not None and cfg.moe else []
    return sites + [f"blocks.{cfg.n_layers - 1}.resid_post"]


def input_gradients(model, run: Run, grads, l, kind, *, frozen_norm=False, rows=slice(None)) -> np.ndarray:
    """G_d = dR/d(copy of d's input) [Z, n, T, D] for the downstream nodes of one block, from the backward's
    gradient record `grads` of `run` (module docstring).

    Math:   (before the input norm: G = ln^T(g_h), the norm's VJP at the run's recorded input and scale)
            q of head n:  g_h = g(q_pre)[:, n] W_Q[:, n]^T                                 (ln1 of layer l)
            k of head n:  g_h = [k_norm^T rope^T (scale sum_t g(scores)[n, t, s] q[t, n])] W_K[:, kv(n)]^T
            v of head n:  g_h = (v_norm^T (sum_t pattern[n, t, s] g(z)[t, n])) W_V[:, kv(n)]^T
                          (k, v: the weights, norms, RoPE and ln1 of layer s = kv_source(l), kv(n) among s's kv
                          heads; Gemma 4: scale 1, v_norm without weight, W_V = W_K on a k_eq_v layer)
            MLP:          g_h = g(ln2.out);   neuron n: g_h = g(gate)[:, n] W_gate[:, n]^T + g(up)[:, n] W_up[:, n]^T
            Gemma 4 MLP:  G = g(resid_mid) - g(resid_mlp)      (every path through ln2, the router and ln2_moe: the
                          gradient at resid_mid less its skip path, resid_mlp = resid_mid + mlp.out)
            Gemma 4 split MoE layer: neurons as above; experts (router and ln2_moe): G = g(resid_mid) - g(resid_mlp)
                          - ln2^T(g(ln2.out))
            Gemma 4 ple:  G = g(resid_mlp) - lambda_l g(resid_post)   (the gate's path: resid_post = lambda_l
                          (resid_mlp + ple.out)); embed's direct path into ple_l is edge_scores'
            logits:       G = g(final residual) (no norm of its own: the final norm is inside the readout)
    kind:   "attn" (rows: head-major q, k, v of every head), "mlp", "neuron" (layer l's neurons `rows`),
            "experts", "ple", "logits"
    """
    cfg, params, rec = model.config, model.params, run.record
    off = cfg.norm_offset
    if kind == "logits":
        return grads[f"blocks.{cfg.n_layers - 1}.resid_post"][:, None]
    b = f"blocks.{l}."
    if kind == "ple":
        return (grads[b + "resid_mlp"] - params.get(l, "layer_scalar")[0] * grads[b + "resid_post"])[:, None]
    if kind == "mlp" and cfg.gemma4:
        return (grads[b + "resid_mid"] - grads[b + "resid_mlp"])[:, None]
    if kind == "experts":  # the router's and ln2_moe's paths: the FFN's less the dense branch's (ln2)
        dense = ops.rms_norm_vjp(grads[b + "ln2.out"], rec[b + "resid_mid"], rec[b + "ln2.scale"],
                                 params.get(l, "ln2"), offset=off, frozen=frozen_norm)[0]
        return (grads[b + "resid_mid"] - grads[b + "resid_mlp"] - dense)[:, None]
    if kind == "mlp":
        g_h = grads[b + "ln2.out"][:, None]
    elif kind == "neuron":
        g_h = (np.einsum("ztf,df->zftd", grads[b + "mlp.gate"][..., rows], params.get(l, "W_gate")[:, rows],
                         optimize=True)
               + np.einsum("ztf,df->zftd", grads[b + "mlp.up"][..., rows], params.get(l, "W_up")[:, rows],
                           optimize=True))
    if kind in ("mlp", "neuron"):
        return ops.rms_norm_vjp(g_h, rec[b + "resid_mid"], rec[b + "ln2.scale"], params.get(l, "ln2"), offset=off,
                                frozen=frozen_norm)[0]
    N = cfg.n_heads
    src = cfg.kv_source(l)  # the layer whose k, v layer l attends over (l itself unless a KV-sharing consumer)
    bs = f"blocks.{src}."
    H = cfg.head_dim_of(src)
    kv = ops.kv_index(N, cfg.kv_heads_of(src))
    T = len(run.tokens)
    g_q = np.einsum("ztnh,dnh->zntd", grads[b + "attn.q_pre"], params.get(l, "W_Q"), optimize=True)
    g_q = ops.rms_norm_vjp(g_q, rec[b + "resid_pre"], rec[b + "ln1.scale"], params.get(l, "ln1"), offset=off,
                           frozen=frozen_norm)[0]
    sc = np.asarray(cfg.query_pre_attn_scalar ** -0.5, dtype=model.dtype)  # Gemma 4: 1
    g_k = sc * np.einsum("znts,tnh->zsnh", grads[b + "attn.scores"], rec[b + "attn.q"], optimize=True)  # per head
    theta, scale = cfg.rope_of(src)
    cos, sin = ops.rope_tables(np.arange(T) / scale, H, theta, model.dtype, cfg.rope_partial_of(src))
    g_k = ops.rope_vjp(g_k, cos, sin)
    if cfg.qk_norm:  # each query head's copy of its kv head's k norm
        g_k = ops.rms_norm_vjp(g_k, rec[bs + "attn.k_pre"][:, kv], rec[bs + "attn.k_norm.scale"][:, kv],
                               params.get(src, "k_norm"), offset=off, frozen=frozen_norm)[0]
    g_k = np.einsum("zsnh,dnh->znsd", g_k, params.get(src, "W_K")[:, kv], optimize=True)
    g_v = np.einsum("nts,ztnh->zsnh", rec[b + "attn.pattern"], grads[b + "attn.z"], optimize=True)
    W_V = params.get(src, "W_K" if cfg.k_eq_v_at(src) else "W_V")  # k_eq_v: V is the raw K projection
    if cfg.gemma4:  # v_norm (no weight) over H
        g_v = ops.rms_norm_vjp(g_v, rec[bs + "attn.v_pre"][:, kv], rec[bs + "attn.v_norm.scale"][:, kv], None,
                               offset=0, frozen=frozen_norm)[0]
    g_v = np.einsum("zsnh,dnh->znsd", g_v, W_V[:, kv], optimize=True)
    g_kv = ops.rms_norm_vjp(np.stack([g_k, g_v], axis=2), rec[bs + "resid_pre"], rec[bs + "ln1.scale"],
                            params.get(src, "ln1"), offset=off, frozen=frozen_norm)[0]  # [Z, N, 2, T, D]
    g = np.concatenate([g_q[:, :, None], g_kv], axis=2)  # head-major q, k, v
    return g.reshape(g.shape[0], 3 * N, T, cfg.d_model)


def _block_reads(cfg, l, kind, n) -> list[int]:
    """The residual index each of a block's n downstream nodes reads (a consumer's k, v read before its q)."""
    if kind == "attn":
        return [reads(cfg, p, l) for _ in range(cfg.n_heads) for p in PATHS]
    return [reads(cfg, {"logits": "logits", "ple": "ple", "experts": "experts"}.get(kind, "mlp"), l)] * n


def _ple_direct(model, run, grads, l, frozen) -> np.ndarray:
    """Gemma 4: dR/dx_0 [Z, T, D] along the embedding's direct path into layer l's per-layer input only
    (ple.model_proj -> ple.input[:, l]): the backward's ple_inputs_vjp of g(ple.input) with every other layer's
    slice zero (the per-layer input norm is over P within each layer, so the slices are independent)."""
    g = np.zeros_like(grads["ple.input"])
    g[:, :, l] = grads["ple.input"][:, :, l]
    return ple_inputs_vjp(model, run.record, g, lambda name, value: None, frozen)


def _columns(model, run, Gy, r, deltas, neurons, frozen, d_o) -> np.ndarray:
    """(a - a') . dR/da|_d for the upstream nodes writing at or before residual index r (upstream_nodes order),
    Gy [Y, T, D] the input gradients of Y downstream nodes that read at r: [Y, U(r)]."""
    cfg, params, rec = model.config, model.params, run.record
    off = cfg.norm_offset
    cols = [gain(cfg, params, 0, r) * np.einsum("ytd,td->y", Gy, deltas["embed"], optimize=True)[:, None]]
    for u in range(cfg.n_layers):
        if writes(cfg, "head", u) > r:
            break
        b = f"blocks.{u}."
        Gu = Gy * gain(cfg, params, u, r)  # layer_scalar from u's layer to the reader (Gemma 4)
        Gp = Gu if not cfg.post_norms else ops.rms_norm_vjp(
            Gu, rec[b + "attn.o_proj"], rec[b + "ln1_post.scale"], params.get(u, "ln1_post"), offset=off,
            frozen=frozen)[0]
        cols.append(np.einsum("ytd,ntd->yn", Gp, d_o[u], optimize=True))
        if writes(cfg, "mlp", u) > r:
            break
        if u == neurons and cfg.moe:  # mlp.out = ln2_post(ln2_post1(act W_down) + ln2_post2(sum_j w_j out_j))
            def post(g, x, scale, w, b=b, u=u):
                return ops.rms_norm_vjp(g, rec[b + x], rec[b + scale], params.get(u, w), offset=off,
                                        frozen=frozen)[0]
            Gs = post(Gu, "mlp.sum", "ln2_post.scale", "ln2_post")
            Gp = post(Gs, "mlp.down", "ln2_post1.scale", "ln2_post1")
            cols.append(np.einsum("ytf,tf->yf", Gp @ params.get(u, "W_down").T, deltas["neuron", u]))
            Gq = post(Gs, "moe.down", "ln2_post2.scale", "ln2_post2")
            top, w = rec[b + "moe.topk.index"], rec[b + "moe.topk.weight"]  # [T, J]
            we = np.einsum("tj,tje->te", w, top[..., None] == np.arange(cfg.n_experts))  # expert e's weight at t
            cols.append(np.einsum("ytd,te,ted->ye", Gq, we, deltas["expert", u], optimize=True))
        elif u == neurons:
            Gp = Gu if not cfg.post_norms else ops.rms_norm_vjp(
                Gu, rec[b + "mlp.down"], rec[b + "ln2_post.scale"], params.get(u, "ln2_post"), offset=off,
                frozen=frozen)[0]
            cols.append(np.einsum("ytf,tf->yf", Gp @ params.get(u, "W_down").T, deltas["neuron", u]))
        else:
            cols.append(np.einsum("ytd,td->y", Gu, deltas["mlp", u], optimize=True)[:, None])
        if cfg.ple:
            if writes(cfg, "ple", u) > r:
                break
            cols.append(np.einsum("ytd,td->y", Gu, deltas["ple", u], optimize=True)[:, None])
    return np.concatenate(cols, axis=1)


def edge_scores(s: Setting, run: Run, deltas, neurons=None, *, freeze=()) -> np.ndarray:
    """sign * (a - a') . dR/da|_d for every edge (edges() order), the gradient taken at `run`: [E, Z].

    Math:   the column of upstream node u for a reader at residual index r: (prod of Gemma 4's layer_scalars from
            u to r, gain) * post_u^T(G_d) . da_u;  embed -> L{l}.ple adds _ple_direct(l) . d(embed) (its path
            through the per-layer inputs), so that sum_d eap(embed -> d) = g(embed) . d(embed), embed's AtP
    """
    model = s.model
    cfg, params = model.config, model.params
    frozen = "norm" in freeze or freeze is True or freeze == "all"
    grads = gradients(model, run, targets=s.readout.targets, position=s.position, freeze=freeze,
                      record=_sites(cfg, neurons)).record
    L = cfg.n_layers
    # each upstream layer's change as what it adds before the post-norm: heads dz W_O [N, T, D]; neurons [T, F]
    d_o = {l: np.einsum("tnh,nhd->ntd", deltas["head", l], params.get(l, "W_O"), optimize=True) for l in range(L)}
    blocks = []
    for l in range(L):
        blocks.append((l, "attn", slice(None)))
        if l == neurons:  # a split layer's neurons in chunks: their copies are [Z, chunk, T, D]
            blocks += [(l, "neuron", slice(a, a + NEURON_CHUNK)) for a in range(0, cfg.mlp_width_of(l), NEURON_CHUNK)]
            blocks += [(l, "experts", slice(None))] if cfg.moe else []
        else:
            blocks.append((l, "mlp", slice(None)))
        blocks += [(l, "ple", slice(None))] if cfg.ple else []
    out = []
    for l, kind, rows in blocks + [(L, "logits", slice(None))]:
        G = input_gradients(model, run, grads, l, kind, frozen_norm=frozen, rows=rows)  # [Z, n, T, D]
        Z, n = G.shape[:2]
        rs = _block_reads(cfg, l, kind, n)
        per_row = [None] * n
        for r in sorted(set(rs)):  # the rows that read at r (a consumer's q apart from its k, v)
            j = [i for i in range(n) if rs[i] == r]
            block = _columns(model, run, G[:, j].reshape(Z * len(j), *G.shape[2:]), r, deltas, neurons, frozen, d_o)
            if kind == "ple":  # embed's direct path into this layer's per-layer input
                block[:, 0] += np.einsum("ztd,td->z", _ple_direct(model, run, grads, l, frozen), deltas["embed"])
            block = block.reshape(Z, len(j), -1)
            for k, i in enumerate(j):
                per_row[i] = block[:, k].T  # [U(r), Z]
        out += per_row  # downstream-major, as edges()
    return s.sign * np.concatenate(out)


# ------------------------------------------------------------------------------------------------- one edge, patched


def parse_edge(config, label, neurons=None) -> tuple[tuple, tuple]:
    """An edge label `U->D` -> (upstream node, downstream node) as upstream_nodes / downstream_nodes give them;
    a label that names no edge of the graph is a one-line InputError."""
    up = {n[0]: n for n in upstream_nodes(config, neurons)}
    down = {n[0]: n for n in downstream_nodes(config, neurons)}
    u, sep, d = str(label).partition("->")
    if not sep or u not in up or d not in down:
        raise InputError(f"edge {label!r} is not an edge label: use U->D with U embed, L{{l}}H{{h}}, L{{l}}.mlp "
                         f"(or a neuron of the split layer) and D L{{l}}H{{h}}.q/.k/.v, L{{l}}.mlp or logits")
    _, kind, l, _ = down[d]
    if writes(config, up[u][1], up[u][2]) > reads(config, kind, l):
        why = (f" (layer {l} shares the keys and values of layer {config.kv_source(l)}: its .k and .v read the "
               f"residual before layer {config.kv_source(l)})" if kind in ("k", "v") and not config.has_kv(l) else "")
        raise InputError(f"edge {label!r} does not exist: {d} reads the residual stream before {u} writes into it"
                         + why)
    return up[u], down[d]


def residual_change(s: Setting, node, deltas) -> np.ndarray:
    """dr_u [T, D]: the change upstream node u alone makes to the residual stream where it writes (its replacement
    minus its base value, its own post-norm recomputed with the rest of its sublayer as recorded; before Gemma 4's
    layer_scalars, edge_patch's gain)."""
    cfg, params, rec = s.model.config, s.model.params, s.base.record
    _, kind, l, i = node
    if kind == "embed":
        return -deltas["embed"]
    if kind in ("mlp", "ple"):
        return -deltas[kind, l]
    b = f"blocks.{l}."
    if cfg.moe and kind in ("neuron", "expert"):  # a split MoE layer: through both of its post-norms, then ln2_post
        dense, experts = rec[b + "mlp.dense"], rec[b + "moe.out"]
        if kind == "neuron":
            change = -deltas["neuron", l][:, i][:, None] * params.get(l, "W_down")[i][None]
            dense = _norm(s.model, rec[b + "mlp.down"] + change, params.get(l, "ln2_post1"))
        else:
            top, w = rec[b + "moe.topk.index"], rec[b + "moe.topk.weight"]
            we = (w * (top == i)).sum(axis=1)  # [T]
            experts = _norm(s.model, rec[b + "moe.down"] - we[:, None] * deltas["expert", l][:, i],
                            params.get(l, "ln2_post2"))
        return _norm(s.model, dense + experts, params.get(l, "ln2_post")) - rec[b + "mlp.out"]
    if kind == "head":
        change = -deltas["head", l][:, i] @ params.get(l, "W_O")[i]  # [T, D]
        pre, post = "attn.o_proj", "ln1_post"
    else:
        change = -deltas["neuron", l][:, i][:, None] * params.get(l, "W_down")[i][None]
        pre, post = "mlp.down", "ln2_post"
    if not cfg.post_norms:
        return change
    before, w = rec[b + pre], params.get(l, post)
    return _norm(s.model, before + change, w) - _norm(s.model, before, w)


def edge_patch(s: Setting, label, neurons=None, *, deltas=None) -> np.ndarray:
    """The exact effect of patching one edge (module docstring): sign * (m(base) - m(edge patched)) [Z]."""
    model = s.model
    cfg, params = model.config, model.params
    u, (_, kind, l, n) = parse_edge(cfg, label, neurons)
    deltas = upstream_changes(s, neurons) if deltas is None else deltas
    dr = residual_change(s, u, deltas) * gain(cfg, params, max(u[2], 0), reads(cfg, kind, l))
    L = cfg.n_layers
    b = f"blocks.{l}."
    src = cfg.kv_source(l) if kind in PATHS else l
    bs = f"blocks.{src}."
    ple = None
    if kind == "ple" and u[1] == "embed":  # the embedding's direct path: ple_l from the patched embedding
        d0 = residual_change(s, u, deltas)
        ple = model.run(s.base.tokens, edit=lambda name, v, r: v + d0 if name == "embed" else v,
                        record=["ple.input"]).record["ple.input"]

    def normed(record, site, layer, norm):  # the input copy of d, normalised by d's own input norm
        return _norm(model, record[site] + dr, params.get(layer, norm))

    def edit(name, value, record):
        if kind == "logits" and name == f"blocks.{L - 1}.resid_post":
            return value + dr
        if kind in PATHS and name == b + {"q": "attn.q_pre", "k": "attn.scores", "v": "attn.z"}[kind]:
            value = value.copy()
            if kind == "q":
                value[:, n] = normed(record, b + "resid_pre", l, "ln1") @ params.get(l, "W_Q")[:, n]
                return value
            h = normed(record, bs + "resid_pre", src, "ln1")  # the producer's residual for a KV-sharing consumer
            j = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(src))[n]
            if kind == "v":
                W = params.get(src, "W_K" if cfg.k_eq_v_at(src) else "W_V")
                v = h @ W[:, j]
                v = _norm(model, v, None) if cfg.gemma4 else v  # Gemma 4's v_norm: no weight
                value[:, n] = record[b + "attn.pattern"][n] @ v
            else:  # head n's own keys: its kv head's projection of the copy, k norm (Gemma 3, 4) and RoPE
                k = (h @ params.get(src, "W_K")[:, j])[:, None]  # [S, 1, H]
                if cfg.qk_norm:
                    k = _norm(model, k, params.get(src, "k_norm"))
                theta, scale = cfg.rope_of(src)
                cos, sin = ops.rope_tables(np.arange(len(k)) / scale, cfg.head_dim_of(src), theta, model.dtype,
                                           cfg.rope_partial_of(src))
                window = cfg.sliding_window if cfg.is_sliding(l) else None
                value[n] = ops.attention_scores(record[b + "attn.q"][:, [n]], ops.rope(k, cos, sin),
                                                cfg.query_pre_attn_scalar ** -0.5, window)[0]
            return value
        if kind == "mlp" and cfg.gemma4:  # every reader of resid_mid in the FFN sees the copy; the skip does not
            if name == b + "resid_mid":
                return value + dr
            if name == b + "resid_mlp":
                return (record[b + "resid_pre"] + record[b + "attn.out"]) + record[b + "mlp.out"]
            return value
        if kind == "experts":  # the router and ln2_moe see the copy; ln2 (the dense neurons) and the skip do not
            if name == b + "resid_mid":
                return value + dr
            if name in (b + "ln2.scale", b + "ln2.out", b + "resid_mlp"):
                clean = record[b + "resid_pre"] + record[b + "attn.out"]  # resid_mid as the forward adds it
                if name == b + "ln2.scale":
                    return ops.rms_scale(clean, eps=cfg.rms_norm_eps)
                if name == b + "ln2.out":
                    return ops.rms_apply(clean, record[b + "ln2.scale"], params.get(l, "ln2"), cfg.norm_offset)
                return clean + record[b + "mlp.out"]
            return value
        if kind == "mlp" and name == b + "ln2.out":
            return normed(record, b + "resid_mid", l, "ln2")
        if kind == "neuron" and name in (b + "mlp.gate", b + "mlp.up"):
            value = value.copy()
            W = params.get(l, "W_gate" if name.endswith("gate") else "W_up")
            value[:, n] = normed(record, b + "resid_mid", l, "ln2") @ W[:, n]
            return value
        if kind == "ple":  # the per-layer input's gate reads the copy of resid_mlp; the skip does not
            if name == b + "resid_mlp":
                return value + dr
            if name == b + "ple.act" and ple is not None:
                return ops.gelu_tanh(record[b + "ple.gate"]) * ple[:, l]
            if name == b + "resid_post":
                clean = record[b + "resid_mid"] + record[b + "mlp.out"]  # resid_mlp as the forward adds it
                return (clean + record[b + "ple.out"]) * params.get(l, "layer_scalar")
        return value

    first = L - 1 if kind == "logits" else l
    rec = model.run(s.base.tokens, edit=edit, resume=(first, s.base.record),
                    record=everything_but(cfg, ("logits", "logits_uncapped"))).record
    readings = Readings(s)
    return s.sign * (readings.of_record(s.base.record)[0] - readings.of_record(rec)[0])
