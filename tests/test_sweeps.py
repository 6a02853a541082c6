"""Sweeps (refprism/sweeps/, `refprism sweep`), local backend: reading data sets with line numbers, per-prompt
terms equal to single-prompt prisms, aggregates equal to a NumPy computation from the per-prompt file, resuming
after a kill, the shipped data sets. The Ray backend: tests/test_sweeps_ray.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq  # the sweep extra: a missing pyarrow fails here, not as a skipped test
import pytest
from conftest import shared_tokenizer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import refprism
from refprism import cli, prisms
from refprism import sweeps as S
from refprism.checkpoints.synth import build_small_tokenizer
from refprism.errors import InputError
from refprism.gemma.weights import Weights

CAPITALS = {"France": "Paris", "Russia": "Moscow", "Japan": "Tokyo", "Germany": "Berlin", "Italy": "Rome",
            "Spain": "Madrid", "China": "Beijing"}  # words of the tiny checkpoints' tokenizer (checkpoints/synth.py)
LEVELS = "residual,heads,head-source,neurons:3"


def capital_rows():
    """14 prompts of two lengths (the country at 5 or 4), two target columns, roles; one prompt as ids, one read
    at another position, one with a role the others lack."""
    rows = []
    for country, capital in CAPITALS.items():
        versus = ["▁" + c for c in CAPITALS.values() if c != capital]
        rows.append({"id": country.lower(), "prompt": f"The capital city of {country} is",
                     "targets": ["▁" + capital, "▁London"], "versus": versus, "roles": {"bos": 0, "country": 5}})
        rows.append({"id": f"{country.lower()}-short", "prompt": f"The capital of {country} is",
                     "targets": ["▁" + capital, "▁London"], "versus": versus, "roles": {"country": -2}})
    rows[3]["position"] = -2  # read at the country itself
    rows[3]["roles"] = {"city": 3}
    ids = build_small_tokenizer(512).encode(rows[4]["prompt"]).ids  # the tiny checkpoints' tokenizer
    rows[4] = {k: v for k, v in rows[4].items() if k != "prompt"} | {"ids": ids}
    rows[6]["roles"] = {"bos": 0, "country": 5, "of": 4}  # a role only this prompt names
    return rows


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "".join(extra_lines), "utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "capitals.jsonl", capital_rows())


@pytest.fixture(scope="module")
def swept(data, tiny, tmp_path_factory):
    """The tiny float32 model swept over the data, every level, chunks of 4."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    summary = S.sweep(data, tiny, out, levels=LEVELS, chunk=4, quiet=True, bootstrap=200, seed=3)
    return out, summary


def lines_of(out):
    return [json.loads(l) for l in (Path(out) / "prompts.jsonl").read_text("utf-8").splitlines()]


def split_of(line, prism, whole_label):
    [s] = [s for s in line["splits"] if s["prism"] == prism and s["whole"]["label"] == whole_label]
    return s


# ------------------------------------------------------------------------------------------------- data


def test_read_rows_reports_each_bad_row_with_its_line(tmp_path):
    good = {"id": "a", "prompt": "The capital city of France is", "targets": "▁Paris"}
    path = write_jsonl(tmp_path / "d.jsonl", [good], [
        "\n",  # line 2: blank, skipped
        '{"id": "b", "prompt": "x", "targets": [\n',  # 3: malformed
        '["not", "an", "object"]\n',  # 4
        '{"id": "c", "prompt": "x"}\n',  # 5: no targets
        '{"id": "d", "prompt": "x", "ids": [2], "targets": ["a"]}\n',  # 6: prompt twice
        '{"id": "e", "prompt": "x", "targets": ["a"], "target": "b"}\n',  # 7: unknown field
        '{"prompt": "x", "targets": ["a"]}\n',  # 8: no id
        '{"id": "f", "prompt": "x", "targets": ["a"], "roles": {"other": 1}}\n',  # 9: reserved role name
        '{"id": "g", "prompt": "x", "targets": ["a"], "position": 1.5}\n',  # 10
        '{"id": 7, "ids": [2, 5], "targets": [9], "versus": "#3"}\n',  # 11: fine (integer id, ids, id target)
    ])
    rows = S.read_rows(path)
    assert [r.line for r in rows] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    bad = {r.line: r.error for r in rows if isinstance(r, S.BadRow)}
    assert set(bad) == {3, 4, 5, 6, 7, 8, 9, 10}
    assert "malformed JSON" in bad[3] and "JSON object" in bad[4] and "needs targets" in bad[5]
    assert "prompt once" in bad[6] and "unknown field 'target'" in bad[7] and "needs an id" in bad[8]
    assert "'other'" in bad[9] and "position must be an integer" in bad[10]
    assert rows[0] == S.Row(1, "a", "The capital city of France is", ("▁Paris",))
    assert rows[-1] == S.Row(11, "7", (2, 5), (9,), ("#3",))


