"""The streaming segmenter, table-driven: every text is fed in several delta sizes, and the
segments must not depend on how the text was split."""

from __future__ import annotations

import re

import pytest

from service.core.segmenter import HARD_MAX_FACTOR, Segmenter, SegmentPolicy, TextSegment, count_words
from tests.core.golden_rules_en import GOLDEN_RULES_EN


def segment(text: str, step: int, policy: SegmentPolicy | None = None) -> list[str]:
    segmenter = Segmenter(policy)
    out = []
    for i in range(0, len(text), step):
        out += [s.text for s in segmenter.push(text[i : i + step])]
    return out + [s.text for s in segmenter.flush()]


NO_HEADS = SegmentPolicy(heads=False)

# Where sentences and clauses end (without heads, which the next table covers).
CASES = [
    # (name, text, expected segments)
    (
        "first at a clause",
        "Sure thing, my friend, here it is. It has more.",
        ["Sure thing, my friend,", "here it is.", "It has more."],
    ),
    (
        "first needs a few words",
        "Yes, it is. The capital of France is Paris.",
        ["Yes, it is.", "The capital of France is Paris."],
    ),
    (
        "short sentences join",
        "Hello there, friend. It is. Very nice. Yes it is indeed a fine day today.",
        ["Hello there, friend.", "It is. Very nice. Yes it is indeed a fine day today."],
    ),
    (
        "decimal",
        "Pi is roughly 3.14159 in value. That is well known by all the students in class.",
        ["Pi is roughly 3.14159 in value.", "That is well known by all the students in class."],
    ),
    (
        "currency",
        "The total comes to $29.95 today. Please pay at the counter before you leave the shop.",
        ["The total comes to $29.95 today.", "Please pay at the counter before you leave the shop."],
    ),
    (
        "time",
        "We meet at 3:30 p.m. on Friday. Bring the documents and the signed forms with you please.",
        ["We meet at 3:30 p.m. on Friday.", "Bring the documents and the signed forms with you please."],
    ),
    (
        "title abbreviation",
        "Call Dr. Smith tomorrow morning. He knows the answer to every single question you have.",
        ["Call Dr. Smith tomorrow morning.", "He knows the answer to every single question you have."],
    ),
    (
        "e.g.",
        "Eat fruit daily, e.g. apples or pears. They are good for you and taste great in the morning.",
        ["Eat fruit daily,", "e.g. apples or pears.", "They are good for you and taste great in the morning."],
    ),
    (
        "e.g. with comma",
        "I like to eat fruit, e.g., apples. They are good for you and taste great in the morning.",
        ["I like to eat fruit,", "e.g., apples.", "They are good for you and taste great in the morning."],
    ),
    (
        "U.S.",
        "The U.S. economy grew last year. Analysts expect the growth to continue well into next year.",
        ["The U.S. economy grew last year.", "Analysts expect the growth to continue well into next year."],
    ),
    (
        "initials",
        "The book by J. R. R. Tolkien is long. Many readers still finish it in a single long weekend.",
        ["The book by J. R. R. Tolkien is long.", "Many readers still finish it in a single long weekend."],
    ),
    (
        "ellipsis",
        "Well... I am not quite sure. Let me think about that question for a little while longer.",
        ["Well... I am not quite sure.", "Let me think about that question for a little while longer."],
    ),
    (
        "unicode ellipsis",
        "Hmm… that is a hard one to answer. Give me a moment to think it over properly, please.",
        ["Hmm… that is a hard one to answer.", "Give me a moment to think it over properly, please."],
    ),
    (
        "url",
        "See https://example.com/a.b?x=1. Then read the rest of the page from the very top to the bottom.",
        ["See https://example.com/a.b?x=1.", "Then read the rest of the page from the very top to the bottom."],
    ),
    (
        "url with commas",
        "Open https://example.com/a,b,c today. It explains the whole setup process in small clear steps.",
        ["Open https://example.com/a,b,c today.", "It explains the whole setup process in small clear steps."],
    ),
    (
        "thousands",
        "There are 1,000,000 people there now. The city keeps growing every single year since the war.",
        ["There are 1,000,000 people there now.", "The city keeps growing every single year since the war."],
    ),
    (
        "question and exclamation",
        "Is it raining now? Yes! It has been raining all day long and will go on until the night.",
        ["Is it raining now?", "Yes! It has been raining all day long and will go on until the night."],
    ),
    (
        "quotes",
        'He said "Stop right now." Then he walked away from the scene without another single word.',
        ['He said "Stop right now."', "Then he walked away from the scene without another single word."],
    ),
    ("cjk", "你好，世界。今天天气很好！我们去公园吧。", ["你好，世界。", "今天天气很好！我们去公园吧。"]),
    # Golden Rule Set: a lower-case time before a title does not end the sentence (pysbd alone cuts
    # after "a.m.").
    ("time then title", "At 5 a.m. Mr. Smith went to the bank.", ["At 5 a.m. Mr. Smith went to the bank."]),
    (
        "time then title, more after",
        "At 5 a.m. Mr. Smith went to the bank. He left the bank at 6 P.M. Mr. Smith then went to the store.",
        ["At 5 a.m. Mr. Smith went to the bank.", "He left the bank at 6 P.M. Mr. Smith then went to the store."],
    ),
    (
        "list lines",
        "Here are the steps:\n1. Mix the flour and the sugar well\n2. Add two eggs and the milk slowly\n",
        ["Here are the steps:", "1. Mix the flour and the sugar well", "2. Add two eggs and the milk slowly"],
    ),
    (
        "code fence whole",
        "Run this code:\n```python\nprint('a. b, c')\nx = 3.14\n```\nIt prints the text. Then it stops for good.",
        ["Run this code:", "```python\nprint('a. b, c')\nx = 3.14\n```", "It prints the text. Then it stops for good."],
    ),
    ("unclosed fence at end", "Try this:\n```\nls -la. rm x", ["Try this:", "```\nls -la. rm x"]),
    ("no punctuation", "just some words without any punctuation", ["just some words without any punctuation"]),
    ("empty", "", []),
    ("whitespace only", "   \n  ", []),
]


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
@pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_segments(name: str, text: str, expected: list[str], step: int) -> None:
    assert segment(text, step, NO_HEADS) == expected


