"""Dropping a TTS engine's silence before the speech."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.audio import LeadingSilence


def pcm(*values: int) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_leading_silence_is_dropped_keeping_a_lead_in(split: int) -> None:
    rate = 1000  # one sample per millisecond: a 10 ms lead-in is 10 samples
    audio = pcm(*([0, 5, -5] * 20), 2000, -2000, 0, 10, 0) + pcm(*([0] * 5))
    trimmer = LeadingSilence(rate, lead_in_ms=10)
    kept = b"".join(trimmer.feed(audio[i : i + split]) for i in range(0, len(audio), split))
    first_loud = 60
    assert kept == audio[(first_loud - 10) * 2 :]
    assert trimmer.done


def test_speech_right_at_the_start_is_kept_whole() -> None:
    trimmer = LeadingSilence(16000)
    audio = pcm(3000, -3000, 100, 0)
    assert trimmer.feed(audio) == audio
    assert trimmer.feed(pcm(0, 0)) == pcm(0, 0)  # silence after the speech stays


def test_all_silence_gives_nothing_until_speech_comes() -> None:
    trimmer = LeadingSilence(1000, lead_in_ms=3)
    assert trimmer.feed(pcm(0, 1, 2, 3, 4)) == b""
    assert not trimmer.done
    assert trimmer.feed(pcm(400)) == pcm(2, 3, 4, 400)