def test_read_csv_rows_line_numbers_count_quoted_line_breaks(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,prompt,targets,versus,roles,position\n'
                    'a,The capital city of France is,▁Paris,▁London ▁Tokyo,"{""country"": 5}",\n'
                    'b,"two\nlines",["▁Paris"],,,\n'  # lines 3-4
                    'c,x,▁Paris,,{bad,\n'  # line 5: malformed roles
                    'd,x,▁Paris,,,one\n'  # line 6
                    'e,x\n', "utf-8")  # line 7: too few cells
    rows = S.read_rows(path)
    assert rows[0] == S.Row(2, "a", "The capital city of France is", ("▁Paris",), ("▁London", "▁Tokyo"),
                            roles=(("country", 5),))
    assert rows[1] == S.Row(3, "b", "two\nlines", ("▁Paris",))
    assert [(r.line, type(r).__name__) for r in rows[2:]] == [(5, "BadRow"), (6, "BadRow"), (7, "BadRow")]
    with pytest.raises(InputError, match="unknown column 'target'"):
        (tmp_path / "e.csv").write_text("id,prompt,target\n", "utf-8")
        S.read_rows(tmp_path / "e.csv")


def test_prepare_refuses_rows_that_do_not_fit_the_model(tiny, tmp_path):
    ok = {"id": "ok", "prompt": "The capital city of France is", "targets": ["▁Paris"], "roles": {"country": 5}}
    path = write_jsonl(tmp_path / "d.jsonl", [
        ok,
        {**ok, "id": "unknown", "targets": ["▁Nowhere"]},
        {"id": "long", "ids": [2] * 200, "targets": ["▁Paris"]},  # beyond the tiny context of 128
        {**ok, "id": "late", "roles": {"country": 5}, "position": 4},
        {**ok, "id": "twice", "roles": {"a": 5, "b": -2}},
        {**ok, "id": "columns", "targets": ["▁Paris", "▁Tokyo"]},
        ok,  # the id again
    ])
    items, bad = S.prepare(tiny, S.read_rows(path))
    assert [it.id for it in items] == ["ok"] and items[0].roles == (("country", 5),) and items[0].position == 6
    errors = {b.line: b.error for b in bad}
    assert "▁Nowhere" in errors[2] and "128 tokens" in errors[3] and "at or before the read position 4" in errors[4]
    assert "another role names too" in errors[5] and "line 1 has 1" in errors[6]
    assert "also the id of line 1" in errors[7]


def test_levels():
    assert S.Levels.parse("residual,heads,head-source,neurons:7") == S.Levels(True, True, True, 7)
    assert str(S.Levels.parse("neurons:2, heads")) == "heads,neurons:2"
    for bad in ("neurons", "neurons:0", "heads:3", "residuals", ""):
        with pytest.raises(InputError, match="--levels"):
            S.Levels.parse(bad)


# ------------------------------------------------------------------------------------------------- per prompt


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma2", "tiny-gemma3"])
def test_per_prompt_terms_equal_single_prompt_prisms(preset, checkpoint, data, tmp_path):
    """Every term of prompts.jsonl equals the prism of that prompt run alone (float64: 1e-10 of the terms' size;
    the packed pass and the chunk-wide neuron product sum in other orders)."""
    model = refprism.load(checkpoint(preset, **({} if preset == "tiny" else {"sliding_window": 4})), dtype="float64")
    S.sweep(data, model, tmp_path / "out", levels=LEVELS, chunk=5, quiet=True, bootstrap=10)
    lines = lines_of(tmp_path / "out")
    items, _ = S.prepare(model, S.read_rows(data))
    assert [l["id"] for l in lines] == [it.id for it in items]
    _, side = S.read_neurons(tmp_path / "out")
    for item, line in zip(items, lines):
        run = model.run(list(item.tokens))
        readout = prisms.logits_readout(model, run, item.targets, position=item.position)
        assert line["position"] == item.position and [t["id"] for t in line["tokens"]] == list(item.tokens)
        want = {("residual", "logits"): prisms.residual_prism(readout)}
        for l in range(model.config.n_layers):
            att = prisms.attention_prism(readout, l)
            want["heads", f"L{l}.attn"] = prisms.head_split(att)
            want["head-source", f"L{l}.attn"] = att
            mlp = prisms.mlp_prism(readout, l)
            np.testing.assert_allclose(side[item.index, l], mlp.values, rtol=1e-10, atol=1e-12)
            got = split_of(line, "neurons", f"L{l}.mlp")
            top = [int(c["label"][len(f"L{l}N"):]) for c in got["components"][:-1]]
            assert top == np.argsort(-np.abs(mlp.values).max(axis=1), kind="stable")[:3].tolist()
            rest = np.delete(mlp.values, top, axis=0).sum(axis=0)
            np.testing.assert_allclose([c["values"] for c in got["components"]], np.vstack([mlp.values[top], rest]),
                                       rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got["whole"]["values"], mlp.whole, rtol=1e-10)
            roles = split_of(line, "head-role", f"L{l}.attn")
            grid = att.values.reshape(model.config.n_heads, item.position + 1, -1)
            named = [s for _, s in item.roles]
            for h in range(model.config.n_heads):
                for name, s in item.roles:
                    [c] = [c for c in roles["components"] if c["label"] == f"L{l}H{h}.{name}"]
                    np.testing.assert_allclose(c["values"], grid[h, s], rtol=1e-10, atol=1e-12)
                [c] = [c for c in roles["components"] if c["label"] == f"L{l}H{h}.other"]
                others = [s for s in range(item.position + 1) if s not in named]
                np.testing.assert_allclose(c["values"], grid[h, others].sum(axis=0), rtol=1e-10, atol=1e-12)
        for (prism, whole), split in want.items():
            got = split_of(line, prism, whole)
            assert [c["label"] for c in got["components"]] == split.labels
            np.testing.assert_allclose([c["values"] for c in got["components"]], split.values, rtol=1e-10,
                                       atol=1e-12)
            np.testing.assert_allclose(got["whole"]["values"], split.whole, rtol=1e-10, atol=1e-12)
            assert got["exact"] is True


