"""Where the user's utterances begin and end, from a voice activity detector's frame scores.

Pure: no I/O, no clock. The input audio's timeline is the count of samples received (at the
detector's rate), so every offset is in the audio's own time, whatever the network did.

:class:`Listener` takes the detector's rate PCM16 and one speech probability per frame, and says
when speech started (after ``min_speech_ms`` of it, so a cough or "mhm" neither interrupts a reply
nor starts an utterance), and, with server turn detection, when it stopped (after ``silence_ms``
below the threshold), handing over the utterance with ``prefix_padding_ms`` of the audio before the
speech (so its first syllable is not clipped). With manual turn detection the client ends the
utterance (:meth:`Listener.commit`); speech is still reported, for barge-in. Memory is bounded: an
utterance longer than ``max_utterance_ms`` ends there.

With server turn detection, a shorter silence (``tentative_silence_ms``) already reports a
:class:`Paused` with the utterance as it would end there, so that the caller can transcribe it and
prepare the reply while it waits to know whether the user is done; speech after it reports
:class:`Resumed` (that utterance is not the one), and the full silence reports the :class:`Utterance`,
whose audio is then exactly the paused one's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Event", "ListenPolicy", "Listener", "Paused", "Resumed", "SpeechBegan", "TurnDetection", "Utterance"]


class TurnDetection(enum.Enum):
    SERVER_VAD = "server_vad"
    MANUAL = "manual"


@dataclass(frozen=True)
class ListenPolicy:
    """How utterances are found. The defaults are the server's."""

    mode: TurnDetection = TurnDetection.SERVER_VAD
    threshold: float = 0.5
    """A frame whose speech probability reaches this is speech."""
    silence_ms: int = 500
    """Silence that ends an utterance (server turn detection)."""
    prefix_padding_ms: int = 300
    """Audio kept from before the speech was detected."""
    min_speech_ms: int = 200
    """Speech needed before it counts: shorter sounds are ignored."""
    max_utterance_ms: int = 30_000
    """An utterance ends here, whatever follows."""
    tentative_silence_ms: int = 200
    """Server turn detection: silence after which the utterance is taken as probably over (a reply is
    prepared unheard, and discarded if speech resumes). 0, or ``silence_ms`` and above: off."""

    def __post_init__(self) -> None:
        if not 0.1 <= self.threshold <= 0.99:
            raise ValueError("threshold must be between 0.1 and 0.99")
        if not 100 <= self.silence_ms <= 5000:
            raise ValueError("silence_ms must be between 100 and 5000")
        if not 0 <= self.prefix_padding_ms <= 1000:
            raise ValueError("prefix_padding_ms must be between 0 and 1000")
        if not 0 <= self.min_speech_ms <= 2000:
            raise ValueError("min_speech_ms must be between 0 and 2000")
        if self.max_utterance_ms < 1000:
            raise ValueError("max_utterance_ms must be at least 1000")
        if self.tentative_silence_ms and not 100 <= self.tentative_silence_ms <= 5000:
            raise ValueError("tentative_silence_ms must be 0 (off) or between 100 and 5000")

    @property
    def tentative(self) -> bool:
        """Whether pauses are reported."""
        return self.mode is TurnDetection.SERVER_VAD and 0 < self.tentative_silence_ms < self.silence_ms


@dataclass(frozen=True)
class SpeechBegan:
    """The user started speaking."""

    audio_start_ms: float
    """Where the utterance starts in the input timeline (the prefix padding included)."""


@dataclass(frozen=True)
class Paused:
    """Server turn detection: the user has been silent for ``tentative_silence_ms``; if the silence
    lasts, ``utterance`` is what they said."""

    utterance: Utterance


@dataclass(frozen=True)
class Resumed:
    """The user spoke again after a :class:`Paused`: its utterance goes on."""


@dataclass(frozen=True)
class Utterance:
    """The user stopped speaking: what they said, as audio at the detector's rate."""

    pcm: bytes
    audio_start_ms: float
    audio_end_ms: float
    """Where the speech ended (the last frame of speech)."""
    speech_ms: float
    """How much of it was speech."""


class _State(enum.Enum):
    IDLE = "idle"
    SPEAKING = "speaking"


