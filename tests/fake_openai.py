"""A fake OpenAI server: a real HTTP/1.1 server on 127.0.0.1 speaking OpenAI's wire formats.

Chat completions stream as server-sent events (``data: {...}`` chunks ending in ``data: [DONE]``),
speech streams as chunked raw PCM (24 kHz, 16-bit mono), transcriptions take a multipart form (the
audio ``file``, ``model``, ``language``, ``response_format``) and answer ``{"text": ...}`` (or the
plain text for ``response_format=text``), errors come as OpenAI's JSON error bodies with their
status codes and ``Retry-After``. The real ``openai`` client talks to it through its base URL. It
records every request (path, headers, JSON body or form fields, uploaded files) and how each
response ended: ``completed``, ``disconnected`` (the client closed the connection before the end) or
``failed`` (injected).

Tell it what to do next with :meth:`FakeOpenAI.plan_chat` / :meth:`FakeOpenAI.plan_speech` /
:meth:`FakeOpenAI.plan_transcription`; each plan is used by one request, and requests without a
plan get a normal answer.
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import json
import math
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "sk-test-fake-key-0123456789"
PCM_RATE = 24000


@dataclass
class Plan:
    """What the fake server does with one request."""

    status: int = 200
    error_message: str = "injected failure"
    retry_after: str | None = None
    hang_up: bool = False
    """Close the connection without answering (a connection error)."""
    tokens: list[str] | None = None
    """Chat: the reply's content deltas (default: a fixed two-sentence reply)."""
    chunk_delay_s: float = 0.0
    """Wait before each chunk after the first."""
    first_delay_s: float = 0.0
    stall_after: int | None = None
    """Send this many chunks, then nothing (the connection stays open). Transcription: 0 sends no
    status line either (a server that never answers)."""
    drop_after: int | None = None
    """Send this many chunks, then close the connection mid-body."""
    malformed_after: int | None = None
    """Chat: send this many chunks, then a ``data:`` line that is not JSON. Transcription: answer
    JSON cut short."""
    usage: bool = True
    """Chat: send usage when the client asks for it."""
    audio_ms: int = 1200
    """Speech: how much audio to send."""
    audio_chunk_ms: int = 100
    text: str = "Hello from the fake transcriber."
    """Transcription: what was heard. Its answer is sent in chunks of ``answer_chunk`` bytes, paced
    (and stalled or dropped) like the other streams."""
    answer_chunk: int = 1 << 20
    content_type: str | None = None
    """Chat, speech: answer with this content type instead of the right one."""
    body: bytes | None = None
    """Chat, speech: answer this body (with ``content_type``) instead of a stream."""
    endless: bytes | None = None
    """Answer ``endless_prefix``, then this block over and over until the client leaves (a broken
    server: a line or a JSON answer that never ends)."""
    endless_prefix: bytes = b""
    no_answer: bool = False
    """Send no status line and no headers: wait until the client leaves."""
    finish: bool = True
    """Chat: end with a ``finish_reason`` chunk and ``[DONE]`` (False: the body just ends)."""
    usage_choices: list[Any] | None = field(default_factory=list)
    """Chat: the usage chunk's ``choices`` (None: sent as null)."""


@dataclass(frozen=True)
class Upload:
    """A file sent in a multipart form."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class Recorded:
    """One request the fake server received, and how its response ended."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    """The JSON body, or a form's fields other than files."""
    files: dict[str, Upload] = field(default_factory=dict)
    """A form's files, by field name."""
    outcome: str = "pending"
    chunks_sent: int = 0
    ended_at: float = 0.0


DEFAULT_REPLY = ["Hello", " there", ",", " friend", ".", " This", " is", " the", " fake", " model", " talking", "."]


