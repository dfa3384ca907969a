"""Conversation history, and what of an interrupted reply the listener actually heard.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from service.core.engine import Message

__all__ = ["HEARD_TOLERANCE_MS", "Conversation", "Entry", "HistoryLimits", "SpokenSegment", "heard_text"]


@dataclass
class SpokenSegment:
    """A segment of a turn's text and its place in the turn's audio timeline."""

    start: int
    """Offset of the segment in the turn's whole text."""
    end: int
    """Offset just past the segment's end."""
    start_ms: float
    """Where its audio starts in the turn's timeline."""
    duration_ms: float = 0.0
    """The duration of its audio produced so far (final once the segment is done)."""
    complete: bool = False
    """All its audio has been produced."""


_WORD_END = re.compile(r"\S+")

HEARD_TOLERANCE_MS = 5.0
"""A segment played to within this much of its end was heard whole: clients count played time in
whole milliseconds, and a player's clock and the sample count differ by a few."""


def heard_text(text: str, segments: Sequence[SpokenSegment], heard_ms: float) -> str:
    """The part of ``text`` whose audio was heard in the first ``heard_ms`` of the turn.

    Segments heard to their end count whole. In a segment heard partly, word positions are estimated
    from its duration (words evenly spread), and only words whose estimated end was reached count.
    A segment whose audio was still being made is measured against its estimated full duration (from
    the speaking rate of the turn's finished segments), and only its audio made so far can be heard.
    Segments without audio (a code block) count once the timeline has passed their start.
    """
    if heard_ms <= 0:
        return ""
    ms_per_char = _speaking_rate(segments)
    cut = 0
    for segment in segments:
        if heard_ms < segment.start_ms:
            break
        end_ms = segment.start_ms + segment.duration_ms
        if segment.complete and heard_ms + HEARD_TOLERANCE_MS >= end_ms:
            cut = segment.end
            continue
        if segment.duration_ms <= 0:
            break
        full_ms = segment.duration_ms
        if not segment.complete:
            full_ms = max(full_ms, (segment.end - segment.start) * ms_per_char)
        fraction = (min(heard_ms, end_ms) - segment.start_ms) / full_ms
        words = list(_WORD_END.finditer(text, segment.start, segment.end))
        whole_words = math.floor(len(words) * min(fraction, 1.0) + 1e-9)
        if not segment.complete:
            # Only part of its audio exists: never count the whole segment as heard.
            whole_words = min(whole_words, len(words) - 1)
        if whole_words > 0:
            cut = words[whole_words - 1].end()
        break
    return text[:cut].strip()


_DEFAULT_MS_PER_CHAR = 65.0  # about 15 characters a second, an ordinary speaking rate


def _speaking_rate(segments: Sequence[SpokenSegment]) -> float:
    """Milliseconds of audio per character in the finished segments, or a typical rate."""
    done = [s for s in segments if s.complete and s.duration_ms > 0]
    chars = sum(s.end - s.start for s in done)
    return sum(s.duration_ms for s in done) / chars if chars else _DEFAULT_MS_PER_CHAR


@dataclass(frozen=True)
class HistoryLimits:
    """How much history a session keeps: the oldest turns go first; the system prompt always stays."""

    max_turns: int = 50
    """Turns kept (a user message and its reply count as one; a read-aloud text as one)."""
    max_chars: int = 20_000
    """Characters kept across all kept turns."""


@dataclass(frozen=True)
class Entry:
    """One message of the history; ``interrupted`` marks a reply cut short by the listener."""

    role: Literal["user", "assistant"]
    content: str
    interrupted: bool = False


@dataclass
class Conversation:
    """The system prompt and the turns so far. Assistant replies hold only what was heard."""

    system_prompt: str
    entries: list[Entry] = field(default_factory=list)
    limits: HistoryLimits = field(default_factory=HistoryLimits)

    def request_messages(self, user_text: str) -> tuple[Message, ...]:
        """The messages to send the LLM for a new user message. An interrupted reply is marked, and
        its engine tells the model so (:func:`service.core.engine.chat_content`)."""
        system = (Message("system", self.system_prompt),) if self.system_prompt else ()
        return (*system, *(_as_message(e) for e in self.entries), Message("user", user_text))

    def add_exchange(self, user_text: str, reply: str, *, interrupted: bool = False) -> None:
        """Record a finished turn (the reply may be empty if nothing was heard)."""
        self.entries.append(Entry("user", user_text))
        self.entries.append(Entry("assistant", reply, interrupted))
        self._trim()

    def add_spoken(self, reply: str, *, interrupted: bool = False) -> bool:
        """Record text read aloud with ``speak_text`` as said by the assistant; False if empty."""
        if not reply:
            return False
        self.entries.append(Entry("assistant", reply, interrupted))
        self._trim()
        return True

    def trim_last_reply(self, reply: str) -> bool:
        """Cut the last assistant message to what the client reports it heard, marking it interrupted.

        Returns False when the last message is not the assistant's.
        """
        if not self.entries or self.entries[-1].role != "assistant":
            return False
        self.entries[-1] = Entry("assistant", reply, True)
        return True

    def _trim(self) -> None:
        turns = _turn_starts(self.entries)
        while turns and (
            len(turns) > self.limits.max_turns or sum(len(e.content) for e in self.entries) > self.limits.max_chars
        ):
            if len(turns) == 1:
                break  # always keep the latest turn
            del self.entries[: turns[1]]
            turns = _turn_starts(self.entries)


def _turn_starts(entries: list[Entry]) -> list[int]:
    """Where each turn starts: at a user message, or at an assistant message that follows another."""
    return [i for i, e in enumerate(entries) if e.role == "user" or i == 0 or entries[i - 1].role == "assistant"]


def _as_message(entry: Entry) -> Message:
    return Message(entry.role, entry.content, entry.interrupted)
