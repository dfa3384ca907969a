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
  inside a URL: pysbd judges with the first character of the next word and, if that is no sentence
  end, again with the whole word. A lower-case time followed by a title ("at 5 a.m. Mr. Smith") is not
  a boundary (pysbd would cut there; the Golden Rule Set does not).

Cost: every character is examined a bounded number of times, whatever the deltas, so a turn costs time
linear in its length. Each delta is scanned once for the places that matter (line breaks, clause and
sentence punctuation, word and whitespace starts, code fences), kept in sorted lists; a resumable scan
remembers a run of punctuation or whitespace still growing at the end of the text instead of reading
it again. Deciding a cut looks these lists up by bisection and goes on from where the previous
decision stopped. A sentence candidate is judged only when the policy would take it, on a window of
at most ``_SBD_BEFORE`` characters (and ``_SBD_PREVIOUS`` candidates) before it and the first
character, then the whole (up to ``_SBD_AFTER`` characters), of the next word after it: windows fixed
by the text alone, so the verdict does not depend on how the text was split. Where pysbd's verdict is
certain (a plain word before a letter, a title such as "Dr.", a capital initial) it is not asked;
otherwise it sees only that window, never the whole text (it is slow, and super-linear on some
inputs). :attr:`Segmenter.work` counts the characters examined, as a cost meter for tests and
benchmarks.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import pysbd
import regex
from pysbd.exclamation_words import ExclamationWords
from pysbd.lang.english import English

__all__ = ["SegmentPolicy", "Segmenter", "TextSegment", "count_words"]


@dataclass(frozen=True)
class SegmentPolicy:
    """Where segments may be cut."""

    first_min_words: int = 3
    """The first segment needs at least this many words before a break releases it."""
    first_max_chars: int = 120
    """With no break, the first segment is cut at a word break before this length."""
    heads: bool = True
    """The first segment may also end before a word that opens a phrase ("because", "with", "to"),
    once it holds ``first_min_words`` words: a short head of the reply that can be spoken while the
    rest is written."""
    min_chars: int = 40
    """Later sentences shorter than this are joined with the next one."""
    max_chars: int = 300
    """Later segments are at most this long (longer only when no break exists, as in a long URL, and
    never more than ``HARD_MAX_FACTOR`` times this: a run without a break is cut inside)."""

    def __post_init__(self) -> None:
        if self.first_min_words < 1 or self.min_chars < 0:
            raise ValueError("first_min_words must be at least 1 and min_chars not negative")
        if self.first_max_chars < 20 or self.max_chars < self.first_max_chars:
            raise ValueError("need 20 <= first_max_chars <= max_chars")


HARD_MAX_FACTOR = 4
"""No segment outside a code block is longer than this many times ``max_chars``."""


@dataclass(frozen=True)
class TextSegment:
    """A finished segment: its caption text and where it lies in the turn's whole text."""

    text: str
    start: int
    end: int
    open_end: bool = False
    """The segment ends inside a sentence, after a word and with no punctuation (a head cut before a
    phrase, or a long text cut at a word): the TTS engine should read it as going on."""


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
# Where a word of _WORD starts: a CJK character, or a word character not right after another one.
_WORD_START = re.compile(rf"[{_CJK}]|(?<![^\W{_CJK}])[^\W{_CJK}]")
_LATIN_WORD_CHAR = re.compile(rf"[^\W{_CJK}]")
_WS_START = re.compile(r"(?<!\s)\s")
# Whitespace where a long text may be cut at a word: not right after a period ("Dr. Smith", "3. 14").
_CUTTABLE_WS_START = re.compile(r"(?<![\s.])\s")
_NON_SPACE = re.compile(r"\S")
_NEWLINE = re.compile(r"\n")
# A sentence candidate is a run of sentence punctuation, with any closing quotes or brackets,
# followed by whitespace and the first character of the next word: only then can it be judged.
_CANDIDATE = re.compile(r"[.!?…]+([\"'”’)\]]*)(\s*)")
_SENTENCE_PUNCT_RUN = re.compile(r"[.!?…]*")
_CLOSERS_RUN = re.compile(r"[\"'”’)\]]*")
_SPACE_RUN = re.compile(r"\s*")
_ELLIPSIS_CHARS = ".…"
_SPACED_DOTS = re.compile(r"[.…\s]*")
# CJK full stops end a sentence on their own (once the character after them shows the run is over).
_CJK_END = re.compile(r"[。！？]+([」』”’）]*)")
_CJK_PUNCT_RUN = re.compile(r"[。！？]*")
_CJK_CLOSERS_RUN = re.compile(r"[」』”’）]*")
# A letter of another script than Latin: sentence punctuation right before one ends a sentence
# ("egg?で…") although no whitespace follows.
_OTHER_SCRIPT = regex.compile(r"[^\P{L}\p{Latin}]")
_CLOSERS = "\"'”’)]"
# A comma or semicolon after a letter ends a clause as it arrives (nothing can make it part of a
# number); otherwise clause punctuation needs the whitespace after it ("380,000", "5:30", "http:").
_CLAUSE_END = re.compile(r"(?P<now>(?<=[^\W\d_])[,;])|[,;:](?=\s)|[，、；：]|\s[—–-](?=\s)|—(?=\S)")
# ...but only after a plain word, not inside a URL, an address or a number ("example.com/a,b").
_NOT_PLAIN = re.compile(r"[\d/:@.=&?#%_\\]")
_PLAIN_WORD_CHARS = 24
# "Jan. 5th, 2024", "the 5th of January, 2024": the comma before the year is inside a date.
_MONTH_NAME = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*"
_MONTH_BEFORE_COMMA = re.compile(rf"\b{_MONTH_NAME}\.?(?:\s+\d{{1,2}}(?:st|nd|rd|th)?)?$")
_YEAR_AFTER_COMMA = re.compile(r"\s+\d{4}(?!\d)(?=\W|$)")
_YEAR_PREFIX = re.compile(r"\s*\d{0,4}")
_DATE_TAIL = 20
_YEAR_WORD = 7  # the whitespace, four digits and the character after them
# A reply that opens with a word like "Yes," may say it on its own: the listener hears it at once.
_INTERJECTION = re.compile(
    r"(?:yes|yeah|yep|no|nope|sure|okay|ok|well|oh|ah|hmm|hi|hello|hey|certainly|absolutely|alright|"
    r"right|great|of course)(?:,|!(?=\s))",
    re.IGNORECASE,
)
_INTERJECTION_CHARS = 16
# Words that open a phrase: a short first segment may end before one ("The sky is blue | because…").
_OPENERS = (
    "and but or so yet because although though while whereas when whenever where wherever if unless until "
    "since before after which who whom whose that in on at with for from by about through during without into "
    "over under across between around behind among along against toward towards within beyond near to"
).split()
# An opener after a letter and one space (not after punctuation, which is a clause or sentence end).
_OPENER = re.compile(rf"(?<=[^\W\d_] )(?:{'|'.join(_OPENERS)})(?=\s)")
_ENDS_WITH_SENTENCE_PUNCT = re.compile(r"[.!?…。！？][\"'”’)\]」』）]*$")
_OPENER_RESCAN = max(map(len, _OPENERS)) + 2
# A head never ends on a word that needs what follows it ("the", "of", another opener).
_NO_HEAD_AFTER = frozenset(
    (*_OPENERS, "a", "an", "the", "of", "not", "no", "very", "than", "as", "more", "less", "most", "my", "your")
)
_FENCE_INDENT = re.compile(r"[ \t]*")
_FENCE_LINE = re.compile(r"(?<=\n)[ \t]*(```|~~~)")
_FENCE_MARKERS = ("```", "~~~")
_NO_CLAUSE_AFTER = ("e.g.", "i.e.", "cf.", "vs.")

