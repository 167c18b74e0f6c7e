"""The protocol package imports and works with torch, transformers and FastAPI blocked from importing."""

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys

    class Blocked:
        BLOCKED = ("torch", "transformers", "fastapi", "uvicorn", "requests", "edge_client", "server_stub")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"blocked in this test: {name}")
            return None

    sys.meta_path.insert(0, Blocked())
""")

USE = textwrap.dedent("""
    import numpy as np
    from hetlora.protocol import adapter_ops, atomic, head_stats, lora_rules, plan, settings, spec, wire

    adapter = wire.Adapter(lora={"m": (np.ones((4, 3), np.float32), np.ones((2, 4), np.float32))}, meta={"round": 1})
    s = spec.AdapterSpec("h", "classification", ("m",), {"m": spec.LoRAModule("m", 3, 2)})
    back = wire.decode(wire.encode(adapter))
    assert wire.validate(back, s, max_rank=4) == 4
    assert adapter_ops.truncate(back, 2).rank == 2
    assert lora_rules.lora_scale(16, 8) == 2.0 and lora_rules.pruned_rank(8, 0.5, 2) == 4
    p = plan.ClientPlan(round=1, rank=2, mode="plora", training=settings.TrainingSettings(), indices=(0, 3))
    assert plan.ClientPlan.from_json(p.to_json()) == p
    assert not any(m.split(".")[0] in ("torch", "transformers", "fastapi") for m in sys.modules)
    print("ok")
""")


def test_protocol_works_without_torch_or_fastapi():
    out = subprocess.run([sys.executable, "-c", BLOCKER + USE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_the_blocker_does_block():
    out = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert out.returncode != 0 and "blocked in this test: torch" in out.stderr
