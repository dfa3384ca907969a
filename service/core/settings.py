"""A session's settings: the server's defaults, what ``start`` asks for, and how they combine.

:func:`check_start` says what is wrong with a ``start``; :func:`resolve_settings` combines a
checked ``start``, the stored session it resumes (if any) and the server's :class:`SessionDefaults`
into the one :class:`SessionSettings` record a session keeps. Both are pure.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from service.core.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, AudioFormat, Encoding
from service.core.codecs import output_rate
from service.core.engine import Voice
from service.core.history import HistoryLimits
from service.core.listening import ListenPolicy, TurnDetection
from service.core.outbox import OutboxLimits
from service.core.store import StoredSession
from service.core.turn import TurnOptions
from service.errors import InvalidRequest

__all__ = [
    "InputAudioRequest",
    "InputAudioStart",
    "SessionDefaults",
    "SessionSettings",
    "StartRequest",
    "TokenScope",
    "check_length",
    "check_start",
    "new_session_id",
    "resolve_settings",
]

MAX_VOICE_ID_CHARS = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BITRATES = {Encoding.OGG_OPUS: (6_000, 256_000), Encoding.MP3: (8_000, 320_000)}


@dataclass(frozen=True)
class SessionDefaults:
    """Server-side defaults and limits for every session: the one place they are written."""

    system_prompt: str = "You are Parley, a friendly voice assistant. Answer briefly, in plain spoken sentences."
    temperature: float = 0.7
    max_tokens: int = 200
    """The longest reply; a client may ask for fewer tokens, never more."""
    max_text_chars: int = 4000
    idle_timeout_s: float = 600.0
    """A stream with no client message and no turn in progress for this long is closed."""
    turn: TurnOptions = field(default_factory=TurnOptions)
    outbox: OutboxLimits = field(default_factory=OutboxLimits)
    history: HistoryLimits = field(default_factory=HistoryLimits)
    listen: ListenPolicy = field(default_factory=ListenPolicy)
    """Voice input's turn detection, for a client that sets none."""


@dataclass(frozen=True)
class TokenScope:
    """What a client token allows (see :mod:`service.auth`)."""

    token_id: str
    voices: tuple[str, ...] = ()
    session_id: str = ""
    max_streams: int = 0


@dataclass(frozen=True)
class StartRequest:
    """What the client asked for when opening the session (empty or None: the default, or on
    resume the stored value)."""

    session_id: str = ""
    system_prompt: str = ""
    voice: str = ""
    encoding: Encoding = Encoding.PCM16
    sample_rate_hz: int = 0
    temperature: float | None = None
    max_tokens: int | None = None
    input_audio: InputAudioStart | None = None
    """Voice input, when the client asks for it."""
    bitrate_bps: int = 0
    text_deltas: bool = True
    """Caption deltas as the LLM writes (the default), or text only with each segment (False)."""


@dataclass(frozen=True)
class InputAudioRequest:
    """A session's voice input settings, resolved."""

    sample_rate_hz: int
    language: str
    policy: ListenPolicy
    encoding: Encoding = Encoding.PCM16
    """PCM16, MULAW or ALAW."""

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding is Encoding.PCM16 else 1


@dataclass(frozen=True)
class InputAudioStart:
    """``start.input_audio`` as the client sent it (None: the server's default)."""

    sample_rate_hz: int
    language: str = ""
    mode: TurnDetection | None = None
    silence_ms: int | None = None
    prefix_padding_ms: int | None = None
    threshold: float | None = None
    min_speech_ms: int | None = None
    tentative_silence_ms: int | None = None
    encoding: Encoding = Encoding.PCM16

    def resolve(self, defaults: ListenPolicy) -> InputAudioRequest:
        """The input audio settings with the server's defaults filled in. Raises
        :class:`InvalidRequest` naming what is out of range."""
        if not MIN_SAMPLE_RATE_HZ <= self.sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
            raise InvalidRequest(
                f"start.input_audio.sample_rate_hz is {self.sample_rate_hz}; "
                f"use {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}"
            )
        if len(self.language) > 16:
            raise InvalidRequest("start.input_audio.language is too long; use a code such as 'en'")
        chosen: dict[str, Any] = {
            "mode": self.mode,
            "silence_ms": self.silence_ms,
            "prefix_padding_ms": self.prefix_padding_ms,
            "threshold": self.threshold,
            "min_speech_ms": self.min_speech_ms,
            "tentative_silence_ms": self.tentative_silence_ms,
        }
        try:
            policy = replace(defaults, **{k: v for k, v in chosen.items() if v is not None})
        except ValueError as error:
            raise InvalidRequest(f"start.input_audio.turn_detection: {error}") from error
        return InputAudioRequest(self.sample_rate_hz, self.language, policy, self.encoding)


