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
