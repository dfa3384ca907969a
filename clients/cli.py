"""Parley's command-line client (installed as ``parley``).

    parley "Why is the sky blue?"        ask once: captions stream, the reply plays or is saved as WAV
    parley Hi there                      the same; the words of an unquoted question are joined
    parley --speak "Read this aloud."    read text aloud (no LLM)
    parley                               interactive: one session, many turns
    parley --audio-file question.wav     ask by voice: the WAV is streamed in real time
    parley --mic                         talk: the microphone streams until Ctrl-C (use headphones)
    parley --json "Hi"                   every server message as one JSON line, for scripts

In interactive mode Ctrl-C interrupts the reply being spoken (not the program) and Ctrl-D quits.
``python -m clients.cli`` works the same.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import sys
import wave
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc

from clients.audio_in import MicError, Microphone
from clients.audio_out import LivePlayer, write_wav
from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.core.aio import first_of
from ws_bridge.calls import accepted_write, answered, half_close
from ws_bridge.translate import to_json

EXTENSIONS = {"pcm16": "wav", "wav": "wav", "ogg_opus": "ogg", "mp3": "mp3", "mulaw": "ulaw", "alaw": "alaw"}
"""The CLI's --encoding choices, and the extension of the files it writes."""
MIC_RATE = 16000
"""The microphone's rate: what the speech engines take, so nothing is resampled."""
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the service accepts as start.session_id

_REASONS = {
    pb.TURN_END_REASON_COMPLETED: "completed",
    pb.TURN_END_REASON_INTERRUPTED: "interrupted",
    pb.TURN_END_REASON_FAILED: "failed",
}


def status(text: str) -> None:
    """A line for the person at the terminal (stderr, so stdout stays the captions or the JSON)."""
    print(text, file=sys.stderr, flush=True)


