"""Errors a user can fix. The CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and what to do."""
