"""The Gemma forward pass (Gemma 1, 2, 3 and 4 text) over refprism's parameter layout, recording every activation.

No KV cache, no sampling, no batch axis. Each line is one equation of docs/math.md.

One mechanism serves every use that changes a run: at each recorded site the forward pass calls an *edit*
function, `value = edit(name, value, record)`, and what the edit returns is what flows on and what the record
holds. `refprism.compare` replays another implementation through it (keep ours aside, pass theirs on); the
interventions patch, ablate and freeze through it. Norm scales are sites of their own (the scale is computed,
recorded, then applied), so an edit can freeze a norm; the pattern and the gate can be frozen the same way.

Many prompts run together as one *packed* pass (`forward_packed`): their tokens are concatenated along T, each
prompt keeps its own positions (RoPE restarts at 0) and attends only within itself (scores and patterns are
computed per prompt: memory O(sum T_i^2), never (sum T_i)^2); every product over D, F or V is one BLAS call for
the whole pack, which is where the speed comes from.
"""

from __future__ import annotations

import weakref

import numpy as np

from refprism.errors import InputError
from refprism.gemma import ops
from refprism.gemma.config import Config
from refprism.gemma.record import ALL, Lazy, Record, Rows, Selection, as_selection, lazy_entry, row_axis
from refprism.gemma.weights import Weights


def embed_normalizer(d_model: int, dtype, round_to=None):
    """The embedding scale sqrt(D), as a scalar of the compute dtype.

    Gemma trap: the embedding is multiplied by sqrt(D) and this constant is rounded in the dtype the model runs
    in. HF transformers rounds it to the model's dtype (sqrt(2048) = 45.254834 in float32, 45.25 in bfloat16);
    the original JAX code rounds it to the parameters' dtype. refprism uses the compute dtype by default (equal
    to HF at the same dtype); `round_to="bfloat16"` reproduces a bf16 run's 45.25 exactly.
    """
    value = np.sqrt(np.float64(d_model))
    if round_to is not None:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

        value = np.float64(np.asarray(value).astype(round_to))
    return np.asarray(value, dtype=dtype)