def test_long_sentence_is_cut_at_a_clause() -> None:
    policy = SegmentPolicy(first_max_chars=60, max_chars=80)
    text = (
        "First comes a short opener. "
        "This sentence goes on and on, with many clauses strung together, and it keeps going without a stop, "
        "so the segmenter has to cut it somewhere sensible before it ends."
    )
    got = segment(text, 3, policy)
    assert got[0] == "First comes a short opener."
    assert all(len(s) <= 80 for s in got)
    assert got[1].endswith(",")
    assert " ".join(got) == " ".join(text.split())


def test_long_first_segment_without_breaks_is_cut_at_a_word() -> None:
    text = "word " * 60
    got = segment(text, 4, SegmentPolicy(first_max_chars=50))
    assert len(got[0]) <= 50
    assert " ".join(got).split() == text.split()


def test_long_url_is_never_cut() -> None:
    url = "https://example.com/" + "a" * 360  # (up to HARD_MAX_FACTOR times max_chars)
    got = segment(f"Open this link, please: {url} and tell me.", 7, SegmentPolicy(first_max_chars=60, max_chars=100))
    assert any(url in s for s in got)


@pytest.mark.parametrize("before", ["", "Here it is: "])
@pytest.mark.parametrize("delta", [7, 5000])
def test_a_run_without_breaks_is_cut_inside_at_the_hard_bound(before: str, delta: int) -> None:
    # Found in QA: a reply of one 100,000-character "word" was one segment (100 minutes of speech).
    policy = SegmentPolicy(first_max_chars=60, max_chars=100)
    run = "a" * 2500
    got = segment(before + run + ". Done.", delta, policy)
    assert "".join(got).replace(" ", "") == (before + run + ". Done.").replace(" ", "")
    assert max(map(len, got)) <= 100 * HARD_MAX_FACTOR


def test_first_segment_leaves_before_the_sentence_ends() -> None:
    segmenter = Segmenter(NO_HEADS)
    assert segmenter.push("Well, the answer to your question") == []
    out = segmenter.push(" is simple, because")
    assert [s.text for s in out] == ["Well, the answer to your question is simple,"]


def test_sentence_end_waits_for_the_next_word() -> None:
    segmenter = Segmenter(NO_HEADS)
    assert [s.text for s in segmenter.push("The price is going to be $29.")] == []
    assert [s.text for s in segmenter.push("95 for you.")] == []
    assert [s.text for s in segmenter.flush()] == ["The price is going to be $29.95 for you."]


def test_sentence_end_leaves_with_the_first_letter_of_the_next_word() -> None:
    # As an LLM streams it: the segment leaves with " This", not one token later.
    segmenter = Segmenter()
    out = []
    for token in ["Hello", " there", ",", " friend", "."]:
        out += segmenter.push(token)
    assert out == []
    assert [s.text for s in segmenter.push(" This")] == ["Hello there, friend."]


