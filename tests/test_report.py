"""`refprism report`: the JSON embedded in the page is exactly the library's prisms, in the budget the docstring
states; the page is one self-contained file; sections and refusals. The browser walk is test_report_browser.py."""

import json
import re

import numpy as np
import pytest

import refprism
from refprism import cli, report
from refprism import prisms as P
from refprism.errors import InputError

PROMPT = "The capital city of France is"
TARGETS = ["▁Paris", "▁London"]


def page_for(model, run, **kw):
    return report.page_data(report.build_page(model, run, kw.pop("targets", TARGETS), **kw))


def full_split(readout, kind, layer=None):
    if kind == "residual":
        return P.residual_prism(readout)
    return {"attention": P.attention_prism, "mlp": P.mlp_prism, "ple": P.ple_prism}[kind](readout, layer)


def check_node(model, run, data, key, node, targets=TARGETS, versus=()):
    """Every split of one embedded node equals the library's Split.to_json(), value for value (==, no tolerance)."""
    root = P.logits_readout(model, run, targets, versus=versus, position=data["position"])
    readout = report.pull_back(root, node["path"])
    assert report.node_key(readout.path) == key
    assert report.decode_split(node["residual"], data) == full_split(readout, "residual").to_json()
    for layer, panel in node.get("attention", {}).items():
        split = full_split(readout, "attention", int(layer))
        assert report.decode_split(panel["split"], data) == split.to_json()
        pattern = np.frombuffer(__import__("base64").b64decode(panel["pattern"]), dtype="<f4" if
                                data["dtype"] == "float32" else "<f8")
        expected = run.record[f"blocks.{layer}.attn.pattern"][:, readout.position, : readout.position + 1]
        np.testing.assert_array_equal(pattern.reshape(expected.shape), expected)
    for layer, panel in node.get("ple", {}).items():  # Gemma 4: whole, as the library gives it
        assert report.decode_split(panel["split"], data) == full_split(readout, "ple", int(layer)).to_json()
    for layer, panel in node.get("mlp", {}).items():
        split = full_split(readout, "mlp", int(layer))
        whole = split.to_json()
        got = report.decode_split(panel["split"], data)
        keep = split.top(data["budget"]["top"])
        assert got["components"] == [whole["components"][i] for i in keep]  # the top neurons, largest first
        rest = np.delete(split.values, keep, axis=0).astype(np.float64).sum(axis=0)
        assert got["omitted"] == {"count": len(split.labels) - len(keep), "values": rest.tolist()}
        for field in ("whole", "residual", "tolerance", "exact", "site", "path", "position", "tokens", "columns"):
            assert got[field] == whole[field], field


def test_every_embedded_split_is_the_library_split(tiny):
    run = tiny.run(PROMPT)
    data = page_for(tiny, run)
    assert len(data["nodes"]) > 50
    for key, node in data["nodes"].items():
        check_node(tiny, run, data, key, node)
    assert data["tokens"] == [{"id": int(i), "piece": tiny.piece(i)} for i in run.tokens]
    assert data["columns"] == TARGETS and data["model"] == tiny.name and data["dtype"] == "float32"


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_gemma2_and_3_pages_hold_the_library_splits(checkpoint, preset):
    """Post-norms, the soft-cap (Gemma 2) and sliding windows shorter than the prompt (masked cells)."""
    model = refprism.load(checkpoint(preset))
    run = model.run(PROMPT)
    data = page_for(model, run, versus=["▁Tokyo"], depth=2)
    for key, node in data["nodes"].items():
        check_node(model, run, data, key, node, versus=["▁Tokyo"])
    extras = report.decode_split(data["nodes"][""]["residual"], data)["extras"]
    assert ("softcapped" in extras) == (preset == "tiny-gemma2")
    assert data["columns"] == ["▁Paris - ▁Tokyo", "▁London - ▁Tokyo"]