def test_float32_sweep_stays_exact_and_float32(swept, tiny, data):
    out, summary = swept
    for line in lines_of(out):
        assert all(s["exact"] for s in line["splits"])
    with np.load(sorted((out / "neurons").glob("*.npz"))[0]) as z:
        assert z["terms"].dtype == np.float32
    assert summary["exact"] is True


def test_forward_never_writes_weights(checkpoint):
    """Read-only weights (as Ray's object store hands them out) give the same run and prisms, bit for bit."""
    for preset in ("tiny", "tiny-gemma2", "tiny-gemma3"):
        model = refprism.load(checkpoint(preset))
        p = model.params

        def frozen(a):
            a = a.copy(order="K")  # the same memory layout (W_gate, W_up, W_down are transposed views)
            a.setflags(write=False)
            return a

        params = Weights.from_converted(model.config, model.dtype, embed=frozen(p.embedding()),
                                        ln_final=frozen(p.ln_final),
                                        blocks=[{k: frozen(a) for k, a in p.block(l).items()}
                                                for l in range(model.config.n_layers)])
        ro = refprism.Model(config=model.config, params=params, tokenizer=model.tokenizer, normalizer=model.normalizer)
        prompt = "The capital city of France is"
        a, b = model.run(prompt), ro.run(prompt)
        assert all(np.array_equal(a.record[k], b.record[k]) for k in a.record)
        ra, rb = (prisms.logits_readout(m, r, ["▁Paris"], versus=["▁Tokyo"]) for m, r in ((model, a), (ro, b)))
        for l in range(model.config.n_layers):
            for f in (lambda r, l=l: prisms.attention_prism(r, l), lambda r, l=l: prisms.mlp_prism(r, l),
                      lambda r, l=l: prisms.residual_prism(prisms.through_head(r, l, 1, 5)),
                      lambda r, l=l: prisms.residual_prism(prisms.through_neuron(r, l, 3))):
                assert np.array_equal(f(ra).values, f(rb).values)
    with pytest.raises(refprism.CheckpointError, match="converted weight embed"):
        Weights.from_converted(model.config, np.float64, embed=p.embedding(), ln_final=p.ln_final,
                               blocks=[p.block(l) for l in range(model.config.n_layers)])


# ------------------------------------------------------------------------------------------------- aggregates


