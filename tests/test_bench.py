"""tools/bench.py: the harness end to end with --quick on a tiny checkpoint, and its pure helpers on literal inputs.

The end-to-end runs check the report's structure (machine, command, every case row, ratios, targets, notes),
not its timings: those depend on the machine.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # the HF case of the benchmark needs it: a missing torch fails here, not as a skipped test

from refprism.checkpoints.synth import make_config, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"

_spec = importlib.util.spec_from_file_location("bench", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

ROW_LABELS = [
    "HF load", "HF forward 1 (first)", "HF forward 2 (steady)",
    "refprism fast load", "refprism fast forward 1 (first)", "refprism fast forward 2 (steady)", "prism set (fast)",
    "refprism low load", "refprism low forward 1 (first)", "refprism low forward 2 (steady)", "prism set (low)",
    "float64 (low) load", "float64 (low) forward",
]
TARGET_LABELS = [
    "fast forward / HF forward, T=7", "fast peak RSS / HF peak RSS, T=7", "fast load / HF load, T=7",
    "low peak RSS / HF peak RSS, T=7", "low forward / HF forward, T=7", "prism set / one fast forward, T=7",
    "float64 audit completes, peak RSS, T=7",
]
OLD_NOTES = "## Notes\n\nHand-written: the VM was busy during run 2.\n\n- keep this line | and this table cell |\n"


def run_bench(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def table_row(report: str, label: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is `label`."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in the report")


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """A tiny checkpoint in the benchmark's layout: bf16, two shards and an index, a tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("bench") / "tiny-bf16", make_config("tiny"), dtype="bfloat16",
                            shards=2)


