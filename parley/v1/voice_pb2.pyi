from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CaptionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTION_MODE_UNSPECIFIED: _ClassVar[CaptionMode]
    CAPTION_MODE_DELTAS: _ClassVar[CaptionMode]
    CAPTION_MODE_SEGMENTS: _ClassVar[CaptionMode]

class TurnDetectionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_DETECTION_MODE_UNSPECIFIED: _ClassVar[TurnDetectionMode]
    TURN_DETECTION_MODE_SERVER_VAD: _ClassVar[TurnDetectionMode]
    TURN_DETECTION_MODE_MANUAL: _ClassVar[TurnDetectionMode]

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM16: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_WAV: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_OGG_OPUS: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_MP3: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_MULAW: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_ALAW: _ClassVar[AudioEncoding]

class TurnEndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_END_REASON_UNSPECIFIED: _ClassVar[TurnEndReason]
    TURN_END_REASON_COMPLETED: _ClassVar[TurnEndReason]
    TURN_END_REASON_INTERRUPTED: _ClassVar[TurnEndReason]
    TURN_END_REASON_FAILED: _ClassVar[TurnEndReason]
CAPTION_MODE_UNSPECIFIED: CaptionMode
CAPTION_MODE_DELTAS: CaptionMode
CAPTION_MODE_SEGMENTS: CaptionMode
TURN_DETECTION_MODE_UNSPECIFIED: TurnDetectionMode
TURN_DETECTION_MODE_SERVER_VAD: TurnDetectionMode
TURN_DETECTION_MODE_MANUAL: TurnDetectionMode
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM16: AudioEncoding
AUDIO_ENCODING_WAV: AudioEncoding
AUDIO_ENCODING_OGG_OPUS: AudioEncoding
AUDIO_ENCODING_MP3: AudioEncoding
AUDIO_ENCODING_MULAW: AudioEncoding
AUDIO_ENCODING_ALAW: AudioEncoding
TURN_END_REASON_UNSPECIFIED: TurnEndReason
TURN_END_REASON_COMPLETED: TurnEndReason
TURN_END_REASON_INTERRUPTED: TurnEndReason
TURN_END_REASON_FAILED: TurnEndReason

class CreateClientTokenRequest(_message.Message):
    __slots__ = ("ttl_s", "subject", "voices", "session_id", "max_streams")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ttl_s: int
    subject: str
    voices: _containers.RepeatedScalarFieldContainer[str]
    session_id: str
    max_streams: int
    def __init__(self, ttl_s: _Optional[int] = ..., subject: _Optional[str] = ..., voices: _Optional[_Iterable[str]] = ..., session_id: _Optional[str] = ..., max_streams: _Optional[int] = ...) -> None: ...

class ClientToken(_message.Message):
    __slots__ = ("token", "expires_at", "principal")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    principal: str
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ..., principal: _Optional[str] = ...) -> None: ...

