"""`hetlora demo` end to end on a tiny model: processes, table, results.json, PNG, final adapters."""

import json
import subprocess
import sys

from tests.test_client_e2e import LABELS, write_data


def test_demo_runs_a_fleet_and_writes_its_results(tiny_bert_dir, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS))
    train = write_data(tmp_path / "train.csv", 60)
    test = write_data(tmp_path / "test.csv", 15, offset=1)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hetlora.cli", "demo", "--model", str(tiny_bert_dir), "--data", str(train),
         "--test", str(test), "--labels", str(labels), "--clients", "3", "--clients-per-round", "3", "--rounds", "2",
         "--local-steps", "2", "--batch-size", "4", "--seq-len", "16", "--ranks", "2,4", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    assert all(2 <= r["mean_rank"] <= 4 for r in rows)
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "hetlora" / "global.safetensors").exists()
    peft_config = json.loads((out / "hetlora" / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA"
    assert "hetlora" in proc.stdout and "accuracy" in proc.stdout
