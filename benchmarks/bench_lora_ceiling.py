"""How much can LoRA add beyond the best head on this base model and data, with no federation at all?

Centralized, on the pooled training rows of the demo's fleet: the head is set as the centralized
baseline sets it (round 0's closed-form head from the pooled class statistics, then fitted on the pooled
frozen features for head_rounds x head_epochs epochs), then LoRA trains on the pooled rows in chunks of
--chunk-steps steps, evaluated on the held-out validation rows after each chunk. Chunk c of C (c = 0
first) runs at a constant learning rate, with --lr-decay cosine lr * (1 + cos(pi (c + 1/2) / C)) / 2
(the cosine at the chunk's middle). If no setting lifts the validation accuracy clearly above the
head's, no federated rule can be expected to beat a linear probe on the frozen features either: the
base model's features are what limits the task.

    .venv/bin/python benchmarks/bench_lora_ceiling.py --lr 5e-4 --head-lr 2e-4
    .venv/bin/python benchmarks/bench_lora_ceiling.py --lr 5e-4 --head-lr 2e-4 --lr-decay cosine --dropout
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetlora.demo_data import banking77  # noqa: E402
from hetlora.protocol.settings import LR_DECAYS  # noqa: E402
from simulation.centralized import fitted_head  # noqa: E402
from simulation.demo import DEMO_TRAINING, DemoConfig  # noqa: E402
from simulation.fleets import prepare_fleet  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the LoRA factors")
    p.add_argument("--head-lr", type=float, default=2e-4)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-steps", type=int, default=250, help="steps of batch 16 per chunk")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr-decay", choices=LR_DECAYS, default="none")
    p.add_argument("--dropout", action="store_true", help="the base model's own dropout while training")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-lora-ceiling")
    args = p.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command

    import torch

    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.bundled import default_model_dir
    from edge_client.training import TorchTrainer
    from hetlora.protocol.head_stats import class_statistics
    from hetlora.engine.aggregation import make_rule
    from hetlora.engine.head_round import initial_global

    torch.set_num_threads(1)
    cfg = DemoConfig(model_dir=str(args.model or default_model_dir()), data=str(banking77("train.csv", "--data")),
                     test=str(banking77("test.csv", "--test")), labels=str(banking77("categories.json", "--labels")),
                     out=Path(args.out), validation_fraction=args.validation_fraction, seed=args.seed)
    fleet = prepare_fleet(cfg)
    trainer = TorchTrainer(cfg.model_dir, "classification", labels=fleet.labels)
    features, targets = trainer.frozen_features(fleet.pooled, cfg.training.seq_len)
    stats = class_statistics(features, targets, len(fleet.labels))
    spec = derive_spec(cfg.model_dir, "classification", num_labels=len(fleet.labels))
    adapter, _ = initial_global(make_rule("fedavg"), spec, [stats], head_init="lda", global_rank=args.rank, seed=0)
    adapter = fitted_head(adapter, spec, features, targets, stats.class_counts, cfg)
    head = fleet.evaluate(adapter)["accuracy"]
    settings = replace(DEMO_TRAINING, steps=args.chunk_steps, lr=args.lr, head_lr=args.head_lr, schedule="constant",
                       warmup_steps=0, prune_lambda=0.0, dropout=args.dropout)
    print(f"| steps | lr | validation accuracy | vs the head ({head:.3f}) |\n|---|---|---|---|")
    t0 = time.monotonic()
    for chunk in range(args.chunks):
        chunk_settings = replace(settings, seed=chunk).decayed(args.lr_decay, chunk + 0.5, args.chunks)
        adapter = trainer.train_round(adapter, fleet.pooled, chunk_settings, rank=args.rank).adapter
        accuracy = fleet.evaluate(adapter)["accuracy"]
        print(f"| {(chunk + 1) * args.chunk_steps} | {chunk_settings.lr:.2e} | {accuracy:.3f} "
              f"| {100 * (accuracy - head):+.1f} pt |", flush=True)
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
