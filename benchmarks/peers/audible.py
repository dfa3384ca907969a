"""When a turn's audio first becomes audible: one function for every system in the peer benchmark.

It needs only numpy, so Parley's venv and Pipecat's venv import the very same file.

The rule (the one Pipecat's own time-to-first-audio metric uses, ``detect_speech_onset`` in
``pipecat.audio.utils``, written here independently): the turn's PCM16 is scanned with 10 ms windows
centred on every 1 ms step (the signal edge-padded at both ends); a window is audible when its RMS,
after removing the window's mean, exceeds -40 dBFS (0.01 of full scale); the onset is the first step
that starts a run of at least 50 consecutive audible windows (50 ms of sound), so a lone click does
not count. With ``t0`` the arrival of the turn's first audio chunk, the first audible sample ``k``
arrives at ``max(arrival of the chunk holding sample k, t0 + k / sample_rate)``: the later of when
it was delivered and when a player that started at the first chunk would reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WINDOW_MS = 10.0
HOP_MS = 1.0
THRESHOLD_DBFS = -40.0
MIN_VOICED_MS = 50.0

RULE = (
    f"first sample that starts at least {MIN_VOICED_MS:g} ms of {WINDOW_MS:g} ms windows (one every "
    f"{HOP_MS:g} ms, mean removed) whose RMS exceeds {THRESHOLD_DBFS:g} dBFS; its time is the later of "
    "the arrival of the chunk holding it and the first chunk's arrival plus its offset in the audio"
)


def onset_sample(pcm: bytes, sample_rate: int) -> int | None:
    """The index of the first audible sample of mono PCM16 ``pcm``, or None if none is."""
    samples = np.frombuffer(pcm[: len(pcm) & ~1], dtype="<i2").astype(np.float64) / 32768.0
    frame = max(1, round(sample_rate * WINDOW_MS / 1000))
    hop = max(1, round(sample_rate * HOP_MS / 1000))
    if samples.size < frame:
        return None
    padded = np.pad(samples, frame // 2, mode="edge")
    # Window sums from cumulative sums: mean and mean square of each window starting at a hop.
    sums = np.concatenate(([0.0], np.cumsum(padded)))
    squares = np.concatenate(([0.0], np.cumsum(padded * padded)))
    starts = np.arange(0, padded.size - frame + 1, hop)
    mean = (sums[starts + frame] - sums[starts]) / frame
    power = (squares[starts + frame] - squares[starts]) / frame - mean * mean
    active = np.sqrt(np.maximum(power, 0.0)) > 10.0 ** (THRESHOLD_DBFS / 20.0)
    needed = max(1, round(MIN_VOICED_MS / HOP_MS))
    if active.size < needed:
        return None
    # Runs of `needed` active windows: a moving sum over the boolean array.
    run = np.convolve(active.astype(np.int32), np.ones(needed, dtype=np.int32), mode="valid")
    hits = np.flatnonzero(run == needed)
    return int(hits[0] * hop) if hits.size else None


def first_audible_ms(chunks: Sequence[tuple[float, bytes]], sample_rate: int) -> tuple[float, int] | None:
    """``chunks`` are (arrival in ms, PCM16 bytes) in order. Returns (the first audible sample's time
    in ms, its index), or None if the audio never becomes audible."""
    if not chunks:
        return None
    pcm = b"".join(data for _, data in chunks)
    k = onset_sample(pcm, sample_rate)
    if k is None:
        return None
    t0 = chunks[0][0]
    offset = 0
    arrival = chunks[-1][0]
    for at, data in chunks:
        offset += len(data) // 2
        if offset > k:
            arrival = at
            break
    return max(arrival, t0 + k * 1000 / sample_rate), k