def test_gemma4_pages_hold_the_per_layer_inputs_and_the_experts(checkpoint):
    """tiny-gemma4 (every feature on: per-layer inputs, MoE, double-wide consumers, KV sharing): every node's
    residual split has its L{l}.ple parts, each opened node a ple panel per layer (ple_prism, exact), every MLP
    panel the library's mlp_prism (neurons, then the selected experts); the chains go through neurons only (an
    expert is a leaf), across the double-wide layers' 2F neurons."""
    model = refprism.load(checkpoint("tiny-gemma4"))
    cfg = model.config
    ids = [2, 5, 7, 9, 11, 13, 17]
    run = model.run(ids)
    data = page_for(model, run, targets=["#5", "#6"], depth=1, top=6, branch=3)
    root = data["nodes"][""]
    assert sorted(map(int, root["ple"])) == list(range(cfg.n_layers))
    assert {f"L{l}.ple" for l in range(cfg.n_layers)} <= {c["label"] for c in
                                                          report.decode_split(root["residual"], data)["components"]}
    experts = [c["label"] for panel in root["mlp"].values()
               for c in report.decode_split(panel["split"], data)["components"] if "E" in c["label"]]
    assert experts, "some experts rank among the top parts of an MLP"
    chained = [k for k in data["nodes"] if k]
    assert chained and all(re.fullmatch(r"L\d+(H\d+\.src\d+|N\d+)", k) for k in chained), chained
    wide = [k for k in chained if "N" in k and int(k.split("N")[1]) >= cfg.d_mlp]  # a double-wide layer's upper half
    assert wide, chained
    for key, node in data["nodes"].items():
        check_node(model, run, data, key, node, targets=["#5", "#6"])


def test_float64_pages_are_exact_too(tiny64):
    run = tiny64.run(PROMPT)
    data = page_for(tiny64, run, depth=1)
    assert data["dtype"] == "float64"
    for key in ["", "L1H2.src5", "L0H0.src0"]:
        check_node(tiny64, run, data, key, data["nodes"][key])
    assert "--dtype float64" in data["command"]


def cells_with_weight(run, readout, layer):
    p = readout.position
    pattern = run.record[f"blocks.{layer}.attn.pattern"][:, p, : p + 1]
    return {f"L{layer}H{h}.src{s}" for h, s in zip(*np.nonzero(pattern))}


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma3"])
def test_what_is_embedded_follows_the_stated_budget(checkpoint, preset):
    """Depth 0: the root only; depth 1: + every cell with a nonzero attention weight and the top `branch` neurons
    of each MLP; depth 2: the top `branch` children of each root panel are opened, each opening its `branch`
    largest layer parts, each of those chaining its `branch` largest children (module docstring)."""
    model = refprism.load(checkpoint(preset))
    run = model.run(PROMPT)
    cfg = model.config
    root = P.logits_readout(model, run, TARGETS)
    b = 2
    pages = {d: page_for(model, run, depth=d, branch=b, top=5) for d in (0, 1, 2)}
    assert list(pages[0]["nodes"]) == [""]
    root_node = pages[0]["nodes"][""]
    assert sorted(map(int, root_node["attention"])) == list(range(cfg.n_layers)) == sorted(map(int, root_node["mlp"]))

    cells = set().union(*(cells_with_weight(run, root, l) for l in range(cfg.n_layers)))
    if preset == "tiny-gemma3":  # sliding layers with a window of 4: some cells are masked and get no chain
        assert len(cells) < cfg.n_layers * cfg.n_heads * len(run.tokens)
    neurons = {P.mlp_prism(root, l).labels[i] for l in range(cfg.n_layers) for i in P.mlp_prism(root, l).top(b)}
    depth1 = set(pages[1]["nodes"]) - {""}
    assert depth1 == cells | neurons
    assert all("attention" not in n and "mlp" not in n for k, n in pages[1]["nodes"].items() if k)

    nodes2 = pages[2]["nodes"]
    opened = {k for k, n in nodes2.items() if k and "attention" in n and "mlp" in n}
    expected_opened = set()
    for l in range(cfg.n_layers):
        att = P.attention_prism(root, l)
        ranked = [att.labels[i] for i in att.top(len(att.labels)) if att.labels[i] in cells]
        expected_opened |= set(ranked[:b])
        mlp = P.mlp_prism(root, l)
        expected_opened |= {mlp.labels[i] for i in mlp.top(b)}
    assert opened == expected_opened  # (a chain at L0 reads only the embedding: it has no layer part to open)
    for key in opened:
        readout = report.pull_back(root, [key])
        res = P.residual_prism(readout)
        largest = [res.labels[i] for i in res.top(len(res.labels)) if res.labels[i] != "embed"][:b]
        node = nodes2[key]
        assert sorted(f"L{l}.attn" for l in node["attention"]) + sorted(f"L{l}.mlp" for l in node["mlp"]) == \
            sorted(l for l in largest if l.endswith(".attn")) + sorted(l for l in largest if l.endswith(".mlp"))
    depth2 = [k for k in nodes2 if k.count("/") == 1]
    assert 0 < len(depth2) <= 2 * cfg.n_layers * b ** 3
    assert all(nodes2[k]["depth"] == 2 and "attention" not in nodes2[k] for k in depth2)
    assert set(pages[1]["nodes"]) <= set(nodes2)


