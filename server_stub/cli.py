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

from hetlora.argtypes import positive_int_list
from hetlora.config_file import add_config_option
from hetlora.demo_data import banking77
from hetlora.errors import UserError
from hetlora.engine.aggregation import RULES
from hetlora.protocol.settings import LR_DECAYS, TrainingSettings
from hetlora.engine.aggregation.head_init import DEFAULT_SHRINKAGE, DEFAULT_TEMPERATURE
from hetlora.engine.aggregation.robust import DEFAULT_TRIM_BETA, ROBUST
from hetlora.engine.aggregation.server_opt import OPTIMIZERS

log = logging.getLogger("hetlora.server")


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_option(p)
    run = p.add_argument_group("model and task")
    run.add_argument("--model", help="base model folder (default: the installed all-MiniLM-L6-v2 for classification, "
                     "SmolLM2-135M-Instruct for causal-lm)")
    run.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    run.add_argument("--labels", help="classification labels: a JSON list or one label per line "
                                      "(default: the bundled BANKING77 intents)")
    run.add_argument("--targets", type=_name_list, help="LoRA target modules, comma-separated (default: by model type)")
    run.add_argument("--init-adapter", metavar="PATH",
                     help="start from this adapter instead of a fresh one: a PEFT LoRA folder (any r, lora_alpha) or a "
                          "wire .safetensors file; it must fit the model, --targets and labels, rank <= --global-rank")

    agg = p.add_argument_group("aggregation")
    agg.add_argument("--aggregator", choices=RULES, default="hetlora")
    agg.add_argument("--weighting", choices=("sparsity", "sparsity_n", "n"),
                     help="hetlora client weights (default: sparsity)")
    agg.add_argument("--segment-average", action="store_true",
                     help="hetlora: average each rank segment only over the clients that have it (on non-IID data "
                          "with few high-rank clients the top segments grow unchecked and accuracy drifts down: "
                          "docs/RESULTS.md, Collapse)")
    agg.add_argument("--hlora-rank", type=int, help="hlora: rank of the global adapter (default: --global-rank)")
    agg.add_argument("--ranks", type=positive_int_list, default=(4, 8, 16, 32, 64), help="the rank set (default 4,8,16,32,64)")
    agg.add_argument("--global-rank", type=int, help="global adapter rank (default: the largest of --ranks)")
    agg.add_argument("--server-opt", choices=OPTIMIZERS, default="none",
                     help="server optimiser on the aggregated update (docs/ARCHITECTURE.md): momentum, adam, yogi")
    agg.add_argument("--server-lr", type=float, default=1.0, help="server optimiser learning rate (default 1)")
    agg.add_argument("--server-beta1", type=float, default=0.9)
    agg.add_argument("--server-beta2", type=float, default=0.99)
    agg.add_argument("--server-tau", type=float, default=1e-3, help="adam/yogi adaptivity (default 1e-3)")
    agg.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha clients train with (default 16)")
    agg.add_argument("--robust", choices=ROBUST, default="none",
                     help="robust aggregation before any rule (docs/PROTOCOL.md section 3.1): trimmed-mean or median of "
                          "the clients' updates per coordinate, or norm-bound (an absolute bound from the first round's "
                          "median update); every round also bounds each client's influence (default none)")
    agg.add_argument("--trim-beta", type=float, default=DEFAULT_TRIM_BETA,
                     help=f"--robust trimmed-mean: the fraction cut from each end (default {DEFAULT_TRIM_BETA})")

    _add_round_arguments(p)
    _add_training_arguments(p)
    _add_server_arguments(p)


