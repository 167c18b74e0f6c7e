"""ExecuTorch training from the command line: `hetlora export`, then `hetlora serve` and two
`hetlora client --backend executorch` processes on loopback, with no optimiser flag anywhere.

The artifacts' manifest says they train with SGD, so the client trains with SGD; an explicit
`--optimizer` the artifacts cannot run is refused before the client registers.
"""

from __future__ import annotations

import re

import pytest

from simulation.fleet import start_client, start_server
from edge_client.server_api import ServerAPI
from hetlora.protocol.wire import decode
from hetlora.cli import main
from tests.test_client_e2e import labels_file, run_to_end, serve_args, write_data  # noqa: F401 (fixture)

pytest.importorskip("executorch")


@pytest.fixture(scope="module")
def executorch_artifacts(tiny_bert_dir, labels_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("et-artifacts")
    assert main(["export", "--model", str(tiny_bert_dir), "--task", "classification", "--labels", str(labels_file),
                 "--ranks", "4", "--batch", "4", "--seq-len", "16", "--backends", "executorch",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_executorch_clients_train_a_run_from_the_command_line(tiny_bert_dir, labels_file, executorch_artifacts,
                                                               tmp_path):
    # the server's defaults include round 0 (head statistics), which the executorch clients also serve
    args = serve_args(tiny_bert_dir, labels_file, "hetlora", rounds=1, steps=4)
    args[args.index("--ranks") + 1] = "4"
    args[args.index("--min-clients") + 1] = "2"
    server, url = start_server(args, tmp_path / "server")
    flags = ["--model", str(tiny_bert_dir), "--backend", "executorch", "--artifacts", str(executorch_artifacts),
             "--lr", "0.5", "--poll", "0.2"]
    # the second device is configured by one file, as a service would be; its --lr flag overrides the file's
    (tmp_path / "c1.toml").write_text(f'model = "{tiny_bert_dir}"\nbackend = "executorch"\n'
                                      f'artifacts = "{executorch_artifacts}"\nlr = 0.001\npoll = 0.2\n')
    status = run_to_end(server, url, lambda: [
        start_client(url, write_data(tmp_path / "d0.csv", 16, 0), tmp_path / "c0", flags),
        start_client(url, write_data(tmp_path / "d1.csv", 16, 1), tmp_path / "c1",
                     ["--config", str(tmp_path / "c1.toml"), "--lr", "0.5"])])
    assert [h["round"] for h in status["history"]] == [0, 1]
    assert status["history"][0]["statistics"]["head"] in ("lda", "ncm")
    for i in range(2):
        log = (tmp_path / f"c{i}.log").read_text()
        assert "Traceback" not in log, log[-2000:]
        assert "at rank 4 (4 steps, batch 4, seq 16, sgd lr 0.5)" in log, log[-2000:]
        before, after = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", log).groups())
        assert after != before, log[-2000:]
    # global 0 has B = 0 (the rule's start); the SGD rounds moved it
    globals_ = [decode((tmp_path / "server" / "blobs" / "globals" / f"v000{v}.safetensors").read_bytes())
                for v in (0, 1)]
    assert all(not b.any() for _, b in globals_[0].lora.values())
    assert all(b.any() for _, b in globals_[1].lora.values())


def test_an_optimizer_the_artifacts_cannot_run_is_refused_before_registering(tiny_bert_dir, labels_file,
                                                                             executorch_artifacts, tmp_path):
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, "hetlora"), tmp_path / "server")
    try:
        client = start_client(url, write_data(tmp_path / "d.csv", 8), tmp_path / "c",
                              ["--model", str(tiny_bert_dir), "--backend", "executorch",
                               "--artifacts", str(executorch_artifacts), "--optimizer", "adamw"])
        assert client.wait(timeout=120) == 2
        assert ServerAPI(url).status()["clients"] == []
    finally:
        server.stop()
    err = (tmp_path / "c.log").read_text()
    assert "--optimizer adamw: the executorch artifacts were exported to train with sgd" in err
    assert "Traceback" not in err
