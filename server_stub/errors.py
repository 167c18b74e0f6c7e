"""The error every server operation raises for a client mistake; the HTTP layer sends it as 4xx JSON."""

from __future__ import annotations


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
