"""The HTTP layer's errors: ApiError (a 4xx JSON answer) and the one map of the run's domain errors to status codes."""

from __future__ import annotations

from hetlora.engine.errors import CannotTrain, Conflict, DomainError, Invalid, NotFound, NotSelected, Unauthenticated

STATUS = {DomainError: 400, Invalid: 400, Unauthenticated: 401, NotSelected: 403, NotFound: 404, Conflict: 409,
          CannotTrain: 422}


class ApiError(Exception):
    """`{"error": {"code": code, "message": message, **extra}}` with HTTP `status` (and response `headers`)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def api_error(exc: DomainError) -> ApiError:
    """The HTTP answer of a domain error: its kind's status code, its code, message and extra fields."""
    status = next(STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS)
    return ApiError(status, exc.code, exc.message, **exc.extra)
