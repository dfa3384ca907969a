"""Translation between the protobuf contract and the core's values. The only place (with the
servicer) where ``_pb2`` types meet the core."""

from __future__ import annotations

from parley.v1 import voice_pb2 as pb
from service.core.audio import Encoding
from service.core.command import (
    BadMessage,
    ClearAudio,
    ClientCommand,
    CommitAudio,
    Interrupt,
    SpeakText,
    Start,
    UserAudio,
    UserText,
)
from service.core.engine import Voice
from service.core.events import (
    AudioChunk,
    Message,
    SegmentStarted,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TextDelta,
    Transcript,
    TurnEnded,
    TurnEndReason,
)
from service.core.listening import TurnDetection
from service.core.settings import InputAudioStart, StartRequest
from service.errors import InvalidRequest

__all__ = ["command_from_proto", "message_to_proto", "start_from_proto", "voice_to_proto"]

_ENCODINGS = {
    pb.AUDIO_ENCODING_UNSPECIFIED: Encoding.PCM16,
    pb.AUDIO_ENCODING_PCM16: Encoding.PCM16,
    pb.AUDIO_ENCODING_WAV: Encoding.WAV,
    pb.AUDIO_ENCODING_OGG_OPUS: Encoding.OGG_OPUS,
    pb.AUDIO_ENCODING_MP3: Encoding.MP3,
    pb.AUDIO_ENCODING_MULAW: Encoding.MULAW,
    pb.AUDIO_ENCODING_ALAW: Encoding.ALAW,
}
_ENCODING_TO_PROTO = {encoding: number for number, encoding in _ENCODINGS.items() if number}
_INPUT_ENCODINGS = (Encoding.PCM16, Encoding.MULAW, Encoding.ALAW)
_REASONS = {
    TurnEndReason.COMPLETED: pb.TURN_END_REASON_COMPLETED,
    TurnEndReason.INTERRUPTED: pb.TURN_END_REASON_INTERRUPTED,
    TurnEndReason.FAILED: pb.TURN_END_REASON_FAILED,
}


def start_from_proto(start: pb.Start) -> StartRequest:
    """The core's view of a ``start`` message. Raises :class:`InvalidRequest` for unknown enums."""
    if start.audio.encoding not in _ENCODINGS:
        raise InvalidRequest(
            f"unknown audio encoding {start.audio.encoding}; use PCM16, WAV, OGG_OPUS, MP3, MULAW or ALAW"
        )
    return StartRequest(
        session_id=start.session_id,
        system_prompt=start.system_prompt,
        voice=start.voice,
        encoding=_ENCODINGS[start.audio.encoding],
        sample_rate_hz=start.audio.sample_rate_hz,
        bitrate_bps=start.audio.bitrate_bps,
        temperature=_decimal(start.llm.temperature) if start.llm.HasField("temperature") else None,
        max_tokens=start.llm.max_tokens if start.llm.HasField("max_tokens") else None,
        input_audio=_input_audio(start.input_audio) if start.HasField("input_audio") else None,
        text_deltas=_text_deltas(start.captions),
    )


def _text_deltas(mode: int) -> bool:
    if mode in (pb.CAPTION_MODE_UNSPECIFIED, pb.CAPTION_MODE_DELTAS):
        return True
    if mode == pb.CAPTION_MODE_SEGMENTS:
        return False
    raise InvalidRequest(f"unknown start.captions {mode}; use CAPTION_MODE_DELTAS or CAPTION_MODE_SEGMENTS")


_MODES = {
    pb.TURN_DETECTION_MODE_UNSPECIFIED: None,
    pb.TURN_DETECTION_MODE_SERVER_VAD: TurnDetection.SERVER_VAD,
    pb.TURN_DETECTION_MODE_MANUAL: TurnDetection.MANUAL,
}


def _input_audio(audio: pb.InputAudio) -> InputAudioStart:
    if _ENCODINGS.get(audio.encoding) not in _INPUT_ENCODINGS:
        raise InvalidRequest("start.input_audio.encoding: send PCM16, MULAW or ALAW")
    detection = audio.turn_detection
    if detection.mode not in _MODES:
        raise InvalidRequest(
            f"unknown start.input_audio.turn_detection.mode {detection.mode}; use SERVER_VAD or MANUAL"
        )
    return InputAudioStart(
        sample_rate_hz=audio.sample_rate_hz,
        encoding=_ENCODINGS[audio.encoding],
        language=audio.language,
        mode=_MODES[detection.mode],
        silence_ms=detection.silence_ms if detection.HasField("silence_ms") else None,
        prefix_padding_ms=detection.prefix_padding_ms if detection.HasField("prefix_padding_ms") else None,
        threshold=_decimal(detection.threshold) if detection.HasField("threshold") else None,
        min_speech_ms=detection.min_speech_ms if detection.HasField("min_speech_ms") else None,
        tentative_silence_ms=(detection.tentative_silence_ms if detection.HasField("tentative_silence_ms") else None),
    )


