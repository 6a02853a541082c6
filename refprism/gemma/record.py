"""The record of one forward pass: activation name -> array, and the table of every name with its shape.

Names follow TransformerLens' style (`blocks.3.attn.pattern`), layers 0-based. Shapes use the axis letters of
refprism.gemma.config: T positions, S source positions (= T), D width, N query heads, K kv heads, H head width,
F MLP width, V vocabulary.
"""

from __future__ import annotations

import fnmatch
import functools
import math

import numpy as np

from refprism.errors import InputError
from refprism.gemma.config import Config

# (name, symbolic shape, meaning). `{l}` is a layer index. This table is the contract: a test checks a real run
# against it, name by name and shape by shape, and docs/math.md lists the same names.
RECORD_TABLE: list[tuple[str, tuple[str, ...], str, str | None]] = [
    ("embed", ("T", "D"), "token embedding times the normalizer sqrt(D) (= blocks.0.resid_pre)", None),
    ("ple.token", ("T", "L", "P"), "Gemma 4: E_ple[tokens] * sqrt(P), the per-layer inputs' token-identity piece",
     "ple"),
    ("ple.model_proj", ("T", "L", "P"), "Gemma 4: embed W_ple_model / sqrt(D), the piece linear in the embedding "
     "(before its norm)", "ple"),
    ("ple.model_proj_norm.scale", ("T", "L"), "Gemma 4: its RMSNorm scale over P", "ple"),
    ("ple.input", ("T", "L", "P"), "Gemma 4: (rms_norm(model_proj; ple_norm) + token) / sqrt(2); layer l reads "
     "[:, l]", "ple"),
    ("blocks.{l}.resid_pre", ("T", "D"), "residual stream entering layer l", None),
    ("blocks.{l}.ln1.scale", ("T",), "s = sqrt(mean(x^2) + eps) of the attention's input norm", None),
    ("blocks.{l}.ln1.out", ("T", "D"), "the attention's normalized input x / s * (1 + w) (Gemma 4: * w)", None),
    ("blocks.{l}.attn.q_pre", ("T", "N", "H"), "queries as projected, ln1.out W_Q (before the q norm and RoPE)", None),
    ("blocks.{l}.attn.k_pre", ("T", "K", "H"), "keys as projected, ln1.out W_K (before the k norm and RoPE); "
     "Gemma 4: not on a KV-sharing consumer", "kv"),
    ("blocks.{l}.attn.v", ("T", "K", "H"), "values (Gemma 1-3: ln1.out W_V)", "v_plain"),
    ("blocks.{l}.attn.v_pre", ("T", "K", "H"), "Gemma 4: values as projected, ln1.out W_V (k_eq_v layers: = k_pre)",
     "v_norm"),
    ("blocks.{l}.attn.q_norm.scale", ("T", "N"), "Gemma 3/4: each head's q norm scale, over H", "qk_norm"),
    ("blocks.{l}.attn.k_norm.scale", ("T", "K"), "Gemma 3/4: each kv head's k norm scale, over H", "k_norm"),
    ("blocks.{l}.attn.v_norm.scale", ("T", "K"), "Gemma 4: each kv head's v norm scale, over H (no learned weight)",
     "v_norm"),
    ("blocks.{l}.attn.q", ("T", "N", "H"), "queries after RoPE (and the q norm on Gemma 3/4)", None),
    ("blocks.{l}.attn.k", ("T", "K", "H"), "keys after RoPE (and the k norm on Gemma 3/4)", "kv"),
    ("blocks.{l}.attn.v", ("T", "K", "H"), "Gemma 4: values after v_norm: v_pre / s (what the pattern mixes)",
     "v_norm"),
    ("blocks.{l}.attn.scores", ("N", "T", "S"), "q.k * scale before the soft-cap (Gemma 2), mask and softmax; "
     "Gemma 4 KV-sharing consumer: against its producer's k", None),
    ("blocks.{l}.attn.pattern", ("N", "T", "S"), "softmax attention weights (0 where s > t or outside the window)",
     None),
    ("blocks.{l}.attn.z", ("T", "N", "H"), "pattern-weighted values per head", None),
    ("blocks.{l}.attn.o_proj", ("T", "D"), "Gemma 2/3/4: o_proj output, before the post-attention norm",
     "post_norms"),
    ("blocks.{l}.ln1_post.scale", ("T",), "Gemma 2/3/4: the post-attention norm scale", "post_norms"),
    ("blocks.{l}.attn.out", ("T", "D"), "what attention adds to the residual: sum over heads of z W_O "
     "(Gemma 2/3/4: after the post-attention norm)", None),
    ("blocks.{l}.resid_mid", ("T", "D"), "after the attention residual add", None),
    ("blocks.{l}.ln2.scale", ("T",), "the MLP's input norm scale", None),
    ("blocks.{l}.ln2.out", ("T", "D"), "the MLP's normalized input", None),
    ("blocks.{l}.mlp.gate", ("T", "F"), "gate pre-activations", None),
    ("blocks.{l}.mlp.up", ("T", "F"), "up pre-activations", None),
    ("blocks.{l}.mlp.act", ("T", "F"), "gelu_tanh(gate) * up: the neuron activations", None),
    ("blocks.{l}.mlp.down", ("T", "D"), "Gemma 2/3/4: down_proj output, before the post-feedforward norm",
     "post_norms"),
    ("blocks.{l}.ln2_post1.scale", ("T",), "Gemma 4 MoE: the dense branch's post-norm scale "
     "(post_feedforward_layernorm_1)", "moe"),
    ("blocks.{l}.mlp.dense", ("T", "D"), "Gemma 4 MoE: the dense branch, rms_norm(mlp.down; ln2_post1)", "moe"),
    ("blocks.{l}.moe.router.scale", ("T",), "Gemma 4 MoE: the router's norm scale of resid_mid (no learned weight)",
     "moe"),
    ("blocks.{l}.moe.router.logits", ("T", "E"), "Gemma 4 MoE: (resid_mid / s * router_scale / sqrt(D)) W_router",
     "moe"),
    ("blocks.{l}.moe.topk.index", ("T", "J"), "Gemma 4 MoE: the selected experts, by falling probability (int)",
     "moe"),
    ("blocks.{l}.moe.topk.weight", ("T", "J"), "Gemma 4 MoE: their softmax probabilities renormalised to sum 1, "
     "times per_expert_scale", "moe"),
    ("blocks.{l}.ln2_moe.scale", ("T",), "Gemma 4 MoE: the experts' input norm scale (pre_feedforward_layernorm_2)",
     "moe"),
    ("blocks.{l}.ln2_moe.out", ("T", "D"), "Gemma 4 MoE: the experts' normalized input", "moe"),
    ("blocks.{l}.moe.gate", ("T", "J", "G"), "Gemma 4 MoE: each selected expert's gate pre-activations", "moe"),
    ("blocks.{l}.moe.up", ("T", "J", "G"), "Gemma 4 MoE: each selected expert's up pre-activations", "moe"),
    ("blocks.{l}.moe.act", ("T", "J", "G"), "Gemma 4 MoE: each selected expert's neurons, gelu_tanh(gate) * up", "moe"),
    ("blocks.{l}.moe.expert_out", ("T", "J", "D"), "Gemma 4 MoE: each selected expert's output act W_down[e] "
     "(unweighted)", "moe"),
    ("blocks.{l}.moe.down", ("T", "D"), "Gemma 4 MoE: sum_j topk.weight[:, j] expert_out[:, j]", "moe"),
    ("blocks.{l}.ln2_post2.scale", ("T",), "Gemma 4 MoE: the experts' post-norm scale (post_feedforward_layernorm_2)",
     "moe"),
    ("blocks.{l}.moe.out", ("T", "D"), "Gemma 4 MoE: rms_norm(moe.down; ln2_post2)", "moe"),
    ("blocks.{l}.mlp.sum", ("T", "D"), "Gemma 4 MoE: mlp.dense + moe.out, before the post-feedforward norm", "moe"),
    ("blocks.{l}.ln2_post.scale", ("T",), "Gemma 2/3/4: the post-feedforward norm scale", "post_norms"),
    ("blocks.{l}.mlp.out", ("T", "D"), "what the MLP adds to the residual: act W_down "
     "(Gemma 2/3/4: after the post-feedforward norm; Gemma 4 MoE: of mlp.sum)", None),
    ("blocks.{l}.resid_mlp", ("T", "D"), "Gemma 4: resid_mid + mlp.out (before the per-layer input and "
     "layer_scalar)", "gemma4"),
    ("blocks.{l}.ple.gate", ("T", "P"), "Gemma 4: resid_mlp W_ple_gate", "ple"),
    ("blocks.{l}.ple.act", ("T", "P"), "Gemma 4: gelu_tanh(ple.gate) * ple.input[:, l]", "ple"),
    ("blocks.{l}.ple.proj", ("T", "D"), "Gemma 4: ple.act W_ple_proj, before its post-norm", "ple"),
    ("blocks.{l}.ple_post.scale", ("T",), "Gemma 4: the per-layer input's post-norm scale", "ple"),
    ("blocks.{l}.ple.out", ("T", "D"), "Gemma 4: what the per-layer input adds to the residual, "
     "rms_norm(ple.proj; ple_post)", "ple"),
    ("blocks.{l}.resid_post", ("T", "D"), "residual stream leaving layer l (Gemma 4: layer_scalar * (resid_mlp "
     "+ ple.out))", None),
    ("ln_final.scale", ("T",), "final norm scale", None),
    ("ln_final.out", ("T", "D"), "the final norm's output, read by the unembedding", None),
    ("logits_uncapped", ("T", "V"), "Gemma 2/4: ln_final.out E^T before the final soft-cap", "final_softcap"),
    ("logits", ("T", "V"), "the model's logits: ln_final.out E^T (tied unembedding; Gemma 2/4: soft-capped)", None),
]

