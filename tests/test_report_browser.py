"""`refprism report` in a real browser: Debian's Chromium driven by Playwright for Python (no browser download).

The walk opens the page from a file, clicks logits -> layer -> head x source -> chain -> deeper chain, and back to
the neurons, and at every step reads the numbers the page shows (data-label / data-col / data-value) and checks
them against the library's Split values computed here, exactly (==). It also checks that the page asked the
network for nothing (every request but the file itself is recorded and aborted; the page's CSP forbids them too)
and logged no console error or warning. Screenshots of each step go to tests/artifacts/report/ (git-ignored).

Without playwright (pip install -e ".[browser]") or /usr/bin/chromium (apt-get install chromium) these tests FAIL,
they do not skip: tools/test.sh installs both.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_report import COMPARE, SWEEP, VALIDATE

import refprism
from refprism import cli, report
from refprism import prisms as P

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts" / "report"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PROMPT = "The capital city of France is"
TARGETS = ["▁Paris", "▁London", "▁Tokyo"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[browser]' (tools/test.sh does); the report's "
                    "browser test fails rather than skips without it")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no {CHROMIUM}: apt-get install chromium (tools/test.sh does, as root); the report's browser "
                    "test uses Debian's Chromium, never a downloaded one")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1280, "height": 900})
        yield context
        context.close()


class Tab:
    """One page in the browser: every request and console message recorded, only `allowed` URLs let through."""

    def __init__(self, context, url):
        self.url = url
        self.requests, self.console, self.errors = [], [], []
        self.page = context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
        self.page.goto(url)

    def shot(self, name):
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def cells(self, selector):
        """[(label, col, value)] of the number cells matching selector (data-value parsed as a float64)."""
        rows = self.page.eval_on_selector_all(
            selector, "els => els.map(e => [e.dataset.label, e.dataset.col, e.dataset.value])")
        return [(label, int(col), float(value)) for label, col, value in rows]

    def panel(self):
        return self.page.eval_on_selector("[data-panel]", "e => [e.dataset.panel, e.dataset.node, e.dataset.layer]")

    def crumbs(self):
        return self.page.eval_on_selector_all("[data-crumb]", "els => els.map(e => e.textContent)")

    def close(self):
        """The checks every page must pass; then close it."""
        problems = [m for m in self.console if m[0] in ("error", "warning")]
        assert not problems and not self.errors, (problems, self.errors)
        assert self.requests == [self.url], f"the page asked for more than itself: {self.requests}"
        self.page.close()


def column(split, z):
    return {label: float(v) for label, v in zip(split.labels, split.values[:, z])}


def check_parts(tab, split, z, role="part"):
    shown = tab.cells(f"[data-panel] td[data-role={role}][data-col='{z}']")
    assert shown, f"no {role} cells shown"
    expected = column(split, z)
    for label, _col, value in shown:
        assert value == expected[label], (label, value, expected[label])
    return {label for label, _, _ in shown}


def check_exactness(tab, split):
    """The exactness box: whole, residual and tolerance are refprism's; the sum is the parts' float64 sum."""
    for role, values in (("whole", split.whole), ("residual", split.residual), ("tolerance", split.tolerance)):
        shown = [v for _, _, v in tab.cells(f".exact td[data-role={role}]")]
        assert shown == [float(v) for v in values], role
    sums = [v for _, _, v in tab.cells(".exact td[data-role=sum]")]
    np.testing.assert_allclose(sums, split.values.astype(np.float64).sum(axis=0), rtol=1e-12, atol=1e-15)
    assert tab.page.get_attribute("[data-role=exact]", "data-exact") == str(split.exact).lower()
    assert split.exact and "exact: yes" in tab.page.inner_text("[data-role=exact]")


def click(tab, selector):
    tab.page.click(selector)
    tab.page.wait_for_selector("[data-panel], [data-role=not-precomputed], [data-role=masked]")


@pytest.fixture(scope="module")
def gemma2(checkpoint):
    """Gemma 2: post-norms, soft-capped logits, sliding windows of 4 (masked cells at T = 7)."""
    model = refprism.load(checkpoint("tiny-gemma2"))
    return model, model.run(PROMPT)


def test_walk_from_the_prediction_to_the_neurons(browser, gemma2, tmp_path):
    model, run = gemma2
    page_file = report.write_report(tmp_path / "report.html", model, run, TARGETS, depth=2, top=6, branch=2)
    tab = Tab(browser, page_file.as_uri())
    root = P.logits_readout(model, run, TARGETS)
    data = report.page_data(page_file.read_text(encoding="utf-8"))

    # the prediction: the model's top next tokens, probabilities in float64
    logits = run.logits[-1].astype(np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = np.argsort(-logits)[: report.NEXT_TOKENS]
    shown = tab.page.eval_on_selector_all("td[data-role=prob]", "els => els.map(e => [+e.dataset.id, e.dataset.value])")
    assert [(i, float(v)) for i, v in shown] == [(int(i), float(probs[i])) for i in best]
    assert tab.page.inner_text("[data-crumb='0']") == "logits"

    # 1. the residual prism, column 0, then column 1; running sum and logit lens beside it; the soft-cap
    res = P.residual_prism(root)
    assert check_parts(tab, res, 0) == set(res.labels)
    check_exactness(tab, res)
    for role, extra in (("frozen_running_sum", "frozen_running_sum"), ("logit_lens", "logit_lens")):
        values = {l: float(v) for l, v in zip(res.labels, res.extras[extra]["values"][:, 0])}
        assert all(v == values[label] for label, _, v in tab.cells(f"td[data-role={role}]"))
    capped = tab.page.get_attribute("[data-role=softcapped]", "data-value")
    assert float(capped) == float(res.extras["softcapped"]["values"][0, 0])
    tab.shot("1-logits")
    tab.page.click("button[data-col='1']")
    check_parts(tab, res, 1)
    z = 1

    # 2. layer 2's attention: every head x source cell, the masked ones (outside the window) greyed
    layer = model.config.n_layers - 1
    click(tab, f"td[data-label='L{layer}.attn']")
    assert tab.panel() == ["attention", "", str(layer)]
    att = P.attention_prism(root, layer)
    assert check_parts(tab, P.head_split(att), z, role="head") == set(att.extras["heads"]["labels"])
    shown = {label: v for label, col, v in tab.cells(".grid td[data-label*='.src']")}
    assert shown == column(att, z)
    check_exactness(tab, att)
    pattern = run.record[f"blocks.{layer}.attn.pattern"][:, 6, :7]
    masked = tab.page.eval_on_selector_all("td.masked", "els => els.map(e => e.dataset.label)")
    assert sorted(masked) == sorted(f"L{layer}H{h}.src{s}" for h, s in zip(*np.nonzero(pattern == 0)))
    assert masked, "the window of 4 masks the first sources of a sliding layer"
    tab.shot("2-attention")
    assert tab.crumbs() == ["logits", f"L{layer}.attn"]

    # 3. the largest cell -> its chain: the term split into the residual parts at its source
    cell = att.labels[att.top(1)[0]]
    click(tab, f"td[data-label='{cell}']")
    chain_readout = report.pull_back(root, [cell])
    chain = P.residual_prism(chain_readout)
    assert tab.panel()[:2] == ["residual", cell]
    assert check_parts(tab, chain, z) == set(chain.labels)
    check_exactness(tab, chain)
    assert tab.crumbs() == ["logits", f"L{layer}.attn", cell]
    tab.shot("3-chain")

    # 4. and again: an opened part of the chain -> its prism -> its largest child's chain (depth 2)
    node = data["nodes"][cell]
    opened = [f"L{l}.attn" for l in node["attention"]] + [f"L{l}.mlp" for l in node["mlp"]]
    assert len(opened) == 2
    open_shown = tab.page.eval_on_selector_all("td.open[data-role=part]", "els => els.map(e => e.dataset.label)")
    assert sorted(open_shown) == sorted(opened)
    part = next(p for p in opened if p.endswith(".attn"))  # (this checkpoint opens an attention part here)
    kind, j = ("attention" if part.endswith(".attn") else "mlp"), int(part[1:].split(".")[0])
    click(tab, f"td.open[data-label='{part}']")
    deeper = (P.attention_prism if kind == "attention" else P.mlp_prism)(chain_readout, j)
    assert tab.panel() == [kind, cell, str(j)]
    check_exactness(tab, deeper)
    if kind == "attention":
        assert {l: v for l, c, v in tab.cells(".grid td[data-label*='.src']")} == column(deeper, z)
        child = deeper.labels[deeper.top(1)[0]]
        click(tab, f"td[data-label='{child}']")
    else:
        child = deeper.labels[deeper.top(1)[0]]
        click(tab, f"tr[data-neuron='{child}']")
    depth2 = P.residual_prism(report.pull_back(root, [cell, child]))
    assert tab.panel()[:2] == ["residual", f"{cell}/{child}"]
    assert check_parts(tab, depth2, z) == set(depth2.labels)
    check_exactness(tab, depth2)
    assert tab.crumbs() == ["logits", f"L{layer}.attn", cell, part, child]
    tab.shot("4-depth-2-chain")

    # 5. a part that was not precomputed says so, with a command that computes it (run here)
    click(tab, "[data-crumb='2']")
    closed = tab.page.eval_on_selector_all("td.closed[data-role=part]", "els => els.map(e => e.dataset.label)")
    assert closed and not set(closed) & set(opened)
    click(tab, f"td.closed[data-label='{closed[0]}']")
    assert "Not precomputed in this page." in tab.page.inner_text("[data-role=not-precomputed]")
    command = tab.page.inner_text("[data-role=command]")
    j2, kind2 = int(closed[0][1:].split(".")[0]), "attention" if closed[0].endswith(".attn") else "mlp"
    assert command.endswith(f" --split {kind2}:{j2}") and command.startswith("refprism chain --ids ")
    tab.shot("5-not-precomputed")
    args = shlex.split(command)[1:]
    args[args.index("--model") + 1] = model.name
    assert cli.main([*args, "--json"]) == 0
    # (captured by pytest; the JSON is checked in test_not_precomputed_commands_compute_the_view)

    # 6. back to the logits, a layer's MLP: the top neurons across every target, the rest summed
    click(tab, "[data-crumb='0']")
    click(tab, f"td[data-label='L{layer}.mlp']")
    mlp = P.mlp_prism(root, layer)
    keep = mlp.top(6)
    rows = tab.cells("[data-panel] td[data-role=neuron]")
    assert rows == [(mlp.labels[i], c, float(mlp.values[i, c])) for i in keep for c in range(len(TARGETS))]
    others = [v for _, _, v in tab.cells("td[data-role=omitted]")]
    assert others == np.delete(mlp.values, keep, axis=0).astype(np.float64).sum(axis=0).tolist()
    check_exactness(tab, mlp)
    tab.shot("6-neurons")
    neuron = mlp.labels[keep[0]]
    click(tab, f"tr[data-neuron='{neuron}']")
    nchain = P.residual_prism(P.through_neuron(root, layer, int(neuron.split("N")[1])))
    assert check_parts(tab, nchain, z) == set(nchain.labels)
    check_exactness(tab, nchain)
    assert tab.crumbs() == ["logits", f"L{layer}.mlp", neuron]
    tab.shot("7-neuron-chain")

    # 7. a masked cell: its term and chain are exactly 0, and the page says why
    click(tab, "[data-crumb='0']")
    click(tab, f"td[data-label='L{layer}.attn']")
    click(tab, f"td[data-label='{masked[0]}']")
    assert "attention weight 0" in tab.page.inner_text("[data-role=masked]")

    # 8. the page's own decoder gives back Split.to_json() exactly (what a script reading the page would get)
    js = tab.page.evaluate(f"[refprism.splitJson('', 'residual'), refprism.splitJson('', 'attention', {layer}), "
                           f"refprism.splitJson({json.dumps(cell)}, 'residual')]")
    assert js == [res.to_json(), att.to_json(), chain.to_json()]
    tab.close()


def test_not_precomputed_commands_compute_the_view(checkpoint, capsys):
    """The command the page gives for a view it does not hold computes exactly that view."""
    model = refprism.load(checkpoint("tiny-gemma2"))
    run = model.run(PROMPT)
    data = report.build_data(model, run, TARGETS, depth=1)
    root = P.logits_readout(model, run, TARGETS)
    readout = report.pull_back(root, ["L2H1.src5"])
    expected = P.attention_prism(readout, 1).to_json()
    args = ["chain", *shlex.split(data["command"]), "--layer", "2", "--head", "1", "--source", "5",
            "--split", "attention:1", "--json"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out) == expected


def test_sections_render(browser, tiny, tmp_path):
    page_file = report.write_report(tmp_path / "sections.html", tiny, tiny.run(PROMPT), ["▁Paris"], depth=0,
                                    validate=VALIDATE, compare=COMPARE, sweep=SWEEP)
    tab = Tab(browser, page_file.as_uri())

    def column_of(section, key):
        return tab.page.eval_on_selector_all(f"[data-section={section}] td[data-key={key}]",
                                             "els => els.map(e => e.dataset.value)")

    assert column_of("validate", "label") == ["L1.attn", "L0.mlp"]
    assert [float(v) for v in column_of("validate", "total")] == [0.61, -0.3]
    assert [float(v) for v in column_of("validate", "mediated")] == [0.13, -0.09]
    agreement = dict(zip(column_of("validate", "key"), column_of("validate", "value")))
    assert {k: float(v) for k, v in agreement.items()} == VALIDATE["agreement"]
    assert column_of("compare", "site") == ["blocks.0.resid_pre", "blocks.0.attn.out"]
    assert column_of("compare", "diverges") == ["false", "true"]
    assert column_of("compare", "variant") == ["interleaved RoPE", "erf GELU"]
    summary = dict(zip(column_of("compare", "key"), column_of("compare", "value")))
    assert summary == {"tokens_match": "true", "first_divergence": "blocks.0.attn.out", "first_wrong_op": "attention"}
    assert [float(v) for v in column_of("sweep", "mean")] == [1.5, 0.41, -0.02]  # the whole, then by |mean|
    assert [json.loads(v) for v in column_of("sweep", "ci")] == [[1.0, 2.0], [0.3, 0.52], [-0.08, 0.05]]
    assert [float(v) for v in column_of("sweep", "same_sign")] == [1.0, 0.95, 0.55]
    assert "0.3000 .. 0.5200" in tab.page.inner_text("[data-section=sweep]")
    tab.shot("8-sections")
    tab.close()


def test_the_network_check_can_fail(browser, tmp_path):
    """The request recorder is what guards 'nothing fetched': a page that fetches is caught."""
    bad = tmp_path / "fetches.html"
    bad.write_text("<!DOCTYPE html><img src='http://127.0.0.1:9/x.png'><script>fetch('http://127.0.0.1:9/y')"
                   ".catch(() => {})</script>")
    tab = Tab(browser, bad.as_uri())
    tab.page.wait_for_timeout(300)
    assert any(re.match(r"http://127\.0\.0\.1:9/", u) for u in tab.requests)
    with pytest.raises(AssertionError, match="asked for more than itself|error"):
        tab.close()


def test_gemma4_page_shows_the_per_layer_inputs_and_the_experts(browser, checkpoint, tmp_path):
    """tiny-gemma4: the residual table has a per-layer input column (each L{l}.ple part, exact); its cell opens
    the ple panel (the token and embedding pieces, ple_prism); an MoE layer's MLP panel shows its selected experts
    beside its neurons, as leaves (no chain), with the library's numbers."""
    model = refprism.load(checkpoint("tiny-gemma4"))
    run = model.run([2, 5, 7, 9, 11, 13, 17])
    targets = ["#5", "#6"]
    page_file = report.write_report(tmp_path / "report.html", model, run, targets, depth=1, top=40, branch=2)
    tab = Tab(browser, page_file.as_uri())
    root = P.logits_readout(model, run, targets)
    res = P.residual_prism(root)
    assert check_parts(tab, res, 0) == set(res.labels)
    assert {f"L{l}.ple" for l in range(model.config.n_layers)} <= set(res.labels)
    check_exactness(tab, res)
    click(tab, "td[data-label='L3.ple']")
    assert tab.panel() == ["ple", "", "3"]
    ple = P.ple_prism(root, 3)
    assert check_parts(tab, ple, 1, role="piece") == {"L3.ple.token", "L3.ple.embed"}
    check_exactness(tab, ple)
    assert tab.crumbs() == ["logits", "L3.ple"]
    tab.shot("gemma4-ple")
    tab.page.click("[data-crumb='0']")
    click(tab, "td[data-label='L3.mlp']")
    assert tab.panel() == ["mlp", "", "3"]
    mlp = P.mlp_prism(root, 3)
    experts = check_parts(tab, mlp, 0, role="expert")
    assert experts and all(re.fullmatch(r"L3E\d+", e) for e in experts)
    assert tab.page.eval_on_selector_all("tr[data-expert]", "els => els.map(e => e.className)") == \
        ["leaf"] * len(experts)
    check_parts(tab, mlp, 0, role="neuron")
    check_exactness(tab, mlp)
    tab.shot("gemma4-mlp")
    tab.close()
