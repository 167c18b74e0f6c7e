"""Real (non-pad) tokens per second of the torch backend's local training: uniformly shuffled
full-width batches vs length-grouped batches trimmed to their longest row (TrainingSettings.trim_padding),
same seeds, one process,
rounds interleaved (ratio = median of same-round ratios; the machine is shared and noisy).

    .venv/bin/python benchmarks/bench_padding.py [--seq-len 32] [--steps 20] [--repeats 3] [--rank 16]

Default: all-MiniLM-L6-v2 on BANKING77 training rows, batch 16, one thread (as the demo's clients).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command

    import torch

    from edge_client.data import load_examples
    from hetlora.labels import read_labels
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.bundled import default_model_dir
    from hetlora.protocol.settings import TrainingSettings
    from edge_client.training import TorchTrainer
    from hetlora.engine.aggregation import make_rule

    torch.set_num_threads(args.threads)
    data = REPO / "hetlora" / "data" / "banking77"
    labels = read_labels(data / "categories.json")
    examples = load_examples(data / "train.csv", "classification", labels)
    model_dir = default_model_dir()
    trainer = TorchTrainer(model_dir, "classification", labels=labels)
    start = make_rule("hetlora").init_global(derive_spec(model_dir, "classification", num_labels=len(labels)),
                                             args.rank, 0)
    encoded = trainer.encode(examples, args.seq_len)
    base = TrainingSettings(steps=args.steps, batch_size=16, seq_len=args.seq_len, lr=1e-3)
    seconds = {True: [], False: []}
    tokens, cells = {}, {}
    for repeat in range(args.repeats):
        for trim in (False, True):
            cfg = replace(base, trim_padding=trim, seed=repeat)
            t0 = time.perf_counter()
            trainer.train_round(start, examples, cfg, rank=args.rank)
            seconds[trim].append(time.perf_counter() - t0)
            tokens[(repeat, trim)], cells[(repeat, trim)] = _token_counts(encoded, cfg)
    print(f"MiniLM-L6, rank {args.rank}, batch 16, seq_len {args.seq_len}, {args.steps} steps, {args.threads} thread(s); "
          f"rows average {encoded.lengths.mean():.1f} tokens")
    print(f"{'batches':<17} {'s/round':>9} {'real tokens/s':>14} {'pad share':>10}")
    for trim in (False, True):
        rate = statistics.median(tokens[(r, trim)] / s for r, s in enumerate(seconds[trim]))
        pad = 1 - statistics.median(tokens[(r, trim)] / cells[(r, trim)] for r in range(args.repeats))
        print(f"{'grouped, trimmed' if trim else 'full width':<17} {statistics.median(seconds[trim]):>9.2f} "
              f"{rate:>14.0f} {pad:>10.0%}")
    ratio = statistics.median(f / t for f, t in zip(seconds[False], seconds[True]))
    print(f"speed-up (median of same-round ratios): {ratio:.2f}x")
    return 0


def _token_counts(encoded, cfg) -> tuple[int, int]:
    """(non-pad tokens, token cells computed) of the round's training batches."""
    from edge_client.data import training_batches

    batches = list(training_batches(encoded, cfg.batch_size, seed=cfg.seed, steps=cfg.steps, trim=cfg.trim_padding))
    return sum(int(b["attention_mask"].sum()) for b in batches), sum(b["attention_mask"].numel() for b in batches)


if __name__ == "__main__":
    sys.exit(main())