# site name (without "blocks.{l}.") -> its axis letters: how another implementation's arrays are named by axis
SITE_LETTERS: dict[str, tuple[str, ...]] = {name.replace("blocks.{l}.", ""): shape
                                            for name, shape, _, _ in RECORD_TABLE}


# When a row of RECORD_TABLE is present: a condition on the model, or on the model and the layer (Gemma 4's
# KV-sharing consumers compute no k and v: they read their producer's, Config.kv_source)
_WHEN = {
    "kv": lambda cfg, l: cfg.has_kv(l),
    "v_plain": lambda cfg, l: not cfg.gemma4,
    "v_norm": lambda cfg, l: cfg.gemma4 and cfg.has_kv(l),
    "k_norm": lambda cfg, l: cfg.qk_norm and cfg.has_kv(l),
}


def _present(cfg: Config, when: str | None, l=None) -> bool:
    if when in _WHEN:
        return _WHEN[when](cfg, l)
    return when is None or bool(getattr(cfg, when))


def axis_sizes(cfg: Config, T: int, l: int | None = None) -> dict[str, int]:
    """Every axis letter's size in a run of T tokens, at layer l (Gemma 4's H, K and F differ by layer; E experts,
    J selected experts, G an expert's width, P the per-layer input width, L layers)."""
    K, H, F = (cfg.n_kv_heads, cfg.d_head, cfg.d_mlp) if l is None else \
        (cfg.kv_heads_of(l), cfg.head_dim_of(l), cfg.mlp_width_of(l))
    return {"T": T, "S": T, "D": cfg.d_model, "N": cfg.n_heads, "K": K, "H": H, "F": F, "V": cfg.vocab_size,
            "E": cfg.n_experts, "J": cfg.top_k, "G": cfg.d_expert, "P": cfg.d_ple, "L": cfg.n_layers}


