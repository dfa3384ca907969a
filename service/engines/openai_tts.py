"""TTS engine ``openai``: the speech API (or a compatible server), streamed as 24 kHz PCM.

Each segment is one ``audio.speech`` request with ``response_format="pcm"`` (mono 16-bit at 24 kHz);
audio is forwarded chunk by chunk as it arrives, not after the whole segment. Errors before the
segment's first audio are retried; a response that stalls is cancelled; closing the stream closes the
HTTP response at once.
"""

from __future__ import annotations

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
            async with self._client.audio.speech.with_streaming_response.create(**arguments) as response:
                # iter_bytes() with no size hands over bytes as they arrive.
                async for data in stall_guard(response.iter_bytes(), options.stall_timeout_s, self._stalled):
                    if data:
                        yield Audio(data, _PCM_RATE_HZ)
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
