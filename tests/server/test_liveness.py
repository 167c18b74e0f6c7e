"""Liveness (server_stub/liveness.py): a registered client that never uploads cannot stall the federation."""

from __future__ import annotations

import time

from hetlora.protocol.wire import encode
from server_stub.liveness import MISS_LIMIT
from tests.helpers.server import (make_config, make_update, post_update, register, running_server, upload_meta,
                                  wait_for)

DEADLINE = 1.0


def upload(http, spec, client, number):
    rank = client["rank"]
    return post_update(http, client, number, encode(make_update(spec, rank, upload_meta(client, number, rank, 10),
                                                                seed=number)))


def test_silent_client_is_dropped_and_replaced_within_one_deadline(spec, tmp_path):
    """Issue 14: `POST /v1/register {"profile":{},"requested_rank":4,"n_samples":1}` and nothing more, against
    min-clients 2: the round is extended with a live replacement, and closes, instead of extending forever (how many
    deadlines pass before the replacement uploads depends on the machine's scheduling, so it is not counted)."""
    with running_server(make_config(spec, min_clients=2, round_deadline=DEADLINE, rounds=1), tmp_path / "s") as http:
        silent = http.post("/v1/register", json={"profile": {}, "requested_rank": 4, "n_samples": 1}).json()
        honest = register(http, 4)  # round 1 opens with {silent, honest}
        late = register(http, 4)    # joins from the next round, or as a replacement
        assert upload(http, spec, honest, 1).status_code == 201
        started = time.monotonic()
        status = wait_for(http, lambda s: late["client_id"] in s["round"]["selected"] or s["history"], attempts=400)
        assert status["round"]["dropped"] == [silent["client_id"]]
        assert "selected 1 replacement" in status["round"]["extension_reason"]
        current = http.get("/v1/round", headers=late["auth"]).json()
        assert (current["round"], current["selected"], current["rank"]) == (1, True, 4)
        assert upload(http, spec, late, 1).json()["round_state"] == "aggregated"
        entry = http.get("/v1/status").json()["history"][0]
        print(f"silent client: round 1 closed {entry['aggregated_at'] - entry['opened_at']:.2f} s after opening "
              f"(deadline {DEADLINE} s, {time.monotonic() - started:.2f} s after the honest upload)")
        assert entry["extensions"] >= 1  # once for the replacement; a slow machine may need another deadline
        assert entry["clients"] == [honest["client_id"], late["client_id"]]
        assert entry["dropped"] == [silent["client_id"]]


def test_repeat_no_show_is_not_selected_until_it_polls(spec, tmp_path):
    """Against a fake clock: the silent client misses MISS_LIMIT rounds, is left out, then polls and is back."""
    from hetlora.engine.aggregation import make_rule
    from server_stub.rounds import Coordinator
    from server_stub.store import Store

    now = [1000.0]
    config = make_config(spec, min_clients=2, round_deadline=10.0, rounds=MISS_LIMIT + 2)
    coordinator = Coordinator(config, Store(tmp_path), make_rule("hetlora"), clock=lambda: now[0])
    silent, a, b = (coordinator.register({}, 4, 10) for _ in range(3))

    def run_round(number):
        """a and b upload whenever selected (the silent client never does); deadlines pass until the round closes."""
        for _ in range(3):
            for c in (a, b):
                current = coordinator.round_for(c["client_id"])
                if current["round"] == number and current["selected"] and not current["uploaded"]:
                    coordinator.accept_upload(c["client_id"], number, encode(
                        make_update(spec, c["rank"], upload_meta(c, number, c["rank"], 10), seed=number)))
            if coordinator.status()["history"][-1:] and coordinator.status()["history"][-1]["round"] == number:
                return
            now[0] += config.round_deadline + 1
            coordinator.tick()
        raise AssertionError(f"round {number} did not close: {coordinator.status()['round']}")

    selected = []
    for number in range(1, MISS_LIMIT + 1):
        selected.append(coordinator.status()["round"]["selected"])
        run_round(number)
    assert all(silent["client_id"] in s for s in selected)
    status = coordinator.status()
    assert [h["dropped"] for h in status["history"]] == [[silent["client_id"]]] * MISS_LIMIT
    assert status["round"]["selected"] == sorted([a["client_id"], b["client_id"]])  # missed MISS_LIMIT in a row
    assert coordinator.round_for(silent["client_id"])["selected"] is False  # ... and now it polls: live again
    run_round(MISS_LIMIT + 1)
    assert silent["client_id"] in coordinator.status()["round"]["selected"]
    run_round(MISS_LIMIT + 2)
    status = coordinator.status()
    assert status["finished"] and all(len(h["clients"]) == 2 for h in status["history"])
    coordinator.store.close()
