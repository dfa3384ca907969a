"""Finding utterances in a detector's frame scores: pure, on synthetic scores."""

from __future__ import annotations

import pytest

from service.core.listening import Event, Listener, ListenPolicy, Paused, Resumed, SpeechBegan, TurnDetection, Utterance

RATE = 16000
FRAME_MS = 32
FRAME = RATE * FRAME_MS // 1000  # 512 samples


def frames(levels: list[float]) -> tuple[bytes, list[float]]:
    """Audio whose samples tell which frame they belong to, with the frames' scores."""
    pcm = b"".join(i.to_bytes(2, "little", signed=True) * FRAME for i in range(len(levels)))
    return pcm, levels


def run(levels: list[float], policy: ListenPolicy, step: int = 3, *, pauses: bool = False) -> list[Event]:
    """The listener's events (without pauses and resumptions unless ``pauses``)."""
    listener = Listener(policy, RATE, FRAME_MS)
    pcm, scores = frames(levels)
    events: list[Event] = []
    for i in range(0, len(scores), step):
        events += listener.push(pcm[i * FRAME * 2 : (i + step) * FRAME * 2], scores[i : i + step])
    return [e for e in events if pauses or not isinstance(e, Paused | Resumed)]


def frames_in(utterance: Utterance) -> list[int]:
    values = [int.from_bytes(utterance.pcm[i : i + 2], "little", signed=True) for i in range(0, len(utterance.pcm), 2)]
    return sorted(set(values))


@pytest.mark.parametrize("step", [1, 3, 100])
def test_an_utterance_starts_after_enough_speech_and_ends_after_silence(step: int) -> None:
    policy = ListenPolicy(silence_ms=320, prefix_padding_ms=64, min_speech_ms=96)
    levels = [0.0] * 10 + [0.9] * 20 + [0.0] * 15
    events = run(levels, policy, step)
    assert [type(e) for e in events] == [SpeechBegan, Utterance]
    began, utterance = events
    assert isinstance(began, SpeechBegan) and isinstance(utterance, Utterance)
    assert began.audio_start_ms == (10 - 2) * FRAME_MS  # two frames of padding before the speech
    assert utterance.audio_end_ms == 30 * FRAME_MS
    got = frames_in(utterance)
    assert got[0] == 8 and got[-1] >= 29  # padding, the whole speech, a little after
    assert utterance.speech_ms == 20 * FRAME_MS


def test_a_cough_is_not_speech() -> None:
    policy = ListenPolicy(min_speech_ms=200)
    assert run([0.0] * 5 + [0.95] * 5 + [0.0] * 30, policy) == []  # 160 ms


def test_short_dips_do_not_end_an_utterance() -> None:
    policy = ListenPolicy(silence_ms=320, min_speech_ms=64)
    levels = [0.9] * 10 + [0.0] * 5 + [0.9] * 10 + [0.0] * 12
    events = run(levels, policy)
    assert [type(e) for e in events] == [SpeechBegan, Utterance]


def test_an_utterance_ends_at_its_length_bound() -> None:
    policy = ListenPolicy(min_speech_ms=64, max_utterance_ms=1000)
    events = run([0.9] * 80, policy)
    assert [type(e) for e in events][:2] == [SpeechBegan, Utterance]
    utterance = events[1]
    assert isinstance(utterance, Utterance) and len(utterance.pcm) // 2 <= RATE * 1.1


def test_manual_mode_ends_only_on_commit_and_keeps_everything_since_the_last_one() -> None:
    policy = ListenPolicy(mode=TurnDetection.MANUAL, min_speech_ms=64)
    listener = Listener(policy, RATE, FRAME_MS)
    pcm, scores = frames([0.0] * 5 + [0.9] * 10 + [0.0] * 40)
    events = listener.push(pcm, scores)
    assert [type(e) for e in events] == [SpeechBegan]  # for barge-in; no end on silence
    utterance = listener.commit()
    assert utterance is not None and frames_in(utterance) == list(range(55))
    assert listener.commit() is None  # nothing new


def test_clear_discards_the_utterance_in_progress() -> None:
    policy = ListenPolicy(min_speech_ms=64, silence_ms=320)
    listener = Listener(policy, RATE, FRAME_MS)
    pcm, scores = frames([0.9] * 10)
    assert [type(e) for e in listener.push(pcm, scores)] == [SpeechBegan]
    listener.clear()
    pcm, scores = frames([0.0] * 20)
    assert listener.push(pcm, scores) == []
    assert not listener.speaking