@dataclass(frozen=True)
class SessionSettings:
    """What a session runs with, resolved once when it opens."""

    system_prompt: str
    voice: str
    voice_language: str
    """The voice's language (``en_US``), which decides what text it is given to read."""
    audio: AudioFormat
    temperature: float
    max_tokens: int
    chosen_temperature: float | None
    """The client's own choice (stored with the session), None for the server's default."""
    chosen_max_tokens: int | None
    text_deltas: bool = True
    """This stream gets the reply's text as the LLM writes it; False: with each segment only (the
    stream's own choice, not stored)."""

    def stored_fields(self) -> tuple[str, str, float | None, int | None]:
        """What of these settings a stored session keeps."""
        return self.system_prompt, self.voice, self.chosen_temperature, self.chosen_max_tokens


def is_session_id(text: str) -> bool:
    """Whether ``text`` is shaped as a session id (letters, digits, ``-`` and ``_``, at most 64)."""
    return _SESSION_ID.fullmatch(text) is not None


def new_session_id() -> str:
    """An unguessable id (144 random bits, URL-safe) that does not start with ``-``, so that it can
    follow a command-line option (``parley --session ID``) without being taken for one."""
    while (session_id := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return session_id


def check_length(text: str, field: str, max_chars: int) -> None:
    """Raise :class:`InvalidRequest` when ``text`` is over ``max_chars``."""
    if len(text) > max_chars:
        raise InvalidRequest(f"{field} is {len(text)} characters, over the limit of {max_chars}; send less")


def check_start(request: StartRequest, defaults: SessionDefaults, voices: Sequence[Voice]) -> None:
    """Raise :class:`InvalidRequest` saying what to fix in ``start``."""
    if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
        raise InvalidRequest(f"llm.temperature {request.temperature} is out of range; use 0 to 2")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidRequest(f"llm.max_tokens {request.max_tokens} must be at least 1")
    check_length(request.system_prompt, "start.system_prompt", defaults.max_text_chars)
    rate = request.sample_rate_hz
    if rate and not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise InvalidRequest(
            f"sample_rate_hz {rate} is out of range; "
            f"use {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}, or 0 for the voice's own rate"
        )
    bitrate = request.bitrate_bps
    low, high = _BITRATES.get(request.encoding, (0, 0))
    if bitrate and high and not low <= bitrate <= high:
        raise InvalidRequest(
            f"audio.bitrate_bps {bitrate} is out of range for {request.encoding.name}; use {low} to {high}, "
            "or 0 for the server's default"
        )
    if bitrate < 0:
        raise InvalidRequest(f"audio.bitrate_bps {bitrate} is negative; use 0 for the server's default")
    if request.session_id and not is_session_id(request.session_id):
        raise InvalidRequest(
            "start.session_id is not a session id (letters, digits, '-' and '_'); send the id session_started gave"
        )
    if len(request.voice) > MAX_VOICE_ID_CHARS:
        raise InvalidRequest(
            f"start.voice is {len(request.voice)} characters, longer than any voice id; ListVoices gives the choices"
        )
    known = {voice.id for voice in voices}
    if request.voice and request.voice not in known:
        raise InvalidRequest(
            f"unknown voice {request.voice!r}; ListVoices gives the choices: {', '.join(sorted(known))}"
        )


def resolve_settings(
    request: StartRequest,
    stored: StoredSession | None,
    defaults: SessionDefaults,
    voices: Sequence[Voice],
    default_voice: str,
) -> SessionSettings:
    """The settings of a session opened by a checked ``request``: what it sets, else what the resumed
    session ``stored`` had, else the server's defaults. A stored voice this server no longer offers
    falls back to the default voice."""
    by_id = {voice.id: voice for voice in voices}
    voice = request.voice or (stored.voice if stored else "") or default_voice
    if voice not in by_id:
        voice = default_voice
    native = min(max(by_id[voice].sample_rate_hz, MIN_SAMPLE_RATE_HZ), MAX_SAMPLE_RATE_HZ)
    codecs = defaults.turn.codecs
    bitrate = 0
    if request.encoding is Encoding.OGG_OPUS:
        bitrate = request.bitrate_bps or codecs.opus_bitrate_bps
    elif request.encoding is Encoding.MP3:
        bitrate = request.bitrate_bps or codecs.mp3_bitrate_bps
    temperature = request.temperature if request.temperature is not None else (stored.temperature if stored else None)
    max_tokens = request.max_tokens if request.max_tokens is not None else (stored.max_tokens if stored else None)
    return SessionSettings(
        system_prompt=request.system_prompt or (stored.system_prompt if stored else "") or defaults.system_prompt,
        voice=voice,
        voice_language=by_id[voice].language,
        audio=AudioFormat(request.encoding, output_rate(request.encoding, request.sample_rate_hz, native), bitrate),
        temperature=defaults.temperature if temperature is None else temperature,
        max_tokens=defaults.max_tokens if max_tokens is None else min(max_tokens, defaults.max_tokens),
        chosen_temperature=temperature,
        chosen_max_tokens=max_tokens,
        text_deltas=request.text_deltas,
    )
