"""Makes a segment's text speakable.

Captions keep the LLM's text as written; the TTS engine gets :func:`speakable` of each segment:

- fenced code blocks are dropped (never read out character by character); inline code keeps its text;
- links and images keep their text, bare URLs are read as their host name;
- headings, bullet markers, block quotes, table bars and emphasis markers are removed;
- emoji are removed;
- numbers, money, dates, times, ordinals, percentages, units, phone numbers and years are written
  out as a person says them, for the voice's language (:mod:`service.core.numbers`; English for now);
- text in a script the voice cannot read (Japanese for an English voice) is left out: a voice's
  language (``en_US``, ``ru_RU``) gives the scripts it reads, Latin and its own; an unknown or
  multilingual language reads everything;
- control characters (a NUL, an escape) become spaces: no engine is fed what no one can say;
- each line becomes a sentence, and whitespace is collapsed.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from functools import lru_cache

import emoji
import regex

from service.core.numbers import speak_numbers

__all__ = ["readable_scripts", "speakable"]

_FENCED_CODE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n?.*?(^[ \t]*\1[^\n]*$|\Z)", re.S | re.M)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
_URL = re.compile(r"\b(?:https?://|www\.)([^\s/?#<>\"')\]]+)[^\s<>\"')\]]*")
_INLINE_CODE = re.compile(r"`+([^`]*)`+")
_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+", re.M)
_BULLET = re.compile(r"^[ \t]*(?:[-*+•][ \t]+)", re.M)
_QUOTE = re.compile(r"^[ \t]*>[ \t]?", re.M)
_RULE = re.compile(r"^[ \t]*([-*_=])([ \t]*\1){2,}[ \t]*$", re.M)
_TABLE_SEPARATOR = re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*$", re.M)
_TABLE_BAR = re.compile(r"[ \t]*\|[ \t]*")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # (tab, line feed and carriage return stay)
_TIMES = re.compile(r"(?<=\d)[ \t]*[*×][ \t]*(?=\d)")
_EMPHASIS = re.compile(
    r"(?<![\w*])(\*{1,3}|~~)(?=[^\s*])(.+?)(?<=[^\s*])\1(?![\w*])|(?<!\w)(_{1,3})(?=\S)(.+?)(?<=\S)\3(?!\w)"
)
_STRAY_MARKERS = re.compile(r"(?<!\w)\*+(?=\S)|(?<=\S)\*+(?!\w)|~~|(?<!\w)_+(?=\w)|(?<=\w)_+(?!\w)")
_HTML_TAG = re.compile(
    r"</?(?:a|b|i|u|s|em|strong|code|pre|p|div|span|br|hr|img|sup|sub|small|ul|ol|li|h[1-6]|table|tr|td|th|"
    r"blockquote)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
# The scripts a voice reads besides Latin (names as Unicode gives them), by language code.
_OWN_SCRIPTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("ru", "uk", "be", "bg", "mk", "sr", "kk", "ky", "mn", "tg", "tt", "ba", "cv"), ("Cyrillic",)),
    "el": ("Greek",),
    **dict.fromkeys(("ar", "fa", "ur", "ps", "sd", "ug"), ("Arabic",)),
    **dict.fromkeys(("he", "yi"), ("Hebrew",)),
    **dict.fromkeys(("hi", "mr", "ne", "sa"), ("Devanagari",)),
    "bn": ("Bengali",),
    "pa": ("Gurmukhi",),
    "gu": ("Gujarati",),
    "or": ("Oriya",),
    "ta": ("Tamil",),
    "te": ("Telugu",),
    "kn": ("Kannada",),
    "ml": ("Malayalam",),
    "si": ("Sinhala",),
    "th": ("Thai",),
    "lo": ("Lao",),
    "km": ("Khmer",),
    "my": ("Myanmar",),
    "ka": ("Georgian",),
    "hy": ("Armenian",),
    "am": ("Ethiopic",),
    "zh": ("Han", "Bopomofo"),
    "yue": ("Han",),
    "ja": ("Han", "Hiragana", "Katakana"),
    "ko": ("Hangul", "Han"),
}
# Languages written in Latin: their voices read Latin only.
_LATIN = frozenset(
    "af az bs ca cs cy da de en eo es et eu fi fil fo fr ga gd gl ha hr ht hu id is it jv la lb lt lv mg mi ms mt "
    "nb nl nn no oc pl pt qu ro rw sk sl so sq sv sw tl tn tr uz vi wo xh yo zu".split()
)
_SPOKEN_LEFT = regex.compile(r"[\p{L}\p{N}]")
_EMPTY_BRACKETS = re.compile(r"[(\[{「『“\"'‘]\s*[)\]}」』”\"'’]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[,.;:!?…])")
_ENDS_SENTENCE = re.compile(r"[.!?…:;,。！？]$")
_SPACES = re.compile(r"[ \t\u00a0]+")
# Every emoji sequence begins with one of these: text holding none has no emoji to look for (the
# emoji library's scan costs most of a segment's normalization; plain prose has none).
_EMOJI_FIRST = frozenset(sequence[0] for sequence in emoji.EMOJI_DATA)


def _host_of(match: re.Match[str]) -> str:
    """A URL read as its host name, keeping the sentence punctuation that followed it."""
    url = match.group(0)
    trailing = url[len(url.rstrip(".,;:!?")) :]
    return match.group(1).rstrip(".,;:!?").removeprefix("www.") + trailing


@lru_cache(maxsize=64)
def readable_scripts(language: str) -> regex.Pattern[str] | None:
    """A pattern matching a run of text in scripts a voice of ``language`` cannot read (letters of
    another script, with the marks, digits and punctuation between and right after them), or None
    when the voice reads every script (an unknown or multilingual language)."""
    code = language.replace("-", "_").split("_")[0].lower()
    if code in _LATIN:
        scripts: tuple[str, ...] = ()
    elif code in _OWN_SCRIPTS:
        scripts = _OWN_SCRIPTS[code]
    else:
        return None
    readable = "".join(rf"\p{{Script={name}}}" for name in ("Latin", *scripts))
    foreign = rf"[^\P{{L}}{readable}]"
    return regex.compile(rf"{foreign}(?:[\p{{M}}\p{{N}}\p{{P}}\p{{Zs}}]*{foreign})*[\p{{M}}\p{{Po}}]*")


def speakable(text: str, language: str = "") -> str:
    """Return ``text`` as a voice of ``language`` should read it (empty: every script is read). May
    be empty (a code block, an emoji, text in another script)."""
    text = _CONTROL.sub(" ", text)
    text = _FENCED_CODE.sub("\n", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _URL.sub(_host_of, text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _HTML_TAG.sub(" ", text)
    text = _RULE.sub("", text)
    text = _TABLE_SEPARATOR.sub("", text)
    text = _HEADING.sub("", text)
    text = _BULLET.sub("", text)
    text = _QUOTE.sub("", text)
    text = _TIMES.sub(" times ", text)
    text = _EMPHASIS.sub(lambda m: m.group(2) or m.group(4), text)
    text = _STRAY_MARKERS.sub("", text)
    if not text.isascii() and not _EMOJI_FIRST.isdisjoint(text):
        text = _SPACE_BEFORE_PUNCT.sub("", emoji.replace_emoji(text, replace=""))  # ("Hi 👋, you" → "Hi, you")
    if language:
        text = speak_numbers(text, language)
    foreign = readable_scripts(language) if language else None
    if foreign is not None and foreign.search(text):
        text = _SPACE_BEFORE_PUNCT.sub("", _EMPTY_BRACKETS.sub("", foreign.sub(" ", text)))
        if not _SPOKEN_LEFT.search(text):
            return ""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if "|" in line:  # a table row: its cells become a list, its outer bars go
            line = _TABLE_BAR.sub(", ", line.strip("|").strip())
        line = _SPACES.sub(" ", line).strip()
        if line:
            lines.append(line)
    # A line break ends a sentence (list items, headings): say so, or they run together.
    spoken = [
        line if _ENDS_SENTENCE.search(line) or i == len(lines) - 1 else line + "." for i, line in enumerate(lines)
    ]
    return " ".join(spoken)
