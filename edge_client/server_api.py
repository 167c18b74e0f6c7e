"""HTTP calls of the v1 protocol (docs/PROTOCOL.md), with retries on network errors and 5xx.

Network failures and 5xx answers are retried with exponential backoff (1 s, 2 s, 4 s ... capped
at `max_backoff`) and a log line per retry; 4xx answers raise `ServerError` with the server's
error code at once, because repeating a rejected request cannot help.
"""

from __future__ import annotations

import logging
import time

import requests

from hetlora.errors import UserError

log = logging.getLogger("hetlora.client")


class ServerError(UserError):
    """The server rejected a request (4xx); `code` is the protocol's error code."""

    def __init__(self, status: int, code: str, message: str, body: dict):
        super().__init__(f"server said {status} {code}: {message}")
        self.status, self.code, self.body = status, code, body


class ServerUnreachable(UserError):
    """Retries ran out (only when a retry limit was set)."""


class ServerAPI:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, max_backoff: float = 60.0,
                 give_up_after: float | None = None):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.session = requests.Session()

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        delay, started, attempt = 1.0, time.monotonic(), 0
        while True:
            attempt += 1
            try:
                response = self.session.request(method, self.url + path, headers=headers, timeout=self.timeout, **kwargs)
                if response.status_code < 500:
                    break
                problem = f"server error {response.status_code}"
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if self.give_up_after is not None and time.monotonic() - started + delay > self.give_up_after:
                raise ServerUnreachable(f"{method} {self.url}{path} failed {attempt} times ({problem}); giving up")
            log.warning("%s %s failed (%s); retry %d in %.0f s", method, path, problem, attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        if response.status_code >= 400:
            try:
                body = response.json()
                error = body.get("error", {})
            except ValueError:
                body, error = {}, {}
            raise ServerError(response.status_code, error.get("code", "http_error"),
                              error.get("message", response.text[:200]), body)
        return response

    def register(self, profile: dict, requested_rank: int, n_samples: int, name: str | None = None,
                 enroll_secret: str | None = None) -> dict:
        body = {"profile": profile, "requested_rank": requested_rank, "n_samples": n_samples}
        if name:
            body["name"] = name
        if enroll_secret:
            body["enroll_secret"] = enroll_secret
        return self._request("POST", "/v1/register", json=body).json()

    def run(self) -> dict:
        return self._request("GET", "/v1/run").json()

    def current_round(self) -> dict:
        return self._request("GET", "/v1/round").json()

    def report_profile(self, profile: dict, requested_rank: int | None = None) -> dict:
        body = {"profile": profile}
        if requested_rank is not None:
            body["requested_rank"] = requested_rank
        return self._request("POST", "/v1/profile", json=body).json()

    def download_adapter(self, round_number: int) -> bytes:
        return self._request("GET", f"/v1/rounds/{round_number}/adapter").content

    def upload_update(self, round_number: int, data: bytes) -> dict:
        return self._request("POST", f"/v1/rounds/{round_number}/update", data=data,
                             headers={"Content-Type": "application/octet-stream"}).json()

    def global_adapter(self, version: int | None = None) -> bytes:
        params = {"version": version} if version is not None else None
        return self._request("GET", "/v1/global", params=params).content

    def status(self) -> dict:
        return self._request("GET", "/v1/status").json()
