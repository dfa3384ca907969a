"""Speech detector ``silero``: Silero VAD v6 run in-process with onnxruntime.

The model is the ONNX file faster-whisper's wheel ships (``faster_whisper/assets/silero_vad_v6.onnx``,
1.2 MB), which faster-whisper's maintainers rebuilt from Silero VAD v6's weights. Both are under the
MIT licence (Silero VAD: Silero Team; faster-whisper: SYSTRAN). Only the file is used: the package is
found without being imported (importing it loads ctranslate2, PyAV and its own VAD code, about
0.2 s), and this module feeds the model itself.

The model takes a batch of frames, ``input`` (n, 576): each frame's 512 new samples (32 ms at
16 kHz, floats in [-1, 1]) after the last 64 samples of the frame before (zeros before the first);
and the LSTM's state ``h`` and ``c`` (1, 1, 128), which it carries through the batch frame after
frame and returns as ``hn`` and ``cn``. ``speech_probs`` (n,) is each frame's probability of
speech. Scoring n frames in one run gives the same numbers as n runs of one frame each, so how the
audio arrives in chunks does not change the probabilities.

All streams share one ``InferenceSession`` (its ``run`` is thread-safe); each stream keeps its own
state and context samples. A feed's complete frames are scored as one job on a worker thread, so the
event loop only slices bytes.

Cost, measured on 2 cores (AMD EPYC), onnxruntime 1.31.1, often with other work loading both cores:
in a batch (a 60 s feed, 1,875 frames in one job of 0.11 to 0.2 s) 60 to 75 µs of CPU a frame; one
frame alone 90 µs in the model on a quiet machine (150 to 250 µs on a loaded one), and a one-frame
``feed`` as a whole 0.3 to 0.5 ms of CPU: half the model, half the hop to the worker thread and back.
Live audio scored as it comes, a frame or two a call, so takes about 1 % of a core per stream.

onnxruntime gets one thread per run because the model is so small: two threads saved about 15 µs a
frame but keep the second core busy (onnxruntime's pool spins by default) that Piper and llama.cpp need;
streams run side by side on ``workers`` threads instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime

from service.core.workpool import WorkPool
from service.errors import VADError

__all__ = ["SileroFrames", "SileroOptions", "SileroVAD", "default_model_path"]

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000
FRAME_SAMPLES = 512
CONTEXT_SAMPLES = 64
"""Samples of the frame before that the model sees ahead of each frame (v5 and v6 at 16 kHz)."""
_FRAME_BYTES = FRAME_SAMPLES * 2
_CONTEXT_BYTES = CONTEXT_SAMPLES * 2
_MAX_RUN_FRAMES = 1875
"""Frames per ``run`` (60 s); a longer feed is scored in several runs, in the same job."""
_STATE_SHAPE = (1, 1, 128)

_Array = npt.NDArray[np.float32]


def default_model_path() -> Path:
    """The Silero VAD v6 model in faster-whisper's installed package."""
    spec = importlib.util.find_spec("faster_whisper")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise VADError("faster-whisper is not installed: its package ships the Silero VAD model (faster-whisper 1.2.1)")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "silero_vad_v6.onnx"


@dataclass(frozen=True)
class SileroOptions:
    """Which model file to run and how many feeds may be scored at once."""

    model_path: Path = field(default_factory=default_model_path)
    """Silero VAD v6 as faster-whisper ships it (inputs ``input``, ``h``, ``c``)."""
    workers: int = 2
    """Worker threads: feeds of different streams scored at the same time, one core each."""


