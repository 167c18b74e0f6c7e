"""Flower deployment on loopback: a real SuperLink, three real SuperNodes, `flwr run` of the app in flower_app/.

Two rounds of hetlora (after the round-0 head statistics) with three different ranks on the tiny BERT.
Every node keeps the bytes it sent (state-dir/uploads/); the final global the ServerApp wrote must equal
the rule applied to exactly those uploads, and one module is also recomputed from HetLoRA's formula.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from hetlora.protocol.wire import decode
from hetlora_flower.local import LocalFederation
from hetlora_flower.settings import server_config
from hetlora.engine.aggregation import ClientResult, make_rule
from hetlora.engine.head_round import initial_global, load_statistics
from tests.helpers.flower import bounded

pytestmark = pytest.mark.integration  # real processes end to end (conftest: also slow)

APP = Path(__file__).resolve().parents[2] / "flower_app"
LABELS = ["card", "payment", "exchange"]
ROWS = [("how do I activate my new card", "card"), ("my card was declined at the shop", "payment"),
        ("what is the exchange rate for euros", "exchange"), ("my new card has not arrived", "card"),
        ("the shop refused my payment", "payment"), ("convert pounds to euros for me", "exchange")]
NODES = {"dev-a": 2, "dev-b": 4, "dev-c": 8}  # name -> requested rank: three different ranks


@pytest.fixture(scope="module")
def federation_run(tmp_path_factory, tiny_bert_dir):
    work = tmp_path_factory.mktemp("flower")
    (work / "labels.json").write_text(json.dumps(LABELS))
    run_config = {"rule": "hetlora", "num-server-rounds": 2, "ranks": "2,4,8", "global-rank": 8, "min-clients": 3,
                  "round-deadline": 240.0, "local-steps": 3, "batch-size": 4, "seq-len": 16, "lr": 0.01,
                  "min-rank": 1, "head-init": "ncm", "model": str(tiny_bert_dir),
                  "labels": str(work / "labels.json"), "output-dir": str(work / "out")}
    with LocalFederation(work / "federation") as fed:
        fed.superlink()
        for k, (name, rank) in enumerate(NODES.items()):
            data = work / f"{name}.csv"
            with data.open("w", newline="") as fh:
                csv.writer(fh).writerows([("text", "label")] + ROWS[k:] + ROWS[:k] * (k + 1))
            fed.supernode(name, {"data": str(data), "name": name, "state-dir": str(work / name),
                                 "model-dir": str(tiny_bert_dir), "device": "jetson-agx-orin",
                                 "requested-rank": rank})
        done = fed.run(APP, run_config, timeout=600)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((work / "federation").glob("*.log")))
    assert done.returncode == 0 and (work / "out" / "history.json").is_file(), logs
    return work, run_config


def _uploads(work: Path, round_number: int) -> dict[str, bytes]:
    return {name: (work / name / "uploads" / f"r{round_number:04d}.safetensors").read_bytes() for name in NODES}


def test_final_global_is_the_rule_applied_to_what_the_nodes_sent(federation_run):
    work, run_config = federation_run
    config = server_config(run_config)
    rule = make_rule("hetlora")
    stats = [load_statistics(config, body) for _, body in sorted(_uploads(work, 0).items())]
    expected, _ = initial_global(rule, config.spec, stats, head_init="ncm", global_rank=8, seed=config.seed,
                                 shrinkage=config.head_shrinkage, temperature=config.head_temperature)
    history = json.loads((work / "out" / "history.json").read_text())
    for round_number in (1, 2):
        uploads = _uploads(work, round_number)
        results = [ClientResult(adapter=decode(uploads[name]), n_samples=decode(uploads[name]).meta["n_samples"])
                   for name in sorted(uploads)]
        assert history["rounds"][round_number - 1]["clients"] == sorted(NODES)
        clipped = bounded(rule, expected, results)
        previous, expected = expected, rule.aggregate(expected, clipped)
    final = decode((work / "out" / "global-final.safetensors").read_bytes())
    assert final.meta["global_version"] == 2 and final.rank == 8
    for name, (a, b) in expected.lora.items():
        np.testing.assert_array_equal(final.lora[name][0], a)
        np.testing.assert_array_equal(final.lora[name][1], b)
    for name, t in expected.dense.items():
        np.testing.assert_array_equal(final.dense[name], t)
    assert history["rounds"][1]["statistics"]["clipped"] == {}
    _check_one_module_by_formula(final, results)


def _check_one_module_by_formula(final, results):
    """HetLoRA: zero-pad to R, weights s_k / sum s_j with s_k = ||B_k A_k||_F; B = sum p_k B_k, A = sum p_k A_k."""
    name = sorted(final.lora)[0]
    rank = final.lora[name][0].shape[0]
    padded, norms = [], []
    for res in results:
        a, b = (np.asarray(t, dtype=np.float64) for t in res.adapter.lora[name])
        norms.append(np.linalg.norm(b @ a))
        padded.append((np.pad(a, ((0, rank - a.shape[0]), (0, 0))), np.pad(b, ((0, 0), (0, rank - b.shape[1])))))
    p = np.array(norms) / sum(norms)
    np.testing.assert_allclose(final.lora[name][0], sum(w * a for w, (a, _) in zip(p, padded)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(final.lora[name][1], sum(w * b for w, (_, b) in zip(p, padded)), rtol=1e-5, atol=1e-7)


def test_three_nodes_trained_at_three_ranks(federation_run):
    work, _ = federation_run
    history = json.loads((work / "out" / "history.json").read_text())
    assert history["rounds"][0]["ranks"] == NODES
    sent = {name: decode(body).meta for name, body in _uploads(work, 1).items()}
    assert {name: meta["rank"] for name, meta in sent.items()} == NODES
    assert all(meta["client_id"] == name and meta["round"] == 1 for name, meta in sent.items())
