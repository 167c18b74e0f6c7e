"""Enrollment (server_stub/enrollment.py): secret, name allowlist, per-address rate limit, the open-server warning."""

from __future__ import annotations

import argparse
import logging

import httpx
import pytest

from edge_client.server_api import ServerAPI, ServerUnreachable
from server_stub.enrollment import Enrollment
from server_stub.errors import ApiError
from tests.helpers.server import error_code, make_config, snapshot

BODY = {"profile": {}, "requested_rank": 4, "n_samples": 1}


def test_registration_needs_the_secret_and_an_allowed_name_and_is_rate_limited(spec, tmp_path):
    from server_stub.background import serve_in_background

    state = tmp_path / "state"
    gate = Enrollment(secret="s3cret-42", allowed_names=frozenset({"pi-kitchen"}), per_minute=5, exempt_loopback=False)
    with serve_in_background(make_config(spec), state, enrollment=gate) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            before = snapshot(http, state)
            refused = [
                (BODY | {"name": "pi-kitchen"}, 401, "enrollment_required"),
                (BODY | {"name": "pi-kitchen", "enroll_secret": "guess"}, 403, "bad_enroll_secret"),
                (BODY | {"name": "intruder", "enroll_secret": "s3cret-42"}, 403, "name_not_allowed"),
                (BODY | {"enroll_secret": "s3cret-42"}, 403, "name_not_allowed"),
            ]
            for body, status, code in refused:
                reply = http.post("/v1/register", json=body)
                assert (reply.status_code, error_code(reply)) == (status, code), body
            assert snapshot(http, state) == before
            reply = ServerAPI(url).register({}, 4, 1, name="pi-kitchen", enroll_secret="s3cret-42")  # the client's call
            assert reply["client_id"] and reply["token"]
            limited = http.post("/v1/register", json=BODY | {"name": "pi-kitchen", "enroll_secret": "s3cret-42"})
            assert (limited.status_code, error_code(limited)) == (429, "rate_limited")
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            with pytest.raises(ServerUnreachable, match="rate limited"):  # the client waits Retry-After, here too long
                ServerAPI(url, give_up_after=0.5).register({}, 4, 1, name="pi-kitchen", enroll_secret="s3cret-42")
            assert http.get("/v1/status").status_code == 401  # the read routes need a token with enrollment on
            token = {"Authorization": f"Bearer {reply['token']}"}
            assert len(http.get("/v1/status", headers=token).json()["clients"]) == 1


def test_rate_limit_window_slides_and_is_per_address():
    now = [0.0]
    gate = Enrollment(per_minute=2, exempt_loopback=False, clock=lambda: now[0])
    gate.check("10.0.0.1", None, None)
    gate.check("10.0.0.1", None, None)
    gate.check("10.0.0.2", None, None)  # another address has its own budget
    with pytest.raises(ApiError) as limited:
        gate.check("10.0.0.1", None, None)
    assert (limited.value.status, limited.value.headers) == (429, {"Retry-After": "60"})
    now[0] = 30.0
    with pytest.raises(ApiError):
        gate.check("10.0.0.1", None, None)
    now[0] = 60.5  # the first two attempts left the window
    gate.check("10.0.0.1", None, None)
    for _ in range(10):  # loopback is exempt by default (demo, tests)
        Enrollment(per_minute=1).check("127.0.0.1", None, None)


@pytest.mark.parametrize("host, secret, warned", [("0.0.0.0", None, True), ("192.168.1.20", None, True),
                                                  ("127.0.0.1", None, False), ("::1", None, False),
                                                  ("0.0.0.0", "file", False)])
def test_open_server_beyond_loopback_warns_loudly(tmp_path, caplog, host, secret, warned):
    from server_stub.cli import build_enrollment

    secret_file = tmp_path / "secret"
    secret_file.write_text("  s3cret\n")
    args = argparse.Namespace(host=host, enroll_secret=None, allow_names=None, register_rate=30,
                              enroll_secret_file=str(secret_file) if secret else None)
    with caplog.at_level(logging.WARNING, logger="hetlora.server"):
        gate = build_enrollment(args)
    assert ("OPEN REGISTRATION" in caplog.text) is warned
    assert gate.secret == ("s3cret" if secret else None)


def test_client_waits_out_a_rate_limit_and_registers(spec, tmp_path, caplog):
    """The rate limit's clock runs 61x fast, so the client's one wait (Retry-After capped at max_backoff = 1 s)
    outlasts the 60 s window."""
    import time

    from server_stub.background import serve_in_background

    gate = Enrollment(per_minute=1, exempt_loopback=False, clock=lambda: time.monotonic() * 61)
    with serve_in_background(make_config(spec), tmp_path / "state", enrollment=gate) as url:
        api = ServerAPI(url, max_backoff=1.0)
        first = api.register({}, 4, 1)
        with caplog.at_level(logging.WARNING, logger="hetlora.client"):
            second = api.register({}, 4, 1)
        assert first["client_id"] != second["client_id"]
        assert "rate limited" in caplog.text
