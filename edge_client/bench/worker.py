"""One backend of `hetlora bench` in its own process, so its peak RSS is its own and the cells of every
backend can interleave in time (a shared machine's drift then spreads over all of them).

Protocol: JSON lines. The parent starts `python -m edge_client.bench.worker` with the worker's config
as one JSON argument; the worker answers {"ready": true} or {"error": reason}, then per segment:
  {"prepare": rank, "warmup": n}                  -> {"computed_rank": R} | {"skip": reason}
  {"time": {"min_steps": n, "min_seconds": s}}    -> {"seconds": [...], "peak_rss_bytes": b}
The parent meters energy and reads device conditions around "time". Replies go to the worker's original
stdout; its fd 1 then points at stderr, so nothing a library prints can corrupt them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from hetlora.errors import UserError
from edge_client.bench.runner import RssHighWater
from hetlora.output import configure


class BackendWorker:
    """The parent's handle on one worker process (one backend)."""

    def __init__(self, backend: str, config: dict):
        self.backend = backend
        config = {**config, "backend": backend}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_client.bench.worker", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        answer = self._read()
        if "error" in answer:
            self.close()
            raise UserError(answer["error"])

    def request(self, message: dict) -> dict:
        """The worker's answer to `message`; UserError when the worker failed (its reason, one line)."""
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise UserError(answer["error"])
        return answer

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise UserError(f"the {self.backend} bench worker exited (status {code}) without an answer")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def timed_steps(step, min_steps: int, min_seconds: float) -> dict:
    """Run `step` until at least `min_steps` steps and `min_seconds` passed; step times and this process's
    RSS high-water over them."""
    seconds: list[float] = []
    with RssHighWater() as rss:
        began = time.perf_counter()
        while len(seconds) < min_steps or time.perf_counter() - began < min_seconds:
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
    return {"seconds": seconds, "peak_rss_bytes": rss.peak_bytes}


def open_from_config(config: dict):
    """The stepper of config["backend"] (edge_client.bench.steppers), at config["threads"] torch threads."""
    # imported here, after main() pointed fd 1 at stderr: nothing a library prints on import reaches the replies
    import torch

    from edge_client.bench import steppers
    from hetlora.models.adapter_spec import derive_spec

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    spec = derive_spec(config["model_dir"], config["task"], tuple(config["targets"]), config["num_labels"])
    batch = steppers.synthetic_batch(config["batch"], config["seq_len"], config["vocab"], config["num_labels"])
    head = steppers.adapter_dense(config["adapter"]) if config.get("adapter") else {}
    return steppers.open_stepper(config["backend"], model_dir=config["model_dir"], task=config["task"],
                                 artifacts_dir=config["artifacts"], head=head,
                                 spec=spec, targets=tuple(config["targets"]), num_labels=config["num_labels"],
                                 lora_alpha=config["lora_alpha"], batch=batch)


def serve(config: dict, replies) -> None:
    """The worker's loop: answer the parent's requests on `replies` until stdin closes."""
    def answer(doc: dict) -> None:
        replies.write(json.dumps(doc) + "\n")
        replies.flush()

    try:
        stepper = open_from_config(config)
    except UserError as exc:
        return answer({"error": str(exc)})
    answer({"ready": True})
    step = None
    for line in sys.stdin:
        message = json.loads(line)
        if "prepare" in message:
            step = None  # drop the previous rank's program first: each cell's peak RSS is its own
            try:
                step, computed = stepper.prepare(int(message["prepare"]))
            except UserError as exc:
                answer({"skip": str(exc)})
                continue
            for _ in range(int(message.get("warmup", 0))):
                step()
            answer({"computed_rank": computed})
        elif "time" in message:
            answer(timed_steps(step, int(message["time"]["min_steps"]), float(message["time"]["min_seconds"])))


def main() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    config = json.loads(sys.argv[1])
    configure(config.get("verbosity", 0))
    try:
        serve(config, replies)
    except Exception as exc:  # the parent reports it as the backend's skip reason, in one line
        replies.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
