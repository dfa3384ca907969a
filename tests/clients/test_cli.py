"""The command-line client against a live service (fake engines), including interactive mode
through a pseudo-terminal: ask, Ctrl-C mid-reply, ask again, Ctrl-D."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import struct
import sys
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Harness, run_process, serve_converse, start_harness, stop_harness
from tests.fakes import FakeLLM, FakeTTS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def slow() -> AsyncIterator[Harness]:
    h = await start_harness(
        FakeLLM(reply="Once upon a time, there was a story. " + "It went on and on. " * 40, token_s=0.03),
        FakeTTS(chunk_s=0.02),
    )
    yield h
    await stop_harness(h)


async def run_cli(*args: str) -> tuple[int, str, str]:
    return await run_process(sys.executable, "-m", "clients.cli", *args)


async def open_cli(*args: str) -> asyncio.subprocess.Process:
    """The CLI running, its stdin a pipe the test writes to (and keeps open, as a terminal is, until it
    closes it), its stdout and stderr pipes."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "clients.cli", *args),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_one_question_writes_wav_and_timings(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "a.wav"
    code, stdout, stderr = await run_cli("--server", f"127.0.0.1:{harness.running.port}", "--out", str(out), "Hi?")
    assert code == 0, stderr
    assert stdout.strip() == harness.llm.reply
    assert "[completed: first token" in stderr and "first audio" in stderr
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 16000
        assert wav.getnframes() == pytest.approx(
            sum(harness.tts.duration_ms(t) for t in harness.tts.texts) * 16, rel=0.01
        )


async def test_speak_mode(harness: Harness, tmp_path: Path) -> None:
    code, stdout, _ = await run_cli(
        "--server", f"127.0.0.1:{harness.running.port}", "--out", str(tmp_path / "s.wav"), "--speak", "Read me."
    )
    assert code == 0 and stdout.strip() == "Read me."
    assert harness.llm.requests == []


async def test_rejected_request_is_explained(harness: Harness) -> None:
    code, _, stderr = await run_cli("--server", f"127.0.0.1:{harness.running.port}", "--voice", "nobody", "Hi?")
    assert code == 1
    assert "the service rejected the request: unknown voice 'nobody'" in stderr


def read_until(fd: int, marker: str, timeout_s: float = 20) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        assert time.monotonic() < deadline, f"never saw {marker!r} in:\n{seen}"
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
    return seen


async def test_interactive_session_through_a_terminal(slow: Harness, tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the CLI
        os.chdir(ROOT)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "clients.cli",
                "--server",
                f"127.0.0.1:{slow.running.port}",
                "--out",
                str(tmp_path / "r.wav"),
            ],
        )
    try:
        await asyncio.to_thread(read_until, fd, "you> ")
        os.write(fd, b"Tell me a story.\n")
        await asyncio.to_thread(read_until, fd, "It went on")
        os.write(fd, b"\x03")  # Ctrl-C mid-reply interrupts it, it does not quit
        screen = await asyncio.to_thread(read_until, fd, "you> ")
        assert "[interrupted" in screen
        assert slow.llm.cancelled == 1
        slow.llm.reply = "Short answer."
        os.write(fd, b"And now?\n")
        screen = await asyncio.to_thread(read_until, fd, "you> ")
        assert "Short answer." in screen and "[completed" in screen
        # Both turns were on one session: the second request carries the first, cut, exchange.
        assert [m.content for m in slow.llm.requests[-1].messages][1] == "Tell me a story."
        os.write(fd, b"\x04")  # Ctrl-D quits
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)  # noqa: ASYNC222 - the child was just killed
        except (ProcessLookupError, ChildProcessError):
            pass
    assert (tmp_path / "r-2.wav").exists()


PARLEY = Path(sys.executable).parent / "parley"


async def run_script(*args: str, cwd: Path) -> tuple[int, str, str]:
    # The console script imports the code of the checkout it was installed from; run this one's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return await run_process(str(PARLEY), *args, cwd=cwd, env=env)


