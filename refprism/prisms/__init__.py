"""Logit prisms: exact decompositions of a readout of the residual stream, chained to any depth.

One mechanism. Freeze, at their recorded values, every RMSNorm scale, every attention pattern and every
gelu(gate) factor; what remains is linear. A *readout* is a matrix u [Z, D] applied to the residual stream at
one site and position; its value there is u . x. Every prism splits the vector x it reads into parts and reads
each part: values[c] = u . part_c, with sum_c values[c] = u . x exactly (up to float rounding, which is
reported as `residual`). The first readout reads the final residual into the logits:

    logit_t[p] = E[t] . (x_final[p] / s_final[p] * (1 + w_final)) = u_t . x_final[p],
    u_t = E[t] * (1 + w_final) / s_final[p]                                         (logits_readout)

and a readout *pulls back* through a head at a source token, or through a neuron, into a readout of an earlier
residual (through_head, through_neuron), where any prism can split it again. docs/math.md derives each line.

Residual sites: site k = 2l reads `blocks.{l}.resid_pre`, k = 2l + 1 reads `blocks.{l}.resid_mid`, k = 2L reads
the final residual (`blocks.{L-1}.resid_post`). The parts of the residual at site k are `embed` and every
sublayer output before it: `L{j}.attn` (sublayer 2j) and `L{j}.mlp` (sublayer 2j + 1), for 2j (+1) < k.

Labels (0-based): embed, L{l}.attn, L{l}.mlp, L{l}H{h}, L{l}H{h}.src{s}, L{l}N{n}; Gemma 4: L{l}.ple (per-layer
input; L{l}.ple.token / .embed), L{l}.dense and L{l}E{e} (the MoE's dense branch and experts), L{l}E{e}N{n}.
Gemma 4's layer_scalars are folded into every part (readouts.layer_scale), so the parts still sum to the whole.
Axis letters as in ops.py; Z is the readout axis (one row per target, or per target-minus-foils).

    readouts.py  targets and foils, the logits readout, pull-backs through a head or a neuron
    splits.py    the prisms (Split and the functions that make one)
    plots.py     the post's figures (Fig 3-9)

Public: every name below. May import: model, gemma, errors, files, figures.
"""

from refprism.prisms.readouts import (
                                      Readout,
                                      Targets,
                                      Token,
                                      check_head,
                                      check_neuron,
                                      expert_neuron_terms,
                                      expert_terms,
                                      gain,
                                      head_source_terms,
                                      layer_scale,
                                      logits_readout,
                                      needs,
                                      neuron_terms,
                                      ple_terms,
                                      resolve_position,
                                      resolve_targets,
                                      resolve_token,
                                      site_name,
                                      through_head,
                                      through_neuron,
                                      through_post_norm,
)
from refprism.prisms.splits import (
                                      TOLERANCE,
                                      Split,
                                      apply_map,
                                      attention_prism,
                                      expert_prism,
                                      head_split,
                                      mlp_prism,
                                      moe_prism,
                                      ple_prism,
                                      residual_parts,
                                      residual_prism,
                                      scaled_embeddings,
                                      unembedding_pca,
)

__all__ = ["TOLERANCE", "Readout", "Split", "Targets", "Token", "apply_map", "attention_prism", "check_head",
           "check_neuron", "expert_neuron_terms", "expert_prism", "expert_terms", "gain", "head_source_terms",
           "head_split", "layer_scale", "logits_readout", "mlp_prism", "moe_prism", "needs", "neuron_terms",
           "ple_prism", "ple_terms", "residual_parts", "residual_prism", "resolve_position", "resolve_targets",
           "resolve_token", "scaled_embeddings", "site_name", "through_head", "through_neuron", "through_post_norm",
           "unembedding_pca"]
