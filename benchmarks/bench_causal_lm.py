"""Does the causal-LM path train? A tiny random Llama as a language model of BANKING77 queries, LoRA only.

The model is built here, with no download: a byte-level BPE tokenizer (--vocab-size) trained on the
training texts, and a 2-layer LlamaForCausalLM of width --hidden with seeded random weights, saved to
--out. The BANKING77 training rows are split (seeded) into --held-out rows and the rest, each written
as a causal-lm data file (a `text` column: loss on every token) to --out/data and read back with
edge_client.data.load_examples. One local round of the torch backend trains LoRA factors of rank
--rank on the Llama's default targets (no dense tensors) from the server's initial global (fedavg's
init_global: B = 0, so it starts at the random base model). Reported before and after: the round's
training loss (RoundResult, on its fixed local evaluation rows) and the held-out token NLL and
perplexity (edge_client.evaluate.Evaluator).

    .venv/bin/python benchmarks/bench_causal_lm.py [--steps 60] [--lr 3e-3] [--vocab-size 800]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hetlora.demo_data import banking77  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="width of the Llama (intermediate 2x, 4 heads)")
    p.add_argument("--vocab-size", type=int, default=800,
                   help="vocabulary of the BPE tokenizer (a random model's perplexity starts just above it)")
    p.add_argument("--held-out", type=int, default=300, help="training rows kept out for the held-out NLL")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-causal-lm/model", help="folder of the built model (and data/)")
    args = p.parse_args()

    import torch

    from edge_client.data import load_examples
    from edge_client.evaluate import Evaluator
    from edge_client.models import derive_spec
    from edge_client.training import TorchTrainer
    from hetlora.protocol.settings import TrainingSettings
    from server_stub.aggregation import make_rule

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    train_path, held_out_path = write_data(out / "data", args.held_out, args.seed)
    train = load_examples(train_path, "causal-lm", None)
    held_out = load_examples(held_out_path, "causal-lm", None)
    vocab = build_model(out, train.responses, args.vocab_size, args.hidden, args.seed)
    trainer = TorchTrainer(out, "causal-lm")
    start = make_rule("fedavg").init_global(derive_spec(out, "causal-lm", trainer.targets), args.rank, args.seed)
    evaluator = Evaluator(out, "causal-lm", None)
    before = evaluator.evaluate(start, held_out, seq_len=args.seq_len, batch_size=128)
    settings = TrainingSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                schedule=args.schedule, seed=args.seed)
    result = trainer.train_round(start, train, settings, rank=args.rank)
    after = evaluator.evaluate(result.adapter, held_out, seq_len=args.seq_len, batch_size=128)
    print(f"Llama 2 layers, hidden {args.hidden}, random weights (seed {args.seed}), BPE vocab {vocab}; "
          f"LoRA rank {args.rank} on {','.join(trainer.targets)}; {args.steps} steps of batch {args.batch_size}, "
          f"lr {args.lr:g} ({args.schedule}), seq_len {args.seq_len}; {len(train)} training rows, "
          f"{len(held_out)} held out ({before['tokens']} target tokens); 1 thread")
    print("| | before | after |\n|---|---|---|")
    print(f"| training loss | {result.loss_before:.2f} | {result.loss_after:.2f} |")
    print(f"| held-out NLL | {before['nll']:.2f} | {after['nll']:.2f} |")
    print(f"| held-out perplexity | {before['perplexity']:.0f} | {after['perplexity']:.0f} |")
    print(f"training round {result.seconds:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0


def write_data(folder: Path, held_out: int, seed: int) -> tuple[Path, Path]:
    """The BANKING77 training texts as causal-lm files (column `text`): the rest, and `held_out` seeded rows."""
    import numpy as np

    from edge_client.data import read_rows

    _, rows = read_rows(banking77("train.csv", "--data"))
    texts = [row["text"] for row in rows]
    held = set(np.random.default_rng(seed).permutation(len(texts))[:held_out].tolist())
    parts = {"train.csv": [t for i, t in enumerate(texts) if i not in held],
             "held_out.csv": [t for i, t in enumerate(texts) if i in held]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(folder / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([["text"]] + [[text] for text in part])
    return folder / "train.csv", folder / "held_out.csv"


def build_model(out: Path, texts, vocab_size: int, hidden: int, seed: int) -> int:
    """A BPE tokenizer trained on `texts` and a seeded random 2-layer Llama saved to `out`; the vocabulary size."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return len(tokenizer)


if __name__ == "__main__":
    sys.exit(main())
