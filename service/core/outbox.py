"""The outbox: the one place that decides what leaves a stream, and when.

The session and its turns put items in (:mod:`service.core.events`); the transport's writer takes
messages out with :meth:`Outbox.next`. The outbox alone

- bounds what waits per stream, in seconds of audio as well as in items (a turn's :meth:`Outlet.put`
  waits while it is full: that is the backpressure from a slow client to the TTS engine);
- merges: a turn's caption text waits in the queue as one entry that the deltas coming meanwhile
  join; the turn's first leaves at once, later ones gather for up to ``caption_gather_ms`` (a
  stream in flight then carries a few caption messages a second, not one per LLM token). The turn's
  audio may go ahead of its gathering text (so a reply's first audio never queues behind a caption);
  anything else behind the text waits for it (a segment start, whose text it holds, first of all),
  so the order of everything but a turn's text and its audio is kept. Audio pieces of one
  segment leave as one message of at most ``max_message_ms``; once a turn's first audio has left, a
  message waits until it is full while the client holds audio to spare, but never so long that it
  would hold less than ``fill_lead_ms``, or than half of what it holds (the turn gathers a message's
  worth before handing it over, by the same rule): the first message leaves at once and the next
  ones grow with the client's lead, so a turn's audio takes a few messages, not one per engine chunk;
- numbers each turn's audio messages, gap-free, once, as they leave;
- records what of each turn left (:class:`Outlet`: first audio, audio sent), which the session reads
  to know what the client can have heard;
- snapshots a turn's immutable :class:`TurnTimings` when its :class:`TurnEnd` leaves.

An interrupted turn's :class:`Outlet` is dropped: what of it waits is removed and whatever it still
puts is discarded; its end still goes. A tentative turn's outlet is *held*: what it puts waits
aside (counting toward the same bounds) until :meth:`Outbox.release` queues it, in order, or a drop
discards it; nothing of a held turn ever reaches the client before its release. Nothing here calls
back into the session. One event loop.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.core.events import (
    AudioChunk,
    AudioPiece,
    Control,
    Item,
    Message,
    SegmentStarted,
    TextDelta,
    TurnEnd,
    TurnEnded,
    TurnTimings,
)

__all__ = ["MAX_CAPTION_CHARS", "Outbox", "OutboxLimits", "Outlet"]

MAX_CAPTION_CHARS = 16384
"""Longest caption delta message (merged or not; a turn hands over no longer delta): far below what a
gRPC client takes in one message (4 MiB by default) in any script."""


@dataclass(frozen=True)
class OutboxLimits:
    """How much a stream buffers and how its messages are sized."""

    max_message_ms: int = 1000
    """Longest audio message. Each message costs the event loop and gRPC about as much whatever its
    length, so long messages let a process hold more streams; the first of a turn leaves at once,
    holding at most ``first_message_ms``."""
    max_buffered_ms: int = 6000
    """Audio that may wait in the outbox before a turn's put waits."""
    max_buffered_items: int = 64
    """Items that may wait before a turn's put waits (captions and segment starts count too)."""
    fill_lead_ms: int = 500
    """Audio the client keeps in hand (counting from when the turn's first audio left) while messages
    wait to fill: an audio message waits until it is full, or until the client would hold only this
    much (or only half of what it holds, while that is less; never less than ``min_fill_lead_ms``).
    Fewer, larger messages, with no effect on the first audio; early in a reply the client's margin
    against a late message is thinner than if audio left at once."""
    first_message_ms: int = 200
    """Longest first audio message of a turn (or ``max_message_ms``, if that is less): it leaves at
    once, and a short one is encoded and carried sooner."""
    min_fill_lead_ms: int = 100
    """While the client holds no more than this (or than ``fill_lead_ms``, if that is less), audio
    leaves as it comes."""
    caption_gather_ms: int = 250
    """How long a turn's caption text gathers before it leaves as one message, counting from the first
    delta of the gathering (a turn's first caption leaves at once; 0: text leaves as it comes, deltas
    waiting together while the writer is busy still as one message). The turn's audio never waits
    for text that gathers: fewer messages, and a reply's first audio does not queue behind a
    caption. Four a second: the text runs ahead of its speech anyway, and each message costs the
    event loop and gRPC about what an audio message does (at 100 ms, a reply's captions were a
    quarter of its messages, and the first audio came later under load)."""

    def __post_init__(self) -> None:
        if self.max_message_ms < 1 or self.max_buffered_ms < self.max_message_ms or self.max_buffered_items < 1:
            raise ValueError("need max_message_ms >= 1, max_buffered_ms >= max_message_ms, max_buffered_items >= 1")
        if self.caption_gather_ms < 0:
            raise ValueError("need caption_gather_ms >= 0")