# pysbd's window around a candidate: at most this many characters before it (and never more than
# _SBD_PREVIOUS candidates back), and the next word, up to this many characters after it.
_SBD_BEFORE = 160
_SBD_PREVIOUS = 3
_SBD_AFTER = 48
_SBD_MEMO_SIZE = 256
_SCRIPT_WORD = 24  # how far back the word before a period followed by another script is looked for
# Keep this much text before the region when dropping released text (look-behinds need a character).
_KEEP_BEFORE = 16
_COMPACT_AFTER = 512

# A plain sentence end pysbd always agrees with: a word of letters (not one of its abbreviations,
# list numerals or exclamation words) or a number of three digits or more, ending in one ".", "?" or
# "!", one space, a letter (a capital after "!"), and nothing in the window that its quote, bracket,
# dash or non-ASCII rules act on.
_PLAIN_WINDOW = re.compile(r"[A-Za-z0-9 ,;:.?!'’-]*")
_LONE_APOSTROPHE = re.compile(r"(?<![A-Za-z])['’]|['’](?![A-Za-z])")
_PLAIN_WORD = re.compile(r"[A-Za-z][a-z]+")
_ROMAN = re.compile(r"[ivxlcdm]+")
_YEAR = re.compile(r"[0-9]{3,}")  # three digits or more: not a list number to pysbd
_LAST_LETTERS = re.compile(r"(?:^|(?<=\s))[A-Za-z]+$")
_MULTI_PERIOD = re.compile(r"(?:^|(?<=\s))[A-Za-z](?:\.[A-Za-z])+\.$")
_TITLES = frozenset(a for a in English.Abbreviation.PREPOSITIVE_ABBREVIATIONS if len(a) > 1)
_INITIALS = frozenset("ABCDEFGHJKLMNOPQRSTUWXYZ")
# What pysbd may take for a list item ("a.", "(b)", "iv)", "2.", "3)") and break the text before.
_LIST_ITEM = re.compile(r"(?:^|(?<=[\s(]))(?:[a-z]|[ivxlcdm]+)[.)]|(?:^|(?<=[\s\-⁃]))[0-9]{1,2}\.|[0-9]\)")
_ABBREVIATIONS = frozenset(English.Abbreviation.ABBREVIATIONS)
_EXCLAMATION_WORDS = frozenset(ExclamationWords.EXCLAMATION_WORDS)
# Golden Rule Set: "At 5 a.m. Mr. Smith went to the bank." is one sentence.
_LOWER_TIME = ("a.m.", "p.m.")
_TITLE = re.compile(r"(?:Mr|Mrs|Ms|Mx|Dr|Prof|Rev|Hon|St|Sr|Jr|Capt|Col|Gen|Lt|Sgt|Gov|Sen|Rep|Messrs|Mme|Mlle)\.")

