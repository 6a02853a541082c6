"""TransformerLens 4.x (`TransformerBridge`) as the other side of `refprism compare`, in refprism's names.

    cap = capture("path/to/gemma-checkpoint", ids)   # boots TransformerBridge.boot_transformers(dir), run_with_cache
    cap = capture(bridge, ids)                        # or a bridge the user already booted

The bridge wraps HF transformers' own Gemma modules (eager attention) and fires TransformerLens-style hooks around
them; `run_with_cache(ids)` returns every hook's tensor with a batch axis. `scheme_tl` maps one hook name + tensor
to refprism sites; `capture` runs it over the whole cache; a dump file keyed by TL hook names is read with the same
function. Checked against refprism's own record on tiny Gemma 1, 2 and 3 checkpoints (tests/test_other_tl.py);
TransformerLens 4.3.0 boots all three (adapters gemma1.py, gemma2.py, gemma3.py), and Gemma 4 (gemma4_text.py:
GEMMA4_BLOCK_HOOKS below; tests/test_compare_gemma4.py).

    TL hook (after "blocks.l." for a block)   TL shape (no batch)   refprism site               transform
    hook_embed                                [T, D]                embed                       -
    hook_resid_pre                            [T, D]                blocks.l.resid_pre          -
    ln1.hook_scale                            [T, 1]                blocks.l.ln1.scale          drop the 1
    ln1.hook_out                              [T, D]                blocks.l.ln1.out            - (not when folded)
    attn.hook_q / attn.hook_k                 [T, N|K, H]           attn.q_pre / attn.k_pre     - (before q/k norm,
                                                                                                  RoPE)
    attn.hook_v                               [T, K, H]             attn.v                      -
    attn.q_norm.hook_scale (Gemma 3)          [N, T, 1]             attn.q_norm.scale [T, N]    drop the 1, transpose
    attn.k_norm.hook_scale (Gemma 3)          [K, T, 1]             attn.k_norm.scale [T, K]    drop the 1, transpose
    attn.hook_rot_q / attn.hook_rot_k         [T, N|K, H]           attn.q / attn.k             - (after RoPE)
    attn.hook_attn_scores (Gemma 1, 3)        [N, T, S]             attn.scores                 a Summary of the
                                                                                                unmasked entries
    attn.hook_pattern                         [N, T, S]             attn.pattern                -
    attn.hook_z                               [T, N, H]             attn.z                      -
    attn.hook_out (Gemma 2, 3)                [T, D]                attn.o_proj                 -
    ln1_post.hook_scale (Gemma 2, 3)          [T, 1]                ln1_post.scale              drop the 1
    hook_attn_out                             [T, D]                attn.out (after the post-norm on Gemma 2/3)
    hook_resid_mid                            [T, D]                resid_mid                   -
    ln2.hook_scale / ln2.hook_out             [T, 1] / [T, D]       ln2.scale / ln2.out
    mlp.hook_pre / hook_pre_linear / hook_post  [T, F]              mlp.gate / mlp.up / mlp.act
    mlp.hook_out (Gemma 2, 3)                 [T, D]                mlp.down                    -
    ln2_post.hook_scale (Gemma 2, 3)          [T, 1]                ln2_post.scale              drop the 1
    hook_mlp_out                              [T, D]                mlp.out (after the post-norm on Gemma 2/3)
    hook_resid_post                           [T, D]                resid_post                  -
    ln_final.hook_scale / ln_final.hook_out   [T, 1] / [T, D]       ln_final.scale / ln_final.out
    hook_unembed                              [T, V]                Gemma 2: logits_uncapped (HF soft-caps after the
                                                                    lm_head, outside the hook); Gemma 1/3: logits
    logits (the bridge's output, or a dump's key "logits")  [T, V]  logits

Where TransformerLens' conventions differ, and what is done (each one is a note of the capture):
- `*.hook_scale` is s = sqrt(mean(x^2) + eps), refprism's own convention (HookedTransformer's denominator).
- `*.hook_normalized` is x / s before the (1 + w) weight: refprism records no such site; not compared.
- Gemma 3's `attn.hook_q_normed` / `hook_k_normed` (after the q/k norm, before RoPE): no refprism site; not compared.
- `attn.hook_attn_scores` is the scaled score with the mask already applied (masked entries hold the dtype's most
  negative value, or -inf in compatibility mode); on Gemma 2 it is also soft-capped. refprism's attn.scores is
  before both, so on Gemma 1/3 only the unmasked entries (s <= t, inside the window) are compared, as a Summary
  with no total; on Gemma 2 the site is left out (attn.pattern compares what follows from it).
- Gemma 2/3's post-norms: the bridge's `hook_attn_out` / `hook_mlp_out` are after the post-norm (= refprism's
  attn.out / mlp.out); `attn.hook_out` / `mlp.hook_out` are the o_proj / down_proj outputs before it.
- Compatibility mode (`enable_compatibility_mode()`, HookedTransformer's processed weights): for Gemma's RMSNorm,
  TransformerLens centres no writing weights (only LayerNorm models are centred), but `fold_ln` folds each
  (1 + w) into the next matrices, so `ln*.hook_out` becomes x / s, and `center_unembed` subtracts each position's
  mean over the vocabulary from the logits (TransformerLens skips it when the logits are soft-capped: Gemma 2).
  Both are detected from the bridge's own weights (a folded norm weight is all 0, a centred unembedding has zero
  mean over the vocabulary); the sites they change are left out with a note. Everything else still maps.
- `refactor_factored_attn_matrices` (off by default, experimental) would change q, k, v and z; it is not detected.
"""