class SileroVAD:
    """Scores 32 ms frames of 16 kHz audio for speech; one :class:`SileroFrames` per audio stream."""

    def __init__(self, options: SileroOptions) -> None:
        self._session = _load(options.model_path)
        self._executor = WorkPool("silero-vad", options.workers)

    @property
    def sample_rate_hz(self) -> int:
        return SAMPLE_RATE_HZ

    @property
    def frame_ms(self) -> float:
        return FRAME_SAMPLES * 1000 / SAMPLE_RATE_HZ

    def stream(self) -> SileroFrames:
        return SileroFrames(self._session, self._executor)

    async def aclose(self) -> None:
        """Wait for the feeds being scored; feeds after this raise :class:`VADError`."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class SileroFrames:
    """One audio stream: the model's state, the context samples and the partial frame between feeds.

    Feeds are scored in the order they were called, even when one is called before the last returned.
    """

    def __init__(self, session: onnxruntime.InferenceSession, executor: WorkPool) -> None:
        self._session = session
        self._executor = executor
        self._lock = asyncio.Lock()  # one scoring at a time: each starts from the state the last left
        self._resets = 0
        """How many times :meth:`reset` was called: a scoring begun before the last one leaves the state."""
        self._pending = bytearray()
        """The partial frame (and odd byte) waiting for more audio."""
        self._context = bytes(_CONTEXT_BYTES)
        """The last 64 samples of the last frame, which the model sees ahead of the next."""
        self._state = _initial_state()
        """The LSTM's ``h`` and ``c`` after the last frame scored."""

    async def feed(self, pcm: bytes) -> list[float]:
        """The speech probability of each 512-sample frame ``pcm`` completes (mono PCM16 at 16 kHz).

        A partial frame (and an odd byte) waits for the next call. Safe to cancel: the frames taken
        are scored all the same, so the model's state keeps step with the audio; only their
        probabilities are lost. Raises :class:`VADError`.
        """
        self._pending += pcm
        whole = len(self._pending) // _FRAME_BYTES * _FRAME_BYTES
        if whole == 0:
            return []
        frames = bytes(self._pending[:whole])
        del self._pending[:whole]
        audio = self._context + frames
        self._context = frames[-_CONTEXT_BYTES:]
        scoring = asyncio.ensure_future(self._score(audio, self._resets))
        scoring.add_done_callback(_retrieve)
        return await asyncio.shield(scoring)

    def reset(self) -> None:
        """Forget the audio so far: the model's state, the context samples, the partial frame.

        A feed being scored when this is called still returns its probabilities, but leaves the
        state alone."""
        self._resets += 1
        self._pending = bytearray()
        self._context = bytes(_CONTEXT_BYTES)
        self._state = _initial_state()

    async def _score(self, audio: bytes, resets: int) -> list[float]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                job = loop.run_in_executor(self._executor, _run_model, self._session, audio, self._state)
            except RuntimeError as error:  # the executor was shut down
                raise VADError("the speech detector is closed") from error
            try:
                probabilities, state = await job
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                raise VADError("the speech detector closed before scoring this audio") from None
            except Exception as error:  # onnxruntime raises its own types, none shared
                log.error("Silero VAD failed", exc_info=error)
                raise VADError(f"Silero VAD failed: {type(error).__name__}: {error}") from error
            if resets == self._resets:
                self._state = state
            return probabilities


def _initial_state() -> tuple[_Array, _Array]:
    zeros = np.zeros(_STATE_SHAPE, dtype=np.float32)
    return zeros, zeros


def _retrieve(scoring: asyncio.Future[list[float]]) -> None:
    """Take a shielded scoring's error, so that a cancelled feed's failure is not reported unretrieved."""
    if not scoring.cancelled():
        scoring.exception()


def _run_model(
    session: onnxruntime.InferenceSession, audio: bytes, state: tuple[_Array, _Array]
) -> tuple[list[float], tuple[_Array, _Array]]:
    """Score ``audio`` (the context samples, then whole frames, PCM16) from ``state``; in a worker."""
    samples = np.frombuffer(audio, dtype="<i2").astype(np.float32) / np.float32(32768)
    # Frame i with its context is samples[512 i : 512 i + 576]: windows of 576, a frame apart.
    windows = np.lib.stride_tricks.sliding_window_view(samples, CONTEXT_SAMPLES + FRAME_SAMPLES)[::FRAME_SAMPLES]
    h, c = state
    probabilities: list[float] = []
    for start in range(0, len(windows), _MAX_RUN_FRAMES):
        batch = np.ascontiguousarray(windows[start : start + _MAX_RUN_FRAMES])
        speech, h, c = session.run(["speech_probs", "hn", "cn"], {"input": batch, "h": h, "c": c})
        probabilities += speech.tolist()
    return probabilities, (h, c)


def _load(path: Path) -> onnxruntime.InferenceSession:
    if not path.is_file():
        raise VADError(f"the Silero VAD model {path} does not exist (faster-whisper==1.2.1 ships it)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # the model is tiny: see the module docstring
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types, none shared
        raise VADError(f"cannot load the Silero VAD model {path}: {error}") from error
    inputs = sorted(i.name for i in session.get_inputs())
    if inputs != ["c", "h", "input"]:
        raise VADError(f"{path} is not Silero VAD v6 as faster-whisper ships it: its inputs are {inputs}")
    try:  # one frame of silence: the model runs (and onnxruntime's first run, 0.6 ms, is paid now)
        _run_model(session, bytes(_CONTEXT_BYTES + _FRAME_BYTES), _initial_state())
    except Exception as error:
        raise VADError(f"the Silero VAD model {path} does not run: {error}") from error
    return session
