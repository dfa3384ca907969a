"""The Pipecat side of the peer benchmark. Runs in .venv-peers (Pipecat and its dependencies), never in
Parley's venv; the driver (``benchmarks/peers/driver.py``) starts it.

A standard Pipecat 1.14 pipeline: the user context aggregator, ``OpenAILLMService`` (pointed at the
shared llama.cpp server), Pipecat's default sentence aggregation inside the TTS service, its local
``PiperTTSService`` (the Parley voice, from a folder it will not download into), and the assistant
context aggregator. No transport: audio is taken where the TTS pushes it downstream, which is where a
transport would receive it.

Protocol: the configuration is one JSON object in argv[1]. The worker prints ``{"ready": ...}`` once
the pipeline has started, then reads one JSON question per line on stdin (``{"id": 1, "text": "..."}``)
and answers each with one JSON line of timings on stdout. End of stdin ends it. Timings are ms from
the moment the question's frame is queued to the pipeline, taken from Pipecat's own monotonic
pipeline clock at the moment each frame was pushed (observers see the push timestamps).
"""

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from loguru import logger
from pipecat.clocks.system_clock import SystemClock
from pipecat.frames.frames import (
    ErrorFrame,
    LLMFullResponseEndFrame,
    LLMMessagesUpdateFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
)
from pipecat.metrics.metrics import TTFAMetricsData, TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.workers.runner import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audible import first_audible_ms  # noqa: E402  (the same file the driver uses)


@dataclass
class Turn:
    t0_ns: int
    done: asyncio.Event = field(default_factory=asyncio.Event)
    text: list[str] = field(default_factory=list)
    first_token_ms: float | None = None
    first_segment_ms: float | None = None
    first_segment_text: str = ""
    segments: list[str] = field(default_factory=list)
    tts_started_ms: float | None = None
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    total_ms: float | None = None
    pipecat_ttfb_ms: float | None = None
    pipecat_leading_silence_ms: float | None = None
    errors: list[str] = field(default_factory=list)


class Probe(BaseObserver):
    """Records, per turn, when the LLM and the TTS pushed the frames that mark each stage."""

    def __init__(self, llm: OpenAILLMService, tts: PiperTTSService) -> None:
        super().__init__()
        self.llm = llm
        self.tts = tts
        self.turn: Turn | None = None

    async def on_push_frame(self, data: FramePushed) -> None:
        turn = self.turn
        if turn is None:
            return
        frame = data.frame
        at = (data.timestamp - turn.t0_ns) / 1e6
        if isinstance(frame, ErrorFrame):
            turn.errors.append(str(frame.error))
            turn.done.set()
        elif isinstance(frame, MetricsFrame) and data.source is self.tts:
            # The TTS also passes on the LLM's metrics: keep only its own.
            for metric in (m for m in frame.data if m.processor == self.tts.name):
                if isinstance(metric, TTFAMetricsData) and turn.pipecat_leading_silence_ms is None:
                    turn.pipecat_leading_silence_ms = metric.leading_silence * 1000
                elif isinstance(metric, TTFBMetricsData) and turn.pipecat_ttfb_ms is None:
                    turn.pipecat_ttfb_ms = metric.value * 1000
        elif data.source is self.llm and isinstance(frame, LLMTextFrame):
            if turn.first_token_ms is None:
                turn.first_token_ms = at
            turn.text.append(frame.text)
        elif data.source is self.tts:
            if isinstance(frame, TTSStartedFrame) and turn.tts_started_ms is None:
                turn.tts_started_ms = at
            elif isinstance(frame, TTSAudioRawFrame):
                turn.chunks.append((at, frame.audio))
            elif isinstance(frame, LLMFullResponseEndFrame):
                turn.total_ms = at  # the TTS releases the reply's end after all of its audio
                turn.done.set()