def test_clears_between_parts_of_frames_leave_the_timeline_true() -> None:
    # The detector drops its part of a frame at a clear; the listener went on counting frames from the
    # last one scored, so each clear shifted later utterances earlier (an attack pass: after 200 clears
    # speech_stopped came before speech_started, and the utterance's audio was the wrong part).
    policy = ListenPolicy(min_speech_ms=64, silence_ms=320)
    listener = Listener(policy, RATE, FRAME_MS)
    part = (-1).to_bytes(2, "little", signed=True) * (FRAME - 12)  # less than a frame: never scored
    for _ in range(200):
        assert listener.push(part, []) == []
        listener.clear()  # (with the detector's reset, which drops the part)
    received = 200 * (FRAME - 12)
    pcm, scores = frames([0.0] * 5 + [0.9] * 10 + [0.0] * 12)
    began, utterance = [e for e in listener.push(pcm, scores) if not isinstance(e, Paused | Resumed)]
    assert isinstance(began, SpeechBegan) and isinstance(utterance, Utterance)
    padding = round(policy.prefix_padding_ms * RATE / 1000)  # (the audio before the speech, as far as there is)
    assert began.audio_start_ms == pytest.approx(max(received, received + 5 * FRAME - padding) * 1000 / RATE)
    assert utterance.audio_end_ms == pytest.approx((received + 15 * FRAME) * 1000 / RATE)
    assert frames_in(utterance) == list(range(19))  # its own audio, to 0.1 s after the speech (into frame 18)


def test_memory_stays_bounded_while_idle() -> None:
    listener = Listener(ListenPolicy(), RATE, FRAME_MS)
    pcm, scores = frames([0.0] * 100)
    for _ in range(100):  # 320 s of silence
        listener.push(pcm, scores)
    assert len(listener._audio) <= RATE * 2  # about the padding, never the whole input


def test_policy_rejects_nonsense() -> None:
    for bad in ({"threshold": 0.0}, {"silence_ms": 50}, {"prefix_padding_ms": -1}, {"min_speech_ms": 5000}):
        with pytest.raises(ValueError):
            ListenPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ListenPolicy(tentative_silence_ms=50)


@pytest.mark.parametrize("step", [1, 3, 100])
def test_a_pause_reports_the_utterance_the_full_silence_then_ends_with(step: int) -> None:
    policy = ListenPolicy(silence_ms=320, tentative_silence_ms=128, prefix_padding_ms=64, min_speech_ms=96)
    events = run([0.0] * 10 + [0.9] * 20 + [0.0] * 15, policy, step, pauses=True)
    assert [type(e) for e in events] == [SpeechBegan, Paused, Utterance]
    paused, utterance = events[1], events[2]
    assert isinstance(paused, Paused) and isinstance(utterance, Utterance)
    assert paused.utterance.pcm == utterance.pcm  # the same audio: its transcript can be reused
    assert paused.utterance.audio_end_ms == utterance.audio_end_ms == 30 * FRAME_MS


def test_speech_after_a_pause_resumes_the_utterance() -> None:
    policy = ListenPolicy(silence_ms=320, tentative_silence_ms=128, min_speech_ms=64)
    levels = [0.9] * 10 + [0.0] * 6 + [0.9] * 10 + [0.0] * 5 + [0.9] * 3 + [0.0] * 12
    events = run(levels, policy, 1, pauses=True)
    assert [type(e) for e in events] == [SpeechBegan, Paused, Resumed, Paused, Resumed, Paused, Utterance]
    last_pause, utterance = events[-2], events[-1]
    assert isinstance(last_pause, Paused) and isinstance(utterance, Utterance)
    assert last_pause.utterance.pcm == utterance.pcm
    assert utterance.audio_end_ms == 34 * FRAME_MS  # all of it, up to the last speech


@pytest.mark.parametrize(
    "policy",
    [
        ListenPolicy(silence_ms=320, tentative_silence_ms=0, min_speech_ms=64),
        ListenPolicy(silence_ms=320, tentative_silence_ms=320, min_speech_ms=64),
        ListenPolicy(mode=TurnDetection.MANUAL, tentative_silence_ms=128, min_speech_ms=64),
    ],
)
def test_no_pauses_when_off_or_manual(policy: ListenPolicy) -> None:
    events = run([0.9] * 10 + [0.0] * 6 + [0.9] * 10 + [0.0] * 15, policy, pauses=True)
    assert not any(isinstance(e, Paused | Resumed) for e in events)
