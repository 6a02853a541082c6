"""Attribution graphs in the neuron basis (exact, no error nodes) or a transcoder basis (exact, with error and bias
nodes).

**Nodes** (circuit-tracer's order): MLP neurons (l, t, n), remainder nodes (l, t) when not every neuron is explored,
token embeddings (t), logits. A neuron's value is act = gelu(gate) up, its input is up = ln2.out . W_up[:, n]
with the ln2 scale frozen; an embedding's output is embed[t] = E[token] sqrt(D); a logit's input is its readout.

**Edges** are direct linear effects under the full freeze: every norm scale, attention pattern and gelu(gate) factor
held at the run's values (gradients.FREEZABLE), and every other MLP held (a path through another neuron is two
edges of the graph, not one). Under that freeze Gemma has no biases and is linear, so

    input_i = sum_j A_ij,     A_ij = a_j (d_j . g_i(site_j))        exactly (float64 1e-10)

with a_j the source's value, d_j its output vector at its site (W_down[n] through the frozen post-norm for a
neuron, embed[t] for an embedding) and g_i the gradient of target i's input, from one backward pass of the gradients
package (gradients.backward, frozen, every MLP and the attention after the target's layer dropped) that computes
many targets' rows of one layer at once: sorted by position, each pass over positions 0 .. its last row's t only
(g_i is exactly zero after the target's position), as many rows per pass as ROWS_BYTES allows (_Context.row_passes).
The passes of one exploration step, and the exact rows' passes, are independent: `threads` of them run at once in
worker threads (_each_pass), the same values to the bit, the results kept in the serial order.
Only the explored sources' columns are formed: a remainder takes its layer's whole share minus theirs. Attention
lives on the edges: an edge sums the paths through every head of every layer between its ends (edge_heads splits it
per head and source token).

**What the freeze leaves out**, by construction: the gate path (a neuron's input changes gelu(gate) too; the graph
reads only its up projection), and the query/key path (a source changes where later heads look; the graph holds
every pattern). Both are second-order in circuit-tracer's sense too, which detaches the same factors.

**The transcoder basis** (transcoders=, graphs.transcoders): each layer's MLP output mlp.out[l] (after Gemma 2/3's
post-norm, TransformerLens' hook_mlp_out) is split exactly as

    mlp.out[l, t] = sum_f act[l, t, f] W_dec[f] + b_dec + h[l, t] W_skip + err[l, t]

with h = resid_mid c the transcoder's input (c: 1, 1/s_ln2 or (1 + w_ln2)/s_ln2 by its hook, the scale frozen),
act = gate pre, pre = h W_enc + b_enc, the 0/1 gate frozen at the run's value (JumpReLU, ReLU, TopK alike), and
the error err = mlp.out - the reconstruction, a constant under the freeze. Nodes: the active features (act != 0;
positions < zero_positions are zero, circuit-tracer's BOS rule), remainders (unexplored active features), one
error node and two bias nodes (b_dec, written at mlp.out[l, t]; b_enc, read by the features of (l, t)) per (layer,
position), embeddings, logits. A feature's input is pre = u . resid_mid_l[t] + b_enc[f] with u = W_enc[:, f] c[t]:
its row holds the b_enc edge, and a_f d_f with d_f = W_dec[f] at mlp.out; the skip path h W_skip is linear and is
carried on the edges like attention (gradients.backward's linear_mlp). So every row still sums to its input exactly;
the freeze now also leaves out how a feature's gate would move with its input.

**Explored neurons.** With more neurons (active features) than `max_nodes`, they are explored in influence order as
circuit-tracer explores its features: the logit rows first, then repeatedly the unexplored ones of highest influence
through the rows computed so far (queues of update_interval x batch_size), until max_nodes are explored. The
exploration ranks by each row's `explore_k` largest |edges| (its normaliser is the row's exact |A_i.| sum, so
truncation only lowers an influence). The final rows are then recomputed exactly over the explored ones; what the
unexplored ones of layer l at position t send to a row is one remainder node {l}_-1_{t} (circuit-tracer's
error-node slot; {l}_-4_{t} in the transcoder basis, where the error node has that id), so every row still sums to
its input.
**Gemma 4** (graphs.gemma4): the neurons are each layer's dense neurons (its own width), the selected experts'
neurons (routing frozen, its weight on their output vectors) and the per-layer-input neurons, with a PLE token node
per layer and position for the per-layer input's token-identity piece; _Context hands them to graphs.gemma4.
Axis letters as in ops.py; Z target rows of one backward pass.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gradients.backward import FREEZABLE, Seed, _layer_source, backward
from refprism.graphs import gemma4 as _g4
from refprism.graphs import prune as _prune
from refprism.graphs import transcoders as _tc
from refprism.model import Run

KINDS = ("neuron", "feature", "remainder", "error", "bias", "embed", "logit",
         "expert", "ple", "ple_token")  # the last three: Gemma 4's (graphs.gemma4)
BIAS_DEC, BIAS_ENC = -2, -3  # a bias node's index: the decoder's b_dec, the encoder's b_enc
ROWS_BYTES = 1 << 30  # one backward pass's rows at most take about this much memory (_Context.per_pass)


@dataclass
class Graph:
    """An attribution graph: nodes in circuit-tracer's order, the adjacency as sparse rows.

    kind [N] (KINDS), layer [N] (embed -1, logit L), index [N] (neuron id, token id; -1 for a remainder; Gemma 4:
    an expert neuron e * d_expert + i, a PLE neuron q, a PLE token gemma4.PLE_TOKEN),
    position [N], activation [N] (neurons: act; logits: the readout; else nan), input [N] (neurons: up, logits:
    the readout; nan for sources). rows, cols, values [E]: A[rows, cols] = values, target <- source.
    logit_weights [n_logits]: the logit probabilities (or 1/Z for given targets) that seed the influence.
    """

    model: object = field(repr=False)
    run: Run = field(repr=False)
    prompt: str
    kind: np.ndarray
    layer: np.ndarray
    index: np.ndarray
    position: np.ndarray
    activation: np.ndarray
    input: np.ndarray
    rows: np.ndarray = field(repr=False)
    cols: np.ndarray = field(repr=False)
    values: np.ndarray = field(repr=False)
    logit_weights: np.ndarray
    logit_labels: list
    logit_u: np.ndarray = field(repr=False)  # [n_logits, D] the readout rows at the final residual
    readout: str  # "demeaned" (circuit-tracer's) or "targets"
    explored: int  # neurons explored (= max_nodes or all)
    n_neurons: int  # neurons in the model x positions
    passes: int  # backward passes
    batch_rows: int = 0  # the largest number of rows of one pass
    read_at: int = -1  # the readout's position p
    basis: str = "neurons"  # or "transcoders"
    transcoders: object = field(default=None, repr=False)  # graphs.transcoders.Transcoders (the model's dtype)
    zero_positions: int = 1  # transcoders: features at positions < zero_positions are zero (graph()'s argument)

    @property
    def counts(self) -> tuple:
        """circuit-tracer's groups (features, errors, tokens, logits): neurons or features; remainders and error
        nodes; bias nodes and embeddings (the sources that are exact parts of the replacement); logits."""
        c = {k: int((self.kind == k).sum()) for k in KINDS}
        return (c["neuron"] + c["feature"] + c["expert"] + c["ple"], c["remainder"] + c["error"],
                c["bias"] + c["ple_token"] + c["embed"], c["logit"])

    @property
    def n(self) -> int:
        return len(self.kind)

    @property
    def weights(self) -> np.ndarray:
        w = np.zeros(self.n)
        w[self.kind == "logit"] = self.logit_weights
        return w

    def label(self, i) -> str:
        """refprism's label of node i: L{l}N{n}@{t}, L{l}F{f}@{t}, L{l}.rest@{t}, L{l}.err@{t}, L{l}.b_dec@{t},
        L{l}.b_enc@{t}, E@{t}, the logit's label; Gemma 4's graphs.gemma4.label."""
        k, l, t = self.kind[i], int(self.layer[i]), int(self.position[i])
        if k in _g4.NEW_KINDS:
            return _g4.label(self.model.config, k, l, int(self.index[i]), t)
        if k == "neuron":
            return f"L{l}N{int(self.index[i])}@{t}"
        if k == "feature":
            return f"L{l}F{int(self.index[i])}@{t}"
        if k == "remainder":
            return f"L{l}.rest@{t}"
        if k == "error":
            return f"L{l}.err@{t}"
        if k == "bias":
            return f"L{l}.{'b_dec' if self.index[i] == BIAS_DEC else 'b_enc'}@{t}"
        if k == "embed":
            return f"E@{t}"
        return self.logit_labels[int(i - np.flatnonzero(self.kind == "logit")[0])]

    def incoming(self, i):
        """(sources [k], edges [k]) of node i."""
        m = self.rows == i
        return self.cols[m], self.values[m]

    def pruned(self, node_threshold=0.8, edge_threshold=0.98) -> _prune.Pruned:
        """circuit-tracer's pruning of this graph (prune.prune): node and edge masks, cumulative influence."""
        return _prune.prune(self.rows, self.cols, self.values, self.weights, self.counts,
                            node_threshold=node_threshold, edge_threshold=edge_threshold)

    def scores(self) -> tuple[float, float]:
        """circuit-tracer's (replacement, completeness), the remainder nodes in the error nodes' role with the
        error nodes: both 1 in the neuron basis when every neuron is explored (no error and no remainder)."""
        return _prune.scores(self.rows, self.cols, self.values, self.weights, self.counts)

    def row_sums(self) -> np.ndarray:
        """sum_j A_ij for every node [N] (0 for the sources)."""
        return np.bincount(self.rows, weights=self.values, minlength=self.n)