def forward(params: Weights, cfg: Config, tokens, *, normalizer=None, edit=None, resume=None,
            record=None) -> Record:
    """Run tokens [T] through the model; return the Record of every activation (see record.RECORD_TABLE).

    Math:   x_0 = E[tokens] * sqrt(D)
            x_{l+1/2} = x_l + post1_l(attn_l(rms_norm(x_l; ln1_l)))
            x_{l+1}   = x_{l+1/2} + post2_l(mlp_l(rms_norm(x_{l+1/2}; ln2_l)))
            logits    = rms_norm(x_L; ln_final) E^T          (tied unembedding)
            post1/post2 are the identity in Gemma 1 and rms_norm(.; ln1_post / ln2_post) in Gemma 2/3;
            Gemma 2 soft-caps the logits: cap * tanh(logits / cap).
    edit:   edit(name, value, record) -> value, called at every recorded site in forward order; what it returns
            flows on and is recorded. It must not change `value` in place (it may be a clean run's array when
            resuming): return a new array. `record` holds every earlier site of this run.
    resume: (layer, clean_record): start at `layer` from the clean run's blocks.{layer}.resid_pre; the record
            takes the clean run's arrays for everything before (no copy). With the same edits from that layer on,
            the result equals a full re-run bit for bit; its cost is the layers after it.
    record: None (everything), or a Selection / list of entries (`record.Selection`): names to keep, optionally
            at some positions (`logits@-1` unembeds only the last position: the [T, V] product is skipped for
            positions nobody reads).
    Shapes: tokens [T] int -> record (logits [T, V])
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    return _forward(params, cfg, [tokens], normalizer=normalizer, edit=edit, resume=resume, record=record)[0]


def forward_packed(params: Weights, cfg: Config, prompts, *, normalizer=None, record=None) -> list[Record]:
    """Several prompts in one packed pass: one Record per prompt, each equal to its own `forward` within float
    rounding (the products over D, F and V see more rows, so BLAS may sum in another order).

    Math:   tokens = concat(prompts),  position[t] = t - start(prompt of t)      (RoPE restarts for each prompt)
            attention: prompt i's queries see only prompt i's keys (causal; sliding windows per prompt)
    record: as for `forward`; positions are each prompt's own (`logits@-1`: every prompt's last position).
    Shapes: prompts [P] of tokens [T_i] -> P records
    """
    return _forward(params, cfg, [np.asarray(t, dtype=np.int64) for t in prompts], normalizer=normalizer,
                    record=record)


class _Recorder:
    """Where the pass puts what it computes: the edit applied, the selection kept, each prompt's record filled.

    Position-major arrays [sum T_i, ...] are kept as views of each prompt's rows (no copy) or, under a selection,
    as Rows of the positions asked for; attention arrays [N, T_i, S_i] are computed per prompt already.
    """

    def __init__(self, cfg, lengths, selection: Selection | None, edit):
        self.cfg, self.edit, self.selection = cfg, edit, selection
        self.lengths = list(lengths)
        self.bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        self.records = [Record() for _ in lengths]
        for rec in self.records:
            rec.selection = selection

    def rows(self, name, i):
        T = int(self.bounds[i + 1] - self.bounds[i])
        return ALL if self.selection is None else self.selection.rows(name, T)

    def wanted(self, name) -> bool:
        return any(self.rows(name, i) is not None for i in range(len(self.records)))

    def __call__(self, name, value, recompute=None):
        """A position-major site of the whole pack: edit, keep, return what flows on.

        recompute: a function that computes `value` again bit for bit, by the same function, from what the record
        holds (by name); the record stores it instead of the array (record.Lazy) where record.lazy_entry says so:
        one unedited prompt recording everything, for the activations always, for every other site but the
        residual stream, the sublayer outputs, the norm scales, the pattern and the logits in a long record
        (record.long_record: from LONG_PROMPT tokens, where those sites would exceed LAZY_BUDGET bytes).
        """
        if self.edit is not None:
            value = self.edit(name, value, self.records[0])
        elif recompute is not None and lazy_entry(self.cfg, name, self.lengths, self.selection, value.dtype,
                                                  edited=False):
            self.records[0][name] = Lazy(recompute, value.shape, value.dtype)
            return value
        for i, rec in enumerate(self.records):
            a, b = self.bounds[i], self.bounds[i + 1]
            self._keep(rec, name, value[a:b] if len(self.records) > 1 else value, i)
        return value

    def segment(self, name, i, value, recompute=None):
        """A site computed per prompt (scores, pattern: [N, T_i, S_i]); recompute as for __call__."""
        if self.edit is not None:
            value = self.edit(name, value, self.records[i])
        elif recompute is not None and self.rows(name, i) is ALL:
            self.records[i][name] = Lazy(recompute, value.shape, value.dtype)
            return value
        self._keep(self.records[i], name, value, i)
        return value

    def unread(self, name, i) -> bool:
        """Whether nothing reads site `name` of prompt i during the pass: no edit, and the record keeps it whole
        (then lazily, see lazy) or not at all. The forward then need not compute it as one array."""
        return self.edit is None and (self.rows(name, i) is ALL or self.rows(name, i) is None)

    def lazy(self, name, i, recompute, shape, dtype):
        """Keep an unread site of prompt i as the function that computes it (if the record keeps it at all)."""
        if self.rows(name, i) is ALL:
            self.records[i][name] = Lazy(recompute, shape, dtype)

    def _keep(self, rec, name, value, i):
        rows = self.rows(name, i)
        if rows is ALL:
            rec[name] = value
        elif rows is not None:
            axis = row_axis(self.cfg, name)
            rec[name] = Rows(name, np.take(value, rows, axis=axis), rows, axis, value.shape[axis])


def _forward(params, cfg, prompts, *, normalizer=None, edit=None, resume=None, record=None):
    dtype = params.dtype
    eps = cfg.rms_norm_eps
    lengths = [len(t) for t in prompts]
    if min(lengths) < 1:
        raise InputError("a prompt has no tokens")
    selection = as_selection(record)
    if selection is not None:
        selection.check(cfg)
    if len(prompts) > 1 and (edit is not None or resume is not None):
        raise InputError("edits and resume run one prompt at a time (a packed pass takes neither)")
    if normalizer is None:
        normalizer = embed_normalizer(cfg.d_model, dtype)
    site = _Recorder(cfg, lengths, selection, edit)
    bounds = site.bounds
    tokens = np.concatenate(prompts)
    T, N = len(tokens), cfg.n_heads
    positions = np.concatenate([np.arange(T) for T in lengths])  # each prompt's own positions
    ropes = {}  # (theta, scale, H, partial) -> cos, sin [sum T, H]: one RoPE per layer type (Gemma 3, 4)

    first = 0
    if resume is not None:
        first, clean = resume
        if not 0 <= first < cfg.n_layers:
            raise InputError(f"resume layer {first} is out of range (the model has layers 0 .. {cfg.n_layers - 1})")
        rec = site.records[0]
        for name, value in dict.items(clean):  # everything before the first layer, as stored (a Lazy stays lazy):
            # the embedding, Gemma 4's per-layer inputs (ple.*, computed once before layer 0) and the earlier layers
            if name == "embed" or name.startswith("ple.") or (name.startswith("blocks.")
                                                              and int(name.split(".")[1]) < first):
                rec[name] = Lazy(value.compute, value.shape, value.dtype, keep=clean) if isinstance(value, Lazy) \
                    else value
        x = clean[f"blocks.{first}.resid_pre"]
    else:
        x = site("embed", params.embed_rows(tokens) * normalizer)  # [T, D]
    off = cfg.norm_offset  # Gemma trap: norms scale by (1 + w) in Gemma 1-3, by w in Gemma 4
    ple = None
    if cfg.ple:  # Gemma 4 E2B/E4B: per-layer inputs, computed once from the tokens and the embedding
        ple = clean["ple.input"] if resume is not None else _ple_inputs(params, cfg, site, tokens, x)
    shared = {}  # Gemma 4 KV sharing: layer type -> the (k, v) its consumers attend over (the producer's)
    if resume is not None:
        for l in range(first, cfg.n_layers):
            src = cfg.kv_source(l)
            if src < first:  # a consumer after the resume point whose producer is before it
                shared[cfg.layer_types[l]] = (clean[f"blocks.{src}.attn.k"], clean[f"blocks.{src}.attn.v"])

    R = weakref.proxy(site.records[0])  # one prompt's record: the lazy entries below read their inputs from it
    for l in range(first, cfg.n_layers):  # T is the pack's total here
        p = params.block(l, scratch=True)  # low-memory mode: converted now, into buffers the next layer reuses
        W = lambda key, l=l: params.get(l, key)  # noqa: E731  (a lazy entry's weights: p's may be reused by then)
        b = f"blocks.{l}."
        x = site(b + "resid_pre", x)

        # Attention: RMSNorm (1 + w) -> q, k, v per head -> (Gemma 3: q, k norms) -> split-half RoPE on q, k
        # -> causal softmax (Gemma 2: soft-capped scores; sliding layers: a window) -> o_proj (-> Gemma 2/3 post-norm)
        # A lazy entry (recompute=) is the same function of the same recorded inputs: see _Recorder.
        s1 = site(b + "ln1.scale", ops.rms_scale(x, eps=eps))
        h = site(b + "ln1.out", ops.rms_apply(x, s1, p["ln1"], off),
                 recompute=lambda b=b, w=p["ln1"]: ops.rms_apply(R[b + "resid_pre"], R[b + "ln1.scale"], w, off))
        q = site(b + "attn.q_pre", _project(h, p["W_Q"]),  # [T, N, H] = h W_Q
                 recompute=lambda b=b, W=W: _project(R[b + "ln1.out"], W("W_Q")))
        theta, scale = cfg.rope_of(l)
        H = cfg.head_dim_of(l)  # Gemma 4: full layers have their own head width (global_head_dim)
        partial = cfg.rope_partial_of(l)
        if (theta, scale, H, partial) not in ropes:
            ropes[theta, scale, H, partial] = ops.rope_tables(positions / scale, H, theta, dtype, partial)
        cos, sin = ropes[theta, scale, H, partial]
        if cfg.gemma4:
            q, k, v = _gemma4_qkv(cfg, l, b, site, h, q, p, cos, sin, shared, eps)
        else:
            k = site(b + "attn.k_pre", _project(h, p["W_K"]),  # [T, K, H] = h W_K
                     recompute=lambda b=b, W=W: _project(R[b + "ln1.out"], W("W_K")))
            v = site(b + "attn.v", _project(h, p["W_V"]),  # [T, K, H] = h W_V
                     recompute=lambda b=b, W=W: _project(R[b + "ln1.out"], W("W_V")))
        if cfg.qk_norm and not cfg.gemma4:  # Gemma 3: each head's q and k normalised over H, (1 + w), then RoPE
            sq = site(b + "attn.q_norm.scale", ops.rms_scale(q, eps=eps))
            sk = site(b + "attn.k_norm.scale", ops.rms_scale(k, eps=eps))
            q = site(b + "attn.q", ops.rope(ops.rms_apply(q, sq, p["q_norm"]), cos, sin),
                     recompute=lambda b=b, w=p["q_norm"], cos=cos, sin=sin: ops.rope(
                         ops.rms_apply(R[b + "attn.q_pre"], R[b + "attn.q_norm.scale"], w), cos, sin))
            k = site(b + "attn.k", ops.rope(ops.rms_apply(k, sk, p["k_norm"]), cos, sin),
                     recompute=lambda b=b, w=p["k_norm"], cos=cos, sin=sin: ops.rope(
                         ops.rms_apply(R[b + "attn.k_pre"], R[b + "attn.k_norm.scale"], w), cos, sin))
        elif not cfg.gemma4:
            q = site(b + "attn.q", ops.rope(q, cos, sin),
                     recompute=lambda b=b, cos=cos, sin=sin: ops.rope(R[b + "attn.q_pre"], cos, sin))
            k = site(b + "attn.k", ops.rope(k, cos, sin),
                     recompute=lambda b=b, cos=cos, sin=sin: ops.rope(R[b + "attn.k_pre"], cos, sin))
        window = cfg.sliding_window if cfg.is_sliding(l) else None
        qscale = cfg.query_pre_attn_scalar ** -0.5  # Gemma 4: 1 (query_pre_attn_scalar 1.0: q, k are RMS-normed)
        zNTH = np.empty((N, T, H), dtype=dtype)  # z per head, written per prompt
        for i, Ti in enumerate(lengths):  # attention within each prompt only
            a, e = bounds[i], bounds[i + 1]
            qi, ki = q[a:e], k[a:e]
            recompute = lambda qi=qi, ki=ki, window=window, qscale=qscale: ops.attention_scores(qi, ki, qscale, window)  # noqa: E731
            if site.unread(b + "attn.scores", i):  # kept lazily or not at all: only their bands, into the pattern
                site.lazy(b + "attn.scores", i, recompute, (N, Ti, Ti), dtype)
                computed = ops.attention_pattern(qi, ki, qscale, window, cap=cfg.attn_softcap)  # [N, T, S]
            else:  # an edit or a selection of rows reads them: the whole [N, T, S]
                scores = site.segment(b + "attn.scores", i, ops.attention_scores(qi, ki, qscale, window),
                                      recompute=recompute)
                computed = ops.causal_softmax(scores, window, cap=cfg.attn_softcap)  # the same bits
                del scores
            pattern = site.segment(b + "attn.pattern", i, computed)
            ops.attention_mix(pattern, v[a:e], out=zNTH[:, a:e], window=window,
                              banded=pattern is computed)  # an edited pattern is read whole
            del pattern, computed  # one prompt's attention at a time, unless the record keeps it
        vb = f"blocks.{cfg.kv_source(l)}."  # Gemma 4 KV-sharing consumer: its producer's values
        z = site(b + "attn.z", zNTH.transpose(1, 0, 2),  # [T, N, H]
                 recompute=lambda b=b, vb=vb, window=window: ops.attention_mix(R[b + "attn.pattern"], R[vb + "attn.v"],
                                                                               window=window))
        attn_out = _heads_out(z, p["W_O"])  # [T, D]
        if cfg.post_norms:  # Gemma 2/3: the attention output is normalised before the residual add
            attn_out = site(b + "attn.o_proj", attn_out,
                            recompute=lambda b=b, W=W: _heads_out(R[b + "attn.z"], W("W_O")))
            sp = site(b + "ln1_post.scale", ops.rms_scale(attn_out, eps=eps))
            attn_out = ops.rms_apply(attn_out, sp, p["ln1_post"], off)
        attn_out = site(b + "attn.out", attn_out)  # kept: every residual prism reads it
        x = site(b + "resid_mid", x + attn_out, recompute=lambda b=b: R[b + "resid_pre"] + R[b + "attn.out"])

        # MLP: RMSNorm (1 + w) -> GeGLU gelu_tanh(gate) * up -> down (-> Gemma 2/3 post-norm)
        s2 = site(b + "ln2.scale", ops.rms_scale(x, eps=eps))
        h = site(b + "ln2.out", ops.rms_apply(x, s2, p["ln2"], off),
                 recompute=lambda b=b, w=p["ln2"]: ops.rms_apply(R[b + "resid_mid"], R[b + "ln2.scale"], w, off))
        gate = site(b + "mlp.gate", ops.matmul(h, p["W_gate"]),  # [T, F]
                    recompute=lambda b=b, W=W: ops.matmul(R[b + "ln2.out"], W("W_gate")))
        up = site(b + "mlp.up", ops.matmul(h, p["W_up"]),  # [T, F]
                  recompute=lambda b=b, W=W: ops.matmul(R[b + "ln2.out"], W("W_up")))
        act = site(b + "mlp.act", ops.gelu_tanh(gate) * up,  # [T, F]
                   recompute=lambda b=b: ops.gelu_tanh(R[b + "mlp.gate"]) * R[b + "mlp.up"])
        del gate, up
        mlp_out = ops.matmul(act, p["W_down"])  # [T, D]
        del act
        if cfg.post_norms:
            mlp_out = site(b + "mlp.down", mlp_out,
                           recompute=lambda b=b, W=W: ops.matmul(R[b + "mlp.act"], W("W_down")))
            if cfg.moe:  # Gemma 4 26B-A4B: the dense branch beside the experts, each post-normed, then summed
                mlp_out = site(b + "mlp.sum", _gemma4_moe(cfg, b, site, x, mlp_out, p, eps))
            sp = site(b + "ln2_post.scale", ops.rms_scale(mlp_out, eps=eps))
            mlp_out = ops.rms_apply(mlp_out, sp, p["ln2_post"], off)
        mlp_out = site(b + "mlp.out", mlp_out)  # kept: every residual prism reads it
        if cfg.gemma4:
            x = site(b + "resid_mlp", x + mlp_out)
            if cfg.ple:  # Gemma 4: the per-layer input, gated by the residual, projected, post-normed, added
                x = x + _gemma4_ple(cfg, l, b, site, x, ple, p, eps)
            # Gemma 4 trap: layer_scalar multiplies the whole residual stream at the layer's end (not a branch)
            x = site(b + "resid_post", x * p["layer_scalar"])
        else:
            x = site(b + "resid_post", x + mlp_out)

    s = site("ln_final.scale", ops.rms_scale(x, eps=eps))
    h = site("ln_final.out", ops.rms_apply(x, s, params.ln_final, off),
             recompute=lambda: ops.rms_apply(R[f"blocks.{cfg.n_layers - 1}.resid_post"], R["ln_final.scale"],
                                             params.ln_final, off))
    _logits(params, cfg, site, h, lengths)
    return site.records


def _ple_inputs(params, cfg, site, tokens, x0):
    """Gemma 4's per-layer inputs, once per position (HF: get_per_layer_inputs, project_per_layer_inputs).

    Math:   token = E_ple[tokens] * sqrt(P)                              (token identity; sqrt(256) = 16)
            model = x_0 W_ple_model / sqrt(D)                             (linear in the scaled embedding x_0)
            ple   = (rms_norm(model; ple_norm) + token) / sqrt(2)         (the norm over P, per layer, scale w)
    Shapes: tokens [T], x0 [T, D] -> ple [T, L, P]
    """
    dt = x0.dtype
    token = site("ple.token", params.ple_rows(tokens) * np.asarray(np.sqrt(np.float64(cfg.d_ple)), dt))
    # x_0 W_ple_model as one BLAS product over the [D, L*P] view (np.einsum looped in C: 5x slower at T = 128)
    model = site("ple.model_proj", _project(x0, params.ple_model()) * np.asarray(cfg.d_model ** -0.5, dt))
    s = site("ple.model_proj_norm.scale", ops.rms_scale(model, eps=cfg.rms_norm_eps))
    return site("ple.input", (ops.rms_apply(model, s, params.ple_norm, 0) + token) * np.asarray(2.0 ** -0.5, dt))


def _gemma4_qkv(cfg, l, b, site, h, q, p, cos, sin, shared, eps):
    """Gemma 4's q, k, v of layer l (HF: Gemma4TextAttention.forward), recorded; -> q, k, v after norms and RoPE.

    Math:   q = rope(rms_norm(h W_Q; q_norm))                      (per head over H, scale w; then RoPE)
            producer:  k = rope(rms_norm(h W_K; k_norm)),  v = rms_norm(v_pre) (v_norm: no learned scale)
                       v_pre = h W_V, or h W_K on a k_eq_v layer (full layers: V is the raw K projection,
                       before k_norm and RoPE)
            consumer (KV sharing, Config.kv_source): k, v = the producer's, as they flowed there
    Shapes: h [T, D], q [T, N, H] -> q [T, N, H], k [S, K, H], v [S, K, H]
    """
    if cfg.has_kv(l):
        k = site(b + "attn.k_pre", _project(h, p["W_K"]))  # [T, K, H] = h W_K
        v = site(b + "attn.v_pre", k if cfg.k_eq_v_at(l) else _project(h, p["W_V"]))
    sq = site(b + "attn.q_norm.scale", ops.rms_scale(q, eps=eps))
    if cfg.has_kv(l):
        sk = site(b + "attn.k_norm.scale", ops.rms_scale(k, eps=eps))
        sv = site(b + "attn.v_norm.scale", ops.rms_scale(v, eps=eps))
    q = site(b + "attn.q", ops.rope(ops.rms_apply(q, sq, p["q_norm"], 0), cos, sin))
    if not cfg.has_kv(l):
        return (q, *shared[cfg.layer_types[l]])
    k = site(b + "attn.k", ops.rope(ops.rms_apply(k, sk, p["k_norm"], 0), cos, sin))
    v = site(b + "attn.v", ops.rms_apply(v, sv, None))
    shared[cfg.layer_types[l]] = (k, v)  # the last producer of this type before the consumers wins (HF: "store")
    return q, k, v


# Rows an expert (the mean over the chosen ones) from which _gemma4_moe runs the experts side by side: 26B-A4B/2,
# both layers' experts, in turn -> side by side (docs/performance.md): T = 7 (~1.2 rows an expert) 0.13 -> 0.21-0.23
# s, T = 32 0.38-0.51 -> 0.45-0.60 s, T = 64 0.57 -> 0.75 s, T = 128 (~8) 0.80-0.97 -> 0.83-0.89 s, T = 256 1.46 ->
# 1.28 s, T = 512 1.75 -> 1.73 s. Few rows make 1-row products that OpenBLAS threads itself (two callers contend).
MOE_EACH_ROWS = 8


def _in_turn(items, fn):
    """ops.each's contract (every item once), on this thread."""
    for item in items:
        fn(item)