def layer_of(name: str) -> int | None:
    """The layer of a record name (`blocks.3.attn.q` -> 3), None for embed, ple.*, ln_final and the logits."""
    if name.startswith("blocks."):
        return int(name.split(".", 2)[1])
    return None


@functools.lru_cache(maxsize=64)
def symbolic_shapes(cfg: Config) -> dict[str, tuple[str, ...]]:
    """Every recorded name of this model with its shape in axis letters, in forward order: embed, then layer by
    layer, then the final norm and the logits (shared: do not change the dict returned)."""
    rows = [(name, shape, when) for name, shape, _, when in RECORD_TABLE if "{l}" in name or _present(cfg, when)]
    first = next(i for i, (name, _, _) in enumerate(rows) if "{l}" in name)
    out = {name: shape for name, shape, _ in rows[:first]}
    for l in range(cfg.n_layers):
        out.update((name.format(l=l), shape) for name, shape, when in rows if "{l}" in name and _present(cfg, when, l))
    out.update((name, shape) for name, shape, _ in rows[first:] if "{l}" not in name)
    return out


def expected_shapes(cfg: Config, T: int) -> dict[str, tuple[int, ...]]:
    """Every recorded name of a run of T tokens with its concrete shape (each layer's own geometry)."""
    sizes = {None: axis_sizes(cfg, T)}
    out = {}
    for name, shape in symbolic_shapes(cfg).items():
        l = layer_of(name)
        if l not in sizes:
            sizes[l] = axis_sizes(cfg, T, l)
        out[name] = tuple(sizes[l][a] for a in shape)
    return out