@dataclass
class FakeOpenAI:
    """Start with :meth:`start`, stop with :meth:`stop`."""

    requests: list[Recorded] = field(default_factory=list)
    _chat: collections.deque[Plan] = field(default_factory=collections.deque)
    _speech: collections.deque[Plan] = field(default_factory=collections.deque)
    _transcription: collections.deque[Plan] = field(default_factory=collections.deque)
    _server: ThreadingHTTPServer | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def plan_chat(self, *plans: Plan) -> None:
        self._chat.extend(plans)

    def plan_speech(self, *plans: Plan) -> None:
        self._speech.extend(plans)

    def plan_transcription(self, *plans: Plan) -> None:
        self._transcription.extend(plans)

    def of(self, path_end: str) -> list[Recorded]:
        """The recorded requests whose path ends with ``path_end``."""
        return [r for r in self.requests if r.path.endswith(path_end)]

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def next_plan(self, path: str) -> Plan:
        if path.endswith("/chat/completions"):
            queue = self._chat
        elif path.endswith("/audio/transcriptions"):
            queue = self._transcription
        else:
            queue = self._speech
        try:
            return queue.popleft()
        except IndexError:
            return Plan()


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet in tests
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        content_type = self.headers.get("Content-Type", "")
        files: dict[str, Upload] = {}
        if content_type.startswith("multipart/form-data"):
            body, files = _form(content_type, data)
        else:
            body = json.loads(data or b"{}")
        record = Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body, files)
        self.owner.requests.append(record)
        plan = self.owner.next_plan(self.path)
        try:
            self._answer(record, plan)
            if record.outcome == "pending":
                record.outcome = "completed"
        except _ClientGone:
            record.outcome = "disconnected"
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            record.outcome = "disconnected"
            self.close_connection = True
        record.ended_at = time.monotonic()

    def _answer(self, record: Recorded, plan: Plan) -> None:
        if plan.hang_up:
            record.outcome = "failed"
            self.close_connection = True
            return
        if record.headers.get("authorization") != f"Bearer {API_KEY}":
            return self._error(401, f"Incorrect API key provided: {record.headers.get('authorization', '')[7:]}.")
        if plan.status != 200:
            record.outcome = "failed"
            return self._error(plan.status, plan.error_message, plan.retry_after)
        if plan.no_answer:
            self._wait_for_client_to_leave(30.0)
            raise _ClientGone
        if plan.endless is not None:
            self._start_stream(plan.content_type or "application/json")
            self._send_chunk(record, plan.endless_prefix)
            while not self.owner._stopping.is_set():
                self._send_chunk(record, plan.endless)  # (until the client leaves: a broken pipe)
            raise _ClientGone
        if plan.body is not None:
            self._start_stream(plan.content_type or "text/html")
            self._send_chunk(record, plan.body)
            self._end_stream()
            return None
        if self.path.endswith("/chat/completions"):
            return self._chat(record, plan)
        if self.path.endswith("/audio/speech"):
            return self._speech(record, plan)
        if self.path.endswith("/audio/transcriptions"):
            return self._transcription(record, plan)
        return self._error(404, f"no route {self.path}")

    def _error(self, status: int, message: str, retry_after: str | None = None) -> None:
        kinds = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
        payload = json.dumps(
            {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": None, "code": None}}
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _send_chunk(self, record: Recorded, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
        record.chunks_sent += 1

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _pace(self, record: Recorded, plan: Plan, index: int) -> None:
        """Wait before chunk ``index``; stall, drop or notice a client that left, as planned."""
        if plan.stall_after is not None and index >= plan.stall_after:
            self._wait_for_client_to_leave(30.0)
            raise _ClientGone
        if plan.drop_after is not None and index >= plan.drop_after:
            record.outcome = "failed"
            self.connection.shutdown(socket.SHUT_RDWR)
            raise _ClientGone
        delay = plan.first_delay_s if index == 0 else plan.chunk_delay_s
        if delay and self._wait_for_client_to_leave(delay):
            raise _ClientGone

    def _wait_for_client_to_leave(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the client closes its side."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self.owner._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                return True
        return False

    def _chat(self, record: Recorded, plan: Plan) -> None:
        model = record.body.get("model", "")
        tokens = plan.tokens if plan.tokens is not None else DEFAULT_REPLY
        self._start_stream(plan.content_type or "text/event-stream; charset=utf-8")
        for index, token in enumerate(tokens):
            self._pace(record, plan, index)
            if plan.malformed_after is not None and index >= plan.malformed_after:
                record.outcome = "failed"
                self._send_chunk(record, b'data: {"id": "chatcmpl-1", "choices": [{"delta": {"content": "oops"\n\n')
                self._end_stream()
                return
            delta: dict[str, Any] = {"content": token}
            if index == 0:
                delta["role"] = "assistant"
            self._send_event(record, _chunk(model, [{"index": 0, "delta": delta, "finish_reason": None}]))
        if not plan.finish:
            self._end_stream()
            return
        self._send_event(record, _chunk(model, [{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if plan.usage and (record.body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 42, "completion_tokens": len(tokens), "total_tokens": 42 + len(tokens)}
            self._send_event(record, _chunk(model, plan.usage_choices, usage))  # type: ignore[arg-type]
        self._send_chunk(record, b"data: [DONE]\n\n")
        self._end_stream()

    def _send_event(self, record: Recorded, payload: dict[str, Any]) -> None:
        self._send_chunk(record, b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _speech(self, record: Recorded, plan: Plan) -> None:
        samples = PCM_RATE * plan.audio_ms // 1000
        per_chunk = PCM_RATE * plan.audio_chunk_ms // 1000
        self._start_stream(plan.content_type or "audio/pcm")
        for index, start in enumerate(range(0, samples, per_chunk)):
            self._pace(record, plan, index)
            self._send_chunk(record, _tone(start, min(per_chunk, samples - start)))
        self._end_stream()

    def _transcription(self, record: Recorded, plan: Plan) -> None:
        """As OpenAI answers: the checks it makes on the form, then the text as JSON or plain text."""
        form = record.body
        upload = record.files.get("file")
        if upload is None:
            return self._error(400, "Could not parse multipart form: no 'file'")
        if not form.get("model"):
            return self._error(400, "you must provide a model parameter")
        if upload.data[:4] != b"RIFF" or upload.data[8:12] != b"WAVE":
            return self._error(400, "Invalid file format. Supported formats: ['flac', 'mp3', 'wav', ...]")
        language = form.get("language")
        if language is not None and not (len(language) == 2 and language.isalpha() and language.islower()):
            return self._error(
                400, f"Invalid language '{language}'. Language parameter must be specified in ISO-639-1 format."
            )
        response_format = form.get("response_format", "json")
        if plan.malformed_after is not None:
            payload, content_type = b'{"text": "cut sh', "application/json"
        elif response_format == "json":
            payload, content_type = json.dumps({"text": plan.text}).encode(), "application/json"
        elif response_format == "text":
            payload, content_type = (plan.text + "\n").encode(), "text/plain; charset=utf-8"
        else:
            return self._error(400, f"response_format '{response_format}' is not supported by this fake")
        if plan.stall_after == 0:  # the server never answers: no status, no headers
            self._wait_for_client_to_leave(30.0)
            raise _ClientGone
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.flush()
        for index, start in enumerate(range(0, len(payload), plan.answer_chunk)):
            self._pace(record, plan, index)
            self.wfile.write(payload[start : start + plan.answer_chunk])
            self.wfile.flush()
            record.chunks_sent += 1


def _form(content_type: str, data: bytes) -> tuple[dict[str, Any], dict[str, Upload]]:
    """A multipart/form-data body's fields and files."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data
    )
    fields: dict[str, Any] = {}
    files: dict[str, Upload] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(payload, bytes), part
        filename = part.get_filename()
        if filename is not None:
            files[name] = Upload(filename, part.get_content_type(), payload)
        else:
            fields[name] = payload.decode()
    return fields, files


def _chunk(model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def _tone(start: int, count: int) -> bytes:
    """A 220 Hz tone at half scale: audible, so tests can tell audio from silence."""
    return b"".join(
        int(16000 * math.sin(2 * math.pi * 220 * (start + i) / PCM_RATE)).to_bytes(2, "little", signed=True)
        for i in range(count)
    )