def _gemma4_moe(cfg, b, site, x, dense, p, eps):
    """Gemma 4's mixture of experts beside the dense MLP (HF: Gemma4TextDecoderLayer, Gemma4TextRouter,
    Gemma4TextExperts); only the selected experts are computed.

    Math:   r       = (x / s_r * router_scale / sqrt(D)) W_router            (x = resid_mid; s_r its RMS)
            prob    = softmax(r) over the E experts;  top = the J largest (by falling prob)
            w_j     = prob[top_j] / sum_j' prob[top_j'] * per_expert_scale[top_j]
            h2      = rms_norm(x; ln2_moe);  out_j = (gelu_tanh(h2 We_gate[e]) * (h2 We_up[e])) We_down[e], e = top_j
            returns  rms_norm(dense; ln2_post1) + rms_norm(sum_j w_j out_j; ln2_post2)
    Shapes: x, dense [T, D] -> [T, D]
    """
    dt = x.dtype
    s1 = site(b + "ln2_post1.scale", ops.rms_scale(dense, eps=eps))
    dense = site(b + "mlp.dense", ops.rms_apply(dense, s1, p["ln2_post1"], 0))
    sr = site(b + "moe.router.scale", ops.rms_scale(x, eps=eps))
    logits = site(b + "moe.router.logits", (ops.rms_apply(x, sr, None) * p["router_scale"] *
                                            np.asarray(cfg.d_model ** -0.5, dt)) @ p["W_router"])
    # Gemma 4 trap: top-k of the probabilities, then renormalised over the k, then per_expert_scale
    top, w = ops.route_topk(logits, cfg.top_k, p["per_expert_scale"])
    top = site(b + "moe.topk.index", top)  # [T, J]
    w = site(b + "moe.topk.weight", w)
    s2 = site(b + "ln2_moe.scale", ops.rms_scale(x, eps=eps))
    h2 = site(b + "ln2_moe.out", ops.rms_apply(x, s2, p["ln2_moe"], 0))
    T, J, G = len(x), cfg.top_k, cfg.d_expert
    gate, up = np.empty((T, J, G), dt), np.empty((T, J, G), dt)
    chosen = [(e, np.nonzero(top == e)) for e in np.unique(top)]  # each selected expert, its (token, slot) pairs
    # side by side (ops.each) only where the experts have rows enough; a short prompt's 1-2 rows an expert run in
    # turn, each product threaded as ops.matmul threads it (the same BLAS calls either way: the same bits)
    each = ops.each if T * J >= MOE_EACH_ROWS * len(chosen) else _in_turn

    We_gate, We_up = p["We_gate"], p["We_up"]

    def expert_in(chosen_e):  # the experts side by side (ops.each): each writes only its own (token, slot) rows
        e, (t, j) = chosen_e
        rows = h2[t]  # the expert's input rows (x, the residual, stays what the docstring names)
        gate[t, j] = ops.matmul(rows, We_gate[e])
        up[t, j] = ops.matmul(rows, We_up[e])

    each(chosen, expert_in)
    gate = site(b + "moe.gate", gate)
    up = site(b + "moe.up", up)
    act = site(b + "moe.act", ops.gelu_tanh(gate) * up)
    out, We_down = np.empty((T, J, cfg.d_model), dt), p["We_down"]

    def expert_out(chosen_e):
        e, (t, j) = chosen_e
        out[t, j] = ops.matmul(act[t, j], We_down[e])

    each(chosen, expert_out)
    out = site(b + "moe.expert_out", out)
    down = site(b + "moe.down", np.einsum("tj,tjd->td", w, out))
    s3 = site(b + "ln2_post2.scale", ops.rms_scale(down, eps=eps))
    return dense + site(b + "moe.out", ops.rms_apply(down, s3, p["ln2_post2"], 0))