def test_summary_equals_numpy_from_the_prompt_file(swept):
    """Means, bootstrap intervals, sign shares and the exactness of the means, recomputed from prompts.jsonl (and
    the neuron side files) with plain NumPy."""
    out, summary = swept
    lines = lines_of(out)
    n = len(lines)
    assert summary["sweep"]["prompts"] == n == 14 and summary["bootstrap"] == {
        "resamples": 200, "seed": 3, "confidence": 0.95, "method": "percentile"}
    counts = np.random.default_rng(3).multinomial(n, np.full(n, 1 / n), size=200)
    _, side = S.read_neurons(out)

    def check(entry, x):  # x [n, Z]: the per-prompt values of one component
        np.testing.assert_allclose(entry["mean"], x.mean(axis=0), rtol=1e-12, atol=1e-15)
        boot = np.array([np.repeat(x, w, axis=0).mean(axis=0) for w in counts])  # resample b: prompt i w_bi times
        np.testing.assert_allclose(entry["ci"], np.percentile(boot, [2.5, 97.5], axis=0).T, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(entry["same_sign"], (np.sign(x) == np.sign(x.mean(axis=0))).mean(axis=0))

    seen = set()
    for split in summary["splits"]:
        prism, whole = split["prism"], split["whole"]["label"]
        seen.add(prism)
        per = [split_of(l, prism, whole) for l in lines]
        wholes = np.array([s["whole"]["values"] for s in per])
        check(split["whole"], wholes)
        means = []
        for comp in split["components"]:
            label = comp["label"]
            if prism == "neurons":
                layer = int(whole[1:].split(".")[0])
                if label.endswith(".rest"):
                    chosen = [int(c["label"][len(f"L{layer}N"):]) for c in split["components"][:-1]]
                    x = np.delete(side[:, layer].astype(np.float64), chosen, axis=1).sum(axis=1)
                else:
                    x = side[:, layer, int(label[len(f"L{layer}N"):])].astype(np.float64)
            else:  # a role a prompt does not name is 0 there
                x = np.array([next((c["values"] for c in s["components"] if c["label"] == label), [0.0, 0.0])
                              for s in per])
            check(comp, x)
            means.append(x.mean(axis=0))
        residual = wholes.mean(axis=0) - np.sum(means, axis=0)
        np.testing.assert_allclose(split["residual"], residual, atol=1e-12)
        per_prompt = np.array([s["residual"] for s in per]).mean(axis=0)  # the mean decomposes: same residual
        np.testing.assert_allclose(split["residual"], per_prompt, atol=1e-12)
        assert split["exact"] and np.all(np.abs(residual) <= np.array(split["tolerance"]))
    assert seen == {"residual", "heads", "head-role", "neurons"}  # head-source: by role, not by index

    roles = split_of({"splits": summary["splits"]}, "head-role", "L1.attn")
    named = {c["label"]: c.get("prompts_named") for c in roles["components"]}
    assert named["L1H0.bos"] == 7 and named["L1H0.of"] == 1 and named["L1H0.city"] == 1
    assert named["L1H0.country"] == 13 and named["L1H0.other"] is None


def test_neuron_union_covers_every_prompts_top_k_and_the_largest_means(swept):
    out, summary = swept
    lines = lines_of(out)
    _, side = S.read_neurons(out)
    for l in range(2):
        split = split_of({"splits": summary["splits"]}, "neurons", f"L{l}.mlp")
        chosen = {c["label"] for c in split["components"][:-1]}
        for line in lines:
            assert {c["label"] for c in split_of(line, "neurons", f"L{l}.mlp")["components"][:-1]} <= chosen
        mean = side[:, l].astype(np.float64).mean(axis=0)
        assert {f"L{l}N{n}" for n in np.argsort(-np.abs(mean).max(axis=1))[:3]} <= chosen


def test_top_components_rank_by_mean(swept):
    _, summary = swept
    for prism, rows in summary["top"].items():
        every = [c for s in summary["splits"] if s["prism"] == prism for c in s["components"]
                 if not c["label"].endswith(".rest")]
        best = sorted(every, key=lambda c: -np.max(np.abs(c["mean"])))[:10]
        assert [r["label"] for r in rows] == [c["label"] for c in best]


def test_parquet_holds_the_prompt_file_in_long_format(swept):
    out, _ = swept
    table = pq.read_table(out / "prompts.parquet").to_pandas()
    assert list(table.columns) == list(S.PARQUET_COLUMNS)
    expect = [(l["id"], s["prism"], s["whole"]["label"], c["label"], z, v) for l in lines_of(out)
              for s in l["splits"] for c in s["components"] for z, v in enumerate(c["values"])]
    got = sorted(zip(table["id"], table["prism"], table["whole_label"], table["label"], table["column"],
                     table["value"]))
    assert got == sorted(expect)


def test_neuron_parquet_holds_the_aggregated_neurons_of_every_prompt(swept):
    out, summary = swept
    df = pq.read_table(out / "neurons.parquet").to_pandas()
    assert list(df.columns) == list(S.NEURON_COLUMNS) and df["id"].nunique() == 14
    means = df.groupby(["label", "column"])["value"].mean()
    for split in summary["splits"]:
        if split["prism"] == "neurons":
            for c in split["components"]:
                np.testing.assert_allclose([means[c["label"], z] for z in range(2)], c["mean"], rtol=1e-12)
    assert len(df) == 14 * 2 * sum(len(s["components"]) for s in summary["splits"] if s["prism"] == "neurons")


# ------------------------------------------------------------------------------------------------- resuming


def sweep_cmd(data, model_dir, out, *extra):
    return ["sweep", str(data), "--model", str(model_dir), "--out", str(out), "--levels", LEVELS, "--chunk", "4",
            "--bootstrap", "100", "--quiet", *extra]


def folder_files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def test_resume_after_a_kill_between_chunks_equals_an_uninterrupted_run(data, tiny_dir, tmp_path, capsys):
    """A real `python -m refprism.cli sweep` process is killed (SIGKILL) once its first chunk is on disk; the
    re-run skips that chunk and its output equals an uninterrupted run's, file by file, byte for byte."""
    assert cli.main(sweep_cmd(data, tiny_dir, tmp_path / "whole")) == 0
    hold = tmp_path / "held"
    env = {**os.environ, "REFPRISM_SWEEP_TEST_HOLD": str(hold)}
    proc = subprocess.Popen([sys.executable, "-m", "refprism.cli", *sweep_cmd(data, tiny_dir, tmp_path / "cut")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not hold.exists():  # the hook writes it right after the first commit, then waits
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the sweep never committed its first chunk"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert [l["index"] for l in lines_of(tmp_path / "cut")] == [0, 1, 2, 3]  # one chunk: nothing half-written
    assert not (tmp_path / "cut" / "summary.json").exists()
    assert cli.main(sweep_cmd(data, tiny_dir, tmp_path / "cut")) == 0
    capsys.readouterr()
    whole, cut = folder_files(tmp_path / "whole"), folder_files(tmp_path / "cut")
    assert sorted(whole) == sorted(cut) and "neurons/part-000003.npz" in whole
    for name in whole:
        assert whole[name] == cut[name], name


def test_a_torn_last_write_is_cut_off_and_redone(data, tiny, tmp_path):
    S.sweep(data, tiny, tmp_path / "whole", levels="residual,heads", chunk=4, quiet=True, bootstrap=50)
    text = (tmp_path / "whole" / "prompts.jsonl").read_bytes()
    ends = [i for i, b in enumerate(text) if b == ord("\n")]
    for cut in (ends[8] + 40, ends[9] + 1, ends[7] + 1 + 10):  # mid-line of chunk 2; after its 2nd line; one byte in
        shutil.copytree(tmp_path / "whole", tmp_path / "torn")
        (tmp_path / "torn" / "prompts.jsonl").write_bytes(text[:cut])
        (tmp_path / "torn" / "summary.json").unlink()
        S.sweep(data, tiny, tmp_path / "torn", levels="residual,heads", chunk=4, quiet=True, bootstrap=50)
        assert folder_files(tmp_path / "torn") == folder_files(tmp_path / "whole")
        shutil.rmtree(tmp_path / "torn")
    shutil.copytree(tmp_path / "whole", tmp_path / "edited")
    lines = text.decode().splitlines(keepends=True)
    (tmp_path / "edited" / "prompts.jsonl").write_text("".join(lines[:2] + lines[3:]))  # a line of chunk 0 gone
    with pytest.raises(InputError, match="line 3 does not fit this sweep's chunks"):
        S.sweep(data, tiny, tmp_path / "edited", levels="residual,heads", chunk=4, quiet=True)


def test_a_folder_of_other_settings_is_refused(data, tiny, tmp_path):
    S.sweep(data, tiny, tmp_path / "out", levels="residual", chunk=4, quiet=True, bootstrap=10)
    with pytest.raises(InputError, match='levels: "residual" there, "residual,heads" now'):
        S.sweep(data, tiny, tmp_path / "out", levels="residual,heads", chunk=4, quiet=True)
    with pytest.raises(InputError, match="chunk: 4 there, 5 now"):
        S.sweep(data, tiny, tmp_path / "out", levels="residual", chunk=5, quiet=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a sweep folder"):
        S.sweep(data, tiny, tmp_path / "busy", levels="residual", quiet=True)


# ------------------------------------------------------------------------------------------------- the command


def test_bad_rows_are_reported_with_line_numbers_and_the_sweep_goes_on(tiny_dir, tmp_path, capsys):
    rows = capital_rows()[:3]
    data = write_jsonl(tmp_path / "d.jsonl", rows[:1], ['{"id": "x", "prompt": \n'])
    with data.open("a") as f:
        f.write(json.dumps({**rows[1], "targets": ["▁Atlantis", "▁London"]}) + "\n" + json.dumps(rows[2]) + "\n")
    assert cli.main(["sweep", str(data), "--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr()
    errors = [json.loads(l) for l in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(2, None), (3, "france-short")]
    assert "malformed JSON" in errors[0]["error"] and "'▁Atlantis'" in errors[1]["error"]
    warnings = [l for l in out.err.splitlines() if l.startswith("refprism: warning:")]
    assert len(warnings) == 2 and "d.jsonl line 2: malformed JSON" in warnings[0] and "line 3:" in warnings[1]
    assert [l["id"] for l in lines_of(tmp_path / "out")] == ["france", "russia"]
    assert "sweep of 2 prompts (2 bad rows skipped)" in out.out

    code = cli.main(["sweep", str(data), "--model", str(tiny_dir), "--out", str(tmp_path / "strict"), "--strict"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("refprism: error: ") and "d.jsonl line 2: malformed JSON" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "strict").exists()


def test_command_errors_are_one_line(tiny_dir, data, tmp_path, capsys, monkeypatch):
    base = ["sweep", str(data), "--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    for extra, message in (([ "--levels", "heads:2"], "--levels"),
                           (["--validate", "head-source"], "--validate 'head-source' is not a level"),
                           (["--ablate", "zero"], "go with --validate"),
                           (["--workers", "2"], "go with --backend ray"),
                           (["--chunk", "0"], "chunk must be an integer >= 1")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    argv = ["sweep", str(tmp_path / "none.jsonl"), "--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "cannot read the data set" in capsys.readouterr().err


def assert_same_totals(got, want):
    """Each component's total effects (one per column) in `got` equal those in `want`, label by label (a dict of
    lists, which pytest.approx does not compare since pytest 9.2)."""
    got, want = ({c["label"]: c["total"] for c in cs} for cs in (got, want))
    assert list(got) == list(want)
    np.testing.assert_allclose(np.array(list(got.values()), dtype=float), np.array(list(want.values()), dtype=float),
                               rtol=1e-6, atol=1e-7)


def test_validate_runs_interventions_per_prompt_and_aggregates(data, tiny, tmp_path):
    """--validate: refprism.interventions.validate(model, prompt up to the read position, level=, ablate=, top=,
    counterfactual=, targets=, versus=) per prompt, its JSON in the prompt's line; summary.json's "validate" holds
    each agreement metric's mean over prompts and each component's mean prism / direct / total, which a NumPy
    computation from the lines reproduces."""
    from refprism import interventions

    rows = capital_rows()[:4]
    rows[0]["counterfactual"] = "The capital city of Spain is"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    check = S.Validation("heads", "zero", 3)
    summary = S.sweep(path, tiny, tmp_path / "out", levels="residual", chunk=2, validate=check, quiet=True,
                      bootstrap=10)
    lines = lines_of(tmp_path / "out")
    first = lines[0]
    direct = interventions.validate(tiny, [t["id"] for t in first["tokens"]][: first["position"] + 1],
                                    level="heads", ablate="zero", top=3,  # (zero ablation reads no counterfactual)
                                    targets=[f"#{t['id']}" for t in first["targets"]],
                                    versus=[f"#{t['id']}" for t in first["versus"]]).to_json()
    assert_same_totals(first["validate"]["components"], direct["components"])
    v = summary["validate"]
    assert v["prompts"] == 4 and v["level"] == "heads"
    for metric in ("spearman", "sign_agreement", "top_k_precision"):
        values = [l["validate"]["agreement"][metric] for l in lines]
        assert v["agreement"][metric]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
    comp = next(c for c in v["components"] if c["label"] == "L1H2")
    totals = np.array([next(c["total"] for c in l["validate"]["components"] if c["label"] == "L1H2") for l in lines])
    assert comp["prompts"] == 4 and comp["total"]["mean"] == pytest.approx(totals.mean(axis=0).tolist(), rel=1e-12)


def test_validate_resample_needs_each_rows_counterfactual(tiny, tmp_path):
    """--validate with resample ablation: a row without a counterfactual, or with one of another token count, is a
    bad row with its line number (not a failed chunk); a row read before its last token resamples from the
    counterfactual cut at the same place, as a direct validate call does."""
    from refprism import interventions

    rows = capital_rows()[:4]  # rows[3] is read at -2
    rows[0]["counterfactual"] = "The capital city of Japan is"
    rows[2]["counterfactual"] = "The capital of Japan is"  # 6 tokens against the prompt's 7
    rows[3]["counterfactual"] = "The capital of Japan is"
    path = write_jsonl(tmp_path / "d.jsonl", rows)  # rows[1] has none
    summary = S.sweep(path, tiny, tmp_path / "out", levels="residual", chunk=2, quiet=True, bootstrap=10,
                      validate=S.Validation("heads", "resample", 3))
    errors = [json.loads(l) for l in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(2, rows[1]["id"]), (3, rows[2]["id"])]
    assert "no counterfactual" in errors[0]["error"] and "6 tokens and the prompt 7" in errors[1]["error"]
    assert summary["validate"]["prompts"] == 2
    line = next(l for l in lines_of(tmp_path / "out") if l["id"] == rows[3]["id"])
    cut = line["position"] + 1
    direct = interventions.validate(tiny, [t["id"] for t in line["tokens"]][:cut], level="heads", ablate="resample",
                                    top=3, counterfactual=tiny.encode("The capital of Japan is")[:cut],
                                    targets=[f"#{t['id']}" for t in line["targets"]],
                                    versus=[f"#{t['id']}" for t in line["versus"]]).to_json()
    assert_same_totals(line["validate"]["components"], direct["components"])


def test_plot_writes_the_summary_figures(swept, tmp_path):
    from refprism.sweeps import plots as PS

    _, summary = swept
    assert [p.name for p in PS.write_figures(summary, tmp_path)] == ["residual.png", "heads.png", "roles.png",
                                                                     "neurons.png"]
    fig = PS._roles_fig(summary)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    roles = ["bos", "country", "city", "of", "other"]
    assert len(images) == len(roles)
    for role, image in zip(roles, images):
        for l in range(2):
            split = split_of({"splits": summary["splits"]}, "head-role", f"L{l}.attn")
            want = [next(c["mean"][0] for c in split["components"] if c["label"] == f"L{l}H{h}.{role}")
                    for h in range(4)]
            np.testing.assert_allclose(image[l], want)
    heads = PS._heads_fig(summary)
    assert len([ax for ax in heads.axes if ax.images]) == 2  # one panel per column
    res = PS._residual_fig(summary).axes[0]
    assert len(res.containers) == 2  # an error-bar series per column


# ------------------------------------------------------------------------------------------------- data sets


def test_shipped_data_sets_are_the_tools_and_fit_gemmas_tokenizer():
    """refprism/sweeps/data/*.jsonl are what tools/make_datasets.py writes; with the gemma-2b tokenizer every target and
    foil is one piece and every role sits on its token (Gemma 3's tokenizer: test_shipped_data_sets_on_gemma3)."""
    import importlib.util

    from tokenizers import Tokenizer

    spec = importlib.util.spec_from_file_location("make_datasets",
                                                  Path(__file__).parents[1] / "tools" / "make_datasets.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tok = Tokenizer.from_file(str(shared_tokenizer() / "tokenizer.json"))
    for name, rows, at_least in (("capitals", tool.capitals(), 30), ("additions", tool.additions(), 40)):
        path = S.data_path(name)
        assert path.read_text("utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        read = S.read_rows(path)
        assert len(read) >= at_least and not [r for r in read if isinstance(r, S.BadRow)]
        tool.check(rows, tok, name)  # raises SystemExit naming the row on any mismatch


@pytest.mark.slow
def test_shipped_data_sets_on_gemma3_270m(tmp_path, gemma3_270m):
    """The shipped data sets on Gemma 3 270M (docs/sweeps.md's numbers): every row fits its tokenizer, the roles sit
    on their tokens, and the findings hold across the set with intervals: L12H2 reading the country carries the
    capital in every prompt; the sum's digit wins on average."""
    model = gemma3_270m  # the demo's GGUF, loaded once per session (conftest)
    cap = S.sweep("capitals", model, tmp_path / "capitals", levels="residual,head-source", quiet=True)
    assert cap["sweep"]["prompts"] == 40 and cap["sweep"]["bad_rows"] == 0 and cap["exact"]
    for line in lines_of(tmp_path / "capitals"):
        country = line["id"].capitalize()
        assert line["tokens"][line["roles"]["country"]]["piece"] == "▁" + country
    # The finding, L12H2 reading the country, is refprism's to find (no other tool splits logits by head and
    # source); what makes it more than refprism's say-so: its per-prompt terms are the effects of forward passes
    # written here (the edge's value removed from the head's output, every later output, norm scale and pattern
    # frozen), on the first 3 prompts, and the mean and sign share are recomputed from the per-prompt terms.
    best = cap["top"]["head-role"][0]
    assert best["label"] == "L12H2.country"
    lines = lines_of(tmp_path / "capitals")
    terms = []
    for line in lines:
        [c] = [c for c in split_of(line, "head-role", "L12.attn")["components"] if c["label"] == "L12H2.country"]
        terms.append(c["values"][0])
    terms = np.array(terms)
    assert best["mean"][0] == pytest.approx(terms.mean(), rel=1e-9) and best["same_sign"] == [1.0]
    assert terms.min() > 0 and terms.mean() - 3 * terms.std() / np.sqrt(len(terms)) > 3  # beside the bootstrap's
    assert best["ci"][0][0] > 3
    for line, term in zip(lines[:3], terms[:3]):
        ids = [t["id"] for t in line["tokens"]]
        src, p = line["roles"]["country"], line["position"]
        base = model.run(ids)
        rows = [t["id"] for t in line["targets"]], [t["id"] for t in line["versus"]]
        read = lambda rec, p=p, rows=rows: rec["logits"][p, rows[0]].mean() - rec["logits"][p, rows[1]].mean()  # noqa: E731

        def hook(name, value, record, base=base, src=src, p=p):
            if name == "blocks.12.attn.z":  # [T, N, H]; the one kv head: pattern[2, p, src] v[src, 0]
                value = value.copy()
                value[p, 2] -= record["blocks.12.attn.pattern"][2, p, src] * record["blocks.12.attn.v"][src, 0]
                return value
            later = name.startswith("blocks.") and (int(name.split(".")[1]) > 12 or name == "blocks.12.mlp.out")
            if (later and name.endswith((".attn.out", ".mlp.out"))) or name.endswith((".scale", "attn.pattern")):
                return base.record[name]
            return value

        frozen = float(read(base.record) - read(model.run(ids, edit=hook).record))
        # float32 sums in other orders: measured ~1e-6 on terms ~3
        assert term == pytest.approx(frozen, abs=1e-4), line["id"]
    add = S.sweep("additions", model, tmp_path / "additions", levels="residual", quiet=True)
    assert add["sweep"]["prompts"] == 55 and add["sweep"]["bad_rows"] == 0 and add["exact"]
    whole = next(s for s in add["splits"] if s["prism"] == "residual")["whole"]
    assert whole["ci"][0][0] > 2  # the right digit beats the mean of the others, across the set
    for line in lines_of(tmp_path / "additions"):
        _, a, b = line["id"].split("-")
        assert [line["tokens"][line["roles"][r]]["piece"] for r in ("a", "plus", "b", "equals")] == [a, "+", b, "="]


# ------------------------------------------------------------------------------------------------- fuzzing


numbers = st.integers(-3, 40).map(str) | st.sampled_from(["0", "-1", "10**30", "1e3", "", "x", str(2**63),
                                                           str(10**30)])
SWEEP_VALUES = {
    "--levels": st.sampled_from(["residual", "heads", "head-source", "neurons:2", "residual,neurons:1",
                                 "neurons:0", "neurons:x", "", ",", "heads,,residual"]) | st.text(max_size=8),
    "--chunk": numbers, "--bootstrap": numbers, "--seed": numbers, "--top": numbers, "--validate-top": numbers,
    "--workers": numbers, "--dtype": st.sampled_from(["float32", "float64", "float16", ""]),
    "--memory": st.sampled_from(["auto", "fast", "low", "none"]), "--backend": st.sampled_from(["local", "x"]),
    "--address": st.sampled_from(["auto", "127.0.0.1:1"]), "--validate": st.sampled_from(["heads", ""]),
    "--ablate": st.sampled_from(["zero", "mean"]),
}


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(draws=st.data())
def test_fuzz_sweep_arguments(tiny_dir, tmp_path_factory, monkeypatch, draws):
    """Any mix of the sweep's options: exit 0, or exit 2 with one line `refprism: error: ...` (never a traceback,
    an out-of-memory or another exit status). Ray is never started: --backend is local or not a backend."""
    import contextlib
    import io

    monkeypatch.setitem(sys.modules, "refprism.interventions", None)
    folder = tmp_path_factory.mktemp("fuzz")
    write_jsonl(folder / "d.jsonl", capital_rows()[:3], ['{"id": "x", "prompt": "\n'])
    (folder / "d.csv").write_text("id,prompt,targets\na,The capital city of France is,▁Paris ▁London\n")
    (folder / "d.txt").write_text("not a data set")
    argv = ["sweep", draws.draw(st.sampled_from(["d.jsonl", "d.csv", "d.txt", "absent.jsonl", "capitals"])),
            "--model", str(tiny_dir),
            "--out", str(folder / draws.draw(st.sampled_from(["out", "out/deeper", "d.csv"])))]
    argv[1] = argv[1] if argv[1] == "capitals" else str(folder / argv[1])
    for opt, values in SWEEP_VALUES.items():
        if draws.draw(st.integers(0, 9)) < 3:
            argv += [opt, draws.draw(values)]
    argv += draws.draw(st.lists(st.sampled_from(["--strict", "--quiet"]), unique=True))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    lines = [l for l in err.getvalue().splitlines() if not l.startswith(("sweep:", "\rsweep:"))]
    event(f"exit {code}")
    assert code in (0, 2), (argv, code, err.getvalue())
    if code == 2:
        errors = [l for l in lines if l.startswith("refprism: error: ")]
        assert len(errors) == 1 and "Traceback" not in err.getvalue(), (argv, err.getvalue())
    else:
        assert not any("error" in l for l in lines if not l.startswith("refprism: warning: ")), (argv, lines)


def test_a_byte_order_mark_is_not_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "prompt": "x", "targets": ["#5"]}).encode() + b"\n")
    assert S.read_rows(path) == [S.Row(1, "a", "x", ("#5",))]


def test_validate_methods_are_aggregated_with_intervals(tiny, tmp_path):
    """--validate-methods: each prompt's line holds every method's scores beside prism and total, and its agreement
    (recomputed here from the line's own numbers); summary.json's validate.methods holds each method's metrics and
    costs as mean over the prompts with a bootstrap interval, and each component's mean score per method."""
    from refprism.interventions.agreement import agreement

    path = write_jsonl(tmp_path / "d.jsonl", capital_rows()[:4])
    check = S.Validation("heads", "zero", 3, ("gradxact", "atp-gd"))
    summary = S.sweep(path, tiny, tmp_path / "out", levels="residual", chunk=2, validate=check, quiet=True,
                      bootstrap=50)
    lines = lines_of(tmp_path / "out")
    for line in lines:
        comps = line["validate"]["components"]
        for m in ("gradxact", "atp-gd"):
            mine = agreement([c[m][0] for c in comps], [c["total"][0] for c in comps], 3)
            got = line["validate"]["methods"][m]["agreement"]
            assert got["spearman"] == pytest.approx(mine["spearman"], rel=1e-12)
            assert got["top_k_recall"] == mine["top_k_recall"]
    m = summary["validate"]["methods"]
    assert set(m) == {"gradxact", "atp-gd", "prism"}
    for name in ("gradxact", "atp-gd", "prism"):
        values = [l["validate"]["methods"][name]["agreement"]["kendall"] for l in lines]
        e = m[name]["agreement"]["kendall"]
        assert e["mean"] == pytest.approx(np.mean(values), rel=1e-12) and e["prompts"] == 4
        assert e["ci"][0] <= e["mean"] <= e["ci"][1] and e["ci"][0] >= min(values) and e["ci"][1] <= max(values)
    assert m["atp-gd"]["agreement"]["sign_agreement"] is None  # unsigned: no sign to agree
    assert m["atp-gd"]["cost"]["backward"]["mean"] == tiny.config.n_layers and m["prism"]["cost"]["seconds"] is None
    comp = next(c for c in summary["validate"]["components"] if c["label"] == "L1H2")
    scores = [next(c["gradxact"] for c in l["validate"]["components"] if c["label"] == "L1H2") for l in lines]
    assert comp["gradxact"]["mean"] == pytest.approx(np.mean(scores, axis=0).tolist(), rel=1e-12)


@pytest.mark.parametrize("extra, text", [
    (["--validate-methods", "atp"], "go with --validate LEVEL"),
    (["--validate", "heads", "--validate-methods", ","], "--validate-methods is empty"),
    (["--validate", "heads", "--ablate", "zero", "--validate-methods", "eap"], "'eap' is not one of"),
    (["--validate", "heads", "--ablate", "zero", "--validate-methods", "atp*"], "atp* needs"),
    (["--validate", "neurons:1", "--ablate", "resample", "--validate-methods", "atp,atp*-gd"], "atp*-gd needs"),
    (["--validate", "heads", "--validate-steps", "3"], "--validate-steps goes with --validate-methods"),
])
def test_cli_validate_methods_refusals(tiny_dir, tmp_path, capsys, extra, text):
    from refprism import cli

    path = write_jsonl(tmp_path / "d.jsonl", capital_rows()[:2])
    assert cli.main(["sweep", str(path), "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refprism: error:") and text in err and "\n" not in err, err