def row_axis(cfg: Config, name: str) -> int:
    """The axis of `name` that runs over query positions T (0 for [T, ...], 1 for scores and pattern [N, T, S])."""
    return symbolic_shapes(cfg)[name].index("T")


# ------------------------------------------------------------------------------------------- selective records


class Selection:
    """Which recorded names a run keeps, and at which positions: `record=` of `Model.run` and `forward`.

    Each entry is a glob over record names (`fnmatch`: `blocks.*.attn.pattern`, `logits`), optionally followed by
    `@` and positions, comma separated, negative counting from the end: `blocks.*.attn.out@-1`, `logits@0,-1`.
    A name kept by several entries keeps the union of their positions ("all" wins). Positions index the T axis
    (the query axis of scores and pattern); sources S are always kept whole, since a prism sums over them.
    """

    def __init__(self, entries, *, everything: bool = False):
        if isinstance(entries, str):
            entries = [entries]
        # everything: the entries name every site (Model.run's positions= on a full record: the logits at some
        # positions only), and the run records as a full one does, its recipes (lazy_entry) included
        self.everything = everything
        self.entries: list[tuple[str, tuple[int, ...] | None]] = []
        self._rows: dict[tuple[str, int], object] = {}  # (name, T) -> rows, asked for at every site of a pass
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise InputError(f"a record entry is a name or glob (optionally @positions), got {entry!r}")
            glob, at, rows = entry.partition("@")
            if not at:
                self.entries.append((glob, None))
                continue
            try:
                positions = tuple(int(r) for r in rows.split(","))
            except ValueError:
                raise InputError(f"record entry {entry!r}: positions after @ are integers, comma separated "
                                 "(e.g. logits@-1 or blocks.*.attn.out@0,5)") from None
            self.entries.append((glob, positions))
        # a name's entries: literal names by a dict lookup, the globs by fnmatch (a full record made with
        # positions= names every site literally: hundreds of entries, asked at every site of a pass)
        self._literal: dict[str, list[int]] = {}
        self._globs: list[int] = []
        for i, (glob, _) in enumerate(self.entries):
            if any(c in glob for c in "*?["):
                self._globs.append(i)
            else:
                self._literal.setdefault(glob, []).append(i)

    def _matching(self, name: str):
        """The entries whose glob matches name, in the order given."""
        found = self._literal.get(name, []) + [i for i in self._globs
                                               if fnmatch.fnmatchcase(name, self.entries[i][0])]
        return [self.entries[i] for i in sorted(found)]

    def __repr__(self):
        return "Selection([" + ", ".join(repr(g + ("" if r is None else "@" + ",".join(map(str, r))))
                                         for g, r in self.entries) + "])"

    def rows(self, name: str, T: int):
        """None (not kept), ALL (every position) or a sorted tuple of positions 0 .. T-1 of `name`."""
        if (name, T) not in self._rows:
            self._rows[name, T] = self._find(name, T)
        return self._rows[name, T]

    def _find(self, name: str, T: int):
        found = None
        for glob, positions in self._matching(name):
            if positions is None:
                return ALL
            for p in positions:
                if not -T <= p < T:
                    raise InputError(f"record entry {glob}@{p}: position {p} is out of range for {T} tokens")
            found = (found or set()) | {p % T for p in positions}
        return None if found is None else tuple(sorted(found))

    def check(self, cfg: Config) -> None:
        """Every glob must name at least one site of this model: a typo is an error, never an empty record."""
        names = list(symbolic_shapes(cfg))
        for glob, _ in self.entries:
            if glob in self._literal and glob in symbolic_shapes(cfg):
                continue
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise InputError(f"record entry {glob!r} names no recorded site of this model (see "
                                 "refprism.RECORD_TABLE, e.g. blocks.3.attn.pattern)")


