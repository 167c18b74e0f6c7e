"""A client's plan for one round: what the server's configure step decides and the client follows.

The server (its aggregation rule's `configure`) fixes the plan when the round opens, from the round, the
client and the client's tier; `GET /v1/round` carries it as `plan` (docs/PROTOCOL.md). The client trains
`mode` at `rank` (on the global components `indices` for plora) with `training`, and uploads an update
whose effective rank lies in `min_upload_rank..rank`.

Modes: `plain` (train the factors at `rank`), `hetlora` (plus self-pruning: the upload may have a lower
rank), `plora` (Select-N-Fold: train the components `indices`, fold the others), `head-statistics`
(round 0: per-class feature statistics instead of an adapter), `head-fit` (a head round: fit the linear
head on the frozen features, logit-adjusted with the run's pooled `class_counts`; upload the head only).

Stages of a run (`stage_of`): round 0 collects head statistics when the run sets the head in closed
form; rounds 1..H are head rounds when it has H of them; every later round trains LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetlora.protocol.settings import TrainingSettings

MODES = ("plain", "hetlora", "plora", "head-statistics", "head-fit")


def stage_of(round_number: int, *, head_init: bool, head_rounds: int) -> str:
    """What round `round_number` does: head-statistics (round 0 of a run with head initialisation),
    head-fit (rounds 1..head_rounds of such a run) or lora."""
    if head_init and round_number == 0:
        return "head-statistics"
    if head_init and round_number <= head_rounds:
        return "head-fit"
    return "lora"


@dataclass(frozen=True)
class Tier:
    """What a device may do: a rank (0: no training), batch-size and sequence-length caps (None: no cap), and
    whether it must train with activation checkpointing to fit its memory (the tier policy's decision).
    The tier policy's tiers (profiles.policy.tiers_of) carry their `name`; a client's tier on the server is the
    policy's rank capped by the client's request and rounded to the server's rank set, without a name."""

    rank: int
    batch_size: int | None = None
    seq_len: int | None = None
    name: str = ""
    activation_checkpointing: bool = False

    def to_json(self) -> dict:
        return {"rank": self.rank, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "activation_checkpointing": self.activation_checkpointing} | ({"name": self.name} if self.name else {})


@dataclass(frozen=True)
class ClientPlan:
    """One client's round: `rank` it trains (and downloads) at, `mode`, `training` (seeded for this client
    and round, within its tier), plora's `indices`, and the lowest effective rank its upload may have."""

    round: int
    rank: int
    mode: str
    training: TrainingSettings
    indices: tuple[int, ...] | None = None
    min_upload_rank: int = 1
    class_counts: tuple[int, ...] | None = None  # head-fit: the run's pooled examples per class

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown plan mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "plora" and (self.indices is None or len(self.indices) != self.rank):
            raise ValueError(f"a plora plan needs {self.rank} indices, got {self.indices!r}")
        if self.class_counts is not None and self.mode != "head-fit":
            raise ValueError("only a head-fit plan carries class_counts")

    def to_json(self) -> dict:
        return {"round": self.round, "rank": self.rank, "mode": self.mode, "training": self.training.to_json(),
                "indices": list(self.indices) if self.indices is not None else None,
                "min_upload_rank": self.min_upload_rank} | (
                    {"class_counts": list(self.class_counts)} if self.class_counts is not None else {})

    @classmethod
    def from_json(cls, doc: dict) -> "ClientPlan":
        """A plan from its JSON form; ValueError (one line) for anything missing or of the wrong type."""
        if not isinstance(doc, dict):
            raise ValueError(f"a plan must be a JSON object, got {str(doc)[:40]}")
        for key in ("round", "rank", "min_upload_rank"):
            if isinstance(doc.get(key), bool) or not isinstance(doc.get(key), int):
                raise ValueError(f"plan field {key!r} must be an integer, got {str(doc.get(key))[:40]}")
        indices, counts = _integers(doc, "indices"), _integers(doc, "class_counts")
        if counts is not None and min(counts, default=0) < 0:
            raise ValueError("plan field 'class_counts' must not be negative")
        return cls(round=doc["round"], rank=doc["rank"], mode=str(doc.get("mode")),
                   training=TrainingSettings.from_json(doc.get("training")),
                   indices=indices, min_upload_rank=doc["min_upload_rank"], class_counts=counts)


def _integers(doc: dict, key: str) -> tuple[int, ...] | None:
    """doc[key] as a tuple of integers (None when absent); ValueError when it is something else."""
    value = doc.get(key)
    if value is not None and not (isinstance(value, list)
                                  and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise ValueError(f"plan field {key!r} must be a list of integers, got {str(value)[:40]}")
    return tuple(value) if value is not None else None
