"""The demo page in real headless Chromium (Debian's ``chromium``, driven by Playwright): audio is
scheduled and played, captions appear, Stop and a new message interrupt. Screenshots go to
``test-artifacts/``."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Harness, free_port, start_harness, stop_harness, wait_for
from tests.fakes import FakeLLM, FakeTTS
from ws_bridge.server import Bridge, BridgeOptions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it as root)"
)

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


@pytest.fixture
async def page() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = await browser.new_context(viewport={"width": 390, "height": 760})  # a phone-sized screen
        yield await context.new_page()
        await browser.close()


async def ask(page: object, text: str) -> None:
    await page.fill("#text", text)  # type: ignore[attr-defined]
    await page.click("#send")  # type: ignore[attr-defined]


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
    meta = await p.inner_text(".meta")  # type: ignore[attr-defined]
    assert "first audio" in meta and "ms" in meta
    ARTIFACTS.mkdir(exist_ok=True)
    await p.screenshot(path=str(ARTIFACTS / "browser-turn.png"), full_page=True)  # type: ignore[attr-defined]


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
    assert "interrupted" in await p.inner_text(".meta")  # type: ignore[attr-defined]
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
    assert "interrupted" in metas[1] and "interrupted" not in metas[2]
    # The history the service keeps is what was heard: the cut reply precedes the last question.
    last_request = harness.llm.requests[-1].messages
    assert last_request[-1].content == "Never mind, short please."
    heard_reply = last_request[-2].content.removesuffix(" [interrupted: the user heard only this much]")
    assert heard_reply != last_request[-2].content, "the cut reply is marked as interrupted"
    assert LONG.startswith(heard_reply) and len(heard_reply) < len(LONG) / 2
    ARTIFACTS.mkdir(exist_ok=True)
    await asyncio.sleep(0.2)
    await p.screenshot(path=str(ARTIFACTS / "browser-interrupt.png"), full_page=True)  # type: ignore[attr-defined]


async def test_the_page_says_when_the_service_is_down(page: object) -> None:
    dead = free_port()
    bridge = await Bridge(BridgeOptions(grpc_target=f"127.0.0.1:{dead}", host="127.0.0.1", port=0)).start()
    try:
        p = page
        await p.goto(f"http://127.0.0.1:{bridge.port}/")  # type: ignore[attr-defined]
        status = p.locator("#status")  # type: ignore[attr-defined]
        await status.wait_for(state="visible", timeout=10_000)
        assert "voice service is unreachable" in await status.inner_text()
        await ask(p, "Hello?")
        await p.wait_for_function(  # type: ignore[attr-defined]
            "document.querySelector('#status').textContent.includes('unavailable')", timeout=10_000
        )
    finally:
        await bridge.aclose()
