"""Commands: everything that can happen to a session, as values on one queue.

The client's messages (:class:`Start`, :class:`UserText`, :class:`SpeakText`, :class:`Interrupt`,
:class:`UserAudio`, :class:`CommitAudio`, :class:`ClearAudio`, :class:`HalfClose`, and
:class:`BadMessage` for one that could not be read) come from the transport's reader; the rest come
from inside the server: the server shutting down, the session taken over by another stream or lost
by the store, a turn finishing by itself, the session's ears hearing speech begin, end, and its
transcript. The session handles them one at a time, in order (see
:meth:`service.core.session.Session.run`), so no two of them ever run at once.

:class:`CommandQueue` bounds what the client can queue (its reader waits while the queue is full:
that is backpressure on the client); the server's own commands never wait.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.core.events import SpokenInput
    from service.core.settings import StartRequest
    from service.core.turn import TurnRecord
    from service.errors import EngineError

__all__ = [
    "BadMessage",
    "ClaimLost",
    "ClearAudio",
    "ClientCommand",
    "Command",
    "CommandQueue",
    "CommitAudio",
    "HalfClose",
    "Heard",
    "HeardAll",
    "Interrupt",
    "Shutdown",
    "SpeakText",
    "SpeechBegan",
    "SpeechEnded",
    "SpeechResumed",
    "Start",
    "TurnFinished",
    "UserAudio",
    "UserText",
]


@dataclass(frozen=True)
class Start:
    request: StartRequest


@dataclass(frozen=True)
class UserText:
    text: str
    turn_id: str = ""


@dataclass(frozen=True)
class SpeakText:
    text: str
    flush: bool = False
    turn_id: str = ""


@dataclass(frozen=True)
class Interrupt:
    played_ms: int | None = None
    turn_id: str = ""
    """The turn the client means; empty: the one in progress (or the last one, still heard)."""


@dataclass(frozen=True)
class UserAudio:
    data: bytes


@dataclass(frozen=True)
class CommitAudio:
    turn_id: str = ""


@dataclass(frozen=True)
class ClearAudio:
    pass


@dataclass(frozen=True)
class HalfClose:
    """The client will send nothing more."""


@dataclass(frozen=True)
class BadMessage:
    """A client message that could not be read; the stream ends with ``error`` when its turn comes."""

    error: Exception


@dataclass(frozen=True)
class Shutdown:
    """The server is shutting down: end once the turn in progress has ended; or, ``now`` (its grace
    period is nearly over), stop that turn at once and end."""

    now: bool = False


@dataclass(frozen=True)
class ClaimLost:
    """The stream no longer owns its session: another stream resumed it, or (``vanished``) the store
    no longer has it."""

    vanished: bool = False


@dataclass(frozen=True)
class TurnFinished:
    """A turn's task ended by itself: ``error`` is None when it completed."""

    turn: TurnRecord
    error: BaseException | None


@dataclass(frozen=True)
class SpeechBegan:
    """Voice input: the user started speaking."""

    audio_start_ms: int


@dataclass(frozen=True)
class SpeechEnded:
    """Voice input: the user stopped speaking; the transcript follows as :class:`Heard`."""

    audio_end_ms: int


@dataclass(frozen=True)
class Heard:
    """Voice input: an utterance's transcript (``text``), or the ``error`` that prevented one.

    ``tentative``: the user has paused, not yet stopped: a reply may be prepared, unheard; the final
    :class:`Heard` of the same utterance (the same text) confirms it, :class:`SpeechResumed` discards it.
    """

    turn_id: str
    text: str | None
    spoken: SpokenInput | None
    error: EngineError | None = None
    tentative: bool = False


@dataclass(frozen=True)
class SpeechResumed:
    """Voice input: the user spoke again after a pause: a tentative transcript is not what they said."""


@dataclass(frozen=True)
class HeardAll:
    """Voice input: after a half-close, every utterance sent has been transcribed (and posted)."""


ClientCommand = Start | UserText | SpeakText | Interrupt | UserAudio | CommitAudio | ClearAudio | HalfClose | BadMessage
Command = (
    ClientCommand | Shutdown | ClaimLost | TurnFinished | SpeechBegan | SpeechEnded | SpeechResumed | Heard | HeardAll
)


class CommandQueue:
    """The commands of one session, in arrival order. Holds at most ``capacity`` client commands."""

    def __init__(self, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._items: collections.deque[Command] = collections.deque()
        self._client_items = 0
        self._changed = asyncio.Event()

    async def put(self, command: ClientCommand) -> None:
        """Queue a client command, waiting while ``capacity`` of them wait. Safe to cancel."""
        while self._client_items >= self._capacity:
            self._changed.clear()
            await self._changed.wait()
        self._client_items += 1
        self._append(command)

    def put_nowait(self, command: Command) -> None:
        """Queue one of the server's own commands; never waits."""
        self._append(command)

    async def get(self) -> Command:
        """The next command. Safe to cancel."""
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        command = self._items.popleft()
        if isinstance(command, ClientCommand):
            self._client_items -= 1
        self._changed.set()
        return command

    def _append(self, command: Command) -> None:
        self._items.append(command)
        self._changed.set()