def _add_round_arguments(p: argparse.ArgumentParser) -> None:
    rounds = p.add_argument_group("rounds")
    rounds.add_argument("--rounds", type=int, default=5)
    rounds.add_argument("--clients-per-round", type=int, default=0, help="clients selected per round (0 = all)")
    rounds.add_argument("--min-clients", type=int, default=2,
                        help="clients needed to open a round and uploads needed to aggregate at the deadline")
    rounds.add_argument("--round-deadline", type=float, default=600.0, metavar="SECONDS")
    rounds.add_argument("--seed", type=int, default=0)
    rounds.add_argument("--max-client-samples", type=int, default=10_000_000, metavar="N",
                        help="the data cap: the most samples one client may declare at registration and count in its "
                             "round-0 statistics (default 10,000,000)")

    head = p.add_argument_group("head initialisation (classification): round 0 before the LoRA rounds")
    head.add_argument("--head-init", choices=("none", "ncm", "lda"),
                      help="set the head from pooled per-class feature statistics of the clients: nearest class "
                           "mean (ncm) or a shrunk linear discriminant (lda); none = a random head "
                           "(default: lda for classification, none for causal-lm or an --init-adapter with a head)")
    head.add_argument("--head-shrinkage", type=float, default=DEFAULT_SHRINKAGE,
                      help=f"lda covariance shrinkage in [0, 1] (default {DEFAULT_SHRINKAGE})")
    head.add_argument("--head-temperature", type=float, default=DEFAULT_TEMPERATURE,
                      help=f"scale of the initial head's logits (default {DEFAULT_TEMPERATURE})")
    head.add_argument("--head-clients", type=int, default=0,
                      help="clients to wait for before round 0 opens (default: --min-clients)")
    head.add_argument("--head-rounds", type=int, default=0,
                      help="head rounds after round 0: every client fits the head on its frozen features "
                           "(logit-adjusted for its label skew) and the server averages the heads, before the "
                           "LoRA rounds; cheap (no backward pass through the model, the head alone travels). "
                           "The demo uses 20 (default 0)")
    head.add_argument("--head-epochs", type=int, default=5,
                      help="passes over its frozen features a client makes in each head round (default 5)")
    head.add_argument("--head-fit-lr", type=float, default=TrainingSettings.head_fit_lr,
                      help=f"Adam learning rate of the head rounds (default {TrainingSettings.head_fit_lr})")



def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    hints = p.add_argument_group("training hints sent to clients")
    hints.add_argument("--policy", metavar="FILE", help="the tier policy that sizes each client (default: the "
                       "packaged profiles/tiers.json); pass the same file to `hetlora profile --policy`")
    hints.add_argument("--local-steps", type=int, default=20)
    hints.add_argument("--batch-size", type=int, default=16)
    hints.add_argument("--seq-len", type=int, default=64)
    hints.add_argument("--lr", type=float, default=5e-4, help="learning rate of the LoRA factors")
    hints.add_argument("--head-lr", type=float, help="learning rate of the classification head (default: --lr)")
    hints.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                       help="learning-rate schedule over a round's local steps")
    hints.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps of the cosine schedule")
    hints.add_argument("--lr-decay", choices=LR_DECAYS, default="none",
                       help="across the run: cosine = LoRA round t of T trains at lr * (1 + cos(pi t / T)) / 2 "
                            "(the head's lr alike), on top of --schedule within the round (default none)")
    hints.add_argument("--prune-gamma", type=float, default=0.99)
    hints.add_argument("--prune-lambda", type=float,
                       help="self-pruning regulariser weight (default: 0.01 for hetlora, 0 otherwise)")
    hints.add_argument("--min-rank", type=int, default=4, help="self-pruning never goes below this rank")



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


def build_config(args: argparse.Namespace):
    """ServerConfig from parsed arguments (derives the AdapterSpec from the model folder)."""
    from edge_client.models import derive_spec
    from profiles.policy import load_policy
    from hetlora.labels import read_labels
    from hetlora.engine.config import ServerConfig
    from hetlora.engine.init_adapter import read_init_adapter

    rule_options = _rule_options(args)
    model_dir = _model_dir(args)
    labels = None
    if args.task == "classification":
        labels = read_labels(args.labels or banking77("categories.json", "--labels"))
    spec = derive_spec(model_dir, args.task, args.targets, num_labels=len(labels) if labels else None)
    global_rank = args.hlora_rank or args.global_rank or max(args.ranks)
    prune_lambda = args.prune_lambda if args.prune_lambda is not None else (0.01 if args.aggregator == "hetlora" else 0.0)
    init_adapter = read_init_adapter(args.init_adapter) if args.init_adapter else None
    head_init = args.head_init or ("lda" if args.task == "classification" and not (init_adapter and init_adapter.dense)
                                   else "none")
    training = TrainingSettings(steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                head_lr=args.head_lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
                                prune_gamma=args.prune_gamma, prune_lambda=prune_lambda, min_rank=args.min_rank,
                                lora_alpha=args.lora_alpha, head_epochs=args.head_epochs,
                                head_fit_lr=args.head_fit_lr)
    return ServerConfig(
        spec=spec, aggregator=args.aggregator, labels=labels, rule_options=rule_options, ranks=tuple(args.ranks),
        global_rank=global_rank, clients_per_round=args.clients_per_round, min_clients=args.min_clients,
        round_deadline=args.round_deadline, rounds=args.rounds, seed=args.seed,
        max_upload_mb=args.max_upload_mb, poll_seconds=args.poll_seconds, training=training,
        policy=load_policy(args.policy) if args.policy else None, model_shape=_model_shape(model_dir),
        head_init=head_init, init_adapter=init_adapter,
        head_shrinkage=args.head_shrinkage, head_temperature=args.head_temperature, head_clients=args.head_clients,
        head_rounds=args.head_rounds, lr_decay=args.lr_decay, server_opt=_server_optimizer(args),
        defence=_defence(args), max_client_samples=args.max_client_samples,
    )