async def test_console_script_saves_wav_when_there_is_no_sound_device(harness: Harness, tmp_path: Path) -> None:
    code, stdout, stderr = await run_script("--server", f"127.0.0.1:{harness.running.port}", "Hi?", cwd=tmp_path)
    assert code == 0, stderr
    assert "no sound device: replies are saved as WAV" in stderr
    assert "audio in reply.wav" in stderr and (tmp_path / "reply.wav").exists()
    assert stdout.strip() == harness.llm.reply


async def test_json_mode_prints_every_message_as_a_line(harness: Harness, tmp_path: Path) -> None:
    import base64
    import json

    code, stdout, stderr = await run_script(
        "--server", f"127.0.0.1:{harness.running.port}", "--json", "Hi?", cwd=tmp_path
    )
    assert code == 0, stderr
    messages = [json.loads(line) for line in stdout.splitlines()]
    assert "sessionStarted" in messages[0] and "turnEnded" in messages[-1]
    assert messages[-1]["turnEnded"]["reason"] == "TURN_END_REASON_COMPLETED"
    assert "".join(m["textDelta"]["text"] for m in messages if "textDelta" in m) == harness.llm.reply
    audio = b"".join(base64.b64decode(m["audio"]["data"]) for m in messages if "audio" in m)
    assert len(audio) / 2 / 16 == pytest.approx(sum(harness.tts.duration_ms(t) for t in harness.tts.texts), rel=0.01)
    assert os.listdir(tmp_path) == []  # scripts get JSON, not files, unless they ask with --out
    assert stderr == ""
    # Fields at their default value are there too, as in the bridge's frames.
    first_segment = next(m["segment"] for m in messages if "segment" in m)
    assert first_segment["index"] == 0 and first_segment["startMs"] == "0"
    first_audio = next(m["audio"] for m in messages if "audio" in m)
    assert first_audio["segmentIndex"] == 0 and first_audio["sequence"] == "0"
    assert messages[-1]["turnEnded"]["historyUnsaved"] is False


async def test_json_mode_in_interactive_mode_keeps_stdout_json(harness: Harness) -> None:
    # The "you> " prompt went to stdout, before the first message's JSON on the same line (a QA pass).
    import json

    process = await open_cli("--server", f"127.0.0.1:{harness.running.port}", "--json")
    out, err = await asyncio.wait_for(process.communicate(b"Hi?\nAnd again?\n"), 60)
    assert process.returncode == 0, err.decode()
    messages = [json.loads(line) for line in out.decode().splitlines()]
    assert [m["turnEnded"]["turnId"] for m in messages if "turnEnded" in m] == ["turn-1", "turn-2"]
    assert err.decode().count("you> ") == 3  # before each question, and before the end of the input
    assert err.decode().endswith("\n")


def shape(value: object) -> object:
    """The field names of a JSON message, all the way down, without the values."""
    return {key: shape(item) for key, item in value.items()} if isinstance(value, dict) else None


