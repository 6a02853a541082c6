"""The record of one forward pass: activation name -> array, and the table of every name with its shape.

Names follow TransformerLens' style (`blocks.3.attn.pattern`), layers 0-based. Shapes use the axis letters of
refprism.config: T positions, S source positions (= T), D width, N query heads, K kv heads, H head width,
F MLP width, V vocabulary.
"""

from __future__ import annotations

from .config import Config

# (name, symbolic shape, meaning). `{l}` is a layer index. This table is the contract: a test checks a real run
# against it, name by name and shape by shape, and docs/math.md lists the same names.
RECORD_TABLE: list[tuple[str, tuple[str, ...], str]] = [
    ("embed", ("T", "D"), "token embedding times the normalizer sqrt(D) (= blocks.0.resid_pre)"),
    ("blocks.{l}.resid_pre", ("T", "D"), "residual stream entering layer l"),
    ("blocks.{l}.ln1.scale", ("T",), "s = sqrt(mean(x^2) + eps) of the attention's input norm"),
    ("blocks.{l}.ln1.out", ("T", "D"), "the attention's normalized input x / s * (1 + w)"),
    ("blocks.{l}.attn.q", ("T", "N", "H"), "queries after RoPE"),
    ("blocks.{l}.attn.k", ("T", "K", "H"), "keys after RoPE"),
    ("blocks.{l}.attn.v", ("T", "K", "H"), "values"),
    ("blocks.{l}.attn.scores", ("N", "T", "S"), "q.k * H^-0.5 before the causal mask and softmax"),
    ("blocks.{l}.attn.pattern", ("N", "T", "S"), "softmax attention weights (0 where s > t)"),
    ("blocks.{l}.attn.z", ("T", "N", "H"), "pattern-weighted values per head"),
    ("blocks.{l}.attn.out", ("T", "D"), "after o_proj: sum over heads of z W_O"),
    ("blocks.{l}.resid_mid", ("T", "D"), "after the attention residual add"),
    ("blocks.{l}.ln2.scale", ("T",), "the MLP's input norm scale"),
    ("blocks.{l}.ln2.out", ("T", "D"), "the MLP's normalized input"),
    ("blocks.{l}.mlp.gate", ("T", "F"), "gate pre-activations"),
    ("blocks.{l}.mlp.up", ("T", "F"), "up pre-activations"),
    ("blocks.{l}.mlp.act", ("T", "F"), "gelu_tanh(gate) * up: the neuron activations"),
    ("blocks.{l}.mlp.out", ("T", "D"), "after down_proj"),
    ("blocks.{l}.resid_post", ("T", "D"), "residual stream leaving layer l"),
    ("ln_final.scale", ("T",), "final norm scale"),
    ("ln_final.out", ("T", "D"), "the final norm's output, read by the unembedding"),
    ("logits", ("T", "V"), "raw logits: ln_final.out E^T (tied unembedding)"),
]


def axis_sizes(cfg: Config, T: int) -> dict[str, int]:
    return {"T": T, "S": T, "D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.d_head,
            "F": cfg.d_mlp, "V": cfg.vocab_size}


def expected_shapes(cfg: Config, T: int) -> dict[str, tuple[int, ...]]:
    """Every recorded name of a run of T tokens with its concrete shape."""
    sizes = axis_sizes(cfg, T)
    out = {}
    for name, shape, _ in RECORD_TABLE:
        concrete = tuple(sizes[a] for a in shape)
        if "{l}" in name:
            for l in range(cfg.n_layers):
                out[name.format(l=l)] = concrete
        else:
            out[name] = concrete
    return out


class Record(dict):
    """name -> array for one run. A plain dict, plus `table()` to print the names, shapes and dtypes."""

    def table(self) -> str:
        width = max(map(len, self), default=0)
        return "\n".join(f"{n:<{width}}  {str(list(a.shape)):<20} {a.dtype}" for n, a in self.items())
