"""The bounded queue between a session and its transport.

Like ``asyncio.Queue``, with what a voice stream needs on top: turn events can be purged when the
turn is interrupted (so no audio of it leaves afterwards), control events skip the bound (a
``TurnEnded`` never waits behind backpressure), and closing ends the stream once drained.
"""

from __future__ import annotations

import asyncio
import collections

from service.core.events import AudioChunk, Event, SessionStarted, TextDelta

__all__ = ["EventQueue"]


class EventQueue:
    """Holds at most ``capacity`` turn events; :meth:`put` waits while full."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._items: collections.deque[Event] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._dropped_turns: set[str] = set()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, event: Event) -> None:
        """Queue a turn event, waiting while the queue is full; events of a purged turn are dropped.
        Safe to cancel."""
        while len(self._items) >= self._capacity and not self._closed:
            await self._writable.wait()
        if not self._closed and getattr(event, "turn_id", None) not in self._dropped_turns:
            self._items.append(event)
            self._update()

    def put_control(self, event: Event) -> None:
        """Queue an event without waiting for room."""
        if not self._closed:
            self._items.append(event)
            self._update()

    def purge(self, turn_id: str) -> list[Event]:
        """Drop every queued event of ``turn_id``, and any it would still :meth:`put` (control events
        still pass); returns the dropped ones."""
        self._dropped_turns.add(turn_id)
        kept: list[Event] = []
        dropped: list[Event] = []
        for event in self._items:
            (kept if isinstance(event, SessionStarted) or event.turn_id != turn_id else dropped).append(event)
        self._items = collections.deque(kept)
        self._update()
        return dropped

    def take_audio(self, turn_id: str, segment_index: int, max_ms: float) -> list[AudioChunk]:
        """Remove and return the audio chunks at the head of the queue that continue this segment,
        up to ``max_ms`` of audio in all."""
        taken: list[AudioChunk] = []
        while self._items:
            head = self._items[0]
            if not (
                isinstance(head, AudioChunk)
                and head.turn_id == turn_id
                and head.segment_index == segment_index
                and head.duration_ms <= max_ms
            ):
                break
            max_ms -= head.duration_ms
            taken.append(head)
            self._items.popleft()
        if taken:
            self._update()
        return taken

    def take_text(self, turn_id: str) -> list[str]:
        """Remove and return the caption deltas of ``turn_id`` at the head of the queue."""
        taken: list[str] = []
        while self._items and isinstance(head := self._items[0], TextDelta) and head.turn_id == turn_id:
            taken.append(head.text)
            self._items.popleft()
        if taken:
            self._update()
        return taken

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more events will be added; :meth:`get` returns None once the queue is drained."""
        self._closed = True
        self._update()

    async def get(self) -> Event | None:
        """The next event, or None when closed and drained. Safe to cancel."""
        while not self._items and not self._closed:
            await self._readable.wait()
        if not self._items:
            return None
        event = self._items.popleft()
        self._update()
        return event

    def _update(self) -> None:
        if self._items or self._closed:
            self._readable.set()
        else:
            self._readable.clear()
        if len(self._items) < self._capacity or self._closed:
            self._writable.set()
        else:
            self._writable.clear()
