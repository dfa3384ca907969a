"""Conversation history and the text a listener heard of an interrupted reply."""

from __future__ import annotations

import pytest

from service.core.engine import INTERRUPTED_NOTE, INTERRUPTED_SILENT, Message, chat_content
from service.core.history import (
    HEARD_TOLERANCE_MS,
    Conversation,
    HistoryLimits,
    SpokenSegment,
    heard_text,
)

TEXT = "First part here. Second part has five words. Third one."
#       0               17                            46


def segments() -> list[SpokenSegment]:
    return [
        SpokenSegment(0, 16, start_ms=0, duration_ms=1000, complete=True),
        SpokenSegment(17, 45, start_ms=1000, duration_ms=2000, complete=True),
        SpokenSegment(46, 56, start_ms=3000, duration_ms=500, complete=True),
    ]


@pytest.mark.parametrize(
    ("heard_ms", "expected"),
    [
        (0, ""),
        (500, "First"),  # 3 words in 1000 ms: one word heard by 500 ms
        (994, "First part"),  # more than HEARD_TOLERANCE_MS before the segment's end
        (1000, "First part here."),
        (1400, "First part here. Second"),  # 5 words over 2000 ms: 400 ms is one word
        (2994, "First part here. Second part has five"),
        (2996, "First part here. Second part has five words."),  # within a few ms of its end: whole
        (3000, "First part here. Second part has five words."),
        (10_000, TEXT),
        (float("inf"), TEXT),
    ],
)
def test_heard_text_cuts_at_estimated_word_positions(heard_ms: float, expected: str) -> None:
    assert heard_text(TEXT, segments(), heard_ms) == expected


def test_segment_still_being_made_never_counts_whole() -> None:
    partial = [SpokenSegment(0, 16, start_ms=0, duration_ms=400, complete=False)]
    # 400 ms made of about 1040 ms expected (16 characters at a typical rate): one word of three.
    assert heard_text(TEXT, partial, 400) == "First"
    done = [SpokenSegment(0, 16, start_ms=0, duration_ms=2000, complete=False)]
    assert heard_text(TEXT, done, 5000) == "First part"


def test_silent_segment_counts_once_reached() -> None:
    text = "Look at this:\n```\ncode\n```\nThat is all."
    segs = [
        SpokenSegment(0, 13, start_ms=0, duration_ms=800, complete=True),
        SpokenSegment(14, 26, start_ms=800, duration_ms=0, complete=True),
        SpokenSegment(27, 39, start_ms=800, duration_ms=700, complete=True),
    ]
    assert heard_text(text, segs, 700) == "Look at"
    assert heard_text(text, segs, 800) == "Look at this:\n```\ncode\n```"
    assert heard_text(text, segs, 1500) == text


def test_request_messages_carry_system_history_and_user() -> None:
    conversation = Conversation("Be brief.")
    conversation.add_exchange("Hi?", "Hello.")
    conversation.add_spoken("Read aloud.")
    assert conversation.request_messages("And now?") == (
        Message("system", "Be brief."),
        Message("user", "Hi?"),
        Message("assistant", "Hello."),
        Message("assistant", "Read aloud."),
        Message("user", "And now?"),
    )


def test_trim_last_reply() -> None:
    conversation = Conversation("")
    assert not conversation.trim_last_reply("x")
    conversation.add_exchange("Q", "A long answer.")
    assert conversation.trim_last_reply("A long")
    assert conversation.request_messages("next")[-2] == Message("assistant", "A long", interrupted=True)


def test_segment_cut_short_counts_only_its_voiced_words() -> None:
    # Piper voices a two-sentence segment a sentence at a time: only "Hi there." exists (500 ms).
    text = "Hi there. I will now explain the whole plan in great detail for you."
    partial = [SpokenSegment(0, len(text), start_ms=0, duration_ms=500, complete=False)]
    heard = heard_text(text, partial, 500)
    assert heard in ("Hi", "Hi there.", "Hi there. I")
    assert heard_text(text, partial, float("inf")) == heard


def test_unfinished_segment_is_measured_at_the_turns_speaking_rate() -> None:
    text = "Ten chars. " + "word " * 20
    segs = [
        SpokenSegment(0, 10, start_ms=0, duration_ms=1000, complete=True),  # 100 ms per character
        SpokenSegment(11, len(text.rstrip()), start_ms=1000, duration_ms=2000, complete=False),
    ]
    # 2 s of 9.9 s estimated for 20 words: 4 words heard.
    assert heard_text(text, segs, 3000) == "Ten chars. word word word word"


def test_interrupted_replies_are_marked_for_the_llm() -> None:
    conversation = Conversation("Sys.")
    conversation.add_exchange("Tell me a story.", "Once upon a", interrupted=True)
    conversation.add_exchange("Hello?", "", interrupted=True)
    messages = conversation.request_messages("Go on.")
    assert messages[2] == Message("assistant", "Once upon a", interrupted=True)
    assert messages[4] == Message("assistant", "", interrupted=True)
    # A chat model is told in words; the history itself holds only what was heard.
    assert chat_content(messages[2]) == f"Once upon a {INTERRUPTED_NOTE}"
    assert chat_content(messages[4]) == INTERRUPTED_SILENT
    assert chat_content(messages[1]) == "Tell me a story."


@pytest.mark.parametrize("short_ms", [0.0, 0.4, 1.0, HEARD_TOLERANCE_MS])
def test_a_segment_played_to_within_a_few_ms_of_its_end_was_heard(short_ms: float) -> None:
    # "He lived in a castle," played to 1300.317 ms of 1300.4, reported as 1300: the clause is kept.
    text = "He lived in a castle, with his three dogs."
    segs = [
        SpokenSegment(0, 21, start_ms=0, duration_ms=1300.4, complete=True),
        SpokenSegment(22, len(text), start_ms=1300.4, duration_ms=1500, complete=True),
    ]
    assert heard_text(text, segs, 1300.4 - short_ms) == "He lived in a castle,"
    assert heard_text(text, segs, 1300.4 - HEARD_TOLERANCE_MS - 60) == "He lived in a"


@pytest.mark.parametrize(
    ("limits", "kept"),
    [
        (HistoryLimits(max_turns=2, max_chars=10_000), ["spoken", "q4", "a4"]),  # a read-aloud text is a turn
        (HistoryLimits(max_turns=3, max_chars=10_000), ["q3", "a3", "spoken", "q4", "a4"]),
        (HistoryLimits(max_turns=10, max_chars=5), ["q4", "a4"]),
        (HistoryLimits(max_turns=1, max_chars=1), ["q4", "a4"]),  # the latest turn always stays
    ],
)
def test_history_caps_drop_the_oldest_turns_first(limits: HistoryLimits, kept: list[str]) -> None:
    conversation = Conversation("System stays.", limits=limits)
    for n in (1, 2, 3):
        conversation.add_exchange(f"q{n}", f"a{n}")
    conversation.add_spoken("spoken")
    conversation.add_exchange("q4", "a4")
    assert [e.content for e in conversation.entries] == kept
    assert conversation.request_messages("next")[0] == Message("system", "System stays.")