class Conversation:
    """One Converse stream: send requests, show what comes back, keep or play each turn's audio."""

    def __init__(self, stub: voice_pb2_grpc.VoiceServiceStub, start: pb.Start, args: argparse.Namespace) -> None:
        self._requests: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self._requests.put_nowait(pb.ConverseRequest(start=start))
        token = args.token
        self._call = stub.Converse(metadata=[("authorization", f"Bearer {token}")] if token else None)
        self._sending = asyncio.create_task(self._send_requests())
        self._args = args
        self._pcm = bytearray()
        self._turn_ended = asyncio.Event()
        self._turn_count = 0
        self.started = asyncio.Event()
        self.current_turn: str | None = None
        self.sample_rate = 0
        self.session_id = ""
        """The session's id, once the service started it."""
        self.accepted = False
        """The service accepted the stream (its end is the service's word, not a connection's failure)."""
        self.player: LivePlayer | None = None
        self.failed = False

    async def _send_requests(self) -> None:
        """Write what :meth:`send` queued, in order, until :meth:`close_sending` (then half-close) or
        the stream's end. Nothing is written before the service has accepted the stream (or refused
        it), and no write hides the service's status (see ``accepted_write``): a refusal or a
        shutdown is reported as the service said it."""
        self.accepted = await answered(self._call)
        while (request := await self._requests.get()) is not None:
            if not await accepted_write(self._call, request):
                return
        await half_close(self._call)

    def close(self) -> None:
        """Stop writing (the stream is over, or the program ends)."""
        self._sending.cancel()

    def send(self, request: pb.ConverseRequest) -> None:
        self._requests.put_nowait(request)

    def close_sending(self) -> None:
        """Half-close: the service finishes the turn in progress, then ends the stream."""
        self._requests.put_nowait(None)

    async def ask(self, text: str, speak: bool = False) -> None:
        """Send a turn and wait until it ends."""
        self._turn_ended.clear()
        self._pcm.clear()
        if self.player is not None:
            self.player.new_turn()
        if speak:
            self.send(pb.ConverseRequest(speak_text=pb.SpeakText(text=text, flush=True)))
        else:
            self.send(pb.ConverseRequest(user_text=pb.UserText(text=text)))
        await self._turn_ended.wait()

    @property
    def turns_ended(self) -> int:
        return self._turn_count

    async def say(self, pcm: bytes, rate: int) -> None:
        """Stream a spoken question in real time (20 ms at a time), then a second of silence so the
        service hears it end, then half-close: the service answers what it heard, then ends the stream
        (at once when it heard no speech: silence and noise are not answered)."""
        self._turn_ended.clear()
        self._pcm.clear()
        if self.player is not None:
            self.player.new_turn()
        step = rate * 2 * 20 // 1000
        began = asyncio.get_running_loop().time()
        silence = b"\x00\x00" * rate
        for index, start in enumerate(range(0, len(pcm) + len(silence), step)):
            chunk = (pcm + silence)[start : start + step]
            self.send(pb.ConverseRequest(user_audio=pb.UserAudio(data=chunk)))
            delay = began + (index + 1) * 0.02 - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
        self.close_sending()

    async def talk(self, microphone: Microphone) -> None:
        """Stream the microphone until it is closed (Ctrl-C); each utterance is answered as it ends."""
        async for block in microphone.blocks():
            self.send(pb.ConverseRequest(user_audio=pb.UserAudio(data=block)))
        if microphone.dropped_blocks:
            status(f"[{microphone.dropped_blocks * 20} ms of microphone audio were dropped: the program fell behind]")

    def _barge_in(self) -> None:
        """The user spoke over the reply: stop playing it, and say how much of it was heard (the
        service already stopped sending it)."""
        if self.player is not None and self.player.playing():
            if not self._args.json:
                status(f"[you spoke over the reply: stopped it after {self.player.played_ms() / 1000:.1f} s]")
            self.interrupt()

    def interrupt(self) -> None:
        """Stop the reply: playback at once, and tell the service how much was heard."""
        request = pb.Interrupt()
        if self.player is not None:
            request.played_ms = self.player.played_ms()
            self.player.stop_now()
        self.send(pb.ConverseRequest(interrupt=request))

    async def receive(self) -> None:
        """Handle every server message until the stream ends. Raises grpc.aio.AioRpcError."""
        async for response in self._call:
            if self._args.json:
                # The bridge's JSON exactly: fields at their default value too ("index": 0, "startMs": "0").
                print(json.dumps(to_json(response), separators=(",", ":")), flush=True)
            kind = response.WhichOneof("kind")
            if kind == "session_started":
                self._started(response.session_started)
            elif kind == "text_delta":
                self.current_turn = response.text_delta.turn_id
                if not self._args.json:
                    print(response.text_delta.text, end="", flush=True)
            elif kind == "audio":
                self.current_turn = response.audio.turn_id
                self._pcm += response.audio.data
                if self.player is not None:
                    self.player.play(response.audio.data)
            elif kind == "turn_ended":
                self._finish_turn(response.turn_ended)
            elif kind == "transcript" and response.transcript.is_final:
                self._pcm.clear()  # the reply turn to this utterance begins
                if self.player is not None:
                    self.player.new_turn()
                if not self._args.json:
                    status(f"[you said: {response.transcript.text}]")
            elif kind == "speech_started":
                self._barge_in()
                if not self._args.json:
                    status("[hearing you]")

    def _started(self, started: pb.SessionStarted) -> None:
        self.session_id = started.session_id
        self.sample_rate = started.audio.sample_rate_hz
        if not self._args.no_play and not self._args.json and self._args.encoding in ("pcm16", "wav"):
            self.player = LivePlayer.open(self.sample_rate)
        if not self._args.json:
            if self.player:
                where = "playing on the sound device"
            elif self._args.encoding not in ("pcm16", "wav"):
                where = f"{self._args.encoding} replies are saved as .{EXTENSIONS[self._args.encoding]} files"
            else:
                where = "no sound device: replies are saved as WAV"
            status(
                f"[session {started.session_id}: voice {started.voice}, {self.sample_rate} Hz, "
                f"{started.llm_engine} + {started.tts_engine}; {where}]"
            )
        self.started.set()

    def _finish_turn(self, ended: pb.TurnEnded) -> None:
        self._turn_count += 1
        self.current_turn = None
        saved = self._save_audio()
        if not self._args.json:
            print(flush=True)
            t = ended.timings
            tokens = (
                f", {ended.usage.prompt_tokens}+{ended.usage.completion_tokens} tokens"
                if ended.HasField("usage")
                else ""
            )
            status(
                f"[{_REASONS.get(ended.reason, 'unknown')}: first token {t.first_llm_token_ms} ms, "
                f"first segment {t.first_segment_ms} ms, first audio {t.first_audio_ms} ms, total {t.total_ms} ms, "
                f"{t.audio_duration_ms / 1000:.1f} s of speech{saved}{tokens}]"
            )
            if ended.error:
                status(f"[turn failed: {ended.error}]")
        self.failed = self.failed or ended.reason == pb.TURN_END_REASON_FAILED
        self._turn_ended.set()

    def _save_audio(self) -> str:
        """Write the turn's audio when it was not played (or --out was given); say where."""
        out = self._args.out
        if not self._pcm or (out is None and (self.player is not None or self._args.json)):
            return "" if self._pcm else ", no audio"
        encoding = self._args.encoding
        path = Path(out or f"reply.{EXTENSIONS[encoding]}")
        if self._args.interactive or self._args.mic:
            path = path.with_name(f"{path.stem}-{self._turn_count}{path.suffix}")
        if encoding in ("pcm16", "wav"):
            write_wav(path, bytes(self._pcm), self.sample_rate)
        else:
            path.write_bytes(self._pcm)  # the turn's bytes are a file of the encoding
        return f", audio in {path}"