class Outlet:
    """One turn's way into the outbox, and the record of what of the turn left."""

    def __init__(self, outbox: Outbox, turn_id: str, *, held: bool = False) -> None:
        self.turn_id = turn_id
        self._outbox = outbox
        self.dropped = False
        """Interrupted: nothing more of this turn leaves, except its end."""
        self.held: collections.deque[TextDelta | SegmentStarted | AudioPiece] | None = (
            collections.deque() if held else None
        )
        """Held (a tentative turn): what it put so far, waiting for its release. None once released."""
        self.first_audio_at: float | None = None
        """When its first audio message was handed to the transport."""
        self._fill_deadline: float | None = None  # the message being gathered's, once worked out
        self.audio_ms_sent = 0.0
        """Audio of it handed to the transport."""
        self.next_sequence = 0
        self.gathering: _Caption | None = None
        """Its caption text waiting in the queue that more text may still join."""
        self.captioned = False
        """Some caption text of it was queued (its first leaves at once, later text gathers)."""
        self.on_end: Callable[[TurnEnded | None], None] | None = None
        """Told once of the turn's end as it leaves (sent, or let go unsent as the stream ended), or of
        None, by :meth:`finish`, for a turn whose end is never made (a discarded tentative reply)."""

    def finish(self, ended: TurnEnded | None) -> None:
        """Tell ``on_end`` (once) that the turn is over: ``ended`` as it left, or None."""
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(ended)

    async def put(self, item: TextDelta | SegmentStarted | AudioPiece) -> None:
        """Queue one of the turn's items, waiting while the outbox is full. Discarded once the turn was
        dropped or the outbox closed. Safe to cancel."""
        await self._outbox.put(self, item)

    def fill_until(self) -> float | None:
        """Until when (``time.monotonic``) the turn's audio may wait to fill a message: until the client
        would hold only ``fill_lead_ms``, or only half of what it holds now while that is less, but
        never less than ``min_fill_lead_ms``. None before the turn's first audio has left, and while
        the client holds no more than that floor (audio then leaves as it comes).

        So the messages of a turn grow with the client's lead: the first leaves at once, and each
        next one may gather for up to half of what the client holds, which (while the engine makes
        audio faster than it plays) soon fills it to ``max_message_ms``.

        Worked out once per message (the turn gathering it and the outbox filling it share it, so
        that the half is not taken twice), until that message leaves."""
        if self._fill_deadline is None:
            self._fill_deadline = self.peek_fill_until()
        return self._fill_deadline

    def peek_fill_until(self) -> float | None:
        """What :meth:`fill_until` would be for a message that began to gather now (kept nowhere)."""
        if self._fill_deadline is not None:
            return self._fill_deadline
        if self.first_audio_at is None:
            return None
        limits = self._outbox.limits
        now = time.monotonic()
        lead_ms = self.client_lead_ms(now)
        floor_ms = min(limits.fill_lead_ms, max(lead_ms / 2, limits.min_fill_lead_ms))
        if lead_ms <= floor_ms:
            return None
        return now + (lead_ms - floor_ms) / 1000

    def sent_audio(self, duration_ms: float, now: float) -> None:
        """An audio message of the turn was handed to the transport."""
        if self.first_audio_at is None:
            self.first_audio_at = now
        self.audio_ms_sent += duration_ms
        self._fill_deadline = None

    def client_lead_ms(self, now: float) -> float:
        """Audio the client holds beyond what it can have played, if it started at the first audio."""
        if self.first_audio_at is None:
            return 0.0
        return self.audio_ms_sent - (now - self.first_audio_at) * 1000


