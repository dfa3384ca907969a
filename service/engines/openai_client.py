"""The OpenAI client both OpenAI engines share, and the one place its errors become Parley's.

Works against the OpenAI API and any server that speaks its formats (vLLM, Ollama, llama.cpp's
server, LM Studio) through ``base_url``. The client's own retries are off: the engines retry through
:mod:`service.engines.retry`, which knows whether audio already went out.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import openai

from service.errors import EngineError

__all__ = ["MAX_EVENT_LINE_BYTES", "OpenAIConnection", "bound_event_lines", "engine_error", "make_client"]

MAX_EVENT_LINE_BYTES = 1 << 20
"""Longest line of an event stream read (a chunk of a reply is a few hundred bytes): the client
library's decoder keeps a line until it ends, however long."""

_DEFAULT_HOST = "api.openai.com"
_SECRET = re.compile(r"\b(sk-[A-Za-z0-9_*\-]{4})[A-Za-z0-9_*\-]+")


@dataclass(frozen=True)
class OpenAIConnection:
    """Where the OpenAI-compatible server is and how to talk to it."""

    api_key: str = field(repr=False)
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    timeout_s: float = 30.0
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_openai(self) -> bool:
        """The server is OpenAI's own API (not a compatible server)."""
        return self.base_url is None or _DEFAULT_HOST in self.base_url

    @property
    def server_name(self) -> str:
        """How errors name the server (without any user or password in its URL)."""
        if self.is_openai or self.base_url is None:
            return "the OpenAI API"
        parts = urlsplit(self.base_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"the server at {urlunsplit(parts._replace(netloc=host))}"


def make_client(connection: OpenAIConnection) -> openai.AsyncOpenAI:
    """An async client with no retries of its own."""
    return openai.AsyncOpenAI(
        api_key=connection.api_key,
        base_url=connection.base_url,
        organization=connection.organization,
        project=connection.project,
        timeout=httpx2.Timeout(connection.timeout_s, connect=min(connection.timeout_s, 10.0)),
        max_retries=0,
        default_headers=connection.extra_headers or None,
    )


class _BoundedLines(httpx2.AsyncByteStream):
    """A response body whose lines may be at most ``limit`` bytes long."""

    def __init__(self, body: httpx2.AsyncByteStream, limit: int) -> None:
        self._body = body
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        run = 0  # bytes since the last line's end
        async for data in self._body:
            end = max(data.rfind(b"\n"), data.rfind(b"\r"))  # (a line may end with either)
            run = run + len(data) if end < 0 else len(data) - end - 1
            if run > self._limit:
                raise ValueError(f"a line of its event stream is over {self._limit} bytes long")
            yield data

    async def aclose(self) -> None:
        await self._body.aclose()


def bound_event_lines(response: httpx2.Response, limit: int = MAX_EVENT_LINE_BYTES) -> None:
    """Make reading ``response`` (an event stream, not yet read) fail on a line over ``limit`` bytes,
    instead of keeping all of it: a broken server's endless line would otherwise take memory at the
    speed of the network until the stall timeout."""
    assert isinstance(response.stream, httpx2.AsyncByteStream)
    response.stream = _BoundedLines(response.stream, limit)


def engine_error(error: Exception, kind: type[EngineError], connection: OpenAIConnection, model: str) -> EngineError:
    """Turn an ``openai``/``httpx2`` error into ``kind`` with a message that names the cause and no secret."""
    server = connection.server_name
    if isinstance(error, openai.APIStatusError):
        # The provider's words go to the client only: an error body may quote the request.
        status = error.status_code
        detail = _redact(_detail(error), connection.api_key)[:300]
        retry_after = _retry_after_s(error.response.headers)

        def said(message: str, **options: Any) -> EngineError:
            return kind(f"{message}: {detail}" if detail else message, for_logs=message, **options)

        if status == 401:
            return said(f"{server} rejected the API key (401): check OPENAI_API_KEY")
        if status == 403:
            return said(f"{server} refused access (403) to model {model!r}")
        if status == 404:
            return said(f"{server} does not know model {model!r} (404)")
        if status == 429:
            return said(f"{server} is rate limiting (429)", retryable=True, retry_after_s=retry_after)
        if status >= 500:
            return said(f"{server} failed ({status})", retryable=True, retry_after_s=retry_after)
        return said(f"{server} rejected the request ({status})")
    if isinstance(error, openai.APITimeoutError):
        return kind(f"{server} did not answer within {connection.timeout_s:g} s", retryable=True)
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        text = _redact(str(cause), connection.api_key)
        if connection.base_url:
            text = text.replace(connection.base_url, server.removeprefix("the server at "))
        return kind(f"cannot reach {server}: {type(cause).__name__}: {text}".rstrip(": "), retryable=True)
    if isinstance(error, (httpx2.TransportError, httpx2.StreamError)):
        return kind(f"the connection to {server} broke: {type(error).__name__}", retryable=True)
    text = _redact(str(error), connection.api_key)[:200]  # (a parser's message may quote what it read)
    plain = f"{server} sent data Parley cannot read: {type(error).__name__}"
    return kind(f"{plain}: {text}", for_logs=plain)


def _detail(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if message:
            return str(message)
    return str(error.message)


def _redact(text: str, api_key: str) -> str:
    if api_key and len(api_key) >= 8:
        text = text.replace(api_key, "***")
    return _SECRET.sub(r"\1***", text)


def _retry_after_s(headers: httpx2.Headers) -> float | None:
    """The wait a server asked for in Retry-After-Ms or Retry-After (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
