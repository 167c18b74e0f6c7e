"""Run the aggregation server: federated LoRA rounds over HTTP (docs/PROTOCOL.md).

Example: hetlora serve --aggregator hetlora --labels hetlora/data/banking77/categories.json --state-dir runs/server --port 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
from pathlib import Path

from hetlora.config_file import add_config_option
from hetlora.engine.run_options import add_run_arguments, build_config, model_dir_of
from hetlora.errors import UserError
from hetlora.protocol.atomic import write_bytes
from hetlora.secret_file import read_secret
from server_stub.enrollment import Enrollment, is_loopback, read_names
from server_stub.read_access import ReadAccess

log = logging.getLogger("hetlora.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_option(p)
    add_run_arguments(p)
    _add_server_arguments(p)


def _add_server_arguments(p: argparse.ArgumentParser) -> None:
    srv = p.add_argument_group("server")
    srv.add_argument("--state-dir", default="runs/server", help="SQLite state and blobs; reused on restart")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080, help="0 picks a free port (written to <state-dir>/server.json)")
    srv.add_argument("--max-upload-mb", type=float, default=64.0)
    srv.add_argument("--poll-seconds", type=float, default=1.0, help="how often clients should poll the round")
    srv.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (chain) file")
    srv.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key (with --ssl-certfile)")

    enroll = p.add_argument_group("enrollment (who may register; docs/PROTOCOL.md section 2)")
    secret = enroll.add_mutually_exclusive_group()
    secret.add_argument("--enroll-secret-file", metavar="FILE", help="require the secret in FILE to register")
    secret.add_argument("--enroll-secret", metavar="SECRET",
                        help="require SECRET to register (visible in the process list: prefer --enroll-secret-file)")
    enroll.add_argument("--allow-names", metavar="FILE", help="only these client names may register (one per line)")
    enroll.add_argument("--register-rate", type=int, default=30, metavar="N",
                        help="registrations per minute per client address; loopback exempt; 0 = no limit (default 30)")
    enroll.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                        help="a reverse proxy whose X-Forwarded-For header names the client's address (repeatable; "
                             "default: none, the TCP peer is the client's address)")
    reads = p.add_argument_group("reads (GET /v1/global, /v1/status, /metrics, /openapi.json)")
    reads.add_argument("--admin-token-file", metavar="FILE",
                       help="the operator's token for the read routes (Authorization: Bearer <token>)")
    reads.add_argument("--public-status", action="store_true",
                       help="leave the read routes open even with enrollment on (by default they need a client's or "
                            "the operator's token once --enroll-secret-file, --allow-names or --admin-token-file is set)")


def result_writer(state_dir: Path, model_dir: Path, config):
    """on_finished for `serve`: the last global as <state-dir>/final/global.safetensors and final/peft/, logged."""

    def write(data: bytes) -> None:
        # the model stack (torch, transformers) at the run's end, not for --help
        from hetlora.models.peft_folder import save_result

        try:
            wire, peft = save_result(data, state_dir / "final", model_dir=model_dir, task=config.spec.task,
                                     labels=list(config.labels) if config.labels else None)
        except (OSError, UserError) as exc:
            log.error("could not write the run's result to %s: %s", state_dir / "final", exc)
            return
        log.info("the run's result (wire format, for hetlora evaluate --adapter): %s", wire)
        log.info("the run's result as a PEFT folder: %s", peft)

    return write


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port chosen by the OS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port (0 = any free port)") \
            from None
    sock.listen(128)
    return sock


def check_tls(certfile: str | None, keyfile: str | None) -> bool:
    """True when serving HTTPS; UserError unless both files are given and load as a certificate and its key."""
    if not certfile and not keyfile:
        return False
    if not (certfile and keyfile):
        raise UserError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot use the certificate {certfile} with the key {keyfile}: {exc}") from None
    return True


def write_server_info(state_dir: Path, host: str, port: int, tls: bool = False) -> str:
    """Write <state-dir>/server.json ({"url", "host", "port", "pid"}) atomically; return the URL."""
    url_host = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{url_host}:{port}"
    info = {"url": url, "host": host, "port": port, "pid": os.getpid()}
    write_bytes(state_dir / "server.json", json.dumps(info).encode())
    return url


def build_enrollment(args: argparse.Namespace):
    """Enrollment from the arguments; warns loudly when an open server listens beyond loopback."""
    secret = read_secret(args.enroll_secret_file) if args.enroll_secret_file else args.enroll_secret
    if secret is not None and not secret.strip():
        raise UserError("--enroll-secret must not be empty")
    enrollment = Enrollment(secret=secret, allowed_names=read_names(args.allow_names) if args.allow_names else None,
                            per_minute=args.register_rate)
    if enrollment.open and not is_loopback(args.host):
        log.warning("OPEN REGISTRATION on %s: anyone who reaches this address can register and upload updates. "
                    "Start with --enroll-secret-file FILE and/or --allow-names FILE (docs/PROTOCOL.md section 2), "
                    "and with --ssl-certfile/--ssl-keyfile so tokens do not cross the network in clear text.",
                    args.host)
    return enrollment


def build_access(args: argparse.Namespace):
    """Who may read (server_stub.read_access.ReadAccess) from --admin-token-file and --public-status."""
    token = read_secret(args.admin_token_file, "admin token") if args.admin_token_file else None
    return ReadAccess(admin_token=token, public=args.public_status)


def run(args: argparse.Namespace) -> int:
    # the server extra (FastAPI, uvicorn) when serving: --help works without it
    import uvicorn

    from server_stub.app import create_app

    state_dir = Path(args.state_dir)
    (state_dir / "server.json").unlink(missing_ok=True)
    config = build_config(args, max_upload_mb=args.max_upload_mb, poll_seconds=args.poll_seconds)
    tls = check_tls(args.ssl_certfile, args.ssl_keyfile)
    enrollment, access = build_enrollment(args), build_access(args)
    app = create_app(config, state_dir, enrollment, access, tuple(args.trusted_proxy),
                     on_finished=result_writer(state_dir, model_dir_of(args), config))
    if not access.protected(enrollment.open) and not is_loopback(args.host):
        log.warning("the read routes (/v1/global, /v1/status, /metrics, /openapi.json) answer anyone who reaches %s",
                    args.host)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=args.verbose, timeout_graceful_shutdown=2,
                                           ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                                           proxy_headers=False))  # create_app trusts --trusted-proxy alone
    stop_on_signals(server)
    sock = bind_socket(args.host, args.port)
    url = write_server_info(state_dir, args.host, sock.getsockname()[1], tls)
    log.info("serving %s run (%s, spec %s, %d modules, ranks %s, global rank %d, %d head + %d LoRA rounds) at %s; "
             "state in %s", config.aggregator, config.spec.task, config.spec.fingerprint, len(config.spec.modules),
             list(config.ranks), config.global_rank, config.head_rounds, config.rounds, url, state_dir)
    print(f"hetlora serve: listening on {url} (API description: {url}/openapi.json)", flush=True)
    if not tls and not is_loopback(args.host):
        log.warning("plain HTTP on %s: bearer tokens and updates cross the network in clear text; serve HTTPS with "
                    "--ssl-certfile/--ssl-keyfile (docs/DEVICES.md, TLS)", args.host)
    server.run(sockets=[sock])
    log.info("server stopped; state kept in %s", state_dir)
    return 0


def stop_on_signals(server) -> None:
    """Ctrl-C (SIGINT) and SIGTERM ask uvicorn to shut down gracefully, also while it starts and after it restores
    the handlers it had replaced (it then raises the signals it caught once more), never a KeyboardInterrupt."""

    def stop(_signum, _frame) -> None:
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
