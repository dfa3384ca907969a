"""LLM engine ``openai``: streamed chat completions from the OpenAI API or any compatible server.

Uses the official ``openai`` package (async client). Token deltas flow into the pipeline as they
arrive; usage, when the server reports it, is yielded last. Errors before the first token are retried
(see :mod:`service.engines.retry`); a server that sends nothing for ``stall_timeout_s`` (its answer's
headers, or the next chunk) is given up on. What is not a whole event stream fails the turn: another
content type (a web page, a JSON answer from a server that does not stream), a line over
:data:`~service.engines.openai_client.MAX_EVENT_LINE_BYTES`, a stream that ends without a
``finish_reason``. A server that ignores ``max_tokens`` is cut after that many chunks.
Closing the stream closes the HTTP response at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from service.core.engine import LLMRequest, LLMUsage, chat_content
from service.engines.openai_client import OpenAIConnection, bound_event_lines, engine_error, make_client
from service.engines.retry import RetryPolicy, retrying, stall_guard
from service.errors import EngineError, LLMError

__all__ = ["OpenAILLM", "OpenAILLMOptions"]

log = logging.getLogger(__name__)

CHUNKS_PER_TOKEN = 4
CHUNKS_BEYOND_MAX_TOKENS = 16
"""A reply is read for at most ``CHUNKS_PER_TOKEN`` chunks per token of ``max_tokens`` and these (its
role, its end, its usage; a gateway may stream a token a character at a time): a server that ignores
``max_tokens`` (or sends chunks without text for ever) is cut there."""
HOLD_LOOP_S = 0.004
"""Chunks that arrived together are read without a pause for at most this long: a burst of hundreds
in one network read would otherwise hold the event loop for tens of milliseconds."""


@dataclass(frozen=True)
class OpenAILLMOptions:
    """Which model to ask, and how patiently."""

    model: str = "gpt-4o-mini"
    stall_timeout_s: float = 15.0
    retry: RetryPolicy = RetryPolicy()
    stream_usage: bool = True
    """Ask for usage in the stream (``stream_options.include_usage``); some servers reject it."""


class OpenAILLM:
    """Streams replies through the chat completions API."""

    def __init__(self, connection: OpenAIConnection, options: OpenAILLMOptions) -> None:
        self._connection = connection
        self._options = options
        self._client = make_client(connection)
        self.name = f"openai/{options.model}"

    def stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        """Yield the reply's deltas, then its usage. Safe to cancel: the HTTP response is closed."""
        return retrying(lambda: self._attempt(request), self._options.retry, f"LLM request to {self.name}", "llm")

    async def aclose(self) -> None:
        await self._client.close()

    async def _attempt(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        options = self._options
        arguments: dict[str, Any] = {
            "model": options.model,
            "messages": [{"role": m.role, "content": chat_content(m)} for m in request.messages],
            "temperature": request.temperature,
            "stream": True,
        }
        # OpenAI's newer models accept only max_completion_tokens; compatible servers know max_tokens.
        arguments["max_completion_tokens" if self._connection.is_openai else "max_tokens"] = request.max_tokens
        if options.stream_usage:
            arguments["stream_options"] = {"include_usage": True}
        # Uncompressed: the bound on a line of the event stream counts the bytes received.
        arguments["extra_headers"] = {"Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(options.stall_timeout_s):  # (the answer's headers, too, are awaited so long)
                stream = await self._client.chat.completions.create(**arguments)
        except TimeoutError:
            raise self._stalled() from None
        except Exception as error:
            raise self._error(error) from error
        try:
            content_type = stream.response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                raise LLMError(
                    f"{self._connection.server_name} answered with {content_type or 'no content type'}, not an "
                    "event stream: is it an OpenAI-compatible server, at its /v1 address?"
                )
            bound_event_lines(stream.response)
            usage: LLMUsage | None = None
            finished = False
            chunks = 0  # (see CHUNKS_PER_TOKEN)
            resumed = time.monotonic()
            async for chunk in stall_guard(stream, options.stall_timeout_s, self._stalled):
                chunks += 1
                if chunks > CHUNKS_PER_TOKEN * request.max_tokens + CHUNKS_BEYOND_MAX_TOKENS:
                    log.warning(
                        "%s sent more than max_tokens (%d) chunks; the reply was cut there",
                        self._connection.server_name,
                        request.max_tokens,
                    )
                    return
                if chunk.usage is not None:
                    usage = LLMUsage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
                for choice in chunk.choices or ():  # (a usage chunk may have none, or null)
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
                    finished = finished or choice.finish_reason is not None
                if time.monotonic() - resumed > HOLD_LOOP_S:  # (chunks that came together are read at once)
                    await asyncio.sleep(0)
                    resumed = time.monotonic()
            if not finished:
                raise LLMError(
                    f"{self._connection.server_name}'s reply stream ended before the reply did (no finish_reason)",
                    retryable=True,
                )
            if usage is not None:
                yield usage
        except EngineError:
            raise
        except Exception as error:
            raise self._error(error) from error
        finally:
            await stream.close()

    def _stalled(self) -> EngineError:
        return LLMError(
            f"{self._connection.server_name} sent nothing for {self._options.stall_timeout_s:g} s; "
            "the request was cancelled",
            retryable=True,
        )

    def _error(self, error: Exception) -> EngineError:
        return engine_error(error, LLMError, self._connection, self._options.model)
