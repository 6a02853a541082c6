"""Independence: refprism's total effects equal HF transformers patched the usual way, through forward hooks.

The HF side is written here from HF's own modules and never calls refprism: each patch is a hook on the module
whose input or output is the component (o_proj's input for a head's z, down_proj's input for a neuron, the
attention and MLP outputs the residual receives, the first decoder layer's input for the embedding), and its
values (a counterfactual's, a mean, a head x source term) come from HF runs of their own.

Tolerance (float32): 2e-5 absolute, the bar refprism's logits meet against HF's (tests/test_parity_family.py).
An effect is a difference of readouts, each a difference of logits, whose rounding errors are mostly shared by
both runs; measured here, the effects agree within 1.6e-6 (effects of 0.004 .. 2.2).
"""

import numpy as np
import pytest
import torch
import transformers

import refprism
from refprism import interventions as I

PROMPT = [2, 40, 77, 108, 300, 41, 9]  # 7 tokens: longer than the tiny Gemma 2/3 sliding window of 4
COUNTER = [2, 40, 77, 116, 300, 41, 9]
REFERENCE = [[2, 5, 6, 7, 8], [2, 11, 12, 13, 14, 15]]
TARGETS, FOILS = [108, 109], [116]
ATOL = 2e-5

CLASSES = {"tiny": transformers.GemmaForCausalLM, "tiny-gemma2": transformers.Gemma2ForCausalLM,
           "tiny-gemma3": transformers.Gemma3ForCausalLM}


class HF:
    """An HF model, run with hooks that replace one component's values at chosen positions."""

    def __init__(self, model_dir, preset):
        self.model = CLASSES[preset].from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        cfg = self.model.config
        self.N, self.K, self.H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.post_norms = preset != "tiny"

    def module(self, kind, layer):
        """(module, "in" | "out") whose input or output is the component's value."""
        m = self.model.model
        if kind == "embed":
            return m.layers[0], "in"  # the first layer's input is the scaled embedding x_0
        lay = m.layers[layer]
        return {"z": (lay.self_attn.o_proj, "in"), "act": (lay.mlp.down_proj, "in"),
                "attn": ((lay.post_attention_layernorm if self.post_norms else lay.self_attn.o_proj), "out"),
                "mlp": ((lay.post_feedforward_layernorm if self.post_norms else lay.mlp), "out"),
                "v": (lay.self_attn.v_proj, "out")}[kind]

    def run(self, ids, patches=(), capture=()):
        """patches: (kind, layer, fn) with fn(tensor [T, ...]) -> tensor; capture: (kind, layer) -> tensor [T, ...].
        Returns (pre-cap logits [T, V], logits [T, V], attentions, captured)."""
        got, hooks = {}, []
        for kind, layer, fn in patches:
            hooks.append(self._hook(kind, layer, fn, None))
        for kind, layer in capture:
            hooks.append(self._hook(kind, layer, None, (got, (kind, layer))))
        pre = {}
        hooks.append(self.model.lm_head.register_forward_hook(lambda m, i, o: pre.update(logits=o)))
        try:
            with torch.no_grad():
                out = self.model(torch.tensor([ids]), output_attentions=True, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return pre["logits"][0].double().numpy(), out.logits[0].double().numpy(), out.attentions, got

    def _hook(self, kind, layer, fn, store):
        module, where = self.module(kind, layer)

        def change(t):  # t [1, T, ...]: patch or store the batch's only row
            if store is not None:
                store[0][store[1]] = t[0].detach().clone()
                return t
            new = t.clone()
            new[0] = fn(t[0].clone())
            return new

        if where == "out":
            return module.register_forward_hook(lambda m, i, o: change(o[0] if isinstance(o, tuple) else o))
        def pre_hook(m, args, kwargs):
            if args:
                return (change(args[0]),) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=change(kwargs["hidden_states"]))
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def readout(logits, p=-1):
    return logits[p, TARGETS] - np.mean(logits[p, FOILS])


def set_rows(rows, value):
    """fn replacing rows[t] of a tensor with value[t] (or value for every t)."""
    def fn(x):
        for t in rows:
            x[t] = value[t] if isinstance(value, dict) else value
        return x
    return fn


def head_slice(hf, h):
    return slice(h * hf.H, (h + 1) * hf.H)


@pytest.fixture(scope="module", params=list(CLASSES))
def pair(request, checkpoint):
    d = checkpoint(request.param, num_key_value_heads=2) if request.param == "tiny" else checkpoint(request.param)
    return refprism.load(d), HF(d, request.param)


def hf_total(hf, base_ids, patches, sign=1):
    """sign * (readout(base) - readout(patched)), pre-cap and capped (HF)."""
    pre0, cap0, _, _ = hf.run(base_ids)
    pre1, cap1, _, _ = hf.run(base_ids, patches)
    return sign * (readout(pre0) - readout(pre1)), sign * (readout(cap0) - readout(cap1))