def command_from_proto(request: pb.ConverseRequest) -> ClientCommand:
    """The session command for one client message; :class:`BadMessage` for one that cannot be one."""
    try:
        return _command(request)
    except InvalidRequest as error:
        return BadMessage(error)


def _command(request: pb.ConverseRequest) -> ClientCommand:
    kind = request.WhichOneof("kind")
    if kind == "start":
        return Start(start_from_proto(request.start))
    if kind == "user_text":
        return UserText(request.user_text.text, request.user_text.turn_id)
    if kind == "speak_text":
        speak = request.speak_text
        return SpeakText(speak.text, speak.flush, speak.turn_id)
    if kind == "interrupt":
        played = request.interrupt.played_ms if request.interrupt.HasField("played_ms") else None
        if played is not None and played < 0:
            raise InvalidRequest(f"interrupt.played_ms is {played}; it cannot be negative")
        return Interrupt(played, request.interrupt.turn_id)
    if kind == "user_audio":
        return UserAudio(request.user_audio.data)
    if kind == "commit_audio":
        return CommitAudio(request.commit_audio.turn_id)
    if kind == "clear_audio":
        return ClearAudio()
    raise InvalidRequest(
        "the message sets none of start, user_text, speak_text, interrupt, user_audio, commit_audio, "
        "clear_audio (an empty message, or a kind this server does not know)"
    )


def voice_to_proto(voice: Voice) -> pb.Voice:
    return pb.Voice(id=voice.id, language=voice.language, sample_rate_hz=voice.sample_rate_hz, engine=voice.engine)


def _decimal(value: float) -> float:
    """A proto ``float`` as the decimal the client wrote: 0.99 arrives as 0.9900000095 (a float32), just
    over a limit of 0.99; seven significant digits are what a float32 holds."""
    return float(f"{value:.7g}")


def message_to_proto(event: Message) -> pb.ConverseResponse:
    """The server message for one outgoing message."""
    # The messages of every turn (audio above all) are filled in place: a sub-message given to the
    # constructor is copied into it (serialized and parsed again, audio bytes and all), which took
    # half of an audio message's conversion.
    if isinstance(event, AudioChunk):
        response = pb.ConverseResponse()
        audio = response.audio
        audio.turn_id = event.turn_id
        audio.segment_index = event.segment_index
        audio.sequence = event.sequence
        audio.data = event.data
        audio.duration_ms = event.duration_ms
        return response
    if isinstance(event, TextDelta):
        response = pb.ConverseResponse()
        delta = response.text_delta
        delta.turn_id = event.turn_id
        delta.text = event.text
        return response
    if isinstance(event, SegmentStarted):
        response = pb.ConverseResponse()
        segment = response.segment
        segment.turn_id = event.turn_id
        segment.index = event.index
        segment.text = event.text
        segment.start_ms = event.start_ms
        segment.spoken_text = event.spoken_text
        return response
    if isinstance(event, TurnEnded):
        usage = event.usage
        timings = event.timings
        return pb.ConverseResponse(
            turn_ended=pb.TurnEnded(
                turn_id=event.turn_id,
                reason=_REASONS[event.reason],
                spoken_text=event.spoken_text,
                error=event.error,
                usage=(
                    pb.LlmUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
                    if usage is not None
                    else None
                ),
                timings=pb.TurnTimings(
                    first_llm_token_ms=timings.first_llm_token_ms,
                    first_segment_ms=timings.first_segment_ms,
                    first_audio_ms=timings.first_audio_ms,
                    total_ms=timings.total_ms,
                    audio_duration_ms=timings.audio_duration_ms,
                    speech_end_audio_ms=timings.speech_end_audio_ms,
                    transcription_ms=timings.transcription_ms,
                    speech_end_to_first_audio_ms=timings.speech_end_to_first_audio_ms,
                ),
                history_unsaved=event.history_unsaved,
            )
        )
    if isinstance(event, SessionStarted):
        return pb.ConverseResponse(
            session_started=pb.SessionStarted(
                session_id=event.session_id,
                audio=pb.AudioFormat(
                    encoding=_ENCODING_TO_PROTO[event.audio.encoding],
                    sample_rate_hz=event.audio.sample_rate_hz,
                    bitrate_bps=event.audio.bitrate_bps,
                ),
                voice=event.voice,
                llm_engine=event.llm_engine,
                tts_engine=event.tts_engine,
            )
        )
    if isinstance(event, SpeechStarted):
        return pb.ConverseResponse(speech_started=pb.SpeechStarted(audio_start_ms=event.audio_start_ms))
    if isinstance(event, SpeechStopped):
        return pb.ConverseResponse(speech_stopped=pb.SpeechStopped(audio_end_ms=event.audio_end_ms))
    if isinstance(event, Transcript):
        return pb.ConverseResponse(
            transcript=pb.Transcript(turn_id=event.turn_id, text=event.text, is_final=event.is_final)
        )
    raise TypeError(f"no proto for {type(event).__name__}")
