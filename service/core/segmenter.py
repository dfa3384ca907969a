"""Streaming segmenter: cuts a growing reply into speakable segments.

Pure and incremental: :meth:`Segmenter.push` takes the next text delta and returns the segments it
completed; :meth:`Segmenter.flush` releases whatever is left. No I/O, no clock.

Policy (see :class:`SegmentPolicy`):

- The first segment leaves as early as a natural break allows: the first clause end (``,`` ``;``
  ``:`` or a dash) or sentence end once it holds ``first_min_words`` words, so speech can start while
  the LLM is still writing.
- Later segments are whole sentences, joined while shorter than ``min_chars``, and at most
  ``max_chars`` long: a sentence that runs long is cut at its last clause break (or, failing that, at
  a word break) that fits.
- Line breaks end a segment (lists, headings), and a fenced code block is always one segment of its
  own, never cut inside (the normalizer then keeps it from being read out).
- Sentence boundaries come from pysbd, which knows abbreviations (Dr., e.g., U.S.), initials,
  decimals, currency, times and ellipses. A boundary is only taken where punctuation is followed by
  whitespace *and* the next word has arrived, so "3." waiting for "14" is never cut, and nothing is cut
  inside a URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pysbd

__all__ = ["SegmentPolicy", "Segmenter", "TextSegment", "count_words"]


@dataclass(frozen=True)
class SegmentPolicy:
    """Where segments may be cut."""

    first_min_words: int = 3
    """The first segment needs at least this many words before a break releases it."""
    first_max_chars: int = 120
    """With no break, the first segment is cut at a word break before this length."""
    min_chars: int = 40
    """Later sentences shorter than this are joined with the next one."""
    max_chars: int = 300
    """Later segments are at most this long (longer only when no break exists, as in a long URL)."""

    def __post_init__(self) -> None:
        if self.first_min_words < 1 or self.min_chars < 0:
            raise ValueError("first_min_words must be at least 1 and min_chars not negative")
        if self.first_max_chars < 20 or self.max_chars < self.first_max_chars:
            raise ValueError("need 20 <= first_max_chars <= max_chars")


@dataclass(frozen=True)
class TextSegment:
    """A finished segment: its caption text and where it lies in the turn's whole text."""

    text: str
    start: int
    end: int


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
# Sentence-ending punctuation (with any closing quotes or brackets) followed by whitespace and the
# first character of the next word: only then can a boundary be judged.
_SENTENCE_CANDIDATE = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s+\S)")
# CJK full stops end a sentence on their own.
_CJK_SENTENCE_END = re.compile(r"[。！？]+[」』”’）]*")
_CLAUSE_END = re.compile(r"[,;:](?=\s)|[，、；：]|\s[—–-](?=\s)|—(?=\S)")
_NEWLINE = re.compile(r"\n")
_FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)
_NO_CLAUSE_AFTER = ("e.g.", "i.e.", "cf.", "vs.")
_SBD_CONTEXT_CHARS = 12


def count_words(text: str) -> int:
    """Words in ``text``; each CJK character counts as one."""
    return len(_WORD.findall(text))


