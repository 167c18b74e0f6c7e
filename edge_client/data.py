"""Local data: read CSV/JSONL rows, map labels, tokenize to fixed length, cut seeded batches.

Row formats (CSV with a header line, or JSONL; UTF-8):
  classification  `text,label` (column names overridable; `label` falls back to `category`)
  causal-lm       `prompt,response` (chat rows, optional `user`): one exchange through the tokenizer's chat
                  template, the loss on the response only (edge_client.chat_format); or `text` (loss on
                  every token). Rows longer than `seq_len` are truncated and counted in the log.
Tokenized examples are padded to `seq_len` so fixed-shape exported backends use the same batches.
A batch is a dict of int64 tensors: `input_ids` (B, T), `attention_mask` (B, T) and `labels`,
(B,) class ids for classification, (B, T) token ids aligned with `input_ids` for causal-lm (the
loss shifts them; see edge_client.objective). IGNORE (-100) marks positions without a target.
A last partial batch is filled up to `batch_size` with copies of its first row whose labels are
all IGNORE, so every batch has the same shape and filler rows add nothing to the loss.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.chat_format import ChatFormat
from edge_client.objective import IGNORE
from hetlora.errors import UserError

log = logging.getLogger("hetlora.data")
LABEL_COLUMN_FALLBACKS = ("label", "category")
GROUP_BATCHES = 8  # batches per length-sorted megabatch (make_batches(group_by_length=True))


@dataclass(frozen=True)
class Examples:
    """Raw examples of one task.

    classification: `texts` and `label_ids` (indices into the label list).
    causal-lm: `texts` are prompts ("" for plain text rows) and `responses` carry the loss; `chat` rows
    (prompt, response) go through the tokenizer's chat template.
    """

    task: str
    texts: tuple[str, ...]
    label_ids: tuple[int, ...] = ()
    responses: tuple[str, ...] = ()
    chat: bool = False

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "Examples":
        pick = [int(i) for i in indices]
        return Examples(self.task, tuple(self.texts[i] for i in pick),
                        tuple(self.label_ids[i] for i in pick) if self.label_ids else (),
                        tuple(self.responses[i] for i in pick) if self.responses else (), self.chat)


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples, int64 numpy arrays padded to T = seq_len; `lengths` are the real token counts."""

    task: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def read_rows(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """Columns and rows of a CSV (header line) or JSONL (one JSON object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
            rows = _read_jsonl(path)
            columns = list(dict.fromkeys(k for row in rows for k in row))
        else:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = list(reader.fieldnames or [])
                rows = [row for row in reader]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    if not rows:
        raise UserError(f"data file {path} has no rows")
    return columns, rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} must be a JSON object like {{\"text\": ..., \"label\": ...}}")
            rows.append(row)
    return rows


def label_column_of(columns: list[str], label_column: str | None, path) -> str:
    """The label column: the one asked for, else the first of LABEL_COLUMN_FALLBACKS present."""
    candidates = [label_column] if label_column else list(LABEL_COLUMN_FALLBACKS)
    for name in candidates:
        if name in columns:
            return name
    raise UserError(f"{path} has no label column {' or '.join(map(repr, candidates))} (columns: {columns}); "
                    "pass --label-column NAME")


def _require_column(columns: list[str], name: str, path, flag: str) -> None:
    if name not in columns:
        raise UserError(f"{path} has no column {name!r} (columns: {columns}); pass {flag} NAME")


def load_examples(path, task: str, labels: list[str] | None = None, *, text_column: str = "text",
                  label_column: str | None = None) -> Examples:
    """Read a data file into Examples; classification labels map through `labels` (the server's list)."""
    columns, rows = read_rows(path)
    if task == "classification":
        if not labels:
            raise UserError("classification needs the label list (from the server, or --labels FILE)")
        _require_column(columns, text_column, path, "--text-column")
        column = label_column_of(columns, label_column, path)
        index = {str(label): i for i, label in enumerate(labels)}
        label_ids = []
        for number, row in enumerate(rows, start=1):
            value = str(row.get(column))
            if value not in index:
                raise UserError(f"{path} row {number}: label {value!r} is not in the label list "
                                f"({len(labels)} labels, e.g. {labels[:3]}); check --labels and --label-column")
            label_ids.append(index[value])
        return Examples(task, tuple(_text(row, text_column, path, n) for n, row in enumerate(rows, 1)),
                        tuple(label_ids))
    if task == "causal-lm":
        if "prompt" in columns and "response" in columns:
            return Examples(task, tuple(_text(row, "prompt", path, n) for n, row in enumerate(rows, 1)),
                            responses=_targets(rows, "response", path), chat=True)
        if text_column not in columns:
            raise UserError(f"{path} has neither prompt and response columns (chat rows) nor a {text_column!r} "
                            f"column (columns: {columns}); pass --text-column NAME")
        return Examples(task, ("",) * len(rows), responses=_targets(rows, text_column, path))
    raise UserError(f"unknown task {task!r}; choose classification or causal-lm")


def _targets(rows: list[dict], column: str, path) -> tuple[str, ...]:
    """The texts the loss covers; an empty one is an error (a row that teaches nothing is a data mistake)."""
    texts = tuple(_text(row, column, path, n) for n, row in enumerate(rows, 1))
    empty = [n for n, t in enumerate(texts, 1) if not t.strip()]
    if empty:
        raise UserError(f"{path} row {empty[0]} has an empty {column!r}" + (f" ({len(empty)} rows do)" if len(empty) > 1
                        else "") + "; remove those rows")
    return texts


def _text(row: dict, column: str, path, number: int) -> str:
    value = row.get(column)
    if value is None:
        raise UserError(f"{path} row {number} has no {column!r} value")
    return str(value)


def encode(examples: Examples, tokenizer, seq_len: int) -> Encoded:
    """Tokenize and pad every example to `seq_len` (truncating longer ones on the right)."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    if examples.task == "classification":
        enc = tokenizer(list(examples.texts), truncation=True, max_length=seq_len, padding="max_length")
        ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(examples), seq_len)
        mask = np.asarray(enc["attention_mask"], dtype=np.int64).reshape(len(examples), seq_len)
        labels = np.asarray(examples.label_ids, dtype=np.int64)
        return Encoded(examples.task, ids, mask, labels, mask.sum(axis=1))
    chat = ChatFormat.of(tokenizer) if examples.chat else None
    rows = [_chat_row(tokenizer, chat, p, r, seq_len) if chat else _causal_row(tokenizer, p, r, seq_len)
            for p, r in zip(examples.texts, examples.responses)]
    truncated = sum(cut for _, _, cut in rows)
    if truncated:
        log.info("%d of %d rows are longer than --seq-len %d and were truncated", truncated, len(rows), seq_len)
    ids = np.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, (row_ids, row_labels, _) in enumerate(rows):
        ids[i, : len(row_ids)] = row_ids
        labels[i, : len(row_ids)] = row_labels
        mask[i, : len(row_ids)] = 1
    return Encoded(examples.task, ids, mask, labels, mask.sum(axis=1))


def _chat_row(tokenizer, chat: ChatFormat, prompt: str, response: str, seq_len: int):
    tokens = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return chat.row(tokens(prompt), tokens(response), seq_len)


def _causal_row(tokenizer, prompt: str, response: str, seq_len: int) -> tuple[list[int], list[int], bool]:
    """[bos] prompt response [eos], cut on the right; labels IGNORE on bos and prompt, ids on response and eos."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head += tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    tail = tokenizer(response, add_special_tokens=False)["input_ids"]
    tail += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (head + tail)[:seq_len]
    labels = ([IGNORE] * len(head) + tail)[:seq_len]
    return ids, labels, len(head) + len(tail) > seq_len


class EncodingCache:
    """`encode` that remembers its last few results: a client trains on the same data every round, an
    evaluator scores the same test sets every round."""

    def __init__(self, tokenizer, size: int = 4):
        self.tokenizer = tokenizer
        self.size = size
        self._results: dict[tuple, Encoded] = {}

    def __call__(self, examples: Examples, seq_len: int) -> Encoded:
        key = (examples, seq_len)
        if key not in self._results:
            if len(self._results) >= self.size:
                self._results.pop(next(iter(self._results)))
            self._results[key] = encode(examples, self.tokenizer, seq_len)
        return self._results[key]


def make_batches(encoded: Encoded, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True,
                 group_by_length: bool = False) -> list[dict]:
    """One epoch of batches: rows permuted by rng([seed, epoch]), cut into `batch_size`, last one filled.

    `group_by_length`: the permutation is cut into megabatches of GROUP_BATCHES batches, each sorted by
    row length before it is cut, and the batches are then shuffled by the same rng: every row still
    comes once per epoch, but a batch holds rows of similar length, so trimming it saves padding."""
    import torch

    n = len(encoded)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length:
        mega = batch_size * GROUP_BATCHES
        order = np.concatenate([chunk[np.argsort(-encoded.lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(mega, n, mega))])
    starts = list(range(0, n, batch_size))
    if group_by_length and shuffle:
        starts = [starts[i] for i in rng.permutation(len(starts))]
    batches = []
    for start in starts:
        rows = order[start : start + batch_size]
        fill = batch_size - len(rows)
        take = np.concatenate([rows, np.full(fill, rows[0])])
        labels = encoded.labels[take].copy()
        if fill:
            labels[len(rows):] = IGNORE
        batches.append({"input_ids": torch.from_numpy(encoded.input_ids[take]),
                        "attention_mask": torch.from_numpy(encoded.attention_mask[take]),
                        "labels": torch.from_numpy(labels)})
    return batches


def training_batches(encoded: Encoded, batch_size: int, *, seed: int, steps: int | None = None,
                     epochs: int | None = None, trim: bool = False) -> Iterator[dict]:
    """`steps` batches (cycling through seeded epochs), or else `epochs` full epochs (default 1).

    `trim`: length-grouped batches (make_batches) cut to their longest row (`trim_batch`); otherwise
    uniformly shuffled batches, every one seq_len wide (the fixed shapes of exported artifacts)."""
    if len(encoded) == 0:
        raise UserError("no training examples")
    batches = _seeded_batches(encoded, batch_size, seed, steps, epochs, trim)
    yield from (trim_batch(b) for b in batches) if trim else batches


def _seeded_batches(encoded: Encoded, batch_size: int, seed: int, steps: int | None,
                    epochs: int | None, group: bool) -> Iterator[dict]:
    if steps is not None:
        produced, epoch = 0, 0
        while produced < steps:
            for batch in make_batches(encoded, batch_size, seed=seed, epoch=epoch, group_by_length=group):
                if produced == steps:
                    return
                produced += 1
                yield batch
            epoch += 1
        return
    for epoch in range(epochs or 1):
        yield from make_batches(encoded, batch_size, seed=seed, epoch=epoch, group_by_length=group)


def trim_batch(batch: dict) -> dict:
    """The batch without its trailing all-padding columns (at least 2 are kept). Padding is masked, so
    the loss is the full-width batch's up to float rounding; only less work (none for left padding)."""
    used = batch["attention_mask"].any(dim=0).nonzero()
    width = max(int(used.max()) + 1 if len(used) else 0, 2)
    labels = batch["labels"]
    return {"input_ids": batch["input_ids"][:, :width], "attention_mask": batch["attention_mask"][:, :width],
            "labels": labels[:, :width] if labels.dim() == 2 else labels}


def trimmed_batches(encoded: Encoded, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
    """Evaluation batches in length order, each trimmed to its longest row: (row indices, batch).

    No filler rows; padding columns are masked, so results match the fixed-length batches.
    """
    import torch

    order = np.argsort(encoded.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(int(encoded.lengths[rows].max()), 2)
        batch = {"input_ids": torch.from_numpy(encoded.input_ids[rows, :width]),
                 "attention_mask": torch.from_numpy(encoded.attention_mask[rows, :width])}
        labels = encoded.labels[rows]
        batch["labels"] = torch.from_numpy(labels[:, :width] if labels.ndim == 2 else labels)
        yield rows, batch
