"""Parley's command-line client.

    python -m clients.cli "Why is the sky blue?"       ask once: captions stream, reply.wav is written
    python -m clients.cli --speak "Read this aloud."   read text aloud (no LLM)
    python -m clients.cli                              interactive: one session, many turns

In interactive mode Ctrl-C interrupts the reply being spoken and Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import wave
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc

_REASONS = {
    pb.TURN_END_REASON_COMPLETED: "completed",
    pb.TURN_END_REASON_INTERRUPTED: "interrupted",
    pb.TURN_END_REASON_FAILED: "failed",
}


@dataclass
class TurnAudio:
    """The audio and captions received for one turn."""

    pcm: bytearray = field(default_factory=bytearray)
    ended: pb.TurnEnded | None = None


class Conversation:
    """One Converse stream: send requests, read responses, keep each turn's audio."""

    def __init__(self, stub: voice_pb2_grpc.VoiceServiceStub, start: pb.Start, out: Path, interactive: bool) -> None:
        self._requests: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self._requests.put_nowait(pb.ConverseRequest(start=start))
        self._call = stub.Converse(self._request_stream())
        self._out = out
        self._interactive = interactive
        self._turns: dict[str, TurnAudio] = {}
        self._turn_ended = asyncio.Event()
        self.started = asyncio.Event()
        self._turn_count = 0
        self.current_turn: str | None = None
        self.sample_rate = 0
        self.failed = False

    async def _request_stream(self) -> AsyncIterator[pb.ConverseRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, request: pb.ConverseRequest) -> None:
        self._requests.put_nowait(request)

    def close_sending(self) -> None:
        """Half-close: the service finishes the turn in progress, then ends the stream."""
        self._requests.put_nowait(None)

    async def ask(self, text: str, speak: bool = False) -> None:
        """Send a turn and wait until it ends."""
        self._turn_ended.clear()
        if speak:
            self.send(pb.ConverseRequest(speak_text=pb.SpeakText(text=text, flush=True)))
        else:
            self.send(pb.ConverseRequest(user_text=pb.UserText(text=text)))
        await self._turn_ended.wait()

    def interrupt(self) -> None:
        self.send(pb.ConverseRequest(interrupt=pb.Interrupt()))

    async def receive(self) -> None:
        """Read every server message until the stream ends. Raises grpc.aio.AioRpcError."""
        async for response in self._call:
            kind = response.WhichOneof("kind")
            if kind == "session_started":
                started = response.session_started
                self.sample_rate = started.audio.sample_rate_hz
                self.started.set()
                print(
                    f"[session {started.session_id}: voice {started.voice}, {started.audio.sample_rate_hz} Hz, "
                    f"llm {started.llm_engine}, tts {started.tts_engine}]",
                    file=sys.stderr,
                )
            elif kind == "text_delta":
                self.current_turn = response.text_delta.turn_id
                print(response.text_delta.text, end="", flush=True)
            elif kind == "audio":
                self.current_turn = response.audio.turn_id
                self._turns.setdefault(response.audio.turn_id, TurnAudio()).pcm += response.audio.data
            elif kind == "turn_ended":
                self._finish_turn(response.turn_ended)

    def _finish_turn(self, ended: pb.TurnEnded) -> None:
        turn = self._turns.pop(ended.turn_id, TurnAudio())
        self._turn_count += 1
        self.current_turn = None
        print()
        path = self._out
        if self._interactive:
            path = path.with_name(f"{path.stem}-{self._turn_count}{path.suffix}")
        if turn.pcm:
            write_wav(path, bytes(turn.pcm), self.sample_rate)
        t = ended.timings
        reason = _REASONS.get(ended.reason, "unknown")
        saved = f", audio in {path}" if turn.pcm else ", no audio"
        if ended.HasField("usage"):
            saved += f", {ended.usage.prompt_tokens}+{ended.usage.completion_tokens} tokens"
        print(
            f"[{reason}: first token {t.first_llm_token_ms} ms, first segment {t.first_segment_ms} ms, "
            f"first audio {t.first_audio_ms} ms, total {t.total_ms} ms, {t.audio_duration_ms / 1000:.1f} s of speech"
            f"{saved}]",
            file=sys.stderr,
        )
        if ended.error:
            print(f"[turn failed: {ended.error}]", file=sys.stderr)
            self.failed = True
        self._turn_ended.set()


