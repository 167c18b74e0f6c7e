"""benchmarks/profile_onnxruntime.py on the session's tiny Llama export: ORT's per-operator totals per step."""

from __future__ import annotations

from benchmarks.profile_onnxruntime import profile, table
from tests.conftest import LLAMA_ARTIFACT_RANK, needs_onnx_training


@needs_onnx_training
def test_profile_counts_each_operator_once_per_timed_step(tiny_llama_artifacts):
    result = profile(str(tiny_llama_artifacts), LLAMA_ARTIFACT_RANK, steps=2, threads=1)
    kinds = result["kinds"]
    # the warm-up is left out: every count is a whole number per timed step
    assert all(abs(k["calls_per_step"] - round(k["calls_per_step"])) < 1e-9 for k in kinds.values())
    assert kinds["ReduceLogSumExp"]["calls_per_step"] == 1  # the head's loss, once a step
    assert "SoftmaxCrossEntropyLoss" not in kinds
    assert sum(k["ms_per_step"] for k in kinds.values()) <= result["step_s"] * 1e3  # nodes run one after another
    assert result["page_faults_per_step"] >= 0 and "page faults a step" in table(result, top=5)

    nodes = profile(str(tiny_llama_artifacts), LLAMA_ARTIFACT_RANK, steps=1, threads=1, by_node=True)["kinds"]
    # two layers fold into one row per node, each called twice
    q_proj = [v for k, v in nodes.items() if "layers.N/self_attn/q_proj/base/MatMul" in k and "Grad" not in k]
    assert q_proj and all(v["calls_per_step"] == 2 and v["shapes"] for v in q_proj)
