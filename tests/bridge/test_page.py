"""The page tells the truth (issue 12), in real headless Chromium: a long conversation's layout, what
a stopped reply kept, sessions that survive a restart and a reload, messages typed while Parley is
unreachable, the thinking state, timings, failures and read-aloud turns. Screenshots of each state, at
phone and desktop sizes, go to ``test-artifacts/``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.bridge.conftest import DESKTOP, PHONE, Site, ask, needs_chromium, screenshots
from tests.conftest import wait_for
from tests.fakes import FakeLLM, FakeTTS

pytestmark = needs_chromium

MakeSite = Callable[..., Awaitable[Site]]
NOTE = " [interrupted: the user heard only this much]"
SHORT = "Sure, here is a short answer. It has two sentences and that is all."
WORDY = (
    "Sure, here is an answer long enough to wrap over several lines on a phone. It goes on about one "
    "thing and then another, so that its bubble is tall. That is all."
)
MEDIUM = (
    "Right, this reply has a few sentences. The first one is short. The second one is a little longer "
    "than that. The third one ends the reply for good."
)


def last_exchange(site: Site) -> tuple[str, str]:
    """The assistant reply the service kept before the last question (note removed), and that question."""
    messages = site.llm.requests[-1].messages
    return messages[-2].content.removesuffix(NOTE), messages[-1].content


async def wait_done(page: Any, turns: int) -> None:
    """Until ``turns`` turns have ended and nothing plays."""
    await page.wait_for_function(
        f"document.querySelectorAll('.meta, .notice').length === {turns} && document.querySelector('#stop').disabled",
        timeout=20_000,
    )


async def record_frames(page: Any) -> list[dict[str, Any]]:
    """The JSON frames the page sends on its WebSockets, as they go."""
    sent: list[dict[str, Any]] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
    return sent


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


# -- 2. Stop right at a segment's end -------------------------------------------------------------

CASTLE = "He lived in a castle, and the castle was very old. It stood on a hill above the sea."


async def test_stop_right_at_a_segments_end_keeps_the_segment(make_site: MakeSite, page: Any) -> None:
    """The first segment lasts 1300.3125 ms; the second is late, so playback stops at the first one's
    end. Stop then reports 1301 ms (rounded up), and the whole first clause is kept."""
    site = await make_site(
        FakeLLM(reply=CASTLE),
        FakeTTS(ms_per_char=61.92, latency_s=lambda text: 0.0 if text.startswith("He lived") else 30.0),
    )
    sent = await record_frames(page)
    await page.goto(site.url)
    await ask(page, "Tell me about him.")
    await page.wait_for_function("parley.scheduledMs() > 0 && parley.playedMs() >= parley.scheduledMs() - 0.001")
    scheduled = await page.evaluate("parley.scheduledMs()")
    assert scheduled == pytest.approx(1300.3125, abs=0.01)  # a fraction of a millisecond past 1300
    assert await page.is_enabled("#stop")
    await page.click("#stop")
    await page.wait_for_selector(".meta")
    (asked,) = [m["userText"] for m in sent if "userText" in m]
    interrupts = [m["interrupt"] for m in sent if "interrupt" in m]
    assert interrupts == [{"playedMs": math.ceil(scheduled), "turnId": asked["turnId"]}]  # (the turn it stops)
    assert (await page.inner_text(".assistant")).strip() == "He lived in a castle,"
    await ask(page, "And then?")
    await wait_for(lambda: len(site.llm.requests) == 2)
    assert last_exchange(site) == ("He lived in a castle,", "And then?")


# -- 3. Stop and barge-in on a reply the service had finished sending -------------------------------


async def test_a_stopped_reply_shows_what_the_conversation_kept(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=MEDIUM), FakeTTS(ms_per_char=40))
    await page.goto(site.url)
    await ask(page, "Say a few things.")
    # The service sent the whole reply (its turn ended COMPLETED) while the page still plays it.
    await page.wait_for_selector(".meta")
    assert (await page.inner_text(".meta")).startswith("Spoke after")
    await page.wait_for_function("parley.playedMs() > 2500")
    await page.click("#stop")
    await page.wait_for_selector(".meta summary.cut")
    shown = (await page.inner_text(".assistant")).strip()
    assert shown and MEDIUM.startswith(shown) and len(shown) < len(MEDIUM) - 20
    assert "Interrupted" in await page.inner_text(".meta")
    assert "interrupted" in (await page.get_attribute(".assistant", "class") or "")
    await screenshots(page, "page-stopped-reply")

    # A barge-in on a finished reply: the new message cuts it the same way.
    await ask(page, "Say them again.")
    await wait_for(lambda: len(site.llm.requests) == 2)
    assert last_exchange(site) == (shown, "Say them again.")
    await page.wait_for_function("document.querySelectorAll('.meta').length === 2")
    await page.wait_for_function("parley.playedMs() > 1500")
    await ask(page, "Never mind.")
    await wait_for(lambda: len(site.llm.requests) == 3)
    kept, _ = last_exchange(site)
    await page.wait_for_function("document.querySelectorAll('.meta summary.cut').length === 2")
    assert (await page.locator(".assistant").nth(1).inner_text()).strip() == kept
    assert kept and len(kept) < len(MEDIUM) - 20


# -- 4. sessions survive a service restart and a reload -------------------------------------------


async def test_a_reload_resumes_the_session(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    sent = await record_frames(page)
    await page.goto(site.url)
    await ask(page, "My name is Ada.")
    await wait_done(page, 1)
    session = await page.evaluate("parley.sessionId()")
    assert site.store.created == [session]

    await page.reload()
    await page.wait_for_selector(".user")  # the conversation so far is still on the page
    assert (await page.inner_text(".user")).strip() == "My name is Ada."
    assert (await page.inner_text(".assistant")).strip() == SHORT
    await ask(page, "What is my name?")
    await wait_done(page, 2)
    starts = [m["start"] for m in sent if "start" in m]
    assert [s.get("sessionId", "") for s in starts] == ["", session]
    assert site.store.created == [session] and (session, True) in site.store.resumed
    messages = [(m.role, m.content) for m in site.llm.requests[-1].messages]
    assert messages[-3:] == [("user", "My name is Ada."), ("assistant", SHORT), ("user", "What is my name?")]
    assert await page.evaluate("parley.sessionId()") == session


async def test_a_service_restart_resumes_the_session_and_says_so_plainly(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    await page.goto(site.url)
    await ask(page, "My name is Ada.")
    await wait_done(page, 1)
    session = await page.evaluate("parley.sessionId()")

    await site.stop_service()
    await page.wait_for_function("document.querySelector('#status-text').textContent.includes('restarting')")
    text = await page.inner_text("#status-text")
    assert session not in text and "UNAVAILABLE" not in text and "replica" not in text, text
    assert "conversation will go on" in text
    await page.click("#status-details summary")
    assert session in await page.inner_text("#status-detail")  # the service's own words, on demand
    await screenshots(page, "page-service-restarting")

    await site.start_service()
    await page.wait_for_function(
        "document.querySelector('#status-text').textContent.includes('Reconnected')", timeout=30_000
    )
    assert "goes on where it was" in await page.inner_text("#status-text")
    await ask(page, "What is my name?")
    await wait_done(page, 2)
    assert (session, True) in site.store.resumed and site.store.created == [session]
    messages = [(m.role, m.content) for m in site.llm.requests[-1].messages]
    assert messages[-3:] == [("user", "My name is Ada."), ("assistant", SHORT), ("user", "What is my name?")]


async def test_a_lost_session_is_said_plainly_and_a_new_one_starts(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    await page.goto(site.url)
    await ask(page, "My name is Ada.")
    await wait_done(page, 1)
    session = await page.evaluate("parley.sessionId()")

    await site.stop_service()
    site.store = type(site.store)()  # the service comes back without its sessions
    site.tts.voice_ids = (*site.tts.voice_ids, "fake-voice-new")  # and with a voice more
    await site.start_service()
    await page.wait_for_function(
        "document.querySelector('#status-text').textContent.includes('could not be continued')", timeout=30_000
    )
    # The picker lists the voices of the service that came back (it kept the old list).
    await page.wait_for_selector("#voice option[value='fake-voice-new']", state="attached")
    assert "new conversation has started" in (await page.inner_text("#status-text")).lower()
    assert "does not remember" in await page.inner_text(".divider")
    await wait_for(lambda: len(site.store.created) == 1, timeout_s=10)
    assert site.store.resumed == [(session, False)]
    await screenshots(page, "page-session-lost")
    await ask(page, "What is my name?")
    await wait_done(page, 2)
    assert await page.evaluate("parley.sessionId()") == site.store.created[0] != session
    messages = [(m.role, m.content) for m in site.llm.requests[-1].messages]
    assert ("user", "My name is Ada.") not in messages


async def test_a_message_typed_while_the_session_was_lost_goes_below_the_new_conversation_mark(
    make_site: MakeSite, page: Any
) -> None:
    # The mark went at the end of the log, below the message waiting to be sent, which the new
    # conversation answers (a QA pass).
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    await page.goto(site.url)
    await ask(page, "My name is Ada.")
    await wait_done(page, 1)
    await site.stop_service()
    site.store = type(site.store)()  # the service comes back without its sessions
    await page.wait_for_function("!document.querySelector('#status').hidden")
    await ask(page, "Are you still there?")
    await site.start_service()
    await wait_done(page, 2)
    order = """[...document.querySelector('#log').children].map((e) =>
        e.classList.contains('divider') ? 'mark' : e.innerText.includes('Ada') ? 'first' : 'waiting')"""
    assert await page.evaluate(order) == ["first", "mark", "waiting"]
    messages = [(m.role, m.content) for m in site.llm.requests[-1].messages]
    assert messages[-1] == ("user", "Are you still there?") and ("user", "My name is Ada.") not in messages
    await page.reload()  # the saved log keeps the order
    await page.wait_for_selector(".divider")
    assert await page.evaluate(order) == ["first", "mark", "waiting"]


# -- 5. a message sent while the bridge is down ----------------------------------------------------


async def test_a_message_sent_while_the_bridge_is_down_is_kept_and_delivered(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    await page.goto(site.url)
    await ask(page, "My name is Ada.")
    await wait_done(page, 1)

    await site.stop_bridge()
    await page.wait_for_function("!document.querySelector('#status').hidden")
    await ask(page, "Are you still there?")
    assert await page.input_value("#text") == ""
    await page.wait_for_selector(".user.unsent")
    assert (await page.locator(".user").nth(1).inner_text()).strip() == "Are you still there?"
    assert "Not sent yet" in await page.inner_text(".unsent-note >> visible=true")
    assert "Cannot reach Parley" in await page.inner_text("#status-text")
    await screenshots(page, "page-unsent")

    await site.start_bridge()
    await wait_done(page, 2)
    assert await page.locator(".unsent").count() == 0
    messages = [(m.role, m.content) for m in site.llm.requests[-1].messages]
    assert messages[-3:] == [("user", "My name is Ada."), ("assistant", SHORT), ("user", "Are you still there?")]
    assert len(site.llm.requests) == 2  # sent once


async def test_a_reply_cut_off_by_a_lost_connection_says_so(make_site: MakeSite, page: Any) -> None:
    """The bridge goes away mid-reply: the service keeps the reply as far as its audio was sent, marked
    interrupted; the page shows as much as it received, marked as cut off, and goes on afterwards."""
    site = await make_site(FakeLLM(reply=MEDIUM, token_s=0.05), FakeTTS(ms_per_char=40, chunk_s=0.3))
    await page.goto(site.url)
    await ask(page, "Say a few things.")
    await page.wait_for_function("parley.playedMs() > 1000")
    await site.stop_bridge()
    await page.wait_for_selector(".meta summary.cut")
    assert (await page.inner_text(".meta")).strip() == "Cut off: the connection was lost"
    shown = (await page.inner_text(".assistant")).strip()
    await site.start_bridge()
    await ask(page, "Go on.")
    await wait_done(page, 2)
    kept, _ = last_exchange(site)
    assert shown and kept.startswith(shown) and len(kept) < len(MEDIUM)


# -- 6. between Send and the first audio -----------------------------------------------------------


async def test_the_page_shows_the_reply_being_written_before_it_speaks(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT, first_token_s=1.5, token_s=0.05), FakeTTS(latency_s=2.0))
    await page.goto(site.url)
    await ask(page, "Think first.")
    await page.wait_for_selector(".assistant .thinking", timeout=1000)
    assert (await page.inner_text(".assistant")).strip() == "Thinking…"
    await page.wait_for_timeout(200)
    await screenshots(page, "page-thinking")
    # The caption text as it streams, faint until it is spoken.
    await page.wait_for_function("document.querySelector('.assistant').textContent.includes('short answer')")
    assert await page.evaluate("parley.playedMs()") == 0
    assert await page.locator(".assistant .segment.pending, .assistant .unspoken").count() >= 1
    await screenshots(page, "page-writing")
    await page.wait_for_selector(".meta", timeout=20_000)
    assert (await page.inner_text(".assistant")).strip() == SHORT


# -- 8. a failed turn ---------------------------------------------------------------------------------


async def test_a_failed_turn_says_so_plainly_with_no_empty_bubble(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT, fail_after_tokens=0), FakeTTS(ms_per_char=5))
    await page.goto(site.url)
    await ask(page, "Hello?")
    notice = page.locator(".notice.failed")
    await notice.wait_for()
    assert await page.locator(".assistant").count() == 0
    visible = await notice.inner_text()
    assert "Sorry, no answer this time" in visible and "fake LLM failure" not in visible
    await notice.locator("summary").click()
    assert "fake LLM failure: the model went away" in await notice.inner_text()
    await screenshots(page, "page-failed")

    site.llm.fail_after_tokens = None
    await notice.locator("button", has_text="Try again").click()
    await page.wait_for_selector(".meta")
    assert (await page.inner_text(".assistant")).strip() == SHORT
    assert site.llm.requests[-1].messages[-1].content == "Hello?"


# -- 9. read aloud ----------------------------------------------------------------------------------


async def test_read_aloud_is_a_mode_for_one_message_and_looks_like_one(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    await page.goto(site.url)
    await page.check("#read-aloud")
    assert await page.inner_text("#send") == "Read aloud"
    await page.fill("#text", "Please read this sentence aloud.")
    await screenshots(page, "page-read-aloud-mode")
    # The longer label leaves the bar as it was on a phone: Stop did wrap onto a row of its own.
    await page.set_viewport_size(PHONE)
    rows = "['#mic', '#text', '#send', '#stop'].map((s) => document.querySelector(s).getBoundingClientRect().top)"
    assert len(set(await page.evaluate(rows))) == 1
    await page.click("#send")
    assert not await page.is_checked("#read-aloud")  # the next message is a question again
    assert await page.inner_text("#send") == "Send"
    await wait_done(page, 1)
    bubble = page.locator(".bubble.read")
    assert await bubble.locator(".label").text_content() == "Read aloud (your text, not an answer)"
    assert (await bubble.locator(".words").inner_text()).strip() == "Please read this sentence aloud."
    assert await page.locator(".assistant").count() == 0
    assert re.fullmatch(r"Read aloud after \d+\.\d+ s", (await page.inner_text(".meta")).strip())
    assert site.llm.requests == []  # not answered
    await ask(page, "And a question.")
    await wait_done(page, 2)
    assert (await page.inner_text(".assistant")).strip() == SHORT
    await screenshots(page, "page-read-aloud")


# -- the voice picker -------------------------------------------------------------------------------


async def test_a_new_voice_goes_on_with_the_same_conversation(make_site: MakeSite, page: Any) -> None:
    site = await make_site(FakeLLM(reply=SHORT), FakeTTS(ms_per_char=5))
    sent = await record_frames(page)
    await page.goto(site.url)
    await page.wait_for_function("document.querySelector('#voice').value === 'fake-voice'")
    await ask(page, "My name is Ada.")
    await wait_done(page, 1)
    session = await page.evaluate("parley.sessionId()")
    await page.select_option("#voice", "fake-voice-2")
    await page.wait_for_function("parley.state.sessionVoice === 'fake-voice-2'")
    assert [m["start"].get("voice") for m in sent if "start" in m] == ["fake-voice", "fake-voice-2"]
    await ask(page, "What is my name?")
    await wait_done(page, 2)
    assert (session, True) in site.store.resumed and site.store.created == [session]
    messages = [(m.role, m.content) for m in site.llm.requests[-1].messages]
    assert ("user", "My name is Ada.") in messages
    await page.reload()
    await page.wait_for_function("document.querySelector('#voice').value === 'fake-voice-2'")


async def test_the_page_works_with_auth_on_when_given_a_token(
    make_site: MakeSite, new_page: Callable[..., Awaitable[Any]]
) -> None:
    """With API keys on, the page opened with #token=… (what a backend hands out) lists the voices and
    converses; without a token it says plainly that it needs one; the token leaves the address bar."""
    from parley.v1 import voice_pb2 as pb
    from parley.v1 import voice_pb2_grpc
    from service.auth import KeyRing

    key, secret = "site-0123456789abcdefghijklmnop", "s3cret-0123456789abcdefghijklmnopqrstuv"
    site = await make_site(
        FakeLLM(reply="Hello from behind the keys."), FakeTTS(), keys=KeyRing(None, f"site:{key}"), token_secret=secret
    )
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{site.service_port}") as channel:
        minted = await voice_pb2_grpc.VoiceServiceStub(channel).CreateClientToken(
            pb.CreateClientTokenRequest(subject="visitor-1", ttl_s=600), metadata=[("authorization", f"Bearer {key}")]
        )
    page = await new_page()
    await page.goto(site.url)
    await ask(page, "Hello?")
    await page.wait_for_function("document.querySelector('#status').textContent.includes('needs an access token')")
    assert "Not sent: this page has no valid access token." in await page.inner_text("#log")
    await screenshots(page, "token-missing")
    page = await new_page()  # what the visitor gets from the site: the page with a token
    await page.goto(f"{site.url}#token={minted.token}")
    assert "token" not in page.url
    await page.wait_for_function("!document.querySelector('#voice').disabled")
    await ask(page, "Hello?")
    await wait_done(page, 1)
    assert "Hello from behind the keys." in await page.inner_text("#log")
    await screenshots(page, "token")
