"""Whisper base (MIT licence) through faster-whisper, to hear what Parley says: the model is the STT
engine's default, assembled from its two PyPI packages (:func:`default_model_dir`)."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import soxr

from service.engines.whisper_stt import default_model_dir


@cache
def _model() -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(str(default_model_dir()), device="cpu", compute_type="int8", cpu_threads=2)


def transcribe(pcm: bytes, sample_rate: int) -> str:
    """What Whisper hears in mono PCM16 at ``sample_rate`` (English)."""
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if sample_rate != 16000:
        audio = soxr.resample(audio, sample_rate, 16000)
    segments, _ = _model().transcribe(audio, language="en", beam_size=5, temperature=0.0)
    return " ".join(s.text.strip() for s in segments).strip()