def graph(model, prompt, *, position=-1, targets=None, versus=(), max_nodes=7500, batch_size=256,
          update_interval=4, explore_k=4096, desired_prob=0.95, max_logits=10, transcoders=None,
          zero_positions=1, threads=1) -> Graph:
    """The attribution graph of the prediction at `position`, in the neuron basis or the transcoders' (the module
    docstring).

    targets, versus: None for circuit-tracer's logit nodes (top tokens by probability until desired_prob
             cumulative, at most max_logits; each read through the demeaned unembedding E[t] - mean_v E[v], pre-cap);
             or the prisms' targets and foils (rows E[t] - mean_f E[f], pre-cap; each weighted 1/Z)
    max_nodes: neurons (features) explored at most (influence order); batch_size: rows of one backward pass at most
             (fewer at long prompts: ROWS_BYTES bounds a pass's memory)
    transcoders: None (the neurons), or a path / graphs.transcoders.Transcoders: one per layer, replacing the MLPs
    zero_positions: with transcoders, the features at positions < zero_positions are zero (circuit-tracer's BOS
             rule): the whole MLP output there is the error node's
    threads: backward passes run at once, each in a worker thread (the rows of an exploration step and the exact
             rows are independent): the same graph bit for bit for any count; the passes' memory is up to threads x
             ROWS_BYTES. Give each thread one BLAS thread (OPENBLAS_NUM_THREADS=1, docs/performance.md)
    Math:   rows of the targets at (l, t): u_n = W_up[:, n] (1 + w_ln2) / s_ln2[t] at resid_mid_l[t];
            logits: u = (E[t] - mean) (1 + w_final) / s_final[p] at the final residual
    Shapes: -> Graph with N nodes and E edges
    """
    cfg = model.config
    if cfg.gemma4 and transcoders is not None:  # read from the config: refused before any weight is read
        raise InputError("transcoder graphs do not take Gemma 4 (no Gemma 4 transcoders are read); its neuron-basis "
                         "graph does (drop transcoders)")
    if max_nodes < 0 or batch_size < 1 or update_interval < 1 or explore_k < 1:
        raise InputError("max_nodes >= 0, batch_size, update_interval and explore_k >= 1 are required")
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 1:
        raise InputError(f"threads {threads!r}: the backward passes run at once, one per thread: give a whole "
                         "number, 1 or more")
    if zero_positions < 0:
        raise InputError(f"zero_positions {zero_positions}: give 0 or more")
    if transcoders is not None:
        if not isinstance(transcoders, _tc.Transcoders):
            transcoders = _tc.read_transcoders(transcoders)
        transcoders.check(cfg)
        transcoders = transcoders.as_dtype(model.dtype)
    run = prompt if isinstance(prompt, Run) else model.run(prompt)
    if run.record.selection is not None:
        raise InputError("a graph reads every site of the run: run the prompt with a full record")
    text = prompt if isinstance(prompt, str) else "".join(run.pieces)
    p = P.resolve_position(run, position)
    ctx = _Context(model, run, p, batch_size, transcoders, zero_positions, threads=int(threads))
    u, labels, weights, kind, ids = _logit_rows(model, run, p, targets, versus, desired_prob, max_logits)
    total = int(ctx.active.sum())  # positions after p never reach the readout
    if max_nodes >= total:
        explored = ctx.active.copy()
    else:
        explored = _explore(ctx, u, weights, max_nodes, update_interval, explore_k)
    g = _assemble(ctx, text, explored, u, labels, weights, (kind, ids))
    g.zero_positions = zero_positions
    return _g4.finish(g, ctx) if cfg.gemma4 else g