async def explain(
    error: grpc.aio.AioRpcError, args: argparse.Namespace, session_id: str = "", accepted: bool = False
) -> str:
    """A message a person can act on; ``session_id``: the session the stream had started, if it had;
    ``accepted``: the service had accepted the stream (so an UNAVAILABLE is its word, not a failure
    to reach it)."""
    code, target, details = error.code(), args.server, error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and not (session_id or accepted):
        if (http := await http_server_at(target)) is not None:
            host = http[0]
            if http[1]:
                return (
                    f"{target} is Parley's WebSocket bridge (the browser page), which speaks HTTP, not gRPC: "
                    f"the CLI talks to the service itself, usually on port {SERVICE_PORT} "
                    f"(--server {host}:{SERVICE_PORT})"
                )
            return (
                f"{target} answers HTTP, not gRPC, so it is not the Parley service, which usually listens on "
                f"port {SERVICE_PORT} (--server {host}:{SERVICE_PORT})"
            )
        return f"cannot reach Parley at {target}: is the service running? (start it with `make run`)"
    if code == grpc.StatusCode.NOT_FOUND and args.session:
        return (
            f"the service at {target} has no session {args.session!r}: it never existed, it expired, or it was "
            "lost when the service restarted; run without --session to start a new conversation"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        given = "the key given was not accepted" if args.token else "it needs an API key"
        return f"the service at {target} refused the call: {given}; pass --token KEY (or set PARLEY_TOKEN)"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        said = f"the service rejected the request: {details}"
    elif code == grpc.StatusCode.UNAVAILABLE:  # (shutting down, its session store out of reach, ...)
        said = f"the service ended the stream: {details}"
    else:
        said = f"the service ended the stream with {code.name}: {details}"
    # The session is kept (a stream closed as idle, taken over elsewhere, refused a message, cut by a
    # shutdown), unless the service said it is gone.
    kept = code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED) and (
        "start a new session" not in details
    )
    if session_id and kept:
        when = " once the service is back" if code == grpc.StatusCode.UNAVAILABLE else ""
        said += f"\nTo go on with this conversation{when}, run again with --session {session_id}"
    return said


SERVICE_PORT = 50051  # where `make run` and `python -m service` listen unless told otherwise


def host_and_port(target: str) -> tuple[str, int] | None:
    """The host and port of a gRPC target such as ``localhost:8080`` or ``[::1]:8080``; None for others."""
    target = target.removeprefix("dns:///").removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host, int(port)) if host and "/" not in host else None