ALL = "all"


def everything_but(cfg: Config, names) -> Selection:
    """The Selection of every site of this model except `names` (e.g. the logits: a run that reads its readout
    from ln_final.out need not unembed)."""
    return Selection([n for n in symbolic_shapes(cfg) if n not in set(names)])


def whole_but_logits(cfg: Config, record, T: int) -> bool:
    """Whether a record of T tokens keeps every site whole, the logits perhaps only at some positions (a run made
    with Model.run's positions=): what the backward and the interventions read as a full record."""
    sel = record.selection
    return sel is None or all(dict.__contains__(record, n) and sel.rows(n, T) is ALL
                              for n in symbolic_shapes(cfg) if not n.startswith("logits"))


def as_selection(record) -> Selection | None:
    """None (everything), a Selection, a string or a list of strings -> Selection or None."""
    if record is None or isinstance(record, Selection):
        return record
    return Selection(record)


class Rows:
    """Some positions of a recorded array; the others were not kept (a selective record).

    Indexing takes positions of the whole run, as the full array would: `rows[p]`, `rows[:, p, :p + 1]` on a
    pattern. A position that was not kept is an error naming the site and the positions it holds, never another
    row's value.
    """

    def __init__(self, name: str, data: np.ndarray, positions, axis: int, length: int):
        self.name, self.data, self.axis, self.length = name, data, axis, length
        self.positions = tuple(int(p) for p in positions)
        self._index = {p: i for i, p in enumerate(self.positions)}

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the whole array this holds rows of."""
        shape = list(self.data.shape)
        shape[self.axis] = self.length
        return tuple(shape)

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"Rows({self.name}, positions {list(self.positions)} of {self.length}, shape {list(self.data.shape)})"

    def _local(self, p):
        if isinstance(p, slice):
            return [self._local(i) for i in range(*p.indices(self.length))]
        if isinstance(p, (list, tuple, np.ndarray)):
            return [self._local(int(i)) for i in np.asarray(p).ravel()]
        p = int(p)
        q = p % self.length if -self.length <= p < self.length else p
        if q not in self._index:
            raise MissingSite(f"the record keeps {self.name} only at positions {list(self.positions)}, not at {p}: "
                              f"record it there (record=[..., '{self.name}@{p}']) or record it whole")
        return self._index[q]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            raise MissingSite(f"{self.name} is a selective record: index its position axis explicitly")
        key = key + (slice(None),) * (self.axis + 1 - len(key))
        local = self._local(key[self.axis])
        return self.data[key[: self.axis] + (local,) + key[self.axis + 1:]]

    def __array__(self, dtype=None, copy=None):
        raise MissingSite(f"the record keeps {self.name} only at positions {list(self.positions)}: index it by "
                          "position (the whole array was not kept)")


class MissingSite(InputError, KeyError):
    """A site (or a position of it) that the run did not record: one line naming it and how to record it."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class Lazy:
    """A recorded value computed again when it is read, bit for bit as the pass computed it (the same function
    on the same recorded arrays): scores (from the recorded q and k) and the neuron activations (from the
    recorded gate and up) are the largest arrays of a long prompt's record after the pattern and the logits."""

    __slots__ = ("compute", "shape", "dtype", "keep")

    def __init__(self, compute, shape, dtype, keep=None):
        # compute reads its inputs through a weak reference to its record (no reference cycle: a dropped run's
        # record is freed at once, not at the next garbage collection); `keep` holds that record alive where the
        # entry is copied into another one (a run resumed from a clean record)
        self.compute, self.shape, self.dtype, self.keep = compute, tuple(shape), np.dtype(dtype), keep


