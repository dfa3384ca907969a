"""The benchmark report: Markdown tables and a PNG chart of the first-audio distributions."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.embedded import EmbeddedTurn
from benchmarks.load import LoadResult, stolen_text
from benchmarks.voice import VoiceResult

TARGETS = "overhead p50 ≤ 5 ms and p99 ≤ 30 ms at 200 streams; streaming ≥ 8× sooner on the long reply; "
TARGETS += "embedded first audio p50 ≤ 800 ms with TTS faster than real time; ≤ 1 MB per active stream; "
TARGETS += "voice to voice (end of speech → first reply audio, end-of-speech detection included) p50 ≤ 1.2 s"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return float("nan")
    rank = p / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


REFERENCE_ROUNDS = 9


def reference_ms(rounds: int = REFERENCE_ROUNDS) -> float:
    """This machine's speed now: the median time of a fixed pure-Python workload (integer arithmetic,
    string building, dict and list work), in milliseconds: 8 to 13 ms on this project's machine.

    The service's overhead under load follows how fast a core runs Python, and that differs between
    machines sold as the same size, and on a shared host from one minute to the next (on this
    project's virtual machine, by a factor of 1.7 within seconds). Taken beside each measurement, it
    tells a change in the code from a change in the machine. It never changes with the code measured."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        _reference_workload()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def _reference_workload() -> int:
    counts: dict[str, int] = {}
    parts: list[str] = []
    total = 0
    for i in range(20_000):
        total += i * i % 7
        word = "w" + str(i % 97)
        counts[word] = counts.get(word, 0) + 1
        if i % 10 == 0:
            parts.append(word)
    return total + len(" ".join(parts)) + len(counts)


@dataclass
class Report:
    machine: str
    date: str
    commit: str
    command: str
    profile: str
    turns: int
    generator: str = "compiled"
    """The load generator of stages 1, 2 and 4: ``compiled`` (benchmarks/loadgen/) or ``python``."""
    loads: list[tuple[LoadResult, float]] = field(default_factory=list)
    streams: list[tuple[str, list[float], list[float]]] = field(default_factory=list)
    embedded: list[EmbeddedTurn] = field(default_factory=list)
    comparisons: list[tuple[str, LoadResult, float]] = field(default_factory=list)
    voice: VoiceResult | None = None
    sections: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_load(self, result: LoadResult, ideal_ms: float) -> None:
        self.loads.append((result, ideal_ms))

    def add_streaming(self, kind: str, streamed: list[float], sequential: list[float]) -> None:
        self.streams.append((kind, streamed, sequential))

    def add_comparison(self, label: str, result: LoadResult, ideal_ms: float) -> None:
        self.comparisons.append((label, result, ideal_ms))

    def add_section(self, title: str, markdown: str) -> None:
        self.sections.append((title, markdown))

    def add_embedded(self, rows: list[EmbeddedTurn]) -> None:
        self.embedded = rows

    def add_voice(self, result: VoiceResult) -> None:
        self.voice = result

    def note(self, text: str) -> None:
        self.notes.append(text)

    def write(self, path: Path, chart: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        drew = self._chart(chart)
        lines = [
            "# Parley benchmark results",
            "",
            f"- **Date:** {self.date}",
            f"- **Machine:** {self.machine}",
            f"- **Commit:** {self.commit}",
            f"- **Command:** `{self.command}`",
            f"- **Scripted profile:** `{self.profile}` (`service/engines/scripted.py`); {self.turns} turns per stream",
            f"- **Targets:** {TARGETS}",
            "",
        ]
        lines += self._overhead() + self._streaming() + self._embedded() + self._voice()
        lines += self._capacity() + self._comparison()
        for title, markdown in self.sections:
            lines += [f"## {title}", "", markdown.strip(), ""]
        if drew:
            lines += ["## First-audio distributions", "", f"![first audio]({chart.name})", ""]
        if self.notes:
            lines += ["## Notes", "", *(f"- {n}" for n in self.notes), ""]
        path.write_text("\n".join(lines))

    def _overhead(self) -> list[str]:
        if not self.loads:
            return []
        rows = [
            "## 1. Service overhead on time to first audio",
            "",
            "Measured at the client (send `user_text` → first `audio` message received, through gRPC on "
            "loopback, service in its own process) minus the ideal first audio the profile allows "
            f"({self.loads[0][1]:.0f} ms for the reply used). Server-side: the service's own `first_audio_ms` "
            "minus the same ideal. Streams open together, start their first turn spread over a ramp of "
            "10 ms per stream (at most 2 s), and pause 0 to 300 ms between turns, each on its own connection; "
            + (
                "the load generator is compiled (`benchmarks/loadgen/`, gRPC C++, one thread driving every "
                "stream through one completion queue)"
                if self.generator == "compiled"
                else "the load generator is this Python process (grpc.aio)"
            )
            + ", on the same cores (its share of the machine is in section 4). Stolen: the share of the machine's "
            "CPU time the hypervisor gave to other guests during the run (steal time, `/proc/stat`).",
            "",
            "| streams | turns | overhead p50 | p95 | p99 | server-side p50 | p99 | first audio p50 | failed "
            "| stolen |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for result, ideal in self.loads:
            client = [t.first_audio_ms - ideal for t in result.turns]
            server = [t.server_first_audio_ms - ideal for t in result.turns]
            failed = len(result.errors) + sum(t.reason != "TURN_END_REASON_COMPLETED" for t in result.turns)
            rows.append(
                f"| {result.concurrency} | {len(result.turns)} | {percentile(client, 50):.1f} ms "
                f"| {percentile(client, 95):.1f} ms | {percentile(client, 99):.1f} ms "
                f"| {percentile(server, 50):.1f} ms | {percentile(server, 99):.1f} ms "
                f"| {percentile([t.first_audio_ms for t in result.turns], 50):.0f} ms | {failed} "
                f"| {stolen_text(result.stolen)} |"
            )
        return [*rows, ""]

    def _comparison(self) -> list[str]:
        if not self.comparisons:
            return []
        rows = [
            "## 5. Before and after (the same harness, one run)",
            "",
            "Stage 1 against the service of the compared commit (before) and of this one (after), each in its "
            "own process, alternating at each concurrency. Audio messages are per turn, as the client got them.",
            "",
            "| streams | service | turns | overhead p50 | p99 | CPU per turn | service CPU | audio messages per turn |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        order = {"before": 0, "after": 1}
        for label, result, ideal in sorted(self.comparisons, key=lambda c: (c[1].concurrency, order.get(c[0], 2))):
            client = [t.first_audio_ms - ideal for t in result.turns]
            turns = max(1, len(result.turns))
            rows.append(
                f"| {result.concurrency} | {label} | {len(result.turns)} | {percentile(client, 50):.1f} ms "
                f"| {percentile(client, 99):.1f} ms | {result.cpu_s * 1000 / turns:.1f} ms "
                f"| {100 * result.cpu_s / max(result.wall_s, 1e-9):.0f}% "
                f"| {sum(t.audio_messages for t in result.turns) / turns:.0f} |"
            )
        return [*rows, ""]

    def _capacity(self) -> list[str]:
        if not self.loads:
            return []
        rows = [
            "## 4. Capacity and memory",
            "",
            "Resident memory of the service process (VmRSS) before the run and at its peak, sampled every "
            "100 ms; CPU is the service process's user+system time over the run, also shown as a share of "
            "one core over the run's wall time, beside the load generator's own share of one core (same "
            "machine).",
            "",
            "| streams | held at once | RSS idle | RSS peak | per active stream | CPU per turn "
            "| service CPU | load generator CPU | audio in order, no gaps |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for result, _ in self.loads:
            per_stream = (result.rss_peak_mb - result.rss_idle_mb) / max(1, result.concurrency)
            in_order = sum(t.in_order for t in result.turns)
            rows.append(
                f"| {result.concurrency} | {result.peak_streams} | {result.rss_idle_mb:.1f} MB | "
                f"{result.rss_peak_mb:.1f} MB | {per_stream * 1024:.0f} KB | "
                f"{result.cpu_s * 1000 / max(1, len(result.turns)):.0f} ms "
                f"| {100 * result.cpu_s / result.wall_s:.0f}% | {100 * result.client_cpu_s / result.wall_s:.0f}% "
                f"| {in_order}/{len(result.turns)} turns |"
            )
        return [*rows, ""]

    def _streaming(self) -> list[str]:
        if not self.streams:
            return []
        rows = [
            "## 2. Streaming versus sequential",
            "",
            "Same profile, same replies. Sequential: wait for the whole LLM reply, synthesize it whole, "
            "then send (the first audio leaves when everything is done).",
            "",
            "| reply | Parley first audio (p50) | sequential first audio (p50) | Parley is sooner by |",
            "|---|---:|---:|---:|",
        ]
        for kind, streamed, sequential in self.streams:
            ours, theirs = statistics.median(streamed), statistics.median(sequential)
            rows.append(f"| {kind} | {ours:.0f} ms | {theirs:.0f} ms | {theirs / ours:.1f}× |")
        return [*rows, ""]

    def _embedded(self) -> list[str]:
        if not self.embedded:
            return []
        rows = [
            "## 3. Embedded engines (Gemma 3 270M on llama.cpp, Piper en_US-joe-medium)",
            "",
            "| prompt | first token | first audio | total | speech | tokens/s | TTS RTF |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.embedded:
            rows.append(
                f"| {r.prompt} | {r.first_token_ms} ms | {r.first_audio_ms} ms | {r.total_ms} ms | {r.audio_s:.1f} s "
                f"| {r.tokens_per_s:.0f} | {r.tts_rtf:.2f} |"
            )
        rows += ["", "| | p50 | p95 |", "|---|---:|---:|"]
        for name, values in (
            ("first token", [float(r.first_token_ms) for r in self.embedded]),
            ("first audio", [float(r.first_audio_ms) for r in self.embedded]),
            ("tokens/s", [r.tokens_per_s for r in self.embedded]),
            ("TTS real-time factor", [r.tts_rtf for r in self.embedded]),
        ):
            unit = " ms" if "first" in name else ""
            rows.append(f"| {name} | {percentile(values, 50):.2f}{unit} | {percentile(values, 95):.2f}{unit} |")
        return [*rows, ""]

    def merge_voice(self, path: Path) -> None:
        """Put this run's voice section into an existing report in place of its old one (or before
        the sections that follow the embedded one), leaving the other stages' figures as they are."""
        section = self._voice()
        self._merge(path, section[0], section[1:], targets=True)

    def merge_section(self, path: Path, title: str) -> None:
        """Put this run's section ``title`` into an existing report in place of its old one (or before
        the capacity section), stamped with this run's machine, date and commit."""
        markdown = next((m for t, m in self.sections if t == title), None)
        if markdown is None:
            raise SystemExit(f"the stage did not run: {'; '.join(self.notes) or 'no figures'}")
        self._merge(path, f"## {title}", ["", *markdown.strip().split("\n"), ""])

    def _merge(self, path: Path, heading: str, body: list[str], *, targets: bool = False) -> None:
        """``heading`` and ``body``, stamped, in place of the report's section of that heading (or
        before the capacity section); a new report when there is none."""
        if not path.exists():
            self.write(path, path.with_name("first_audio.png"))
            return
        lines = path.read_text().split("\n")
        stamp = f"Measured {self.date} on {self.machine}, commit {self.commit}, `{self.command}`."
        section = [heading, "", stamp, *body]
        if heading in lines:
            start = lines.index(heading)
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        else:
            start = end = next(
                (i for i, line in enumerate(lines) if line.startswith("## ") and line[3:4] in "4567F"), len(lines)
            )
        lines = lines[:start] + section + lines[end:]
        if targets:
            lines = [f"- **Targets:** {TARGETS}" if line.startswith("- **Targets:**") else line for line in lines]
        path.write_text("\n".join(lines))

    def _voice(self) -> list[str]:
        if self.voice is None:
            return []
        turns = self.voice.turns
        rows = [
            "## 3b. Voice to voice (Silero VAD, Whisper, Gemma 3 270M, Piper en_US-joe-medium)",
            "",
            f"Each question said by {self.voice.speaker} (16 kHz PCM16), one session each, streamed through "
            "gRPC on loopback in real time (20 ms chunks, paced), then silence until the turn ends; one warm-up "
            "question first, not counted. At the client: from the moment the chunk holding the last speech "
            "sample (above 500 of 32767) was sent to the first reply `audio` message, and to `speech_stopped` "
            "(end-of-speech detection). Server-side parts from `TurnEnded.timings`: `transcription_ms`, and "
            "`first_llm_token_ms` and `first_audio_ms` from the turn's start (the final transcript). WER: word "
            "error rate of the final transcript against the question (case and punctuation ignored).",
            "",
            "| question | transcript | WER | end of speech → first audio | end detected | transcription "
            "| first token | first audio (from transcript) | server: end of speech → first audio |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in turns:
            rows.append(
                f"| {t.prompt} | {t.transcript} | {t.wer:.2f} | {t.end_to_first_audio_ms:.0f} ms "
                f"| {t.end_detection_ms:.0f} ms | {t.transcription_ms} ms | {t.first_llm_token_ms} ms "
                f"| {t.first_audio_ms} ms | {t.server_end_to_first_audio_ms} ms |"
            )
        rows += ["", "| | p50 | p95 |", "|---|---:|---:|"]
        for name, values in (
            ("end of speech → first reply audio (client)", [t.end_to_first_audio_ms for t in turns]),
            ("end-of-speech detection (client, → `speech_stopped`)", [t.end_detection_ms for t in turns]),
            ("`transcription_ms`", [float(t.transcription_ms) for t in turns]),
            ("`first_llm_token_ms`", [float(t.first_llm_token_ms) for t in turns]),
            ("`first_audio_ms`", [float(t.first_audio_ms) for t in turns]),
            ("`speech_end_to_first_audio_ms` (server)", [float(t.server_end_to_first_audio_ms) for t in turns]),
        ):
            rows.append(f"| {name} | {percentile(values, 50):.0f} ms | {percentile(values, 95):.0f} ms |")
        if self.voice.without_tentative:
            others = self.voice.without_tentative
            rows += [
                "",
                "The same questions in the same run, each asked right after its counted turn, with "
                "`tentative_silence_ms = 0` (no reply prepared while the user pauses: transcription and reply "
                "begin when the silence has confirmed the end):",
                "",
                "| without a tentative reply | p50 | p95 |",
                "|---|---:|---:|",
            ]
            for name, values in (
                ("end of speech → first reply audio (client)", [t.end_to_first_audio_ms for t in others]),
                ("end-of-speech detection (client)", [t.end_detection_ms for t in others]),
                ("`transcription_ms`", [float(t.transcription_ms) for t in others]),
            ):
                rows.append(f"| {name} | {percentile(values, 50):.0f} ms | {percentile(values, 95):.0f} ms |")
        wers = [t.wer for t in turns]
        failed = sum(t.reason != "TURN_END_REASON_COMPLETED" for t in turns)
        rows += [
            "",
            f"Mean WER {statistics.fmean(wers) if wers else float('nan'):.3f} over {len(turns)} questions; "
            f"{failed} turns did not complete.",
            *(f"Note: {n}." for n in self.voice.notes),
        ]
        return [*rows, ""]

    def _chart(self, path: Path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.note("matplotlib is not installed: no chart")
            return False
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for result, ideal in self.loads:
            overhead = sorted(t.first_audio_ms - ideal for t in result.turns if not math.isnan(t.first_audio_ms))
            if overhead:
                fractions = [(i + 1) / len(overhead) for i in range(len(overhead))]
                left.step(overhead, fractions, where="post", label=f"{result.concurrency} streams")
        left.set_xscale("symlog", linthresh=10)
        left.set(
            xlabel="first audio − ideal (ms, log scale past 10)",
            ylabel="share of turns",
            title="Service overhead (CDF)",
        )
        left.legend(loc="lower right")
        left.grid(alpha=0.3)
        if self.streams:
            kinds = [k for k, _, _ in self.streams]
            ours = [statistics.median(s) for _, s, _ in self.streams]
            theirs = [statistics.median(q) for _, _, q in self.streams]
            positions = range(len(kinds))
            right.bar([p - 0.2 for p in positions], ours, 0.4, label="Parley (streaming)")
            right.bar([p + 0.2 for p in positions], theirs, 0.4, label="sequential")
            right.set_xticks(list(positions), [f"{k} reply" for k in kinds])
            right.set(ylabel="first audio (ms)", title="Streaming vs sequential (p50)")
            right.legend()
            right.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return True
