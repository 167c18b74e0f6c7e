"""The adapter wire format: round trip, metadata, and every rejection the server relies on."""

import json

import numpy as np
import pytest

from hetlora.protocol.spec import AdapterSpec, LoRAModule
from hetlora.protocol.wire import Adapter, WireFormatError, decode, encode, validate

SPEC = AdapterSpec(
    model_hash="h", task="classification", targets=("q", "v"),
    modules={"l0.q": LoRAModule("l0.q", 6, 5), "l0.v": LoRAModule("l0.v", 6, 7)},
    dense={"head.weight": (3, 6), "head.bias": (3,)},
)


def make_adapter(rank=2, seed=0, **meta):
    rng = np.random.default_rng(seed)
    lora = {n: (rng.normal(size=(rank, m.in_features)).astype(np.float32),
                rng.normal(size=(m.out_features, rank)).astype(np.float32)) for n, m in SPEC.modules.items()}
    dense = {n: rng.normal(size=s).astype(np.float32) for n, s in SPEC.dense.items()}
    return Adapter(lora=lora, dense=dense, meta={"round": 1, "rank": rank, **meta})


def test_round_trip_is_bit_exact_and_keeps_metadata():
    adapter = make_adapter(rank=3, client_id="c1", indices=[0, 4, 5])
    back = decode(encode(adapter))
    assert back.meta == adapter.meta
    assert back.rank == 3
    for name, (a, b) in adapter.lora.items():
        np.testing.assert_array_equal(back.lora[name][0], a)
        np.testing.assert_array_equal(back.lora[name][1], b)
    for name, t in adapter.dense.items():
        np.testing.assert_array_equal(back.dense[name], t)
    assert validate(back, SPEC, max_rank=3) == 3


def test_encoded_file_is_plain_safetensors_with_documented_header():
    from safetensors import safe_open
    import tempfile, os

    data = encode(make_adapter(rank=2, client_id="x"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        open(path, "wb").write(data)
        with safe_open(path, framework="numpy") as f:
            md = f.metadata()
            assert md["format"] == "hetlora-adapter" and md["format_version"] == "1"
            assert json.loads(md["meta"])["client_id"] == "x"
            assert set(f.keys()) == {"l0.q.lora_A", "l0.q.lora_B", "l0.v.lora_A", "l0.v.lora_B", "head.weight", "head.bias"}
            assert f.get_tensor("l0.q.lora_A").shape == (2, 6)


@pytest.mark.parametrize("body,code", [
    (b"", "not_safetensors"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", "not_safetensors"),
    (b"\xff" * 64, "not_safetensors"),
    (b"PK\x03\x04 this is a zip file, maybe a pickle", "not_safetensors"),
])
def test_garbage_is_rejected_with_a_code(body, code):
    with pytest.raises(WireFormatError) as err:
        decode(body)
    assert err.value.code == code


def test_foreign_safetensors_without_our_metadata_is_rejected():
    from safetensors.numpy import save

    with pytest.raises(WireFormatError) as err:
        decode(save({"x": np.zeros(3, np.float32)}))
    assert err.value.code == "bad_metadata"


def test_non_float32_tensor_is_rejected():
    from safetensors.numpy import save

    data = save({"l0.q.lora_A": np.zeros((2, 6), np.float64)}, metadata={"format": "hetlora-adapter", "format_version": "1"})
    with pytest.raises(WireFormatError) as err:
        decode(data)
    assert err.value.code == "bad_dtype"


def _mutated(fn):
    adapter = make_adapter(rank=2)
    fn(adapter)
    return decode(encode(adapter))


@pytest.mark.parametrize("mutate,code", [
    (lambda a: a.lora.update({"l9.q": a.lora["l0.q"]}), "unknown_module"),
    (lambda a: a.lora.pop("l0.v"), "missing_module"),
    (lambda a: a.dense.pop("head.bias"), "missing_tensor"),
    (lambda a: a.dense.update({"other": np.zeros(2, np.float32)}), "unknown_tensor"),
    (lambda a: a.lora.update({"l0.q": (np.zeros((2, 5), np.float32), np.zeros((5, 2), np.float32))}), "bad_shape"),
    (lambda a: a.lora.update({"l0.q": (np.zeros((2, 6), np.float32), np.zeros((5, 3), np.float32))}), "bad_shape"),
    (lambda a: a.lora.update({"l0.q": (np.zeros((3, 6), np.float32), np.zeros((5, 3), np.float32))}), "mixed_rank"),
    (lambda a: a.dense.update({"head.bias": np.zeros(4, np.float32)}), "bad_shape"),
    (lambda a: a.lora["l0.q"][0].__setitem__((0, 0), np.nan), "not_finite"),
    (lambda a: a.dense["head.weight"].__setitem__((1, 1), np.inf), "not_finite"),
])
def test_validate_names_the_problem(mutate, code):
    with pytest.raises(WireFormatError) as err:
        validate(_mutated(mutate), SPEC, max_rank=4)
    assert err.value.code == code
    assert str(err.value)


def test_rank_above_assigned_is_rejected():
    with pytest.raises(WireFormatError) as err:
        validate(decode(encode(make_adapter(rank=3))), SPEC, max_rank=2)
    assert err.value.code == "rank_too_high"


def test_spec_json_round_trip_and_fingerprint():
    again = AdapterSpec.from_json(json.loads(json.dumps(SPEC.to_json())))
    assert again == SPEC and again.fingerprint == SPEC.fingerprint
    assert SPEC.lora_parameter_count(4) == 4 * (6 + 5) + 4 * (6 + 7)
    assert SPEC.dense_parameter_count() == 3 * 6 + 3
