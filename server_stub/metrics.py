"""Prometheus metrics of one server (`GET /metrics`, text exposition format, prometheus-client).

Read from the state store at scrape time (so they agree with /v1/status and survive restarts):
  hetlora_round                       gauge    the round open now, else the last one (0 = head round)
  hetlora_rounds_completed            gauge    aggregated rounds (round 0 and the head rounds included)
  hetlora_rounds_planned              gauge    rounds the run will aggregate, counted as rounds_completed is
  hetlora_clients_registered          gauge    registered clients
  hetlora_clients_selected            gauge    clients selected for the open round (0 when none is open)
  hetlora_uploads_accepted_total      counter  stored uploads (adapters and round-0 statistics)
  hetlora_upload_bytes_total          counter  bytes of the stored uploads
  hetlora_download_bytes_total        counter  adapter bytes served to clients
Counted by this process (reset on restart, as Prometheus counters may):
  hetlora_uploads_rejected_total           counter    refused POST .../update (present from 0)
  hetlora_upload_rejections_total{reason}  counter    the same by error code, a reason's series from its first
                                                      refusal (docs/PROTOCOL.md; e.g. round_closed, too_large)
  hetlora_aggregation_seconds              histogram  time the combine step takes for one round's updates
                                                      (bounded influence, the rule, the server optimiser;
                                                      round 0's closed-form head is not counted)
  process_*                                           the server process's CPU, memory, open files, start time
"""

from __future__ import annotations

import json
import re

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

UPDATE_PATH = re.compile(r"/v1/rounds/[^/]+/update")
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class StateCollector:
    """The store-derived metrics of a Coordinator, collected at scrape time under its lock."""

    def __init__(self, coordinator):
        self.coordinator = coordinator

    def _one(self, sql: str) -> int:
        return int(self.coordinator.store.select_one(sql)["v"] or 0)

    def collect(self):
        c = self.coordinator
        with c.lock:
            open_round = c.store.select_one("SELECT number, selected FROM rounds WHERE state != 'aggregated' "
                                            "ORDER BY number DESC LIMIT 1")
            values = {
                "round": open_round["number"] if open_round else self._one("SELECT MAX(number) AS v FROM rounds"),
                "rounds_completed": self._one("SELECT COUNT(*) AS v FROM rounds WHERE state = 'aggregated'"),
                "clients_registered": self._one("SELECT COUNT(*) AS v FROM clients"),
                "clients_selected": len(open_round["selected"]) if open_round else 0,
                "uploads": self._one("SELECT COUNT(*) AS v FROM uploads"),
                "bytes_up": self._one("SELECT SUM(bytes) AS v FROM uploads"),
                "bytes_down": self._one("SELECT SUM(bytes) AS v FROM downloads"),
            }
        for name, help_text in [("round", "the round open now, else the last one (0 = head round)"),
                                ("rounds_completed", "aggregated rounds"),
                                ("clients_registered", "registered clients"),
                                ("clients_selected", "clients selected for the open round")]:
            yield GaugeMetricFamily(f"hetlora_{name}", help_text, value=values[name])
        yield GaugeMetricFamily("hetlora_rounds_planned", "rounds the run will aggregate (round 0 and head rounds "
                                "included)", value=c.config.last_round + int(c.config.head_round))
        for name, key, help_text in [("uploads_accepted", "uploads", "stored uploads (adapters and statistics)"),
                                     ("upload_bytes", "bytes_up", "bytes of the stored uploads"),
                                     ("download_bytes", "bytes_down", "adapter bytes served to clients")]:
            yield CounterMetricFamily(f"hetlora_{name}", help_text, value=values[key])


class ServerMetrics:
    """One server's registry: the state collector plus the counted metrics."""

    def __init__(self, coordinator):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(coordinator))
        ProcessCollector(registry=self.registry)
        self.rejected = Counter("hetlora_uploads_rejected", "refused uploads", registry=self.registry)
        self.rejections = Counter("hetlora_upload_rejections", "refused uploads by error code", ["reason"],
                                  registry=self.registry)
        self.aggregation = Histogram("hetlora_aggregation_seconds", "time to aggregate one round",
                                     buckets=AGGREGATION_BUCKETS, registry=self.registry)
        coordinator.aggregation_observers.append(self.aggregation.observe)


class RejectionCounter:
    """ASGI middleware (outermost, so it also sees the body limit's 413): counts every 4xx/5xx answer to
    POST /v1/rounds/{n}/update by the `error.code` of its JSON body."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not UPDATE_PATH.fullmatch(scope["path"]):
            return await self.app(scope, receive, send)
        status, body = 0, bytearray()

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    self.metrics.rejected.inc()
                    self.metrics.rejections.labels(reason=error_code(bytes(body), status)).inc()
            await send(message)

        await self.app(scope, receive, watch)


def error_code(body: bytes, status: int) -> str:
    """`error.code` of an error body (docs/PROTOCOL.md), else `http_<status>`."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"
    return code if isinstance(code, str) and re.fullmatch(r"[a-z_]{1,40}", code) else f"http_{status}"


def install_metrics(app, coordinator) -> ServerMetrics:
    """Add `GET /metrics` and the rejection counter (outermost middleware) to a FastAPI app."""
    from fastapi.responses import Response

    metrics = ServerMetrics(coordinator)
    app.add_middleware(RejectionCounter, metrics=metrics)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format; server_stub.metrics)",
             response_class=Response)
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
