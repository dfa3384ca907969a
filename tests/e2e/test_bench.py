"""A small smoke run of the benchmark harness: it runs and produces numbers. No timing is asserted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_harness_smoke_run_produces_a_report(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    # The load generator is compiled on first use (a minute or more on 2 cores): not out of the run's
    # --duration, which would leave no time for the stages after the first.
    from benchmarks import compiled

    compiled.build()
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
            "150",  # (a cap, reached only on a slow machine: on one, the stages took 51 s)
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = out.read_text()
    for heading in ("Service overhead", "Streaming versus sequential", "Capacity and memory", "Before and after"):
        assert heading in report
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (-?[\d.]+) ms", report, re.M)
    compared = re.findall(r"^\| (\d+) \| (before|after) \| (\d+) \|", report, re.M)
    assert compared == [("1", "before", "1"), ("1", "after", "1"), ("3", "before", "3"), ("3", "after", "3")]
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("3", "3")]  # streams, turns: every turn measured
    assert len(re.findall(r"^\| \d+ \| \d+ \| .* \| (?:[\d.]+%|n/a) \|$", report, re.M)) == 2  # (and the CPU stolen)
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


def _compiled_generator() -> None:
    from benchmarks import compiled

    try:
        compiled.build()
    except RuntimeError as error:
        pytest.skip(str(error))


async def test_the_compiled_load_generator_holds_the_same_conversations_as_the_python_one() -> None:
    from benchmarks import load

    await asyncio.to_thread(_compiled_generator)
    message = "What is the capital of France?"
    ideal = load.ideal_first_audio_ms("quick", message)
    with load.ServiceProcess("quick", 20) as service:
        await service.wait_ready()
        deadline = time.monotonic() + 60
        results = {
            kind: await load.run_load(service, 5, 2, message, deadline, compiled=kind == "compiled")
            for kind in ("compiled", "python")
        }
    for kind, result in results.items():
        assert result.errors == [], kind
        assert len(result.turns) == 10 and result.peak_streams >= 1, kind
        for turn in result.turns:
            assert turn.reason == "TURN_END_REASON_COMPLETED" and turn.in_order, kind
            assert turn.first_audio_ms >= ideal - 1 and turn.server_first_audio_ms >= ideal - 1, kind
        assert result.client_cpu_s > 0 and result.cpu_s > 0, kind
    # The same replies, cut the same way: as many audio messages per turn, give or take merging.
    counts = {kind: sum(t.audio_messages for t in r.turns) / len(r.turns) for kind, r in results.items()}
    assert counts["compiled"] == pytest.approx(counts["python"], rel=0.5)


async def test_the_compiled_load_generator_reports_streams_that_cannot_open() -> None:
    from benchmarks import compiled, load

    await asyncio.to_thread(_compiled_generator)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = load.LoadResult(3)
    await asyncio.wait_for(compiled.drive(f"127.0.0.1:{port}", 3, 2, "Hi", time.monotonic() + 30, result), timeout=60)
    assert result.turns == [] and len(result.errors) == 3


async def test_the_compiled_load_generator_gives_up_on_a_service_that_never_answers() -> None:
    from benchmarks import compiled, load

    await asyncio.to_thread(_compiled_generator)
    silent = socket.socket()  # accepts connections, answers nothing
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    target = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        result = load.LoadResult(2)
        began = time.monotonic()
        await asyncio.wait_for(compiled.drive(target, 2, 1, "Hi", began + 1, result, grace_s=1), timeout=30)
        assert result.turns == [] and len(result.errors) == 2
        assert time.monotonic() - began < 15
        # Cancelled, it takes the generator with it.
        running = asyncio.create_task(compiled.drive(target, 2, 1, "Hi", time.monotonic() + 60, load.LoadResult(2)))
        await asyncio.sleep(1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        left = await asyncio.create_subprocess_exec(
            "pgrep", "-f", f"loadgen --target {target}", stdout=asyncio.subprocess.PIPE
        )
        assert (await left.communicate())[0].strip() == b""
    finally:
        silent.close()


async def test_the_workers_comparison_measures_both_commits_side_by_side() -> None:
    # (This checkout against itself: what matters is that both services run and every row is measured.)
    from benchmarks import workers

    table = await workers.compare(
        "quick",
        "What is the capital of France?",
        1,
        time.monotonic() + 120,
        ROOT,
        "HEAD",
        counts=(2,),
        rounds=2,
        sustained_turns=2,
    )
    row = r"^\| ({}) \| 2 \| (before|after) \| [\d.]+ ms \| [\d.]+ ms \| (?:yes|no) \| 0 \|"
    rows = re.findall(row.format(r"\d"), table, re.M)
    assert rows == [("1", "before"), ("1", "after"), ("2", "after"), ("2", "before")]
    sustained = re.findall(row.format("sustained, 2 turns"), table, re.M)
    assert sustained == [("sustained, 2 turns", "before"), ("sustained, 2 turns", "after")]
    # Every run carries the machine's speed just before it (a shared host's drifts between runs), and
    # the share of the CPU the hypervisor took during it.
    ends = re.findall(r"\| ([\d.]+) ms \| ([\d.]+%|n/a) \|$", table, re.M)
    assert len(ends) == 6 and all(float(reference) > 0 for reference, _ in ends)
    if os.path.exists("/proc/stat"):  # noqa: ASYNC240 (a quick check of the test's own, after the runs)
        assert all(stolen.endswith("%") for _, stolen in ends)


async def test_the_workers_comparison_says_which_runs_the_duration_left_out() -> None:
    # A run that --duration left out is said in its row (a sustained run was once missing without a word).
    from benchmarks import workers

    table = await workers.compare(
        "quick",
        "What is the capital of France?",
        1,
        time.monotonic() - 1,
        ROOT,
        "HEAD",
        counts=(2,),
        rounds=1,
        sustained_turns=2,
    )
    said = re.findall(
        r"^\| (1|sustained, 2 turns) \| 2 \| (before|after) \| not run: --duration reached \|", table, re.M
    )
    assert said == [("1", "before"), ("1", "after"), ("sustained, 2 turns", "after"), ("sustained, 2 turns", "before")]


def test_the_reference_workload_times_the_same_work_every_time() -> None:
    from benchmarks import report

    assert report._reference_workload() == report._reference_workload()
    began = time.perf_counter()
    measured = report.reference_ms(rounds=3)
    assert 0 < measured <= (time.perf_counter() - began) * 1000


async def test_the_workers_measure_runs_the_target_count_again_without_caption_deltas() -> None:
    from benchmarks import workers

    table = await workers.measure(
        "quick", "What is the capital of France?", 1, time.monotonic() + 120, counts=(2,), search=(2,)
    )
    # For one process and for one per core: the search, then the target's count with segment captions.
    cells = r" \| 2 \| [\d.]+ ms \| [\d.]+ ms \| (?:yes|no) \| 0 \|"  # 2 turns, no failed one
    plain = re.findall(r"^\| (\d) \| 2" + cells, table, re.M)
    segments = re.findall(r"^\| (\d) \| 2, no caption deltas" + cells, table, re.M)
    assert plain == segments and len(plain) == len({1, os.cpu_count() or 1})


async def test_both_load_generators_can_ask_for_no_caption_deltas() -> None:
    from benchmarks import load

    with load.ServiceProcess("quick", 10) as service:
        await service.wait_ready()
        for compiled in (False, True):
            for captions in ("segments", "deltas"):
                result = await load.run_load(
                    service, 2, 1, "Hi", time.monotonic() + 60, compiled=compiled, captions=captions
                )
                assert result.errors == [] and [t.reason for t in result.turns] == ["TURN_END_REASON_COMPLETED"] * 2
                captioned = [t.caption_messages > 0 for t in result.turns]
                assert captioned == [captions == "deltas"] * 2, (compiled, captions)


def test_the_machine_cpu_reading_finds_the_stolen_time(tmp_path: Path) -> None:
    import math

    from benchmarks import load

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 20 0\ncpu0 50 0 25 400 5 0 2 18 10 0\n")
    before = load.machine_cpu(stat)
    assert before == load.MachineCPU(total=1000, stolen=35)  # (guest time is in user already: not added)
    stat.write_text("cpu  200 0 100 1300 10 0 5 85 40 0\n")
    assert load.stolen_share(before, load.machine_cpu(stat)) == 50 / 700
    # Unknown, not zero: no /proc/stat, a line without steal, no time passed.
    assert load.machine_cpu(tmp_path / "missing") is None
    stat.write_text("cpu  1 2 3 4 5 6 7\n")  # (a kernel before 2.6.11: no steal field)
    assert load.machine_cpu(stat) is None
    assert math.isnan(load.stolen_share(None, before)) and math.isnan(load.stolen_share(before, before))


async def test_the_search_runs_a_count_again_that_missed_while_the_host_stole_the_cpu() -> None:
    from benchmarks import workers

    def row(count: int, p50_ms: float, stolen: float) -> workers.Row:
        return workers.Row(2, count, 3 * count, p50_ms, 20.0, 0, 0.4, 0.1, 100, 110, 20.0, stolen=stolen)

    # What each run of a count gives, in order: 150 missed while 12% was stolen, then met; 175 missed
    # with the host quiet (not run again); 200 missed while stolen, and missed again.
    outcomes = {
        50: [row(50, 3.0, 0.01)],
        150: [row(150, 9.0, 0.12), row(150, 4.0, 0.01)],
        175: [row(175, 6.0, 0.02)],
        200: [row(200, 9.0, 0.08), row(200, 8.0, 0.03)],
        250: [row(250, 3.0, 0.0)],
    }
    runs: list[int] = []

    async def run(count: int) -> workers.Row:
        runs.append(count)
        return outcomes[count].pop(0)

    rows, found = await workers._search(run, (50, 150, 175, 200, 250), time.monotonic() + 60)
    assert runs == [50, 150, 150, 175, 200, 200]  # (two misses in a row that count: 175 and 200's second)
    assert [r.stolen for r in rows] == [0.01, 0.12, 0.01, 0.02, 0.08, 0.03]
    assert "**150**" in found and "met at 50, 150; missed at 175, 200" in found
    assert (
        "missed while the host took over 5% of the CPU, so run again: 150 (12.0%, then 1.0% stolen), "
        "200 (8.0%, then 3.0% stolen)" in found
    )
    assert [r.again for r in rows] == [False, False, True, False, False, True]
    assert "| 150, run again | 450 |" in rows[2].markdown()
    # A miss whose steal is not known is not run again; a run that met never is, however much was stolen.
    assert not row(100, 9.0, float("nan")).disturbed and not row(100, 3.0, 0.5).disturbed


async def test_the_search_says_when_it_could_not_run_a_disturbed_count_again() -> None:
    from benchmarks import workers

    def row(count: int, turns: int, stolen: float) -> workers.Row:
        return workers.Row(2, count, turns, 9.0, 20.0, 0, 0.4, 0.1, 100, 110, 20.0, stolen=stolen)

    # --duration reached during the first run: it stands, and the summary says why.
    async def late(count: int) -> workers.Row:
        await asyncio.sleep(0.2)
        return row(count, 300, 0.12)

    deadline = time.monotonic() + 0.1
    rows, found = await workers._search(late, (100, 150), deadline)
    assert len(rows) == 1 and "100 (not run again: --duration reached)" in found and "missed at 100" in found
    assert "cut short by --duration before 150 streams" in found

    # A second run that --duration cut short (fewer turns) does not decide; the first does.
    outcomes = [row(100, 300, 0.12), dataclasses.replace(row(100, 120, 0.01), p50_ms=3.0)]

    async def short(count: int) -> workers.Row:
        return outcomes.pop(0)

    rows, found = await workers._search(short, (100,), time.monotonic() + 60)
    assert len(rows) == 2 and "missed at 100" in found and "its second run cut short by --duration" in found