class Segmenter:
    """Cuts streamed text into segments. Not thread-safe; one per turn."""

    def __init__(self, policy: SegmentPolicy | None = None) -> None:
        self._policy = policy or SegmentPolicy()
        self._sbd = pysbd.Segmenter(language="en", clean=False, char_span=True)
        self._buffer = ""
        self._offset = 0  # position of _buffer[0] in the turn's whole text
        self._released = 0
        self._sbd_cache: tuple[str, list[int]] = ("", [])

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._buffer

    def push(self, delta: str) -> list[TextSegment]:
        """Add the next piece of text; return the segments it completed."""
        self._buffer += delta
        return self._drain(final=False)

    def flush(self) -> list[TextSegment]:
        """Release everything held (end of stream or a client flush)."""
        return self._drain(final=True)

    # -- internals -------------------------------------------------------------------------------

    def _drain(self, *, final: bool) -> list[TextSegment]:
        segments: list[TextSegment] = []
        while self._buffer:
            cut = self._next_cut(final)
            if cut is None:
                break
            segment = self._release(cut)
            if segment is not None:
                segments.append(segment)
        return segments

    def _release(self, cut: int) -> TextSegment | None:
        raw = self._buffer[:cut]
        text = raw.strip()
        start = self._offset + (len(raw) - len(raw.lstrip()))
        self._buffer = self._buffer[cut:]
        self._offset += cut
        if not text:
            return None
        self._released += 1
        return TextSegment(text=text, start=start, end=start + len(text))

    def _next_cut(self, final: bool) -> int | None:
        """Where the next segment ends in the buffer, or None to wait for more text."""
        buffer = self._buffer
        if not buffer.strip():
            return len(buffer) if final else None
        fence = _FENCE.search(buffer)
        if fence is not None and not buffer[: fence.start()].strip():
            return self._fence_cut(buffer, fence, final)
        region = buffer[: fence.start()] if fence is not None else buffer
        # Text before a code fence, or the end of the stream, is released whatever its length.
        hard_end = fence is not None or final
        cut = self._first_cut(region) if self._released == 0 else self._later_cut(region)
        if cut is None and hard_end:
            return len(region)
        return cut

    def _fence_cut(self, buffer: str, fence: re.Match[str], final: bool) -> int | None:
        """A code block is one segment, from its opening fence to the end of its closing line."""
        marker = fence.group(1)
        body_start = buffer.find("\n", fence.end())
        if body_start >= 0:
            closing = re.compile(rf"^[ \t]*{re.escape(marker)}[^\n]*(\n|$)", re.MULTILINE)
            close = closing.search(buffer, body_start + 1)
            if close is not None and (close.group(1) == "\n" or final):
                return close.end()
        return len(buffer) if final else None

    def _first_cut(self, region: str) -> int | None:
        policy = self._policy
        for end in self._breaks(region, clauses=True):
            if end > policy.first_max_chars:
                break
            if count_words(region[:end]) >= policy.first_min_words:
                return end
        if len(region) > policy.first_max_chars:
            return self._word_cut(region, policy.first_max_chars, policy.first_min_words)
        return None

    def _later_cut(self, region: str) -> int | None:
        policy = self._policy
        line_ends = {m.start() for m in _NEWLINE.finditer(region)}
        for end in self._breaks(region, clauses=False):
            if end > policy.max_chars:
                break
            if end in line_ends or len(region[:end].strip()) >= policy.min_chars:
                return end
        if len(region) <= policy.max_chars:
            return None
        clause_ends = [end for end in self._breaks(region, clauses=True) if end <= policy.max_chars]
        if clause_ends and len(region[: clause_ends[-1]].strip()) >= policy.min_chars:
            return clause_ends[-1]
        return self._word_cut(region, policy.max_chars, 1)

    def _word_cut(self, region: str, limit: int, min_words: int) -> int | None:
        """The last word break before ``limit`` that leaves ``min_words`` words, else the first after."""
        spaces = [m.start() for m in re.finditer(r"\s+", region)]
        usable = [
            pos for pos in spaces if count_words(region[:pos]) >= min_words and not region[:pos].rstrip().endswith(".")
        ]
        before = [pos for pos in usable if pos <= limit]
        if before:
            return before[-1]
        after = [pos for pos in usable if pos > limit]
        return after[0] if after else None

    def _breaks(self, region: str, *, clauses: bool) -> list[int]:
        """Sorted end positions of sentence breaks (and clause breaks when asked) in ``region``."""
        ends = set(self._sentence_ends(region))
        ends.update(m.end() for m in _CJK_SENTENCE_END.finditer(region))
        ends.update(m.start() for m in _NEWLINE.finditer(region))
        if clauses:
            for m in _CLAUSE_END.finditer(region):
                before = region[: m.start() + 1].rstrip(",;:").rsplit(None, 1)[-1:]
                if before and before[0].lower() in _NO_CLAUSE_AFTER:
                    continue
                ends.add(m.end())
        return sorted(end for end in ends if region[:end].strip())

    def _sentence_ends(self, region: str) -> list[int]:
        candidates = {m.end() for m in _SENTENCE_CANDIDATE.finditer(region)}
        if not candidates:
            return []
        # pysbd is the slow part: run it again only when a new candidate appeared or the words
        # after the last one (which its judgement depends on) are still arriving.
        judged_text = region[: max(candidates) + _SBD_CONTEXT_CHARS]
        cached_text, cached_ends = self._sbd_cache
        if cached_text == judged_text:
            return cached_ends
        ends = []
        for span in self._sbd.segment(region):
            end = span.start + len(span.sent.rstrip())
            if end in candidates:
                ends.append(end)
        self._sbd_cache = (judged_text, ends)
        return ends