class Record(dict):
    """name -> array for one run. A plain dict, plus `table()` to print the names, shapes and dtypes.

    A selective record (`selection` set) holds only what was asked for; asking for anything else is a
    MissingSite error naming it (a prism never reads a wrong number from a record that lacks its input).
    Some entries are Lazy: stored as the function that recomputes them exactly, resolved on every read.
    """

    selection: Selection | None = None

    def __missing__(self, name):
        if self.selection is not None:
            raise MissingSite(f"the run did not record {name} (it recorded a selection: {self.selection!r}): "
                              f"record it (record=[..., {name!r}]) or record everything")
        raise KeyError(name)

    def __getitem__(self, name):
        value = super().__getitem__(name)
        return value.compute() if isinstance(value, Lazy) else value

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __iter__(self):  # (overridden, so that dict(record) and **record read values through __getitem__)
        return super().__iter__()

    def values(self):  # one value at a time: a Lazy one is computed when its turn comes
        return (self[n] for n in self)

    def items(self):
        return ((n, self[n]) for n in self)

    def shape_of(self, name) -> tuple[int, ...]:
        """The shape of a recorded value without computing a Lazy one."""
        value = super().__getitem__(name)
        return tuple(value.shape)

    def table(self) -> str:
        width = max(map(len, self), default=0)
        return "\n".join(f"{n:<{width}}  {str(list(self.shape_of(n))):<20} {super(Record, self).__getitem__(n).dtype}"
                         for n in self)


# What a long single unedited prompt recording everything keeps as arrays (besides the norm scales): the rest is
# recomputed exactly when read (forward._Recorder, record.Lazy). Below LONG_PROMPT tokens the record is small and
# reading it often (a prism set reads every layer) must not re-read the weights: only the activations are lazy.
# From LONG_PROMPT tokens too, a record whose other sites would take at most LAZY_BUDGET bytes keeps them whole
# (Gemma 3 270M in float32 up to 667 tokens; gemma-2b's shape never): a backward then reads each layer as it is
# instead of computing it again (backward._Layers.layer).
LAZY_KEPT = {"embed", "resid_pre", "attn.pattern", "attn.out", "mlp.out", "resid_post", "logits", "logits_uncapped"}
LONG_PROMPT = 256
LAZY_BUDGET = 2**29


def _site(name: str) -> str:
    return name.split(".", 2)[-1] if name.startswith("blocks.") else name


def _long_lazy(site: str) -> bool:
    """A site a long prompt's record keeps as a recipe (on top of the scores and the neuron activations)."""
    return site not in LAZY_KEPT and not site.endswith("scale")