async def http_server_at(target: str) -> tuple[str, bool] | None:
    """When an HTTP server answers at ``target`` (instead of gRPC): its host as written, and whether it
    is Parley's WebSocket bridge. None when nothing answers, or something else does."""
    address = host_and_port(target)
    if address is None:
        return None
    host, port = address
    name = f"[{host}]" if ":" in host else host
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET /healthz HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n".encode())
                head = await reader.read(4096)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    if not head.startswith(b"HTTP/"):
        return None
    headers = head.split(b"\r\n\r\n", 1)[0].lower()
    return name, b"\r\nserver: parley-bridge" in headers


def prompt() -> None:
    """The interactive prompt, on stderr with the other lines for the person at the terminal (stdout
    stays the captions or the JSON)."""
    print("you> ", end="", file=sys.stderr, flush=True)


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class TerminalLines:
    """The lines typed at the terminal (or piped in), read as the event loop finds them ready, with
    no thread: the stream may end while the program waits for a line (the service shutting down, an
    idle stream closed), and the program then ends at once, where a thread blocked in ``input()``
    kept it alive until the user next pressed Enter."""

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._buffer = b""
        self._lines: collections.deque[str] = collections.deque()
        self._ended = False

    async def next(self) -> str:
        """The next line, without its end. Raises EOFError at the end of input (Ctrl-D)."""
        while not self._lines and not self._ended:
            self._take(await self._read())
        if self._lines:
            return self._lines.popleft()
        raise EOFError

    async def _read(self) -> bytes:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        try:
            loop.add_reader(self._fd, _settle, ready)
        except (OSError, ValueError, NotImplementedError):  # a regular file: reading it never waits
            return self._read_now()
        try:
            await ready
        finally:
            loop.remove_reader(self._fd)
        return self._read_now()  # (ready: this does not block)

    def _read_now(self) -> bytes:
        try:
            return os.read(self._fd, 65536)
        except OSError:  # (no input at all: stdin closed, say) as its end
            return b""

    def _take(self, data: bytes) -> None:
        if not data:
            self._ended = True
            data, self._buffer = self._buffer, b""
            if data:
                self._lines.append(data.decode(errors="replace"))
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        self._lines.extend(line.decode(errors="replace").removesuffix("\r") for line in lines)


async def interactive(conversation: Conversation) -> bool:
    """Read lines until Ctrl-D; Ctrl-C interrupts the reply in progress. False when the user gave up
    (Ctrl-C) before the service started the session (a service that does not answer)."""
    loop = asyncio.get_running_loop()
    gave_up = asyncio.Event()

    def on_ctrl_c() -> None:
        if not conversation.started.is_set():
            gave_up.set()
        elif conversation.current_turn is not None:
            status("\n[interrupting]")
            conversation.interrupt()
        else:
            status("\n[press Ctrl-D to quit]")
            prompt()  # (the line being typed goes on after it)

    loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
    terminal = TerminalLines()
    await first_of(conversation.started, gave_up)
    if gave_up.is_set():
        return False
    status("Type a message and press Enter. Ctrl-C interrupts a reply, Ctrl-D quits.")
    try:
        while True:
            prompt()
            try:
                line = await terminal.next()
            except EOFError:
                status("")  # (the shell's prompt on a line of its own)
                break
            if line.strip():
                await conversation.ask(line.strip())
    except asyncio.CancelledError:  # the stream ended (said next), maybe as the user typed
        _drop_typed_input()
        status("")  # (what is said next on a line of its own)
        raise
    conversation.close_sending()
    return True


def _drop_typed_input() -> None:
    """Discard what was typed at the terminal and not read: the shell would otherwise take it as a
    command once the program ends (a line the user meant for the conversation)."""
    import termios  # (here: the rest of the program runs where there is no termios too)

    if os.isatty(0):
        with contextlib.suppress(OSError, termios.error):
            termios.tcflush(0, termios.TCIFLUSH)