def embedded_floats(data):
    """How many compute-dtype numbers the page embeds (each packed array's bytes / 4 for float32)."""
    total = 0

    def count(text):
        return len(__import__("base64").b64decode(text)) // 4

    for node in data["nodes"].values():
        splits = [node["residual"]] + [p["split"] for p in node.get("attention", {}).values()] + \
                 [p["split"] for p in node.get("mlp", {}).values()]
        for s in splits:
            total += count(s["values"]) + count(s["whole"]["values"])
            total += sum(count(e["values"]) for e in s.get("extras", {}).values())
        total += sum(count(p["pattern"]) for p in node.get("attention", {}).values())
    return total


def test_size_scales_as_stated(tiny):
    """Depth-1 chains: one per (layer, head, source) and per top-`branch` neuron of each MLP, each of (2l+1 parts +
    the whole) x Z float32 numbers, so the numbers grow as O(L^2 N T Z) with the prompt length T. Bytes: base64 gives
    16/3 bytes per float32 number, 32/3 per float64 (residual and tolerance, 2Z per split), plus c bytes of JSON
    keys per chain. c is measured at T = 3 and must predict the page at T = 7 within 3%."""
    L, N, Z = tiny.config.n_layers, tiny.config.n_heads, len(TARGETS)
    grown = {}
    for prompt in ("The capital", PROMPT):  # T = 3 and T = 7
        run = tiny.run(prompt)
        T = len(run.tokens)
        pages = {d: report.build_page(tiny, run, TARGETS, depth=d) for d in (0, 1)}
        data = {d: report.page_data(text) for d, text in pages.items()}
        numbers = embedded_floats(data[1]) - embedded_floats(data[0])
        chains = len(data[1]["nodes"]) - len(data[0]["nodes"])
        assert chains == L * N * T + L * 2  # tiny (Gemma 1) masks no source
        # every cell's chain (whole Z + parts (2l+1) Z) and the top-2 neurons' chains of each layer ((2l+2) Z + Z)
        assert numbers == sum(N * T * (2 * l + 2) * Z + 2 * (2 * l + 3) * Z for l in range(L))
        grown[T] = (len(pages[1].encode()) - len(pages[0].encode()), numbers, chains)
    size3, numbers3, chains3 = grown[3]
    c = (size3 - 16 / 3 * numbers3 - 32 / 3 * 2 * Z * chains3) / chains3
    assert 150 < c < 350, c  # ~250: the keys of a node and its split, its label and path
    size7, numbers7, chains7 = grown[7]
    predicted = c * chains7 + 16 / 3 * numbers7 + 32 / 3 * 2 * Z * chains7
    assert abs(size7 - predicted) < 0.03 * size7, (size7, predicted)
    assert size7 > 2 * size3


def test_page_is_self_contained(tiny):
    text = report.build_page(tiny, tiny.run(PROMPT), TARGETS, depth=1)
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "a link to the network"
    assert "{{" not in text  # every placeholder filled
    assert text.count("<script") == 2 and "default-src 'none'" in text  # data + code; the page may fetch nothing
    assert "function unpack" in text and "--pos:" in text  # report.js and report.css inlined


def test_embedded_json_cannot_close_its_script_element():
    hostile = {"tokens": [{"id": 1, "piece": "</script><script>alert(1)</script><!-- & "}]}
    text = report.page._script_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