def _gemma4_ple(cfg, l, b, site, x, ple, p, eps):
    """Gemma 4's per-layer input term of layer l (HF: Gemma4TextDecoderLayer, after the MLP's residual add).

    Math:   out = rms_norm((gelu_tanh(x W_ple_gate) * ple[:, l]) W_ple_proj; ple_post)     (x = resid_mlp)
    Shapes: x [T, D], ple [T, L, P] -> out [T, D]
    """
    gate = site(b + "ple.gate", ops.matmul(x, p["W_ple_gate"]))
    act = site(b + "ple.act", ops.gelu_tanh(gate) * ple[:, l])
    proj = site(b + "ple.proj", ops.matmul(act, p["W_ple_proj"]))
    s = site(b + "ple_post.scale", ops.rms_scale(proj, eps=eps))
    return site(b + "ple.out", ops.rms_apply(proj, s, p["ple_post"], 0))


def _project(h, W):
    """h W for W [D, heads, H] (W_Q, W_K, W_V): one ops.matmul over a [D, heads*H] view -> [T, heads, H]."""
    return ops.matmul(h, W.reshape(W.shape[0], -1)).reshape(len(h), W.shape[1], W.shape[2])


def _heads_out(z, W_O):
    """sum_n z[:, n] W_O[n] for z [T, N, H], W_O [N, H, D]: one ops.matmul over [T, N*H] -> [T, D]."""
    T, N, H = z.shape
    return ops.matmul(np.ascontiguousarray(z).reshape(T, N * H), W_O.reshape(N * H, -1))


