"""What the run refuses, without any transport: a stable `code`, a one-line `message` and JSON-ready `extra`.

The subclass says what kind of refusal it is; each transport maps the kinds once (HTTP: the status codes in
server_stub.errors; Flower: a node or an update left out with the message logged).
"""

from __future__ import annotations


class DomainError(Exception):
    """A refusal with a machine-readable `code` (docs/PROTOCOL.md) and a message for the person who can fix it."""

    def __init__(self, code: str, message: str, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class Invalid(DomainError):
    """The input is malformed or fails a check (an upload, a profile, a request field)."""


class Unauthenticated(DomainError):
    """No credentials, or credentials the run does not know."""


class NotSelected(DomainError):
    """The client is known but takes no part in this round."""


class NotFound(DomainError):
    """The thing asked for does not exist (yet)."""


class Conflict(DomainError):
    """The request does not fit the run's state now (a closed round, a second different upload, a taken name)."""


class CannotTrain(DomainError):
    """The tier policy rules the device out of training now (`extra["reasons"]` says why)."""
