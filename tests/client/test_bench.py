"""`hetlora bench`: statistics against closed forms and numpy, the interleaved order, the FLOP count
against a hand count and torch's own FLOP counter, energy labels never mixed, and quick benches on the
tiny BERT (torch backend; onnx too when onnxruntime-training is installed) writing JSON, CSV and PNG."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pytest

from edge_client.bench.cost import rank_upload_bytes, training_step_flops
from edge_client.bench.report import CSV_COLUMNS, SCHEMA, VERSION, write_plots
from edge_client.bench.runner import Segment, cell_energy
from edge_client.bench.schedule import interleaved
from edge_client.bench.stats import mean_std, percentile, summarize
from edge_client.device.energy import STATUSES, EnergyResult
from fakeroots import make_root
from hetlora.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--steps", "3", "--min-seconds", "0", "--warmup", "1", "--repetitions", "2", "--batch-size", "2",
        "--seq-len", "8", "--threads", "1", "--quick"]


# --- statistics --------------------------------------------------------------------------------------------------
def test_percentiles_of_one_to_ten_follow_the_closed_form():
    # position (n - 1) q / 100 = 9 q / 100 in 1..10, so the q-th percentile is 1 + 9 q / 100
    values = [7, 3, 10, 1, 5, 2, 9, 4, 8, 6]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(1 + 9 * q / 100)


def test_summary_matches_numpy_and_statistics_on_random_samples():
    samples = list(np.random.default_rng(3).lognormal(-1.0, 0.5, 37))
    s = summarize(samples)
    assert s["n"] == 37
    for key, q in (("p50_s", 50), ("p90_s", 90), ("p99_s", 99)):
        assert s[key] == pytest.approx(np.percentile(samples, q))
    assert s["mean_s"] == pytest.approx(statistics.fmean(samples))
    assert s["std_s"] == pytest.approx(statistics.stdev(samples))
    assert mean_std([2.5]) == (2.5, 0.0)


def test_statistics_reject_empty_input_and_bad_quantiles():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        mean_std([])


# --- order -------------------------------------------------------------------------------------------------------
def test_ranks_interleave_across_repetitions():
    assert interleaved([4, 8, 16], 2) == [(0, 4), (0, 8), (0, 16), (1, 4), (1, 8), (1, 16)]
    order = [r for _, r in interleaved([4, 8, 16, 32], 3)]
    assert all(a != b for a, b in zip(order, order[1:]))  # ABCDABCD..., never AA
    with pytest.raises(ValueError):
        interleaved([4], 0)


# --- cost --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_step_flops_match_a_hand_count_for_the_tiny_bert(tiny_bert_dir):
    from hetlora.models.adapter_spec import derive_spec
    from profiles.memory_model import ModelShape

    shape = ModelShape.from_model_dir(tiny_bert_dir)  # 2 layers, hidden 32, FFN 64
    spec = derive_spec(tiny_bert_dir, "classification", ("query", "value"), num_labels=3)
    b, s, r = 2, 8, 4
    tokens = b * s
    frozen = 2 * (4 * 32 * 32 + 2 * 32 * 64)  # q, k, v, attention output (32x32) and the FFN (32x64, 64x32)
    lora = 2 * 2 * r * (32 + 32)  # query and value in both layers
    attention = 2 * (4 * b * s * s * 32) * 3  # QK^T and PV per layer, forward + twice that backward
    hand = 4 * frozen * tokens + 6 * lora * tokens + attention
    assert training_step_flops(shape, spec, r, b, s) == hand
    assert rank_upload_bytes(spec, r) == 4 * (lora + 32 * 3 + 3)  # + the classifier head (3 x 32 and bias)


@pytest.mark.slow
def test_step_flops_agree_with_torchs_flop_counter(tiny_bert_dir):
    """torch's FlopCounterMode counts every mm/addmm of a real step exactly; reconciled term by term.

    It does not see CPU scaled-dot-product attention (a fused kernel), the analytic count leaves out the
    pooler and head (per row), and autograd skips the input gradients of the first layer's linear maps
    (their input, the embedding output, needs no gradient), which the analytic count includes."""
    from torch.utils.flop_counter import FlopCounterMode

    from edge_client.bench.steppers import TorchStepper, synthetic_batch
    from hetlora.models.adapter_spec import derive_spec
    from profiles.memory_model import ModelShape

    b, s, r, h, labels = 4, 32, 8, 32, 3
    tokens = b * s
    spec = derive_spec(tiny_bert_dir, "classification", ("query", "value"), num_labels=labels)
    stepper = TorchStepper(tiny_bert_dir, "classification", spec, ("query", "value"), labels, 16.0,
                           synthetic_batch(b, s, 30522, labels))
    step, _ = stepper.prepare(r)
    with FlopCounterMode(display=False) as counter:
        step()
    analytic = training_step_flops(ModelShape.from_model_dir(tiny_bert_dir), spec, r, b, s)
    attention = 12 * 2 * b * s * s * h
    first_layer_input_grads = 3 * 2 * h * h * tokens + 2 * 2 * r * h * tokens  # q, k, v and the two LoRA A
    pooler = 2 * (2 * b * h * h)  # forward and input gradient on the [CLS] rows
    head = 3 * (2 * b * h * labels)  # forward, input and weight gradient
    assert counter.get_total_flops() == analytic - attention - first_layer_input_grads + pooler + head


# --- energy labels -----------------------------------------------------------------------------------------------
def energy(status="measured", source="rapl", scope="package", model=None, joules=2.0):
    return EnergyResult(status, scope, source, 1.0, joules, 10, 10.0, model=model)


def segment(result: EnergyResult) -> Segment:
    return Segment([0.1], result, 1, {}, {})


def test_a_cell_never_combines_windows_measured_differently():
    same = cell_energy([segment(energy()), segment(energy())])
    assert (same.energy_status, same.joules, same.sample_count) == ("measured", 4.0, 20)
    mixed = cell_energy([segment(energy()), segment(energy("estimated", "estimate", "estimate", "tdp-fraction"))])
    assert mixed.energy_status == "unavailable" and mixed.joules is None
    assert "different labels" in mixed.note


def test_the_energy_plot_keeps_each_label_set_on_its_own_line(tmp_path, monkeypatch):
    import edge_client.bench.report as report

    drawn = {}
    monkeypatch.setattr(report, "line_plot", lambda path, series, **kw: drawn.setdefault(path.name, series) and path)

    def cell(rank, result):
        return {"backend": "torch", "rank": rank, "latency": {"p50_s": 0.1}, "energy": result.to_json(),
                "joules_per_step": result.joules}

    write_plots(tmp_path, [cell(4, energy()), cell(8, energy("estimated", "estimate", "estimate", "tdp", 9.0)),
                           cell(16, energy("unavailable", None, None, joules=None))])
    lines = drawn["energy_vs_rank.png"]
    assert len(lines) == 2  # measured and estimated apart; the unavailable cell has no point
    assert {tuple(xs) for xs, _ in lines.values()} == {(4,), (8,)}
    assert any("estimated" in name and "tdp" in name for name in lines)


# --- the command -------------------------------------------------------------------------------------------------
def bench_in_a_container(model_dir, ranks: str, backends: str, tmp_path, *extra: str) -> list[str]:
    """`hetlora bench` arguments on a fake container root with a given matmul peak, output in tmp_path/out."""
    return ["bench", "--model", str(model_dir), "--ranks", ranks, "--backends", backends,
            "--out", str(tmp_path / "out"), "--peak-gflops", "50",
            "--root", str(make_root("container", tmp_path)[0]), *extra]


def read_outputs(out):
    doc = json.loads((out / "bench.json").read_text())
    with open(out / "bench.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert (out / "latency_vs_rank.png").read_bytes()[:8] == PNG_MAGIC
    return doc, rows


def check_cells(doc, rows, batch, seq_len):
    assert (doc["schema"], doc["version"]) == (SCHEMA, VERSION)
    assert doc["profile"]["schema"] == "hetlora-profile" and doc["settings"]["batch"] == batch
    assert len(rows) == len(doc["cells"])
    for cell, row in zip(doc["cells"], rows):
        lat = cell["latency"]
        assert lat["n"] == len(lat["samples_s"]) >= 3 and int(row["steps"]) == lat["n"]
        assert lat["p50_s"] <= lat["p90_s"] <= lat["p99_s"] <= max(lat["samples_s"])
        assert lat["p90_s"] == pytest.approx(np.percentile(lat["samples_s"], 90))
        assert cell["tokens_per_s"] == pytest.approx(batch * seq_len / lat["mean_s"])
        assert float(row["tokens_per_s"]) == pytest.approx(cell["tokens_per_s"])
        assert cell["achieved_gflops"] == pytest.approx(cell["flops_per_step"] / lat["mean_s"] / 1e9)
        assert cell["peak_rss_mb"] > 10
        assert cell["energy"]["energy_status"] in STATUSES and row["energy_status"] == cell["energy"]["energy_status"]
        assert len(cell["conditions"]["segments"]) == 2
    # one label set per run: estimates and measurements never share the energy columns
    assert len({(c["energy"]["energy_status"], c["energy"]["source"], c["energy"]["scope"], c["energy"]["model"])
                for c in doc["cells"]}) == 1


@pytest.mark.slow
def test_quick_bench_on_a_jetson_tree_measures_energy_and_writes_json_csv_png(tiny_bert_dir, tmp_path, capsys):
    """The fake Orin Nano's VDD_IN rail reads a constant 5.072 V x 1.280 A, so joules = that power x seconds."""
    root, _ = make_root("jetson-orin-nano-jp5", tmp_path / "dev")
    out = tmp_path / "out"
    code = main(["bench", "--model", str(tiny_bert_dir), "--ranks", "4,2", "--backends", "torch", "--out", str(out),
                 "--peak-gflops", "50", "--root", str(root), *FAST])
    assert code == 0
    doc, rows = read_outputs(out)
    check_cells(doc, rows, 2, 8)
    assert [c["rank"] for c in doc["cells"]] == [4, 2] and doc["skipped"] == []
    watts = 5.072 * 1.280
    for cell in doc["cells"]:
        e = cell["energy"]
        assert (e["energy_status"], e["scope"], e["source"]) == ("measured", "module", "jetson-ina3221-hwmon")
        assert e["joules"] == pytest.approx(watts * e["seconds"], rel=1e-6)
        assert cell["joules_per_step"] == pytest.approx(e["joules"] / cell["latency"]["n"])
        assert cell["joules_per_token"] == pytest.approx(cell["joules_per_step"] / (2 * 8))
        assert e["idle_w"] == pytest.approx(watts) and e["joules_above_idle"] == pytest.approx(0, abs=1e-6)
        assert cell["conditions"]["start"]["temp_c"] == pytest.approx(47.531)
        assert cell["peak_fraction"] == pytest.approx(cell["achieved_gflops"] / 50)
    assert (out / "energy_vs_rank.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "measured: jetson-ina3221-hwmon/module" in printed and "torch" in printed


def test_quick_bench_lists_unavailable_backends_with_reasons(tiny_bert_dir, tiny_artifacts, tmp_path, capsys):
    """From the session's artifacts (ranks 2 and 4, batch 4 x 16): rank 3 runs on the rank-4 artifact of each
    artifact backend, rank 8 is skipped for them (none exported) and runs on torch."""
    args = bench_in_a_container(tiny_bert_dir, "3,8", "torch,onnx,executorch", tmp_path,
                                "--artifacts", str(tiny_artifacts))
    assert main([*args, *FAST, "--batch-size", "4", "--seq-len", "16"]) == 0
    doc, rows = read_outputs(tmp_path / "out")
    check_cells(doc, rows, 4, 16)
    skipped = {(s["backend"], s["rank"]): s["reason"] for s in doc["skipped"]}
    assert [(c["backend"], c["rank"], c["computed_rank"]) for c in doc["cells"]] == \
        [("torch", 3, 3), ("torch", 8, 8), ("onnx", 3, 4), ("executorch", 3, 4)]
    assert "no onnx artifact for rank 8" in skipped[("onnx", 8)]
    assert "no executorch artifact for rank 8" in skipped[("executorch", 8)]
    energy = doc["cells"][0]["energy"]
    assert energy["energy_status"] in ("estimated", "unavailable")
    assert (energy["model"] is not None) == (energy["energy_status"] == "estimated")
    printed = capsys.readouterr().out
    assert all(f"skipped {b}" in printed for b, _ in skipped)


def test_quick_bench_of_a_causal_lm_takes_the_task_from_its_artifacts(tiny_llama_dir, tiny_llama_artifacts, tmp_path,
                                                                      capsys):
    """The tiny Llama's chat artifacts (rank 4, batch 4 x 64): torch and onnx steps of the causal LM, FLOPs
    counted on the LM's shape (output head included); another --task than the artifacts' is a clear error."""
    from hetlora.models.adapter_spec import derive_spec
    from profiles.memory_model import ModelShape

    args = bench_in_a_container(tiny_llama_dir, "4", "torch,onnx", tmp_path, "--artifacts", str(tiny_llama_artifacts))
    assert main([*args, *FAST, "--batch-size", "4", "--seq-len", "64"]) == 0
    doc, rows = read_outputs(tmp_path / "out")
    check_cells(doc, rows, 4, 64)
    assert doc["model"]["task"] == "causal-lm" and doc["skipped"] == []
    assert [(c["backend"], c["rank"]) for c in doc["cells"]] == [("torch", 4), ("onnx", 4)]
    spec = derive_spec(tiny_llama_dir, "causal-lm", tuple(doc["model"]["targets"]), None)
    flops = training_step_flops(ModelShape.from_model_dir(tiny_llama_dir), spec, 4, 4, 64)
    assert all(c["flops_per_step"] == pytest.approx(flops) for c in doc["cells"])
    capsys.readouterr()
    assert main([*args, "--task", "classification"]) == 2
    assert "are for causal-lm" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_without_artifacts_says_where_they_come_from(tiny_bert_dir, tmp_path):
    assert main(bench_in_a_container(tiny_bert_dir, "2", "torch,onnx", tmp_path, *FAST)) == 0
    doc, _ = read_outputs(tmp_path / "out")
    assert "--artifacts" in {s["backend"]: s["reason"] for s in doc["skipped"]}["onnx"]


@pytest.mark.parametrize("flags, message", [
    (["--backends", "torch,tflite"], "unknown backend"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--peak-gflops", "-3"], "--peak-gflops must be positive"),
    (["--watts", "0"], "--watts must be positive"),
    (["--artifacts", "/nonexistent"], "manifest.json"),
])
def test_bad_flags_are_clear_errors(tiny_bert_dir, tmp_path, capsys, flags, message):
    assert main(["bench", "--model", str(tiny_bert_dir), "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_rank_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--ranks", "4,x"])
    assert exc.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


def test_bench_adopts_a_model_folders_own_classification_head(five_label_model, tiny_bert_dir, tmp_path, capsys):
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.folders import default_targets

    assert main([*bench_in_a_container(five_label_model, "2", "torch", tmp_path), *FAST]) == 0
    doc, _ = read_outputs(tmp_path / "out")
    assert (doc["model"]["num_labels"], doc["model"]["head"]) == (5, "the model folder's trained head (5 labels)")
    five = derive_spec(tiny_bert_dir, "classification", default_targets(tiny_bert_dir), num_labels=5)
    assert [c["upload_bytes"] for c in doc["cells"]] == [rank_upload_bytes(five, 2)]
    # a base model folder still gets a new head of the demo's size
    assert main([*bench_in_a_container(tiny_bert_dir, "2", "torch", tmp_path / "base"), *FAST]) == 0
    doc, _ = read_outputs(tmp_path / "base" / "out")
    assert (doc["model"]["num_labels"], doc["model"]["head"]) == (77, "a new head (77 labels)")
    capsys.readouterr()


def test_bench_refuses_a_head_that_does_not_fit_the_artifacts(five_label_model, tiny_artifacts, tmp_path, capsys):
    argv = bench_in_a_container(five_label_model, "2", "torch", tmp_path, "--artifacts", str(tiny_artifacts))
    assert main([*argv, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "classification head for 5 labels, but this run has 3 labels" in err[-1] and len(err) == 1


def test_bench_trains_the_head_of_an_adapter_file(tiny_bert_dir, tmp_path, capsys):
    from edge_client.bench.steppers import TorchStepper, synthetic_batch
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.folders import default_targets
    from hetlora.protocol.spec import linear_head
    from hetlora.protocol.wire import Adapter, encode

    targets = default_targets(tiny_bert_dir)
    five = derive_spec(tiny_bert_dir, "classification", targets, num_labels=5)
    weight, bias, _, dim = linear_head(five)
    rng = np.random.default_rng(5)
    head = {weight: rng.normal(0, 0.1, (5, dim)).astype(np.float32), bias: rng.normal(0, 0.1, 5).astype(np.float32)}
    (tmp_path / "global.safetensors").write_bytes(encode(Adapter(lora={}, dense=head)))

    argv = bench_in_a_container(tiny_bert_dir, "2", "torch", tmp_path, "--adapter", str(tmp_path / "global.safetensors"))
    assert main([*argv, *FAST]) == 0
    doc, _ = read_outputs(tmp_path / "out")
    assert (doc["model"]["num_labels"], doc["model"]["head"]) == (5, "the --adapter head (5 labels)")
    assert [c["upload_bytes"] for c in doc["cells"]] == [rank_upload_bytes(five, 2)]
    # each step starts from that head
    stepper = TorchStepper(tiny_bert_dir, "classification", five, targets, 5, 16.0, synthetic_batch(2, 8, 30522, 5),
                           head)
    stepper.prepare(2)
    for name, values in head.items():
        np.testing.assert_array_equal(stepper.trainer.dense[name].detach().numpy(), values)
    # a file without a head is one line
    (tmp_path / "nohead.safetensors").write_bytes(encode(Adapter(lora={}, dense={})))
    capsys.readouterr()
    argv = bench_in_a_container(tiny_bert_dir, "2", "torch", tmp_path, "--adapter", str(tmp_path / "nohead.safetensors"))
    assert main([*argv, *FAST]) == 2
    assert capsys.readouterr().err.strip().endswith("carries no classification head (dense tensors: [])")