_WAIT = -1
_NEVER = 1 << 62
# Phases of the resumable scans.
_SEARCH, _PUNCT, _CLOSE, _SPACE = range(4)
_INDENT, _MARKER, _NO_FENCE = range(1, 4)


def count_words(text: str) -> int:
    """Words in ``text``; each CJK character counts as one."""
    return len(_WORD.findall(text))


def _run_end(run: re.Pattern[str], text: str, pos: int) -> int:
    """Where a run of ``run`` (a pattern that may match nothing) starting at ``pos`` ends."""
    m = run.match(text, pos)
    return pos if m is None else m.end()


class Segmenter:
    """Cuts streamed text into segments. Not thread-safe; one per turn."""

    def __init__(self, policy: SegmentPolicy | None = None) -> None:
        self._policy = policy or SegmentPolicy()
        self._sbd = pysbd.Segmenter(language="en", clean=False, char_span=True)
        self._sbd_memo: dict[str, frozenset[int]] = {}
        self._work = 0
        # The text from turn position _base on; all positions below are positions in the turn's text.
        self._text = ""
        self._base = 0
        self._start = 0  # where the unreleased text (the region) starts
        self._released = 0
        # What the scan found, in increasing order; the scan has read everything before _scanned.
        self._scanned = 0
        self._newlines: list[int] = []
        self._ws_starts: list[int] = []
        self._cuttable: list[int] = []
        self._word_starts: list[int] = []
        self._clause_starts: list[int] = []
        self._clause_ends: list[int] = []
        self._cjk_ends: list[int] = []
        self._cand_ends: list[int] = []  # end of the punctuation and closers
        self._cand_next: list[int] = []  # first character of the next word
        self._cand_punct: list[int] = []  # start of the punctuation
        self._fence_starts: list[int] = []  # line starts of ``` or ~~~ lines
        self._fence_marker_ends: list[int] = []
        self._fence_markers: list[str] = []
        self._fence_by_marker: dict[str, tuple[list[int], list[int]]] = {m: ([], []) for m in _FENCE_MARKERS}
        self._lists = (self._newlines, self._ws_starts, self._cuttable, self._word_starts, self._cjk_ends)
        # Resumable scans, for a run still growing at the end of the text: its phase, where it
        # started and the position to go on from.
        self._clause_pos = 0  # clause ends are short: the scan reads the last two characters again
        self._head_cuts: list[int] = []  # the space before a phrase opener (first segment only)
        self._opener_pos = 0  # openers are short too: the scan reads the last few characters again
        self._first_open = False  # the first segment ended without sentence punctuation
        self._cjk_scan = (_SEARCH, 0)  # phase, position
        self._sentence_scan = (_SEARCH, 0, 0, 0)  # phase, punctuation start, candidate end, position
        self._fence_scan = (_SEARCH, 0, 0)  # phase, line start, position
        # The region's state, found once and kept until the next release.
        self._lead: int | None = None
        self._lead_pos = 0
        self._head_fence = (_INDENT, 0, "")  # phase, position, marker: a fence at the region's start
        self._checked = 0  # breaks before this were considered and not taken
        self._overflow: tuple[int | None] | None = None  # the clause cut of a region past max_chars

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._text[self._start - self._base :]

    @property
    def work(self) -> int:
        """Cost meter: characters examined so far (scanned, looked at around a candidate, handed to
        pysbd, released) plus one per break considered. Grows linearly with the text, whatever the
        deltas; for tests and benchmarks, not a stable unit."""
        return self._work

    def push(self, delta: str) -> list[TextSegment]:
        """Add the next piece of text; return the segments it completed."""
        self._compact()
        self._text += delta
        self._work += len(delta) + 1
        self._scan()
        return self._drain(final=False)

    def flush(self) -> list[TextSegment]:
        """Release everything held (end of stream or a client flush)."""
        return self._drain(final=True)

    # -- the scan ----------------------------------------------------------------------------------

    def _end(self) -> int:
        return self._base + len(self._text)

    def _scan(self) -> None:
        """Record what the new text holds; each character is read a bounded number of times."""
        text, base, end = self._text, self._base, self._end()
        start = self._scanned
        if start >= end:
            return
        rel = start - base
        self._work += 5 * (end - start)
        self._newlines.extend(base + m.start() for m in _NEWLINE.finditer(text, rel))
        self._ws_starts.extend(base + m.start() for m in _WS_START.finditer(text, rel))
        self._cuttable.extend(base + m.start() for m in _CUTTABLE_WS_START.finditer(text, rel))
        self._word_starts.extend(base + m.start() for m in _WORD_START.finditer(text, rel))
        # Clause ends look at most one character ahead and one behind: the last two characters are
        # read again (_clause_pos is never more than two before the end).
        self._work += start - self._clause_pos
        for m in _CLAUSE_END.finditer(text, self._clause_pos - base):
            if m.lastgroup == "now" and not self._after_plain_word(m.start()):
                if base + m.end() == end:
                    self._clause_pos = base + m.start()  # judged again once the next character is here
                    break
                if not text[m.end()].isspace():
                    continue  # inside a URL or a number
            self._clause_starts.append(base + m.start())
            self._clause_ends.append(base + m.end())
            self._clause_pos = base + m.end()
        self._clause_pos = max(self._clause_pos, end - 2)
        if self._released == 0 and self._policy.heads:  # only the first segment is cut before a phrase
            self._work += max(0, start - self._opener_pos)
            for m in _OPENER.finditer(text, max(self._opener_pos, self._start) - base):
                self._head_cuts.append(base + m.start() - 1)
                self._opener_pos = base + m.end()
            self._opener_pos = max(self._opener_pos, end - _OPENER_RESCAN)
        self._scan_sentences(text, base, end)
        self._scan_cjk(text, base, end)
        self._scan_fences(text, base, end)
        self._scanned = end

    def _after_plain_word(self, rel: int) -> bool:
        """Whether the word before the text position ``rel`` is a plain word (no digits, no URL)."""
        text = self._text
        begin = max(0, rel - _PLAIN_WORD_CHARS)
        space = max(text.rfind(" ", begin, rel), text.rfind("\n", begin, rel), text.rfind("\t", begin, rel))
        self._work += _PLAIN_WORD_CHARS
        if space < 0 and (begin > 0 or self._base > 0):
            return False  # a longer word than any plain one (or one that began before the text kept)
        return _NOT_PLAIN.search(text, space + 1, rel) is None

    def _scan_sentences(self, text: str, base: int, end: int) -> None:
        phase, punct, close, pos = self._sentence_scan
        # First go on with a run that reached the end of the text last time.
        if phase == _PUNCT:
            pos = base + _run_end(_SENTENCE_PUNCT_RUN, text, pos - base)
            phase = _CLOSE if pos < end else _PUNCT
        if phase == _CLOSE:
            pos = close = base + _run_end(_CLOSERS_RUN, text, pos - base)
            phase = _CLOSE if pos == end else _SPACE if text[pos - base].isspace() else _SEARCH
            if phase == _SEARCH and _OTHER_SCRIPT.match(text, pos - base):
                self._add_candidate(punct, close, pos)
        if phase == _SPACE:
            pos = base + _run_end(_SPACE_RUN, text, pos - base)
            if pos < end:
                self._add_candidate(punct, close, pos)
                phase = _SEARCH
        if phase == _SEARCH:
            for m in _CANDIDATE.finditer(text, pos - base):
                space_start, space_end = m.span(2)
                if base + space_end < end:
                    if space_end > space_start or _OTHER_SCRIPT.match(text, space_end):
                        self._add_candidate(base + m.start(), base + space_start, base + space_end)
                    continue
                # The run reaches the end of the text: it may go on.
                punct, close = base + m.start(), base + space_start
                if space_end > space_start:
                    phase = _SPACE
                elif m.end(1) > m.start(1):
                    phase = _CLOSE
                else:
                    phase = _PUNCT
            pos = end
        self._sentence_scan = (phase, punct, close, pos)

    def _add_candidate(self, punct: int, close: int, after: int) -> None:
        self._cand_punct.append(punct)
        self._cand_ends.append(close)
        self._cand_next.append(after)

    def _scan_cjk(self, text: str, base: int, end: int) -> None:
        phase, pos = self._cjk_scan
        if phase == _PUNCT:
            pos = base + _run_end(_CJK_PUNCT_RUN, text, pos - base)
            phase = _CLOSE if pos < end else _PUNCT
        if phase == _CLOSE:
            pos = base + _run_end(_CJK_CLOSERS_RUN, text, pos - base)
            if pos < end:
                self._cjk_ends.append(pos)
                phase = _SEARCH
        if phase == _SEARCH:
            for m in _CJK_END.finditer(text, pos - base):
                if base + m.end() < end:
                    self._cjk_ends.append(base + m.end())
                else:  # the run reaches the end of the text: it may go on
                    phase = _CLOSE if m.end(1) > m.start(1) else _PUNCT
            pos = end
        self._cjk_scan = (phase, pos)

    def _scan_fences(self, text: str, base: int, end: int) -> None:
        """Lines that start (after spaces or tabs) with ``` or ~~~."""
        phase, line, pos = self._fence_scan
        if phase != _SEARCH:  # a line start still being read
            phase, pos, marker = self._fence_step(text, base, end, phase, pos)
            if marker is not None:
                self._add_fence(line, pos, marker)
            if phase in (_INDENT, _MARKER):
                self._fence_scan = (phase, line, pos)
                return
        for m in _FENCE_LINE.finditer(text, pos - base):
            self._add_fence(base + m.start(), base + m.end(), m.group(1))
        # The last line may still become a fence.
        newline = text.rfind("\n", pos - base)
        phase = _SEARCH
        if newline >= 0:
            line = base + newline + 1
            phase, pos, marker = self._fence_step(text, base, end, _INDENT, line)
            if phase not in (_INDENT, _MARKER):
                phase = _SEARCH
        self._fence_scan = (phase, line, end if phase == _SEARCH else pos)

    def _add_fence(self, line: int, marker_end: int, marker: str) -> None:
        self._fence_starts.append(line)
        self._fence_marker_ends.append(marker_end)
        self._fence_markers.append(marker)
        starts, marker_ends = self._fence_by_marker[marker]
        starts.append(line)
        marker_ends.append(marker_end)

    @staticmethod
    def _fence_step(text: str, base: int, end: int, phase: int, pos: int) -> tuple[int, int, str | None]:
        """Go on reading a possible fence line: (phase, position, marker once found)."""
        if phase == _INDENT:
            pos = base + _run_end(_FENCE_INDENT, text, pos - base)
            if pos == end:
                return _INDENT, pos, None
            phase = _MARKER
        head = text[pos - base : pos - base + 3]
        for marker in _FENCE_MARKERS:
            if head == marker:
                return _SEARCH, pos + 3, marker
            if len(head) < 3 and marker.startswith(head):
                return _MARKER, pos, None
        return _NO_FENCE, pos, None

    # -- the region: the text not yet released -----------------------------------------------------

    def _new_region(self) -> None:
        self._lead = None
        self._lead_pos = self._start
        self._head_fence = (_INDENT, self._start, "")
        self._checked = self._start
        self._overflow = None

    def _find_lead(self) -> int | None:
        """The region's first non-whitespace character."""
        if self._lead is None:
            base = self._base
            m = _NON_SPACE.search(self._text, self._lead_pos - base)
            self._work += (m.start() + base if m else self._end()) - self._lead_pos + 1
            if m is None:
                self._lead_pos = self._end()
            else:
                self._lead = base + m.start()
        return self._lead

    def _region_fence(self) -> tuple[int, str, int] | None:
        """The first fence in the region: (start, marker, end of the marker)."""
        phase, pos, marker = self._head_fence
        if phase in (_INDENT, _MARKER):
            read_from = pos
            phase, pos, found = self._fence_step(self._text, self._base, self._end(), phase, pos)
            self._head_fence = (phase, pos, found or "")
            self._work += pos - read_from + 3
            marker = found or ""
        if marker:
            return self._start, marker, pos
        i = bisect_right(self._fence_starts, self._start)
        if i < len(self._fence_starts):
            return self._fence_starts[i], self._fence_markers[i], self._fence_marker_ends[i]
        return None

    def _region_word(self, k: int) -> int | None:
        """Where the region's ``k``-th word starts (``count_words`` of the text up to there is k - 1)."""
        rs = self._start
        i = bisect_left(self._word_starts, rs)
        if (i == len(self._word_starts) or self._word_starts[i] != rs) and rs < self._end():
            if _LATIN_WORD_CHAR.match(self._text, rs - self._base):  # the region starts inside a word
                if k == 1:
                    return rs
                k -= 1
        j = i + k - 1
        return self._word_starts[j] if j < len(self._word_starts) else None

    # -- cutting -----------------------------------------------------------------------------------

    def _drain(self, *, final: bool) -> list[TextSegment]:
        segments: list[TextSegment] = []
        while self._start < self._end():
            cut = self._next_cut(final)
            if cut is None:
                break
            segment = self._release(cut, final)
            if segment is not None:
                segments.append(segment)
        return segments

    def _release(self, cut: int, final: bool) -> TextSegment | None:
        base = self._base
        raw = self._text[self._start - base : cut - base]
        self._work += len(raw)
        text = raw.strip()
        start = self._start + (len(raw) - len(raw.lstrip()))
        self._start = cut
        self._new_region()
        if not text:
            return None
        # Cut inside a line (not at its end, nor the text's): a clause, a head or a word cut.
        at_end = cut == self._end()
        ends_line = "\n" in raw[len(raw.rstrip()) :] or (not at_end and self._text[cut - base] in "\r\n")
        inside_line = not ends_line and not (at_end and final)
        if self._released == 0:
            # Whether the first segment ended inside its sentence is known once the next word is
            # here (a line break may come first): see _later_cut.
            self._first_open = _ENDS_WITH_SENTENCE_PUNCT.search(text) is None
        self._released += 1
        open_end = inside_line and text[-1].isalnum()
        return TextSegment(text=text, start=start, end=start + len(text), open_end=open_end)

    def _compact(self) -> None:
        """Drop released text (and what the scan found in it) once it is most of what is held, so
        that appending a delta copies little more than the unreleased text."""
        dead = self._start - self._base
        if dead < _COMPACT_AFTER or 2 * dead < len(self._text):
            return
        base = self._start - _KEEP_BEFORE
        self._text = self._text[base - self._base :]
        self._base = base
        self._work += len(self._text)
        for values in self._lists:
            del values[: bisect_left(values, base)]
        for starts, marker_ends in self._fence_by_marker.values():
            k = bisect_left(starts, base)
            del starts[:k], marker_ends[:k]
        k = bisect_left(self._clause_starts, base)
        del self._clause_starts[:k], self._clause_ends[:k]
        del self._head_cuts[: bisect_left(self._head_cuts, base)]
        k = bisect_left(self._cand_punct, base)
        del self._cand_punct[:k], self._cand_ends[:k], self._cand_next[:k]
        k = bisect_left(self._fence_starts, base)
        del self._fence_starts[:k], self._fence_marker_ends[:k], self._fence_markers[:k]

    def _next_cut(self, final: bool) -> int | None:
        """Where the next segment ends, or None to wait for more text."""
        self._work += 1
        end = self._end()
        lead = self._find_lead()
        if lead is None:
            return end if final else None
        fence = self._region_fence()
        if fence is not None and lead >= fence[0]:
            return self._fence_cut(fence, final)
        region_end = fence[0] if fence is not None else end
        # Text before a code fence, or the end of the stream, is released whatever its length.
        closed = fence is not None or final
        if self._released == 0:
            cut = self._first_cut(region_end, closed)
        else:
            cut = self._later_cut(lead, region_end, closed)
        if cut is None and closed:
            cut = region_end
        # A run with no break to end at (a "word" of thousands of characters, as a model that repeats
        # a character writes) is cut inside: no segment the TTS gets is unbounded.
        hard = self._start + self._policy.max_chars * HARD_MAX_FACTOR
        if (cut is None and region_end > hard) or (cut is not None and cut > hard):
            return hard
        return cut

    def _fence_cut(self, fence: tuple[int, str, int], final: bool) -> int | None:
        """A code block is one segment, from its opening fence to the end of its closing line."""
        end = self._end()
        _, marker, marker_end = fence
        i = bisect_left(self._newlines, marker_end)
        if i < len(self._newlines):
            starts, marker_ends = self._fence_by_marker[marker]
            j = bisect_left(starts, self._newlines[i] + 1)
            if j < len(starts):
                k = bisect_left(self._newlines, marker_ends[j])
                if k < len(self._newlines):
                    return self._newlines[k] + 1
                if final:
                    return end
        return end if final else None

    def _first_cut(self, region_end: int, closed: bool) -> int | None:
        policy = self._policy
        if policy.heads and (interjection := self._interjection()) is not None:
            return interjection
        first_word = self._region_word(policy.first_min_words)
        if first_word is None:
            return None
        limit = min(self._start + policy.first_max_chars, region_end)
        found = self._find_break(max(self._checked, first_word + 1), limit, None, region_end, closed, True)
        if found is not None:
            return None if found == _WAIT else found
        if region_end - self._start > policy.first_max_chars and not self._sentence_end_coming(
            first_word + 1, limit, closed
        ):
            return self._word_cut(policy.first_max_chars, first_word, region_end)
        return None

    def _interjection(self) -> int | None:
        """The end of "Yes," (and the like) opening the reply."""
        lead = self._find_lead()
        if lead is None:
            return None
        m = _INTERJECTION.match(self._text, lead - self._base, lead - self._base + _INTERJECTION_CHARS)
        self._work += _INTERJECTION_CHARS
        return None if m is None else self._base + m.end()

    def _later_cut(self, lead: int, region_end: int, closed: bool) -> int | None:
        policy = self._policy
        # The rest of a sentence the first segment ended inside of leaves at its end, however short:
        # it plays right after that short first segment.
        first_open = (
            self._released == 1
            and self._first_open
            and "\n" not in self._text[self._start - self._base : lead - self._base]
        )
        long_enough = lead if first_open else lead + policy.min_chars
        limit = min(self._start + policy.max_chars, region_end)
        found = self._find_break(max(self._checked, lead + 1), limit, long_enough, region_end, closed, False)
        if found is not None:
            return None if found == _WAIT else found
        if region_end - self._start <= policy.max_chars or self._sentence_end_coming(long_enough, limit, closed):
            return None
        if self._overflow is None:
            self._overflow = (self._last_clause(long_enough, limit),)
        if self._overflow[0] is not None:
            return self._overflow[0]
        first_word = self._region_word(1)
        return None if first_word is None else self._word_cut(policy.max_chars, first_word, region_end)

    def _find_break(
        self, pos: int, limit: int, long_enough: int | None, region_end: int, closed: bool, clauses: bool
    ) -> int | None:
        """The first break from ``pos`` to ``limit`` that the policy takes: a line end, a CJK sentence
        end, a sentence end pysbd confirms, or (``clauses``) a clause end; sentence ends only from
        ``long_enough`` on. None if there is none (yet), _WAIT at a candidate that cannot be judged
        yet. ``_checked`` keeps how far breaks were refused, so the next call goes on from there (a
        break refused once is refused for good while the region lasts)."""
        newlines, cjk_ends, cand_ends, clause_ends = (
            self._newlines,
            self._cjk_ends,
            self._cand_ends,
            self._clause_ends,
        )
        # Sentence ends before long_enough are refused anyway: skip them.
        sentence_from = pos if long_enough is None else max(pos, long_enough)
        i_newline = bisect_left(newlines, pos)
        i_cjk = bisect_left(cjk_ends, sentence_from)
        i_cand = bisect_left(cand_ends, sentence_from)
        i_clause = bisect_left(clause_ends, pos) if clauses else len(clause_ends)
        heads = self._head_cuts
        i_head = bisect_left(heads, pos) if clauses else len(heads)
        while True:
            self._work += 1
            newline = newlines[i_newline] if i_newline < len(newlines) else _NEVER
            cjk = cjk_ends[i_cjk] if i_cjk < len(cjk_ends) else _NEVER
            cand = cand_ends[i_cand] if i_cand < len(cand_ends) else _NEVER
            clause = clause_ends[i_clause] if i_clause < len(clause_ends) else _NEVER
            head = heads[i_head] if i_head < len(heads) else _NEVER
            at = min(newline, cjk, cand, clause, head)
            if at > limit:
                self._checked = pos
                return None
            self._checked = at
            if at in (newline, cjk):
                return at
            if clause == at:
                taken = not self._clause_excluded(i_clause) and self._not_inside_a_date(i_clause, region_end, closed)
                if taken is None:
                    return _WAIT  # until the word after the comma shows whether it is a year
                if taken:
                    return at
                i_clause += 1
            if head == at:
                if not self._head_excluded(at):
                    return at
                i_head += 1
            if cand == at:
                if self._cand_next[i_cand] < region_end:
                    verdict = self._judge(i_cand, region_end, closed)
                    if verdict is None:
                        return _WAIT  # until the next word has arrived
                    if verdict:
                        return at
                i_cand += 1
            pos = at + 1

    def _sentence_end_coming(self, low: int, limit: int, closed: bool) -> bool:
        """Whether sentence punctuation between ``low`` and ``limit`` waits for its next word: a
        candidate that text arriving whole would already show, so the cut waits for it."""
        phase, _, close, _ = self._sentence_scan
        return not closed and phase == _SPACE and low <= close <= limit

    def _last_clause(self, long_enough: int, limit: int) -> int | None:
        """The last clause end from ``long_enough`` to ``limit``."""
        i = bisect_right(self._clause_ends, limit) - 1
        while i >= 0 and self._clause_ends[i] >= long_enough:
            self._work += 1
            if not self._clause_excluded(i) and self._not_inside_a_date(i, _NEVER, True):
                return self._clause_ends[i]
            i -= 1
        return None

    def _word_cut(self, limit: int, first_word: int, region_end: int) -> int | None:
        """The last word break before ``limit`` after ``first_word``, else the first after."""
        cuttable = self._cuttable
        i = bisect_right(cuttable, self._start + limit) - 1
        if i >= 0 and cuttable[i] > first_word:
            return cuttable[i]
        i = bisect_right(cuttable, max(self._start + limit, first_word))
        if i < len(cuttable) and cuttable[i] < region_end:
            return cuttable[i]
        return None

    def _head_excluded(self, cut: int) -> bool:
        """Whether the word before a phrase opener needs what follows it ("the", "of", "and")."""
        text, base = self._text, self._base
        tail = text[max(self._start, cut - 8) - base : cut - base]
        self._work += len(tail)
        words = tail.split()
        return not words or words[-1].lower() in _NO_HEAD_AFTER

    def _not_inside_a_date(self, index: int, region_end: int, closed: bool) -> bool | None:
        """False for the comma of "Jan. 5th, 2024" or "5th of January, 2024" (a month, maybe a day,
        then a year); None while the word after the comma has not shown whether it is a year."""
        text, base = self._text, self._base
        start = self._clause_starts[index]
        if text[start - base] != ",":
            return True
        tail = text[max(self._start, start - _DATE_TAIL) - base : start - base]
        self._work += len(tail) + _YEAR_WORD
        if _MONTH_BEFORE_COMMA.search(tail) is None:
            return True
        after = self._clause_ends[index]
        end = min(self._end(), region_end)
        word = text[after - base : min(end, after + _YEAR_WORD) - base]
        if _YEAR_AFTER_COMMA.match(word):
            return False
        if not closed and len(word) < _YEAR_WORD and _YEAR_PREFIX.fullmatch(word):
            return None
        return True

    def _clause_excluded(self, index: int) -> bool:
        """Whether the clause end follows "e.g." and the like (the region's last word before it)."""
        text, base, rs = self._text, self._base, self._start
        pos = self._clause_starts[index] + 1
        while pos > rs and text[pos - 1 - base] in ",;:":
            pos -= 1
            self._work += 1
        if pos > rs and text[pos - 1 - base].isspace():
            run = bisect_right(self._ws_starts, pos - 1) - 1
            pos = max(self._ws_starts[run], rs) if run >= 0 else rs
        if pos <= rs:
            return False
        tail = text[max(rs, pos - 5) - base : pos - base]
        self._work += len(tail)
        word = tail.split()[-1] if tail.split() else ""
        if word == tail and pos - 5 >= rs:
            return False  # longer than any of the words
        return word.lower() in _NO_CLAUSE_AFTER

    # -- judging a sentence candidate --------------------------------------------------------------

    def _judge(self, index: int, region_end: int, closed: bool) -> bool | None:
        """Whether the candidate ends a sentence: seen with the first character of the next word (so
        a segment leaves as soon as it can), else with that whole word (up to ``_SBD_AFTER``
        characters); None while the whole word has not arrived."""
        close, after = self._cand_ends[index], self._cand_next[index]
        if after == close:
            return self._script_change_verdict(index)
        start = max(self._start, close - _SBD_BEFORE)
        if index >= _SBD_PREVIOUS:
            start = max(start, self._cand_ends[index - _SBD_PREVIOUS])
        single = self._cand_punct[index] == close - 1  # one punctuation mark, no closing quote
        text, base = self._text, self._base
        # A spaced ellipsis (". . . .") goes on after the space: the next word is the first one after
        # it, which decides where (and whether) its sentence ends.
        word = after
        if text[after - base] in _ELLIPSIS_CHARS:
            m = _SPACED_DOTS.match(text, after - base, after - base + _SBD_AFTER)
            word = after if m is None else base + m.end()
            self._work += word - after
            if word >= min(self._end(), region_end):
                if not closed:
                    return None
                word = min(self._end(), region_end) - 1
        # "5 a.m. M" may go on as "Mr." (no sentence end) or "Monday" (maybe one): wait for the word.
        time_then_capital = text[close - 4 - base : close - base] in _LOWER_TIME and text[word - base].isupper()
        if not time_then_capital and self._verdict(start, close, after, word + 1, single):
            return True
        limit = word + _SBD_AFTER
        i = bisect_right(self._ws_starts, word)
        word_end = self._ws_starts[i] if i < len(self._ws_starts) else None
        if word_end is not None and word_end <= limit:
            end = word_end
        elif self._end() >= limit:
            end = limit
        elif closed:
            end = self._end()
        else:
            return None
        end = min(end, region_end)
        if end <= word + 1 and not time_then_capital:
            return False  # the same text as above
        return self._verdict(start, close, after, end, single)

    def _script_change_verdict(self, index: int) -> bool:
        """Sentence punctuation followed at once by a letter of another script ("egg?で"): a sentence
        end, unless it is one period after an abbreviation, a title, an initial, an abbreviation with
        periods inside or a number of one or two digits (a list item or a decimal)."""
        punct, close = self._cand_punct[index], self._cand_ends[index]
        text, base = self._text, self._base
        run = text[punct - base : close - base].rstrip(_CLOSERS)
        self._work += close - punct + _SCRIPT_WORD
        if run != ".":
            return True
        before = text[max(self._start, punct - _SCRIPT_WORD) - base : punct - base]
        word = before.split()[-1] if before.split() else ""
        word = word.lstrip("\"'“‘([")
        if not word or not word[-1].isalnum():
            return True
        if "." in word or word.isdigit() and len(word) < 3:
            return False
        lowered = word.lower()
        return lowered not in _ABBREVIATIONS and word not in _INITIALS

    def _verdict(self, start: int, close: int, after: int, end: int, single: bool) -> bool:
        """pysbd's verdict on the candidate ending at ``close``, seeing the text from ``start`` to
        ``end`` (or the Golden Rule Set's, or a certain one found without asking it)."""
        base = self._base
        window = self._text[start - base : end - base]
        self._work += len(window)
        at, next_at = close - start, after - start
        if single:
            verdict = _quick_verdict(window, at, next_at)
            if verdict is not None:
                return verdict
        return at in self._sbd_ends(window)

    def _sbd_ends(self, window: str) -> frozenset[int]:
        """Where pysbd ends sentences in ``window`` (a bounded text; recent answers are kept)."""
        ends = self._sbd_memo.get(window)
        if ends is None:
            self._work += len(window)
            ends = frozenset(span.start + len(span.sent.rstrip()) for span in self._sbd.segment(window))
            if len(self._sbd_memo) >= _SBD_MEMO_SIZE:
                del self._sbd_memo[next(iter(self._sbd_memo))]
            self._sbd_memo[window] = ends
        return ends