def test_time_then_capital_waits_for_the_whole_word() -> None:
    segmenter = Segmenter(NO_HEADS)
    assert segmenter.push("At 5 a.m. M") == []
    assert segmenter.push("r. Smith went") == []  # "Mr." is a title: no sentence end after "a.m."
    assert [s.text for s in segmenter.flush()] == ["At 5 a.m. Mr. Smith went"]
    segmenter = Segmenter(NO_HEADS)
    assert segmenter.push("We got up at 5 a.m. T") == []
    assert [s.text for s in segmenter.push("hen we ran ")] == ["We got up at 5 a.m."]


def test_offsets_point_into_the_whole_text() -> None:
    text = "Right, so here we go. The first thing to know is simple. Then there is more to come after that."
    segmenter = Segmenter()
    segments = []
    for i in range(0, len(text), 4):
        segments += segmenter.push(text[i : i + 4])
    segments += segmenter.flush()
    for s in segments:
        assert text[s.start : s.end] == s.text
    assert [s.start for s in segments] == sorted(s.start for s in segments)


def test_flush_releases_everything_then_nothing() -> None:
    segmenter = Segmenter()
    segmenter.push("half a sentence")
    assert [s.text for s in segmenter.flush()] == ["half a sentence"]
    assert segmenter.flush() == []
    assert segmenter.pending == ""


@pytest.mark.parametrize(("text", "words"), [("one two three", 3), ("你好世界", 4), ("one, two; three.", 3), ("", 0)])
def test_count_words(text: str, words: int) -> None:
    assert count_words(text) == words


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SegmentPolicy(first_min_words=0)
    with pytest.raises(ValueError):
        SegmentPolicy(first_max_chars=200, max_chars=100)


def test_segments_do_not_depend_on_delta_size_for_long_text() -> None:
    # Text that arrives whole (speak_text) is cut like text that arrives word by word.
    text = (
        "This opening sentence runs on for quite a while without any comma or other break in it at all "
        "and keeps going well past the length at which the first segment should have been released to "
        "the speech engine. Then a normal sentence follows. And another one ends the text."
    )
    whole = segment(text, len(text))
    assert whole == segment(text, 1)
    assert len(whole[0]) <= SegmentPolicy().first_max_chars


