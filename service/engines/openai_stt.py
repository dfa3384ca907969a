"""STT engine ``openai``: the transcriptions API of OpenAI or of a compatible server.

Each utterance is one ``POST /v1/audio/transcriptions``: a multipart form with the audio as a WAV file
(16 kHz mono PCM16), the model, the language when one is given, and ``response_format=json``; the
answer is ``{"text": ...}``. A failure (429, 5xx, a lost connection, a stall) is retried as the other
openai engines retry; a server that sends nothing for ``stall_timeout_s``, before its answer or in
the middle of it, is given up on, as is an answer over :data:`MAX_ANSWER_BYTES` or one that takes
longer than the connection's timeout to arrive. Cancelling closes the HTTP request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import wave
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from service.core.engine import Transcription
from service.engines.openai_client import OpenAIConnection, engine_error, make_client
from service.engines.retry import RetryPolicy, retrying, stall_guard
from service.errors import EngineError, STTError

__all__ = ["OpenAISTT", "OpenAISTTOptions", "wav"]

_RATE_HZ = 16000

MAX_ANSWER_BYTES = 1 << 20
"""Longest answer read (a transcription's JSON is a few kilobytes): more fails the utterance."""


@dataclass(frozen=True)
class OpenAISTTOptions:
    """Which model to ask, and how patiently."""

    model: str = "gpt-4o-mini-transcribe"
    """OpenAI's transcription model; compatible servers mostly call theirs ``whisper-1``."""
    language: str | None = None
    """The language when a call names none (an ISO-639-1 code such as ``en``). None: the server detects it."""
    stall_timeout_s: float = 15.0
    retry: RetryPolicy = RetryPolicy()


def wav(pcm: bytes, sample_rate_hz: int = _RATE_HZ) -> bytes:
    """Mono PCM16 as a WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sample_rate_hz)
        file.writeframes(pcm)
    return out.getvalue()


class OpenAISTT:
    """Transcribes utterances through the transcriptions API."""

    def __init__(self, connection: OpenAIConnection, options: OpenAISTTOptions) -> None:
        if options.language and (problem := self.language_problem(options.language)) is not None:
            raise STTError(f"PARLEY_STT_LANGUAGE: {problem}")  # (said at start, as Whisper's is)
        self._connection = connection
        self._options = options
        self._client = make_client(connection)
        self.name = f"openai/{options.model}"

    @property
    def sample_rate_hz(self) -> int:
        return _RATE_HZ

    def language_problem(self, language: str) -> str | None:
        # (Only its shape: which codes the server knows, it alone says. OpenAI asks for ISO-639-1; some
        # compatible servers take ISO-639-3 too.)
        if 2 <= len(language) <= 3 and language.isascii() and language.isalpha():
            return None
        return f"{language!r} is not a language code; use one such as 'en' or 'fr' (ISO-639-1; not 'en-US')"

    async def transcribe(self, pcm: bytes, language: str | None = None) -> Transcription:
        """Transcribe mono PCM16 at 16 kHz. Safe to cancel: the request is closed."""
        if len(pcm) % 2:
            raise STTError(f"PCM16 audio has an even number of bytes, not {len(pcm)}")
        language = (language or self._options.language or "").lower() or None  # (as Whisper takes "EN")
        if not pcm:
            return Transcription("", language or "", 1.0)  # nothing to send: no speech, surely
        attempts = retrying(
            lambda: self._attempt(pcm, language), self._options.retry, f"transcription ({self.name})", "stt"
        )
        async with contextlib.aclosing(attempts):
            async for transcription in attempts:
                return transcription
        raise STTError(f"{self._connection.server_name} sent no transcription")  # pragma: no cover

    async def aclose(self) -> None:
        await self._client.close()

    async def _attempt(self, pcm: bytes, language: str | None) -> AsyncGenerator[Transcription, None]:
        """One request; yields its transcription (an async generator, for :func:`retrying`)."""
        options = self._options
        arguments: dict[str, Any] = {
            "file": ("utterance.wav", wav(pcm), "audio/wav"),
            "model": options.model,
            "response_format": "json",
        }
        if language:
            arguments["language"] = language
        try:
            request = self._client.audio.transcriptions.with_streaming_response.create(**arguments)
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(options.stall_timeout_s):
                        response = await stack.enter_async_context(request)
                except TimeoutError:
                    raise self._stalled() from None
                parts, size = [], 0
                try:
                    async with asyncio.timeout(self._connection.timeout_s):  # (a trickle is not an answer)
                        async for data in stall_guard(response.iter_bytes(), options.stall_timeout_s, self._stalled):
                            size += len(data)
                            if size > MAX_ANSWER_BYTES:
                                raise STTError(
                                    f"{self._connection.server_name} answered a transcription with over "
                                    f"{MAX_ANSWER_BYTES} bytes"
                                )
                            parts.append(data)
                except TimeoutError:
                    raise STTError(
                        f"{self._connection.server_name} did not finish its answer within "
                        f"{self._connection.timeout_s:g} s",
                        retryable=True,
                    ) from None
                body = b"".join(parts)
            answer = json.loads(body)
            text = answer["text"]
            if not isinstance(text, str):
                raise ValueError(f"'text' is {type(text).__name__}, not a string")
        except EngineError:
            raise
        except Exception as error:
            raise engine_error(error, STTError, self._connection, options.model) from error
        yield Transcription(text.strip(), language or _language_code(answer.get("language")))

    def _stalled(self) -> EngineError:
        return STTError(
            f"{self._connection.server_name} sent nothing for {self._options.stall_timeout_s:g} s; "
            "the request was cancelled",
            retryable=True,
        )


def _language_code(language: object) -> str:
    """The language a server reported, when it is a code (``en``); OpenAI's verbose answers name it
    (``english``), and its json answers do not say: then empty."""
    if isinstance(language, str) and 2 <= len(language) <= 3 and language.isalpha():
        return language.lower()
    return ""
