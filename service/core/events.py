"""What the core hands to its outbox, and the messages the outbox hands to the transport.

A turn produces :class:`TextDelta`, :class:`SegmentStarted` and :class:`AudioPiece` items; the
session adds :class:`SessionStarted` and, once per turn, a :class:`TurnEnd`. The outbox
(:mod:`service.core.outbox`) turns them into messages: audio pieces merged into numbered
:class:`AudioChunk` messages, and each :class:`TurnEnd` into a :class:`TurnEnded` with an immutable
:class:`TurnTimings` snapshot taken when it leaves (so "first audio" means first audio *sent*).
Everything here is frozen except :class:`TurnStats`, which only the running turn writes.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from service.core.audio import AudioFormat
from service.core.engine import LLMUsage

__all__ = [
    "AudioChunk",
    "AudioPiece",
    "Control",
    "Item",
    "Message",
    "SegmentStarted",
    "SessionStarted",
    "SpeechStarted",
    "SpeechStopped",
    "Failure",
    "SpokenInput",
    "TextDelta",
    "Transcript",
    "TurnEnd",
    "TurnEndReason",
    "TurnEnded",
    "TurnMoments",
    "TurnStats",
    "TurnTimings",
]


class TurnEndReason(enum.Enum):
    """Why a turn ended."""

    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass(frozen=True)
class SpokenInput:
    """A voice turn's utterance: where its speech ended and how long the transcription took."""

    speech_end_audio_ms: int
    """Where the speech ended in the input audio's timeline."""
    speech_end_at: float
    """When the audio holding the end of the speech arrived (``time.monotonic()``)."""
    transcription_s: float
    transcription_began: float | None = None
    """When its transcription began (``time.monotonic()``), once it has run."""


@dataclass(frozen=True)
class TurnMoments:
    """When a turn's stages happened (``time.monotonic()`` seconds; None when a stage never did)."""

    started: float
    first_llm_token: float | None = None
    first_segment: float | None = None
    usage: LLMUsage | None = None
    spoken: SpokenInput | None = None


@dataclass
class TurnStats:
    """A running turn's progress, written only by the turn itself."""

    started: float = field(default_factory=time.monotonic)
    first_llm_token: float | None = None
    first_segment: float | None = None
    usage: LLMUsage | None = None
    spoken: SpokenInput | None = None
    """Set for a turn that answers the user's voice."""

    def snapshot(self) -> TurnMoments:
        return TurnMoments(self.started, self.first_llm_token, self.first_segment, self.usage, self.spoken)


@dataclass(frozen=True)
class TurnTimings:
    """A finished turn's timings in milliseconds from its start; 0 for a stage that never happened."""

    first_llm_token_ms: int
    first_segment_ms: int
    first_audio_ms: int
    total_ms: int
    audio_duration_ms: int
    speech_end_audio_ms: int = 0
    transcription_ms: int = 0
    speech_end_to_first_audio_ms: int = 0
    """Voice turns: from the end of the user's speech arriving to the first audio sent."""


# -- items: what the core puts in the outbox ---------------------------------------------------------


@dataclass(frozen=True)
class SessionStarted:
    session_id: str
    audio: AudioFormat
    voice: str
    llm_engine: str
    tts_engine: str


@dataclass(frozen=True)
class TextDelta:
    turn_id: str
    text: str


@dataclass(frozen=True)
class SegmentStarted:
    turn_id: str
    index: int
    text: str
    spoken_text: str
    start_ms: int


@dataclass(frozen=True)
class AudioPiece:
    """A piece of a segment's audio, in the session's format, as the turn produced it."""

    turn_id: str
    segment_index: int
    data: bytes
    duration_ms: float


@dataclass(frozen=True)
class TurnEnd:
    """A turn is over: the session's one word on it."""

    turn_id: str
    reason: TurnEndReason
    spoken_text: str
    moments: TurnMoments
    error: str = ""
    history_unsaved: bool = False
    failure: Failure | None = None
    """A failed turn's engine, for the metrics."""


@dataclass(frozen=True)
class Failure:
    """What failed a turn: ``engine`` (llm, tts, stt, or internal) and whether trying again may help."""

    engine: str
    retryable: bool = False
    logged: str = ""
    """The error as logs and traces may hold it (never a provider's own words: they may quote the user)."""


@dataclass(frozen=True)
class SpeechStarted:
    """Voice input: the user started speaking (offset in the input audio's timeline)."""

    audio_start_ms: int
    over_reply: bool = False
    """While the client was hearing a reply (its audio had begun and, by the server's estimate, not
    all played): a barge-in, which stops that reply. Not sent to the client."""


@dataclass(frozen=True)
class SpeechStopped:
    """Voice input: the user stopped speaking."""

    audio_end_ms: int


@dataclass(frozen=True)
class Transcript:
    """Voice input: what the user said; the final one opens the reply turn ``turn_id``."""

    turn_id: str
    text: str
    is_final: bool


Control = SessionStarted | TurnEnd | SpeechStarted | SpeechStopped | Transcript
Item = SessionStarted | TextDelta | SegmentStarted | AudioPiece | TurnEnd | SpeechStarted | SpeechStopped | Transcript


# -- messages: what the outbox hands to the transport ------------------------------------------------


@dataclass(frozen=True)
class AudioChunk:
    turn_id: str
    segment_index: int
    sequence: int
    data: bytes
    duration_ms: float


@dataclass(frozen=True)
class TurnEnded:
    turn_id: str
    reason: TurnEndReason
    spoken_text: str
    timings: TurnTimings
    usage: LLMUsage | None = None
    error: str = ""
    history_unsaved: bool = False
    failure: Failure | None = None


Message = (
    SessionStarted | TextDelta | SegmentStarted | AudioChunk | TurnEnded | SpeechStarted | SpeechStopped | Transcript
)
