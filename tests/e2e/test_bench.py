"""A small smoke run of the benchmark harness: it runs and produces numbers. No timing is asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_harness_smoke_run_produces_a_report(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--profile",
            "quick",
            "--concurrency",
            "1,3",
            "--turns",
            "1",
            "--no-embedded",
            "--extras",
            "none",
            "--compare",
            "HEAD",
            "--duration",
            "60",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = out.read_text()
    for heading in ("Service overhead", "Streaming versus sequential", "Capacity and memory", "Before and after"):
        assert heading in report
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (-?[\d.]+) ms", report, re.M)
    compared = re.findall(r"^\| (\d+) \| (before|after) \| (\d+) \|", report, re.M)
    assert compared == [("1", "before", "1"), ("1", "after", "1"), ("3", "before", "3"), ("3", "after", "3")]
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("3", "3")]  # streams, turns: every turn measured
    assert re.search(r"\| long \| \d+ ms \| \d+ ms \| [\d.]+× \|", report)
    assert "3/3 turns" in report  # audio in order, no gaps
    assert (tmp_path / "first_audio.png").stat().st_size > 10_000


def test_every_benchmark_module_imports() -> None:
    # The extra stages run only in make bench: at least they must import against the current code.
    import benchmarks.bench
    import benchmarks.embedded
    import benchmarks.memory_soak
    import benchmarks.segmenter_stall

    assert benchmarks.bench and benchmarks.embedded and benchmarks.memory_soak and benchmarks.segmenter_stall
