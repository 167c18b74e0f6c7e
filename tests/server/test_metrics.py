"""GET /metrics on a real server on loopback, parsed with prometheus_client's own parser and checked
against the HTTP answers the test received and the server's /v1/status."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hetlora.protocol.wire import encode
from tests.helpers.server import (error_code, make_config, make_update, post_update, register, running_server,
                                  upload_meta)

PROMTOOL = shutil.which("promtool")


def scrape(http) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def refuse_then_finish_round_1(http, spec, clients) -> list[str]:
    """Four refused uploads (no token, not safetensors, too large, another round), then each client's valid update
    for round 1; the refusals' error codes."""
    refused = [http.post("/v1/rounds/1/update", content=b"x"),  # no token
               post_update(http, clients[0], 1, b"not safetensors"),
               post_update(http, clients[0], 1, b"\0" * 400_000),  # over --max-upload-mb
               post_update(http, clients[0], 7, encode(make_update(spec, 2, upload_meta(clients[0], 7, 2, 10), seed=1)))]
    assert all(400 <= r.status_code < 500 for r in refused)
    for k, client in enumerate(clients):
        rank = http.get("/v1/round", headers=client["auth"]).json()["rank"]
        http.get("/v1/rounds/1/adapter", headers=client["auth"])
        update = make_update(spec, rank, upload_meta(client, 1, rank, 10), seed=k)
        assert post_update(http, client, 1, encode(update)).status_code == 201
    return [error_code(r) for r in refused]


def test_metrics_follow_a_round(spec, tmp_path):
    config = make_config(spec, rounds=2, min_clients=2, max_upload_mb=0.25)
    with running_server(config, tmp_path / "state") as http:
        before = scrape(http)
        assert value(before, "hetlora_clients_registered") == 0 and value(before, "hetlora_rounds_planned") == 2
        assert value(before, "hetlora_rounds_completed") == 0 and value(before, "hetlora_uploads_rejected_total") == 0
        assert value(before, "process_cpu_seconds_total") > 0 and value(before, "process_resident_memory_bytes") > 0
        assert value(before, "hetlora_aggregation_seconds_count") == 0
        clients = [register(http, rank) for rank in (2, 4)]
        opened = scrape(http)
        assert (value(opened, "hetlora_round"), value(opened, "hetlora_clients_selected"),
                value(opened, "hetlora_clients_registered")) == (1, 2, 2)
        codes = refuse_then_finish_round_1(http, spec, clients)
        assert "too_large" in codes and len(set(codes)) >= 3
        after = scrape(http)
        status = http.get("/v1/status").json()

    (entry,) = status["history"]
    assert value(after, "hetlora_rounds_completed") == 1 and value(after, "hetlora_round") == 2
    assert value(after, "hetlora_uploads_accepted_total") == 2
    assert value(after, "hetlora_upload_bytes_total") == entry["bytes_up"] > 0
    assert value(after, "hetlora_download_bytes_total") == entry["bytes_down"] > 0
    assert value(after, "hetlora_aggregation_seconds_count") == 1
    assert 0 < value(after, "hetlora_aggregation_seconds_sum") < 600
    assert value(after, "hetlora_aggregation_seconds_bucket", le="+Inf") == 1
    rejections = {dict(labels)["reason"]: v for (name, labels), v in after.items()
                  if name == "hetlora_upload_rejections_total"}
    assert rejections == {code: pytest.approx(codes.count(code)) for code in set(codes)}
    assert value(after, "hetlora_uploads_rejected_total") == len(codes)



def test_names_follow_prometheus_conventions_and_plan_every_round(spec, tmp_path):
    config = make_config(spec, head_init="lda", head_rounds=2, rounds=2)  # it aggregates rounds 0 to 4
    with running_server(config, tmp_path / "state") as http:
        families = list(text_string_to_metric_families(http.get("/metrics").text))
    types = {family.name: family.type for family in families}
    assert not [name for name, kind in types.items() if kind == "gauge" and name.endswith("_total")]
    assert types["hetlora_uploads_rejected"] == types["hetlora_upload_bytes"] == "counter"
    (planned,) = next(f for f in families if f.name == "hetlora_rounds_planned").samples
    assert planned.value == 5


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(PROMTOOL is None, reason="needs the platform tool promtool (Debian/Ubuntu package 'prometheus'; "
                                             "`make test` installs it when run as root with apt-get)")
def test_promtool_check_metrics_passes_before_and_after_a_round(spec, tmp_path):
    config = make_config(spec, rounds=2, min_clients=2, max_upload_mb=0.25)
    with running_server(config, tmp_path / "state") as http:
        texts = [http.get("/metrics").text]
        refuse_then_finish_round_1(http, spec, [register(http, rank) for rank in (2, 4)])
        texts.append(http.get("/metrics").text)
    assert "hetlora_upload_rejections_total{" in texts[1] and "hetlora_aggregation_seconds_bucket{" in texts[1]
    for text in texts:
        result = promtool_check(text)
        assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # the check is real: a gauge named like a counter is reported
    bad = promtool_check("# HELP x_total a gauge\n# TYPE x_total gauge\nx_total 1\n")
    assert bad.returncode != 0 and "x_total" in bad.stdout + bad.stderr
