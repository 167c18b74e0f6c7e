"""The project's payloads inside Flower messages.

An adapter (or round-0 head statistics) travels as its wire bytes (safetensors, docs/PROTOCOL.md) in
one `Array` of an `ArrayRecord`: dtype "uint8", shape (n,), stype "hetlora-safetensors", data = the
bytes. Flower chunks large ArrayRecords in transit; the bytes arrive exactly as sent, so the receiver
runs the same decode and checks as the HTTP server and client.

A plan (what one node does in one round) and the run settings travel in a `ConfigRecord` as JSON
strings: Flower's ConfigRecord holds scalars and flat lists, a plan holds `null` and nested values.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

STYPE = "hetlora-safetensors"
PAYLOAD, INTRO, PLAN, REPORT = "payload", "intro", "plan", "report"


def payload_record(data: bytes) -> ArrayRecord:
    """Wire bytes as an ArrayRecord of one uint8 Array."""
    return ArrayRecord({"wire": Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=bytes(data))})


def payload_bytes(record: ArrayRecord) -> bytes:
    """The wire bytes of `payload_record` (ValueError for any other ArrayRecord)."""
    array = record.get("wire") if isinstance(record, ArrayRecord) else None
    if array is None or array.stype != STYPE or array.dtype != "uint8":
        raise ValueError(f"expected one {STYPE!r} array named 'wire' in the ArrayRecord")
    return bytes(array.data)


def json_record(doc: dict) -> ConfigRecord:
    """A JSON object as a ConfigRecord with one string entry."""
    return ConfigRecord({"json": json.dumps(doc, sort_keys=True)})


def record_json(record: ConfigRecord) -> dict:
    """The JSON object of `json_record` (ValueError when it is missing or not an object)."""
    text = record.get("json") if isinstance(record, ConfigRecord) else None
    if not isinstance(text, str):
        raise ValueError("expected a ConfigRecord with a 'json' string")
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("the ConfigRecord's 'json' entry is not a JSON object")
    return doc


def message_content(payload: bytes | None, doc_key: str, doc: dict) -> RecordDict:
    """A message body: the payload (when given) and one JSON document under `doc_key`."""
    content = RecordDict({doc_key: json_record(doc)})
    if payload is not None:
        content[PAYLOAD] = payload_record(payload)
    return content


def read_content(content: RecordDict, doc_key: str) -> tuple[bytes | None, dict]:
    """(payload bytes or None, the JSON document under `doc_key`) of a message body (ValueError)."""
    doc = record_json(content.config_records.get(doc_key))
    payload = content.array_records.get(PAYLOAD)
    return (payload_bytes(payload) if payload is not None else None), doc