# ------------------------------------------------------------------------------------------------- logit nodes


def _logit_rows(model, run, p, targets, versus, desired_prob, max_logits):
    """The logit nodes' readout rows u [Z, D] at the final residual, labels, weights and the readout's kind.

    Math:   circuit-tracer: probs = softmax(capped logits[p]); the top tokens until their cumulative probability
            reaches desired_prob (at most max_logits); u_t = (E[t] - mean_v E[v]) (1 + w_final) / s_final[p]
            targets: u_z = (E[t_z] - mean_f E[f]) (1 + w_final) / s_final[p]  (prisms.logits_readout)
    """
    cfg, params = model.config, model.params
    if targets is None:
        if versus:
            raise InputError("versus needs targets")
        z = run.record["logits"][p] - run.record["logits"][p].max()
        probs = np.exp(z) / np.exp(z).sum()
        top = np.argpartition(-probs, min(max_logits, len(probs) - 1))[:max_logits]
        top = top[np.argsort(-probs[top], kind="stable")]
        cut = int(np.searchsorted(np.cumsum(probs[top]), desired_prob)) + 1
        ids = top[: min(cut, max_logits)]
        mean = _mean_embedding(params, cfg.vocab_size)
        rows = params.embed_rows(ids) - mean[None]
        scale = P.gain(model, params.ln_final) / run.record["ln_final.scale"][p]  # 1 + w; w on Gemma 4
        labels = [f'Output "{model.piece(int(i))}" (p={probs[i]:.3f})' for i in ids]
        return rows * scale, labels, probs[ids], "demeaned", ids
    readout = P.logits_readout(model, run, targets, position=p, versus=versus)
    ids = np.array([t.id for t in readout.targets.targets])
    Z = len(readout.u)
    return readout.u, readout.targets.labels, np.full(Z, 1.0 / Z), "targets", ids


def _mean_embedding(params, V, chunk=16384) -> np.ndarray:
    """mean_v E[v] [D], summed in row chunks (never the whole E converted at once in low-memory mode)."""
    total = None
    for a in range(0, V, chunk):
        s = params.embed_rows(np.arange(a, min(V, a + chunk))).sum(axis=0)
        total = s if total is None else total + s
    return total / V


# ------------------------------------------------------------------------------------------------- rows


