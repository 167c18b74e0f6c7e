"""Who may register: an enrollment secret and/or a name allowlist, and a per-address registration rate limit.

`POST /v1/register` checks, in this order (docs/PROTOCOL.md section 2):
  rate limit  at most `per_minute` registration attempts per client address in any 60 s window
              (loopback addresses exempt unless `exempt_loopback` is off) -> 429 `rate_limited`, Retry-After
  secret      `enroll_secret` in the body equals the server's (constant-time compare)
              -> 401 `enrollment_required` when absent, 403 `bad_enroll_secret` when wrong
  allowlist   `name` is one of the allowed names -> 403 `name_not_allowed`
An open server (neither secret nor allowlist) on a non-loopback address is logged loudly at start-up.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from hetlora.errors import UserError
from server_stub.errors import ApiError

WINDOW_SECONDS = 60.0


def is_loopback(host: str | None) -> bool:
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Enrollment:
    secret: str | None = None
    allowed_names: frozenset[str] | None = None
    per_minute: int = 30
    exempt_loopback: bool = True
    clock: object = time.monotonic
    _attempts: dict[str, deque] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def open(self) -> bool:
        return self.secret is None and self.allowed_names is None

    def check(self, address: str | None, name: str | None, secret: str | None) -> None:
        """Raise the ApiError of the module docstring, or return when this registration may go ahead."""
        self._rate_limit(address or "unknown")
        if self.secret is not None:
            if not secret:
                raise ApiError(401, "enrollment_required", "this server requires an enrollment secret: send "
                               "\"enroll_secret\" with the registration (hetlora client --enroll-secret-file)")
            if not hmac.compare_digest(secret.encode(), self.secret.encode()):
                raise ApiError(403, "bad_enroll_secret", "wrong enrollment secret")
        if self.allowed_names is not None and name not in self.allowed_names:
            raise ApiError(403, "name_not_allowed", f"the name {name!r} is not on this server's allowlist; "
                           "register with an allowed --name")

    def _rate_limit(self, address: str) -> None:
        if self.per_minute <= 0 or (self.exempt_loopback and is_loopback(address)):
            return
        now = self.clock()
        with self._lock:
            for key in [k for k, q in self._attempts.items() if q[-1] <= now - WINDOW_SECONDS]:
                del self._attempts[key]
            recent = self._attempts.setdefault(address, deque())
            while recent and recent[0] <= now - WINDOW_SECONDS:
                recent.popleft()
            if len(recent) >= self.per_minute:
                retry = max(1, math.ceil(recent[0] + WINDOW_SECONDS - now))
                raise ApiError(429, "rate_limited", f"more than {self.per_minute} registrations from {address} in "
                               f"{WINDOW_SECONDS:g} s; retry in {retry} s", headers={"Retry-After": str(retry)},
                               retry_after=retry)
            recent.append(now)


def read_names(path: str) -> frozenset[str]:
    """Allowed client names, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read the allowlist {path}: {exc.strerror}") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
