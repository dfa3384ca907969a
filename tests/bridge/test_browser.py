"""The demo page in real headless Chromium (Debian's ``chromium``, driven by Playwright): audio is
scheduled and played, captions appear, Stop and a new message interrupt. Screenshots go to
``test-artifacts/``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.bridge.conftest import Site, ask, needs_chromium, screenshots
from tests.conftest import Harness, start_harness, stop_harness, wait_for
from tests.fakes import FakeLLM, FakeTTS
from ws_bridge.server import Bridge, BridgeOptions

pytestmark = needs_chromium

SHORT = "Sure, here is a short answer. It has two sentences and that is all."
LONG = "Right, this one is a long answer. " + "It keeps going with another sentence of speech. " * 25


@pytest.fixture
async def site() -> AsyncIterator[tuple[Harness, str]]:
    harness = await start_harness(FakeLLM(reply=SHORT, token_s=0.02), FakeTTS(ms_per_char=50, chunk_s=0.02))
    bridge = await Bridge(
        BridgeOptions(grpc_target=f"127.0.0.1:{harness.running.port}", host="127.0.0.1", port=0)
    ).start()
    yield harness, f"http://127.0.0.1:{bridge.port}/"
    await bridge.aclose()
    await stop_harness(harness)


async def test_a_question_is_heard_and_captioned(site: tuple[Harness, str], page: object) -> None:
    harness, url = site
    p = page
    await p.goto(url)  # type: ignore[attr-defined]
    await p.wait_for_function("document.querySelector('#voice').value === 'fake-voice'")  # type: ignore[attr-defined]
    await ask(p, "What is up?")
    await p.wait_for_selector(".assistant .segment:not(.pending)", timeout=10_000)  # type: ignore[attr-defined]
    await p.wait_for_selector(".meta", timeout=10_000)  # type: ignore[attr-defined]
    expected_ms = sum(harness.tts.duration_ms(t) for t in harness.tts.texts)
    scheduled = await p.evaluate("parley.scheduledMs()")  # type: ignore[attr-defined]
    assert scheduled == pytest.approx(expected_ms, rel=0.02)
    # The audio really plays: the AudioContext's clock runs through it and playback reaches the end.
    # (Timed from where the first chunk starts: by the time the turn's end arrives, some has played.)
    first_start = await p.evaluate("parley.state.turn.chunks[0].start")  # type: ignore[attr-defined]
    await p.wait_for_function(  # type: ignore[attr-defined]
        f"parley.playedMs() >= {scheduled - 5}", timeout=expected_ms + 10_000
    )
    clock_after = await p.evaluate("parley.contextTime()")  # type: ignore[attr-defined]
    assert clock_after - first_start >= (scheduled - 5) / 1000
    captions = await p.inner_text(".assistant")  # type: ignore[attr-defined]
    assert captions.strip() == SHORT
    # The wait is said the way a person reads it; the detail is one click (or a hover) away.
    meta = p.locator(".meta")  # type: ignore[attr-defined]
    assert re.fullmatch(r"Spoke after \d+\.\d+ s", (await meta.inner_text()).strip())
    detail = await meta.get_attribute("title")
    assert "first audio" in detail and "ms" in detail
    await meta.locator("summary").click()
    assert "first audio" in await meta.inner_text()
    await screenshots(p, "browser-turn")


async def test_stop_and_a_new_message_interrupt(site: tuple[Harness, str], page: object) -> None:
    harness, url = site
    harness.llm.reply = LONG
    p = page
    await p.goto(url)  # type: ignore[attr-defined]
    await p.wait_for_function("document.querySelector('#voice').value !== ''")  # type: ignore[attr-defined]
    await ask(p, "Tell me a long story.")
    await p.wait_for_function("parley.playedMs() > 700", timeout=10_000)  # type: ignore[attr-defined]
    assert await p.is_enabled("#stop")  # type: ignore[attr-defined]
    await p.click("#stop")  # type: ignore[attr-defined]
    await p.wait_for_selector(".meta", timeout=10_000)  # type: ignore[attr-defined]
    assert "Interrupted" in await p.inner_text(".meta")  # type: ignore[attr-defined]
    heard = (await p.inner_text(".assistant")).strip()  # type: ignore[attr-defined]
    assert heard and LONG.startswith(heard) and len(heard) < len(LONG) / 2
    await wait_for(lambda: harness.llm.open_streams == 0 and harness.tts.open_streams == 0)
    assert harness.llm.cancelled == 1
    assert await p.is_disabled("#stop")  # type: ignore[attr-defined]

    # Typing a new message while a reply plays interrupts it too.
    await ask(p, "Another long one?")
    await p.wait_for_function("parley.playedMs() > 300", timeout=10_000)  # type: ignore[attr-defined]
    harness.llm.reply = SHORT
    await ask(p, "Never mind, short please.")
    await p.wait_for_function("document.querySelectorAll('.meta').length === 3", timeout=15_000)  # type: ignore[attr-defined]
    metas = await p.locator(".meta").all_inner_texts()  # type: ignore[attr-defined]
    assert "Interrupted" in metas[1] and "Interrupted" not in metas[2]
    # The history the service keeps is what was heard: the cut reply precedes the last question.
    last_request = harness.llm.requests[-1].messages
    assert last_request[-1].content == "Never mind, short please."
    heard_reply = last_request[-2].content
    assert last_request[-2].interrupted, "the cut reply is marked as interrupted"
    assert LONG.startswith(heard_reply) and len(heard_reply) < len(LONG) / 2
    await asyncio.sleep(0.2)
    await screenshots(p, "browser-interrupt")


async def test_the_page_says_when_the_service_is_down_and_comes_back_with_it(
    make_site: Callable[..., Awaitable[Site]], page: Any
) -> None:
    """The service is down: the page says so in plain words (the gRPC detail on demand), keeps the
    message, and when the service starts the voice picker fills in and the message is answered, with no
    reload."""
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=20), service=False)
    await page.goto(site.url)
    status = page.locator("#status")
    await status.wait_for(state="visible")
    assert "voice service is not reachable" in await status.inner_text()
    assert await page.locator("#voice").input_value() == ""  # "unavailable"
    await ask(page, "Hello?")
    await page.wait_for_function("document.querySelector('#status-text').textContent.includes('not responding')")
    text = (await page.inner_text("#status-text")).strip()
    assert "UNAVAILABLE" not in text and "127.0.0.1" not in text
    await page.click("#status-details summary")  # the detail, for the curious
    assert "UNAVAILABLE" in await page.inner_text("#status-detail")
    await page.wait_for_selector(".user.unsent")
    assert "Not sent yet" in await page.inner_text(".unsent-note")
    await screenshots(page, "browser-service-down")

    await site.start_service()
    await page.wait_for_function("document.querySelector('#voice').value === 'fake-voice'", timeout=20_000)
    assert await page.locator("#voice option").all_inner_texts() == ["fake-voice (en_US)", "fake-voice-2 (en_US)"]
    await page.wait_for_selector(".meta", timeout=20_000)
    assert (await page.inner_text(".assistant")).strip() == SHORT
    assert await page.locator(".unsent").count() == 0
    assert site.llm.requests[-1].messages[-1].content == "Hello?"