async def talk(conversation: Conversation) -> None:
    """``--mic``: stream the microphone until Ctrl-C."""
    try:
        microphone = Microphone(MIC_RATE)  # (checked before the stream opened: Microphone.check)
        async with microphone:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, microphone.close)
            try:
                await conversation.started.wait()
                status("Speak; the reply plays when you stop. Speaking over it interrupts it. Ctrl-C quits.")
                await conversation.talk(microphone)
            finally:
                loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once
    except MicError as error:
        raise SystemExit(f"error: {error}") from None


async def unless_ended(receiver: asyncio.Task[None], step: Coroutine[Any, Any, object]) -> None:
    """Run ``step`` unless the stream ends first; re-raise the stream's error if it failed."""
    waiter = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        receiver.result()
        raise SystemExit("error: the service ended the stream early")


async def converse(conversation: Conversation, receiver: asyncio.Task[None], args: argparse.Namespace) -> None:
    if args.interactive:
        waiter = asyncio.create_task(interactive(conversation))
        done, _ = await asyncio.wait({receiver, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            if not waiter.result():
                raise SystemExit(f"\nerror: gave up: the service at {args.server} has not started the session")
            await receiver
        else:
            waiter.cancel()
            await asyncio.wait({waiter})  # (it leaves the terminal as it should before the end is said)
            receiver.result()
        return
    # One step at a time, so that a rejected request is reported as the server said it
    # (grpc aio can mask the server's status when a client writes after it arrived).
    await unless_ended(receiver, conversation.started.wait())
    if args.speak is not None:
        await unless_ended(receiver, conversation.ask(args.speak, speak=True))
    elif args.audio is not None:
        await unless_ended(receiver, conversation.say(*args.audio))
        await receiver  # (the reply, then the stream's end)
        if not conversation.turns_ended:
            raise SystemExit("error: the service heard no speech in the WAV (silence and noise are not answered)")
        return
    elif args.mic:
        await unless_ended(receiver, talk(conversation))
    else:
        await unless_ended(receiver, conversation.ask(args.question))
    conversation.close_sending()
    await receiver


async def run(args: argparse.Namespace) -> int:
    start = pb.Start(
        session_id=args.session,
        voice=args.voice,
        system_prompt=args.system,
        audio=pb.AudioFormat(
            encoding=pb.AudioEncoding.Value(f"AUDIO_ENCODING_{args.encoding.upper()}"), sample_rate_hz=args.rate
        ),
    )
    if args.audio is not None:
        start.input_audio.CopyFrom(pb.InputAudio(sample_rate_hz=args.audio[1]))
    elif args.mic:
        start.input_audio.CopyFrom(pb.InputAudio(sample_rate_hz=MIC_RATE))
        try:
            Microphone.check()
        except MicError as error:
            status(f"error: {error}")
            return 1
    async with open_channel(args) as channel:
        conversation = Conversation(voice_pb2_grpc.VoiceServiceStub(channel), start, args)
        receiver = asyncio.create_task(conversation.receive())
        try:
            await converse(conversation, receiver, args)
        except grpc.aio.AioRpcError as error:
            status(f"error: {await explain(error, args, conversation.session_id, conversation.accepted)}")
            return 1
        finally:
            receiver.cancel()
            conversation.close()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await receiver
            if conversation.player is not None:
                conversation.player.close()
    return 1 if conversation.failed else 0


def open_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A channel to the service: TLS with --tls or --ca-file (the system's CAs, or that file's)."""
    if not (args.tls or args.ca_file):
        return grpc.aio.insecure_channel(args.server)
    return grpc.aio.secure_channel(args.server, grpc.ssl_channel_credentials(args.ca))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "question", nargs="*", help="ask this once, quoted or not (omit for interactive mode)", metavar="QUESTION"
    )
    parser.add_argument("--speak", metavar="TEXT", nargs="+", help="read TEXT aloud instead of asking the LLM")
    parser.add_argument(
        "--server",
        default=os.environ.get("PARLEY_SERVER", "localhost:50051"),
        help="service address (env PARLEY_SERVER; default localhost:50051)",
    )
    parser.add_argument("--session", default="", help="resume this session (the id a previous run printed)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--ca-file", metavar="PEM", help="connect with TLS, trusting the CA certificates in PEM")
    parser.add_argument(
        "--token",
        default=os.environ.get("PARLEY_TOKEN", ""),
        help="an API key of the service, sent as authorization: Bearer (env PARLEY_TOKEN)",
    )
    parser.add_argument("--voice", default="", help="voice id (default: the server's; see ListVoices)")
    parser.add_argument("--rate", type=int, default=0, help="sample rate in Hz, 8000-48000 (default: the voice's)")
    parser.add_argument("--system", default="", help="system prompt (default: the server's)")
    parser.add_argument(
        "--out", default=None, help="WAV file to write (default reply.wav when not playing; reply-N.wav per turn)"
    )
    parser.add_argument("--no-play", action="store_true", help="do not play on the sound device; write WAV files")
    parser.add_argument(
        "--encoding",
        choices=list(EXTENSIONS),
        default="pcm16",
        help="the audio the service sends (default pcm16, played live); the others are written to files "
        "(reply.ogg, reply.mp3, reply.ulaw, ...)",
    )
    parser.add_argument("--json", action="store_true", help="print every server message as one JSON line")
    parser.add_argument(
        "--audio-file", metavar="WAV", help="ask by voice: stream this WAV (16-bit PCM) in real time, then listen"
    )
    parser.add_argument(
        "--mic",
        action="store_true",
        help="talk: stream the microphone (16 kHz) until Ctrl-C; needs sounddevice and PortAudio. Without "
        "echo cancellation the reply heard by the microphone interrupts itself: use headphones",
    )
    # Intermixed, so that options may also follow the words: parley Why is the sky blue? --no-play
    args = parser.parse_intermixed_args(argv)
    if sum(bool(x) for x in (args.question, args.speak is not None, args.audio_file, args.mic)) > 1:
        parser.error("give one of a question, --speak TEXT, --audio-file WAV or --mic")
    args.audio = read_question_wav(parser, args.audio_file) if args.audio_file else None
    # The words of an unquoted question (parley Hi there) are one question.
    args.question = " ".join(args.question) if args.question else None
    args.speak = " ".join(args.speak) if args.speak is not None else None
    for given, what in ((args.question, "the question"), (args.speak, "--speak")):
        if given is not None and not given.strip():
            parser.error(f"{what} is empty: give the text to send")
    if args.session and not SESSION_ID.fullmatch(args.session):
        parser.error(
            f"--session {args.session!r} is not a session id: give the id a previous run printed "
            "([session ID: ...]), or run without --session to start a new conversation"
        )
    args.ca = None
    if args.ca_file:
        try:
            args.ca = Path(args.ca_file).read_bytes()
        except OSError as error:
            parser.error(f"--ca-file {args.ca_file}: {error.strerror}")
    args.interactive = args.question is None and args.speak is None and args.audio is None and not args.mic
    return args


def read_question_wav(parser: argparse.ArgumentParser, path: str) -> tuple[bytes, int]:
    """A spoken question: mono PCM16 and its rate (stereo is mixed down). Exits on a bad file."""
    try:
        with wave.open(path, "rb") as wav:
            if wav.getsampwidth() != 2:
                parser.error(f"--audio-file {path}: {8 * wav.getsampwidth()}-bit samples; give 16-bit PCM")
            rate, channels = wav.getframerate(), wav.getnchannels()
            frames = wav.readframes(wav.getnframes())
    except wave.Error as error:
        if str(error) == "unknown format: 3":  # (the WAVE format tag of IEEE floats)
            parser.error(f"--audio-file {path}: floating-point samples; give 16-bit PCM")
        parser.error(f"--audio-file {path}: {error}")
    except (OSError, EOFError) as error:
        parser.error(f"--audio-file {path}: {error}")
    if not 8000 <= rate <= 48000:
        parser.error(f"--audio-file {path}: {rate} Hz; give 8000 to 48000 Hz")
    if channels > 1:
        samples = array.array("h", frames)
        frames = array.array(
            "h", (sum(samples[i : i + channels]) // channels for i in range(0, len(samples), channels))
        ).tobytes()
    return frames, rate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`parley --json ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141


if __name__ == "__main__":
    sys.exit(main())
