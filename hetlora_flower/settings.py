"""The Flower run config ([tool.flwr.app.config] in flower_app/pyproject.toml) -> the server's ServerConfig.

Every run-config key is a `hetlora serve` run flag without its dashes (`local-steps = 5` is `--local-steps 5`),
parsed by the run groups of the same parser and turned into a ServerConfig by the same `build_config`
(hetlora.engine.run_options), so both servers share one set of defaults and checks. Two keys carry
Flower's names instead: `num-server-rounds` (= --rounds, the LoRA rounds; with `head-rounds = H` the run has H head rounds
before them, H + num-server-rounds Flower rounds in all) and `rule` (= --aggregator). An empty string or
`false` leaves a flag at its default; `true` sets a switch (`segment-average = true`).
Flower-only keys: `output-dir` (where the ServerApp writes the final global and the history; "" = none) and
`partition-dir` (simulation: the `hetlora partition` folder the virtual nodes train on).
"""

from __future__ import annotations

import argparse

from hetlora.errors import UserError
from hetlora.engine.run_options import add_run_arguments, build_config

RENAMED = {"num-server-rounds": "rounds", "rule": "aggregator"}
FLOWER_ONLY = ("output-dir", "partition-dir")
# `hetlora serve` flags that belong to the HTTP server, not to a run.
HTTP_ONLY = ("state-dir", "host", "port", "max-upload-mb", "poll-seconds", "ssl-certfile", "ssl-keyfile",
             "enroll-secret-file", "enroll-secret", "allow-names", "register-rate", "trusted-proxy", "admin-token-file",
             "public-status")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"flower run config: {message}")


def serve_arguments(run_config: dict) -> list[str]:
    """The `hetlora serve` argv equivalent to a Flower run config (Flower-only keys left out)."""
    argv: list[str] = []
    for key, value in sorted(run_config.items()):
        if key in FLOWER_ONLY:
            continue
        if key in HTTP_ONLY:
            raise UserError(f"flower run config: {key!r} is an option of the HTTP server, not of a Flower run")
        flag = "--" + RENAMED.get(key, key)
        if value is True:
            argv.append(flag)
        elif value is not False and value != "":
            argv += [flag, str(value)]
    return argv


def server_config(run_config: dict):
    """ServerConfig of a Flower run (UserError with one line for a bad key or value)."""
    parser = _Parser(prog="flower run config", add_help=False)
    add_run_arguments(parser)
    return build_config(parser.parse_args(serve_arguments(run_config)))
