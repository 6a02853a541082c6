#!/usr/bin/env python3
"""Write the two data sets that ship with refprism (refprism/sweeps/data/), and check them against Gemma's tokenizers.

    python tools/make_datasets.py                 # write refprism/sweeps/data/capitals.jsonl and additions.jsonl, check
    python tools/make_datasets.py --check         # only check the files as they are

capitals.jsonl   40 countries -> capitals in the post's first example's words, "The capital city of France is":
                 target the capital (one piece in Gemma's vocabulary), versus the other 39 capitals (the column
                 reads logit(capital) - mean logit(other capitals)); roles bos (0) and country (5).
additions.jsonl  the 55 one-digit additions a + b with a + b <= 9 (the answer is one digit, one token), written
                 "1+1=2\\na+b=": Gemma's tokenizer splits every digit, and with spaces ("3 + 4 =") it puts a lone
                 "▁" before each digit; the worked example in front lifts Gemma 3 270M from 13 to 29 of 55 right
                 (measured with this tool's --accuracy). Target the sum's digit, versus the other nine digits;
                 roles bos (0), a (7), plus (8), b (9), equals (10).

The check tokenizes every prompt with the gemma-2b tokenizer (../shared/gemma-2b-tokenizer, or
$REFPRISM_SHARED_TOKENIZER) and, with the demo extra installed, Gemma 3 270M's (refprism.demo.gguf_path()): every
target and foil must be one piece, and every role must sit on the token it names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "refprism" / "sweeps" / "data"

COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Venezuela", "Caracas"), ("Cuba", "Havana"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Turkey", "Ankara"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
]
ADDITION = "1+1=2\n{a}+{b}="  # one worked example, then the question


def capitals() -> list[dict]:
    rows = []
    for country, capital in COUNTRIES:
        rows.append({"id": country.lower(), "prompt": f"The capital city of {country} is", "targets": ["▁" + capital],
                     "versus": ["▁" + c for _, c in COUNTRIES if c != capital], "roles": {"bos": 0, "country": 5}})
    return rows


def additions() -> list[dict]:
    rows = []
    for a in range(10):
        for b in range(10 - a):
            rows.append({"id": f"add-{a}-{b}", "prompt": ADDITION.format(a=a, b=b), "targets": [str(a + b)],
                         "versus": [str(d) for d in range(10) if d != a + b],
                         "roles": {"bos": 0, "a": 7, "plus": 8, "b": 9, "equals": 10}})
    return rows


ROLE_PIECES = {"bos": lambda row: "<bos>", "country": lambda row: "▁" + row["prompt"].split()[-2],
               "a": lambda row: row["id"].split("-")[1], "b": lambda row: row["id"].split("-")[2],
               "plus": lambda row: "+", "equals": lambda row: "="}


def check(rows, tokenizer, name) -> None:
    """Every target and foil is one piece; every role is on the token it names."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a Model: its tokenizer
    for row in rows:
        pieces = tokenizer.encode(row["prompt"]).tokens
        for spec in row["targets"] + row["versus"]:
            if tokenizer.token_to_id(spec) is None:
                raise SystemExit(f"{name}: {row['id']}: {spec!r} is not one piece")
        for role, at in row["roles"].items():
            if pieces[at] != ROLE_PIECES[role](row):
                raise SystemExit(f"{name}: {row['id']}: role {role} at {at} is {pieces[at]!r} in {pieces}")
    print(f"{name}: {len(rows)} rows checked", file=sys.stderr)


def tokenizers():
    from tokenizers import Tokenizer

    shared = Path(os.environ.get("REFPRISM_SHARED_TOKENIZER", ROOT.parent / "shared" / "gemma-2b-tokenizer"))
    found = {}
    if (shared / "tokenizer.json").is_file():
        found["gemma-2b"] = Tokenizer.from_file(str(shared / "tokenizer.json"))
    else:
        print(f"(the gemma-2b tokenizer is not at {shared}: set REFPRISM_SHARED_TOKENIZER)", file=sys.stderr)
    try:
        import refprism
        from refprism.demo import gguf_path

        found["gemma-3-270m"] = refprism.load(gguf_path())
    except Exception as e:  # the demo extra is optional here
        print(f"(Gemma 3 270M's tokenizer not checked: {e})", file=sys.stderr)
    return found


def accuracy(model, rows, name) -> None:
    """Gemma 3 270M's top-1 accuracy among the row's candidates and mean margin (target - mean of foils)."""
    import numpy as np

    runs = model.run_many([r["prompt"] for r in rows], record=["logits@-1"], positions=-1)
    right, margins = 0, []
    for row, run in zip(rows, runs):
        logits = run.logits[-1]
        ids = [model.tokenizer.token_to_id(t) for t in row["targets"] + row["versus"]]
        right += int(np.argmax(logits[ids]) == 0)
        margins.append(logits[ids[0]] - logits[ids[1:]].mean())
    print(f"{name}: target first among its candidates in {right} of {len(rows)}, mean margin "
          f"{np.mean(margins):.2f}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="check the files as they are; write nothing")
    ap.add_argument("--accuracy", action="store_true", help="also measure Gemma 3 270M on them")
    args = ap.parse_args()
    sets = {"capitals.jsonl": capitals(), "additions.jsonl": additions()}
    if args.check:
        sets = {name: [json.loads(l) for l in (DATA / name).read_text("utf-8").splitlines()] for name in sets}
    found = tokenizers()
    for name, rows in sets.items():
        for tok_name, tok in found.items():
            check(rows, tok, f"{name} ({tok_name})")
        if not args.check:
            DATA.mkdir(exist_ok=True)
            (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
            print(f"wrote {DATA / name}", file=sys.stderr)
        if args.accuracy:
            if "gemma-3-270m" not in found:
                raise SystemExit("--accuracy needs Gemma 3 270M: pip install 'refprism[demo]'")
            accuracy(found["gemma-3-270m"], rows, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
