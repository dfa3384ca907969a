"""Settings resolution: what start asks, what the stored session had, and the server's defaults."""

from __future__ import annotations

import pytest

from service.core.audio import AudioFormat, Encoding
from service.core.engine import Voice
from service.core.settings import SessionDefaults, StartRequest, check_start, resolve_settings
from service.core.store import StoredSession
from service.errors import InvalidRequest

VOICES = [Voice("joe", "en_US", 22050, "piper"), Voice("amy", "en_US", 16000, "piper")]
DEFAULTS = SessionDefaults(system_prompt="Be helpful.", temperature=0.7, max_tokens=200)
STORED = StoredSession("abc", "Be terse.", "amy", temperature=0.2, max_tokens=50)


def resolve(request: StartRequest, stored: StoredSession | None = None):  # type: ignore[no-untyped-def]
    check_start(request, DEFAULTS, VOICES)
    return resolve_settings(request, stored, DEFAULTS, VOICES, "joe")


def test_a_new_session_takes_the_servers_defaults() -> None:
    settings = resolve(StartRequest())
    assert (settings.system_prompt, settings.voice, settings.temperature, settings.max_tokens) == (
        "Be helpful.",
        "joe",
        0.7,
        200,
    )
    assert settings.audio == AudioFormat(Encoding.PCM16, 22050)  # the voice's own rate
    assert (settings.chosen_temperature, settings.chosen_max_tokens) == (None, None)


def test_what_start_sets_wins_and_the_reply_is_never_longer_than_the_servers_limit() -> None:
    settings = resolve(
        StartRequest(system_prompt="Rhyme.", voice="amy", encoding=Encoding.WAV, sample_rate_hz=8000, max_tokens=999)
    )
    assert (settings.system_prompt, settings.voice, settings.audio) == (
        "Rhyme.",
        "amy",
        AudioFormat(Encoding.WAV, 8000),
    )
    assert settings.max_tokens == 200 and settings.chosen_max_tokens == 999


def test_a_resumed_session_keeps_what_it_had_unless_start_sets_it() -> None:
    settings = resolve(StartRequest(session_id="abc"), STORED)
    assert (settings.system_prompt, settings.voice, settings.temperature, settings.max_tokens) == (
        "Be terse.",
        "amy",
        0.2,
        50,
    )
    assert settings.stored_fields() == ("Be terse.", "amy", 0.2, 50)
    changed = resolve(StartRequest(session_id="abc", voice="joe", temperature=1.0), STORED)
    assert (changed.voice, changed.temperature, changed.system_prompt) == ("joe", 1.0, "Be terse.")


def test_a_stored_voice_the_server_no_longer_has_falls_back_to_the_default() -> None:
    stored = StoredSession("abc", "Be terse.", "retired-voice")
    assert resolve(StartRequest(session_id="abc"), stored).voice == "joe"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (StartRequest(temperature=2.5), "temperature 2.5 is out of range"),
        (StartRequest(max_tokens=0), "max_tokens 0 must be at least 1"),
        (StartRequest(sample_rate_hz=4000), "sample_rate_hz 4000 is out of range"),
        (StartRequest(system_prompt="x" * 4001), "start.system_prompt is 4001 characters"),
        (StartRequest(voice="nobody"), "unknown voice 'nobody'"),
        (StartRequest(voice="v" * 5000), "start.voice is 5000 characters, longer than any voice id"),
        (StartRequest(session_id="abc:owner"), "start.session_id is not a session id"),
        (StartRequest(session_id="a b"), "start.session_id is not a session id"),
        (StartRequest(session_id="x" * 65), "start.session_id is not a session id"),
    ],
)
def test_bad_starts_say_what_to_fix(request_: StartRequest, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_start(request_, DEFAULTS, VOICES)


def test_a_long_voice_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_start(StartRequest(voice="v" * 5000), DEFAULTS, VOICES)
    assert len(str(caught.value)) < 200
