"""HTTP calls of the v1 protocol (docs/PROTOCOL.md), with retries on network errors and 5xx.

Network failures and 5xx answers are retried with exponential backoff (1 s, 2 s, 4 s ... capped
at `max_backoff`) and a log line per retry, 429 answers after their Retry-After: urllib3's Retry with
the policy of edge_client.retry, mounted on the requests session. Other 4xx answers
raise `ServerError` with the server's error code at once, because repeating a rejected request
cannot help. An https:// server is verified
against `ca_file` or, by default, the CA bundle of requests; a certificate that does not verify is a
configuration error (UserError), not retried. So is a scheme the server does not speak (http:// to an HTTPS
server or the reverse), found by a TLS handshake probe when the first attempt fails.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError

from edge_client.answers import (PROFILE_FIELDS, REGISTER_FIELDS, ROUND_FIELDS, BadServerAnswer, check_run,
                                 json_object, require)
from edge_client.retry import ClientRetry, ServerUnreachable
from hetlora.errors import ServerProblem, UserError

__all__ = ["ServerAPI", "ServerError", "ServerUnreachable", "scheme_mismatch"]
# Refusals only the device's configuration can fix (exit status 2; every other refusal exits 3): enrollment, a
# malformed registration, a name already registered, a token the server does not know (its state was reset; the
# client registers again by itself when the new run is one it can serve: EdgeClient._register_again).
CONFIG_CODES = ("enrollment_required", "bad_enroll_secret", "name_not_allowed", "name_taken", "bad_rank",
                "bad_request", "bad_token", "missing_token")

HINTS = {"bad_token": " (the server no longer knows this client: move --state-dir away to register again)",
         "name_taken": " (another device registered this --name; pick another name or resume its --state-dir)"}


class ServerError(ServerProblem):
    """The server rejected a request (4xx); `code` is the protocol's error code."""

    def __init__(self, status: int, code: str, message: str, body: dict):
        hint = HINTS.get(code, "")
        super().__init__(f"server said {status} {code}: {message}{hint}")
        self.status, self.code, self.body = status, code, body
        self.exit_code = 2 if code in CONFIG_CODES else ServerProblem.exit_code


def speaks_tls(url: str, timeout: float = 5.0) -> bool:
    """Whether the server behind `url` completes a TLS handshake (its certificate unchecked: this is a probe)."""
    parts = urlsplit(url)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout) as sock, context.wrap_socket(sock, server_hostname=parts.hostname):
            return True
    except (OSError, ValueError):
        return False


def scheme_mismatch(url: str, exc: Exception) -> UserError | None:
    """A one-line UserError when `url`'s scheme is not what the server speaks (the cause of `exc`: a TLS error of an
    https:// URL, a connection the server dropped for an http:// one), else None."""
    scheme, other = ("https", "http") if url.startswith("https://") else ("http", "https")
    if (scheme == "https" and isinstance(exc, requests.exceptions.SSLError) and not speaks_tls(url)) or \
            (scheme == "http" and isinstance(exc, ProtocolError) and speaks_tls(url)):
        return UserError(f"the server at {url} speaks {other.upper()}, not {scheme.upper()}: use --server "
                         f"{other}://{url.split('://', 1)[1]}")
    return None


class ServerAPI:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, max_backoff: float = 60.0,
                 give_up_after: float | None = None, ca_file: str | None = None):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=ClientRetry(backoff_max=max_backoff, give_up_after=give_up_after,
                                                      on_first_error=self._first_error, server=self.url))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.verify = ca_file or True  # per request: a session setting loses to REQUESTS_CA_BUNDLE

    def _first_error(self, exc: Exception) -> None:
        """The first network error of a request: a scheme the server does not speak stops the retries."""
        mismatch = scheme_mismatch(self.url, exc)
        if mismatch is not None:
            raise mismatch

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One call, retried as edge_client.retry says; a 4xx answer raises ServerError."""
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self.session.request(method, self.url + path, headers=headers, timeout=self.timeout,
                                            verify=self.verify, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise scheme_mismatch(self.url, exc) or UserError(
                f"TLS with {self.url} failed: {exc}; if the server's certificate is signed by your own CA, pass its "
                "certificate with --ca-file") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL) as exc:
            raise UserError(f"--server {self.url} is not a usable URL ({exc}); write it as http(s)://HOST:PORT") \
                from None
        except requests.RequestException as exc:  # what the retries do not cover (e.g. too many redirects)
            raise ServerProblem(f"{method} {self.url}{path} failed: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            error = body.get("error") if isinstance(body, dict) else None
            error = error if isinstance(error, dict) else {}
            raise ServerError(response.status_code, str(error.get("code", "http_error")),
                              str(error.get("message", " ".join(response.text[:200].split()))),
                              body if isinstance(body, dict) else {})
        return response

    def register(self, profile: dict, requested_rank: int, n_samples: int, name: str | None = None,
                 enroll_secret: str | None = None) -> dict:
        body = {"profile": profile, "requested_rank": requested_rank, "n_samples": n_samples}
        if name:
            body["name"] = name
        if enroll_secret:
            body["enroll_secret"] = enroll_secret
        reply = require(json_object(self._request("POST", "/v1/register", json=body), "register"), REGISTER_FIELDS,
                        "register")
        check_run(reply["run"])
        return reply

    def run(self) -> dict:
        return check_run(json_object(self._request("GET", "/v1/run"), "run config"))

    def current_round(self) -> dict:
        return require(json_object(self._request("GET", "/v1/round"), "round"), ROUND_FIELDS, "round")

    def report_profile(self, profile: dict, requested_rank: int | None = None) -> dict:
        body = {"profile": profile}
        if requested_rank is not None:
            body["requested_rank"] = requested_rank
        return require(json_object(self._request("POST", "/v1/profile", json=body), "profile"), PROFILE_FIELDS,
                       "profile")

    def download_adapter(self, round_number: int, max_bytes: int | None = None) -> bytes:
        """The round's adapter; BadServerAnswer as soon as more than `max_bytes` arrive (decompressed)."""
        return self._body(self._request("GET", f"/v1/rounds/{round_number}/adapter", stream=True), max_bytes,
                          f"the round {round_number} adapter")

    @staticmethod
    def _body(response: requests.Response, max_bytes: int | None, what: str) -> bytes:
        """A streamed response's body, counted while it arrives (after any content decoding)."""
        if max_bytes is None:
            return response.content
        chunks, size = [], 0
        try:
            for chunk in response.iter_content(chunk_size=64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise BadServerAnswer(f"{what} is larger than the largest valid adapter of this run ({max_bytes} "
                                          "bytes); download stopped")
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise ServerProblem(f"{what}: the download failed: {exc}") from None
        finally:
            response.close()
        return b"".join(chunks)

    def upload_update(self, round_number: int, data: bytes) -> dict:
        return json_object(self._request("POST", f"/v1/rounds/{round_number}/update", data=data,
                                         headers={"Content-Type": "application/octet-stream"}), "upload")

    def global_adapter(self, version: int | None = None) -> bytes:
        params = {"version": version} if version is not None else None
        return self._request("GET", "/v1/global", params=params).content

    def status(self) -> dict:
        return json_object(self._request("GET", "/v1/status"), "status")