def _logits(params, cfg, site, h, lengths):
    """logits = ln_final.out E^T (Gemma trap: the unembedding is the embedding itself, tied), computed only at
    the positions some record keeps: the [T, V] product is the largest of a long prompt's pass. Under a
    selection the logits are not an edit point (nothing flows from them): an edited run that reads its readout
    from ln_final.out keeps no logits and skips the product.
    Gemma 2 soft-caps them (cap * tanh(logits / cap)); the prisms decompose the pre-cap `logits_uncapped`."""
    cap = cfg.final_softcap
    if site.selection is None:  # everything
        raw = params.unembed(h)  # [T, V]
        if cap is not None:
            raw = ops.softcap(site("logits_uncapped", raw), cap)
        site("logits", raw)
        return
    names = ["logits_uncapped", "logits"] if cap is not None else ["logits"]
    wanted = []  # per prompt: the positions any logits name keeps
    for i, T in enumerate(lengths):
        rows = set()
        for name in names:
            r = site.rows(name, i)
            rows |= set(range(T)) if r is ALL else set(r or ())
        wanted.append(sorted(rows))
    if not any(wanted):
        return
    packed = np.concatenate([site.bounds[i] + np.asarray(w, dtype=int) for i, w in enumerate(wanted)])
    values = {"logits_uncapped" if cap is not None else "logits": params.unembed(h[packed])}
    if cap is not None:
        values["logits"] = ops.softcap(values["logits_uncapped"], cap)
    start = 0
    for i, (T, w) in enumerate(zip(lengths, wanted)):
        block = slice(start, start + len(w))
        start += len(w)
        for name in names:
            r = site.rows(name, i)
            if r is None:
                continue
            r = tuple(range(T)) if r is ALL else r
            mine = values[name][block][[w.index(t) for t in r]]  # [len(r), V]
            site.records[i][name] = mine if len(r) == T else Rows(name, mine, r, 0, T)