def test_prediction_and_command(tiny):
    run = tiny.run(PROMPT)
    data = page_for(tiny, run, versus=["▁Tokyo"], position=5)
    logits = run.logits[5].astype(np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = np.argsort(-logits)[: report.NEXT_TOKENS]
    assert [t["id"] for t in data["prediction"]] == best.tolist()
    assert [t["prob"] for t in data["prediction"]] == probs[best].tolist()
    assert [t["logit"] for t in data["prediction"]] == [float(run.logits[5, i]) for i in best]
    assert data["position"] == 5
    ids = ",".join(map(str, run.tokens))
    assert data["command"] == f"--ids {ids} --model {tiny.name} --position 5 --targets '#108' '#109' --versus '#116'"


def test_budget_refusals(tiny):
    run = tiny.run(PROMPT)
    for kw, message in [({"depth": -1}, "--depth must be an integer of at least 0, got -1"),
                        ({"top": 0}, "--top must be an integer of at least 1, got 0"),
                        ({"branch": 0}, "--branch must be an integer of at least 1, got 0"),
                        ({"depth": 1.5}, "--depth must be an integer")]:
        with pytest.raises(InputError, match=re.escape(message)):
            report.build_page(tiny, run, TARGETS, **kw)


# ------------------------------------------------------------------------------------------------- sections

VALIDATE = {"components": [{"label": "L1.attn", "prism": 0.5, "direct": 0.48, "total": 0.61, "norm_rescaling": 0.02,
                            "mediated": 0.13},
                           {"label": "L0.mlp", "prism": -0.2, "direct": -0.21, "total": -0.3, "norm_rescaling": 0.01,
                            "mediated": -0.09}],
            "agreement": {"spearman": 0.9, "kendall": 0.8, "sign_agreement": 1.0, "top_k_precision": 0.75,
                          "top_k_recall": 0.5}}
COMPARE = {"tokens_match": True, "sites": [{"site": "blocks.0.resid_pre", "max_abs": 0.0, "floor": 1e-6,
                                            "local_max_abs": 0.0, "diverges": False},
                                           {"site": "blocks.0.attn.out", "max_abs": 0.25, "floor": 1e-6,
                                            "local_max_abs": 0.25, "diverges": True}],
           "first_divergence": "blocks.0.attn.out", "first_wrong_op": "attention",
           "diagnosis": [{"variant": "interleaved RoPE", "explains": True}, {"variant": "erf GELU", "explains": False}]}
SWEEP = {"sweep": {"data": {"file": "d.jsonl", "rows": 40}, "prompts": 40, "bad_rows": 0, "levels": "residual"},
         "columns": ["▁Paris - ▁Tokyo"], "bootstrap": {"resamples": 1000, "seed": 0},
         "splits": [{"prism": "residual",
                     "whole": {"label": "logits", "mean": [1.5], "ci": [[1.0, 2.0]], "same_sign": [1.0]},
                     "components": [{"label": "L1.attn", "mean": [0.41], "ci": [[0.3, 0.52]], "same_sign": [0.95]},
                                    {"label": "embed", "mean": [-0.02], "ci": [[-0.08, 0.05]], "same_sign": [0.55]}],
                     "residual": [0.0], "exact": True}],
         "top": {}, "exact": True}  # the shape of a sweep's summary.json (refprism.sweeps.summarize)


def test_a_real_compare_json_is_a_section(tiny_dir, tiny):
    """What refprism compare --json prints is what the page reads (a broken HF side, so that a diagnosis exists)."""
    import torch

    from refprism.crosscheck.sides import hf

    other = hf.load(tiny_dir)
    with torch.no_grad():
        other.model.layers[1].mlp.act_fn = torch.nn.GELU()  # the exact erf GELU in one layer
    result = refprism.compare(tiny, PROMPT, against=other).to_json()
    assert result["first_wrong_op"] and result["diagnosis"]
    shown = json.loads(json.dumps(result))
    assert report.check_section("compare", shown, "compare.json") == shown
    assert page_for(tiny, tiny.run(PROMPT), depth=0, compare=shown)["sections"]["compare"]["sites"] == shown["sites"]


def test_a_real_validate_json_is_a_section(tiny):
    """What refprism validate --json prints is what the page reads."""
    result = json.loads(json.dumps(refprism.validate(tiny, PROMPT, level="residual", targets=["▁Paris"]).to_json()))
    assert report.check_section("validate", result, "validate.json") == result
    shown = page_for(tiny, tiny.run(PROMPT), depth=0, validate=result)["sections"]["validate"]
    assert [c["label"] for c in shown["components"]] == [c["label"] for c in result["components"]]


def test_a_real_sweep_summary_is_a_section(tiny, tmp_path):
    """What refprism sweep writes is what the page reads."""
    from refprism import sweeps

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"id": i, "ids": [2, 5 + i, 7, 9 + i], "targets": ["#5"], "versus": ["#11"]})
                              for i in range(5)))
    sweeps.sweep(data, tiny, tmp_path / "out", levels="residual,heads", quiet=True)
    summary = report.load_section("sweep", tmp_path / "out")
    assert summary["splits"][0]["prism"] == "residual" and summary["sweep"]["prompts"] == 5
    assert page_for(tiny, tiny.run(PROMPT), depth=0, sweep=summary)["sections"]["sweep"] == summary


