"""Interventions: patch or ablate any component, and set its frozen prism term beside its causal effect.

A prism term is a *frozen direct* contribution: norm scales, attention patterns and gelu(gate) factors held at
their recorded values. This module measures, for one component replaced by another value, four numbers of one
readout (the logits readout of prisms.logits_readout: targets minus the mean of the foils, pre-cap on Gemma 2):

    prism   = u . (c - c')                         the frozen term of the change (exact, linear; u from prisms.py)
    direct  = f(x) - f(x + d)                      only the norms on the direct path recomputed (the component's
                                                   own post-norm on Gemma 2/3, then the final norm); every later
                                                   component held at its recorded output (no forward pass)
    total   = m(base) - m(patched)                 a re-run with the component replaced (resumed at its layer)
    norm_rescaling = direct - prism                what the recomputed norms did to the term (self-repair by the norm)
    mediated       = total - direct                what later layers did with the change

where c is the component's value in the base run and c' its replacement at the same position, x the final residual
at the readout position, d the change the replacement makes to the residual there, f the readout with the final
norm recomputed, and m the readout of a run. docs/math.md section 3.10 derives each line.

**Sign.** An effect is always "the readout with the component as in the clean prompt minus the readout with it
replaced". Noising (the default) edits the clean run, so effect = m(clean) - m(patched), and under zero ablation
a component that helps the target has a positive effect, the same sign and (frozen) value as its prism term.
Denoising edits the counterfactual run with clean values, so effect = m(patched) - m(counterfactual): the readout
each clean component restores. Every number (prism, direct, total) uses the same sign.

**Components** (the prisms' labels, 0-based): `embed`, `L{l}.attn`, `L{l}.mlp` (a sublayer's output, what the
residual receives), `L{l}H{h}` (the head's z, before W_O), `L{l}H{h}.src{s}` (one head x source term
pattern[h,t,s] v[s] of z, pattern and values of the rest untouched), `L{l}N{n}` (the neuron's activation
gelu(gate) * up). Gemma 4 adds `L{l}.ple` (the per-layer input term), `L{l}.dense` (the MoE's dense branch after
its post-norm) and `L{l}E{e}` (expert e's output, where the router chose it; its router weight stays); every term
carries the layer_scalars after it, and a KV-sharing consumer's edges read its producer's values.
Each is replaced at chosen query positions (default: the readout position).

**Ablations.** zero: c' = 0. mean: the mean of the component over positions 1 .. T-1 of each reference prompt
(or of the prompt itself): position 0 reads only itself and carries Gemma's attention sink, so its activations
are outliers by orders of magnitude and are left out of every mean; for a head x source term, the mean term over
every (query, source) edge of those positions. resample: the component's value in the counterfactual prompt at
the same position (same token count); noising or denoising.

Edits go through the forward pass's one edit hook (forward.forward's edit=), and a re-run resumes at the first
edited layer from the base run's record (resume=): bit for bit a full re-run, at the cost of the layers after it.
Axis letters as in ops.py; C components, Z readout columns, P edited positions, W a component's width (D, H or 1).

    components.py  labels -> Groups, the groups of a level, activations and means
    edit.py        the edit (forward's one edit hook) and the resumed re-run
    setting.py     the setting (prompt, readout, ablation, direction) and prism / direct / total of a component
    patching.py    patch(): one component; the JSON of patch and validate
    agreement.py   rank agreement statistics with exact intervals
    validation.py  validate(): every component of a level, agreement, faithfulness
    attribution.py the gradient methods beside them (gradient x activation, AtP, AtP*, GradDrop, integrated
                   gradients) on gradients.backward: attribute(), validate(methods=...)
    edges.py       edge attribution (EAP, EAP-IG) between embed, heads (q, k, v), MLPs or neurons and the logits,
                   the edge count, and the exact patch of one edge: attribute_edges(), edge_patch()
    plots.py       the validation figure

Public: patch, validate, Patch, Validation, Group, parse_component, level_groups, setting, Setting, Edit, rerun,
the agreement statistics, attribute, METHODS, attribute_edges, edge_patch, edge_count,
EDGE_METHODS. May import: gradients, prisms, model, gemma, errors, files, figures
(not other capabilities).
"""

from refprism.interventions.agreement import (
                                              agreement,
                                              binomial_upper,
                                              kendall,
                                              ranks,
                                              reruns_to_top_k,
                                              spearman,
                                              top_set,
)
from refprism.interventions.attribution import METHODS, QK_METHODS, Attribution, MethodsValidation, attribute
from refprism.interventions.components import (
                                              KINDS,
                                              LABEL_FORMS,
                                              LEVELS,
                                              Group,
                                              activation,
                                              level_groups,
                                              mean_activation,
                                              parse_component,
)
from refprism.interventions.edges import EDGE_METHODS, EdgeAttribution, attribute_edges, edge_count, edge_patch
from refprism.interventions.edit import Edit, rerun
from refprism.interventions.patching import Patch, patch
from refprism.interventions.setting import (
                                              ABLATIONS,
                                              CHUNK,
                                              DIRECTIONS,
                                              Readings,
                                              Setting,
                                              deltas,
                                              direct_effects,
                                              prism_terms,
                                              residual_changes,
                                              setting,
                                              total_effect,
)
from refprism.interventions.validation import Validation, faithfulness_grid, recovered_curve, validate

__all__ = ["METHODS", "QK_METHODS", "Attribution", "MethodsValidation", "attribute",
           "EDGE_METHODS", "EdgeAttribution", "attribute_edges", "edge_count", "edge_patch",
           "ABLATIONS", "CHUNK", "DIRECTIONS", "KINDS", "LABEL_FORMS", "LEVELS", "Edit", "Group", "Patch",
           "Readings", "Setting", "Validation", "activation", "agreement", "binomial_upper", "deltas",
           "direct_effects", "faithfulness_grid", "kendall", "level_groups", "mean_activation", "parse_component",
           "patch", "prism_terms", "ranks", "recovered_curve", "rerun", "reruns_to_top_k", "residual_changes",
           "setting", "spearman", "top_set", "total_effect", "validate"]
