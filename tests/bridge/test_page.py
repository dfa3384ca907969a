"""The page tells the truth (issue 12), in real headless Chromium: a long conversation's layout.
Screenshots of each state, at phone and desktop sizes, go to ``test-artifacts/``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.bridge.conftest import DESKTOP, PHONE, Site, ask, needs_chromium, screenshots
from tests.fakes import FakeLLM, FakeTTS

pytestmark = needs_chromium

MakeSite = Callable[..., Awaitable[Site]]
WORDY = (
    "Sure, here is an answer long enough to wrap over several lines on a phone. It goes on about one "
    "thing and then another, so that its bubble is tall. That is all."
)


async def wait_done(page: Any, turns: int) -> None:
    """Until ``turns`` turns have ended and nothing plays."""
    await page.wait_for_function(
        f"document.querySelectorAll('.meta, .notice').length === {turns} && document.querySelector('#stop').disabled",
        timeout=20_000,
    )


# -- 1. the layout of a long conversation ---------------------------------------------------------


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
async def test_a_long_conversation_keeps_every_bubble_whole(
    make_site: MakeSite, new_page: Callable[..., Awaitable[Any]], viewport: dict[str, int]
) -> None:
    site = await make_site(FakeLLM(reply=WORDY), FakeTTS(ms_per_char=2))
    page = await new_page(viewport)
    await page.goto(site.url)
    for turn in range(12):
        await ask(page, f"Question number {turn + 1}, which is a question?")
        await wait_done(page, turn + 1)
    assert await page.evaluate("document.querySelector('#log').scrollHeight > 2 * innerHeight")
    boxes = await page.evaluate(
        """() => [...document.querySelectorAll('.bubble, .meta')].map((node) => {
            const box = node.getBoundingClientRect();
            const range = document.createRange();
            range.selectNodeContents(node.querySelector('summary') || node);  // (a meta's detail is closed)
            const text = range.getBoundingClientRect();
            return {kind: node.className, top: box.top, bottom: box.bottom, left: box.left, right: box.right,
                    textTop: text.top, textBottom: text.bottom};
        })"""
    )
    assert len(boxes) == 36
    for box in boxes:  # each bubble at least as tall as its text, and the text inside it
        assert box["textTop"] >= box["top"] - 0.5 and box["textBottom"] <= box["bottom"] + 0.5, box
    for i, a in enumerate(boxes):  # no two overlap
        for b in boxes[i + 1 :]:
            apart = a["bottom"] <= b["top"] + 0.5 or b["bottom"] <= a["top"] + 0.5
            apart = apart or a["right"] <= b["left"] + 0.5 or b["right"] <= a["left"] + 0.5
            assert apart, (a, b)
    await screenshots(page, "page-long-conversation")