async def test_json_lines_are_the_bridges_frames(harness: Harness, tmp_path: Path) -> None:
    """The same turn through `parley --json` and through the bridge: the same messages, field for field."""
    import json
    import struct

    from websockets.asyncio.client import connect

    from ws_bridge.server import Bridge, BridgeOptions

    code, stdout, stderr = await run_cli("--server", f"127.0.0.1:{harness.running.port}", "--json", "Hi?")
    assert code == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    bridge = await Bridge(
        BridgeOptions(grpc_target=f"127.0.0.1:{harness.running.port}", host="127.0.0.1", port=0)
    ).start()
    frames: list[dict[str, object]] = []
    try:
        async with connect(f"ws://127.0.0.1:{bridge.port}/ws") as ws:
            await ws.send(json.dumps({"start": {}}))
            await ws.send(json.dumps({"userText": {"text": "Hi?"}}))
            while not frames or "turnEnded" not in frames[-1]:
                frame = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(frame, bytes):  # audio: a JSON header (the AudioChunk without its data), then the bytes
                    (length,) = struct.unpack(">I", frame[:4])
                    frames.append({"audio": {**json.loads(frame[4 : 4 + length]), "data": ""}})
                else:
                    frames.append(json.loads(frame))
    finally:
        await bridge.aclose()

    def shapes(messages: list[dict[str, object]]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for message in messages:
            found.setdefault(next(iter(message)), set()).add(json.dumps(shape(message), sort_keys=True))
        return found

    # How audio is split into messages depends on timing, and so does how captions are (deltas waiting
    # together leave as one); which fields each kind of message has does not, nor what they say.
    assert shapes(lines) == shapes(frames)
    assert [m for m in lines if "segment" in m] == [m for m in frames if "segment" in m]

    def captions(messages: list[dict[str, Any]]) -> str:
        return "".join(m["textDelta"]["text"] for m in messages if "textDelta" in m)

    assert captions(lines) == captions(frames) != ""


class FakeStream:
    """Stands in for a PortAudio output stream (no sound device here): plays instantly."""

    latency = 0.05

    def __init__(self) -> None:
        self.written = bytearray()
        self.aborted = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted += 1

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_live_player_plays_stops_and_measures() -> None:
    from clients.audio_out import LivePlayer

    stream = FakeStream()
    player = LivePlayer(stream, 16000)
    player.new_turn()
    player.play(b"\x01\x00" * 16000)  # one second
    deadline = time.monotonic() + 5
    while len(stream.written) < 32000 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # Written 1000 ms, minus the device latency, but never more than the time since the turn began.
    assert 150 <= player.played_ms() <= 1000
    player.stop_now()
    assert stream.aborted == 1
    player.close()


async def test_session_option_resumes_a_conversation(harness: Harness, tmp_path: Path) -> None:
    import re

    server = f"127.0.0.1:{harness.running.port}"
    code, _, stderr = await run_script("--server", server, "--no-play", "My name is Ada.", cwd=tmp_path)
    assert code == 0, stderr
    session_id = re.search(r"\[session (\S+):", stderr).group(1)  # type: ignore[union-attr]
    code, _, stderr = await run_script("--server", server, "--session", session_id, "Who am I?", cwd=tmp_path)
    assert code == 0, stderr
    assert [m.content for m in harness.llm.requests[-1].messages][1:3] == ["My name is Ada.", harness.llm.reply]


async def test_an_unknown_session_says_how_to_start_a_new_one(harness: Harness) -> None:
    server = f"127.0.0.1:{harness.running.port}"
    for args in (["Hi?"], []):  # one question, and interactive mode
        code, _, stderr = await run_cli("--server", server, "--session", "doesnotexist", *args)
        assert code == 1, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"error: the service at {server} has no session 'doesnotexist': it never existed, it expired, or it was "
            "lost when the service restarted; run without --session to start a new conversation"
        )
    # Not even an id: said before anything is sent, in the CLI's words rather than the proto's.
    code, _, stderr = await run_cli("--server", server, "--session", "no such id", "Hi?")
    assert code == 2 and "start.session_id" not in stderr
    assert "--session 'no such id' is not a session id" in stderr and "run without --session" in stderr
    assert harness.llm.requests == []


async def test_the_bridges_port_is_recognised(harness: Harness) -> None:
    from ws_bridge.server import Bridge, BridgeOptions

    bridge = await Bridge(
        BridgeOptions(grpc_target=f"127.0.0.1:{harness.running.port}", host="127.0.0.1", port=0)
    ).start()
    port = bridge.port
    try:
        code, _, stderr = await run_cli("--server", f"localhost:{port}", "Hi?")
    finally:
        await bridge.aclose()
    assert code == 1
    assert stderr.strip() == (
        f"error: localhost:{port} is Parley's WebSocket bridge (the browser page), which speaks HTTP, not "
        "gRPC: the CLI talks to the service itself, usually on port 50051 (--server localhost:50051)"
    )