def repeat(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


# Inputs that made the old segmenter re-read its buffer (or pysbd run super-linearly) on every delta.
PATHOLOGICAL = {
    "numbered": lambda n: repeat("1. ", n),
    "question then word": lambda n: repeat("? a ", n),
    "dots and spaces": lambda n: repeat(". ", n),
    "a word, then spaced dots": lambda n: "It was weakened" + repeat(" .", n),
    "another script after stops": lambda n: repeat("Yes?で", n),
    "another script after titles": lambda n: repeat("Dr.田", n),
    "commas inside a long word": lambda n: repeat("abc,", n),
    "interjections": lambda n: repeat("Yes, ", n),
    "dates": lambda n: repeat("Jan 5, 2024, May 3rd, ", n),
    "phrase openers": lambda n: repeat("the sky and the sea in the sun ", n),
    "letter and dot": lambda n: repeat("a. ", n),
    "initials": lambda n: repeat("J. R. R. ", n),
    "newlines": lambda n: "\n" * n,
    "brackets": lambda n: "(" * n,
    "long url": lambda n: repeat("http://x.y/" + "a" * n, n),
    "cjk without punctuation": lambda n: repeat("我们今天去公园散步吧天气很好", n),
    "digits and dots": lambda n: repeat("1.2.3.4.5.6.7.8.9.0.", n),
    "dots": lambda n: "." * n,
    "spaces after a stop": lambda n: repeat("Wait." + " " * n, n),
    "cjk full stops": lambda n: repeat("。", n),
    "abbreviations": lambda n: repeat("Dr. e.g., Mr. vs. ", n),
    "clauses": lambda n: repeat("one, two; three: four — ", n),
    "unclosed code": lambda n: repeat("```\nx = 1. y, z\n", n),
    "quotes": lambda n: repeat('"Stop." "Go!" ', n),
    "prose": lambda n: repeat(
        "The quick brown fox jumps over the lazy dog near the bank. Did you see it? It was 3.5 m long, "
        "e.g. longer than a car! Dr. Smith said so at 5 p.m. yesterday. ",
        n,
    ),
}


def work(text: str, step: int) -> tuple[int, list[str]]:
    segmenter = Segmenter()
    out = []
    for i in range(0, len(text), step):
        out += [s.text for s in segmenter.push(text[i : i + step])]
    out += [s.text for s in segmenter.flush()]
    return segmenter.work, out


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_work_grows_linearly(name: str) -> None:
    # The cost meter (characters examined), not wall time: four times the text costs about four
    # times the work, whether the text comes one character at a time or whole.
    make = PATHOLOGICAL[name]
    short, long = make(1600), make(6400)  # (both past the hard bound: a run without breaks is cut there)
    by_delta = {}
    for whole in (False, True):
        work_short, _ = work(short, len(short) if whole else 1)
        work_long, segments = work(long, len(long) if whole else 1)
        assert work_long <= 4.6 * work_short, (whole, work_short, work_long)
        assert "".join("".join(segments).split()) == "".join(long.split())
        by_delta[whole] = segments
    assert by_delta[False] == by_delta[True]


def segment_spans(text: str, step: int, policy: SegmentPolicy | None = None) -> list[TextSegment]:
    segmenter = Segmenter(policy)
    out: list[TextSegment] = []
    for i in range(0, len(text), step):
        out += segmenter.push(text[i : i + step])
    return out + segmenter.flush()


_ENDS_AT_SENTENCE_PUNCTUATION = re.compile(r"[.!?…][\"'”’)\]]*$")


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize("policy", [SegmentPolicy(), SegmentPolicy(min_chars=0)], ids=["default", "every sentence"])
def test_no_false_cuts_on_the_golden_rule_set(policy: SegmentPolicy, step: int) -> None:
    """A cut after sentence punctuation is always a sentence end of the Golden Rule Set. (Cuts at
    clauses and before a phrase are not sentence ends and never follow sentence punctuation.)"""
    false_cuts = []
    for text, sentences in GOLDEN_RULES_EN:
        ends, pos = set(), 0
        for sentence in sentences:
            pos = text.index(sentence, pos) + len(sentence)
            ends.add(pos)
        for seg in segment_spans(text, step, policy)[:-1]:
            assert text[seg.start : seg.end] == seg.text
            if _ENDS_AT_SENTENCE_PUNCTUATION.search(seg.text) and seg.end not in ends:
                false_cuts.append(seg.text)
    assert false_cuts == []


@pytest.mark.parametrize("step", [1, 2, 1000])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("How do I boil an egg?で購入する", ["How do I boil an egg?", "で購入する"]),
        ("It is very hot.Привет мир.", ["It is very hot.", "Привет мир."]),
        ('Is it "really true?"で購入する', ['Is it "really true?"', "で購入する"]),
        ("I was born in 2024.日本です", ["I was born in 2024.", "日本です"]),
        # One period after an abbreviation, a title, an initial or a short number is no sentence end.
        ("Call Dr.田中 now please and go.", ["Call Dr.田中 now please and go."]),
        ("See the U.S.A.日本 and more.", ["See the U.S.A.日本 and more."]),
        ("The value is 3.日本 more here.", ["The value is 3.日本 more here."]),
        ("A man named J.田中 came by.", ["A man named J.田中 came by."]),
        # Latin letters right after the punctuation are not enough (a typo, a file name).
        ("Open the file config.Yaml now please.", ["Open the file config.Yaml now please."]),
    ],
)
def test_sentence_end_followed_by_another_script(text: str, expected: list[str], step: int) -> None:
    assert segment(text, step, NO_HEADS) == expected