from __future__ import annotations

import numpy as np

from refprism.crosscheck.capture import Capture, Summary
from refprism.errors import InputError
from refprism.gemma.config import Config
from refprism.gemma.record import SITE_LETTERS

TRANSFORMER_LENS = "4.3.0"  # the version these mappings are checked with (pyproject's extra `tl`)

# TL hook name after "blocks.{l}." -> (refprism site after "blocks.{l}.", TL's axes without the batch, family switch)
# A "1" axis is TL's kept singleton (the norm scales' keepdim); the family switch names the Config flag the site
# needs, as record.RECORD_TABLE does.
BLOCK_HOOKS: dict[str, tuple[str, str, str | None]] = {
    "hook_resid_pre": ("resid_pre", "TD", None),
    "ln1.hook_scale": ("ln1.scale", "T1", None),
    "ln1.hook_out": ("ln1.out", "TD", None),
    "attn.hook_q": ("attn.q_pre", "TNH", None),
    "attn.hook_k": ("attn.k_pre", "TKH", None),
    "attn.hook_v": ("attn.v", "TKH", None),
    "attn.q_norm.hook_scale": ("attn.q_norm.scale", "NT1", "qk_norm"),
    "attn.k_norm.hook_scale": ("attn.k_norm.scale", "KT1", "qk_norm"),
    "attn.hook_rot_q": ("attn.q", "TNH", None),
    "attn.hook_rot_k": ("attn.k", "TKH", None),
    "attn.hook_attn_scores": ("attn.scores", "NTS", None),
    "attn.hook_pattern": ("attn.pattern", "NTS", None),
    "attn.hook_z": ("attn.z", "TNH", None),
    "attn.hook_out": ("attn.o_proj", "TD", "post_norms"),
    "ln1_post.hook_scale": ("ln1_post.scale", "T1", "post_norms"),
    "hook_attn_out": ("attn.out", "TD", None),
    "hook_resid_mid": ("resid_mid", "TD", None),
    "ln2.hook_scale": ("ln2.scale", "T1", None),
    "ln2.hook_out": ("ln2.out", "TD", None),
    "mlp.hook_pre": ("mlp.gate", "TF", None),
    "mlp.hook_pre_linear": ("mlp.up", "TF", None),
    "mlp.hook_post": ("mlp.act", "TF", None),
    "mlp.hook_out": ("mlp.down", "TD", "post_norms"),
    "ln2_post.hook_scale": ("ln2_post.scale", "T1", "post_norms"),
    "hook_mlp_out": ("mlp.out", "TD", None),
    "hook_resid_post": ("resid_post", "TD", None),
}
# Gemma 4 (TransformerLens 4.3's gemma4_text adapter): the bridge hooks HF's Gemma 4 modules by their HF names,
# besides the table above. Its attn.hook_q / hook_k are the projections (before the q/k norms and RoPE); the value
# norm's input and output are the values before and after v_norm; there is no hook after RoPE (attn.q, attn.k are
# not compared: the replay computes them and the pattern compares what follows). Its attn.hook_attn_scores holds
# the softmaxed pattern, the same values as hook_pattern (measured on TransformerLens 4.3.0; tested): not the
# scores, so not compared. A KV-sharing consumer has no k/v hooks. "moe" / "ple" are the Config flags of the MoE
# and the per-layer inputs.
GEMMA4_BLOCK_HOOKS: dict[str, tuple[str, str, str | None]] = {
    **{k: v for k, v in BLOCK_HOOKS.items() if k not in ("attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                                                         "attn.hook_attn_scores")},
    "attn.hook_v": ("attn.v_pre", "TKH", None),
    "attn.v_norm.hook_in": ("attn.v_pre", "TKH", None),
    "attn.v_norm.hook_out": ("attn.v", "TKH", None),
    "post_feedforward_layernorm_1.hook_out": ("mlp.dense", "TD", "moe"),
    "pre_feedforward_layernorm_2.hook_out": ("ln2_moe.out", "TD", "moe"),
    "experts.hook_out": ("moe.down", "TD", "moe"),
    "post_feedforward_layernorm_2.hook_out": ("moe.out", "TD", "moe"),
    "ln2_post.hook_in": ("mlp.sum", "TD", "moe"),
    "per_layer_input_gate.hook_in": ("resid_mlp", "TD", "ple"),
    "per_layer_input_gate.hook_out": ("ple.gate", "TP", "ple"),
    "per_layer_projection.hook_in": ("ple.act", "TP", "ple"),
    "per_layer_projection.hook_out": ("ple.proj", "TD", "ple"),
    "post_per_layer_input_norm.hook_out": ("ple.out", "TD", "ple"),
}
GLOBAL_HOOKS: dict[str, tuple[str, str, str | None]] = {
    "hook_embed": ("embed", "TD", None),
    "ln_final.hook_scale": ("ln_final.scale", "T1", None),
    "ln_final.hook_out": ("ln_final.out", "TD", None),
    "hook_unembed": ("logits", "TV", None),  # Gemma 2: logits_uncapped (scheme_tl)
    "logits": ("logits", "TV", None),
}
NORM_OUTPUTS = ("ln1.out", "ln2.out", "ln_final.out")  # what fold_ln changes: x / s * (1 + w) becomes x / s




def allowed(cfg: Config, l: int, T: int) -> np.ndarray:
    """[T, S] bool: the sources query t attends to in layer l (s <= t, and t - s < window on a sliding layer)."""
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    ok = s <= t
    if cfg.is_sliding(l) and cfg.sliding_window is not None:
        ok &= t - s < cfg.sliding_window
    return ok


def scheme_tl(name: str, array, cfg: Config, *, folded_norms=False, centered_unembed=False):
    """One TransformerLens hook tensor -> [(refprism site, array or Summary)], or [] for hooks that map to nothing.

    array: the hook's tensor (NumPy or torch), with or without TL's batch axis of 1. folded_norms /
    centered_unembed: the weights were processed (compatibility mode's fold_ln / center_unembed): the norm outputs /
    logits are then other quantities and map to nothing. A hook of the table with a shape that does not fit the
    model raises InputError.
    """
    if name.startswith("blocks."):
        table = GEMMA4_BLOCK_HOOKS if cfg.gemma4 else BLOCK_HOOKS
        parts = name.split(".", 2)
        if len(parts) < 3 or not parts[1].isdecimal() or parts[2] not in table:
            return []
        layer = int(parts[1])
        if layer >= cfg.n_layers:
            raise InputError(f"{name}: layer {layer}, but the model has layers 0 .. {cfg.n_layers - 1}")
        site_end, axes, when = table[parts[2]]
        site = f"blocks.{layer}.{site_end}"
    elif name in GLOBAL_HOOKS:
        layer = None
        site_end, axes, when = GLOBAL_HOOKS[name]
        if name == "hook_unembed" and cfg.final_softcap is not None:
            site_end = "logits_uncapped"  # HF soft-caps after lm_head, outside the hook
        site = site_end
    else:
        return []
    if when is not None and not getattr(cfg, when):
        return []
    if folded_norms and site_end in NORM_OUTPUTS:
        return []
    if centered_unembed and site_end in ("logits", "logits_uncapped"):
        return []
    a = _numpy(array)
    if a.ndim == len(axes) + 1:
        if a.shape[0] != 1:
            raise InputError(f"{name}: a batch of {a.shape[0]} prompts; compare one prompt at a time")
        a = a[0]
    T = a.shape[axes.index("T")] if a.ndim == len(axes) else 0
    K, H, F = (cfg.n_kv_heads, cfg.d_head, cfg.d_mlp) if layer is None else \
        (cfg.kv_heads_of(layer), cfg.head_dim_of(layer), cfg.mlp_width_of(layer))  # Gemma 4: by layer
    sizes = {"T": T, "S": T, "D": cfg.d_model, "N": cfg.n_heads, "K": K, "H": H, "F": F, "V": cfg.vocab_size,
             "P": cfg.d_ple, "1": 1}
    want = tuple(sizes[c] for c in axes)
    if a.shape != want:
        raise InputError(f"{name}: shape {list(a.shape)}, but TransformerLens' {name.split('.', 2)[-1]} for this "
                         f"model is [{', '.join(axes)}] = {list(want)}")
    letters = SITE_LETTERS[site_end]
    kept = [c for c in axes if c != "1"]
    a = a.reshape([sizes[c] for c in kept]).transpose([kept.index(c) for c in letters])
    if site_end == "attn.scores":
        if cfg.attn_softcap is not None:
            return []  # soft-capped and masked: refprism's attn.scores is before both (module docstring)
        ok = np.broadcast_to(allowed(cfg, layer, T), a.shape)
        elements = {idx: float(a[idx]) for idx in zip(*np.nonzero(ok))}
        return [(site, Summary(shape=a.shape, elements=elements, total=None))]
    return [(site, a)]


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def notes(cfg: Config, *, folded_norms=False, centered_unembed=False) -> list[str]:
    """The conventions of a TransformerLens capture of this model, one line each (module docstring)."""
    out = [
        "TL's *.hook_scale is s = sqrt(mean(x^2) + eps), as refprism's; *.hook_normalized (x / s before the "
        "(1 + w) weight) has no refprism site: not compared",
    ]
    if not cfg.gemma4:
        out.append("TL's attn.hook_q / hook_k are before RoPE (attn.q_pre / k_pre); hook_rot_q / hook_rot_k after it "
                   "(attn.q / k)")
    if cfg.qk_norm:
        out.append("Gemma 3: TL's attn.hook_q_normed / hook_k_normed (after the q/k norm, before RoPE) have no "
                   "refprism site: not compared")
    if cfg.attn_softcap is not None:
        out.append("Gemma 2: TL's attn.hook_attn_scores is soft-capped and masked; refprism's attn.scores is before "
                   "both: left out (attn.pattern is compared)")
    elif not cfg.gemma4:
        out.append("TL's attn.hook_attn_scores is masked (dtype min or -inf): only its unmasked entries are compared")
    if cfg.post_norms:
        out.append("Gemma 2/3: TL's hook_attn_out / hook_mlp_out are after the post-norms (= attn.out / mlp.out); "
                   "attn.hook_out / mlp.hook_out before them (= attn.o_proj / mlp.down)")
    if cfg.final_softcap is not None:
        out.append("Gemma 2/4: TL's hook_unembed is before the final soft-cap (= logits_uncapped); the bridge's "
                   "output is the capped logits")
    if cfg.gemma4:
        out.append("Gemma 4: TL hooks HF's modules by their names (v_norm's input and output, the MoE's norms, "
                   "experts and sum, the per-layer input's gate and projection); no hook after RoPE: attn.q / attn.k "
                   "are not compared, nor the norm scales, the router or the layer_scalar product (HF scales the "
                   "layer's output in place)")
        out.append("Gemma 4: TL 4.3's attn.hook_attn_scores holds the softmaxed pattern (= hook_pattern), not the "
                   "scores: attn.scores is not compared")
    if folded_norms:
        out.append("compatibility mode folded the norm weights (1 + w) into the next matrices: TL's ln1/ln2/"
                   "ln_final.hook_out are x / s, not refprism's ln*.out: left out")
    if centered_unembed:
        out.append("compatibility mode centred the unembedding: TL's logits lack each position's mean over the "
                   "vocabulary (log-softmax is unchanged): logits left out")
    return out


def config_of(bridge) -> Config:
    """refprism's Config of the HF model a bridge wraps."""
    return Config.from_hf(bridge.original_model.config.to_dict())


def processing(bridge, cfg: Config) -> tuple[bool, bool]:
    """(folded_norms, centered_unembed) of a bridge, read from its weights after compatibility-mode processing.

    Unprocessed bridges hold HF's weights: (False, False). A processed one folded the norms if every ln1, ln2 and
    ln_final weight is 0 (the (1 + w) offset's identity) and centred the unembedding if each of its columns over
    the vocabulary has mean 0 (to float rounding).
    """
    processed = bool(getattr(bridge, "_weights_processed", False) or getattr(bridge, "compatibility_mode", False))
    if not processed:
        return False, False
    norms = [bridge.ln_final.weight] + [w for b in bridge.blocks for w in (b.ln1.weight, b.ln2.weight)]
    folded = all(not bool(w.detach().abs().max() > 0) for w in norms)
    W = bridge.unembed.weight.detach().double()  # [V, D]
    centered = bool((W.mean(0).abs().max() <= 1e-6 * W.abs().max()).item())
    return folded, centered


def boot(model_dir, dtype="float32"):
    """TransformerBridge.boot_transformers on a local HF checkpoint directory, on the CPU, in `dtype`."""
    try:
        import torch
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise InputError(f"the TransformerLens side needs its extra: pip install 'refprism[tl]' "
                         f"(transformer-lens=={TRANSFORMER_LENS})") from None
    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise InputError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    return TransformerBridge.boot_transformers(str(model_dir), dtype=dtypes[dtype], device="cpu")


def capture(model, ids, *, dtype="float32") -> Capture:
    """TransformerLens' run of `ids` as a Capture: every mapped hook, in refprism's names and layout.

    model: a checkpoint directory (booted with `boot`) or an already-booted TransformerBridge (used as it is,
    compatibility mode or not). ids: token ids, run exactly as given (no BOS is prepended).
    """
    import torch

    bridge = model if hasattr(model, "run_with_cache") else boot(model, dtype)
    cfg = config_of(bridge)
    ids = np.asarray([int(i) for i in ids], dtype=np.int64)
    if ids.size == 0:
        raise InputError("the token id list is empty")
    folded, centered = processing(bridge, cfg)
    with torch.no_grad():
        out, cache = bridge.run_with_cache(torch.tensor(ids[None]))
    word = str(next(bridge.original_model.parameters()).dtype).removeprefix("torch.")
    cap = Capture(source="tl", tokens=ids, dtype=word, notes=notes(cfg, folded_norms=folded, centered_unembed=centered))
    items = [("logits", out)] + [(name, cache[name]) for name in cache.keys()]  # the output first: it is "logits"
    for name, value in items:
        for site, mapped in scheme_tl(name, value, cfg, folded_norms=folded, centered_unembed=centered):
            if site in cap.arrays or site in cap.summaries:
                continue  # an alias of a hook already taken (e.g. blocks.l.hook_in and hook_resid_pre)
            (cap.summaries if isinstance(mapped, Summary) else cap.arrays)[site] = mapped
    return cap
