"""Translation between the protobuf contract and the core's values. The only place (with the
servicer) where ``_pb2`` types meet the core."""

from __future__ import annotations

from parley.v1 import voice_pb2 as pb
from service.core.audio import Encoding
from service.core.engine import Voice
from service.core.events import AudioChunk, Event, SegmentStarted, SessionStarted, TextDelta, TurnEnded, TurnEndReason
from service.core.opening import StartRequest
from service.errors import InvalidRequest

__all__ = ["event_to_proto", "start_from_proto", "voice_to_proto"]

_ENCODINGS = {
    pb.AUDIO_ENCODING_UNSPECIFIED: Encoding.PCM16,
    pb.AUDIO_ENCODING_PCM16: Encoding.PCM16,
    pb.AUDIO_ENCODING_WAV: Encoding.WAV,
}
_ENCODING_TO_PROTO = {Encoding.PCM16: pb.AUDIO_ENCODING_PCM16, Encoding.WAV: pb.AUDIO_ENCODING_WAV}
_REASONS = {
    TurnEndReason.COMPLETED: pb.TURN_END_REASON_COMPLETED,
    TurnEndReason.INTERRUPTED: pb.TURN_END_REASON_INTERRUPTED,
    TurnEndReason.FAILED: pb.TURN_END_REASON_FAILED,
}


def start_from_proto(start: pb.Start) -> StartRequest:
    """The core's view of a ``start`` message. Raises :class:`InvalidRequest` for unknown enums."""
    if start.audio.encoding not in _ENCODINGS:
        raise InvalidRequest(f"unknown audio encoding {start.audio.encoding}; use PCM16 or WAV")
    return StartRequest(
        session_id=start.session_id,
        system_prompt=start.system_prompt,
        voice=start.voice,
        encoding=_ENCODINGS[start.audio.encoding],
        sample_rate_hz=start.audio.sample_rate_hz,
        temperature=start.llm.temperature if start.llm.HasField("temperature") else None,
        max_tokens=start.llm.max_tokens if start.llm.HasField("max_tokens") else None,
    )


def voice_to_proto(voice: Voice) -> pb.Voice:
    return pb.Voice(id=voice.id, language=voice.language, sample_rate_hz=voice.sample_rate_hz, engine=voice.engine)


def event_to_proto(event: Event) -> pb.ConverseResponse:
    """One server message for one core event."""
    if isinstance(event, AudioChunk):
        return pb.ConverseResponse(
            audio=pb.AudioChunk(
                turn_id=event.turn_id, segment_index=event.segment_index, sequence=event.sequence, data=event.data
            )
        )
    if isinstance(event, TextDelta):
        return pb.ConverseResponse(text_delta=pb.TextDelta(turn_id=event.turn_id, text=event.text))
    if isinstance(event, SegmentStarted):
        return pb.ConverseResponse(
            segment=pb.Segment(
                turn_id=event.turn_id,
                index=event.index,
                text=event.text,
                start_ms=event.start_ms,
                spoken_text=event.spoken_text,
            )
        )
    if isinstance(event, TurnEnded):
        stats = event.stats
        return pb.ConverseResponse(
            turn_ended=pb.TurnEnded(
                turn_id=event.turn_id,
                reason=_REASONS[event.reason],
                spoken_text=event.spoken_text,
                error=event.error,
                usage=(
                    pb.LlmUsage(
                        prompt_tokens=stats.usage.prompt_tokens, completion_tokens=stats.usage.completion_tokens
                    )
                    if stats.usage is not None
                    else None
                ),
                timings=pb.TurnTimings(
                    first_llm_token_ms=stats.since_start_ms(stats.first_llm_token),
                    first_segment_ms=stats.since_start_ms(stats.first_segment),
                    first_audio_ms=stats.since_start_ms(stats.first_audio),
                    total_ms=stats.since_start_ms(stats.ended),
                    audio_duration_ms=round(stats.audio_ms_sent),
                ),
            )
        )
    if isinstance(event, SessionStarted):
        return pb.ConverseResponse(
            session_started=pb.SessionStarted(
                session_id=event.session_id,
                audio=pb.AudioFormat(
                    encoding=_ENCODING_TO_PROTO[event.audio.encoding], sample_rate_hz=event.audio.sample_rate_hz
                ),
                voice=event.voice,
                llm_engine=event.llm_engine,
                tts_engine=event.tts_engine,
            )
        )
    raise TypeError(f"no proto for {type(event).__name__}")