class _Context:
    """The run's values the rows read, and the backward's source of forward values, in one basis: the neurons, or
    the transcoders' features (tc: graphs.transcoders.Transcoders, in the model's dtype)."""

    def __init__(self, model, run, p, batch_size, tc=None, zero_positions=1, rows_bytes=None, threads=1):
        self.model, self.run, self.p, self.batch, self.threads = model, run, p, batch_size, threads
        self.rows_bytes = ROWS_BYTES if rows_bytes is None else rows_bytes
        self._total = {}
        self._lock = threading.Lock()  # total's cache, filled from the worker threads
        self.cfg = model.config
        self.layers = _layer_source(model, run, p, held=True)  # each site resolved once for all the passes
        self.passes = 0
        self.most = 0
        self.T = p + 1
        self.tc = tc
        rec = run.record
        L = self.cfg.n_layers
        if tc is None:
            self.F = self.cfg.d_mlp
            self.act = [np.asarray(rec[f"blocks.{l}.mlp.act"]) for l in range(L)]  # once: a Lazy
            self.inp = [np.asarray(rec[f"blocks.{l}.mlp.up"]) for l in range(L)]  # recomputes per read
            self.post = [(P.gain(model, model.params.get(l, "ln2_post"))[None, :]
                          / rec[f"blocks.{l}.ln2_post.scale"][:, None])
                         if self.cfg.post_norms else None for l in range(L)]
            self.active = np.ones((L, self.T, self.F), bool)
            if self.cfg.gemma4:  # experts, per-layer inputs, per-layer widths: graphs.gemma4's flat slots
                _g4.setup(self)
            return
        self.F = tc.layers[0].d_sae
        self.c, self.act, self.inp, self.err = [], [], [], []
        for l, t_l in enumerate(tc.layers):
            c, pre, act, recon = _transcode(model, rec, l, t_l, tc.input_hook, zero_positions)
            self.c.append(c)
            self.inp.append(pre)
            self.act.append(act)
            self.err.append(np.asarray(rec[f"blocks.{l}.mlp.out"]) - recon)  # constant under the freeze
        self.active = np.stack([a[: self.T] != 0 for a in self.act])

    def _linear_mlp(self, l):
        """The skip transcoders' h W_skip of layers < l as the backward's linear MLPs: g -> (g W_skip^T) c."""
        if self.tc is None or not self.tc.skip:
            return None
        return {m: (lambda g, W=self.tc.layers[m].W_skip, c=self.c[m]: (g @ W.T) * c[None])
                for m in range(l) if self.tc.layers[m].W_skip is not None}

    def per_pass(self, l, S) -> int:
        """Rows of one backward pass at layer l truncated to S positions: the batch size, or fewer where the pass's
        working set would exceed rows_bytes: per row the kept gradients (embed and l mlp.out sites, [S, D] each),
        the backward's own few [S, D] arrays, and one source layer's dense edges [S, F] while exploring (the
        edges, their |.|, and argpartition's int64 indices)."""
        D, b = self.cfg.d_model, np.dtype(self.model.dtype).itemsize
        row = S * ((l + 6) * D * b + self.F * (2 * b + 16))
        return int(max(1, min(self.batch, self.rows_bytes // row)))

    def row_passes(self, l, t, u) -> list:
        """The frozen backward passes of target rows u [Z, D] at (layer l, positions t [Z], nondecreasing); l = L:
        the final residual. Each pass takes the next rows (as many as per_pass allows) and runs over positions
        0 .. S-1 only, S = its last row's position + 1 (gradients.backward's upto: a row at t reads no later
        position, so nothing is left out). The plan depends on the rows alone (never on ctx.threads).

        Returns the plan [(a, b, S, grads)], counted in passes and most: rows a .. b-1, and grads() the pass itself
        (run when called, in any thread; _each_pass runs them), giving g["embed"] [z, S, D] and g[m] [z, S, D] the
        gradient at mlp.out of each layer m < l. Row z's gradient is exactly zero at positions > t[z] (causal).
        Math:   g = the frozen gradient of u . resid_mid_l[t] (MLPs dropped, attention after l dropped; a skip
                transcoder's W_skip carried as the MLP's linear stand-in)
        """
        if isinstance(u, _g4.Targets):  # Gemma 4's neuron targets (graphs.gemma4.target_rows)
            return _g4.row_passes(self, l, t, u)
        plan, Z, a = [], len(u), 0
        while a < Z:
            z = self.per_pass(l, int(t[min(a + self.batch, Z) - 1]) + 1)
            b = min(a + z, Z)
            S = int(t[b - 1]) + 1
            plan.append((a, b, S, partial(self._grads, l, t[a:b], u[a:b], S)))
            self.passes += 1
            self.most = max(self.most, b - a)
            a = b
        return plan

    def _grads(self, l, t, u, S) -> dict:
        """One pass of row_passes: rows u [z, D] at positions t [z] of layer l, over positions 0 .. S-1."""
        L = self.cfg.n_layers
        drop = frozenset({(m, "mlp") for m in range(L)} | {(m, "attn") for m in range(l + 1, L)})
        keep = ["embed"] + [f"blocks.{m}.mlp.out" for m in range(l)]
        g = backward(self.model, self.layers, Seed(None, u, {}), t, freeze=frozenset(FREEZABLE), drop=drop,
                     keep=keep, linear_mlp=self._linear_mlp(l), upto=S)
        return {-1: g["embed"], **{m: g[f"blocks.{m}.mlp.out"] for m in range(l)}}

    def embed_edges(self, g, S):
        """A[z, E@s] = embed[s] . g_embed[z, s]  [z, S]."""
        return np.einsum("zsd,sd->zs", g[-1], self.run.record["embed"][:S])

    def extra_edges(self, m, g_out):
        """Transcoders: A[z, err(m, s)] = err_m[s] . g_m[z, s] and A[z, dec(m, s)] = b_dec_m . g_m[z, s]  [z, S]."""
        S = g_out.shape[1]
        return np.einsum("zsd,sd->zs", g_out, self.err[m][:S]), g_out @ self.tc.layers[m].b_dec

    def written(self, m, g_out):
        """The gradient where layer m's features write: mlp.out (transcoders), or mlp.down through the frozen
        post-norm (neurons on Gemma 2/3): [z, S, D]."""
        if self.cfg.gemma4:  # graphs.gemma4.out_vector carries the frozen norms (each kind its own)
            return g_out
        if self.tc is None and self.post[m] is not None:
            return g_out * self.post[m][None, : g_out.shape[1]]
        return g_out

    def out_vector(self, m, s, f):
        """W_down[f] (W_dec[f]) and act_m[s, f]: the explored sources' output vectors [k, D] and values [k]."""
        if self.cfg.gemma4:
            return _g4.out_vector(self, m, s, f)
        W = self.tc.layers[m].W_dec if self.tc is not None else self.model.params.get(m, "W_down")
        return W[f], self.act[m][s, f]

    def total(self, m):
        """sum_f act_m[s, f] W[f] [T, D]: every neuron (feature) of layer m at once, what its remainder node is
        the unexplored part of (cached)."""
        with self._lock:  # one thread computes it, the other waits: computed once
            if self.cfg.gemma4:
                return _g4.total(self, m)
            if m not in self._total:
                W = self.tc.layers[m].W_dec if self.tc is not None else self.model.params.get(m, "W_down")
                self._total[m] = self.act[m][: self.T] @ W
            return self._total[m]

    def feature_edges(self, m, g_out):
        """[Z, S, D] gradients at mlp.out of layer m -> [Z, S, F] edges from its neurons (post-norm frozen) or its
        transcoder's features (written at mlp.out itself)."""
        if self.cfg.gemma4:
            return _g4.feature_edges(self, m, g_out)
        S = g_out.shape[1]
        W = self.tc.layers[m].W_dec if self.tc is not None else self.model.params.get(m, "W_down")
        out = self.written(m, g_out) @ W.T
        out *= self.act[m][None, :S]
        return out

    def feature_rows(self, l, t, n):
        """u [Z, D] of neurons n of layer l at position t: u . resid_mid_l[t] = up[t, n] (ln2 scale frozen); of
        features n: u . resid_mid_l[t] = pre[t, n] - b_enc[n], u = W_enc[:, n] c_l[t] (c: _transcode)."""
        if self.cfg.gemma4:
            return _g4.feature_rows(self, l, t, n)
        if self.tc is not None:
            return (self.tc.layers[l].W_enc[:, n] * self.c[l][t][:, None]).T
        params, rec = self.model.params, self.run.record
        scale = (1 + params.get(l, "ln2")) / rec[f"blocks.{l}.ln2.scale"][t]
        return (params.get(l, "W_up")[:, n] * scale[:, None]).T

    def target_rows(self, l, t, n):
        """u [Z, D] of the neurons (features) n [Z] of layer l at positions t [Z] (nondecreasing): feature_rows
        position by position."""
        if self.cfg.gemma4:
            return _g4.target_rows(self, l, t, n)
        return np.concatenate([self.feature_rows(l, int(s), n[t == s]) for s in np.unique(t)])


def input_factor(model, rec, l, input_hook) -> np.ndarray:
    """The transcoder's input factor c of layer l: its input is h = resid_mid c, with the ln2 scale frozen.

    Math:   c = 1 (resid_mid), 1 / s_ln2 (normalized), (1 + w_ln2) / s_ln2 (ln2.out; P.gain: w on Gemma 4)
    Shapes: -> c [T, D] (a broadcast view for the last two)
    """
    x = rec[f"blocks.{l}.resid_mid"]
    T, D = x.shape
    if input_hook == "resid_mid":
        return np.ones((T, D), x.dtype)
    s = np.asarray(rec[f"blocks.{l}.ln2.scale"]).reshape(T, 1)
    w = P.gain(model, model.params.get(l, "ln2")) if input_hook == "ln2.out" else np.ones(D, x.dtype)
    return np.broadcast_to(w[None, :] / s, (T, D))


def _transcode(model, rec, l, tc, input_hook, zero_positions):
    """One layer's transcoder on the run: the input factor c, pre-activations, activations, reconstruction.

    Math:   h = resid_mid c,  c = 1 (resid_mid), 1 / s_ln2 (normalized), (1 + w_ln2) / s_ln2 (ln2.out)
            pre = h W_enc + b_enc,  act = gate(pre) pre (0 at positions < zero_positions: circuit-tracer's BOS),
            recon = act W_dec + b_dec (+ h W_skip)
    Shapes: -> c [T, D], pre [T, F], act [T, F], recon [T, D]
    """
    x = np.asarray(rec[f"blocks.{l}.resid_mid"])
    c = input_factor(model, rec, l, input_hook)
    h = x * c
    pre = h @ tc.W_enc + tc.b_enc
    gate = tc.gate(pre)
    gate[:zero_positions] = 0
    act = gate * pre
    recon = act @ tc.W_dec + tc.b_dec
    if tc.W_skip is not None:
        recon = recon + h @ tc.W_skip
    return c, pre, act, recon


# ------------------------------------------------------------------------------------------------- exploration


def _explore(ctx, u_logits, weights, max_nodes, update_interval, explore_k) -> np.ndarray:
    """circuit-tracer's influence-ordered exploration: which neurons get rows (the module docstring).

    Shapes: -> explored [L, T, F] bool
    """
    cfg = ctx.cfg
    L, T, F = cfg.n_layers, ctx.T, ctx.F
    n_flat = L * T * F
    explored = np.zeros(n_flat, bool)
    inactive = ~ctx.active.ravel()  # transcoder features that are zero in the run: no node, nothing to explore
    max_nodes = min(max_nodes, int((~inactive).sum()))
    row_node, row_w, ent_row, ent_col, ent_val = [], [], [], [], []

    def ranked(l, a, b, S, g):
        """One pass's rows a .. b-1 of layer l: each row's explore_k largest |edges| over the features (flat
        columns [z, k]) and their values normalised by the row's exact |row| sum; one source layer's dense edges
        at a time."""
        Z = b - a
        absum = np.abs(ctx.embed_edges(g, S)).sum(axis=1)
        c = v = None  # each row's explore_k largest |edges| so far: flat columns, values [Z, k]
        for m in range(l):
            if ctx.tc is not None:  # error and bias nodes: in the row's sum, never explored
                for e in ctx.extra_edges(m, g[m]):
                    absum += np.abs(e).sum(axis=1)
            e = ctx.feature_edges(m, g[m]).reshape(Z, -1)  # [Z, S*F], column s * F + n
            np.abs(e, out=e)
            absum += e.sum(axis=1)
            c, v = _largest(c, v, e, m * T * F, explore_k)
            del e
        del g
        return c.astype(np.int32), (v / np.maximum(absum, 1e-10)[:, None]).astype(np.float32)  # a ranking only

    def add(jobs):
        """The rows of each job (l, t, u, nodes, w0): targets u [Z, D] at (l, positions t [Z], nondecreasing),
        their node ids and logit weights; every pass of every job at once (_each_pass), kept in the jobs' order."""
        plan = [(a, b, S, grads, job) for job in jobs for a, b, S, grads in ctx.row_passes(*job[:3])]
        done = _each_pass(ctx, [(grads, partial(ranked, job[0], a, b, S)) for a, b, S, grads, job in plan])
        for (a, b, _, _, (_, _, _, nodes, w0)), (c, v) in zip(plan, done):
            first = len(row_node)
            row_node.extend(nodes[a:b])
            row_w.extend(w0[a:b])
            ent_row.append(np.repeat(np.arange(first, first + b - a, dtype=np.int32), c.shape[1]))
            ent_col.append(c.ravel())
            ent_val.append(v.ravel())

    add([(L, np.full(len(u_logits), ctx.p), u_logits, [-1] * len(u_logits), list(weights))])
    n_done = 0
    while n_done < max_nodes:
        infl = _partial_influence(np.array(row_node), np.array(row_w), np.concatenate(ent_row),
                                  np.concatenate(ent_col), np.concatenate(ent_val), n_flat)
        infl[explored | inactive] = -np.inf
        q = min(update_interval * ctx.batch, max_nodes - n_done)
        pick = np.argpartition(-infl, q - 1)[:q] if q < n_flat else np.flatnonzero(~explored & ~inactive)
        pick = pick[np.argsort(-infl[pick], kind="stable")]
        explored[pick] = True
        n_done += len(pick)
        jobs = []
        for l in np.unique(pick // (T * F)):
            if l == 0:  # layer 0's inputs come from the embeddings only: nothing to rank further
                continue
            nodes = np.sort(pick[pick // (T * F) == l])  # by (position, neuron)
            t_, n_ = np.divmod(nodes % (T * F), F)
            jobs.append((int(l), t_, ctx.target_rows(int(l), t_, n_), list(nodes), [0.0] * len(nodes)))
        add(jobs)
    return explored.reshape(L, T, F)


def _largest(c, v, e, first, k):
    """Each row's k largest values of its kept (c, v [Z, j]: flat columns, values; None at first) and of e [Z, n]
    (columns first .. first + n - 1): the same entries as one partition over all of them (which of equal values
    at the k-th is kept aside). Once a row keeps k, a value of e can enter only if it is >= the row's smallest
    kept one: those are found by one comparison (a few per row), not by partitioning e's n values again.
    Shapes: -> c [Z, min(k, j + n)] (int64), v [Z, min(k, j + n)]
    """
    Z, n = e.shape
    if v is None or v.shape[1] < k:
        kk = min(k, n)  # the k largest, selected from the end (no negated copy of e)
        idx = np.argpartition(e, n - kk, axis=1)[:, n - kk:] if kk < n else np.broadcast_to(np.arange(n), (Z, n))
        c_e, v_e = first + idx, np.take_along_axis(e, idx, axis=1)
        if v is None:
            return c_e, v_e
        c, v = np.concatenate([c, c_e], axis=1), np.concatenate([v, v_e], axis=1)
        if c.shape[1] > k:
            idx = np.argpartition(-v, k - 1, axis=1)[:, :k]
            c, v = np.take_along_axis(c, idx, axis=1), np.take_along_axis(v, idx, axis=1)
        return c, v
    hit = e >= v.min(axis=1)[:, None]
    for z in np.flatnonzero(hit.any(axis=1)):
        j = np.flatnonzero(hit[z])
        c_z, v_z = np.concatenate([c[z], first + j]), np.concatenate([v[z], e[z, j]])
        keep = np.argpartition(v_z, len(v_z) - k)[len(v_z) - k:]
        c[z], v[z] = c_z[keep], v_z[keep]
    return c, v


def _each_pass(ctx, tasks) -> list:
    """[work(a, b, S, grads())] for the tasks [(grads, work)] (a pass of row_passes and what reads it), in the
    tasks' order, ctx.threads of them at a time: each pass runs in one worker thread from start to end (NumPy's
    products and BLAS release the GIL), and its values do not depend on the thread or on the others, so the
    results are bit for bit the serial ones. With ctx.threads passes in flight the passes' memory is
    ctx.threads x ROWS_BYTES at most."""

    def one(task):
        grads, work = task
        return work(grads())

    if ctx.threads == 1 or len(tasks) < 2:
        return [one(task) for task in tasks]
    with ThreadPoolExecutor(min(ctx.threads, len(tasks))) as pool:
        return list(pool.map(one, tasks))


def _partial_influence(row_node, row_w, ent_row, ent_col, ent_val, n_flat, max_iter=128) -> np.ndarray:
    """circuit-tracer's compute_partial_influences over the rows computed so far.

    Math:   w_0 = the logit weights on the logit rows;  c_k[j] = sum_r w_k[r] Â_rj,  w_{k+1}[r] = c_k[node(r)]
            influence = sum_k c_k
    Shapes: rows R, entries E -> [n_flat]
    """
    w = row_w.astype(np.float64)
    total = np.zeros(n_flat)
    is_neuron = row_node >= 0
    node = np.where(is_neuron, row_node, 0)
    for _ in range(max_iter):
        c = np.bincount(ent_col, weights=ent_val * w[ent_row], minlength=n_flat)
        if not c.any():
            return total
        total += c
        w = np.where(is_neuron, c[node], 0.0)
    raise InputError("the exploration's influence did not converge")


# ------------------------------------------------------------------------------------------------- assembly


def _assemble(ctx, text, explored, u_logits, labels, weights, readout) -> Graph:
    """The exact rows of every explored feature and logit over the explored features, remainders, errors, biases
    and embeddings (the module docstring's order)."""
    model, run, cfg, tc = ctx.model, ctx.run, ctx.cfg, ctx.tc
    L, T, F = cfg.n_layers, ctx.T, ctx.F
    rec = run.record
    ll, tt, nn = np.nonzero(explored)  # sorted by (layer, position, feature)
    n_feat = len(ll)
    col = np.full((L, T, F), -1, np.int32)
    col[ll, tt, nn] = np.arange(n_feat)
    rem_lt = [(l, t) for l in range(L) for t in range(T) if (ctx.active[l, t] & ~explored[l, t]).any()]
    rem = {lt: n_feat + i for i, lt in enumerate(rem_lt)}
    lt_all = [(l, t) for l in range(L) for t in range(T)] if tc is not None else []
    err0 = n_feat + len(rem_lt)
    err = {lt: err0 + i for i, lt in enumerate(lt_all)}
    dec0 = err0 + len(lt_all)
    dec = {lt: dec0 + i for i, lt in enumerate(lt_all)}
    enc0 = dec0 + len(lt_all)
    enc = {lt: enc0 + i for i, lt in enumerate(lt_all)}
    emb0 = enc0 + len(lt_all)
    log0 = emb0 + T
    Z = len(u_logits)
    N = log0 + Z
    n_lt = len(lt_all)
    kind = np.array(["neuron" if tc is None else "feature"] * n_feat + ["remainder"] * len(rem_lt) + ["error"] * n_lt
                    + ["bias"] * (2 * n_lt) + ["embed"] * T + ["logit"] * Z)
    lt_l = [lt[0] for lt in lt_all]
    lt_t = [lt[1] for lt in lt_all]
    layer = np.concatenate([ll, [lt[0] for lt in rem_lt], lt_l, lt_l, lt_l, np.full(T, -1), np.full(Z, L)]).astype(int)
    position = np.concatenate([tt, [lt[1] for lt in rem_lt], lt_t, lt_t, lt_t, np.arange(T),
                               np.full(Z, ctx.p)]).astype(int)
    index = np.concatenate([nn, np.full(len(rem_lt), -1), np.full(n_lt, -1), np.full(n_lt, BIAS_DEC),
                            np.full(n_lt, BIAS_ENC), run.tokens[:T], readout[1]]).astype(int)
    x_final = rec[P.site_name(2 * L, L)][ctx.p]
    readout_values = u_logits @ x_final
    act = np.full(N, np.nan)
    act[:n_feat] = np.array([ctx.act[l][t, n] for l, t, n in zip(ll, tt, nn)]) if n_feat else []
    act[log0:] = readout_values
    inp = np.full(N, np.nan)
    inp[:n_feat] = np.array([ctx.inp[l][t, n] for l, t, n in zip(ll, tt, nn)]) if n_feat else []
    inp[log0:] = readout_values
    tasks = []  # (grads, work): every pass of every layer's rows, run by _each_pass

    def emit(targets, l, t, u, n=None):
        """The passes of the exact rows of `targets` [Z] at (l, positions t [Z], nondecreasing; node ids
        increasing), read u [Z, D] (_exact_rows: one pass's entries)."""
        for a, b, S, grads in ctx.row_passes(l, t, u):
            tasks.append((grads, partial(exact, targets[a:b], l, t[a:b], None if n is None else n[a:b], S)))

    def exact(tg, l, tz, n, S, g):
        """One pass's exact rows of targets tg [z] at (l, positions tz [z]): explored features, remainders,
        errors and biases of the layers below at positions <= tz, embeddings; features n of a transcoder also take
        their encoder bias b_enc[n]. Only the explored columns are formed: a remainder is the whole layer's share
        minus theirs, (sum_f act[s, f] W[f]) . g - sum_explored A. -> (first target, rows, cols, values), sorted
        by (row, col)."""
        R, C, V = [], [], []
        put = _Entries(R, C, V, tz)
        pos = np.arange(S)
        put(tg, emb0 + pos, ctx.embed_edges(g, S), pos)
        if n is not None and tc is not None:
            put(tg, np.array([[enc[l, int(s)]] for s in tz]), tc.layers[l].b_enc[n][:, None], tz[:, None])
        for m in range(l):
            gw = ctx.written(m, g[m])  # [z, S, D]
            s_, f_ = np.nonzero(col[m, :S] >= 0)
            W, act_ = ctx.out_vector(m, s_, f_)
            e = act_[None] * np.einsum("zkd,kd->zk", gw[:, s_], W)  # [z, k] the explored sources
            put(tg, col[m, s_, f_], e, s_)
            rem_s = np.array([s for s in range(S) if (m, s) in rem], int)
            if len(rem_s):
                whole = np.einsum("zsd,sd->zs", gw[:, rem_s], ctx.total(m)[rem_s])
                mine = np.zeros((len(tg), S), whole.dtype)
                np.add.at(mine, (slice(None), s_), e)
                put(tg, np.array([rem[m, int(s)] for s in rem_s]), whole - mine[:, rem_s], rem_s)
            if tc is not None:
                for e_x, nodes in zip(ctx.extra_edges(m, g[m]), (err, dec)):
                    put(tg, np.array([nodes[m, s] for s in range(S)]), e_x, pos)
        del g
        r, c_, v = (np.concatenate(x) for x in (R, C, V))
        order = np.lexsort((c_, r))
        return int(tg[0]), r[order].astype(np.int32), c_[order].astype(np.int32), v[order]

    emit(log0 + np.arange(Z), L, np.full(Z, ctx.p), u_logits)
    for l in range(L):
        sel = ll == l
        if sel.any():
            emit(col[l, tt[sel], nn[sel]], l, tt[sel], ctx.target_rows(l, tt[sel], nn[sel]), nn[sel])
    chunks = _each_pass(ctx, tasks)  # (first target, rows, cols, values): one per pass
    tasks.clear()
    chunks.sort(key=lambda c: c[0])  # targets of different passes are disjoint ranges: now sorted by (row, col)
    E = sum(len(c[1]) for c in chunks)
    rows_, cols_ = np.empty(E, np.int32), np.empty(E, np.int32)
    vals_ = np.empty(E, np.result_type(*[c[3].dtype for c in chunks]))
    at = 0
    while chunks:  # each pass's entries freed once copied: never the edges twice
        _, r, c_, v = chunks.pop(0)
        rows_[at: at + len(r)], cols_[at: at + len(r)], vals_[at: at + len(r)] = r, c_, v
        at += len(r)
    return Graph(model, run, text, kind, layer, index, position, act, inp, rows_, cols_, vals_,
                 np.asarray(weights, float), list(labels), u_logits,
                 readout[0], int(explored.sum()), int(ctx.active.sum()), ctx.passes, ctx.most, ctx.p,
                 "neurons" if tc is None else "transcoders", tc)


class _Entries:
    """Collects a pass's entries [z, k] whose source position `at` ([k] or [z, k]) is <= the row's position tz [z]
    (later sources reach no row: their exact zeros are not entries)."""

    def __init__(self, R, C, V, tz):
        self.R, self.C, self.V, self.tz = R, C, V, tz

    def __call__(self, node_rows, node_cols, values, at):
        ok = np.broadcast_to(np.asarray(at), values.shape) <= self.tz[:, None]
        self.R.append(np.broadcast_to(np.asarray(node_rows)[:, None], values.shape)[ok])
        self.C.append(np.broadcast_to(np.asarray(node_cols), values.shape)[ok])
        self.V.append(values[ok])


def edge_heads(g: Graph, target: int, source: int, layer: int, *, by_source=False):
    """One edge split over layer m's heads (and source tokens): skip + sum_h heads[h] = A[target, source].

    Math:   with the source alone propagated through the frozen model (every MLP held, x_j at resid_pre_m) and
            g_i the target's frozen gradient:  A_ij = g_i(resid_pre_m) . x_j(resid_pre_m)
              = g_i(resid_mid_m) . x_j(resid_pre_m)  +  sum_h g_i(z_m[., h]) . z_j[., h]
            z_j[tau, h] = sum_s pattern[h, tau, s] v_j[s, kv(h)]  (by_source: the [N, S] terms of that sum)
            In the transcoder basis the MLPs are held the same way (every feature, error and bias a node of its
            own) but a skip transcoder's h W_skip stays a linear path, on both sides: in g_i (the backward's
            linear_mlp) and in x_j (h = resid_mid c with c frozen); "skip" then also carries the later layers'
            W_skip paths, as it carries the later layers' attention. The source's output is written at mlp.out
            of its layer (a feature: act_f W_dec[f]; a remainder: its unexplored active features'; an error:
            err[l, t]; a decoder bias: b_dec), the target reads u . resid_mid (a feature: u = W_enc[:, f] c[t]).
    Shapes: -> (skip: float, heads [N] or [N, S])
    """
    model, run = g.model, g.run
    cfg = model.config
    L = cfg.n_layers
    if cfg.gemma4:  # experts, PLE neurons, layer_scalars, KV sharing: graphs.gemma4.edge_heads
        return _g4.edge_heads(g, _Context(model, run, g.read_at, 1), target, source, layer, by_source)
    tc = g.transcoders if g.basis == "transcoders" else None
    unit = "neuron" if tc is None else "feature"
    tk, sk = g.kind[target], g.kind[source]
    sources = (unit, "remainder", "embed") + (("error", "bias") if tc is not None else ())
    if tk not in (unit, "logit") or sk not in sources:
        raise InputError(f"edge_heads takes a {unit} or logit target and a {', '.join(sources[:-1])} or "
                         f"{sources[-1]} source (of this {g.basis} graph)")
    lt, ls = int(g.layer[target]), int(g.layer[source])
    if sk == "bias" and g.index[source] == BIAS_ENC:  # b_enc feeds its own layer's features: no head between
        ls = lt
    if not ls < layer <= min(lt, L - 1):
        raise InputError(f"layer {layer} lies on no path from {g.label(source)} to {g.label(target)}")
    t = int(g.position[target])
    ctx = _Context(model, run, g.read_at, 1, tc, g.zero_positions)
    if tk == "logit":
        u = g.logit_u[[int(target - np.flatnonzero(g.kind == "logit")[0])]]
    else:
        u = ctx.feature_rows(lt, t, np.array([int(g.index[target])]))
    drop = frozenset({(m, "mlp") for m in range(L)} | {(m, "attn") for m in range(lt + 1, L)})
    b = f"blocks.{layer}."
    grad = backward(model, ctx.layers, Seed(None, u, {}), t, freeze=frozenset(FREEZABLE), drop=drop,
                    keep=[b + "resid_mid", b + "attn.z"], linear_mlp=ctx._linear_mlp(lt))
    alone = _source_alone(g, source, ctx)
    skip = float(np.einsum("td,td->", grad[b + "resid_mid"][0], alone[b + "resid_pre"]))
    gz = grad[b + "attn.z"][0]  # [T, N, H]
    if not by_source:
        return skip, np.einsum("tnh,tnh->n", gz, alone[b + "attn.z"])
    kv = ops.kv_index(cfg.n_heads, cfg.n_kv_heads)
    pattern = run.record[b + "attn.pattern"]  # [N, T, S]
    v = alone[b + "attn.v"][:, kv]  # [S, N, H]
    return skip, np.einsum("nts,tnh,snh->ns", pattern, gz, v)


def _source_alone(g: Graph, source: int, ctx: _Context):
    """The frozen forward of one source node alone: embeddings zero but the source's, every norm scale and pattern
    held at the run's values, every neuron's act zero but the source's (a remainder: its unexplored neurons').
    Linear and without biases, this is exactly the source's own contribution at every site.

    Transcoder basis: every mlp.out_l replaced by h_l W_skip (h_l = resid_mid_l c_l, c frozen; 0 without a skip)
    plus, at the source's (l, t), its output vector: act_f W_dec[f] (a feature), sum over the unexplored active
    features of (l, t) (a remainder), err[l, t] (an error), b_dec (a decoder bias)."""
    model, run = g.model, g.run
    rec = run.record
    kind, l, t, n = g.kind[source], int(g.layer[source]), int(g.position[source]), int(g.index[source])
    tc = ctx.tc
    unit = "neuron" if tc is None else "feature"
    act_site = f"blocks.{l}.mlp.act"
    if kind == "remainder":
        explored = (g.kind == unit) & (g.layer == l) & (g.position == t)
        on = np.ones(ctx.F, bool)
        on[g.index[explored]] = False
        if tc is not None:
            on &= ctx.act[l][t] != 0
    own = None  # the transcoder-basis source's output vector at mlp.out_l[t]
    if tc is not None and kind in ("feature", "remainder", "error", "bias"):
        W_dec = tc.layers[l].W_dec
        own = {"feature": lambda: ctx.act[l][t, n] * W_dec[n],
               "remainder": lambda: ctx.act[l][t, on] @ W_dec[on],
               "error": lambda: ctx.err[l][t],
               "bias": lambda: tc.layers[l].b_dec if n == BIAS_DEC else np.zeros_like(tc.layers[l].b_dec)}[kind]()

    def edit(name, value, record):
        site = name.split(".", 2)[-1]
        if name == "embed":
            out = np.zeros_like(value)
            if kind == "embed":
                out[t] = rec["embed"][t]
            return out
        if name.endswith("scale") or site == "attn.pattern":
            return rec[name].copy()
        if tc is not None and site == "mlp.out":
            m = int(name.split(".")[1])
            W_skip = tc.layers[m].W_skip
            out = np.zeros_like(value) if W_skip is None else (record[f"blocks.{m}.resid_mid"] * ctx.c[m]) @ W_skip
            if m == l and own is not None:
                out[t] += own
            return out
        if tc is None and site == "mlp.act":
            out = np.zeros_like(value)
            if name == act_site and kind == "neuron":
                out[t, n] = rec[name][t, n]
            elif name == act_site and kind == "remainder":
                out[t, on] = rec[name][t, on]
            return out
        return value

    return model.run(run.tokens, edit=edit).record
