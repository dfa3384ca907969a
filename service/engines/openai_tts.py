"""TTS engine ``openai``: the speech API (or a compatible server), streamed as 24 kHz PCM.

Each segment is one ``audio.speech`` request with ``response_format="pcm"`` (mono 16-bit at 24 kHz);
audio is forwarded chunk by chunk as it arrives, not after the whole segment. Errors before the
segment's first audio are retried (an answer with no audio too); a server that sends nothing for
``stall_timeout_s`` (its answer's headers, or the next audio) is given up on; an answer of another
content type (an error page, MP3 or WAV) fails the segment; closing the stream closes the HTTP
response at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from service.core.engine import Audio, Voice
from service.engines.openai_client import OpenAIConnection, engine_error, make_client
from service.engines.openai_voices import OPENAI_VOICES
from service.engines.retry import RetryPolicy, retrying, stall_guard
from service.errors import EngineError, TTSError

__all__ = ["OPENAI_VOICES", "OpenAITTS", "OpenAITTSOptions"]

_PCM_RATE_HZ = 24000

NOT_RAW_PCM = re.compile(
    r"text/|application/(json|xml|problem)|audio/(mpeg|mp3|wav|x-wav|wave|vnd\.wave|ogg|opus|aac|flac|webm|mp4)"
)
"""Content types that are not the raw PCM asked for: an error page or body, or a compressed or
contained format from a server that ignores ``response_format`` (any other type, or none, is taken
as raw PCM: servers name it ``audio/pcm``, ``audio/L16``, ``application/octet-stream``...)."""


@dataclass(frozen=True)
class OpenAITTSOptions:
    """Which model and voices, and how to speak."""

    model: str = "gpt-4o-mini-tts"
    voice: str = "alloy"
    voices: tuple[str, ...] = OPENAI_VOICES
    speed: float = 1.0
    instructions: str = ""
    """How to speak (tone, pace); only models that support it (gpt-4o-mini-tts) get it."""
    stall_timeout_s: float = 15.0
    retry: RetryPolicy = RetryPolicy()


class OpenAITTS:
    """Speaks through the speech API."""

    name = "openai"

    def __init__(self, connection: OpenAIConnection, options: OpenAITTSOptions) -> None:
        self._connection = connection
        self._options = options
        self._voices = tuple(dict.fromkeys((options.voice, *options.voices)))
        self._client = make_client(connection)

    @property
    def default_voice(self) -> str:
        return self._options.voice

    def voices(self) -> list[Voice]:
        return [Voice(voice, "multilingual", _PCM_RATE_HZ, self.name) for voice in self._voices]

    def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
        """Yield ``text`` spoken, as the server streams it. Safe to cancel: the response is closed."""
        return retrying(lambda: self._attempt(text, voice), self._options.retry, f"speech request ({voice})", "tts")

    async def aclose(self) -> None:
        await self._client.close()

    async def _attempt(self, text: str, voice: str) -> AsyncGenerator[Audio, None]:
        options = self._options
        arguments: dict[str, Any] = {
            "model": options.model,
            "voice": voice,
            "input": text,
            "response_format": "pcm",
            "speed": options.speed,
        }
        if options.instructions and "tts-1" not in options.model:
            arguments["instructions"] = options.instructions
        try:
            async with contextlib.AsyncExitStack() as stack:
                request = self._client.audio.speech.with_streaming_response.create(**arguments)
                try:
                    async with asyncio.timeout(options.stall_timeout_s):  # (its headers are awaited so long)
                        response = await stack.enter_async_context(request)
                except TimeoutError:
                    raise self._stalled() from None
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if NOT_RAW_PCM.match(content_type):
                    raise TTSError(
                        f"{self._connection.server_name} answered with {content_type or 'no content type'}, not raw "
                        "PCM (response_format pcm): a server that cannot send pcm cannot be Parley's TTS"
                    )
                received = 0
                # iter_bytes() with no size hands over bytes as they arrive.
                async for data in stall_guard(response.iter_bytes(), options.stall_timeout_s, self._stalled):
                    if data:
                        received += len(data)
                        yield Audio(data, _PCM_RATE_HZ)
                if not received and any(c.isalnum() for c in text):  # (a lone "…" may well sound of nothing)
                    raise TTSError(f"{self._connection.server_name} sent no audio for {text!r:.60}", retryable=True)
        except EngineError:
            raise
        except Exception as error:
            raise engine_error(error, TTSError, self._connection, options.model) from error

    def _stalled(self) -> EngineError:
        return TTSError(
            f"{self._connection.server_name} sent no audio for {self._options.stall_timeout_s:g} s; "
            "the request was cancelled",
            retryable=True,
        )
