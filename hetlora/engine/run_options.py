"""The options of a run, shared by `hetlora serve` and a Flower run config: the argument parser's run groups and
`build_config` (parsed arguments -> ServerConfig), so both servers have one set of defaults and checks.

The one place the engine reaches into the model layer: the AdapterSpec is derived from the model folder
(hetlora.models, transformers on the meta device).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hetlora.argtypes import add_renamed, positive_int_list
from hetlora.demo_data import banking77
from hetlora.engine.aggregation import RULES
from hetlora.engine.aggregation.head_init import DEFAULT_SHRINKAGE, DEFAULT_TEMPERATURE
from hetlora.engine.aggregation.robust import DEFAULT_TRIM_BETA, ROBUST, Defence
from hetlora.engine.aggregation.server_opt import OPTIMIZERS, ServerOptimizer
from hetlora.engine.config import ServerConfig
from hetlora.errors import UserError
from hetlora.protocol.settings import LR_DECAYS, TrainingSettings
from profiles.policy import load_policy
from hetlora.labels import read_labels
from hetlora.engine.init_adapter import read_init_adapter
from hetlora.models.bundled import default_model_dir
from profiles.memory_model import ModelShape

log = logging.getLogger("hetlora.server")


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a run (model, task, aggregation, rounds, head stages, training hints): `hetlora serve`'s
    and, as run-config keys, a Flower run's."""
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
    add_renamed(head, "--start-clients", "--head-clients", type=int, default=0,
                help="clients to wait for before the run's first round opens (round 0's head statistics, else "
                     "round 1), so that it selects among them all (default: --min-clients)")
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


def build_config(args: argparse.Namespace, **server):
    """ServerConfig from parsed run arguments (derives the AdapterSpec from the model folder); `server`: the HTTP
    server's own fields (max_upload_mb, poll_seconds), left at their defaults for a Flower run."""
    # the model stack (torch, transformers) loads when a run is built, not for --help
    from hetlora.models.adapter_spec import derive_spec

    rule_options = _rule_options(args)
    model_dir = model_dir_of(args)
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
        training=training,
        policy=load_policy(args.policy) if args.policy else None, model_shape=_model_shape(model_dir),
        head_init=head_init, init_adapter=init_adapter,
        head_shrinkage=args.head_shrinkage, head_temperature=args.head_temperature, start_clients=args.start_clients,
        head_rounds=args.head_rounds, lr_decay=args.lr_decay, server_opt=_server_optimizer(args),
        defence=_defence(args), max_client_samples=args.max_client_samples, **server,
    )


def model_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else default_model_dir(args.task)


def _model_shape(model_dir):
    """The base model's shape for the tier policy; None (the policy's own model) for a type it does not know."""
    try:
        return ModelShape.from_model_dir(model_dir)
    except UserError as exc:
        log.warning("tier policy: %s; sizing tiers by the policy's model instead", exc)
        return None


def _defence(args: argparse.Namespace):
    try:
        return Defence(robust=args.robust, trim_beta=args.trim_beta)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _server_optimizer(args: argparse.Namespace):
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
