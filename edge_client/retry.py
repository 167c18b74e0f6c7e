"""The client's retry policy as urllib3's `Retry` (mounted on a requests session by edge_client.server_api).

What is retried: every network error and every 5xx answer, for every method (uploads too: the server
deduplicates them), and 429 answers that carry Retry-After; nothing else (a 4xx answer is returned at once,
and a TLS error is raised at once: it is a configuration problem, not a passing one). When: after 1 s, 2 s,
4 s ... capped at `backoff_max`; after a 429, its Retry-After (at most `backoff_max`, at least the backoff).
Each retry logs one warning line. `give_up_after` seconds after the first failure, the next wait that would
pass it raises ServerUnreachable (exit status 3) instead; None retries forever. `on_first_error` sees the first
network error of a request and may raise (the client's scheme probe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from urllib3.exceptions import InvalidHeader, SSLError
from urllib3.util.retry import Retry

from hetlora.errors import ServerProblem

log = logging.getLogger("hetlora.client")


class ServerUnreachable(ServerProblem):
    """Retries ran out (only when a retry limit was set)."""


class ClientRetry(Retry):
    """urllib3's Retry with the client's policy (module docstring)."""

    def __init__(self, *, give_up_after: float | None = None, on_first_error: Callable[[Exception], None] | None = None,
                 started: float | None = None, backoff_max: float = 60.0, server: str = "", **kwargs):
        kwargs = {"total": None, "allowed_methods": None, "raise_on_status": False, "backoff_factor": 1.0,
                  "retry_after_max": int(backoff_max)} | kwargs
        super().__init__(backoff_max=backoff_max, **kwargs)
        self.give_up_after, self.on_first_error, self.started, self.server = give_up_after, on_first_error, started, \
            server

    def new(self, **kw) -> "ClientRetry":
        new = super().new(**kw)
        new.give_up_after, new.on_first_error, new.started, new.server = self.give_up_after, self.on_first_error, \
            self.started, self.server
        return new

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return status_code >= 500 or (status_code == 429 and has_retry_after)

    def get_backoff_time(self) -> float:
        """1 s after the first failure, then doubling, capped at backoff_max."""
        n = len(self.history)
        return 0.0 if n == 0 else float(min(self.backoff_max, self.backoff_factor * 2 ** (n - 1)))

    def get_retry_after(self, response) -> float | None:
        """A 429's Retry-After (at most backoff_max), never below the backoff; None without a usable header."""
        try:
            seconds = super().get_retry_after(response)
        except InvalidHeader:
            return None
        return None if seconds is None else max(seconds, self.get_backoff_time())

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if isinstance(error, SSLError):
            raise error  # requests reports it as its SSLError: server_api says what to fix
        if error is not None and not self.history and self.on_first_error is not None:
            self.on_first_error(error)
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        new.started = self.started if self.history else time.monotonic()
        attempt, delay = len(new.history), new.get_backoff_time()
        if response is not None and response.status == 429:
            problem, delay = "rate limited", new.get_retry_after(response) or delay
        elif response is not None:
            problem = f"server error {response.status}"
        else:
            problem = f"{type(error).__name__}: {error}"
        if self.give_up_after is not None and time.monotonic() - new.started + delay > self.give_up_after:
            raise ServerUnreachable(f"{method} {self.server}{url} failed {attempt} times ({problem}); giving up")
        log.warning("%s %s failed (%s); retry %d in %.0f s", method, url, problem, attempt, delay)
        return new
