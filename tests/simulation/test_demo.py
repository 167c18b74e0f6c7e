"""`hetlora demo` end to end on a tiny model: processes, table, results.json, PNG, final adapters,
and reproducibility: the same seed gives the same run, another seed another one."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hetlora.protocol.wire import decode
from hetlora.engine.upload_checks import update_digest
from tests.helpers.fleet import LABELS, write_data

pytestmark = pytest.mark.integration  # real processes end to end (conftest: also slow)


def run_demo(model_dir, tmp_path, out_name, seed=0):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS))
    train = write_data(tmp_path / "train.csv", 60)
    test = write_data(tmp_path / "test.csv", 15, offset=1)
    out = tmp_path / out_name
    proc = subprocess.run(
        [sys.executable, "-m", "hetlora.cli", "demo", "--task", "classification", "--model", str(model_dir), "--data", str(train),
         "--test", str(test), "--labels", str(labels), "--clients", "3", "--clients-per-round", "2", "--rounds", "2",
         "--head-rounds", "2", "--local-steps", "2", "--batch-size", "4", "--seq-len", "16", "--ranks", "2,4", "--out", str(out),
         "--lr", "1e-3", "--lr-decay", "cosine", "--seed", str(seed)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def first_run(tiny_mean_bert_dir, tmp_path_factory):
    return run_demo(tiny_mean_bert_dir, tmp_path_factory.mktemp("demo"), "run")


def test_demo_runs_a_fleet_and_writes_its_results(first_run):
    out, stdout = first_run
    rows = json.loads((out / "results.json").read_text())
    # round 0: the closed-form head; the two head rounds make one row; then the LoRA rounds
    assert [(r["round"], r["stage"]) for r in rows] == [(0, "head-statistics"), (2, "head-fit"), (3, "lora"), (4, "lora")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(r["bytes_up"] > 0 for r in rows) and all(r["bytes_down"] > 0 for r in rows[1:])
    assert rows[0]["mean_rank"] == rows[1]["mean_rank"] == 0 and all(2 <= r["mean_rank"] <= 4 for r in rows[2:])
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "hetlora" / "global.safetensors").exists()
    peft_config = json.loads((out / "hetlora" / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA"
    assert "hetlora" in stdout and "accuracy" in stdout


def test_the_demo_accounts_the_fleets_estimated_energy_per_tier(first_run, tiny_mean_bert_dir):
    from collections import Counter

    from hetlora.models.adapter_spec import derive_spec
    from profiles.memory_model import ModelShape
    from profiles.policy import decide_tier

    out, stdout = first_run
    rows = json.loads((out / "results.json").read_text())
    spent = [r["energy_j"] for r in rows]
    # every row's rounds trained (round 0's features and statistics too): the cumulative estimate only grows
    assert all(0 < a < b for a, b in zip(spent, spent[1:])), spent
    for before, row in zip([0.0] + spent, rows):
        assert sum(t["joules"] for t in row["tier_energy"].values()) == pytest.approx(row["energy_j"] - before)
    # device-rounds: round 0 and the two head rounds every device (3), the LoRA rounds 2 of them each
    assert sum(t["device_rounds"] for r in rows for t in r["tier_energy"].values()) == 3 + 2 * 3 + 2 * 2
    spec, shape = derive_spec(tiny_mean_bert_dir, "classification", num_labels=3), ModelShape.from_model_dir(
        tiny_mean_bert_dir)
    device_tiers = Counter(str(decide_tier(json.loads(p.read_text()), spec=spec, model=shape, steps=2).rank)
                           for p in (out / "fleet").glob("*.json"))
    assert {tier: t["device_rounds"] for tier, t in rows[0]["tier_energy"].items()} == dict(device_tiers)
    summary = json.loads((out / "energy.json").read_text())["methods"]["hetlora"]
    assert summary["joules"] == pytest.approx(spent[-1])
    assert sum(t["joules"] for t in summary["tiers"].values()) == pytest.approx(spent[-1])
    for t in summary["tiers"].values():
        assert t["unknown"] == 0 and t["joules_per_device_round"] == pytest.approx(t["joules"] / t["device_rounds"])
    assert (out / "energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fleet J est." in stdout and "training energy per device tier" in stdout


def test_the_demos_lora_rounds_were_planned_with_the_decayed_learning_rate(first_run):
    out, _ = first_run
    with sqlite3.connect(out / "hetlora" / "server" / "state.sqlite") as db:
        plans = {number: json.loads(text) for number, text in db.execute("SELECT number, plans FROM rounds")}
    lrs = {number: {p["training"]["lr"] for p in by_client.values()} for number, by_client in plans.items()}
    # head rounds 1-2 keep the run's lr; LoRA rounds 3 and 4 are t = 0 and 1 of 2: factors 1 and 0.5
    assert lrs[1] == lrs[2] == lrs[3] == {1e-3} and len(lrs[4]) == 1 and lrs[4].pop() == pytest.approx(5e-4)


def test_the_same_seed_gives_the_same_run_and_another_seed_another(first_run, tiny_mean_bert_dir, tmp_path):
    out, _ = first_run
    again, _ = run_demo(tiny_mean_bert_dir, tmp_path, "again")
    other, _ = run_demo(tiny_mean_bert_dir, tmp_path, "other", seed=1)

    def numbers(run):
        return [(r["round"], r["accuracy"], r["macro_f1"], r["mean_rank"])
                for r in json.loads((run / "results.json").read_text())]

    def bytes_up(run):  # the uploads' meta carries measured seconds: their JSON can be a few bytes longer or shorter
        return [r["bytes_up"] for r in json.loads((run / "results.json").read_text())]

    def content(run):  # the safetensors header's key order is not fixed; the numbers and metadata are
        return update_digest(decode((run / "hetlora" / "global.safetensors").read_bytes()))

    assert numbers(again) == numbers(out)
    assert bytes_up(again) == pytest.approx(bytes_up(out), abs=6 * 48)  # at most 6 uploads a row, 48 B each
    assert content(again) == content(out)  # every tensor bit-identical
    assert (other / "data" / "partition.json").read_text() != (out / "data" / "partition.json").read_text()
    assert content(other) != content(out)


def test_round_one_waits_for_the_whole_fleet_so_its_selection_is_the_seeds():
    """With fewer clients required than the fleet has, round 1 opened with whichever clients registered first
    (a race between processes) and selected among them: two runs of one seed trained different devices."""
    from simulation.demo import DemoConfig, Method, serve_args

    cfg = DemoConfig(model_dir="m", data=None, test=None, labels=None, out=Path("o"), clients_per_round=4)
    args = serve_args(cfg, Method("hetlora", "hetlora", (4, 8)), 7)
    assert args[args.index("--start-clients") + 1] == "7"
    assert args[args.index("--min-clients") + 1] == args[args.index("--clients-per-round") + 1] == "4"
