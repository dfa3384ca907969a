"""A session's ears: the user's voice in, utterances and their transcripts out.

:class:`Ears` owns one stream's voice input: it resamples the client's PCM16 to the detector's rate,
scores it with the speech detector, finds utterances with a :class:`~service.core.listening.Listener`
and transcribes each with the STT engine. It runs as its own task, in the order the audio came, and
tells the session what happened through commands (:class:`~service.core.command.SpeechBegan`,
:class:`~service.core.command.SpeechEnded`, :class:`~service.core.command.Heard`), so the session's
one loop still decides everything (a barge-in, a new turn).

When the user pauses (the listener's :class:`~service.core.listening.Paused`), the utterance so far is
transcribed at once and posted as a tentative :class:`Heard`, so the reply can be prepared while the
silence goes on; if it lasts, the final :class:`Heard` reuses that transcription (the audio is the
same), so little is left to do when the user is known to be done; if the user speaks again, the
transcription is cancelled and :class:`~service.core.command.SpeechResumed` tells the session to
discard what it prepared.

Bounded: at most ``MAX_QUEUED_CHUNKS`` chunks wait to be scored (the session, and so the client's
reader, waits while they do), an utterance is at most the listener's ``max_utterance_ms``, one
transcription runs at a time (the next utterance waits for it), and while
``MAX_UNHEARD_UTTERANCES`` utterances wait for their transcripts (checked before each chunk: one
chunk may end a few more) no more audio is scored: audio sent faster than it is transcribed waits
with the client instead of piling up utterances (up to about 1 MB each) without bound. That wait
holds the session's loop too (it waits to hand the ears a chunk), so the bound is far above what a
client speaking in real time reaches: only audio sent much faster than real time, or a replica
whose Whisper is far behind, meets it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import soxr

from service.core.aio import discard_outcome, drop_tracebacks
from service.core.audio import Encoding
from service.core.codecs import G711Decoder
from service.core.command import Command, Heard, HeardAll, SpeechBegan, SpeechEnded, SpeechResumed
from service.core.engine import SpeechDetector, STTEngine, Transcription
from service.core.events import SpokenInput
from service.core.listening import Listener, Paused, Resumed, TurnDetection, Utterance
from service.core.listening import SpeechBegan as Began
from service.core.settings import InputAudioRequest
from service.errors import EngineError, STTError

__all__ = ["MAX_QUEUED_CHUNKS", "MAX_UNHEARD_UTTERANCES", "Ears", "VoiceInput", "is_hallucination"]

log = logging.getLogger(__name__)

MAX_QUEUED_CHUNKS = 16
MAX_UNHEARD_UTTERANCES = 8
"""Utterances of a stream that may wait for their transcripts (the one being transcribed counted)
before its audio waits too."""

# What Whisper writes for silence or noise (it was trained on subtitles): never a turn on its own,
# unless the utterance had real speech in it and the engine is sure it heard some.
_HALLUCINATIONS = frozenset(
    {
        "thank you",
        "thank you very much",
        "thanks",
        "thanks for watching",
        "thank you for watching",
        "thank you so much for watching",
        "please subscribe",
        "you",
        "bye",
        "so",
        "okay",
        "oh",
        "hmm",
        "subtitles by the amaraorg community",
    }
)
_NOT_WORDS = re.compile(r"[^\w\s]")


T = TypeVar("T")
_Result = tuple[Transcription | STTError, float, float]
"""A transcription (or the engine's error), when it began (``time.monotonic()``) and how long it took."""


@dataclass(frozen=True)
class VoiceInput:
    """The engines voice input needs."""

    detector: SpeechDetector
    stt: STTEngine
    language: str = ""
    """The server's default language ("": detect)."""


def is_hallucination(result: Transcription, speech_ms: float) -> bool:
    """Whether a transcript is what Whisper writes for silence or noise, not what the user said."""
    words = " ".join(_NOT_WORDS.sub("", result.text.lower()).split())
    if not words:
        return True
    if result.no_speech_probability >= 0.6:
        return True
    return words in _HALLUCINATIONS and (speech_ms < 1500 or result.no_speech_probability >= 0.3)


class Ears:
    """One stream's voice input. :meth:`start`, then :meth:`feed`, :meth:`commit`, :meth:`clear`
    in the client's order; :meth:`aclose` at the end."""

    def __init__(self, engines: VoiceInput, request: InputAudioRequest, post: Callable[[Command], None]) -> None:
        self._engines = engines
        self._request = request
        self._post = post
        detector = engines.detector
        self._rate = detector.sample_rate_hz
        self._frames = detector.stream()
        self._listener = Listener(request.policy, self._rate, detector.frame_ms)
        self._resampler = (
            None
            if request.sample_rate_hz == self._rate
            else soxr.ResampleStream(request.sample_rate_hz, self._rate, 1, dtype="int16", quality="HQ")
        )
        self._odd_byte = b""
        self._decoder = (
            None if request.encoding is Encoding.PCM16 else G711Decoder(request.encoding, request.sample_rate_hz)
        )
        self._queue: asyncio.Queue[tuple[bytes, float] | tuple[str, str]] = asyncio.Queue(MAX_QUEUED_CHUNKS)
        """Chunks with when they arrived, and the client's commit, clear and finish, in order."""
        self._task: asyncio.Task[None] | None = None
        self._transcribing: asyncio.Task[None] | None = None
        """The last utterance's final transcription and its posting (each waits for the one before)."""
        self._unheard: collections.deque[asyncio.Task[None]] = collections.deque()
        """The final transcriptions not done yet, oldest first."""
        self._paused: tuple[Utterance, asyncio.Task[_Result], asyncio.Task[None]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        """The utterance as it was when the user paused, its transcription, and the tentative post."""
        # When each chunk's end arrived, by sample: to know when the end of an utterance's speech did.
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=512)
        self._samples = 0

    @property
    def max_chunk_bytes(self) -> int:
        """The largest ``user_audio`` accepted: one second, at the client's rate and encoding."""
        return self._request.sample_rate_hz * self._request.bytes_per_sample

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ears")

    async def feed(self, pcm: bytes) -> None:
        """Queue a chunk of the client's audio (waits while ``MAX_QUEUED_CHUNKS`` wait)."""
        await self._queue.put((pcm, time.monotonic()))  # (when it arrived, not when it is scored)

    async def commit(self, turn_id: str) -> None:
        """The client says the utterance is over (MANUAL); its transcript opens ``turn_id``."""
        await self._queue.put(("commit", turn_id))

    async def clear(self) -> None:
        """Discard the audio since the utterance began."""
        await self._queue.put(("clear", ""))

    async def finish(self) -> None:
        """The client sends no more audio: an utterance in progress ends here, and once every
        utterance is transcribed the session hears :class:`HeardAll`."""
        await self._queue.put(("finish", ""))

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:  # (a cancelled task's frames hold these ears, which held it)
            discard_outcome(task)

    # -- the task ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        failing = False  # the detector failed on the last chunk: said once, until a chunk succeeds
        while True:
            item = await self._queue.get()
            if isinstance(item[0], bytes):
                pcm, arrived = item
                await self._room_to_hear()
                try:
                    await self._hear(pcm, arrived)
                    failing = False
                except EngineError as error:  # the task goes on: a stopped task would block the session's feed
                    log.warning("voice input failed: %s", error)
                    self._listener.clear()
                    self._frames.reset()
                    self._unpause()
                    if not failing:
                        self._post(Heard("", None, None, error))
                    failing = True
            elif item[0] == "commit":
                speaking = self._listener.speaking
                utterance = self._listener.commit()
                if utterance is not None:
                    self._ended(utterance, item[1], stopped=speaking)
            elif item[0] == "finish":
                if self._listener.speaking or self._request.policy.mode is TurnDetection.MANUAL:
                    speaking = self._listener.speaking
                    utterance = self._listener.commit()
                    if utterance is not None and utterance.speech_ms > 0:
                        self._ended(utterance, "", stopped=speaking)
                self._unpause()
                if self._transcribing is not None:
                    await asyncio.wait({self._transcribing})
                self._post(HeardAll())
            else:
                speaking = self._listener.speaking
                self._listener.clear()
                self._frames.reset()
                self._unpause()
                if speaking:  # (the client heard speech_started: the utterance it cleared ends here)
                    self._post(SpeechEnded(round(self._samples * 1000 / self._rate)))

    async def _room_to_hear(self) -> None:
        """Wait while ``MAX_UNHEARD_UTTERANCES`` utterances wait for their transcripts."""
        while self._unheard:
            if self._unheard[0].done():
                self._unheard.popleft()
            elif len(self._unheard) >= MAX_UNHEARD_UTTERANCES:
                await asyncio.wait({self._unheard[0]})
            else:
                return

    async def _hear(self, pcm: bytes, arrived: float) -> None:
        pcm = self._to_detector_rate(pcm)
        self._samples += len(pcm) // 2
        self._arrivals.append((self._samples, arrived))
        probabilities = await self._frames.feed(pcm)
        for event in self._listener.push(pcm, probabilities):
            if isinstance(event, Began):
                self._post(SpeechBegan(round(event.audio_start_ms)))
            elif isinstance(event, Paused):
                self._pause(event.utterance)
            elif isinstance(event, Resumed):
                self._unpause()
            else:
                self._ended(event, "")

    def _pause(self, utterance: Utterance) -> None:
        """The user paused: transcribe what they said so far, and post it as tentative."""
        self._unpause()
        recognition = self._spawn(self._recognize(utterance, self._transcribing), "transcription")
        spoken = self._spoken(utterance)
        post = self._spawn(self._post_tentative(utterance, spoken, recognition), "tentative transcript")
        self._paused = (utterance, recognition, post)

    def _unpause(self) -> None:
        """The paused utterance is not the one: drop its transcription, and what was prepared with it."""
        if self._paused is None:
            return
        _, recognition, post = self._paused
        self._paused = None
        recognition.cancel()
        post.cancel()
        self._post(SpeechResumed())

    def _ended(self, utterance: Utterance, turn_id: str, *, stopped: bool = True) -> None:
        """The utterance is over: it is transcribed, and its transcript opens ``turn_id``. ``stopped``:
        the client heard its speech begin (speech_started), so it hears it stop; a commit of audio in
        which no speech was found is transcribed all the same, without a speech_stopped of its own."""
        recognition: asyncio.Task[_Result] | None = None
        if self._paused is not None and self._paused[0].pcm == utterance.pcm:
            recognition = self._paused[1]  # the silence lasted: the tentative transcript is the one
            self._paused = None
        else:
            self._unpause()
        if stopped:
            self._post(SpeechEnded(round(utterance.audio_end_ms)))
        if recognition is None:
            recognition = self._spawn(self._recognize(utterance, self._transcribing), "transcription")
        spoken = self._spoken(utterance)  # now: the arrival of its end is still remembered
        self._transcribing = self._spawn(self._post_final(utterance, turn_id, spoken, recognition), "final transcript")
        self._unheard.append(self._transcribing)

    def _spawn(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """A task of this stream's voice input, cancelled by :meth:`aclose` if still running."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _recognize(self, utterance: Utterance, previous: asyncio.Task[None] | None) -> _Result:
        """Transcribe ``utterance`` once the one before it is done (transcripts leave in the order the
        user spoke): the transcription (or the engine's error), when it began and the time it took (the
        turn it opens records it in its trace)."""
        if previous is not None:
            await asyncio.wait({previous})
        began = time.monotonic()
        language = self._request.language or self._engines.language or None
        try:
            result: Transcription | STTError = await self._engines.stt.transcribe(utterance.pcm, language)
        except STTError as error:
            drop_tracebacks(error)  # (said by its text alone; its frames hold it)
            result = error
        return result, began, time.monotonic() - began

    async def _post_tentative(
        self, utterance: Utterance, spoken: SpokenInput, recognition: asyncio.Task[_Result]
    ) -> None:
        result, began, spent = await recognition
        if isinstance(result, Transcription) and not is_hallucination(result, utterance.speech_ms):
            spoken = dataclasses.replace(spoken, transcription_s=spent, transcription_began=began)
            self._post(Heard("", result.text.strip(), spoken, tentative=True))

    async def _post_final(
        self, utterance: Utterance, turn_id: str, spoken: SpokenInput, recognition: asyncio.Task[_Result]
    ) -> None:
        result, began, spent = await recognition
        spoken = dataclasses.replace(spoken, transcription_s=spent, transcription_began=began)
        if isinstance(result, STTError):  # (the turn it fails says so, in the log too)
            self._post(Heard(turn_id, None, spoken, result))
            return
        if is_hallucination(result, utterance.speech_ms):
            log.debug("ignored an utterance heard as %r (no speech: %.2f)", result.text, result.no_speech_probability)
            log.info(
                "ignored an utterance Whisper may have made up from noise (no speech: %.2f)",
                result.no_speech_probability,
            )
            return
        self._post(Heard(turn_id, result.text.strip(), spoken))

    def _spoken(self, utterance: Utterance) -> SpokenInput:
        """Where and when the utterance's speech ended (its transcription time to be filled in)."""
        end_sample = round(utterance.audio_end_ms * self._rate / 1000)
        arrived = next((at for sample, at in self._arrivals if sample >= end_sample), time.monotonic())
        return SpokenInput(round(utterance.audio_end_ms), arrived, 0.0)

    def _to_detector_rate(self, pcm: bytes) -> bytes:
        if self._decoder is not None:
            pcm = self._decoder.decode(pcm)
        if self._odd_byte:
            pcm = self._odd_byte + pcm
        whole = len(pcm) - len(pcm) % 2
        self._odd_byte = pcm[whole:]
        if self._resampler is None:
            return pcm[:whole]
        samples = self._resampler.resample_chunk(np.frombuffer(pcm[:whole], dtype="<i2"), last=False)
        return samples.astype("<i2").tobytes()