def ours(model, component, **kw):
    return I.patch(model, PROMPT, component, targets=[f"#{t}" for t in TARGETS], versus=[f"#{f}" for f in FOILS],
                   **kw)


def check(name, mine, pre, cap):
    print(f"{name}: max |ours - HF| {np.abs(mine.total - pre).max():.2e} (effects up to {np.abs(pre).max():.3f})")
    np.testing.assert_allclose(mine.total, pre, atol=ATOL, rtol=0, err_msg=f"{name}: total vs HF")
    assert np.abs(pre).max() > 1e-3, f"{name}: the patch should change the readout"
    if mine.capped is not None:  # Gemma 2: the soft-capped readout as HF's model output
        np.testing.assert_allclose(mine.capped["total"], cap, atol=ATOL, rtol=0, err_msg=f"{name}: capped total")


def test_zero_ablations_match_hf(pair):
    model, hf = pair
    p, last = len(PROMPT) - 1, model.config.n_layers - 1
    h = 1
    z_zero = lambda x: (x.__setitem__((p, head_slice(hf, h)), 0), x)[1]  # noqa: E731
    check("L0H1", ours(model, "L0H1"), *hf_total(hf, PROMPT, [("z", 0, z_zero)]))
    n = 17
    check("L1N17", ours(model, "L1N17"),
          *hf_total(hf, PROMPT, [("act", 1, lambda x: (x.__setitem__((p, n), 0), x)[1])]))
    check("L0.attn", ours(model, "L0.attn"), *hf_total(hf, PROMPT, [("attn", 0, set_rows([p], 0.0))]))
    check("L0.mlp", ours(model, "L0.mlp"), *hf_total(hf, PROMPT, [("mlp", 0, set_rows([p], 0.0))]))
    check(f"L{last}.attn", ours(model, f"L{last}.attn"), *hf_total(hf, PROMPT, [("attn", last, set_rows([p], 0.0))]))
    check("embed at 3", ours(model, "embed", at=[3]), *hf_total(hf, PROMPT, [("embed", 0, set_rows([3], 0.0))]))
    every = lambda x: (x.__setitem__((slice(None), head_slice(hf, 2)), 0), x)[1]  # noqa: E731
    check("L1H2 at all positions", ours(model, "L1H2", at="all"), *hf_total(hf, PROMPT, [("z", 1, every)]))


def test_head_source_term_removed_matches_hf(pair):
    """The term pattern[h, p, s] v[s, kv(h)] of z, taken from HF's own clean run, subtracted in o_proj's input."""
    model, hf = pair
    p, layer, h, s = len(PROMPT) - 1, 1, 3, 4
    _, _, attentions, got = hf.run(PROMPT, capture=[("v", layer)])
    v = got["v", layer].view(len(PROMPT), hf.K, hf.H)
    term = attentions[layer][0, h, p, s] * v[s, h // (hf.N // hf.K)]

    def remove(x):
        x[p, head_slice(hf, h)] -= term
        return x

    check("L1H3.src4", ours(model, "L1H3.src4"), *hf_total(hf, PROMPT, [("z", layer, remove)]))


def test_resample_both_directions_and_mean_match_hf(pair):
    model, hf = pair
    p, h = len(PROMPT) - 1, 0
    _, _, _, clean = hf.run(PROMPT, capture=[("z", 1), ("mlp", 0), ("act", 1)])
    _, _, _, cf = hf.run(COUNTER, capture=[("z", 1), ("mlp", 0), ("act", 1)])
    hs = head_slice(hf, h)

    def z_from(source):
        def fn(x):
            x[p, hs] = source["z", 1][p, hs]
            return x
        return fn

    check("L1H0 resample (noising)", ours(model, "L1H0", ablate="resample", counterfactual=COUNTER),
          *hf_total(hf, PROMPT, [("z", 1, z_from(cf))]))
    check("L1H0 resample (denoising)",
          ours(model, "L1H0", ablate="resample", counterfactual=COUNTER, direction="denoising"),
          *hf_total(hf, COUNTER, [("z", 1, z_from(clean))], sign=-1))
    check("L0.mlp resample at all positions",
          ours(model, "L0.mlp", ablate="resample", counterfactual=COUNTER, at="all"),
          *hf_total(hf, PROMPT, [("mlp", 0, lambda x: cf["mlp", 0].clone())]))

    acts = [hf.run(r, capture=[("act", 1)])[3]["act", 1][1:] for r in REFERENCE]  # positions 1 .. T-1
    mean = torch.cat(acts).mean(0)
    n = int(torch.argmax((clean["act", 1][p] - mean).abs()))  # the neuron the mean changes most (per HF)

    def mean_neuron(x):
        x[p, n] = mean[n]
        return x

    check(f"L1N{n} mean", ours(model, f"L1N{n}", ablate="mean", reference=REFERENCE),
          *hf_total(hf, PROMPT, [("act", 1, mean_neuron)]))
