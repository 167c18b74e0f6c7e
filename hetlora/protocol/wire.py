"""The adapter wire format: safetensors with the LoRA scale folded in.

Tensors (all float32, C-contiguous):
  `<module>.lora_A`  r x in
  `<module>.lora_B`  out x r        so that dW = lora_B @ lora_A exactly (no alpha / r)
  `<dense name>`     any shape      e.g. `classifier.weight`
Header metadata (safetensors `__metadata__`, str -> str):
  `format` = "hetlora-adapter", `format_version` = "1", `meta` = JSON object with
  round, client_id, rank, n_samples, indices (Fed-PLoRA), effective_rank (after pruning), ...

Decoding never unpickles; it parses the safetensors header and checks it before use.
See docs/PROTOCOL.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from hetlora.protocol.spec import AdapterSpec
from hetlora.errors import UserError

FORMAT = "hetlora-adapter"
FORMAT_VERSION = 1
LORA_A, LORA_B = ".lora_A", ".lora_B"


class WireFormatError(UserError):
    """An adapter file or upload that does not match the wire format or the spec.

    `code` is a stable machine-readable reason (the server returns it in its 4xx body).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Adapter:
    """LoRA factors per module (A: r x in, B: out x r, scale folded in), dense tensors and metadata."""

    lora: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The common rank of every module (0 for an adapter without LoRA modules)."""
        ranks = {a.shape[0] for a, _ in self.lora.values()}
        if len(ranks) > 1:
            raise WireFormatError("mixed_rank", f"modules have different ranks {sorted(ranks)}; all must share one rank")
        return ranks.pop() if ranks else 0


def encode(adapter: Adapter) -> bytes:
    """Serialise to safetensors bytes (float32)."""
    tensors: dict[str, np.ndarray] = {}
    for name, (a, b) in adapter.lora.items():
        tensors[name + LORA_A] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[name + LORA_B] = np.ascontiguousarray(b, dtype=np.float32)
    for name, t in adapter.dense.items():
        if name.endswith((LORA_A, LORA_B)):
            raise ValueError(f"dense tensor name {name!r} collides with the LoRA suffixes")
        tensors[name] = np.ascontiguousarray(t, dtype=np.float32)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(adapter.meta, sort_keys=True)}
    return st_save(tensors, metadata=metadata)


# Header limits checked before the header is parsed (a header bomb costs milliseconds): a header holds the
# metadata (meta JSON, well under HEADER_BASE_BYTES) and one entry per tensor (name, dtype, shape, offsets).
HEADER_BASE_BYTES = 16 * 1024
HEADER_BYTES_PER_TENSOR = 512
EXTRA_TENSORS = 16  # beyond the spec's: a few unknown names are refused by name (`unknown_module`), not as a bomb
MAX_ABS_VALUE = 1e4  # the largest |x| an adapter may carry, either way (docs/PROTOCOL.md section 3.1)


def spec_tensors(spec: AdapterSpec) -> int:
    """How many tensors an adapter of `spec` has at most: A and B per module, plus the dense tensors."""
    return 2 * len(spec.modules) + len(spec.dense)


def header_bytes(tensors: int) -> int:
    """The longest header a file of `tensors` tensors may have: HEADER_BASE_BYTES + HEADER_BYTES_PER_TENSOR each."""
    return HEADER_BASE_BYTES + HEADER_BYTES_PER_TENSOR * tensors


def max_wire_bytes(spec: AdapterSpec, rank: int) -> int:
    """The size of the largest valid adapter of `spec` at `rank` (float32 factors and dense tensors) with the
    longest allowed header: the cap on an upload's and a download's size."""
    floats = sum(rank * (m.in_features + m.out_features) for m in spec.modules.values())
    floats += sum(int(np.prod(shape)) for shape in spec.dense.values())
    return 8 + header_bytes(spec_tensors(spec) + EXTRA_TENSORS) + 4 * floats


def read_header(data: bytes, *, max_tensors: int | None = None) -> dict:
    """The safetensors header as a dict. With `max_tensors` (the spec's), a header longer than
    `header_bytes(max_tensors + EXTRA_TENSORS)` is refused before it is parsed, and one with more than
    max_tensors + EXTRA_TENSORS tensor entries after (WireFormatError `header_too_large`)."""
    max_tensors = None if max_tensors is None else max_tensors + EXTRA_TENSORS
    if len(data) < 8:
        raise WireFormatError("not_safetensors", "body is too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise WireFormatError("not_safetensors", "body is not a safetensors file (bad header length)")
    if max_tensors is not None and n > header_bytes(max_tensors):
        raise WireFormatError("header_too_large", f"the safetensors header has {n} bytes; this run's files have at "
                              f"most {max_tensors} tensors and {header_bytes(max_tensors)} header bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WireFormatError("not_safetensors", "body is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise WireFormatError("not_safetensors", "body is not a safetensors file (header is not an object)")
    if max_tensors is not None and len(header) - ("__metadata__" in header) > max_tensors:
        raise WireFormatError("header_too_large", f"the header lists {len(header) - 1} tensors; this run's files "
                              f"have at most {max_tensors}")
    return header


def parse_meta(metadata: dict) -> dict:
    """The JSON object in header metadata 'meta' (absent: {}); WireFormatError `bad_metadata` otherwise."""
    text = metadata.get("meta", "{}")
    if not isinstance(text, str):
        raise WireFormatError("bad_metadata", "header metadata 'meta' must be a string holding a JSON object")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise WireFormatError("bad_metadata", "header metadata 'meta' is not valid JSON") from None
    if not isinstance(meta, dict):
        raise WireFormatError("bad_metadata", "header metadata 'meta' must be a JSON object")
    return meta


def decode(data: bytes, *, max_tensors: int | None = None) -> Adapter:
    """Parse safetensors bytes into an Adapter. Raises WireFormatError on anything malformed; `max_tensors`:
    the header limits of `read_header`."""
    header = read_header(data, max_tensors=max_tensors)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise WireFormatError("bad_metadata", "header '__metadata__' must be an object of strings")
    if metadata.get("format") != FORMAT:
        raise WireFormatError("bad_metadata", f"header metadata 'format' must be {FORMAT!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise WireFormatError(
            "bad_version", f"format_version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    meta = parse_meta(metadata)
    for key, info in header.items():
        if key != "__metadata__" and (not isinstance(info, dict) or info.get("dtype") != "F32"):
            raise WireFormatError("bad_dtype", f"tensor {key!r} must be float32 (F32)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise WireFormatError("not_safetensors", f"body is not a valid safetensors file: {exc}") from None

    lora_a = {k[: -len(LORA_A)]: v for k, v in tensors.items() if k.endswith(LORA_A)}
    lora_b = {k[: -len(LORA_B)]: v for k, v in tensors.items() if k.endswith(LORA_B)}
    if lora_a.keys() != lora_b.keys():
        odd = sorted(lora_a.keys() ^ lora_b.keys())
        raise WireFormatError("unpaired_factor", f"modules {odd[:3]} have lora_A without lora_B or the reverse")
    dense = {k: v for k, v in tensors.items() if not k.endswith((LORA_A, LORA_B))}
    return Adapter(lora={k: (lora_a[k], lora_b[k]) for k in lora_a}, dense=dense, meta=meta)


def validate(adapter: Adapter, spec: AdapterSpec, *, max_rank: int, require_all_modules: bool = True) -> int:
    """Check names, shapes, rank and finiteness against `spec`; return the adapter's rank.

    Every module must have A of shape (r, in) and B of shape (out, r) with one common
    r <= max_rank; dense tensors must match their spec shapes exactly; nothing may be NaN/Inf.
    """
    unknown = sorted(set(adapter.lora) - set(spec.modules))
    if unknown:
        raise WireFormatError("unknown_module", f"unknown module {unknown[0]!r} ({len(unknown)} unknown); "
                              "client and server must use the same base model and LoRA targets")
    missing = sorted(set(spec.modules) - set(adapter.lora))
    if require_all_modules and missing:
        raise WireFormatError("missing_module", f"module {missing[0]!r} is missing ({len(missing)} missing)")
    unknown_dense = sorted(set(adapter.dense) - set(spec.dense))
    if unknown_dense:
        raise WireFormatError("unknown_tensor", f"unknown dense tensor {unknown_dense[0]!r}")
    missing_dense = sorted(set(spec.dense) - set(adapter.dense))
    if missing_dense:
        raise WireFormatError("missing_tensor", f"dense tensor {missing_dense[0]!r} is missing")

    for name, (a, b) in adapter.lora.items():
        m = spec.modules[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != m.in_features or b.shape[0] != m.out_features:
            raise WireFormatError("bad_shape", f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match "
                                  f"(r, {m.in_features}) / ({m.out_features}, r)")
        if b.shape[1] != a.shape[0]:
            raise WireFormatError("bad_shape", f"{name}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
    rank = adapter.rank
    if rank > max_rank:
        raise WireFormatError("rank_too_high", f"rank {rank} exceeds the assigned rank {max_rank}")
    for name, t in adapter.dense.items():
        if tuple(t.shape) != tuple(spec.dense[name]):
            raise WireFormatError("bad_shape", f"{name}: shape {tuple(t.shape)} does not match {tuple(spec.dense[name])}")
    for name, arr in _all_tensors(adapter):
        if not np.isfinite(arr).all():
            raise WireFormatError("not_finite", f"{name} contains NaN or Inf; the update was not stored")
    return rank


def check_values(adapter: Adapter, limit: float = MAX_ABS_VALUE) -> None:
    """WireFormatError `value_too_large` when any factor or dense value has |x| > limit."""
    for name, t in _all_tensors(adapter):
        if t.size and float(np.max(np.abs(t))) > limit:
            raise WireFormatError("value_too_large", f"{name} has a value of magnitude {float(np.max(np.abs(t))):.3g}, "
                                  f"above the limit of {limit:g} (scale folded in)")


def _all_tensors(adapter: Adapter):
    for name, (a, b) in adapter.lora.items():
        yield name + LORA_A, a
        yield name + LORA_B, b
    yield from adapter.dense.items()


MAX_INT = 2**31 - 1  # the largest count (round, rank, n_samples) either side accepts


def meta_int(meta: dict, key: str, *, minimum: int = 0) -> int:
    """An integer metadata field in minimum..MAX_INT, or a WireFormatError naming it."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise WireFormatError("bad_metadata", f"metadata field {key!r} must be an integer in {minimum}..{MAX_INT}, "
                              f"got {str(value)[:40]}")
    return value
