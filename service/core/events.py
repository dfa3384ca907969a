"""What a session sends to its client, before translation to protobuf.

The servicer turns each event into one ``ConverseResponse``. :class:`TurnEnded` reads its timings
from the turn's :class:`TurnStats` when it is sent, so "first audio" means first audio *sent*.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from service.core.audio import AudioFormat
from service.core.engine import LLMUsage

__all__ = [
    "AudioChunk",
    "Event",
    "SegmentStarted",
    "SessionStarted",
    "TextDelta",
    "TurnEndReason",
    "TurnEnded",
    "TurnStats",
]


class TurnEndReason(enum.Enum):
    """Why a turn ended."""

    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass
class TurnStats:
    """Moments of one turn (``time.monotonic()`` seconds) and the audio it sent."""

    started: float = field(default_factory=time.monotonic)
    first_llm_token: float | None = None
    first_segment: float | None = None
    first_audio: float | None = None
    ended: float | None = None
    audio_ms_sent: float = 0.0
    usage: LLMUsage | None = None

    def since_start_ms(self, moment: float | None) -> int:
        """Milliseconds from the turn's start to ``moment``; 0 when it never happened."""
        return 0 if moment is None else round((moment - self.started) * 1000)


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
    stats: TurnStats
    error: str = ""


Event = SessionStarted | TextDelta | SegmentStarted | AudioChunk | TurnEnded