class ConverseRequest(_message.Message):
    __slots__ = ("start", "user_text", "speak_text", "interrupt", "user_audio", "commit_audio", "clear_audio")
    START_FIELD_NUMBER: _ClassVar[int]
    USER_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPEAK_TEXT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    USER_AUDIO_FIELD_NUMBER: _ClassVar[int]
    COMMIT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    CLEAR_AUDIO_FIELD_NUMBER: _ClassVar[int]
    start: Start
    user_text: UserText
    speak_text: SpeakText
    interrupt: Interrupt
    user_audio: UserAudio
    commit_audio: CommitAudio
    clear_audio: ClearAudio
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., user_text: _Optional[_Union[UserText, _Mapping]] = ..., speak_text: _Optional[_Union[SpeakText, _Mapping]] = ..., interrupt: _Optional[_Union[Interrupt, _Mapping]] = ..., user_audio: _Optional[_Union[UserAudio, _Mapping]] = ..., commit_audio: _Optional[_Union[CommitAudio, _Mapping]] = ..., clear_audio: _Optional[_Union[ClearAudio, _Mapping]] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("session_id", "system_prompt", "voice", "audio", "llm", "input_audio", "captions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    INPUT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    system_prompt: str
    voice: str
    audio: AudioFormat
    llm: LlmOptions
    input_audio: InputAudio
    captions: CaptionMode
    def __init__(self, session_id: _Optional[str] = ..., system_prompt: _Optional[str] = ..., voice: _Optional[str] = ..., audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., llm: _Optional[_Union[LlmOptions, _Mapping]] = ..., input_audio: _Optional[_Union[InputAudio, _Mapping]] = ..., captions: _Optional[_Union[CaptionMode, str]] = ...) -> None: ...

class InputAudio(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz", "language", "turn_detection")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TURN_DETECTION_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    language: str
    turn_detection: TurnDetection
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., language: _Optional[str] = ..., turn_detection: _Optional[_Union[TurnDetection, _Mapping]] = ...) -> None: ...

class TurnDetection(_message.Message):
    __slots__ = ("mode", "silence_ms", "prefix_padding_ms", "threshold", "min_speech_ms", "tentative_silence_ms")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_PADDING_MS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEECH_MS_FIELD_NUMBER: _ClassVar[int]
    TENTATIVE_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    mode: TurnDetectionMode
    silence_ms: int
    prefix_padding_ms: int
    threshold: float
    min_speech_ms: int
    tentative_silence_ms: int
    def __init__(self, mode: _Optional[_Union[TurnDetectionMode, str]] = ..., silence_ms: _Optional[int] = ..., prefix_padding_ms: _Optional[int] = ..., threshold: _Optional[float] = ..., min_speech_ms: _Optional[int] = ..., tentative_silence_ms: _Optional[int] = ...) -> None: ...

class UserAudio(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CommitAudio(_message.Message):
    __slots__ = ("turn_id",)
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    def __init__(self, turn_id: _Optional[str] = ...) -> None: ...

class ClearAudio(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz", "bitrate_bps")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    BITRATE_BPS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    bitrate_bps: int
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., bitrate_bps: _Optional[int] = ...) -> None: ...

class LlmOptions(_message.Message):
    __slots__ = ("temperature", "max_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    max_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class UserText(_message.Message):
    __slots__ = ("text", "turn_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    turn_id: str
    def __init__(self, text: _Optional[str] = ..., turn_id: _Optional[str] = ...) -> None: ...

class SpeakText(_message.Message):
    __slots__ = ("text", "flush", "turn_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    flush: bool
    turn_id: str
    def __init__(self, text: _Optional[str] = ..., flush: _Optional[bool] = ..., turn_id: _Optional[str] = ...) -> None: ...

class Interrupt(_message.Message):
    __slots__ = ("played_ms", "turn_id")
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    played_ms: int
    turn_id: str
    def __init__(self, played_ms: _Optional[int] = ..., turn_id: _Optional[str] = ...) -> None: ...

class ConverseResponse(_message.Message):
    __slots__ = ("session_started", "text_delta", "segment", "audio", "turn_ended", "speech_started", "speech_stopped", "transcript")
    SESSION_STARTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TURN_ENDED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STOPPED_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    session_started: SessionStarted
    text_delta: TextDelta
    segment: Segment
    audio: AudioChunk
    turn_ended: TurnEnded
    speech_started: SpeechStarted
    speech_stopped: SpeechStopped
    transcript: Transcript
    def __init__(self, session_started: _Optional[_Union[SessionStarted, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., turn_ended: _Optional[_Union[TurnEnded, _Mapping]] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_stopped: _Optional[_Union[SpeechStopped, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "audio", "voice", "llm_engine", "tts_engine")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    LLM_ENGINE_FIELD_NUMBER: _ClassVar[int]
    TTS_ENGINE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    audio: AudioFormat
    voice: str
    llm_engine: str
    tts_engine: str
    def __init__(self, session_id: _Optional[str] = ..., audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., voice: _Optional[str] = ..., llm_engine: _Optional[str] = ..., tts_engine: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("turn_id", "text")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    text: str
    def __init__(self, turn_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("turn_id", "index", "text", "start_ms", "spoken_text")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    SPOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    index: int
    text: str
    start_ms: int
    spoken_text: str
    def __init__(self, turn_id: _Optional[str] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., start_ms: _Optional[int] = ..., spoken_text: _Optional[str] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("turn_id", "segment_index", "sequence", "data", "duration_ms")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    segment_index: int
    sequence: int
    data: bytes
    duration_ms: float
    def __init__(self, turn_id: _Optional[str] = ..., segment_index: _Optional[int] = ..., sequence: _Optional[int] = ..., data: _Optional[bytes] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class TurnEnded(_message.Message):
    __slots__ = ("turn_id", "reason", "spoken_text", "timings", "error", "usage", "history_unsaved")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_UNSAVED_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    reason: TurnEndReason
    spoken_text: str
    timings: TurnTimings
    error: str
    usage: LlmUsage
    history_unsaved: bool
    def __init__(self, turn_id: _Optional[str] = ..., reason: _Optional[_Union[TurnEndReason, str]] = ..., spoken_text: _Optional[str] = ..., timings: _Optional[_Union[TurnTimings, _Mapping]] = ..., error: _Optional[str] = ..., usage: _Optional[_Union[LlmUsage, _Mapping]] = ..., history_unsaved: _Optional[bool] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("audio_start_ms",)
    AUDIO_START_MS_FIELD_NUMBER: _ClassVar[int]
    audio_start_ms: int
    def __init__(self, audio_start_ms: _Optional[int] = ...) -> None: ...

class SpeechStopped(_message.Message):
    __slots__ = ("audio_end_ms",)
    AUDIO_END_MS_FIELD_NUMBER: _ClassVar[int]
    audio_end_ms: int
    def __init__(self, audio_end_ms: _Optional[int] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("turn_id", "text", "is_final")
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    turn_id: str
    text: str
    is_final: bool
    def __init__(self, turn_id: _Optional[str] = ..., text: _Optional[str] = ..., is_final: _Optional[bool] = ...) -> None: ...

class LlmUsage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class TurnTimings(_message.Message):
    __slots__ = ("first_llm_token_ms", "first_segment_ms", "first_audio_ms", "total_ms", "audio_duration_ms", "speech_end_audio_ms", "transcription_ms", "speech_end_to_first_audio_ms")
    FIRST_LLM_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEGMENT_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_END_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPTION_MS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_END_TO_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    first_llm_token_ms: int
    first_segment_ms: int
    first_audio_ms: int
    total_ms: int
    audio_duration_ms: int
    speech_end_audio_ms: int
    transcription_ms: int
    speech_end_to_first_audio_ms: int
    def __init__(self, first_llm_token_ms: _Optional[int] = ..., first_segment_ms: _Optional[int] = ..., first_audio_ms: _Optional[int] = ..., total_ms: _Optional[int] = ..., audio_duration_ms: _Optional[int] = ..., speech_end_audio_ms: _Optional[int] = ..., transcription_ms: _Optional[int] = ..., speech_end_to_first_audio_ms: _Optional[int] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices", "default_voice")
    VOICES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VOICE_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    default_voice: str
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ..., default_voice: _Optional[str] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("id", "language", "sample_rate_hz", "engine")
    ID_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    id: str
    language: str
    sample_rate_hz: int
    engine: str
    def __init__(self, id: _Optional[str] = ..., language: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ..., engine: _Optional[str] = ...) -> None: ...
