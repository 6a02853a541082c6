"""The four passes over the same tokens: reference R, replay P, honest run F and honest replay Q.

Each is one refprism forward with an edit (`forward`'s edit hook, the one edit mechanism): `replay_edit`
substitutes the other side's value at each site before it flows on; `honest_edit` rounds as an honest
implementation at a dtype would (the llama.cpp side's `ggml_edit` as llama.cpp's own arithmetic does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refprism.crosscheck.floors import Profile, WeightsAs, _round, pre_rope, split_site
from refprism.crosscheck.ggml import ggml_edit
from refprism.gemma import ops
from refprism.gemma.config import Config
from refprism.gemma.forward import embed_normalizer, forward
from refprism.gemma.record import Record


class _Reached(Exception):
    """Raised by an edit once the site it waits for is computed: the rest of the pass is not needed."""


def replay_edit(given: dict, kept: dict, *, cast=None, honest=None, stop=None, variant=None):
    """The edit of a teacher-forced replay: keep our value of each site, pass the given one on.

    At each site: value = honest(name, value, record) when an honest-arithmetic edit is given (the floor runs),
    value = variant(name, value, record) when a mistake is being tried there (it returns None where it does not
    act); kept[name] = value (our op on the given inputs); then the given array flows on where there is one
    (cast to the pass's dtype by `cast`), our value elsewhere. `stop`: raise _Reached after that site.
    Never changes `value` in place (forward's contract).
    """

    def edit(name, value, record):
        if honest is not None:
            value = honest(name, value, record)
        if variant is not None:
            wrong = variant(name, value, record)
            value = value if wrong is None else wrong
        kept[name] = value
        if name == stop:
            raise _Reached
        if name in given:
            return given[name] if cast is None else cast(name, given[name])
        return value

    return edit


def honest_edit(profile: Profile, weights, cfg: Config, T: int):
    """The edit that makes refprism's float32 pass compute like an honest implementation at profile.dtype
    (`Profile`): RoPE with float32 angles, and for bfloat16 / float16 torch's roundings at each step; for llama.cpp
    (profile.ggml) ggml's roundings (`ggml_edit`)."""
    if profile.ggml is not None:
        return ggml_edit(profile.ggml, weights, cfg, T)
    dt = profile.rounds_to
    tables = {}

    def rope_tables(l):
        theta, scale = cfg.rope_of(l)
        key = (theta, scale, cfg.head_dim_of(l), cfg.rope_partial_of(l))  # Gemma 4: per layer type
        if key not in tables:
            cos, sin = rope_tables_float32(np.arange(T), *key[2:3], theta, scale, partial=key[3])
            tables[key] = (_round(cos, dt), _round(sin, dt))
        return tables[key]

    def edit(name, value, record):
        l, kind = split_site(name)
        if kind in ("attn.q", "attn.k"):
            x = pre_rope(record, cfg, weights, l, kind)
            cos, sin = rope_tables(l)
            if dt is None:
                return ops.rope(x, cos, sin)
            a = _round(x * cos[:, None, :], dt)
            b = _round(ops.rotate_half(x) * sin[:, None, :], dt)
            return _round(a + b, dt)
        if dt is None:
            return value
        if kind == "attn.scores":
            k = record[f"blocks.{cfg.kv_source(l)}.attn.k"]  # Gemma 4 KV-sharing consumer: the producer's keys
            qk = _round(ops.attention_scores(record[f"blocks.{l}.attn.q"], k, 1.0), dt)
            return _round(qk * np.float32(cfg.query_pre_attn_scalar ** -0.5), dt)
        if kind == "attn.pattern" and cfg.attn_softcap is not None:
            capped = _softcap_rounded(record[f"blocks.{l}.attn.scores"], cfg.attn_softcap, dt)
            window = cfg.sliding_window if cfg.is_sliding(l) else None
            return _round(ops.causal_softmax(capped, window), dt)
        if kind == "mlp.act":
            g = _round(ops.gelu_tanh(record[f"blocks.{l}.mlp.gate"]), dt)
            return _round(g * record[f"blocks.{l}.mlp.up"], dt)
        if kind == "logits" and cfg.final_softcap is not None:
            return _softcap_rounded(record["logits_uncapped"], cfg.final_softcap, dt)
        return _round(value, dt)

    return edit


def _softcap_rounded(x, cap, dt):
    """cap * tanh(x / cap) with each step rounded to dt, as torch computes it on a low-precision tensor."""
    cap = np.asarray(cap, dtype=x.dtype)
    return _round(_round(np.tanh(_round(x / cap, dt)), dt) * cap, dt)


def rope_tables_float32(positions, d_head, theta, scale=1.0, partial=1.0):
    """cos, sin as HF computes them in float32: inv_freq = 1 / theta ** (arange(0, H, 2) / H) (/ scale for linear
    scaling), angle = float32(position) * inv_freq, rounded at each step (the angle's error grows with position).

    Shapes: positions [T] -> cos, sin [T, H] float32
    """
    f = np.float32
    inv = (f(1.0) / (f(theta) ** (np.arange(0, d_head, 2, dtype=f) / f(d_head)))).astype(f)
    if scale != 1.0:
        inv = (inv / f(scale)).astype(f)
    if partial != 1.0:  # Gemma 4's proportional RoPE: the frequencies beyond int(p H / 2) are 0
        inv[int(partial * d_head // 2):] = 0
    angles = np.asarray(positions, dtype=f)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(f), np.sin(angles).astype(f)


@dataclass
class _Runs:
    """The four passes (module docstring) and what they kept."""

    R: Record  # reference, float64
    F: Record  # honest run at the other side's dtype
    P: dict  # our op on the other side's inputs, per site (float64)
    Pflow: Record  # what flowed in the replay: theirs where they have it
    Q: dict  # the honest op on R's values, per site
    w64: WeightsAs  # the float64 weights, shared with the diagnosis


def _run_all(model, tokens, theirs: dict, profile: Profile) -> _Runs:
    cfg = model.config
    T = len(tokens)
    w64 = WeightsAs(model.params, np.float64)
    n64 = embed_normalizer(cfg.d_model, np.float64)
    R = forward(w64, cfg, tokens, normalizer=n64)
    w32 = WeightsAs(model.params, np.float32, profile.rounds_to)
    n32 = embed_normalizer(cfg.d_model, np.float32, round_to=profile.dtype if profile.rounds_to else None)
    honest = honest_edit(profile, w32, cfg, T)
    F = forward(w32, cfg, tokens, normalizer=n32, edit=honest)
    P: dict = {}
    Pflow = forward(w64, cfg, tokens, normalizer=n64, edit=replay_edit(theirs, P))
    Q: dict = {}
    given = {name: R[name] for name in theirs}
    forward(w32, cfg, tokens, normalizer=n32,
            edit=replay_edit(given, Q, honest=honest, cast=lambda n, a: a.astype(np.float32)))
    return _Runs(R, F, P, Pflow, Q, w64)
