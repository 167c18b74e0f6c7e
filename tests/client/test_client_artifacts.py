"""`hetlora client --backend onnx --artifacts DIR` against a real server: artifacts that do not serve the server's run
are one error line and exit 2 before the client registers, and the client asks for a rank its artifacts have."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from hetlora.cli import main
from hetlora.errors import UserError
from hetlora.protocol.settings import TrainingSettings
from tests.conftest import ARTIFACT_BATCH, ARTIFACT_LABELS, ARTIFACT_SEQ

pytest.importorskip("onnxruntime.training")


def serve(tiny_bert_dir, tmp_path, **overrides):
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.folders import default_targets
    from server_stub.background import serve_in_background
    from hetlora.engine.config import ServerConfig

    spec = derive_spec(tiny_bert_dir, "classification", default_targets(tiny_bert_dir), len(ARTIFACT_LABELS))
    settings = dict(spec=spec, aggregator="hetlora", labels=ARTIFACT_LABELS, ranks=(2, 4, 8), global_rank=8,
                    min_clients=2, rounds=1, training=TrainingSettings(steps=1, batch_size=ARTIFACT_BATCH,
                                                                        seq_len=ARTIFACT_SEQ))
    return serve_in_background(ServerConfig(**(settings | overrides)), tmp_path / "server")


def run_client(capsys, url, tmp_path, model_dir, artifacts, *flags):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"my {ARTIFACT_LABELS[i % 3]} question {i},{ARTIFACT_LABELS[i % 3]}\n"
                                             for i in range(9)))
    code = main(["client", "--server", url, "--data", str(data), "--state-dir", str(tmp_path / "state"),
                 "--model", str(model_dir), "--backend", "onnx", "--artifacts", str(artifacts), "--max-rounds", "0",
                 "--profile-as", "thinkpad-t14-gen3-amd", "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return code, err[-1] if err else ""


def clients(url) -> list[dict]:
    return httpx.get(url + "/v1/status").json()["clients"]


def test_artifacts_of_another_run_are_refused_before_registering(capsys, tmp_path, tiny_bert_dir, tiny_artifacts):
    other = shutil.copytree(tiny_artifacts, tmp_path / "other-export")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["spec_fingerprint"] = "0" * len(manifest["spec_fingerprint"])  # an export for another label list
    (other / "manifest.json").write_text(json.dumps(manifest))
    with serve(tiny_bert_dir, tmp_path) as url:
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir, other)
        assert code == 2, line
        assert line.startswith(f"hetlora client: error: the artifacts in {other} were exported for another run than "
                               "the server's: spec fingerprint (0000")
        assert clients(url) == []


def test_a_run_longer_than_the_export_is_refused_before_registering(capsys, tmp_path, tiny_bert_dir, tiny_artifacts):
    with serve(tiny_bert_dir, tmp_path, training=TrainingSettings(steps=1, batch_size=8, seq_len=64)) as url:
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir, tiny_artifacts)
        assert code == 2, line
        assert line.endswith(f"exported for batch {ARTIFACT_BATCH} x seq_len {ARTIFACT_SEQ}; the run trains 8 x 64: "
                             f"pass --batch-size {ARTIFACT_BATCH} --seq-len {ARTIFACT_SEQ} or re-export larger")
        assert clients(url) == []
        # the overrides the line names are the way through
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir, tiny_artifacts, "--batch-size",
                                str(ARTIFACT_BATCH), "--seq-len", str(ARTIFACT_SEQ))
        assert code == 0, line
        assert len(clients(url)) == 1


def test_ranks_the_export_does_not_have_are_refused_before_registering(capsys, tmp_path, tiny_bert_dir,
                                                                        tiny_artifacts):
    with serve(tiny_bert_dir, tmp_path, ranks=(8, 16), global_rank=16) as url:
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir, tiny_artifacts)
        assert code == 2, line
        assert "exported at rank(s) 2, 4, all below the run's ranks 8, 16" in line
        assert clients(url) == []
    with serve(tiny_bert_dir, tmp_path / "b") as url:
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir, tiny_artifacts, "--rank", "8")
        assert code == 2, line
        assert line.endswith("were exported at rank(s) 2, 4; ask for one of them")
        assert clients(url) == []


def test_the_client_asks_for_the_largest_rank_its_artifacts_have(capsys, tmp_path, tiny_bert_dir, tiny_artifacts):
    with serve(tiny_bert_dir, tmp_path) as url:  # the run offers 2, 4, 8; the export has 2 and 4
        code, line = run_client(capsys, url, tmp_path, tiny_bert_dir, tiny_artifacts)
        assert code == 0, line
        [client] = clients(url)
        assert client["requested_rank"] == 4 and client["rank"] <= 4


def test_a_flower_node_on_artifacts_asks_and_refuses_as_the_client_does(tmp_path, tiny_bert_dir, tiny_artifacts):
    """The Flower node's introduction requests the export's largest rank (the run offers 2, 4, 8; the export has 2
    and 4), and a run the export does not serve is the client's one-line error (edge_client.local_round.LocalModel
    holds both for both devices)."""
    from hetlora_flower.device import LocalNodes, NodeSettings

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"my {label} question,{label}\n" for label in ARTIFACT_LABELS))
    node = NodeSettings(name="a", data=str(data), model_dir=str(tiny_bert_dir), backend="onnx",
                        artifacts_dir=str(tiny_artifacts))
    with serve(tiny_bert_dir, tmp_path / "a") as url:
        run = httpx.get(url + "/v1/run").json()
    assert LocalNodes().node(node, run).introduction()["requested_rank"] == 4
    with serve(tiny_bert_dir, tmp_path / "b", ranks=(8, 16), global_rank=16) as url:
        run = httpx.get(url + "/v1/run").json()
    with pytest.raises(UserError, match=r"exported at rank\(s\) 2, 4, all below the run's ranks 8, 16"):
        LocalNodes().node(node, run).introduction()
    with serve(tiny_bert_dir, tmp_path / "c", training=TrainingSettings(steps=1, batch_size=8, seq_len=64)) as url:
        run = httpx.get(url + "/v1/run").json()
    with pytest.raises(UserError, match=f"exported for batch {ARTIFACT_BATCH} x seq_len {ARTIFACT_SEQ}"):
        LocalNodes().node(node, run)
