"""LLM engine ``openai``: streamed chat completions from the OpenAI API or any compatible server.

Uses the official ``openai`` package (async client). Token deltas flow into the pipeline as they
arrive; usage, when the server reports it, is yielded last. Errors before the first token are retried
(see :mod:`service.engines.retry`); a stream that sends nothing for ``stall_timeout_s`` is cancelled.
Closing the stream closes the HTTP response at once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from service.core.engine import LLMRequest, LLMUsage, chat_content
from service.engines.openai_client import OpenAIConnection, engine_error, make_client
from service.engines.retry import RetryPolicy, retrying, stall_guard
from service.errors import EngineError, LLMError

__all__ = ["OpenAILLM", "OpenAILLMOptions"]


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
        try:
            stream = await self._client.chat.completions.create(**arguments)
        except Exception as error:
            raise self._error(error) from error
        try:
            usage: LLMUsage | None = None
            async for chunk in stall_guard(stream, options.stall_timeout_s, self._stalled):
                if chunk.usage is not None:
                    usage = LLMUsage(chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
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
