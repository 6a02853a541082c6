"""The Gemma forward pass (Gemma 1, 2 and 3 text) over refprism's parameter layout, recording every activation.

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
        residual stream, the sublayer outputs, the norm scales, the pattern and the logits from LONG_PROMPT tokens.
        """
        if self.edit is not None:
            value = self.edit(name, value, self.records[0])
        elif recompute is not None and lazy_entry(name, self.lengths, self.selection, edited=False):
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
    T, N, H = len(tokens), cfg.n_heads, cfg.d_head
    positions = np.concatenate([np.arange(T) for T in lengths])  # each prompt's own positions
    ropes = {}  # (theta, scale) -> cos, sin [sum T, H]: Gemma 3 has one RoPE for full and one for sliding layers

    first = 0
    if resume is not None:
        first, clean = resume
        if not 0 <= first < cfg.n_layers:
            raise InputError(f"resume layer {first} is out of range (the model has layers 0 .. {cfg.n_layers - 1})")
        rec = site.records[0]
        for name, value in dict.items(clean):  # everything before the first layer, as stored (a Lazy stays lazy)
            if name == "embed" or (name.startswith("blocks.") and int(name.split(".")[1]) < first):
                rec[name] = Lazy(value.compute, value.shape, value.dtype, keep=clean) if isinstance(value, Lazy) \
                    else value
        x = clean[f"blocks.{first}.resid_pre"]
    else:
        x = site("embed", params.embed_rows(tokens) * normalizer)  # [T, D]

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
        h = site(b + "ln1.out", ops.rms_apply(x, s1, p["ln1"]),
                 recompute=lambda b=b, w=p["ln1"]: ops.rms_apply(R[b + "resid_pre"], R[b + "ln1.scale"], w))
        q = site(b + "attn.q_pre", _project(h, p["W_Q"]),  # [T, N, H] = h W_Q
                 recompute=lambda b=b, W=W: _project(R[b + "ln1.out"], W("W_Q")))
        k = site(b + "attn.k_pre", _project(h, p["W_K"]),  # [T, K, H] = h W_K
                 recompute=lambda b=b, W=W: _project(R[b + "ln1.out"], W("W_K")))
        v = site(b + "attn.v", _project(h, p["W_V"]),  # [T, K, H] = h W_V
                 recompute=lambda b=b, W=W: _project(R[b + "ln1.out"], W("W_V")))
        theta, scale = cfg.rope_of(l)
        if (theta, scale) not in ropes:
            ropes[theta, scale] = ops.rope_tables(positions / scale, cfg.d_head, theta, dtype)
        cos, sin = ropes[theta, scale]
        if cfg.qk_norm:  # Gemma 3: each head's q and k normalised over H, (1 + w) as every Gemma norm, then RoPE
            sq = site(b + "attn.q_norm.scale", ops.rms_scale(q, eps=eps))
            sk = site(b + "attn.k_norm.scale", ops.rms_scale(k, eps=eps))
            q = site(b + "attn.q", ops.rope(ops.rms_apply(q, sq, p["q_norm"]), cos, sin),
                     recompute=lambda b=b, w=p["q_norm"], cos=cos, sin=sin: ops.rope(
                         ops.rms_apply(R[b + "attn.q_pre"], R[b + "attn.q_norm.scale"], w), cos, sin))
            k = site(b + "attn.k", ops.rope(ops.rms_apply(k, sk, p["k_norm"]), cos, sin),
                     recompute=lambda b=b, w=p["k_norm"], cos=cos, sin=sin: ops.rope(
                         ops.rms_apply(R[b + "attn.k_pre"], R[b + "attn.k_norm.scale"], w), cos, sin))
        else:
            q = site(b + "attn.q", ops.rope(q, cos, sin),
                     recompute=lambda b=b, cos=cos, sin=sin: ops.rope(R[b + "attn.q_pre"], cos, sin))
            k = site(b + "attn.k", ops.rope(k, cos, sin),
                     recompute=lambda b=b, cos=cos, sin=sin: ops.rope(R[b + "attn.k_pre"], cos, sin))
        window = cfg.sliding_window if cfg.is_sliding(l) else None
        qscale = cfg.query_pre_attn_scalar ** -0.5
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
        z = site(b + "attn.z", zNTH.transpose(1, 0, 2),  # [T, N, H]
                 recompute=lambda b=b, window=window: ops.attention_mix(R[b + "attn.pattern"], R[b + "attn.v"],
                                                                        window=window))
        attn_out = _heads_out(z, p["W_O"])  # [T, D]
        if cfg.post_norms:  # Gemma 2/3: the attention output is normalised before the residual add
            attn_out = site(b + "attn.o_proj", attn_out,
                            recompute=lambda b=b, W=W: _heads_out(R[b + "attn.z"], W("W_O")))
            sp = site(b + "ln1_post.scale", ops.rms_scale(attn_out, eps=eps))
            attn_out = ops.rms_apply(attn_out, sp, p["ln1_post"])
        attn_out = site(b + "attn.out", attn_out)  # kept: every residual prism reads it
        x = site(b + "resid_mid", x + attn_out, recompute=lambda b=b: R[b + "resid_pre"] + R[b + "attn.out"])

        # MLP: RMSNorm (1 + w) -> GeGLU gelu_tanh(gate) * up -> down (-> Gemma 2/3 post-norm)
        s2 = site(b + "ln2.scale", ops.rms_scale(x, eps=eps))
        h = site(b + "ln2.out", ops.rms_apply(x, s2, p["ln2"]),
                 recompute=lambda b=b, w=p["ln2"]: ops.rms_apply(R[b + "resid_mid"], R[b + "ln2.scale"], w))
        gate = site(b + "mlp.gate", h @ p["W_gate"],  # [T, F]
                    recompute=lambda b=b, W=W: R[b + "ln2.out"] @ W("W_gate"))
        up = site(b + "mlp.up", h @ p["W_up"],  # [T, F]
                  recompute=lambda b=b, W=W: R[b + "ln2.out"] @ W("W_up"))
        act = site(b + "mlp.act", ops.gelu_tanh(gate) * up,  # [T, F]
                   recompute=lambda b=b: ops.gelu_tanh(R[b + "mlp.gate"]) * R[b + "mlp.up"])
        del gate, up
        mlp_out = act @ p["W_down"]  # [T, D]
        del act
        if cfg.post_norms:
            mlp_out = site(b + "mlp.down", mlp_out, recompute=lambda b=b, W=W: R[b + "mlp.act"] @ W("W_down"))
            sp = site(b + "ln2_post.scale", ops.rms_scale(mlp_out, eps=eps))
            mlp_out = ops.rms_apply(mlp_out, sp, p["ln2_post"])
        mlp_out = site(b + "mlp.out", mlp_out)  # kept: every residual prism reads it
        x = site(b + "resid_post", x + mlp_out)

    s = site("ln_final.scale", ops.rms_scale(x, eps=eps))
    h = site("ln_final.out", ops.rms_apply(x, s, params.ln_final),
             recompute=lambda: ops.rms_apply(R[f"blocks.{cfg.n_layers - 1}.resid_post"], R["ln_final.scale"],
                                             params.ln_final))
    _logits(params, cfg, site, h, lengths)
    return site.records


def _project(h, W):
    """h W for W [D, heads, H] (W_Q, W_K, W_V): one BLAS product over a [D, heads*H] view -> [T, heads, H]."""
    return (h @ W.reshape(W.shape[0], -1)).reshape(len(h), W.shape[1], W.shape[2])


def _heads_out(z, W_O):
    """sum_n z[:, n] W_O[n] for z [T, N, H], W_O [N, H, D]: one BLAS product over [T, N*H] -> [T, D]."""
    T, N, H = z.shape
    return np.ascontiguousarray(z).reshape(T, N * H) @ W_O.reshape(N * H, -1)


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
