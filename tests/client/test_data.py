"""Data loading, tokenization, batching, the shared loss, and evaluation metrics."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edge_client.data import Examples, encode, load_examples, make_batches, training_batches, trimmed_batches
from edge_client.evaluate import macro_f1
from edge_client.objective import IGNORE, batch_loss
from hetlora.errors import UserError
from hetlora.labels import read_labels
from hetlora.models.task_model import load_tokenizer

LABELS = ["card", "rate"]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_and_jsonl_give_the_same_examples(tmp_path):
    csv_file = write(tmp_path / "d.csv", 'text,label\n"hello, card",card\nwhat rate,rate\n')
    jsonl_file = write(tmp_path / "d.jsonl", '{"text": "hello, card", "label": "card"}\n\n{"text": "what rate", "label": "rate"}\n')
    assert load_examples(csv_file, "classification", LABELS) == load_examples(jsonl_file, "classification", LABELS)
    assert load_examples(csv_file, "classification", LABELS).label_ids == (0, 1)


def test_label_column_falls_back_to_category_and_can_be_named(tmp_path):
    path = write(tmp_path / "b.csv", "utterance,category,intent\nhi,rate,card\n")
    assert load_examples(path, "classification", LABELS, text_column="utterance").label_ids == (1,)
    assert load_examples(path, "classification", LABELS, text_column="utterance", label_column="intent").label_ids == (0,)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "no rows"),
    ("text,label\n", "no rows"),
    ("words,label\nhi,card\n", "no column 'text'"),
    ("text,other\nhi,card\n", "no label column"),
    ("text,label\nhi,card\nyo,crd\n", "row 2: label 'crd' is not in the label list"),
])
def test_bad_classification_files_give_user_errors(tmp_path, content, message):
    path = tmp_path / "d.csv"
    if content is not None:
        write(path, content)
    with pytest.raises(UserError, match=message):
        load_examples(path, "classification", LABELS)


def test_bad_jsonl_line_and_missing_labels(tmp_path):
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_examples(write(tmp_path / "d.jsonl", '{"text": "a", "label": "card"}\n{oops\n'), "classification", LABELS)
    with pytest.raises(UserError, match="label list"):
        load_examples(write(tmp_path / "e.csv", "text,label\na,card\n"), "classification", None)
    with pytest.raises(UserError, match="neither prompt and response columns .* nor a 'text' column"):
        load_examples(write(tmp_path / "f.csv", "body\na\n"), "causal-lm")


def test_label_files_json_or_lines(tmp_path):
    assert read_labels(write(tmp_path / "l.json", json.dumps(["a", "b"]))) == ("a", "b")
    assert read_labels(write(tmp_path / "l.txt", "a\n\nb\n")) == ("a", "b")
    with pytest.raises(UserError, match="twice"):
        read_labels(write(tmp_path / "d.txt", "a\na\n"))
    with pytest.raises(UserError, match="must be a string"):
        read_labels(write(tmp_path / "n.json", "[1, 2]"))
    with pytest.raises(UserError, match="has 1 labels; classification needs at least 2"):
        read_labels(write(tmp_path / "one.txt", "a\n"))
    with pytest.raises(UserError, match="cannot read the label file"):
        read_labels(tmp_path / "missing.json")


def test_causal_loss_equals_a_hand_built_response_only_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE, IGNORE], [IGNORE, 7, 1, 2, 9, IGNORE]])
    logp = F.log_softmax(logits, -1)
    # position t predicts labels[t + 1]; only response tokens count
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 6) if labels[b, t] != IGNORE]
    torch.testing.assert_close(batch_loss(logits, labels, "causal-lm"), torch.stack(terms).mean())


def test_classification_loss_ignores_filler_rows():
    logits = torch.randn(3, 4)
    labels = torch.tensor([2, 0, IGNORE])
    torch.testing.assert_close(batch_loss(logits, labels, "classification"), F.cross_entropy(logits[:2], labels[:2]))


def test_plain_text_rows_train_on_every_token(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    enc = encode(Examples("causal-lm", ("",), responses=("the quick brown fox",)), tok, 32)
    real = enc.labels[0][enc.attention_mask[0] == 1]
    assert real[0] == IGNORE and (real[1:] != IGNORE).all()  # only the bos has no target


def classification_encoded(tiny_bert_dir, n=10, seq_len=12):
    tok = load_tokenizer(tiny_bert_dir)
    texts = tuple(f"sample number {i} " + "word " * i for i in range(n))
    return encode(Examples("classification", texts, tuple(i % 2 for i in range(n))), tok, seq_len)


def test_batches_are_seeded_fixed_shape_and_filled_with_ignored_rows(tiny_bert_dir):
    enc = classification_encoded(tiny_bert_dir)
    batches = make_batches(enc, 4, seed=1)
    again = make_batches(enc, 4, seed=1)
    other = make_batches(enc, 4, seed=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    assert [b["input_ids"].shape for b in batches] == [(4, 12)] * 3
    assert all(t.dtype == torch.int64 for b in batches for t in b.values())
    assert batches[-1]["labels"][2:].tolist() == [IGNORE, IGNORE]
    seen = torch.cat([b["labels"] for b in batches])
    assert sorted(seen[seen != IGNORE].tolist()) == sorted(enc.labels.tolist())


def test_training_batches_count_steps_and_epochs(tiny_bert_dir):
    enc = classification_encoded(tiny_bert_dir)
    assert len(list(training_batches(enc, 4, seed=0, steps=7))) == 7
    assert len(list(training_batches(enc, 4, seed=0, epochs=2))) == 6


def test_trimmed_batches_cover_every_row_once(tiny_bert_dir):
    enc = classification_encoded(tiny_bert_dir)
    rows = np.concatenate([r for r, _ in trimmed_batches(enc, 3)])
    assert sorted(rows.tolist()) == list(range(len(enc)))


def test_macro_f1_hand_computed():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    # class 0: tp 2 fp 0 fn 1 -> 4/5; class 1: tp 1 fp 1 fn 1 -> 2/4; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(y_true, y_pred) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert macro_f1(np.array([1, 1]), np.array([1, 1])) == 1.0
