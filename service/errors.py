"""Parley's exceptions.

Every error the service raises on purpose derives from :class:`ParleyError`::

    ParleyError
    ├── InvalidRequest        the client sent something it must fix (gRPC INVALID_ARGUMENT)
    ├── SessionNotFound       resuming a session that does not exist or expired (NOT_FOUND)
    ├── SessionTakenOver      another stream resumed this stream's session (ABORTED)
    ├── Overloaded            the server holds its maximum of streams or sessions (RESOURCE_EXHAUSTED)
    ├── StoreUnavailable      the session store cannot be reached (UNAVAILABLE)
    ├── SessionLost           the store no longer has this stream's session, e.g. it restarted empty (UNAVAILABLE)
    ├── IdleTimeout           the stream sat idle for too long (DEADLINE_EXCEEDED)
    ├── ClientNotReading      the client stopped reading while replies waited (DEADLINE_EXCEEDED)
    ├── ClientGone            the call ended under the stream: the client cancelled or went away (CANCELLED)
    ├── ShuttingDown          the server is shutting down; resume the session elsewhere (UNAVAILABLE)
    └── EngineError           an engine failed; ``retryable`` says if trying again may help
        ├── LLMError
        ├── TTSError
        ├── STTError          speech to text
        └── VADError          voice activity detection

Engines turn their vendor's errors into :class:`EngineError` subclasses at their edge, so the rest
of the service never sees a vendor exception. An engine failure ends the turn FAILED; the session
stays usable.
"""

from __future__ import annotations


class ParleyError(Exception):
    """Root of Parley's exceptions."""


class InvalidRequest(ParleyError):
    """The client sent something it must fix. The message says what."""


class NotAllowed(ParleyError):
    """The caller's client token does not allow what it asked (a voice, a session)."""


class SessionNotFound(ParleyError):
    """``start.session_id`` names no live session."""


class SessionTakenOver(ParleyError):
    """Another stream resumed this stream's session; this one ends so turns never interleave."""


class StoreUnavailable(ParleyError):
    """The session store cannot be reached."""


class SessionLost(ParleyError):
    """The store lost a session a stream holds (for example Redis restarted without its data)."""


class Overloaded(ParleyError):
    """The server cannot take more work right now."""


class IdleTimeout(ParleyError):
    """No client message (and no turn) for longer than the idle limit."""


class ClientNotReading(ParleyError):
    """The client read nothing for too long while messages waited to be sent."""


class ClientGone(ParleyError):
    """The call ended under the stream (the client cancelled, its connection dropped, the server
    stopped): a normal ending, not a failure to report."""


class ShuttingDown(ParleyError):
    """The server is shutting down: the stream ended after its turn in progress."""


class EngineError(ParleyError):
    """An engine failed.

    ``retryable`` is true when the same request may succeed later (a timeout, an overloaded
    provider), false when it cannot (a bad model file, a rejected request).
    ``retry_after_s`` is the wait the provider asked for, when it named one.
    ``for_logs`` is the message without what the provider said in its own words (an error body may
    quote the request, the user's text with it): what logs and traces get; the client gets the whole.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
        for_logs: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        """How long the provider asked us to wait before trying again (its Retry-After), if it said."""
        self.for_logs = message if for_logs is None else for_logs
        """The message without the provider's own words: for logs and traces, which never hold user text."""


class LLMError(EngineError):
    """The LLM engine failed."""


class TTSError(EngineError):
    """The TTS engine failed."""


class STTError(EngineError):
    """The speech-to-text engine failed."""


class VADError(EngineError):
    """The voice activity detector failed."""