def test_sections_are_embedded_as_given(tiny):
    data = page_for(tiny, tiny.run(PROMPT), depth=0, validate=VALIDATE, compare=COMPARE, sweep=SWEEP)
    assert data["sections"] == {"validate": VALIDATE, "compare": COMPARE, "sweep": SWEEP}
    assert page_for(tiny, tiny.run(PROMPT), depth=0)["sections"] == {}
    odd = json.loads(json.dumps(VALIDATE))
    odd["agreement"].update(spearman=float("nan"), kendall=float("inf"), top_k_recall=float("-inf"))
    shown = page_for(tiny, tiny.run(PROMPT), depth=0, validate=odd)["sections"]["validate"]["agreement"]
    assert shown == dict(VALIDATE["agreement"], spearman="NaN", kendall="Infinity", top_k_recall="-Infinity")


@pytest.mark.parametrize("kind, edit, message", [
    ("validate", lambda d: d.pop("agreement"), "lacks the key 'agreement'"),
    ("validate", lambda d: d["components"][1].pop("mediated"), r"components\[1\] lacks the key 'mediated'"),
    ("validate", lambda d: d["agreement"].pop("kendall"), r"agreement\[0\] lacks the key 'kendall'"),
    ("compare", lambda d: d.pop("first_wrong_op"), "lacks the key 'first_wrong_op'"),
    ("compare", lambda d: d["sites"][0].pop("floor"), r"sites\[0\] lacks the key 'floor'"),
    ("compare", lambda d: d["diagnosis"][1].pop("explains"), r"diagnosis\[1\] lacks the key 'explains'"),
    ("sweep", lambda d: d["splits"][0]["components"][1].pop("ci"), r"splits.components\[1\] lacks the key 'ci'"),
])
def test_sections_lacking_keys_are_refused(tmp_path, kind, edit, message):
    data = json.loads(json.dumps({"validate": VALIDATE, "compare": COMPARE, "sweep": SWEEP}[kind]))
    edit(data)
    with pytest.raises(InputError, match=message):
        report.check_section(kind, data, "x.json")
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        report.load_section(kind, tmp_path if kind == "sweep" else path)


def test_section_files(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps(VALIDATE))
    assert report.load_section("validate", tmp_path / "v.json") == VALIDATE
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps(SWEEP))
    assert report.load_section("sweep", tmp_path / "sweep") == SWEEP
    for kind, path, message in [("validate", tmp_path / "absent.json", "cannot read --validate .*absent.json"),
                                ("compare", tmp_path / "v.json", "--compare .*v.json' lacks the key 'tokens_match'"),
                                ("sweep", tmp_path / "v.json", "--sweep .*v.json' is not a directory"),
                                ("sweep", tmp_path, "cannot read --sweep .*summary.json")]:
        with pytest.raises(InputError, match=message):
            report.load_section(kind, path)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(InputError, match="--compare .*bad.json' is not valid JSON"):
        report.load_section("compare", tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InputError, match="holds a JSON list, not an object"):
        report.load_section("compare", tmp_path / "list.json")


# ------------------------------------------------------------------------------------------------- the command


def test_cli_writes_the_page(tiny_dir, tiny, tmp_path, capsys):
    out = tmp_path / "r.html"
    (tmp_path / "v.json").write_text(json.dumps(VALIDATE))
    code = cli.main(["report", PROMPT, "--model", str(tiny_dir), "--out", str(out), "--depth", "1", "--top", "7",
                     "--validate", str(tmp_path / "v.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.fullmatch(r"wrote '.*r\.html' \(\d\.\d\d MB\): open it in any browser, offline\n", err)
    data = report.page_data(out.read_text(encoding="utf-8"))
    run = tiny.run(PROMPT)
    assert [t["id"] for t in data["targets"]] == np.argsort(-run.logits[-1], kind="stable")[:5].tolist()  # top 5
    assert data["budget"] == {"depth": 1, "top": 7, "branch": 2} and data["sections"] == {"validate": VALIDATE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "v.json"]  # no temporary file left
    assert cli.main(["report", PROMPT, "--model", str(tiny_dir), "--out", str(out)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert cli.main(["report", PROMPT, "--model", str(tiny_dir), "--out", str(out), "--force", "--depth", "0"]) == 0
    assert report.page_data(out.read_text(encoding="utf-8"))["budget"]["depth"] == 0
