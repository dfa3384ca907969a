"""Quotas per principal (an API key's name, or a client token's key and subject): streams open at
once, turns begun per minute, characters synthesized per minute. Off unless configured; counted by
this process (each replica counts its own).

Over a quota, :class:`QuotaExceeded` ends the stream with RESOURCE_EXHAUSTED and a ``retry-after-s``
trailing metadata entry (whole seconds until the quota has room again). A turn is admitted when the
principal's turns and characters of the last minute are under the limits; its characters are counted
when it ends (what it synthesized), so one long reply may take a principal past the character quota,
and the next turn then waits.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.errors import Overloaded

__all__ = ["QuotaExceeded", "QuotaLimits", "Quotas"]

WINDOW_S = 60.0
_MAX_PRINCIPALS = 100_000


class QuotaExceeded(Overloaded):
    """A principal is over a quota; ``retry_after_s`` says when it has room again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class QuotaLimits:
    """Each 0: no limit."""

    streams: int = 0
    turns_per_minute: int = 0
    chars_per_minute: int = 0

    @property
    def any(self) -> bool:
        return bool(self.streams or self.turns_per_minute or self.chars_per_minute)


@dataclass
class _Usage:
    streams: int = 0
    turns: collections.deque[float] = field(default_factory=collections.deque)
    chars: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)


class Quotas:
    """The counts; one per server. Every method is synchronous (the event loop's own thread)."""

    def __init__(self, limits: QuotaLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def open_stream(self, principal: str) -> None:
        """Count a stream, or raise :class:`QuotaExceeded`."""
        if not self.limits.streams:
            return
        usage = self._of(principal)
        if usage.streams >= self.limits.streams:
            raise QuotaExceeded(
                f"{self.limits.streams} streams are already open with these credentials; close one first", 1
            )
        usage.streams += 1

    def close_stream(self, principal: str) -> None:
        if self.limits.streams and (usage := self._usage.get(principal)) is not None:
            usage.streams = max(usage.streams - 1, 0)
            self._forget_if_idle(principal, usage)

    def admit_turn(self, principal: str, *, count: bool = True) -> None:
        """Whether a turn may begin now (counted unless ``count`` is false); raises :class:`QuotaExceeded`."""
        limits = self.limits
        if not (limits.turns_per_minute or limits.chars_per_minute):
            return
        now = self._clock()
        usage = self._of(principal)
        self._expire(usage, now)
        if limits.turns_per_minute and len(usage.turns) >= limits.turns_per_minute:
            wait = usage.turns[0] + WINDOW_S - now
            raise QuotaExceeded(
                f"these credentials reached their quota of {limits.turns_per_minute} turns a minute",
                max(math.ceil(wait), 1),
            )
        used = sum(n for _, n in usage.chars)
        if limits.chars_per_minute and used >= limits.chars_per_minute:
            wait, left = 0.0, used
            for at, n in usage.chars:  # until enough of the window's characters have aged out
                left -= n
                wait = at + WINDOW_S - now
                if left < limits.chars_per_minute:
                    break
            raise QuotaExceeded(
                f"these credentials reached their quota of {limits.chars_per_minute} characters synthesized a minute",
                max(math.ceil(wait), 1),
            )
        if count and limits.turns_per_minute:
            usage.turns.append(now)

    def count_turn(self, principal: str) -> None:
        """Count a turn admitted without counting (a tentative one, once confirmed)."""
        if self.limits.turns_per_minute:
            self._of(principal).turns.append(self._clock())

    def synthesized(self, principal: str, chars: int) -> None:
        if self.limits.chars_per_minute and chars > 0:
            self._of(principal).chars.append((self._clock(), chars))

    def _of(self, principal: str) -> _Usage:
        usage = self._usage.get(principal)
        if usage is None:
            if len(self._usage) >= _MAX_PRINCIPALS:  # bounded: drop those with nothing in flight
                now = self._clock()
                for name, old in list(self._usage.items()):
                    self._expire(old, now)
                    self._forget_if_idle(name, old)
            usage = self._usage[principal] = _Usage()
        return usage

    def _expire(self, usage: _Usage, now: float) -> None:
        while usage.turns and usage.turns[0] <= now - WINDOW_S:
            usage.turns.popleft()
        while usage.chars and usage.chars[0][0] <= now - WINDOW_S:
            usage.chars.popleft()

    def _forget_if_idle(self, principal: str, usage: _Usage) -> None:
        if not usage.streams and not usage.turns and not usage.chars:
            self._usage.pop(principal, None)