_GATHER_CHARS = 1024
"""Most text a waiting caption entry takes in: beyond it, text starts a new entry, which counts toward
``max_buffered_items`` (so a client that stops reading stops the turn's text as before)."""


class _Caption:
    """A turn's caption text waiting in the queue as one entry: deltas that come while it waits join
    it, up to ``_GATHER_CHARS``; it leaves as one message."""

    __slots__ = ("due", "length", "texts", "turn_id")

    def __init__(self, turn_id: str, due: float, text: str) -> None:
        self.turn_id = turn_id
        self.due = due
        """Until when it may wait for more text while nothing but its turn's audio is behind it."""
        self.texts = [text]
        self.length = len(text)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.length += len(text)

    def message(self) -> TextDelta:
        return TextDelta(self.turn_id, self.texts[0] if len(self.texts) == 1 else "".join(self.texts))


_Entry = tuple[Outlet | None, "Item | _Caption"]


class Outbox:
    """The bounded, ordered queue of one stream's outgoing items. See the module docstring."""

    def __init__(self, limits: OutboxLimits) -> None:
        self._limits = limits
        self._entries: collections.deque[_Entry] = collections.deque()
        self._buffered_ms = 0.0
        self._held_items = 0  # in held outlets
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def limits(self) -> OutboxLimits:
        return self._limits

    def open_turn(self, turn_id: str, *, held: bool = False) -> Outlet:
        """A new turn's outlet; ``held``: nothing of it leaves before :meth:`release`."""
        return Outlet(self, turn_id, held=held)

    async def put(self, outlet: Outlet, item: TextDelta | SegmentStarted | AudioPiece) -> None:
        while self._full() and not (self._closed or outlet.dropped):
            self._changed.clear()
            await self._changed.wait()
        if self._closed or outlet.dropped:
            return
        if outlet.held is not None:
            outlet.held.append(item)
            self._held_items += 1
            if isinstance(item, AudioPiece):
                self._buffered_ms += item.duration_ms
            return
        self._append(outlet, item)

    def release(self, outlet: Outlet) -> None:
        """A held turn may leave: what it put so far is queued now, after everything waiting."""
        held, outlet.held = outlet.held, None
        if held is None or outlet.dropped:
            return
        self._held_items -= len(held)
        for item in held:
            if isinstance(item, AudioPiece):
                self._buffered_ms -= item.duration_ms  # (counted again as it is queued)
            self._append(outlet, item)

    def put_control(self, item: Control, outlet: Outlet | None = None) -> None:
        """Queue a session start, a turn's end or news of the user's voice without waiting for room
        (ignored once closed)."""
        if not self._closed:
            self._append(outlet, item)

    def drop(self, outlet: Outlet) -> TurnEnd | None:
        """Drop a turn: remove what of it waits, discard what it still puts. Returns its end if that
        was waiting (removed too), so that the caller can replace it."""
        outlet.dropped = True
        outlet.gathering = None
        if outlet.held is not None:
            self._held_items -= len(outlet.held)
            self._buffered_ms -= sum(item.duration_ms for item in outlet.held if isinstance(item, AudioPiece))
            outlet.held.clear()
        kept: collections.deque[_Entry] = collections.deque()
        end: TurnEnd | None = None
        for entry in self._entries:
            if entry[0] is not outlet:
                kept.append(entry)
            elif isinstance(entry[1], TurnEnd):
                end = entry[1]
            elif isinstance(entry[1], AudioPiece):
                self._buffered_ms -= entry[1].duration_ms
        self._entries = kept
        self._changed.set()
        return end

    def close(self) -> None:
        """Nothing more is added; :meth:`next` returns None once what waits has left."""
        self._closed = True
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def waiting(self) -> list[Item]:
        """A copy of what waits to leave, oldest first (for monitoring and tests)."""
        return [item.message() if isinstance(item, _Caption) else item for _, item in self._entries]

    def unsent_ends(self) -> list[TurnEnded]:
        """The ends of turns that never left (the stream ended under them), as they would have been
        sent, timings fixed now; everything waiting is let go. Call once the stream's writer is done."""
        ends = [_ended(item, outlet) for outlet, item in self._entries if isinstance(item, TurnEnd)]
        for outlet, _ in self._entries:
            if outlet is not None:
                outlet.gathering = None
        self._entries.clear()
        self._buffered_ms = 0.0
        return ends

    async def next(self) -> Message | None:
        """The next message to send, or None once closed and empty. Call from one task; what it
        returns counts as sent (hand it to the transport at once). Safe to cancel (a message that
        was waiting to fill is put back)."""
        while True:
            while not self._entries:
                if self._closed:
                    return None
                self._changed.clear()
                await self._changed.wait()
            outlet, item = self._entries[0]
            at = 0
            if isinstance(item, _Caption):
                # Gathering caption text lets its turn's audio behind it go first; anything else
                # behind it waits: a segment start (whose text is in it: clients find a segment's
                # text in the captions), its turn's end, another turn's item, news of the voice.
                at = self._audio_behind(outlet, item)
                if at < 0:
                    self._changed.clear()
                    try:
                        async with asyncio.timeout_at(item.due):
                            await self._changed.wait()
                    except TimeoutError:
                        pass
                    continue
                if at == 0:
                    self._entries.popleft()
                    self._changed.set()
                    assert outlet is not None
                    if outlet.gathering is item:
                        outlet.gathering = None
                    return item.message()
                outlet, item = self._entries[at]
            del self._entries[at]
            self._changed.set()
            if isinstance(item, AudioPiece):
                assert outlet is not None
                self._buffered_ms -= item.duration_ms
                message = await self._audio_message(outlet, item, at)
                if message is not None:
                    return message
                continue
            if isinstance(item, TurnEnd):
                return _ended(item, outlet)
            assert not isinstance(item, (_Caption, TextDelta))
            return item

    # -- internals ---------------------------------------------------------------------------------

    def _audio_behind(self, outlet: Outlet | None, caption: _Caption) -> int:
        """For a caption at the head: 0 if it leaves now (it is due, or something other than its
        turn's audio is behind it), 1 if its turn's audio behind it goes first, or -1 if it waits
        (for more text, or until it is due)."""
        if self._closed or caption.due <= time.monotonic():
            return 0
        if len(self._entries) == 1:
            return -1
        owner, item = self._entries[1]
        return 1 if owner is outlet and isinstance(item, AudioPiece) else 0

    def _full(self) -> bool:
        return (
            len(self._entries) + self._held_items >= self._limits.max_buffered_items
            or self._buffered_ms >= self._limits.max_buffered_ms
        )

    def _append(self, outlet: Outlet | None, item: Item) -> None:
        if isinstance(item, TextDelta) and outlet is not None:
            caption = outlet.gathering
            if caption is not None and caption.length + len(item.text) <= _GATHER_CHARS:
                caption.add(item.text)  # (changes nothing the writer waits for: it is not woken)
                return
            now = time.monotonic()
            due = now + self._limits.caption_gather_ms / 1000 if outlet.captioned else now
            outlet.captioned = True
            outlet.gathering = _Caption(outlet.turn_id, due, item.text)
            self._entries.append((outlet, outlet.gathering))
        else:
            self._entries.append((outlet, item))
            if isinstance(item, AudioPiece):
                self._buffered_ms += item.duration_ms
        self._changed.set()

    async def _audio_message(self, outlet: Outlet, first: AudioPiece, at: int) -> AudioChunk | None:
        """``first`` (taken from index ``at``) and the pieces of its segment that follow it, up to one
        message's worth."""
        pieces = [first]
        duration = first.duration_ms
        limit = self._limits.max_message_ms
        if outlet.first_audio_at is None:
            limit = min(limit, self._limits.first_message_ms)
        fill_until = outlet.fill_until()
        while True:
            head = self._entries[at] if len(self._entries) > at else None
            if head is not None:
                if not _continues(head, outlet, first) or duration + head[1].duration_ms > limit + 1e-6:  # type: ignore[union-attr]
                    break
                del self._entries[at]
                self._changed.set()
                piece = head[1]
                assert isinstance(piece, AudioPiece)
                self._buffered_ms -= piece.duration_ms
                pieces.append(piece)
                duration += piece.duration_ms
                continue
            # Nothing more yet: wait only while the client is well ahead and another piece would fit.
            if fill_until is None or self._closed or duration + pieces[-1].duration_ms > limit + 1e-6:
                break
            until = fill_until
            caption = self._entries[0][1] if at else None
            if isinstance(caption, _Caption) and caption.due < until:
                until = caption.due  # (the text before it is due first: it goes, and this fills on after)
            self._changed.clear()
            try:
                async with asyncio.timeout_at(until):
                    await self._changed.wait()
            except TimeoutError:
                if until == fill_until:
                    break
                self._put_back(outlet, pieces, at)
                return None
            except asyncio.CancelledError:
                self._put_back(outlet, pieces, at)
                raise
            if outlet.dropped:
                return None
        if outlet.dropped:
            return None
        data = pieces[0].data if len(pieces) == 1 else b"".join(p.data for p in pieces)
        now = time.monotonic()
        outlet.sent_audio(duration, now)
        sequence, outlet.next_sequence = outlet.next_sequence, outlet.next_sequence + 1
        return AudioChunk(first.turn_id, first.segment_index, sequence, data, duration)

    def _put_back(self, outlet: Outlet, pieces: list[AudioPiece], at: int) -> None:
        for piece in reversed(pieces):
            self._entries.insert(at, (outlet, piece))
            self._buffered_ms += piece.duration_ms
        self._changed.set()