async def main() -> None:
    config = json.loads(sys.argv[1])
    # The protocol owns stdout; anything a library prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logger.remove()
    logger.add(sys.stderr, level=config.get("log_level", "WARNING"))

    # Pipecat's PiperTTSService loads <download_dir>/<voice>.onnx (and .onnx.json beside it) and
    # downloads only when that file is missing: give it the benchmark's voice under that name.
    voice_path = Path(config["voice_path"])
    voice = voice_path.stem
    folder = Path(tempfile.mkdtemp(prefix="peers-piper-"))
    (folder / voice_path.name).symlink_to(voice_path)
    (folder / f"{voice_path.name}.json").symlink_to(Path(f"{voice_path}.json"))

    rate = int(config["sample_rate"])
    llm = OpenAILLMService(
        api_key="not-needed",
        base_url=config["base_url"],
        settings=OpenAILLMService.Settings(
            model=config["model"],
            system_instruction=config["system_prompt"],
            temperature=config["temperature"],
            max_tokens=config["max_tokens"],
        ),
    )
    tts = PiperTTSService(
        download_dir=folder,
        settings=PiperTTSService.Settings(voice=voice),
        sample_rate=rate,
    )

    @tts.event_handler("on_tts_request")
    async def on_tts_request(service, context_id, text):  # noqa: ARG001
        turn = probe.turn
        if turn is not None:
            if turn.first_segment_ms is None:
                turn.first_segment_ms = (clock.get_time() - turn.t0_ns) / 1e6
                turn.first_segment_text = text
            turn.segments.append(text)

    context = LLMContext()
    aggregators = LLMContextAggregatorPair(context)
    pipeline = Pipeline([aggregators.user(), llm, tts, aggregators.assistant()])
    probe = Probe(llm, tts)
    clock = SystemClock()
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(audio_out_sample_rate=rate, enable_metrics=True),
        observers=[probe],
        clock=clock,
        idle_timeout_secs=None,  # no transport here to say the bot is speaking
        enable_rtvi=False,  # no client to talk RTVI to
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_pipeline_started(worker, frame):  # noqa: ARG001
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), 60)

    session_threads = tts._voice.session.get_session_options().intra_op_num_threads
    protocol.write(
        json.dumps(
            {
                "ready": True,
                "versions": {
                    p: version(p) for p in ("pipecat-ai", "llama-cpp-python", "piper-tts", "onnxruntime", "openai")
                },
                "piper_intra_op_threads": session_threads,
            }
        )
        + "\n"
    )

    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            request = json.loads(line)
            turn = Turn(t0_ns=0)
            probe.turn = turn
            frame = LLMMessagesUpdateFrame(messages=[{"role": "user", "content": request["text"]}], run_llm=True)
            turn.t0_ns = clock.get_time()
            wall = time.monotonic()
            await worker.queue_frames([frame])
            try:
                await asyncio.wait_for(turn.done.wait(), float(request.get("timeout_s", 60)))
            except TimeoutError:
                turn.errors.append(f"no end of the reply after {request.get('timeout_s', 60)} s")
            probe.turn = None
            protocol.write(json.dumps(result(request, turn, rate, wall)) + "\n")
    finally:
        await runner.cancel()
        running.cancel()
        shutil.rmtree(folder, ignore_errors=True)


def result(request: dict, turn: Turn, rate: int, wall: float) -> dict:
    audible = first_audible_ms(turn.chunks, rate)
    return {
        "id": request["id"],
        "first_token_ms": turn.first_token_ms,
        "first_segment_ms": turn.first_segment_ms,
        "first_segment_text": turn.first_segment_text,
        "segments": turn.segments,
        "tts_started_ms": turn.tts_started_ms,
        "first_audio_ms": turn.chunks[0][0] if turn.chunks else None,
        "first_audible_ms": audible[0] if audible else None,
        "onset_sample": audible[1] if audible else None,
        "total_ms": turn.total_ms,
        "text": "".join(turn.text),
        "audio_ms": sum(len(data) for _, data in turn.chunks) / 2 / rate * 1000,
        "chunks": len(turn.chunks),
        "pipecat_ttfb_ms": turn.pipecat_ttfb_ms,
        "pipecat_leading_silence_ms": turn.pipecat_leading_silence_ms,
        "wall_s": time.monotonic() - wall,
        "errors": turn.errors,
    }


if __name__ == "__main__":
    asyncio.run(main())
