"""The server's run configuration: what every client is told and what a state dir is bound to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hetlora.protocol.plan import stage_of
from hetlora.protocol.settings import LR_DECAYS, TrainingSettings
from hetlora.protocol.head_stats import statistics_bytes
from hetlora.protocol.spec import AdapterSpec, linear_head
from hetlora.protocol.wire import Adapter, max_wire_bytes
from hetlora.engine.aggregation import RULES
from hetlora.engine.aggregation.head_init import DEFAULT_SHRINKAGE, DEFAULT_TEMPERATURE
from hetlora.engine.aggregation.robust import Defence
from hetlora.engine.aggregation.server_opt import ServerOptimizer
from hetlora.errors import UserError
from profiles.memory_model import ModelShape
from hetlora.engine.init_adapter import check_init_adapter, init_digest

DEFAULT_RANKS = (4, 8, 16, 32, 64)
DEFAULT_MAX_CLIENT_SAMPLES = 10_000_000


@dataclass(frozen=True)
class ServerConfig:
    """Everything a run needs besides its state dir. `clients_per_round = 0` selects every registered client."""

    spec: AdapterSpec
    aggregator: str
    labels: tuple[str, ...] | None = None
    rule_options: dict = field(default_factory=dict)
    ranks: tuple[int, ...] = DEFAULT_RANKS
    global_rank: int = 64
    clients_per_round: int = 0
    min_clients: int = 2
    round_deadline: float = 600.0
    rounds: int = 5
    seed: int = 0
    max_upload_mb: float = 64.0
    poll_seconds: float = 1.0
    training: TrainingSettings = TrainingSettings()  # sent to clients; each plan seeds and caps it
    policy: dict | None = None  # the tier policy document (None: the packaged profiles/tiers.json)
    model_shape: ModelShape | None = None  # the base model's shape, for the policy's memory and cost (None: the policy's)
    head_init: str = "none"  # none | ncm | lda: round 0 sets the head from class statistics
    head_shrinkage: float = DEFAULT_SHRINKAGE
    head_temperature: float = DEFAULT_TEMPERATURE
    start_clients: int = 0  # clients registered before the first round opens (round 0, else 1; 0: min_clients)
    head_rounds: int = 0  # rounds 1..head_rounds fit the head on frozen features (every client), LoRA after
    lr_decay: str = "none"  # none | cosine: the LoRA rounds' learning rates decay over the run (training_for)
    server_opt: ServerOptimizer = ServerOptimizer()
    defence: Defence = Defence()  # bounded influence and the robust option (hetlora.engine.aggregation.robust)
    max_client_samples: int = DEFAULT_MAX_CLIENT_SAMPLES  # the data cap: samples one client may declare
    init_adapter: Adapter | None = field(default=None, compare=False, repr=False)  # hetlora.engine.init_adapter

    def __post_init__(self):
        if self.aggregator not in RULES:
            raise UserError(f"unknown aggregator {self.aggregator!r}; choose one of {', '.join(RULES)}")
        if not self.ranks or min(self.ranks) < 1:
            raise UserError(f"--ranks must be positive integers, got {list(self.ranks)}")
        if max(self.ranks) > self.global_rank:
            raise UserError(f"--global-rank {self.global_rank} is below the largest client rank {max(self.ranks)}")
        if self.min_clients < 1:
            raise UserError("--min-clients must be at least 1")
        if self.clients_per_round and self.clients_per_round < self.min_clients:
            raise UserError(f"--clients-per-round {self.clients_per_round} is below --min-clients {self.min_clients}; "
                            "a round could never aggregate")
        if self.rounds < 1 or self.round_deadline <= 0 or self.max_upload_mb <= 0 or self.max_client_samples < 1:
            raise UserError("--rounds, --round-deadline, --max-upload-mb and --max-client-samples must be positive")
        problem = self.training.problem()
        if problem:
            raise UserError(f"training settings: {problem}")
        if self.spec.task == "classification" and not self.labels:
            raise UserError("classification needs a label list: pass --labels FILE")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise UserError("the label list has duplicates; every label must appear once")
        if self.head_init not in ("none", "ncm", "lda"):
            raise UserError(f"unknown --head-init {self.head_init!r}; choose none, ncm or lda")
        if self.head_round and self.spec.task != "classification":
            raise UserError("--head-init is for classification runs; use --head-init none")
        if self.head_rounds < 0 or (self.head_rounds and not self.head_round):
            raise UserError("--head-rounds needs --head-init ncm or lda (the head rounds start from round 0's head) "
                            "and must not be negative")
        if self.lr_decay not in LR_DECAYS:
            raise UserError(f"unknown --lr-decay {self.lr_decay!r}; choose {' or '.join(LR_DECAYS)}")
        if self.head_rounds and (self.training.head_epochs < 1 or not self.training.head_fit_lr > 0):
            raise UserError("--head-epochs must be at least 1 and --head-fit-lr positive")
        try:
            self.server_opt.check_rule(self.aggregator)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not 0.0 <= self.head_shrinkage <= 1.0 or self.head_temperature <= 0 or self.start_clients < 0:
            raise UserError("--head-shrinkage must be in [0, 1], --head-temperature positive, --start-clients >= 0")
        if self.init_adapter is not None:
            check_init_adapter(self.init_adapter, self.spec, self.global_rank, self.head_round)

    @property
    def head_round(self) -> bool:
        """Whether round 0 (per-class feature statistics -> the head of global version 0) runs."""
        return self.head_init != "none"

    @property
    def last_round(self) -> int:
        """The run's last round: the head rounds, then `rounds` LoRA rounds."""
        return self.head_rounds + self.rounds

    def stage(self, round_number: int) -> str:
        """head-statistics | head-fit | lora (hetlora.protocol.plan.stage_of)."""
        return stage_of(round_number, head_init=self.head_round, head_rounds=self.head_rounds)

    def training_for(self, round_number: int) -> TrainingSettings:
        """The training settings of round n's plans: LoRA round t = n - head_rounds - 1 of `rounds` gets
        `training.decayed(lr_decay, t, rounds)`; the head stages get `training` unchanged."""
        if self.stage(round_number) != "lora":
            return self.training
        return self.training.decayed(self.lr_decay, round_number - self.head_rounds - 1, self.rounds)

    @property
    def first_round_clients(self) -> int:
        """How many clients the run's first round (round 0, else round 1) waits for: --start-clients, at least
        --min-clients (both transports)."""
        return max(self.start_clients, self.min_clients)

    def required_uploads(self, selected: int) -> int:
        """How many of a round's `selected` clients must upload before it may aggregate: --min-clients, at most
        all of them (both transports)."""
        return min(self.min_clients, selected)

    def round_size(self, round_number: int) -> int:
        """How many clients round n selects: `clients_per_round` in a LoRA round, 0 (every one) in a head stage."""
        return self.clients_per_round if self.stage(round_number) == "lora" else 0

    @property
    def max_upload_bytes(self) -> int:
        """The upload size limit: --max-upload-mb, and never more than the largest valid upload of the run's spec
        (an adapter at the global rank; round 0's statistics)."""
        largest = max_wire_bytes(self.spec, self.global_rank)
        if self.head_round:
            _, _, num_labels, dim = linear_head(self.spec)
            largest = max(largest, statistics_bytes(num_labels, dim))
        return min(int(self.max_upload_mb * 1024 * 1024), largest)

    def identity(self) -> dict:
        """What a state dir is bound to: restarting with anything else here is refused."""
        started_from = {"init_adapter": init_digest(self.init_adapter)} if self.init_adapter is not None else {}
        return started_from | {
            "model_hash": self.spec.model_hash,
            "spec_fingerprint": self.spec.fingerprint,
            "aggregator": self.aggregator,
            "rule_options": self.rule_options,
            "global_rank": self.global_rank,
            "labels": list(self.labels) if self.labels is not None else None,
            "seed": self.seed,
            "head_init": self.head_init,
            "head_rounds": self.head_rounds,
            "server_opt": asdict(self.server_opt),
        }

    def run_config(self) -> dict:
        """The `run` object every client receives at registration (docs/PROTOCOL.md)."""
        return {
            "spec_fingerprint": self.spec.fingerprint,
            "model_hash": self.spec.model_hash,
            "task": self.spec.task,
            "targets": list(self.spec.targets),
            "labels": list(self.labels) if self.labels is not None else None,
            "aggregator": self.aggregator,
            "rule_options": dict(self.rule_options),
            "ranks": list(self.ranks),
            "global_rank": self.global_rank,
            "lora_alpha": self.training.lora_alpha,
            "rounds": self.rounds,
            "head_rounds": self.head_rounds,
            "lr_decay": self.lr_decay,
            "min_clients": self.min_clients,
            "clients_per_round": self.clients_per_round,
            "round_deadline": self.round_deadline,
            "max_upload_mb": self.max_upload_mb,
            "poll_seconds": self.poll_seconds,
            "training": self.training.to_json(),
            "pooling": self.spec.pooling,
            "head_init": self.head_init,
            "robust": self.defence.robust,
        }
