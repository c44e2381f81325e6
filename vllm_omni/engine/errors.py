"""What can go wrong with a request, as kinds of error the engine and workers raise.

They travel inside outputs across processes (each pickles as its class and arguments). Only
``entrypoints/openai`` turns them into HTTP statuses; the offline API raises them as they are:
the client mistakes are ``ValueError``s, the server's failures ``RuntimeError``s.
"""

from __future__ import annotations


class OmniError(Exception):
    """``param``: the request field at fault; ``code``: a machine-readable reason."""

    code_default: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code_default

    def __reduce__(self):
        return type(self), (self.message, self.param, self.code)


class InvalidRequestError(OmniError, ValueError):
    """The request cannot be served as asked."""

    code_default = "invalid_value"


class RequestTooLargeError(InvalidRequestError):
    """The request would not fit in the memory there is; a smaller one would."""

    code_default = "insufficient_memory"


class RequestCancelledError(OmniError, RuntimeError):
    """Its client went away (or the caller aborted it)."""

    code_default = "cancelled"


class RequestTimedOutError(RequestCancelledError):
    """Its deadline passed and it was stopped."""

    code_default = "timeout"


class GenerationError(OmniError, RuntimeError):
    """The model failed on this request (e.g. non-finite numbers); the workers serve on."""


class WorkerDiedError(GenerationError):
    """A worker exited or stopped answering while the request ran; the workers restart."""


class EngineDeadError(OmniError, RuntimeError):
    """The engine cannot serve: its process died, or its workers could not be restarted."""


def cancelled(reason: str, when: str) -> RequestCancelledError:
    """The error of a request stopped because its client left ("cancelled") or its deadline
    passed ("timeout"); ``when`` says how far it got."""
    if reason == "timeout":
        return RequestTimedOutError(f"timed out {when}")
    return RequestCancelledError(f"cancelled {when}")
