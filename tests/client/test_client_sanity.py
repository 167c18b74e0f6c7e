"""Issue 26, the client against a bad server: a plan outside sane bounds, a global beyond the upload bound, a
gzip-bombed download, a 413 on upload, a 400 then the waiting message, a forgotten token. One error line and an
exit status by who is at fault (docs/PROTOCOL.md section 8), never a traceback, a wedge or a re-send loop."""

from __future__ import annotations

import gzip
import math
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from edge_client.answers import BadServerAnswer
from edge_client.server_api import ServerAPI
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import MAX_STEPS, TrainingSettings
from hetlora.protocol.wire import MAX_ABS_VALUE, encode
from tests.helpers.fake_server import fake_server, open_round_routes, run_client
from tests.helpers.server import make_config, make_update, register, running_server, upload_meta

SANE = TrainingSettings(steps=1, batch_size=2, seq_len=8)


@pytest.mark.parametrize("change, says", [
    ({"lr": math.nan}, "lr = nan must be finite and above 0"),
    ({"lr": 0.0}, "lr = 0.0 must be finite and above 0"),
    ({"steps": 10**9}, f"steps = 1000000000 is outside 1..{MAX_STEPS}"),
    ({"batch_size": 0}, "batch_size = 0 is outside 1..65536"),
])
def test_a_plan_outside_sane_bounds_is_one_line_and_exit_3(capsys, tmp_path, spec, run_config, tiny_bert_dir,
                                                           change, says):
    plan = ClientPlan(round=1, rank=2, mode="plain", training=replace(SANE, **change)).to_json()
    update = make_update(spec, 2, {"round": 1}, seed=0)
    with fake_server(open_round_routes(run_config, encode(update), plan=plan)) as (url, seen):
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
    assert code == 3, line
    assert line == f"hetlora client: error: round 1: the server's plan is outside sane bounds: {says}"
    assert ("GET", "/v1/rounds/1/adapter") not in seen


def test_a_global_beyond_the_upload_bound_is_refused_before_training(capsys, tmp_path, spec, run_config,
                                                                      tiny_bert_dir):
    huge = make_update(spec, 2, {"round": 1}, seed=0)
    name = next(iter(huge.lora))
    huge.lora[name] = (huge.lora[name][0], np.full_like(huge.lora[name][1], 10 * MAX_ABS_VALUE))  # finite, huge
    with fake_server(open_round_routes(run_config, encode(huge))) as (url, seen):
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
    assert code == 3 and "the server's adapter does not fit this run" in line and "above the limit" in line
    assert not [s for s in seen if s[0] == "POST" and s[1].endswith("/update")]  # nothing trained, nothing sent


def test_a_gzip_bombed_download_stops_at_the_cap_while_streaming():
    bomb = gzip.compress(b"\0" * 200_000_000, compresslevel=9)  # 200 MB of zeros in about 200 KB
    route = (200, "application/octet-stream", bomb, {"Content-Encoding": "gzip"})
    with fake_server({("GET", "/v1/rounds/1/adapter"): route}) as (url, _):
        tracemalloc.start()
        try:
            with pytest.raises(BadServerAnswer, match="larger than the largest valid adapter"):
                ServerAPI(url).download_adapter(1, max_bytes=1_000_000)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(bomb) < 1_000_000 and peak < 20_000_000  # counted decompressed, stopped before 200 MB piled up


def _client_with_pending(http, spec, tmp_path, me):
    from edge_client.client import ClientOptions, EdgeClient
    from edge_client.client_state import ClientState, StateDir

    url = str(http.base_url).rstrip("/")
    state = StateDir(tmp_path / "client")
    state.save(ClientState(server=url, client_id=me["client_id"], token=me["token"], rank=2, run=me["run"]))
    body = encode(make_update(spec, 2, upload_meta(me, 1, 2, 10), seed=0))
    state.save_pending(body)
    return EdgeClient(ClientOptions(server=url, data="unused", state_dir=str(state.path)), lambda: {}), state, body


def test_an_upload_refused_as_too_large_is_moved_aside_and_the_client_says_so(spec, tmp_path):
    """A 413 used to exit 3 and re-send the same update on every restart; after a 400 it still said
    "update uploaded"."""
    with running_server(make_config(spec, min_clients=2, max_upload_mb=0.001), tmp_path / "server") as http:
        me, _ = register(http, 2), register(http, 4)
        client, state, body = _client_with_pending(http, spec, tmp_path, me)
        plan = ClientPlan(round=1, rank=2, mode="hetlora", training=TrainingSettings())
        assert client._round({"round": 1, "plan": plan.to_json()}) is False
        assert (state.path / "rejected" / "round-0001-too_large.safetensors").read_bytes() == body
        assert state.pending(1) is None and state.load(client.options.server).last_uploaded_round == 1
        waiting = client._why_waiting({"round": 1, "state": "open", "selected": True})
        assert waiting == "the server refused this round's update; waiting for the next round"
        assert http.get("/v1/status").json()["round"]["uploads"] == []


def test_a_token_the_server_forgot_exits_2_with_what_to_do(capsys, tmp_path, run_config, tiny_bert_dir, spec):
    routes = open_round_routes(run_config, b"")
    routes[("GET", "/v1/round")] = (401, "application/json",
                                    b'{"error": {"code": "bad_token", "message": "unknown token"}}')
    with fake_server(routes) as (url, _):
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir)
    assert code == 2, line
    assert "bad_token" in line and "move --state-dir away to register again" in line