def _quick_verdict(window: str, at: int, next_at: int) -> bool | None:
    """The verdict on a candidate ending in one punctuation mark where pysbd's is certain (or the
    Golden Rule Set's), so pysbd need not be asked; None otherwise."""
    punct = window[at - 1]
    if "\n" in window[at:next_at] or "\r" in window[at:next_at]:
        return None  # pysbd ends a sentence at any line break
    if punct == ".":
        if window[max(0, at - 4) : at] in _LOWER_TIME and _time_before_title(window, at, next_at):
            return False
        # pysbd never ends a sentence after a title it knows (Dr., Prof.), a capital initial
        # ("J. R. R."; not "I." or "V.", which may end one before some words), or an abbreviation
        # with periods inside ("e.g.", "a.m.") before a lower-case word, unless it finds a list
        # (two items or more) and breaks the text before the next item.
        if len(_LIST_ITEM.findall(window)) <= 1:
            letters = _LAST_LETTERS.search(window, max(0, at - 8), at - 1)
            if letters is not None and (
                letters.group().lower() in _TITLES or letters.group() in _INITIALS  # one letter
            ):
                return False
            if "a" <= window[next_at : next_at + 1] <= "z" and _MULTI_PERIOD.search(window, max(0, at - 12), at):
                return False
    if _plain_sentence_end(window, at, next_at):
        return True
    return None


def _time_before_title(window: str, at: int, next_at: int) -> bool:
    """ "5 a.m. Mr. Smith": a lower-case time, then a title."""
    if at > 4 and not (window[at - 5].isspace() or window[at - 5].isdigit()):
        return False
    word = window[next_at:].split(None, 1)
    return bool(word) and _TITLE.fullmatch(word[0]) is not None


def _plain_sentence_end(window: str, at: int, next_at: int) -> bool:
    """A sentence end pysbd would confirm (see _PLAIN_WINDOW)."""
    punct, first = window[at - 1], window[next_at : next_at + 1]
    if next_at != at + 1 or window[at] != " " or not ("A" <= first <= "Z" or (punct != "!" and "a" <= first <= "z")):
        return False
    if _PLAIN_WINDOW.fullmatch(window) is None or "--" in window or _LONE_APOSTROPHE.search(window):
        return False
    word = window[window.rfind(" ", 0, at - 1) + 1 : at - 1]
    if _PLAIN_WORD.fullmatch(word) is not None:
        lowered = word.lower()
        return (
            lowered not in _ABBREVIATIONS and not _ROMAN.fullmatch(lowered) and word + punct not in _EXCLAMATION_WORDS
        )
    return _YEAR.fullmatch(word) is not None
