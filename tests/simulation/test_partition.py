"""Dirichlet and IID partitioning, and the `hetlora partition` command on real files."""

import json

import numpy as np
import pytest

from edge_client.partition import dirichlet_partition, entropy_bits, iid_partition
from hetlora.cli import main
from hetlora.errors import UserError

LABELS = np.repeat(np.arange(10), 100)  # 10 balanced classes, 1000 rows


def mean_entropy(parts):
    return np.mean([entropy_bits(np.bincount(LABELS[p], minlength=10)) for p in parts])


def test_same_seed_same_split_and_every_row_used_once():
    a = dirichlet_partition(LABELS, 8, 0.3, seed=5, min_per_client=20)
    b = dirichlet_partition(LABELS, 8, 0.3, seed=5, min_per_client=20)
    c = dirichlet_partition(LABELS, 8, 0.3, seed=6, min_per_client=20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert sorted(np.concatenate(a).tolist()) == list(range(len(LABELS)))


def test_small_alpha_skews_labels_and_large_alpha_is_near_uniform():
    skewed = dirichlet_partition(LABELS, 8, 0.05, seed=0, min_per_client=5)
    uniform = dirichlet_partition(LABELS, 8, 1000.0, seed=0, min_per_client=5)
    assert mean_entropy(skewed) < 2.0 < np.log2(10) - 0.05 < mean_entropy(uniform)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 10.0])
def test_every_client_gets_the_minimum(alpha):
    parts = dirichlet_partition(LABELS, 20, alpha, seed=1, min_per_client=40)
    assert min(len(p) for p in parts) >= 40


def test_impossible_minimum_and_bad_alpha_are_user_errors():
    with pytest.raises(UserError, match="needs 1100 rows"):
        dirichlet_partition(LABELS, 11, 0.5, seed=0, min_per_client=100)
    with pytest.raises(UserError, match="alpha"):
        dirichlet_partition(LABELS, 2, 0.0, seed=0)


def test_iid_split_is_balanced():
    parts = iid_partition(1001, 4, seed=0)
    assert sorted(len(p) for p in parts) == [250, 250, 250, 251]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1001))


def test_entropy_closed_form():
    assert entropy_bits([5, 5, 5, 5]) == pytest.approx(2.0)
    assert entropy_bits([7, 0]) == 0.0


def test_cli_writes_client_files_and_summary(tmp_path, capsys):
    rows = ["text,category"] + [f"query {i},label{i % 4}" for i in range(200)]
    data = tmp_path / "train.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "parts"
    assert main(["partition", "--data", str(data), "--clients", "3", "--alpha", "0.5", "--seed", "2",
                 "--out", str(out), "--min-per-client", "30", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "partition.json").read_text())
    written = [(out / c["file"]).read_text().splitlines() for c in summary["clients"]]
    assert all(lines[0] == "text,category" and len(lines) - 1 == c["n"] >= 30
               for lines, c in zip(written, summary["clients"]))
    assert sorted(line for lines in written for line in lines[1:]) == sorted(rows[1:])
    assert main(["partition", "--data", str(tmp_path / "nope.csv"), "--clients", "3", "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_splits_causal_lm_data_iid(tmp_path, capsys):
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(10)))
    assert main(["partition", "--data", str(data), "--clients", "2", "--task", "causal-lm", "--out",
                 str(tmp_path / "o"), "--min-per-client", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "iid" and [c["n"] for c in summary["clients"]] == [5, 5]
    assert (tmp_path / "o" / "client_001.jsonl").read_text().count("\n") == 5
