"""Golden files written by the wire code before the protocol package existed: they must still load, and
re-encoding them must give the same file: the same tensor bytes and the same header. (The header's key order
is not fixed: safetensors writes `__metadata__` from a hash map, so two encodings of one adapter by the same
code may order its keys differently; the parsed header is what must match.)"""

import json
from pathlib import Path

import numpy as np

from hetlora.protocol.head_stats import decode_statistics, encode_statistics
from hetlora.protocol.wire import decode, encode

GOLDEN = Path(__file__).parent / "golden"


def _same_file(left: bytes, right: bytes) -> None:
    n, m = int.from_bytes(left[:8], "little"), int.from_bytes(right[:8], "little")
    assert json.loads(left[8:8 + n]) == json.loads(right[8:8 + m])
    assert left[8 + n:] == right[8 + m:]


def _raw_tensors(data: bytes) -> tuple[dict, dict]:
    """An independent reading of a safetensors file: the JSON header, then each tensor by its byte offsets."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    dtypes = {"F32": np.float32, "F64": np.float64}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return header["__metadata__"], tensors


def test_golden_adapter_loads_and_reencodes_to_the_same_file():
    data = (GOLDEN / "adapter_v1.safetensors").read_bytes()
    metadata, raw = _raw_tensors(data)
    adapter = decode(data)
    assert metadata["format"] == "hetlora-adapter" and metadata["format_version"] == "1"
    assert adapter.meta == json.loads(metadata["meta"]) and adapter.meta["indices"] == [0, 2, 5]
    assert adapter.rank == 3 and sorted(adapter.dense) == ["classifier.bias", "classifier.weight"]
    for name, (a, b) in adapter.lora.items():
        np.testing.assert_array_equal(a, raw[name + ".lora_A"])
        np.testing.assert_array_equal(b, raw[name + ".lora_B"])
    for name, t in adapter.dense.items():
        np.testing.assert_array_equal(t, raw[name])
    _same_file(encode(adapter), data)


def test_golden_head_statistics_load_and_reencode_to_the_same_file():
    data = (GOLDEN / "head_statistics_v1.safetensors").read_bytes()
    _, raw = _raw_tensors(data)
    stats = decode_statistics(data, num_labels=4, dim=8, max_feature_norm=None)
    assert stats.meta == {"round": 0, "client_id": "c-0123456789ab", "n_samples": 10}
    for name in ("class_sums", "class_counts", "feature_gram"):
        np.testing.assert_array_equal(getattr(stats, name), raw[name])
    _same_file(encode_statistics(stats), data)