@functools.lru_cache(maxsize=256)
def _long_lazy_bytes(cfg: Config, T: int, dtype) -> int:
    """Bytes of the sites _long_lazy names (the scores and the activations aside) in a record of T tokens."""
    n = sum(math.prod(axis_sizes(cfg, T, layer_of(name))[a] for a in shape)
            for name, shape in symbolic_shapes(cfg).items()
            if _long_lazy(_site(name)) and _site(name) not in ("attn.scores", "mlp.act"))
    return n * np.dtype(dtype).itemsize


def long_record(cfg: Config, T: int, dtype) -> bool:
    """Whether one prompt of T tokens recording everything keeps most of each layer as recipes: from LONG_PROMPT
    tokens, where those sites would take more than LAZY_BUDGET bytes as arrays."""
    return T >= LONG_PROMPT and _long_lazy_bytes(cfg, T, np.dtype(dtype)) > LAZY_BUDGET


def lazy_entry(cfg: Config, name: str, lengths, selection, dtype, *, edited: bool) -> bool:
    """Whether a run stores `name` as a recipe (Lazy) rather than an array (see LAZY_KEPT, long_record).

    The scores are lazy whenever kept whole and not edited (each prompt's own q and k recompute them); the rest
    only for one prompt recording everything, unedited (selection None, or one made `everything`: the logits at
    some positions only): the neuron activations always (elementwise from the kept gate and up), every site
    outside LAZY_KEPT but the scales for a long record (long_record).
    """
    if edited:
        return False
    site = _site(name)
    if site == "attn.scores":
        return True
    if len(lengths) != 1 or (selection is not None and not selection.everything):
        return False
    return site == "mlp.act" or (_long_lazy(site) and long_record(cfg, lengths[0], dtype))


def estimate_bytes(cfg: Config, lengths, dtype, selection: Selection | None = None, *,
                   edited: bool = False) -> dict[str, int]:
    """Bytes a run of prompts with these lengths needs: what its record keeps, and the largest transient arrays.

    Lazy entries (lazy_entry) cost nothing; an edited run's record holds every value that flowed.
    Returns {"record": kept bytes, "logits": the kept logits (part of "record"), "attention": one layer's scores +
    pattern of the longest prompt (always computed, kept or not), "total": record + the transient attention and
    MLP arrays}.
    """
    record = logits = 0
    for T in lengths:
        r, g = prompt_bytes(cfg, T, dtype, selection, alone=len(lengths) == 1, edited=edited)
        record, logits = record + r, logits + g
    return with_transient(cfg, lengths, dtype, record, logits)


def prompt_bytes(cfg: Config, T: int, dtype, selection: Selection | None = None, *, alone: bool = True,
                 edited: bool = False) -> tuple[int, int]:
    """(record bytes, of which logits) that one prompt of T tokens keeps, alone or in a packed pass."""
    item = np.dtype(dtype).itemsize
    lengths = [T] if alone else [T, T]  # (lazy_entry only asks whether the prompt runs alone)
    record = logits = 0
    for name, shape in symbolic_shapes(cfg).items():
        rows = ALL if selection is None else selection.rows(name, T)
        if rows is None or (rows is ALL and lazy_entry(cfg, name, lengths, selection, dtype, edited=edited)):
            continue
        n = math.prod(axis_sizes(cfg, T, layer_of(name))[a] for a in shape)
        if rows is not ALL:
            n = n // T * len(rows)
        record += n * item
        if name.startswith("logits"):
            logits += n * item
    return record, logits


def with_transient(cfg: Config, lengths, dtype, record: int, logits: int) -> dict[str, int]:
    """estimate_bytes' result from the kept bytes: plus one layer's attention (longest prompt) and MLP arrays."""
    item = np.dtype(dtype).itemsize
    Tmax = max(lengths)
    attention = 2 * cfg.n_heads * Tmax * Tmax * item
    mlp = 3 * sum(lengths) * cfg.d_mlp * item
    return {"record": record, "logits": logits, "attention": attention, "total": record + attention + mlp}
