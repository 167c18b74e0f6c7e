"""Errors a user can fix. The CLI prints them as one line, never a traceback, and exits with `exit_code`."""


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and what to do.

    Exit status 2: a configuration error; running the same command again will fail the same way."""

    exit_code = 2


class ServerProblem(UserError):
    """The server cannot be used right now (unreachable after the retries, a refusal or an answer that is not the
    protocol's); exit status 3: a later restart may succeed (docs/PROTOCOL.md section 8)."""

    exit_code = 3