def _model_dir(args: argparse.Namespace) -> Path:
    from edge_client.models import default_model_dir

    return Path(args.model) if args.model else default_model_dir(args.task)


def result_writer(state_dir: Path, model_dir: Path, config):
    """on_finished for `serve`: the last global as <state-dir>/final/global.safetensors and final/peft/, logged."""

    def write(data: bytes) -> None:
        from edge_client.peft_export import save_result

        try:
            wire, peft = save_result(data, state_dir / "final", model_dir=model_dir, task=config.spec.task,
                                     labels=list(config.labels) if config.labels else None)
        except (OSError, UserError) as exc:
            log.error("could not write the run's result to %s: %s", state_dir / "final", exc)
            return
        log.info("the run's result (wire format, for hetlora evaluate --adapter): %s", wire)
        log.info("the run's result as a PEFT folder: %s", peft)

    return write


def _model_shape(model_dir):
    """The base model's shape for the tier policy; None (the policy's own model) for a type it does not know."""
    from profiles.memory_model import ModelShape

    try:
        return ModelShape.from_model_dir(model_dir)
    except UserError as exc:
        log.warning("tier policy: %s; sizing tiers by the policy's model instead", exc)
        return None


def _defence(args: argparse.Namespace):
    from hetlora.engine.aggregation.robust import Defence

    try:
        return Defence(robust=args.robust, trim_beta=args.trim_beta)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _server_optimizer(args: argparse.Namespace):
    from hetlora.engine.aggregation.server_opt import ServerOptimizer

    try:
        return ServerOptimizer(args.server_opt, lr=args.server_lr, beta1=args.server_beta1, beta2=args.server_beta2,
                               tau=args.server_tau)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _rule_options(args: argparse.Namespace) -> dict:
    """make_rule options of the chosen aggregator; UserError for another rule's flags."""
    if args.hlora_rank is not None and args.aggregator != "hlora":
        raise UserError("--hlora-rank is an hlora option; drop it or use --aggregator hlora")
    if args.aggregator != "hetlora":
        if args.weighting or args.segment_average:
            raise UserError("--weighting and --segment-average are hetlora options; drop them or use --aggregator hetlora")
        return {}
    return {"segment_average": args.segment_average} | ({"weighting": args.weighting} if args.weighting else {})


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
    from hetlora.protocol.atomic import write_bytes

    url_host = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{url_host}:{port}"
    info = {"url": url, "host": host, "port": port, "pid": os.getpid()}
    write_bytes(state_dir / "server.json", json.dumps(info).encode())
    return url


def build_enrollment(args: argparse.Namespace):
    """Enrollment from the arguments; warns loudly when an open server listens beyond loopback."""
    from hetlora.secret_file import read_secret
    from server_stub.enrollment import Enrollment, is_loopback, read_names

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
    from hetlora.secret_file import read_secret
    from server_stub.read_access import ReadAccess

    token = read_secret(args.admin_token_file, "admin token") if args.admin_token_file else None
    return ReadAccess(admin_token=token, public=args.public_status)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server_stub.app import create_app
    from server_stub.enrollment import is_loopback

    state_dir = Path(args.state_dir)
    (state_dir / "server.json").unlink(missing_ok=True)
    config = build_config(args)
    tls = check_tls(args.ssl_certfile, args.ssl_keyfile)
    enrollment, access = build_enrollment(args), build_access(args)
    app = create_app(config, state_dir, enrollment, access, tuple(args.trusted_proxy),
                     on_finished=result_writer(state_dir, _model_dir(args), config))
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