@pytest.fixture(scope="module")
def quick(tiny_bf16, tmp_path_factory):
    """One --quick run into a report that already has hand-written notes: (process, report text, out path)."""
    out = tmp_path_factory.mktemp("report") / "tmp" / "perf.md"
    out.parent.mkdir()
    out.write_text("# an old report\n\n| stale | table |\n\n" + OLD_NOTES, encoding="utf-8")
    proc = run_bench("--quick", "--out", out, "--checkpoint", tiny_bf16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out.read_text(encoding="utf-8"), out


# ------------------------------------------------------------------------------------------ end to end


def test_quick_report_has_machine_and_command(quick, tiny_bf16):
    proc, report, out = quick
    assert proc.stdout == report  # the report printed is the report written
    machine = report.split("## Machine", 1)[1].split("\n## ", 1)[0]
    assert table_row(machine, "cores (os.cpu_count)")[1] == str(os.cpu_count())
    assert table_row(machine, "torch")[1] == torch.__version__
    assert table_row(machine, "Python")[1] == ".".join(map(str, sys.version_info[:3]))
    assert re.search(r"\| RAM \(MemTotal\) \| \d+\.\d GiB \|", machine)
    assert "NumPy BLAS" in machine and "transformers" in machine
    command = report.split("## Command", 1)[1].split("\n## ", 1)[0]
    assert f"--quick --out {out} --checkpoint {tiny_bf16}" in command
    assert re.search(r"Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", report)
    assert table_row(report, "shape")[1].startswith("tiny (L=2, D=64")


def test_quick_report_has_every_case_with_a_number_and_ratios(quick):
    _, report, _ = quick
    assert "## Results, T = 7" in report and "## Results, T = 128" not in report  # --quick: T = 7 only
    for label in ROW_LABELS:
        _, seconds, time_ratio, rss, rss_ratio = table_row(report, label)
        assert re.fullmatch(r"\d+(\.\d+)?", seconds), (label, seconds)  # no "failed": every case ran
        assert float(rss) > 0, label
        if label.startswith("HF") or label.startswith("prism set"):
            assert time_ratio == "—", label
        else:  # refprism / HF, from this invocation's medians
            assert re.fullmatch(r"\d+(\.\d+)?x", time_ratio), (label, time_ratio)
            assert re.fullmatch(r"\d+(\.\d+)?x", rss_ratio), (label, rss_ratio)
    # The ratio is the quotient of the two medians shown (to the shown precision).
    hf_load = float(table_row(report, "HF load")[1])
    fast_load, fast_ratio = table_row(report, "refprism fast load")[1:3]
    assert math.isclose(float(fast_ratio[:-1]), float(fast_load) / hf_load, rel_tol=0.02, abs_tol=1e-3)
    assert "top-1 token at the last position vs HF: refprism-fast same, refprism-low same, float64 same" in report


def test_quick_report_has_bandwidth_floor_and_targets(quick):
    _, report, _ = quick
    assert re.search(r"`a\.sum\(\)` \(1 thread\) \d+\.\d GB/s", report)
    # tiny: 106,816 parameters; float32 reads 4 bytes each, low mode reads bf16 (2) and writes float32 (4)
    assert table_row(report, "refprism fast float32")[1] == f"{4 * 106816 / 1e6:.2f} MB"
    assert table_row(report, "refprism low float32")[1] == f"{6 * 106816 / 1e6:.2f} MB"
    targets = report.split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert "The targets are stated for gemma-2b; this run used a tiny" in targets
    for label in TARGET_LABELS:
        what, measured, limit, result = table_row(targets, label)
        assert result in ("PASS", "FAIL"), (label, result)
        assert limit.startswith("<= ")
    measured, limit, result = table_row(targets, "prism set / one fast forward, T=7")[1:]
    assert result == bench.verdict(float(measured[:-1]), 0.25) and limit == "<= 0.25x"
    assert table_row(report, "refprism-fast")[1] == "7"  # the raw runs table: case, T, run ...


def test_quick_report_keeps_the_old_notes_and_replaces_the_rest(quick):
    _, report, out = quick
    assert report.endswith(OLD_NOTES)
    assert re.findall(r"^## Notes.*$", report, re.MULTILINE) == ["## Notes"]  # one Notes heading, the old one
    assert "an old report" not in report and "stale" not in report
    assert [p.name for p in out.parent.iterdir()] == ["perf.md"]  # no temporary file left beside it


def test_skip_hf_gives_no_ratio_and_na_targets(tiny_bf16, tmp_path):
    out = tmp_path / "perf.md"
    proc = run_bench("--quick", "--skip-hf", "--skip-float64", "--modes", "fast", "--out", out,
                     "--checkpoint", tiny_bf16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| HF load |" not in report and "| refprism low load |" not in report
    assert table_row(report, "refprism fast load")[2] == "—"
    assert table_row(report, "fast forward / HF forward, T=7")[1:] == ["—", "<= 0.6x", "n/a"]
    assert table_row(report, "prism set / one fast forward, T=7")[3] in ("PASS", "FAIL")  # no HF needed
    assert report.endswith(f"## Notes\n\n{bench.NOTES_PLACEHOLDER}\n")  # a new file gets the placeholder


def test_failing_children_are_reported_and_the_run_goes_on(tiny_bf16, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_bf16.iterdir():  # the same checkpoint without its second shard: every load fails
        if f.name != "model-00002-of-00002.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    proc = run_bench("--quick", "--skip-float64", "--checkpoint", broken)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout
    for label in ("HF load", "refprism fast load", "refprism low forward 2 (steady)", "prism set (fast)"):
        assert table_row(report, label)[1] == "failed (exit 1)", label
    assert table_row(report, "fast load / HF load, T=7")[1:] == ["failed (exit 1)", "<= 1.0x", "FAIL"]
    assert "## Notes" in report


# ------------------------------------------------------------------------------------------ helpers


def test_median_ignores_missing_values():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0]) == 2.5
    assert bench.median([1.0, None, 3.0]) == 2.0
    assert bench.median([None]) is None and bench.median([]) is None


def test_ratio_and_formatting():
    assert bench.ratio(1.5, 3.0) == 0.5
    assert bench.ratio(1.0, 0.0) is None and bench.ratio(None, 1.0) is None and bench.ratio(1.0, None) is None
    assert bench.fmt_ratio(0.4567) == "0.457x"
    assert bench.fmt_ratio(12.345) == "12.3x"
    assert bench.fmt_ratio(0.00123) == "0.00123x"
    assert bench.fmt_ratio(None) == "—"
    assert bench.fmt_seconds(0.000432) == "0.000432"
    assert bench.fmt_seconds(2.5) == "2.50"
    assert bench.fmt_seconds(123.4) == "123"
    assert bench.fmt_gb(1.5e9) == "1.50" and bench.fmt_gb(None) == "—"
    assert bench.fmt_bytes(10_060_000_000) == "10.06 GB" and bench.fmt_bytes(427_264) == "0.43 MB"


def test_verdict_at_and_around_the_limit():
    assert bench.verdict(0.6, 0.6) == "PASS"
    assert bench.verdict(0.61, 0.6) == "FAIL"
    assert bench.verdict(0.0, 0.25) == "PASS"
    assert bench.verdict(float("nan"), 1.0) == "FAIL"
    assert bench.verdict(None, 1.0) == "n/a"


def test_notes_section_is_kept_from_its_heading_to_the_end():
    old = "# report\n\n## Targets\n\n| a | b |\n\n## Notes\n\nmine\n\n### detail\n\nmore\n\n\n"
    assert bench.notes_section(old) == "## Notes\n\nmine\n\n### detail\n\nmore\n"
    placeholder = "## Notes\n\n(notes to be written by hand after the run)\n"
    assert bench.notes_section(None) == placeholder
    assert bench.notes_section("# report\n\n## Notes about timing\n\nnot the section\n") == placeholder


def test_summarize_marks_failed_children():
    ok1, ok3, killed = {"load_s": 1.0}, {"load_s": 3.0}, {"failed": "failed (exit -9)"}
    assert bench.summarize([ok1, killed, ok3], "load_s") == (2.0, "1/3 failed")
    assert bench.summarize([killed, killed], "load_s") == (None, "failed (exit -9)")
    assert bench.summarize([ok1, ok3], "load_s") == (2.0, None)
    assert bench.summarize([], "load_s") == (None, None)


def test_targets_from_literal_medians():
    results = {
        ("hf", 7): [{"load_s": 2.0, "forward2_s": 1.0, "rss_forward": 10e9}],
        ("refprism-fast", 7): [{"load_s": 1.0, "forward2_s": 0.5, "rss_forward": 8e9, "prisms_s": 0.1}],
        ("refprism-low", 7): [{"load_s": 1.0, "forward2_s": 2.5, "rss_forward": 4e9, "prisms_s": 0.2}],
        ("float64", 7): [{"failed": "failed (exit -9)"}],
        ("hf", 128): [{"load_s": 2.0, "forward2_s": 4.0, "rss_forward": 10e9}],
        ("refprism-fast", 128): [{"load_s": 1.0, "forward2_s": 3.9, "rss_forward": 7.5e9, "prisms_s": 1.0}],
        ("refprism-low", 128): [{"load_s": 1.0, "forward2_s": 8.0, "rss_forward": 4.6e9, "prisms_s": 1.0}],
        ("float64", 128): [{"rss_forward": 15.9e9}],
    }
    got = {what: (measured, result) for what, measured, _, result in
           bench.targets(results, ["hf", "refprism-fast", "refprism-low", "float64"], [7, 128])}
    assert got["fast forward / HF forward, T=7"] == ("0.500x", "PASS")  # limit 0.6 at T = 7
    assert got["fast forward / HF forward, T=128"] == ("0.975x", "PASS")  # limit 1.0 at T = 128
    assert got["fast peak RSS / HF peak RSS, T=7"] == ("0.800x", "FAIL")
    assert got["fast peak RSS / HF peak RSS, T=128"] == ("0.750x", "PASS")  # at the limit
    assert got["fast load / HF load, T=7"] == ("0.500x", "PASS")
    assert got["low peak RSS / HF peak RSS, T=7"] == ("0.400x", "PASS")
    assert got["low peak RSS / HF peak RSS, T=128"] == ("0.460x", "FAIL")
    assert got["low forward / HF forward, T=7"] == ("2.50x", "FAIL")
    assert got["low forward / HF forward, T=128"] == ("2.00x", "PASS")
    assert got["prism set / one fast forward, T=7"] == ("0.200x", "PASS")
    assert got["prism set / one fast forward, T=128"] == ("0.256x", "FAIL")
    assert got["float64 audit completes, peak RSS, T=7"] == ("failed (exit -9)", "FAIL")
    assert got["float64 audit completes, peak RSS, T=128"] == ("15.90 GB", "PASS")
    assert len(got) == 14


def test_results_table_shows_a_failed_case_and_ratios():
    results = {("hf", 7): [{"load_s": 2.0, "rss_load": 4e9, "forward1_s": 1.0, "forward2_s": 0.8,
                            "rss_forward": 5e9}],
               ("refprism-fast", 7): [{"failed": "failed (exit -9)"}, {"failed": "failed (exit -9)"}],
               ("float64", 7): [{"load_s": 1.0, "rss_load": 1e9, "forward1_s": 3.0, "rss_forward": 2e9},
                                {"failed": "failed (exit 1)"}, {"load_s": 3.0, "rss_load": 3e9, "forward1_s": 5.0,
                                                               "rss_forward": 4e9}]}
    report = "\n".join(bench.results_table(results, ["hf", "refprism-fast", "float64"], 7))
    assert table_row(report, "refprism fast load") == ["refprism fast load", "failed (exit -9)", "—", "—", "—"]
    assert table_row(report, "float64 (low) load") == ["float64 (low) load", "2.00 (1/3 failed)", "1.00x", "2.00",
                                                       "0.500x"]
    assert table_row(report, "float64 (low) forward") == ["float64 (low) forward", "4.00 (1/3 failed)", "4.00x",
                                                          "3.00", "0.600x"]


def test_prompt_ids_extend_the_prompt_deterministically():
    base = [2, 651, 6037, 3413, 576, 6081, 603]
    assert bench.prompt_ids(base, 7, 256000) == base
    assert bench.prompt_ids(base, 3, 256000) == [2, 651, 6037]
    long = bench.prompt_ids(base, 128, 512)
    assert len(long) == 128 and long[:7] == base and all(4 <= i < 512 for i in long[7:])
    assert long == bench.prompt_ids(base, 128, 512)  # the same ids for HF and refprism, run after run
    assert len(set(long[7:])) > 50  # pseudo-random, not a repeated constant


def test_parameter_count_and_bytes_per_forward():
    V, D, L, N, K, H, F = 512, 64, 2, 4, 2, 16, 128  # the tiny preset
    expected = V * D + L * (2 * D + N * H * D + 2 * K * H * D + D * N * H + 3 * F * D) + D
    assert bench.n_parameters(make_config("tiny")) == expected == 106816
    assert bench.n_parameters(make_config("gemma-2b")) == 2_506_172_416  # google/gemma-2b, tied embedding
    assert bench.weight_bytes_per_forward(10, 2) == {"hf": 40, "refprism-fast": 40, "refprism-low": 60,
                                                     "float64": 100}


def test_parse_result_takes_the_marked_line():
    assert bench.parse_result('noise\nBENCH-RESULT {"load_s": 1.5}\nmore noise\n') == {"load_s": 1.5}
    assert bench.parse_result("no result here\n") is None
    assert bench.parse_result("BENCH-RESULT {not json\n") is None


@pytest.mark.parametrize("code, failed", [
    ("import sys; sys.exit(3)", "failed (exit 3)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "failed (exit -9)"),  # as the OOM killer does
    ("print('no marked line')", "failed (no result)"),
    ("import time; time.sleep(30)", "failed (timeout 0.5 s)"),
])
def test_run_child_reports_failures(code, failed):
    assert bench.run_child([sys.executable, "-c", code], timeout=0.5 if "sleep" in code else 60)["failed"] == failed


def test_run_child_returns_the_result_and_wall_time():
    got = bench.run_child([sys.executable, "-c", "print('BENCH-RESULT {\"load_s\": 0.25}')"], timeout=60)
    assert got["load_s"] == 0.25 and got["wall_s"] > 0 and "failed" not in got


def test_the_forward_suite_keeps_every_marked_section_of_the_old_report():
    """keep_sections carries each suite's and each hand-written tool's section (cli, graph, gradients) of the old
    report into the new one, in place before ## Notes; an unmarked section is not kept (so it must be marked)."""
    old = "# r\n\nold body\n\n"
    for name in bench.KEPT_SECTIONS:
        old += f"<!-- suite:{name} -->\n## {name} section\n\n{name} numbers\n<!-- /suite:{name} -->\n\n"
    old += "## Unmarked\n\nlost\n\n## Notes\n\nmine\n"
    new = bench.keep_sections("# r\n\nnew body\n\n## Notes\n\nmine\n", old)
    for name in ("cli", "graph", "gradients", "long"):
        assert f"## {name} section\n\n{name} numbers\n" in new
    assert new.index("<!-- /suite:gradients -->") < new.index("## Notes") and "lost" not in new
    assert "new body" in new and "old body" not in new


# ------------------------------------------------------------------------------------------ the gemma4 suite

_g4spec = importlib.util.spec_from_file_location("bench_gemma4", ROOT / "tools" / "bench_gemma4.py")
g4 = importlib.util.module_from_spec(_g4spec)
_g4spec.loader.exec_module(g4)


def test_reduced_e2b_keeps_the_pattern_the_kv_split_and_every_width():
    from refprism.checkpoints.synth import make_config
    from refprism.gemma.config import Config

    full, cut = make_config("gemma-4-e2b"), g4.reduced_config("gemma-4-e2b", 15)
    assert cut["layer_types"] == (["sliding_attention"] * 4 + ["full_attention"]) * 3  # the period, 3 times
    assert cut["num_kv_shared_layers"] == 10  # 20/35 of 15 = 8.6 -> 2 periods; producers 0-4 (both types)
    assert {k: v for k, v in cut.items() if k not in ("num_hidden_layers", "layer_types", "num_kv_shared_layers")} \
        == {k: v for k, v in full.items() if k not in ("num_hidden_layers", "layer_types", "num_kv_shared_layers")}
    cfg = Config.from_hf(cut)  # refprism reads it: consumers 5-14 read producers 3 (sliding) and 4 (full)
    assert [cfg.kv_source(l) for l in (5, 9, 14)] == [3, 4, 4] and not cfg.has_kv(5) and cfg.has_kv(4)
    assert g4.reduced_config("gemma-4-e2b", 10)["num_kv_shared_layers"] == 5  # at least one period each side
    info = g4.shape_info(bench, "gemma-4-e2b", 15)
    assert (info["layers"], info["released_layers"], info["layer_types"]) == (15, 35, "SSSSF" * 3)
    assert info["released_parameters"] == bench.n_parameters(full) and 4.6e9 < info["released_parameters"] < 4.7e9
    # the per-layer table (V x L x 256) shrinks with L: the 20 layers cut take 20 slices of 262144 x 256 with them
    assert info["released_parameters"] - info["parameters"] > 20 * 262144 * 256
    for bad in (12, 5, 36):  # not whole periods / no room for producers and consumers / beyond the model
        with pytest.raises(ValueError):
            g4.reduced_config("gemma-4-e2b", bad)


def test_reduced_26b_keeps_both_layer_types_and_the_moe():
    cut = g4.reduced_config("gemma-4-26b-a4b", 2)
    assert cut["layer_types"] == ["sliding_attention", "full_attention"]  # the end of the 6-layer period
    assert (cut["num_experts"], cut["top_k_experts"], cut["moe_intermediate_size"]) == (128, 8, 704)
    assert cut["num_kv_shared_layers"] == 0 and cut["attention_k_eq_v"] is True
    assert g4.reduced_config("gemma-4-26b-a4b", 7)["layer_types"] == ["sliding_attention"] * 5 + [
        "full_attention", "sliding_attention"]  # from one period on: the released list's first layers
    from refprism.checkpoints.synth import make_config

    assert g4.reduced_config("gemma-4-26b-a4b", 30) == make_config("gemma-4-26b-a4b")  # all layers: as released
    info = g4.shape_info(bench, "gemma-4-26b-a4b", 2)
    assert info["layer_types"] == "SF" and 25e9 < info["released_parameters"] < 26.5e9


def test_gemma4_targets_from_literal_medians():
    data = {"shapes": [{"preset": "gemma-4-e2b"}], "lengths": [7, 128], "cases": ["hf", "refprism-fast",
                                                                                 "refprism-low"],
            "results": {("gemma-4-e2b", "hf", 7): [{"forward2_s": 1.0, "rss_forward": 10e9}],
                        ("gemma-4-e2b", "refprism-fast", 7): [{"forward2_s": 0.6, "rss_forward": 10.5e9}],
                        ("gemma-4-e2b", "refprism-low", 7): [{"failed": "failed (exit -9)"}],
                        ("gemma-4-e2b", "hf", 128): [{"forward2_s": 4.0, "rss_forward": 10e9}],
                        ("gemma-4-e2b", "refprism-fast", 128): [{"forward2_s": 4.4, "rss_forward": 9e9}],
                        ("gemma-4-e2b", "refprism-low", 128): [{"forward2_s": 9.0, "rss_forward": 3e9}]}}
    got = {w: (m, r) for w, m, _, r in g4.targets(bench, data)}
    assert got == {"E2B fast forward / HF forward, T=7": ("0.600x", "PASS"),  # at the limit
                   "E2B fast peak RSS / HF peak RSS, T=7": ("1.05x", "FAIL"),
                   "E2B low peak RSS / HF peak RSS, T=7": ("failed (exit -9)", "FAIL"),
                   "E2B fast forward / HF forward, T=128": ("1.10x", "FAIL"),
                   "E2B fast peak RSS / HF peak RSS, T=128": ("0.900x", "PASS"),
                   "E2B low peak RSS / HF peak RSS, T=128": ("0.300x", "PASS")}


def test_gemma4_quick_writes_its_section_before_the_notes_and_keeps_the_rest(tmp_path):
    """--suite gemma4 --quick: the tiny-gemma4 checkpoint made once under $TMPDIR, HF and refprism measured in
    their own processes, the section replaced between its markers, the other sections and the notes kept."""
    out = tmp_path / "perf.md"
    out.write_text("# r\n\nforward body\n\n<!-- suite:long -->\n## long\n\nkept\n<!-- /suite:long -->\n\n"
                   + OLD_NOTES, encoding="utf-8")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(BENCH), "--suite", "gemma4", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert (tmp_path / "refprism-bench" / "tiny-gemma4-L7-bf16" / "config.json").is_file()
    assert report.startswith("# r\n\nforward body\n") and report.endswith(OLD_NOTES) and "kept" in report
    a, b = report.index("<!-- suite:gemma4 -->"), report.index("<!-- /suite:gemma4 -->")
    assert report.index("<!-- /suite:long -->") < a < b < report.index("## Notes")
    section = report[a:b]
    assert table_row(section, "tiny-gemma4")[1:3] == ["7 / 7", "SFSSFSF"]
    for case in ("hf", "refprism-fast", "refprism-low"):
        row = next(c for c in (line.strip("|").split("|") for line in section.splitlines() if f"| {case} |" in line))
        cells = [c.strip() for c in row]
        assert cells[:3] == ["tiny-gemma4", "7", case] and float(cells[5]) > 0 and float(cells[7]) > 0, cells
        if case != "hf":
            assert re.fullmatch(r"\d+(\.\d+)?x", cells[6]) and re.fullmatch(r"\d+(\.\d+)?x", cells[8]), cells
    assert "- tiny-gemma4, T=7: refprism-fast same, refprism-low same" in section
    assert table_row(section, "tiny-gemma4 fast forward / HF forward, T=7")[3] in ("PASS", "FAIL")
    assert re.search(r"Load average \(1 min.*\d+\.\d\d at the start, \d+\.\d\d at the end", section)


def test_bench_blas_quick_reports_every_product_on_every_side():
    """tools/bench_blas.py --quick: a row per product and row count, a rate (GB/s) on each side, torch's included."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_blas.py"), "--quick", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| small |")]
    assert len(rows) == 5 * 2
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[3] in ("1", "7") and all(float(c) > 0 for c in cells[4:7]), line
