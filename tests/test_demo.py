"""`refprism demo`: the whole tour on the real Gemma 3 270M from PyPI, offline, in CI."""

import numpy as np
import pytest

from refprism import cli, demo, report


@pytest.mark.slow
def test_demo_tour_on_gemma3_270m(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REFPRISM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "figures"
    assert cli.main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    first = text.split("== 2.")[0]
    assert first.index("▁Paris") < first.index("▁Bordeaux")  # the model's top token, printed first
    assert "exact: NO" not in text and text.count("exact: yes") == 5  # residual, attention, chain, digits, neurons
    assert sorted(p.name for p in out.iterdir()) == ["1-residual.png", "2-attention.png", "3-chain.png", "4-map.png",
                                                    "5-digits-residual.png", "6-neurons.png", "7-digits-pca.png",
                                                    "8-validation.png", "report.html"]
    page = report.page_data((out / "report.html").read_text(encoding="utf-8"))  # step 8: the page of step 2
    assert page["columns"] == ["▁Paris - mean(▁London, ▁Rome, ▁Berlin, ▁Madrid, ▁Tokyo, ▁Moscow)"]
    assert page["prediction"][0]["piece"] == "▁Paris"
    head = page["nodes"]["L12H2.src4"]  # the capital head at ▁France, opened along its two largest parts (guide)
    assert list(head["mlp"]) == ["3"] and list(head["attention"]) == ["11"]
    assert (out / "report.html").stat().st_size < 3e6
    assert (tmp_path / "cache" / "gemma-3-270m-Q4_K_M.gguf").is_file()  # assembled once, reused


@pytest.mark.slow
def test_demo_finds_the_capital_head(tmp_path, monkeypatch):
    """What the tour reports is computed, not assumed: the head it picks carries most of L12's term, and its frozen
    map sends most countries to their own capital (the post's Fig 6, on Gemma 3 270M)."""
    import refprism
    from refprism import prisms as P

    monkeypatch.setenv("REFPRISM_CACHE", str(tmp_path / "cache"))
    model = refprism.load(demo.gguf_path())
    found = demo.run_tour(model, tmp_path / "figs", say=lambda *a: None)
    assert found["top1"] == "▁Paris" and found["sum_top1"] == "5"
    run = model.run(demo.CAPITAL_PROMPT)
    readout = P.through_head(P.logits_readout(model, run, demo.CAPITALS), found["layer"], found["head"],
                             found["source"])
    toks = [P.resolve_token(model, c) for c in demo.COUNTRIES]
    values = P.apply_map(readout, P.scaled_embeddings(model, toks), [t.piece for t in toks]).values
    assert run.pieces[found["source"]] == "▁France"
    assert np.sum(np.argmax(values, axis=1) == np.arange(len(toks))) >= 5  # the diagonal: country -> capital
    # step 7: the head's prism term, direct and total effect, and the gap's parts, each adding up
    c = found["patch"]
    assert c["direct"] == pytest.approx(c["prism"] + c["post_norm_rescaling"] + c["final_norm_rescaling"], abs=1e-4)
    assert c["total"] == pytest.approx(c["direct"] + c["mediated"], abs=1e-4)
    assert c["total"] > 0.3 * c["prism"] > 0  # the frozen term survives, in part, as a causal effect
