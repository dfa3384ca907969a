"""Opening a session: checking ``start``, then creating a new session or resuming a stored one."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from service.core.audio import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ, AudioFormat, Encoding
from service.core.engine import TTSEngine
from service.core.store import Claim, SessionStore, StoredSession
from service.errors import InvalidRequest, SessionNotFound

__all__ = ["Opened", "StartRequest", "check_length", "new_session_id", "open_session"]


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


@dataclass
class Opened:
    """A session ready to use: its stored state, the stream's claim on it, and the audio format."""

    stored: StoredSession
    claim: Claim
    audio: AudioFormat
    resumed: bool
    changed: bool = False
    """Resumed with settings (voice, system prompt, LLM options) other than the stored ones."""


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


def _check(request: StartRequest, max_chars: int) -> None:
    if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
        raise InvalidRequest(f"llm.temperature {request.temperature} is out of range; use 0 to 2")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidRequest(f"llm.max_tokens {request.max_tokens} must be at least 1")
    check_length(request.system_prompt, "start.system_prompt", max_chars)
    rate = request.sample_rate_hz
    if rate and not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise InvalidRequest(
            f"sample_rate_hz {rate} is out of range; "
            f"use {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}, or 0 for the voice's own rate"
        )
    if len(request.session_id) > 128:
        raise InvalidRequest("start.session_id is too long to be a session id; send the id session_started gave")


async def open_session(
    request: StartRequest, tts: TTSEngine, store: SessionStore, *, default_system_prompt: str, max_chars: int
) -> Opened:
    """Validate ``start`` and create or resume the session.

    Raises :class:`InvalidRequest`, :class:`SessionNotFound` or :class:`StoreUnavailable`.
    """
    _check(request, max_chars)
    voices = {voice.id: voice for voice in tts.voices()}
    requested_voice = request.voice
    if requested_voice and requested_voice not in voices:
        raise InvalidRequest(
            f"unknown voice {requested_voice!r}; ListVoices gives the choices: {', '.join(sorted(voices))}"
        )
    resumed = None
    if request.session_id:
        resumed = await store.resume(request.session_id)
        if resumed is None:
            raise SessionNotFound(
                f"no session {request.session_id!r}: it never existed or has expired; "
                "leave start.session_id empty to begin a new one"
            )
    voice = requested_voice or (resumed[0].voice if resumed else "") or tts.default_voice
    if voice not in voices:  # a stored voice this server no longer has
        voice = tts.default_voice
    native = min(max(voices[voice].sample_rate_hz, MIN_SAMPLE_RATE_HZ), MAX_SAMPLE_RATE_HZ)
    audio = AudioFormat(request.encoding, request.sample_rate_hz or native)
    if resumed:
        stored, claim = resumed
        before = (stored.voice, stored.system_prompt, stored.temperature, stored.max_tokens)
        stored.voice = voice
        stored.system_prompt = request.system_prompt or stored.system_prompt
        stored.temperature = request.temperature if request.temperature is not None else stored.temperature
        stored.max_tokens = request.max_tokens if request.max_tokens is not None else stored.max_tokens
        changed = before != (stored.voice, stored.system_prompt, stored.temperature, stored.max_tokens)
        return Opened(stored, claim, audio, resumed=True, changed=changed)
    stored = StoredSession(
        session_id=new_session_id(),
        system_prompt=request.system_prompt or default_system_prompt,
        voice=voice,
        temperature=request.temperature,
        max_tokens=request.max_tokens,
    )
    claim = await store.create(stored)
    return Opened(stored, claim, audio, resumed=False)
