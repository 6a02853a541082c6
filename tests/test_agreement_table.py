"""tools/agreement_table.py's pure helpers on literal inputs: the capitals counterfactual pairing and the table's
means and paired differences (the runs themselves need the 270M GGUF and hours: docs/attribution.md)."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("agreement_table", ROOT / "tools" / "agreement_table.py")
agreement_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agreement_table)


def test_counterfactual_pairs_take_the_next_prompt_with_as_many_tokens_cyclically():
    ids = ["a", "b", "c", "d", "e"]
    lengths = {"a": 7, "b": 8, "c": 7, "d": 8, "e": 9}
    # a -> c (b is longer), c -> a (wraps round), b -> d, d -> b; e has no partner of 9 tokens: left out
    assert agreement_table.counterfactual_pairs(ids, lengths) == {"a": "c", "b": "d", "c": "a", "d": "b"}


def _row(pid, ablate, spearman):
    methods = {m: {"agreement": {"spearman": s, "kendall": s, "sign_agreement": 1.0, "top_k_precision": 0.5,
                                 "top_k_recall": 0.5, "reruns_to_true_top_k": 20},
                   "cost": {"forward": 1, "backward": b, "seconds": 2.0}}
               for (m, s), b in zip(spearman.items(), (0, 1, 1))}
    return {"prompt_id": pid, "level": "heads", "ablate": ablate, "n": 72, "components": 72, "k": 10, "steps": 4,
            "methods": methods, "totals": {"reruns": 72, "seconds": 10.0}}


def test_table_means_over_prompts_and_pairs_each_method_with_atp():
    rows = [_row("capitals:a", "resample", {"prism": 0.2, "atp": 0.6, "atp*": 0.7}),
            _row("capitals:b", "resample", {"prism": 0.4, "atp": 0.8, "atp*": 1.0}),
            _row("demo", "zero", {"prism": 0.3, "atp": 0.75, "atp*": 0.5})]
    text = agreement_table.table(rows, Namespace(layer=6, capitals=40, budget=64, capitals_ig=False))
    lines = text.splitlines()
    atp_star = next(l for l in lines if l.startswith("| capitals (2) | heads | resample | atp* |"))
    assert atp_star.split(" | ")[4].startswith("0.85 [")  # the mean of 0.7 and 1.0
    assert "| demo prompt | heads | zero | atp | 0.75 |" in text  # one prompt: no interval
    paired = next(l for l in lines if l.startswith("capitals (2), heads, resample"))
    # per prompt: prism - atp = -0.4, -0.4; atp* - atp = 0.1, 0.2 (every bootstrap mean lies between them)
    assert "prism -0.40 [-0.40, -0.40]" in paired
    low, high = (float(x) for x in paired.split("atp* 0.15 [")[1].split("]")[0].split(", "))
    assert 0.1 <= low <= high <= 0.2
    assert "ig k = 4" in text and "demo" not in paired
