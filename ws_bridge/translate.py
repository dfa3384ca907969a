"""Frames ↔ protobuf: the only place in the bridge where JSON and ``_pb2`` types meet.

Text frames carry ``ConverseRequest`` / ``ConverseResponse`` in the proto3 JSON mapping (camelCase
field names, int64 as strings, enums by name), so the .proto stays the only schema. Audio goes as a
binary frame::

    4 bytes   big-endian length N of the header
    N bytes   UTF-8 JSON: the ``AudioChunk`` without ``data`` (turnId, segmentIndex, sequence)
    the rest  the audio bytes (PCM16 or WAV, as the session's format says)

The bridge's own errors (not the service's messages) are text frames ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

from google.protobuf import json_format

from parley.v1 import voice_pb2 as pb

__all__ = ["BadFrame", "error_frame", "frame_from_response", "request_from_text", "to_json"]


class BadFrame(Exception):
    """A client frame the bridge cannot turn into a ``ConverseRequest``."""


def request_from_text(text: str) -> pb.ConverseRequest:
    """Parse a text frame. Raises :class:`BadFrame` for invalid JSON, unknown fields or wrong types."""
    if text.lstrip()[:1] != "{":  # ([1, 2] or null: protobuf's words for them were Python's)
        raise BadFrame('a message is a JSON object, such as {"userText": {"text": "Hello"}}')
    try:
        request = json_format.Parse(text, pb.ConverseRequest())
    except json_format.ParseError as error:
        raise BadFrame(f"not a ConverseRequest in proto3 JSON: {error}") from error
    if request.WhichOneof("kind") == "user_audio":
        _check_base64(text)
    return request


def _check_base64(text: str) -> None:
    """``userAudio.data`` is base64, standard or URL-safe, with or without padding, as proto3 JSON
    says; protobuf's parser skips any other character (``"!!!"`` became no audio at all). Raises
    :class:`BadFrame`. (Binary frames are the usual way to send the voice: this path is rare.)"""
    message = json.loads(text)  # (valid: it was just parsed)
    audio = message.get("userAudio", message.get("user_audio"))
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str):
        return
    url_safe = "-" in data or "_" in data
    if url_safe and ("+" in data or "/" in data):  # (decoding maps - and _ to + and /: it would pass)
        raise BadFrame("userAudio.data is not base64 (standard or URL-safe): it mixes the two alphabets")
    try:
        base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_" if url_safe else None, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadFrame(f"userAudio.data is not base64 (standard or URL-safe): {error}") from error


def to_json(message: Any) -> dict[str, Any]:
    """A message in the proto3 JSON mapping, with fields at their default value included."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def frame_from_response(response: pb.ConverseResponse) -> str | bytes:
    """The frame for one server message: binary for audio, JSON text for the rest."""
    if response.WhichOneof("kind") == "audio":
        audio = response.audio
        header = pb.AudioChunk()
        header.CopyFrom(audio)  # every field but the bytes, so that a field added to the .proto reaches browsers
        header.ClearField("data")
        fields = to_json(header)
        fields.pop("data", None)
        encoded = json.dumps(fields, separators=(",", ":")).encode()
        return struct.pack(">I", len(encoded)) + encoded + audio.data
    return json.dumps(to_json(response), separators=(",", ":"))


def error_frame(code: str, message: str, retry_after_s: int | None = None) -> str:
    """The bridge's own error frame (with ``retryAfterS`` when the service said when to try again)."""
    error: dict[str, object] = {"code": code, "message": message}
    if retry_after_s is not None:
        error["retryAfterS"] = retry_after_s
    return json.dumps({"error": error})