async def test_another_http_server_is_not_taken_for_the_service() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, _, stderr = await run_cli("--server", f"127.0.0.1:{port}", "Hi?")
    finally:
        server.close()
    assert code == 1
    assert f"127.0.0.1:{port} answers HTTP, not gRPC, so it is not the Parley service" in stderr
    assert "usually listens on port 50051 (--server 127.0.0.1:50051)" in stderr


async def test_empty_text_is_refused_before_anything_is_sent() -> None:
    for args in (["--speak", ""], [" "]):
        code, _, stderr = await run_cli("--server", "127.0.0.1:1", *args)
        assert code == 2 and "is empty: give the text to send" in stderr


def test_session_ids_can_follow_an_option() -> None:
    from service.core.settings import new_session_id

    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000 and not any(i.startswith("-") for i in ids)
    assert all(len(i) == 24 for i in ids)


async def test_json_mode_stops_quietly_when_its_reader_goes_away(harness: Harness) -> None:
    import shlex

    cli = shlex.join([sys.executable, "-m", "clients.cli", "--server", f"127.0.0.1:{harness.running.port}"])
    code, stdout, stderr = await run_process(
        "bash", "-c", f'{cli} --json "Hi?" | head -1; echo "exit ${{PIPESTATUS[0]}}" >&2'
    )
    assert code == 0 and stdout.startswith('{"sessionStarted"')
    assert "exit 141" in stderr and "Traceback" not in stderr


async def test_an_unquoted_question_is_one_question(harness: Harness, tmp_path: Path) -> None:
    server = f"127.0.0.1:{harness.running.port}"
    # Options may come before or after the words, as with other commands.
    code, stdout, stderr = await run_cli(
        "--server", server, "Hi", "there,", "how", "are", "you?", "--out", str(tmp_path / "q.wav")
    )
    assert code == 0, stderr
    assert stdout.strip() == harness.llm.reply
    assert harness.llm.requests[-1].messages[-1].content == "Hi there, how are you?"
    code, stdout, stderr = await run_cli("--server", server, "--out", str(tmp_path / "s.wav"), "--speak", "Read", "me.")
    assert code == 0, stderr
    assert stdout.strip() == "Read me."
    code, _, stderr = await run_cli("--server", server, "Hi", "--speak", "Read me.")
    assert code == 2 and "give one of a question, --speak TEXT, --audio-file WAV or --mic" in stderr


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "No such file"),
        (b"not a wav", "file does not start with RIFF id"),
        ("8bit", "8-bit samples"),
        ("float", "floating-point samples; give 16-bit PCM"),  # (QA: said "unknown format: 3")
    ],
)
async def test_a_bad_audio_file_is_refused_before_anything_is_sent(
    tmp_path: Path, content: bytes | str | None, words: str
) -> None:
    import wave

    path = tmp_path / "q.wav"
    if content == "8bit":
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(1)
            wav.setframerate(16000)
            wav.writeframes(b"\x80" * 1600)
    elif content == "float":  # a WAVE_FORMAT_IEEE_FLOAT header, as sox and numpy tools write
        fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
        data = b"\x00" * 6400
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
        path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    code, _, stderr = await run_cli("--server", "127.0.0.1:9", "--audio-file", str(path))
    assert code == 2 and words in stderr, stderr


def write_mic_wav(path: Path, pcm: bytes) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(pcm)
    return path


