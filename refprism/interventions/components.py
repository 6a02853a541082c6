"""Components and levels: the labels validate and patch take (embed, L{l}.attn, L{l}.mlp, L{l}H{h},
L{l}H{h}.src{s}, L{l}N{n}) parsed into `Group`s, the groups of a level, and a component's activation and mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from refprism.errors import InputError
from refprism.gemma import ops

KINDS = ("embed", "attn", "mlp", "head", "edge", "neuron")  # every Gemma
# Gemma 4 only: the per-layer input term, the MoE's dense branch, experts
GEMMA4_KINDS = ("ple", "dense", "expert")


LABEL_FORMS = "embed, L{l}.attn, L{l}.mlp, L{l}H{h}, L{l}H{h}.src{s} or L{l}N{n}"
GEMMA4_FORMS = "Gemma 4 also L{l}.ple, L{l}.dense, L{l}E{e}"


_LABEL = re.compile(r"(embed)|L(\d+)\.(attn|mlp|ple|dense)|L(\d+)H(\d+)(?:\.src(\d+))?|L(\d+)N(\d+)|L(\d+)E(\d+)")
# Gemma 4 components: the per-layer input term (ple.out), the MoE's dense branch after its post-norm (mlp.dense),
# one expert's output (moe.expert_out at the top-k slot that chose it; unweighted: its router weight stays)
_SITES = {"embed": "embed", "attn": "attn.out", "mlp": "mlp.out", "head": "attn.z", "edge": "attn.z",
          "neuron": "mlp.act", "ple": "ple.out", "dense": "mlp.dense", "expert": "moe.expert_out"}
RESIDUAL_LIKE = ("embed", "attn", "mlp", "ple", "dense")  # one [D] vector each


@dataclass(frozen=True, eq=False)
class Group:
    """Components of one kind at one layer, one row each: the unit every computation here is vectorized over.

    kind:   embed | attn | mlp (one component: a residual part) | head | edge (head x source) | neuron
    layer:  -1 for embed
    index:  [C] the head or neuron of each row (0 for embed, attn, mlp)
    source: [C] the source position of each edge (-1 otherwise)
    """

    kind: str
    layer: int
    index: np.ndarray
    source: np.ndarray

    def __len__(self):
        return len(self.index)

    @property
    def labels(self) -> list[str]:
        l = self.layer
        if self.kind == "embed":
            return ["embed"]
        if self.kind in ("attn", "mlp", "ple", "dense"):
            return [f"L{l}.{self.kind}"]
        if self.kind == "expert":
            return [f"L{l}E{e}" for e in self.index]
        if self.kind == "head":
            return [f"L{l}H{h}" for h in self.index]
        if self.kind == "edge":
            return [f"L{l}H{h}.src{s}" for h, s in zip(self.index, self.source)]
        return [f"L{l}N{n}" for n in self.index]

    @property
    def site(self) -> str:
        """The recorded site the edit replaces."""
        return "embed" if self.kind == "embed" else f"blocks.{self.layer}.{_SITES[self.kind]}"

    def take(self, rows) -> Group:
        rows = np.asarray(rows, dtype=int)
        return Group(self.kind, self.layer, self.index[rows], self.source[rows])


def _group(kind, layer=-1, index=(0,), source=None) -> Group:
    index = np.asarray(index, dtype=int)
    source = np.full(len(index), -1) if source is None else np.asarray(source, dtype=int)
    return Group(kind, layer, index, source)


def parse_component(config, label, *, T, source=None) -> Group:
    """A prism label -> a Group of one; an unknown label or an index out of range is a one-line InputError.

    source: a head's source position given apart (the CLI's --source): L{l}H{h} with source s is L{l}H{h}.src{s}.
    """
    if not isinstance(label, str) or not (m := _LABEL.fullmatch(label.strip())):
        raise InputError(f"component {label!r} is not a component label: use {LABEL_FORMS} (0-based); "
                         f"{GEMMA4_FORMS}")
    embed, la, kind, lh, h, s, ln, n, le, e = m.groups()
    if source is not None:
        if h is None:
            raise InputError(f"--source picks a head's source token: component {label!r} is not a head (L{{l}}H{{h}})")
        if s is not None:
            raise InputError(f"component {label!r} already names its source: drop --source")
        s = source
    if embed:
        return _group("embed")
    layer = int(la or lh or ln or le)
    if not 0 <= layer < config.n_layers:
        raise InputError(f"layer {layer} is out of range (the model has layers 0 .. {config.n_layers - 1})")
    if kind == "ple" and not config.ple:
        raise InputError(f"component {label!r}: this model has no per-layer embeddings (Gemma 4 E2B / E4B do)")
    if (kind == "dense" or e is not None) and not config.moe:
        raise InputError(f"component {label!r}: this model has no mixture of experts (Gemma 4 26B-A4B does)")
    if kind:
        return _group(kind, layer)
    if e is not None:
        if not 0 <= int(e) < config.n_experts:
            raise InputError(f"expert {e} is out of range (layer {layer} has experts 0 .. {config.n_experts - 1})")
        return _group("expert", layer, [int(e)])
    if n is not None:
        n = int(n)
        F = config.mlp_width_of(layer)
        if not 0 <= n < F:
            raise InputError(f"neuron {n} is out of range (layer {layer} has neurons 0 .. {F - 1})")
        return _group("neuron", layer, [n])
    h = int(h)
    if not 0 <= h < config.n_heads:
        raise InputError(f"head {h} is out of range (layer {layer} has heads 0 .. {config.n_heads - 1})")
    if s is None:
        return _group("head", layer, [h])
    s = int(s)
    if not 0 <= s < T:
        raise InputError(f"source {s} is out of range: the prompt has positions 0 .. {T - 1}")
    return _group("edge", layer, [h], [s])


LEVELS = "residual, heads, head-source:L, neurons:L, neurons or (Gemma 4 MoE) experts:L"


def level_groups(config, level: str, position: int) -> list[Group]:
    """The components of a validation level, in label order.

    residual: embed, L{l}.attn, L{l}.mlp;  heads: every L{l}H{h};  head-source:L: L{L}H{h}.src{s} for s <= the
    readout position (head-major, as attention_prism);  neurons:L: L{L}N{n};  neurons: every layer's neurons;
    experts:L (Gemma 4 MoE): L{L}E{e} for every expert (an expert the router did not choose at a position is 0
    there: its patch and its every score are 0).
    """
    L, N = config.n_layers, config.n_heads
    kind, _, arg = str(level).partition(":")
    if kind in ("residual", "heads", "neurons") and not arg:
        if kind == "residual":  # Gemma 4: the per-layer input term is a residual part of its own
            parts = ("attn", "mlp", "ple") if config.ple else ("attn", "mlp")
            return [_group("embed")] + [_group(k, l) for l in range(L) for k in parts]
        if kind == "heads":
            return [_group("head", l, range(N)) for l in range(L)]
        return [_group("neuron", l, range(config.mlp_width_of(l))) for l in range(L)]
    if kind == "experts" and not config.moe:
        raise InputError(f"--level {level!r}: this model has no mixture of experts (Gemma 4 26B-A4B does)")
    if kind in ("head-source", "neurons", "experts") and arg:
        if not (arg.isascii() and arg.isdigit()):
            raise InputError(f"--level {level!r}: the layer after ':' is a number, e.g. {kind}:3")
        l = int(arg)
        if not 0 <= l < L:
            raise InputError(f"layer {l} is out of range (the model has layers 0 .. {L - 1})")
        if kind == "neurons":
            return [_group("neuron", l, range(config.mlp_width_of(l)))]
        if kind == "experts":  # Gemma 4 MoE: each expert's weighted output where the router chose it
            return [_group("expert", l, range(config.n_experts))]
        h, s = np.divmod(np.arange(N * (position + 1)), position + 1)
        return [_group("edge", l, h, s)]
    raise InputError(f"--level {level!r} is not a level: use {LEVELS}")


def activation(model, record, g: Group, t: int) -> np.ndarray:
    """The components' values at query position t in a run's record.

    Math:   embed, attn, mlp: the residual part x[t] (embed, attn.out, mlp.out)          -> [1, D]
            head h:           z[t, h]                                                     -> [C, H]
            edge (h, s):      pattern[h, t, s] v[s, kv(h)]  (0 for s > t)                 -> [C, H]
            neuron n:         act[t, n] = gelu(gate[t, n]) up[t, n]                       -> [C, 1]
            Gemma 4: ple, dense: ple.out[t], mlp.dense[t] -> [1, D]; expert e: expert_out[t, j] at the slot j that
            chose e, 0 where the router did not choose it -> [1, D]; an edge of a KV-sharing consumer reads its
            producer's v
    """
    b = f"blocks.{g.layer}."
    cfg = model.config
    if g.kind in RESIDUAL_LIKE:
        return record[g.site][t][None]
    if g.kind == "expert":
        out = np.zeros((len(g), cfg.d_model), dtype=model.dtype)
        slots = record[b + "moe.topk.index"][t]
        for i, e in enumerate(g.index):
            if e in slots:
                out[i] = record[b + "moe.expert_out"][t, int(np.nonzero(slots == e)[0][0])]
        return out
    if g.kind == "head":
        return record[b + "attn.z"][t][g.index]
    if g.kind == "neuron":
        return record[b + "mlp.act"][t][g.index][:, None]
    kv = ops.kv_index(cfg.n_heads, cfg.kv_heads_of(g.layer))
    weight = record[b + "attn.pattern"][g.index, t, g.source] * (g.source <= t)  # [C] (causal: 0 for s > t)
    return weight[:, None] * record[f"blocks.{cfg.kv_source(g.layer)}.attn.v"][g.source, kv[g.index]]


def _site_rows(record, g: Group) -> np.ndarray:
    """activation(t) for every position t at once, from one read of the site: [T, C, W] (heads, neurons, residual
    parts; not experts or edges)."""
    value = record[g.site]
    if g.kind in RESIDUAL_LIKE:
        return value[:, None]
    if g.kind == "head":
        return value[:, g.index]
    return value[:, g.index][:, :, None]


def chosen(record, g: Group, t: int) -> np.ndarray:
    """Gemma 4: whether the router chose each expert of g at position t ([C] bool; True for other kinds)."""
    if g.kind != "expert":
        return np.ones(len(g), dtype=bool)
    return np.isin(g.index, record[f"blocks.{g.layer}.moe.topk.index"][t])


def mean_activation(model, runs, g: Group) -> np.ndarray:
    """The components' mean over positions 1 .. T-1 of every run (position 0, the attention sink, left out).

    Math:   heads, neurons, residual parts: mean_{run, t >= 1} activation(t)
            edge of head h: the mean term over every edge (t, s) with t >= 1 that the mask allows,
                            sum_{t >= 1} z[t, h] / #edges   (the terms of query t sum to z[t, h])
    Shapes: -> [C, W]
    """
    total, count = None, 0
    for run in runs:
        rec, T = run.record, len(run.tokens)
        if T < 2:
            continue
        if g.kind == "edge":
            b = f"blocks.{g.layer}."
            part = rec[b + "attn.z"][1:, g.index].sum(axis=0)  # [C, H]
            window = model.config.sliding_window if model.config.is_sliding(g.layer) else None
            n = int(ops.causal_mask(T, window)[1:].sum())
        elif g.kind == "expert":
            part = sum(activation(model, rec, g, t) for t in range(1, T))
            n = T - 1
        else:  # one read of the site (a long prompt's record recomputes a lazy one per read): rows 1 .. T-1 summed
            part = sum(_site_rows(rec, g)[1:])  # activation(t) added in position order (bit for bit as per t)
            n = T - 1
        total = part if total is None else total + part
        count += n
    if count == 0:
        raise EMPTY_MEAN_SET
    return total / np.asarray(count, dtype=total.dtype)


EMPTY_MEAN_SET = InputError("the mean set is empty: a mean is taken over positions 1 .. T-1 of each reference prompt "
                            "(position 0, the attention sink, is left out), so give a prompt of at least 2 tokens")
