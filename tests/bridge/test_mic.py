"""The page's microphone in real headless Chromium: Chromium's fake capture device plays a WAV of a
spoken question (Piper, made at test time) through getUserMedia, the page's AudioWorklet turns it into
16 kHz PCM16 and sends it; the real service (Silero VAD, Whisper, Gemma, Piper) hears it, answers it,
and the next repetition of the (looping) file interrupts the reply. Also: a service without speech
recognition, and a microphone the page may not use. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import json
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bridge.conftest import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, Site, ask, needs_chromium, screenshots
from tests.fakes import FakeLLM, FakeTTS
from ws_bridge.server import Bridge, BridgeOptions

pytestmark = needs_chromium

QUESTION = "What is the capital of France? Tell me about its long history."
WAV_RATE = 48000
LEAD_S = 0.5  # silence before the question
TAIL_S = 1.5  # silence after it: the file loops, so the question comes again 2 s after it ends, while the
# reply plays (its first audio comes about 0.7 s after the question ends; the embedded Gemma's shortest
# answers, "It's the capital of France.", last about 1.8 s: with 4 s here they ended before it came)


# -- a service that takes no voice, and a microphone that is refused --------------------------------


async def test_a_service_without_speech_recognition_disables_the_microphone(
    make_site: Callable[..., Awaitable[Site]], page: Any
) -> None:
    site = await make_site(FakeLLM(reply="Hello there."), FakeTTS(ms_per_char=5), voice=False)
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(str(payload))))
    await page.goto(site.url)
    assert await page.is_enabled("#mic")
    await ask(page, "Hi?")
    await page.wait_for_selector(".meta", timeout=10_000)
    assert (await page.inner_text(".assistant")).strip() == "Hello there."
    # It asked for voice input, was refused, and went on with text only on the same page.
    starts = [frame for frame in sent if '"start"' in frame]
    assert len(starts) == 2 and "inputAudio" in starts[0] and "inputAudio" not in starts[1]
    assert await page.is_disabled("#mic")
    assert "text only" in await page.inner_text("#mic-state")
    assert await page.locator("#status").is_hidden()
    await screenshots(page, "mic-no-stt")


@pytest.mark.parametrize(
    ("flags", "said"),
    [([], "No microphone was found"), (["--use-fake-device-for-media-stream"], "access was refused")],
    ids=["no-device", "denied"],
)
async def test_a_microphone_the_page_cannot_use_is_said_plainly_and_stays_off(
    make_site: Callable[..., Awaitable[Site]], flags: list[str], said: str
) -> None:
    """Chromium without a capture device, or with one but no permission (headless Chromium denies the
    prompt): getUserMedia fails, and the page says so in plain words, the error under Details."""
    from playwright.async_api import async_playwright

    site = await make_site(FakeLLM(reply="Hello there."), FakeTTS(ms_per_char=5))
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *flags])
        page = await (await browser.new_context(viewport=PHONE)).new_page()
        page.set_default_timeout(15_000)
        await page.goto(site.url)
        await page.click("#mic")
        await page.locator("#status").wait_for(state="visible")
        text = await page.inner_text("#status-text")
        assert said in text and "type" in text, text
        await page.click("#status-details summary")
        assert "Error" in await page.inner_text("#status-detail")
        assert await page.get_attribute("#mic", "aria-pressed") == "false"
        assert await page.locator("#mic-state").is_hidden()
        assert await page.is_enabled("#mic")
        # Typing still works.
        await ask(page, "Hi?")
        await page.wait_for_selector(".meta", timeout=10_000)
        assert (await page.inner_text(".assistant")).strip() == "Hello there."
        await screenshots(page, f"mic-refused-{'denied' if flags else 'no-device'}")
        await browser.close()


# -- the real thing ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Any, Any, Any]]:
    from service.config import Settings
    from service.engines.factory import load_engines, load_voice_input

    llm, tts = load_engines(Settings(_cli_parse_args=False))  # type: ignore[call-arg]
    ears = load_voice_input(Settings(_cli_parse_args=False))  # type: ignore[call-arg]
    yield llm, tts, ears


@pytest.fixture
async def real_site(engines: tuple[Any, Any, Any]) -> AsyncIterator[str]:
    from service.core.settings import SessionDefaults
    from service.server import start_server
    from service.servicer import StreamLimits

    llm, tts, ears = engines
    running = await start_server(
        llm,
        tts,
        host="127.0.0.1",
        port=0,
        defaults=SessionDefaults(max_tokens=120),
        limits=StreamLimits(),
        voice_input=ears,
    )
    bridge = await Bridge(BridgeOptions(grpc_target=f"127.0.0.1:{running.port}", host="127.0.0.1", port=0)).start()
    yield f"http://127.0.0.1:{bridge.port}/"
    await bridge.aclose()
    await running.stop(0)


@pytest.fixture
async def question_wav(tmp_path: Path) -> Path:
    from tests.e2e.test_embedded import spoken_async

    path = tmp_path / "question.wav"
    speech = await spoken_async(QUESTION, WAV_RATE)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(WAV_RATE)
        wav.writeframes(b"\0\0" * int(WAV_RATE * LEAD_S) + speech + b"\0\0" * int(WAV_RATE * TAIL_S))
    return path


@pytest.fixture
async def talking_page(question_wav: Path) -> AsyncIterator[Any]:
    """A desktop-sized page in a Chromium whose microphone says the question, again and again."""
    from playwright.async_api import async_playwright

    args = [
        *CHROMIUM_ARGS,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={question_wav}",
    ]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        page.set_default_timeout(15_000)
        yield page
        await browser.close()


@pytest.mark.embedded
async def test_a_spoken_question_is_answered_and_speaking_again_interrupts_the_reply(
    real_site: str, talking_page: Any
) -> None:
    page = talking_page
    sent_bytes: list[int] = []
    sent_json: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            sent_bytes.append(len(payload))
        else:
            sent_json.append(json.loads(payload))

    page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    received: list[str] = []  # what the page was told (captions and audio left out), for a failure's message
    page.on(
        "websocket",
        lambda ws: ws.on(
            "framereceived",
            lambda p: received.append(p[:160]) if isinstance(p, str) and '"textDelta"' not in p else None,
        ),
    )
    await page.goto(real_site)
    await page.wait_for_function("document.querySelector('#voice').value !== ''", timeout=20_000)
    await page.click("#mic")
    assert await page.get_attribute("#mic", "aria-pressed") == "true"
    assert await page.get_attribute("#mic", "aria-label") == "Microphone"
    await page.wait_for_function("parley.listening()")
    await page.wait_for_function("document.querySelector('#mic-state').textContent === 'Listening…'")
    await screenshots(page, "mic-listening")
    await page.wait_for_function(
        "document.querySelector('#mic-state').textContent === 'Hearing you…'", timeout=int(LEAD_S * 1000) + 10_000
    )
    await page.wait_for_selector(".user.placeholder")
    await screenshots(page, "mic-hearing")
    # ~20 ms frames of 16 kHz PCM16 (640 bytes).
    assert sent_bytes and set(sent_bytes) == {640}, set(sent_bytes)

    # The transcript becomes the user's bubble; the reply plays.
    await page.wait_for_function(
        "document.querySelector('.user:not(.placeholder)')?.textContent.toLowerCase().includes('capital')",
        timeout=30_000,
    )
    question = (await page.locator(".user").first.inner_text()).lower()
    # (Whisper base has heard Piper's "France" as "friends": the other words are checked.)
    assert "capital" in question and "history" in question, question
    await page.wait_for_function("parley.playedMs() > 300", timeout=30_000)
    await screenshots(page, "mic-reply")

    # The file loops: the question comes again while the reply plays, and cuts it.
    try:
        await page.wait_for_function(
            "document.querySelector('.turn .meta')?.textContent.includes('Interrupted')", timeout=30_000
        )
    except Exception as error:
        raise AssertionError("the reply was not interrupted; the page was told:\n" + "\n".join(received)) from error
    first_meta = await page.locator(".turn").first.locator(".meta").inner_text()
    assert "Interrupted" in first_meta, first_meta
    assert await page.locator(".turn").first.locator(".assistant.interrupted").count() == 1
    # As Stop does: playback stopped and the page said how much it had played.
    interrupts = [m["interrupt"] for m in sent_json if "interrupt" in m]
    assert len(interrupts) == 1 and interrupts[0]["playedMs"] > 0, interrupts
    assert sent_json[0]["start"]["inputAudio"] == {"encoding": "AUDIO_ENCODING_PCM16", "sampleRateHz": 16000}
    # The second question is heard, as the next turn.
    await page.wait_for_function("document.querySelectorAll('.user:not(.placeholder)').length >= 2", timeout=30_000)
    second = (await page.locator(".user").nth(1).inner_text()).lower()
    assert "capital" in second, second
    await screenshots(page, "mic-barge-in")
    await page.click("#mic")
    assert await page.get_attribute("#mic", "aria-pressed") == "false"
    assert await page.locator("#mic-state").is_hidden()