HEAD_CASES = [
    # (name, text, expected segments)
    (
        "before a conjunction",
        "The sky is blue because the sun lights the air. It scatters blue light the most of all colours.",
        ["The sky is blue", "because the sun lights the air.", "It scatters blue light the most of all colours."],
    ),
    (
        "before a preposition",
        "It is one of the best in the world. People come from far away to see it every year.",
        ["It is one of the best", "in the world.", "People come from far away to see it every year."],
    ),
    ("the head needs its words", "Go to the shop.", ["Go to the shop."]),
    ("never after a word that needs the next", "This is not in the box.", ["This is not in the box."]),
    ("never after an article", "I saw the one that I liked.", ["I saw the one", "that I liked."]),
    ("a whole word only", "The room was quiet inside the old house.", ["The room was quiet inside the old house."]),
    (
        "a clause first",
        "Boil the water, then add the eggs to the pot.",
        ["Boil the water,", "then add the eggs to the pot."],
    ),
    (
        "an interjection alone",
        "Yes, I recommend the book by Poe. It is good.",
        ["Yes,", "I recommend the book by Poe.", "It is good."],
    ),
    ("an exclamation too", "Sure! Here is the answer to it.", ["Sure!", "Here is the answer to it."]),
    ("not any word", "Sure thing, my friend.", ["Sure thing, my friend."]),
    (
        "only the first segment",
        "Cats sleep a lot. They nap in the sun and then they play with a ball for a while.",
        ["Cats sleep a lot.", "They nap in the sun and then they play with a ball for a while."],
    ),
]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize(("name", "text", "expected"), HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_first_segment_may_end_before_a_phrase(name: str, text: str, expected: list[str], step: int) -> None:
    assert segment(text, step) == expected


def test_a_head_is_marked_as_going_on() -> None:
    spans = segment_spans("The sky is blue because the sun lights it, and that is all. Done here now.", 3)
    assert [(s.text, s.open_end) for s in spans] == [
        ("The sky is blue", True),
        ("because the sun lights it, and that is all.", False),
        ("Done here now.", False),
    ]
    spans = segment_spans("Well, the answer to that is simple, my friend.", 1000, NO_HEADS)
    assert [s.open_end for s in spans] == [False, False]


def test_a_head_leaves_once_the_opener_is_a_whole_word() -> None:
    segmenter = Segmenter()
    assert segmenter.push("The sky is blue in") == []  # "in" or "indeed"?
    assert [s.text for s in segmenter.push(" the")] == ["The sky is blue"]


def test_a_clause_after_a_word_leaves_as_its_comma_arrives() -> None:
    segmenter = Segmenter(NO_HEADS)
    assert [s.text for s in segmenter.push("Boil some eggs,")] == ["Boil some eggs,"]
    # Not inside a URL or a number: those wait for what follows.
    for text in ("Please open example.com/a,", "The moon is 380,", "Go to https://x.y/q?a=b;"):
        segmenter = Segmenter(NO_HEADS)
        assert segmenter.push(text) == [], text


@pytest.mark.parametrize("step", [1, 2, 3, 1000])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The first segment's fast path (a clause after three words) never cuts a date...
        ("We met on Jan. 5th, 2024. It was a fine day.", ["We met on Jan. 5th, 2024.", "It was a fine day."]),
        ("On Friday, January 5th, 2024, we go.", ["On Friday, January 5th, 2024,", "we go."]),
        ("It was the 5th of January, 2024, I think.", ["It was the 5th of January, 2024,", "I think."]),
        # ...a time or an amount.
        ("It starts at 5:30 p.m. sharp.", ["It starts at 5:30 p.m. sharp."]),
        ("It costs $1,200.50 in total, sadly.", ["It costs $1,200.50 in total,", "sadly."]),
        # A comma after a month that is not followed by a year is a clause.
        ("Back in early January, we went out.", ["Back in early January,", "we went out."]),
    ],
)
def test_never_cut_inside_a_date_a_time_or_an_amount(text: str, expected: list[str], step: int) -> None:
    assert segment(text, step) == expected
    assert segment(text, step, NO_HEADS) == expected


def test_a_comma_after_a_date_waits_for_the_year() -> None:
    segmenter = Segmenter()
    assert segmenter.push("We met on Jan. 5th,") == []
    assert segmenter.push(" 20") == []
    assert [s.text for s in segmenter.push("24. Then")] == ["We met on Jan. 5th, 2024."]


_HARD_TOKENS = [
    *"the sky is blue because in to of and with The capital Hello x".split(),
    *["Yes,", "Sure!", "well,", "ok;", "Jan.", "5th,", "2024,", "Dr.", "U.S.", "a.m.", "5:30", "p.m."],
    *["$1,200.50", "example.com/a,b", "egg?", "で購入", "Привет.", "3.14", "e.g.,", "...", ". . .", "—"],
    *["\n", "```", "end.", "(really?)", '"quote."', "1.", "France,", "Paris."],
]


@pytest.mark.parametrize("seed", range(4))
def test_random_mixes_of_hard_tokens_cut_the_same_however_split(seed: int) -> None:
    """Whatever the deltas, the same segments, and no text lost (found: an interjection or a clause
    cut at the end of a delta, then judged differently when the next character came with it)."""
    import random

    rng = random.Random(seed)
    for _ in range(150):
        text = "".join(rng.choice(_HARD_TOKENS) + rng.choice([" ", " ", "", "  "]) for _ in range(rng.randint(1, 40)))
        whole = segment(text, max(len(text), 1))
        assert "".join("".join(whole).split()) == "".join(text.split())
        for step in (1, 2, 7):
            assert segment(text, step) == whole, (text, step)