async def run_mic(server: str, wav: Path, ctrl_c_after_s: float, *args: str) -> tuple[int, str, str]:
    """``parley --mic`` with the fake sound device (tests/clients/fake_sounddevice): the microphone
    says ``wav`` in real time, and the user presses Ctrl-C after ``ctrl_c_after_s``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "fake_sounddevice"), str(ROOT)])
    env["FAKE_MIC_WAV"] = str(wav)
    env["FAKE_MIC_CTRL_C_AFTER_S"] = str(ctrl_c_after_s)
    return await run_process(sys.executable, "-m", "clients.cli", "--server", server, "--mic", *args, env=env)


async def test_mic_streams_until_ctrl_c_and_each_utterance_is_answered(tmp_path: Path) -> None:
    from tests.fakes import FakeSTT, loud, quiet

    h = await start_harness(
        FakeLLM(reply="It is sunny."), stt=FakeSTT(texts=["What is the weather like?", "And tomorrow?"])
    )
    try:
        wav = write_mic_wav(tmp_path / "mic.wav", quiet(300) + loud(700) + quiet(2500) + loud(600) + quiet(1500))
        code, stdout, stderr = await run_mic(f"127.0.0.1:{h.running.port}", wav, 6.0)
        assert code == 0, stderr
        assert "[you said: What is the weather like?]" in stderr and "[you said: And tomorrow?]" in stderr
        assert stdout.split() == ["It", "is", "sunny.", "It", "is", "sunny."]
        assert [r.messages[-1].content for r in h.llm.requests] == ["What is the weather like?", "And tomorrow?"]
    finally:
        await stop_harness(h)


async def test_mic_speech_over_the_reply_stops_it_and_the_history_keeps_what_was_heard(tmp_path: Path) -> None:
    from tests.fakes import FakeSTT, loud, quiet

    reply = "Once upon a time there was a castle. " * 3  # about 7 s of the fake voice
    h = await start_harness(FakeLLM(reply=reply), stt=FakeSTT(texts=["Tell me a story.", "Stop, thanks."]))
    try:
        # The question, then 2.5 s of the reply playing, then the user speaks over it.
        wav = write_mic_wav(tmp_path / "mic.wav", loud(700) + quiet(2500) + loud(600) + quiet(1500))
        code, _, stderr = await run_mic(f"127.0.0.1:{h.running.port}", wav, 5.5)
        assert code == 0, stderr
        assert "[you spoke over the reply: stopped it after" in stderr
        heard = h.llm.requests[1].messages[-2]  # the first reply, as the history kept it
        assert heard.role == "assistant"
        assert 0 < len(heard.content) < len(reply.strip()) / 2, heard.content
    finally:
        await stop_harness(h)


async def test_mic_without_sounddevice_says_what_to_install(harness: Harness) -> None:
    code, _, stderr = await run_cli("--server", f"127.0.0.1:{harness.running.port}", "--mic")
    assert code == 1 and "--mic needs the sounddevice package" in stderr, stderr


@pytest.mark.parametrize(("encoding", "container"), [("ogg_opus", "ogg"), ("mp3", "mp3")])
async def test_an_encoding_is_asked_for_and_the_reply_written_as_its_file(
    harness: Harness, tmp_path: Path, encoding: str, container: str
) -> None:
    import av

    out = tmp_path / f"reply.{container}"
    code, _, stderr = await run_cli(
        "--server", f"127.0.0.1:{harness.running.port}", "--encoding", encoding, "--out", str(out), "Hi?"
    )
    assert code == 0, stderr
    with av.open(str(out)) as stream:
        seconds = sum(frame.samples for frame in stream.decode(audio=0)) / stream.streams.audio[0].rate
    spoken_s = sum(harness.tts.duration_ms(t) for t in harness.tts.texts) / 1000
    assert spoken_s <= seconds <= spoken_s + 0.15


async def test_a_token_is_sent_and_a_missing_one_explained(tmp_path: Path) -> None:
    from service.auth import KeyRing

    key = "cli-0123456789abcdefghijklmnop"
    h = await start_harness(keys=KeyRing(None, f"cli:{key}"))
    try:
        server = f"127.0.0.1:{h.running.port}"
        code, _, stderr = await run_cli("--server", server, "--out", str(tmp_path / "a.wav"), "Hi?")
        assert code == 1 and "it needs an API key; pass --token KEY (or set PARLEY_TOKEN)" in stderr, stderr
        code, _, stderr = await run_cli("--server", server, "--token", "wrong" * 6, "Hi?")
        assert code == 1 and "the key given was not accepted" in stderr, stderr
        env = {**os.environ, "PARLEY_TOKEN": key}
        code, stdout, stderr = await run_process(
            sys.executable, "-m", "clients.cli", "--server", server, "--out", str(tmp_path / "b.wav"), "Hi?", env=env
        )
        assert code == 0 and stdout.strip() == h.llm.reply, stderr
    finally:
        await stop_harness(h)


async def test_an_audio_file_is_answered_and_one_without_speech_is_said_to_hold_none(tmp_path: Path) -> None:
    # Found in QA: a WAV of silence or noise (which the service rightly leaves unanswered) left the CLI
    # waiting for a reply for ever; it half-closes after the file now, and says so when none comes.
    from tests.fakes import FakeSTT, loud, quiet

    h = await start_harness(FakeLLM(reply="It is sunny."), stt=FakeSTT(texts=["What is the weather like?"]))
    try:
        server = f"127.0.0.1:{h.running.port}"
        spoken = write_mic_wav(tmp_path / "q.wav", quiet(300) + loud(700) + quiet(300))
        code, stdout, stderr = await run_cli("--server", server, "--audio-file", str(spoken), "--no-play")
        assert code == 0, stderr
        assert "[you said: What is the weather like?]" in stderr and stdout.split() == ["It", "is", "sunny."]
        silent = write_mic_wav(tmp_path / "silence.wav", quiet(2000))
        began = time.monotonic()
        code, _, stderr = await run_cli("--server", server, "--audio-file", str(silent), "--no-play")
        assert code == 1 and "the service heard no speech in the WAV" in stderr, stderr
        assert time.monotonic() - began < 15
    finally:
        await stop_harness(h)


@pytest.mark.parametrize("mode", ["interactive", "audio file"])
async def test_a_service_shutting_down_mid_stream_is_said_with_how_to_go_on(mode: str, tmp_path: Path) -> None:
    # Found using it: a stream the service ended as it shut down was explained as "cannot reach
    # Parley: is the service running?", without the session to go on with; and a WAV being streamed
    # as it ended got INTERNAL "Internal error from Core" (grpc aio's write hid the service's status).
    from tests.conftest import wait_for
    from tests.fakes import FakeSTT, loud, quiet

    h = await start_harness(FakeLLM(reply="Hello there."), stt=FakeSTT(texts=["Hi."]))
    argv = ["--server", f"127.0.0.1:{h.running.port}", "--no-play"]
    if mode == "audio file":  # (speech after 4 s: the shutdown comes in the silence before it)
        argv += ["--audio-file", str(write_mic_wav(tmp_path / "q.wav", quiet(4000) + loud(700) + quiet(300)))]
    else:
        argv += ["--out", str(tmp_path / "reply.wav")]
    process = await open_cli(*argv)
    try:
        assert process.stdin is not None
        if mode == "interactive":
            process.stdin.write(b"Hi?\n")  # (and the terminal stays open: no Ctrl-D)
            await process.stdin.drain()
            await wait_for(lambda: len(h.llm.requests) == 1, 20)
        await wait_for(lambda: h.running.servicer.active_streams == 1, 20)
        await asyncio.sleep(1.0)  # (a WAV's audio flows meanwhile, 50 messages a second)
        await h.running.stop(grace_s=10)
        await asyncio.wait_for(process.wait(), 30)  # it ends by itself
        _, err = await process.communicate()
        stderr = err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
        await stop_harness(h)
    assert process.returncode == 1, stderr
    session = re.search(r"\[session ([A-Za-z0-9_-]+):", stderr)
    assert session is not None, stderr
    assert "error: the service ended the stream: the server is shutting down" in stderr, stderr
    assert f"run again with --session {session[1]}" in stderr, stderr
    assert "INTERNAL" not in stderr and "cannot reach" not in stderr, stderr


async def test_an_interactive_stream_closed_as_idle_ends_the_program_at_once_naming_the_session() -> None:
    # Found using it: the program went on waiting for a line the user would never send to a stream
    # that was over (until they pressed Enter), and said nothing of the session to go on with.
    from service.core.outbox import OutboxLimits
    from service.core.settings import SessionDefaults

    h = await start_harness(
        FakeLLM(reply="Hello there."),
        defaults=SessionDefaults(idle_timeout_s=1.5, outbox=OutboxLimits(max_message_ms=100)),
    )
    process = await open_cli("--server", f"127.0.0.1:{h.running.port}", "--no-play", "--json")
    try:
        assert process.stdin is not None
        process.stdin.write(b"Hi?\n")  # (and the terminal stays open)
        await process.stdin.drain()
        await asyncio.wait_for(process.wait(), 30)  # closed as idle 1.5 s after the reply
        out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
        await stop_harness(h)
    stderr = err.decode()
    session = json.loads(out.decode().splitlines()[0])["sessionStarted"]["sessionId"]
    assert process.returncode == 1, stderr
    assert "error: the service ended the stream with DEADLINE_EXCEEDED: no message for 1.5 s" in stderr, stderr
    assert f"run again with --session {session}" in stderr, stderr


async def test_a_service_that_accepted_the_stream_is_quoted_not_taken_for_unreachable(tmp_path: Path) -> None:
    # Found in a QA pass: with the session store out of reach, the service accepted the stream and
    # ended it UNAVAILABLE, saying why; the CLI said "cannot reach Parley: is the service running?".
    from service.errors import StoreUnavailable
    from service.stores.memory import MemoryStore

    class Unreachable(MemoryStore):
        async def create(self, session: object) -> object:  # type: ignore[override]
            raise StoreUnavailable("the session store (Redis at redis://db:6379/0) is unavailable: Timeout")

    h = await start_harness(FakeLLM(), store=Unreachable(ttl_s=60))
    try:
        code, _, stderr = await run_cli("--server", f"127.0.0.1:{h.running.port}", "--no-play", "Hi?")
    finally:
        await stop_harness(h)
    assert code == 1
    assert stderr.strip() == (
        "error: the service ended the stream: the session store (Redis at redis://db:6379/0) is unavailable: Timeout"
    )


async def test_a_refused_message_names_the_session_to_go_on_with_and_a_lost_session_does_not(
    harness: Harness,
) -> None:
    # Found in a QA pass: a line over the service's limit ended an interactive conversation without
    # naming its session (which the service keeps); and after "the session store lost session ...;
    # start a new session" the CLI told the user to run again with that session, which is gone.
    import argparse

    import grpc

    process = await open_cli("--server", f"127.0.0.1:{harness.running.port}", "--no-play")
    out, err = await asyncio.wait_for(process.communicate(b"Hi?\n" + b"x" * 5000 + b"\n"), 30)
    stderr = err.decode()
    session = re.search(r"\[session ([A-Za-z0-9_-]+):", stderr)
    assert process.returncode == 1 and session is not None, stderr
    assert "error: the service rejected the request: user_text.text is 5000 characters" in stderr, stderr
    assert f"run again with --session {session[1]}" in stderr, stderr

    from clients.cli import explain

    lost = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="the session store lost session abc (it expired there, or the store restarted); start a new session",
    )
    said = await explain(lost, argparse.Namespace(server="x:1", session="", token=""), "abc", accepted=True)
    assert said.startswith("the service ended the stream: the session store lost session abc")
    assert "--session" not in said


async def test_ctrl_c_before_a_silent_service_starts_the_session_ends_the_program() -> None:
    # Found in a QA pass: against a service that never answered (a stopped process), Ctrl-C said
    # "press Ctrl-D to quit", and Ctrl-D did nothing: lines are read only once the session started.
    import signal

    import grpc

    async def never_answers(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.sleep(3600)
        yield b""

    server, port = await serve_converse(never_answers)
    process = await open_cli("--server", f"127.0.0.1:{port}", "--no-play")
    try:
        await asyncio.sleep(3)  # (it waits for the session)
        assert process.returncode is None
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 10)
        _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
        await server.stop(0)
    assert process.returncode == 1
    assert "error: gave up: the service at 127.0.0.1" in err.decode() and "has not started the session" in err.decode()
