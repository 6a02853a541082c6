"""The record of one forward pass: activation name -> array, and the table of every name with its shape.

Names follow TransformerLens' style (`blocks.3.attn.pattern`), layers 0-based. Shapes use the axis letters of
refprism.config: T positions, S source positions (= T), D width, N query heads, K kv heads, H head width,
F MLP width, V vocabulary.
"""

from __future__ import annotations

from .config import Config

# (name, symbolic shape, meaning). `{l}` is a layer index. This table is the contract: a test checks a real run
# against it, name by name and shape by shape, and docs/math.md lists the same names.
RECORD_TABLE: list[tuple[str, tuple[str, ...], str, str | None]] = [
    ("embed", ("T", "D"), "token embedding times the normalizer sqrt(D) (= blocks.0.resid_pre)", None),
    ("blocks.{l}.resid_pre", ("T", "D"), "residual stream entering layer l", None),
    ("blocks.{l}.ln1.scale", ("T",), "s = sqrt(mean(x^2) + eps) of the attention's input norm", None),
    ("blocks.{l}.ln1.out", ("T", "D"), "the attention's normalized input x / s * (1 + w)", None),
    ("blocks.{l}.attn.q_norm.scale", ("T", "N"), "Gemma 3: each head's q norm scale, over H", "qk_norm"),
    ("blocks.{l}.attn.k_norm.scale", ("T", "K"), "Gemma 3: each kv head's k norm scale, over H", "qk_norm"),
    ("blocks.{l}.attn.q", ("T", "N", "H"), "queries after RoPE (and the q norm on Gemma 3)", None),
    ("blocks.{l}.attn.k", ("T", "K", "H"), "keys after RoPE (and the k norm on Gemma 3)", None),
    ("blocks.{l}.attn.v", ("T", "K", "H"), "values", None),
    ("blocks.{l}.attn.scores", ("N", "T", "S"), "q.k * scale before the soft-cap (Gemma 2), mask and softmax", None),
    ("blocks.{l}.attn.pattern", ("N", "T", "S"), "softmax attention weights (0 where s > t or outside the window)",
     None),
    ("blocks.{l}.attn.z", ("T", "N", "H"), "pattern-weighted values per head", None),
    ("blocks.{l}.attn.o_proj", ("T", "D"), "Gemma 2/3: o_proj output, before the post-attention norm", "post_norms"),
    ("blocks.{l}.ln1_post.scale", ("T",), "Gemma 2/3: the post-attention norm scale", "post_norms"),
    ("blocks.{l}.attn.out", ("T", "D"), "what attention adds to the residual: sum over heads of z W_O "
     "(Gemma 2/3: after the post-attention norm)", None),
    ("blocks.{l}.resid_mid", ("T", "D"), "after the attention residual add", None),
    ("blocks.{l}.ln2.scale", ("T",), "the MLP's input norm scale", None),
    ("blocks.{l}.ln2.out", ("T", "D"), "the MLP's normalized input", None),
    ("blocks.{l}.mlp.gate", ("T", "F"), "gate pre-activations", None),
    ("blocks.{l}.mlp.up", ("T", "F"), "up pre-activations", None),
    ("blocks.{l}.mlp.act", ("T", "F"), "gelu_tanh(gate) * up: the neuron activations", None),
    ("blocks.{l}.mlp.down", ("T", "D"), "Gemma 2/3: down_proj output, before the post-feedforward norm", "post_norms"),
    ("blocks.{l}.ln2_post.scale", ("T",), "Gemma 2/3: the post-feedforward norm scale", "post_norms"),
    ("blocks.{l}.mlp.out", ("T", "D"), "what the MLP adds to the residual: act W_down "
     "(Gemma 2/3: after the post-feedforward norm)", None),
    ("blocks.{l}.resid_post", ("T", "D"), "residual stream leaving layer l", None),
    ("ln_final.scale", ("T",), "final norm scale", None),
    ("ln_final.out", ("T", "D"), "the final norm's output, read by the unembedding", None),
    ("logits_uncapped", ("T", "V"), "Gemma 2: ln_final.out E^T before the final soft-cap", "final_softcap"),
    ("logits", ("T", "V"), "the model's logits: ln_final.out E^T (tied unembedding; Gemma 2: soft-capped)", None),
]


def _present(cfg: Config, when: str | None) -> bool:
    return when is None or bool(getattr(cfg, when))


def axis_sizes(cfg: Config, T: int) -> dict[str, int]:
    return {"T": T, "S": T, "D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.d_head,
            "F": cfg.d_mlp, "V": cfg.vocab_size}


def expected_shapes(cfg: Config, T: int) -> dict[str, tuple[int, ...]]:
    """Every recorded name of a run of T tokens with its concrete shape."""
    sizes = axis_sizes(cfg, T)
    out = {}
    for name, shape, _, when in RECORD_TABLE:
        if not _present(cfg, when):
            continue
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