def write_wav(path: Path, pcm: bytes, sample_rate: int) -> None:
    """Write mono PCM16 (or a streamed WAV, whose header is replaced) as a WAV file."""
    if pcm[:4] == b"RIFF":
        pcm = pcm[44:]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm)


def explain(error: grpc.aio.AioRpcError, target: str) -> str:
    """A message a person can act on."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach Parley at {target}: is the service running? (start it with `make run`)"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"the service rejected the request: {error.details()}"
    return f"the service ended the stream with {code.name}: {error.details()}"


async def interactive(conversation: Conversation) -> None:
    """Read lines until Ctrl-D; Ctrl-C interrupts the reply in progress."""
    loop = asyncio.get_running_loop()

    def on_ctrl_c() -> None:
        if conversation.current_turn is not None:
            print("\n[interrupting]", file=sys.stderr)
            conversation.interrupt()
        else:
            print("\n[press Ctrl-D to quit]", file=sys.stderr)

    loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
    await conversation.started.wait()
    print("Type a message and press Enter. Ctrl-C interrupts a reply, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = await loop.run_in_executor(None, input, "you> ")
        except EOFError:
            break
        if line.strip():
            await conversation.ask(line.strip())
    conversation.close_sending()


async def unless_ended(receiver: asyncio.Task[None], step: Coroutine[Any, Any, object]) -> None:
    """Run ``step`` unless the stream ends first; re-raise the stream's error if it failed."""
    waiter = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        receiver.result()
        raise SystemExit("error: the service ended the stream early")


async def run(args: argparse.Namespace) -> int:
    start = pb.Start(
        voice=args.voice,
        system_prompt=args.system,
        audio=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=args.rate),
    )
    async with grpc.aio.insecure_channel(args.server) as channel:
        conversation = Conversation(voice_pb2_grpc.VoiceServiceStub(channel), start, Path(args.out), args.interactive)
        receiver = asyncio.create_task(conversation.receive())
        try:
            if args.interactive:
                waiter = asyncio.create_task(interactive(conversation))
                done, _ = await asyncio.wait({receiver, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    await receiver
                else:
                    waiter.cancel()
                    receiver.result()
            else:
                # One step at a time, so that a rejected request is reported as the server said it
                # (grpc aio can mask the server's status when a client writes after it arrived).
                await unless_ended(receiver, conversation.started.wait())
                if args.speak is not None:
                    await unless_ended(receiver, conversation.ask(args.speak, speak=True))
                else:
                    await unless_ended(receiver, conversation.ask(args.question))
                conversation.close_sending()
                await receiver
        except grpc.aio.AioRpcError as error:
            print(f"error: {explain(error, args.server)}", file=sys.stderr)
            return 1
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await receiver
    return 1 if conversation.failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clients.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", help="ask this once (omit for interactive mode)")
    parser.add_argument("--speak", metavar="TEXT", help="read TEXT aloud instead of asking the LLM")
    parser.add_argument(
        "--server",
        default=os.environ.get("PARLEY_SERVER", "localhost:50051"),
        help="service address (env PARLEY_SERVER; default localhost:50051)",
    )
    parser.add_argument("--voice", default="", help="voice id (default: the server's)")
    parser.add_argument("--rate", type=int, default=0, help="sample rate in Hz, 8000-48000 (default: the voice's)")
    parser.add_argument("--system", default="", help="system prompt (default: the server's)")
    parser.add_argument("--out", default="reply.wav", help="WAV file to write (default reply.wav)")
    args = parser.parse_args(argv)
    args.interactive = args.question is None and args.speak is None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
