"""What a finished `hetlora serve` run leaves behind: <state-dir>/final/ with the wire adapter and a PEFT folder."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from hetlora.protocol.peft_format import load_peft
from hetlora.protocol.wire import decode, encode
from simulation.fleet import start_server
from tests.helpers.server import LABELS, TARGETS, make_update, post_update, register, upload_meta



def wait_for_line(proc, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.tail(200):
            return
        assert proc.alive(), proc.tail()
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the server log:\n{proc.tail()}")


@pytest.mark.slow
def test_serve_writes_the_final_global_and_a_peft_folder(tiny_bert_dir, spec, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS))
    state = tmp_path / "server"
    proc, url = start_server(["--model", str(tiny_bert_dir), "--labels", str(labels), "--targets", ",".join(TARGETS),
                              "--head-init", "none", "--ranks", "2", "--rounds", "1", "--min-clients", "1"], state)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            client = register(http, 2)
            update = make_update(spec, 2, upload_meta(client, 1, 2, 10), seed=0)
            assert post_update(http, client, 1, encode(update)).status_code == 201
            wait_for_line(proc, "the run's result as a PEFT folder")
            served = http.get("/v1/global").content
    finally:
        proc.stop()
    final = state / "final"
    assert (final / "global.safetensors").read_bytes() == served
    log = proc.log_path.read_text()
    assert f"(wire format, for hetlora evaluate --adapter): {final / 'global.safetensors'}\n" in log
    assert f"the run's result as a PEFT folder: {final / 'peft'}\n" in log
    assert "all rounds done (1 LoRA rounds)" in log
    assert "round 1 aggregated (hetlora) from 1 clients (r2 x1)\n" in log
    assert max(len(line.replace(str(tmp_path), "TMP")) for line in log.splitlines()) <= 200  # details at -v
    wire, peft = decode(served), load_peft(final / "peft")
    for name, (a, b) in wire.lora.items():
        np.testing.assert_array_equal(peft.lora[name][0], a)
        np.testing.assert_array_equal(peft.lora[name][1], b)