class Listener:
    """Finds utterances in one input stream. Feed it in order with :meth:`push`."""

    def __init__(self, policy: ListenPolicy, sample_rate_hz: int, frame_ms: float) -> None:
        self._policy = policy
        self._rate = sample_rate_hz
        self._frame_samples = round(sample_rate_hz * frame_ms / 1000)
        self._negative = max(policy.threshold - 0.15, 0.01)  # hysteresis: speech ends lower than it starts
        self._state = _State.IDLE
        self._audio = bytearray()  # from sample _audio_start on
        self._audio_start = 0
        self._received = 0  # samples received
        self._scored = 0  # samples covered by scored frames
        self._speech_run = 0  # consecutive speech samples (IDLE) ...
        self._speech_first = 0  # ... and where that run began
        self._silence_run = 0  # consecutive silent samples (SPEAKING)
        self._speech_samples = 0  # speech in the current utterance
        self._last_speech_end = 0
        self._utterance_start = 0
        self._committed_start = 0  # MANUAL: the audio after the last commit or clear
        self._paused = False  # a Paused was reported for the current silence

    @property
    def speaking(self) -> bool:
        return self._state is _State.SPEAKING

    @property
    def received_ms(self) -> float:
        return self._ms(self._received)

    def push(self, pcm: bytes, probabilities: list[float]) -> list[Event]:
        """Add audio and the scores of the frames it completed; return what happened, in order."""
        self._audio += pcm
        self._received += len(pcm) // 2
        events: list[Event] = []
        for probability in probabilities:
            frame_start = self._scored
            self._scored += self._frame_samples
            event = self._frame(probability, frame_start)
            if event is not None:
                events.append(event)
        self._drop_old_audio()
        return events

    def commit(self) -> Utterance | None:
        """MANUAL: the client ended the utterance: everything since the last commit (None if empty)."""
        start = self._utterance_start if self.speaking else self._committed_start
        start = max(start, self._audio_start)
        end = self._received
        utterance = self._cut(start, end, self._speech_samples) if end > start else None
        self._reset(end)
        return utterance

    def clear(self) -> None:
        """Forget the audio so far, and any utterance in progress. The detector forgets what it has not
        scored yet too (its part of a frame): the next frame it scores begins with the next audio, so
        the frames are counted from what was received. (They were counted on from the last frame
        scored, and each clear moved every later utterance earlier by up to a frame: 200 clears put
        an utterance's end before its start.)"""
        self._scored = self._received
        self._reset(self._received)

    # -- per frame ---------------------------------------------------------------------------------

    def _frame(self, probability: float, start: int) -> Event | None:
        policy, frame = self._policy, self._frame_samples
        if self._state is _State.IDLE:
            if probability >= policy.threshold:
                if self._speech_run == 0:
                    self._speech_first = start
                self._speech_run += frame
                if self._ms(self._speech_run) >= policy.min_speech_ms:
                    return self._begin()
            elif probability < self._negative:
                self._speech_run = 0
            return None
        # SPEAKING
        if probability >= policy.threshold:
            self._silence_run = 0
            self._speech_samples += frame
            self._last_speech_end = start + frame
            if self._paused:
                self._paused = False
                return Resumed()
        elif probability < self._negative:
            self._silence_run += frame
        else:
            self._speech_samples += frame
        if self._ms(self._scored - self._utterance_start) >= policy.max_utterance_ms:
            return self._end(self._scored)
        if policy.mode is TurnDetection.SERVER_VAD and self._ms(self._silence_run) >= policy.silence_ms:
            return self._end(self._last_speech_end)
        if policy.tentative and not self._paused and self._ms(self._silence_run) >= policy.tentative_silence_ms:
            self._paused = True
            return Paused(self._utterance_until(self._last_speech_end))
        return None

    def _begin(self) -> SpeechBegan:
        padding = round(self._policy.prefix_padding_ms * self._rate / 1000)
        speech_start = max(self._speech_first - padding, self._audio_start)
        self._utterance_start = speech_start
        if self._policy.mode is TurnDetection.MANUAL:  # the client's utterance: all since its last commit
            self._utterance_start = max(self._committed_start, self._audio_start)
        self._state = _State.SPEAKING
        self._speech_samples = self._speech_run
        self._last_speech_end = self._scored
        self._silence_run = 0
        self._speech_run = 0
        return SpeechBegan(self._ms(speech_start))

    def _end(self, speech_end: int) -> Utterance | None:
        if self._policy.mode is TurnDetection.MANUAL:
            # The client ends the utterance; only the length bound ends it here.
            utterance = self._cut(self._utterance_start, self._scored, self._speech_samples)
            self._reset(self._scored)
            return utterance
        utterance = self._utterance_until(speech_end)
        self._reset(speech_end + self._tail(speech_end))
        return utterance

    def _utterance_until(self, speech_end: int) -> Utterance:
        """The utterance in progress, ending with its speech at ``speech_end``."""
        return self._cut(self._utterance_start, speech_end + self._tail(speech_end), self._speech_samples, speech_end)

    def _tail(self, speech_end: int) -> int:
        """Audio kept after the last speech: 100 ms (what there is of it)."""
        return min(round(0.1 * self._rate), self._scored - speech_end)

    def _cut(self, start: int, end: int, speech: int, speech_end: int | None = None) -> Utterance:
        begin = (start - self._audio_start) * 2
        pcm = bytes(self._audio[begin : (end - self._audio_start) * 2])
        return Utterance(pcm, self._ms(start), self._ms(end if speech_end is None else speech_end), self._ms(speech))

    def _reset(self, keep_from: int) -> None:
        self._state = _State.IDLE
        self._paused = False
        self._speech_run = self._silence_run = self._speech_samples = 0
        self._committed_start = keep_from
        keep_from = max(keep_from, self._audio_start)
        del self._audio[: (keep_from - self._audio_start) * 2]
        self._audio_start = keep_from

    def _drop_old_audio(self) -> None:
        """Keep only what an utterance may still need: while idle, the padding before a possible
        start of speech (and in MANUAL mode everything since the last commit, within the bound)."""
        if self.speaking:
            return
        if self._policy.mode is TurnDetection.MANUAL:
            keep = self._committed_start
            limit = self._received - round(self._policy.max_utterance_ms * self._rate / 1000)
            keep = max(keep, limit)
        else:
            padding = round(self._policy.prefix_padding_ms * self._rate / 1000)
            keep = (self._speech_first if self._speech_run else self._scored) - padding
        keep = max(keep, self._audio_start)
        if keep > self._audio_start:
            del self._audio[: (keep - self._audio_start) * 2]
            self._audio_start = keep
            if self._policy.mode is TurnDetection.MANUAL:
                self._committed_start = max(self._committed_start, keep)

    def _ms(self, samples: int) -> float:
        return samples * 1000 / self._rate


Event = SpeechBegan | Paused | Resumed | Utterance
"""What :meth:`Listener.push` reports."""