def _continues(entry: _Entry, outlet: Outlet, first: AudioPiece) -> bool:
    item = entry[1]
    return entry[0] is outlet and isinstance(item, AudioPiece) and item.segment_index == first.segment_index


def _ended(end: TurnEnd, outlet: Outlet | None) -> TurnEnded:
    """The end as sent, with its timings fixed now."""
    moments = end.moments

    def since_start(moment: float | None) -> int:
        return 0 if moment is None else round((moment - moments.started) * 1000)

    first_audio = outlet.first_audio_at if outlet is not None else None
    audio_ms = outlet.audio_ms_sent if outlet is not None else 0.0
    spoken = moments.spoken
    timings = TurnTimings(
        first_llm_token_ms=since_start(moments.first_llm_token),
        first_segment_ms=since_start(moments.first_segment),
        first_audio_ms=since_start(first_audio),
        total_ms=since_start(time.monotonic()),
        audio_duration_ms=round(audio_ms),
        speech_end_audio_ms=spoken.speech_end_audio_ms if spoken else 0,
        transcription_ms=round(spoken.transcription_s * 1000) if spoken else 0,
        speech_end_to_first_audio_ms=(
            round((first_audio - spoken.speech_end_at) * 1000) if spoken and first_audio is not None else 0
        ),
    )
    ended = TurnEnded(
        end.turn_id, end.reason, end.spoken_text, timings, moments.usage, end.error, end.history_unsaved, end.failure
    )
    if outlet is not None:
        outlet.finish(ended)
    return ended
