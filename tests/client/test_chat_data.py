"""Chat rows: the chat template's pieces, response-only targets, truncation, bad input, the split by user."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edge_client.chat_format import ChatFormat
from edge_client.chat_split import split_by_user
from edge_client.data import encode, load_examples
from edge_client.objective import IGNORE, loss_sum_and_count, model_loss_sum_and_count
from hetlora.errors import UserError
from hetlora.models.task_model import load_tokenizer
from tests.helpers import chat_rows, write_jsonl


def test_a_chat_row_is_the_templates_own_tokens_with_targets_on_the_reply(tiny_llama_dir, tmp_path):
    tok = load_tokenizer(tiny_llama_dir)
    prompt, reply = "hey, how was the game?", "we lost 2-1 but it was fun"
    examples = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "response": reply, "user": "u"}]),
                             "causal-lm")
    enc = encode(examples, tok, 128)
    n = int(enc.lengths[0])
    # Independent reference: the tokenizer's chat template rendered whole, and rendered up to the reply.
    whole = tok(tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                        tokenize=False), add_special_tokens=False)["input_ids"]
    context = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0, :n].tolist() == whole[:n]
    assert whole[n - 1] == tok.eos_token_id and tok.decode(whole[n:]).strip() == ""  # only the newline after it
    targets = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.labels[0, :n].tolist() == [IGNORE] * len(context) + targets
    assert (enc.labels[0, n:] == IGNORE).all() and enc.attention_mask[0].sum() == n


def test_long_rows_keep_the_end_of_the_prompt_and_are_counted(tiny_llama_dir, tmp_path, caplog):
    tok = load_tokenizer(tiny_llama_dir)
    chat = ChatFormat.of(tok)
    prompt, reply = list(range(1000, 1100)), list(range(2000, 2010))
    ids, labels, cut = chat.row(prompt, reply, 64)
    room = 64 - chat.overhead
    assert cut and len(ids) == 64
    assert ids == list(chat.head) + prompt[-(room - 10):] + list(chat.middle) + reply + list(chat.end)
    # A reply longer than the room is cut on the right and loses its end-of-turn target.
    ids, labels, cut = chat.row(prompt[:5], list(range(3000, 3200)), 64)
    kept = [t for t in labels if t != IGNORE]
    assert cut and kept == list(range(3000, 3000 + room + len(chat.end) - 5)) and len(ids) == 64
    # The prompt keeps at least a quarter of the room beside a long reply.
    ids, _, _ = chat.row(prompt, list(range(3000, 3200)), 64)
    assert ids[len(chat.head):len(chat.head) + room // 4] == prompt[-(room // 4):]
    rows = [{"prompt": "word " * 80, "response": "ok"}, {"prompt": "hi", "response": "hello"}]
    with caplog.at_level(logging.INFO, logger="hetlora.data"):
        encode(load_examples(write_jsonl(tmp_path / "l.jsonl", rows), "causal-lm"), tok, 48)
    assert "1 of 2 rows are longer than --seq-len 48 and were truncated" in caplog.text
    with pytest.raises(UserError, match="no room for a message"):
        chat.row([1], [2], chat.overhead + 1)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "response": "  "}\n', r"row 1 has an empty 'response'"),
    ('{"question": "a", "answer": "b"}\n', "neither prompt and response columns"),
])
def test_bad_chat_files_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_examples(path, "causal-lm")


def test_non_utf8_text_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,response\ncafé,très bien\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_examples(path, "causal-lm")


@pytest.mark.slow
def test_the_loss_on_shifted_hidden_states_equals_the_full_logits_loss(tiny_llama_dir, tmp_path):
    from hetlora.models.task_model import load_task_model

    tok = load_tokenizer(tiny_llama_dir)
    rows = [{"prompt": f"message {i}", "response": "reply " * (i + 1)} for i in range(4)]
    enc = encode(load_examples(write_jsonl(tmp_path / "c.jsonl", rows), "causal-lm"), tok, 48)
    model = load_task_model(tiny_llama_dir, "causal-lm").eval()
    batch = {k: torch.from_numpy(v) for k, v in
             (("input_ids", enc.input_ids), ("attention_mask", enc.attention_mask), ("labels", enc.labels))}
    with torch.no_grad():
        got = model_loss_sum_and_count(model, batch, "causal-lm")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = loss_sum_and_count(logits, batch["labels"], "causal-lm")
        # and a hand-built reference: -log p(label[t+1] | logits[t]) summed over the targets
        logp = F.log_softmax(logits, -1)
        hand = -sum(logp[b, t - 1, enc.labels[b, t]] for b in range(4) for t in range(1, 48)
                    if enc.labels[b, t] != IGNORE)
        exported = model_loss_sum_and_count(model, batch, "causal-lm", static_shapes=True)  # every position
    for value in (got, exported):
        torch.testing.assert_close(value[0], expected[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(value[0], hand, rtol=1e-5, atol=1e-4)
        assert int(value[1]) == int(expected[1]) == int((enc.labels[:, 1:] != IGNORE).sum())


def test_split_by_user_keeps_devices_and_test_sets_apart():
    rows = chat_rows()
    split = split_by_user(rows, 3, users_per_client=2, min_replies=10, heldout_fraction=0.2, test_rows=1000, seed=4)
    training_users = {u for group in split.users for u in group}
    assert len(training_users) == 6 and all(len(g) == 2 for g in split.users)
    trained_convs = {r["conversation"] for part in split.clients for r in part}
    for part, group in zip(split.clients, split.users):
        assert part and {r["user"] for r in part} <= set(group)  # a device holds only its own people's replies
    personal_convs = {r["conversation"] for r in split.personal}
    assert split.personal and not personal_convs & trained_convs  # held out whole
    assert {r["user"] for r in split.personal} <= training_users
    # Unseen: no training user replies anywhere in those conversations.
    touched = {r["conversation"] for r in rows if r["user"] in training_users}
    assert split.unseen and not {r["conversation"] for r in split.unseen} & touched
    assert split.validation and not {r["conversation"] for r in split.validation} & touched
    assert not {r["conversation"] for r in split.validation} & {r["conversation"] for r in split.unseen}
    again = split_by_user(rows, 3, users_per_client=2, min_replies=10, heldout_fraction=0.2, test_rows=1000, seed=4)
    assert again == split  # seeded


def test_split_by_user_errors_say_what_to_change():
    with pytest.raises(UserError, match="need 50 users with at least 10 replies; the data has 12"):
        split_by_user(chat_rows(), 50, min_replies=10)
    with pytest.raises(UserError, match="non-empty 'user'"):
        split_by_user([{"prompt": "a", "response": "b"}], 1, min_replies=1)


@pytest.mark.slow
def test_the_bundled_corpus_reads_into_reply_rows():
    from hetlora.chitchat import chitchat_rows

    rows = chitchat_rows()
    assert len(rows) == 131_558 and set(rows[0]) == {"prompt", "response", "user", "conversation"}
    assert all(r["response"].strip() for r in rows)
    assert len({r["user"] for r in rows}) > 1000
    counts = np.bincount(np.unique([r["user"] for r in rows], return_inverse=True)[1])
    assert (counts >= 100).sum() > 150  # enough people with a real history to be devices


def test_chat_rows_without_users_are_split_iid_and_scored_on_the_given_test_file(tiny_llama_dir, tmp_path):
    from simulation.demo import CHAT_TRAINING, DemoConfig
    from simulation.fleets import prepare_fleet

    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "plain.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:6])
    cfg = DemoConfig(model_dir=str(tiny_llama_dir), data=str(data), test=None, labels=None, out=tmp_path / "run",
                     task="chat", clients=3, clients_per_round=2, training=CHAT_TRAINING)
    with pytest.raises(UserError, match="need a test file"):
        prepare_fleet(cfg)
    fleet = prepare_fleet(DemoConfig(**{**cfg.__dict__, "test": str(test)}))
    sizes = [len(p.read_text().splitlines()) for p in fleet.parts]
    assert sorted(sizes) == [13, 13, 14] and len(fleet.pooled) == 40
    from hetlora.protocol.wire import Adapter

    metrics = fleet.evaluate(Adapter(lora={}, dense={}, meta={}))
    assert set(metrics) == {"perplexity"} and metrics["perplexity"] > 1
