"""The openai STT engine against the fake OpenAI server, through the real ``openai`` client: the
multipart form it sends (a 16 kHz WAV, the model, the language), what it makes of the answer,
retries, a bad key, client errors, a stalled server, an unreadable answer and cancellation."""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from service.config import Settings
from service.engines.factory import load_stt
from service.engines.openai_client import OpenAIConnection
from service.engines.openai_stt import OpenAISTT, OpenAISTTOptions
from service.engines.retry import RetryPolicy
from service.errors import STTError
from tests.conftest import wait_for
from tests.fake_openai import API_KEY, FakeOpenAI, Plan

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=2.0)
SPEECH = (8000 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype("<i2").tobytes()  # 1 s


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


def openai_stt(fake: FakeOpenAI, key: str = API_KEY, **options: object) -> OpenAISTT:
    connection = OpenAIConnection(api_key=key, base_url=fake.base_url, timeout_s=5.0, extra_headers={"X-Team": "voice"})
    settings = {"model": "whisper-1", "stall_timeout_s": 0.5, "retry": FAST_RETRY, **options}
    return OpenAISTT(connection, OpenAISTTOptions(**settings))  # type: ignore[arg-type]


@pytest.fixture
async def stt(fake: FakeOpenAI) -> AsyncIterator[OpenAISTT]:
    engine = openai_stt(fake)
    yield engine
    await engine.aclose()


async def test_the_utterance_goes_as_a_wav_file_in_a_form(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    assert (stt.name, stt.sample_rate_hz) == ("openai/whisper-1", 16000)
    fake.plan_transcription(Plan(text="  What time is it?\n"))
    heard = await stt.transcribe(SPEECH, "en")
    assert (heard.text, heard.language, heard.no_speech_probability) == ("What time is it?", "en", 0.0)
    (request,) = fake.of("/audio/transcriptions")
    assert request.path == "/v1/audio/transcriptions"
    await wait_for(lambda: request.outcome == "completed")
    assert request.headers["authorization"] == f"Bearer {API_KEY}" and request.headers["x-team"] == "voice"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert request.body == {"model": "whisper-1", "language": "en", "response_format": "json"}
    upload = request.files["file"]
    assert (upload.filename, upload.content_type) == ("utterance.wav", "audio/wav")
    with wave.open(io.BytesIO(upload.data)) as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, 16000)
        assert audio.readframes(audio.getnframes()) == SPEECH


async def test_the_language_is_sent_only_when_known(fake: FakeOpenAI) -> None:
    detect = openai_stt(fake, model="gpt-4o-mini-transcribe")
    german = openai_stt(fake, language="de")
    try:
        heard = await detect.transcribe(SPEECH)
        assert (heard.text, heard.language) == ("Hello from the fake transcriber.", "")  # json says no language
        assert (await german.transcribe(SPEECH)).language == "de"  # the engine's default
        assert (await german.transcribe(SPEECH, "fr")).language == "fr"  # the call's own
        assert (await german.transcribe(SPEECH, "EN")).language == "en"  # (as Whisper takes it)
    finally:
        await detect.aclose()
        await german.aclose()
    sent = [r.body for r in fake.of("/audio/transcriptions")]
    assert sent[0] == {"model": "gpt-4o-mini-transcribe", "response_format": "json"}
    assert [s.get("language") for s in sent[1:]] == ["de", "fr", "en"]


def test_a_language_asked_for_at_start_is_an_iso_639_code(stt: OpenAISTT) -> None:
    assert stt.language_problem("en") is None and stt.language_problem("yue") is None
    for wrong in ("en-US", "e", "en\n", "\u00e9n"):
        assert "is not a language code" in (stt.language_problem(wrong) or ""), wrong


def test_a_default_language_that_is_no_code_stops_the_engine_at_start(fake: FakeOpenAI) -> None:
    with pytest.raises(STTError, match="PARLEY_STT_LANGUAGE: 'en-US' is not a language code"):
        openai_stt(fake, language="en-US")


async def test_nothing_to_send(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    heard = await stt.transcribe(b"", "en")
    assert (heard.text, heard.language, heard.no_speech_probability) == ("", "en", 1.0)
    with pytest.raises(STTError, match="even number of bytes"):
        await stt.transcribe(b"\x00")
    assert fake.requests == []


@pytest.mark.parametrize(
    "first",
    [
        Plan(status=429, retry_after="0.3", error_message="Rate limit reached"),
        Plan(status=500, error_message="The server had an error"),
        Plan(status=503, error_message="Overloaded"),
        Plan(hang_up=True),
        Plan(drop_after=1, answer_chunk=4),
    ],
    ids=["429", "500", "503", "connection", "dropped"],
)
async def test_retryable_errors_are_retried(stt: OpenAISTT, fake: FakeOpenAI, first: Plan) -> None:
    fake.plan_transcription(first)
    began = time.monotonic()
    assert (await stt.transcribe(SPEECH)).text == "Hello from the fake transcriber."
    assert len(fake.of("/audio/transcriptions")) == 2
    if first.retry_after:
        assert time.monotonic() - began >= 0.3  # Retry-After was honoured


async def test_retries_are_bounded(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    fake.plan_transcription(*[Plan(status=500, error_message="down")] * 3)
    with pytest.raises(STTError, match=r"failed \(500\): down \(gave up after 3 tries\)"):
        await stt.transcribe(SPEECH)
    assert len(fake.of("/audio/transcriptions")) == 3


async def test_retry_after_beyond_the_limit_is_not_waited_for(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    fake.plan_transcription(Plan(status=429, retry_after="120", error_message="Rate limit reached"))
    with pytest.raises(STTError, match=r"rate limiting \(429\)"):
        await stt.transcribe(SPEECH)
    assert len(fake.of("/audio/transcriptions")) == 1


async def test_a_bad_key_fails_clearly_without_echoing_it(fake: FakeOpenAI) -> None:
    secret = "sk-proj-THISISSECRET0123456789abcdef"
    engine = openai_stt(fake, key=secret)
    try:
        with pytest.raises(STTError, match=r"rejected the API key \(401\): check OPENAI_API_KEY") as failure:
            await engine.transcribe(SPEECH)
    finally:
        await engine.aclose()
    assert "THISISSECRET" not in str(failure.value) and not failure.value.retryable
    assert len(fake.of("/audio/transcriptions")) == 1


@pytest.mark.parametrize(
    ("plan", "language", "expected"),
    [
        (Plan(), "english", "rejected the request (400): Invalid language 'english'"),
        (Plan(status=403, error_message="You have no access"), None, "refused access (403) to model 'whisper-1'"),
        (Plan(status=404, error_message="The model does not exist"), None, "does not know model 'whisper-1' (404)"),
    ],
    ids=["400", "403", "404"],
)
async def test_client_errors_fail_without_retry(
    stt: OpenAISTT, fake: FakeOpenAI, plan: Plan, language: str | None, expected: str
) -> None:
    fake.plan_transcription(plan)
    with pytest.raises(STTError) as failure:
        await stt.transcribe(SPEECH, language)
    assert expected in str(failure.value) and not failure.value.retryable
    assert len(fake.of("/audio/transcriptions")) == 1


@pytest.mark.parametrize(
    "stall", [Plan(stall_after=0), Plan(stall_after=1, answer_chunk=4)], ids=["silent", "mid-answer"]
)
async def test_a_stalled_server_is_given_up_on_and_tried_again(stt: OpenAISTT, fake: FakeOpenAI, stall: Plan) -> None:
    fake.plan_transcription(stall)
    began = time.monotonic()
    assert (await stt.transcribe(SPEECH)).text == "Hello from the fake transcriber."
    assert 0.5 <= time.monotonic() - began < 2.0
    first, second = fake.of("/audio/transcriptions")
    await wait_for(lambda: first.outcome == "disconnected" and second.outcome == "completed")


async def test_a_server_that_always_stalls_fails_the_transcription(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    fake.plan_transcription(*[Plan(stall_after=0)] * 3)
    with pytest.raises(STTError, match=r"sent nothing for 0.5 s; the request was cancelled \(gave up after 3 tries\)"):
        await stt.transcribe(SPEECH)
    requests = fake.of("/audio/transcriptions")
    assert len(requests) == 3
    await wait_for(lambda: all(r.outcome == "disconnected" for r in requests))


async def test_an_unreadable_answer_fails_without_retry(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    fake.plan_transcription(Plan(malformed_after=0))
    with pytest.raises(STTError, match="sent data Parley cannot read"):
        await stt.transcribe(SPEECH)
    assert len(fake.of("/audio/transcriptions")) == 1


async def test_cancelling_closes_the_request(fake: FakeOpenAI) -> None:
    engine = openai_stt(fake, stall_timeout_s=30.0)
    fake.plan_transcription(Plan(stall_after=0))
    try:
        task = asyncio.create_task(engine.transcribe(SPEECH))
        await wait_for(lambda: len(fake.of("/audio/transcriptions")) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        request = fake.of("/audio/transcriptions")[0]
        await wait_for(lambda: request.outcome == "disconnected")
        assert (await engine.transcribe(SPEECH)).text == "Hello from the fake transcriber."  # and it goes on
    finally:
        await engine.aclose()


async def test_load_stt_builds_it_from_the_settings(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()  # type: ignore[call-arg]
    assert (defaults.stt, defaults.openai_stt_model, defaults.stt_language) == ("whisper", "gpt-4o-mini-transcribe", "")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    settings = Settings(stt="openai", openai_base_url=fake.base_url, openai_stt_model="whisper-1", stt_language="en")  # type: ignore[call-arg]
    engine = load_stt(settings)
    try:
        assert isinstance(engine, OpenAISTT) and engine.name == "openai/whisper-1"
        assert (await engine.transcribe(SPEECH)).language == "en"
    finally:
        await engine.aclose()
    (request,) = fake.of("/audio/transcriptions")
    assert request.body == {"model": "whisper-1", "language": "en", "response_format": "json"}


async def test_an_answer_that_never_ends_fails_at_its_bound(stt: OpenAISTT, fake: FakeOpenAI) -> None:
    """Found in QA: the answer was read whole, without a bound (2 GB in 45 s for a server that sent
    an endless JSON string)."""
    fake.plan_transcription(Plan(endless=b"x" * 65536, endless_prefix=b'{"text": "'))
    with pytest.raises(STTError, match="answered a transcription with over 1048576 bytes"):
        await stt.transcribe(SPEECH)
    assert len(fake.of("/audio/transcriptions")) == 1  # (not retried)
    await wait_for(lambda: fake.of("/audio/transcriptions")[0].outcome == "disconnected")


async def test_an_answer_that_trickles_is_given_up_on(fake: FakeOpenAI) -> None:
    connection = OpenAIConnection(api_key=API_KEY, base_url=fake.base_url, timeout_s=1.0)
    stt = OpenAISTT(connection, OpenAISTTOptions(model="whisper-1", stall_timeout_s=0.5, retry=FAST_RETRY))
    trickle = Plan(text="x" * 200, answer_chunk=1, chunk_delay_s=0.1)  # a byte every 0.1 s: never a stall
    fake.plan_transcription(trickle, trickle, trickle)
    began = time.monotonic()
    with pytest.raises(STTError, match="did not finish its answer within 1 s"):
        await stt.transcribe(SPEECH)
    assert time.monotonic() - began < 5
    await stt.aclose()
