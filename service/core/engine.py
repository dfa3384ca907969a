"""The engine interfaces the turn pipeline talks to, and the values that cross them.

An LLM engine streams text deltas for a conversation; a TTS engine streams PCM16 audio for a piece of
text; a speech detector scores input audio for speech, frame by frame; an STT engine transcribes an
utterance. Implementations live in ``service.engines``, one file per engine, and raise only
:class:`service.errors.EngineError` subclasses.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "INTERRUPTED_NOTE",
    "INTERRUPTED_SILENT",
    "NOTES",
    "Audio",
    "LLMEngine",
    "LLMRequest",
    "LLMUsage",
    "Message",
    "STTEngine",
    "SpeechDetector",
    "SpeechFrames",
    "TTSEngine",
    "Transcription",
    "Voice",
    "chat_content",
]

INTERRUPTED_NOTE = "[interrupted: the user heard only this much]"
INTERRUPTED_SILENT = "[interrupted before the user heard anything]"
NOTES = (INTERRUPTED_NOTE, INTERRUPTED_SILENT)
"""The notes a chat model is shown on an interrupted reply; never spoken or captioned."""


@dataclass(frozen=True)
class Message:
    """One message of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str
    interrupted: bool = False
    """An assistant reply the listener cut short: ``content`` is what they heard (maybe nothing).
    Each engine tells its model so in the form that model understands (:func:`chat_content`)."""


def chat_content(message: Message) -> str:
    """The message's text for a chat model: an interrupted reply ends with a note saying so, so that
    the assistant does not assume it was heard in full."""
    if not message.interrupted:
        return message.content
    return f"{message.content} {INTERRUPTED_NOTE}" if message.content else INTERRUPTED_SILENT


@dataclass(frozen=True)
class LLMRequest:
    """What to ask the LLM: the conversation so far, ending with the user's message."""

    messages: tuple[Message, ...]
    temperature: float
    max_tokens: int


@dataclass(frozen=True)
class LLMUsage:
    """Tokens a reply cost, when the engine reports them (the last item of a stream)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Voice:
    """A voice a TTS engine offers."""

    id: str
    language: str
    sample_rate_hz: int
    engine: str


@dataclass(frozen=True)
class Audio:
    """Mono 16-bit little-endian PCM at ``sample_rate_hz``."""

    pcm: bytes
    sample_rate_hz: int


class LLMEngine(Protocol):
    """Streams a reply as text deltas."""

    @property
    def name(self) -> str:
        """Engine and model, for example ``local/gemma-3-270m-q4_k_m.gguf``."""
        ...

    def stream(self, request: LLMRequest) -> AsyncGenerator[str | LLMUsage, None]:
        """Yield the reply's text deltas as they are made, then its :class:`LLMUsage` if known.

        Safe to cancel, and closing the iterator early stops the generation (not merely its output).
        Raises :class:`service.errors.LLMError`.
        """
        ...

    async def aclose(self) -> None:
        """Release the engine's resources."""
        ...


class TTSEngine(Protocol):
    """Speaks text."""

    @property
    def name(self) -> str:
        """Engine name, for example ``piper``."""
        ...

    @property
    def default_voice(self) -> str:
        """The id of the voice used when a session names none."""
        ...

    def voices(self) -> list[Voice]:
        """The voices this engine offers."""
        ...

    def synthesize(self, text: str, voice: str, *, urgent: bool = False) -> AsyncGenerator[Audio, None]:
        """Yield ``text`` spoken by ``voice`` as audio chunks, as the engine makes them.

        ``urgent``: a listener is waiting in silence for this audio (a turn's first segment); an
        engine that shares the machine's cores with other work may put it first. Safe to cancel;
        closing the iterator early stops the synthesis. Raises :class:`service.errors.TTSError`.
        """
        ...

    async def aclose(self) -> None:
        """Release the engine's resources."""
        ...


@dataclass(frozen=True)
class Transcription:
    """What an STT engine heard in an utterance."""

    text: str
    """The words, as the engine writes them (may be empty: nothing was said)."""
    language: str
    """The language heard or given, as a code such as ``en``."""
    no_speech_probability: float = 0.0
    """How sure the engine is that there was no speech at all (0 when it does not say)."""


class STTEngine(Protocol):
    """Transcribes an utterance."""

    @property
    def name(self) -> str:
        """Engine and model, for example ``whisper/base``."""
        ...

    @property
    def sample_rate_hz(self) -> int:
        """The rate of the mono PCM16 audio it takes (16,000 for Whisper)."""
        ...

    def language_problem(self, language: str) -> str | None:
        """What is wrong with ``language`` (not empty) for this engine, said to a client that asks for
        it at ``start``, or None when it may be asked for."""
        ...

    async def transcribe(self, pcm: bytes, language: str | None = None) -> Transcription:
        """Transcribe mono PCM16 at :attr:`sample_rate_hz`; ``language`` None or empty: detect it.

        Runs off the event loop; safe to cancel. Raises :class:`service.errors.STTError`.
        """
        ...

    async def aclose(self) -> None:
        """Release the engine's resources."""
        ...


class SpeechFrames(Protocol):
    """One audio stream's voice activity detection; holds the model's state between calls."""

    async def feed(self, pcm: bytes) -> list[float]:
        """Take mono PCM16 at the detector's rate; return the speech probability (0 to 1) of each
        frame completed, in order (a partial frame is kept for the next call). Runs off the event
        loop when it would hold it for more than a millisecond or so. Raises
        :class:`service.errors.VADError`."""
        ...

    def reset(self) -> None:
        """Forget the audio so far (the client cleared its input), the part of a frame not scored yet
        included: the next frame begins with the next audio fed (the listener counts on it)."""
        ...


class SpeechDetector(Protocol):
    """A voice activity detector: gives each audio stream its own :class:`SpeechFrames`."""

    @property
    def sample_rate_hz(self) -> int:
        """The rate of the mono PCM16 it scores (16,000 for Silero VAD)."""
        ...

    @property
    def frame_ms(self) -> float:
        """The duration of one scored frame (32 ms for Silero VAD at 16 kHz: 512 samples)."""
        ...

    def stream(self) -> SpeechFrames:
        """A detector for one more audio stream."""
        ...

    async def aclose(self) -> None:
        """Release the detector's resources."""
        ...
