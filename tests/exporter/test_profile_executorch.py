"""benchmarks/profile_executorch.py on the session's tiny Llama export: per-operator ETDump totals per step."""

from __future__ import annotations

from benchmarks.profile_executorch import SPANS, profile, table
from tests.conftest import LLAMA_ARTIFACT_RANK


def test_profile_counts_each_operator_once_per_step(tiny_llama_artifacts):
    result = profile(str(tiny_llama_artifacts), LLAMA_ARTIFACT_RANK, steps=2, threads=1)
    kinds = result["kinds"]
    assert set(SPANS) <= set(kinds)
    # a step runs the same program every time: averaged over the runs, every count is whole
    assert all(abs(k["calls_per_step"] - round(k["calls_per_step"])) < 1e-9 for k in kinds.values())
    assert kinds["embedding.out"]["calls_per_step"] == 1  # one token embedding per step
    assert kinds["XNN Dynamic Fully Connected (NC, F32) GEMM"]["calls_per_step"] > 0
    delegated = sum(k["ms_per_step"] for name, k in kinds.items() if name.startswith("XNN "))
    assert 0 < delegated <= kinds["DELEGATE_CALL"]["ms_per_step"]  # XNNPACK's operators run inside its calls
    assert "all delegate calls" in table(result, top=5)
