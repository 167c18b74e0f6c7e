"""Checks of the server's JSON answers, so a wrong or foreign server is one error line, never a traceback.

`json_object` turns a response into a dict (or raises `BadServerAnswer`); `require` checks that the fields
the client reads are there with the JSON types of docs/PROTOCOL.md section 5.
"""

from __future__ import annotations

from hetlora.errors import ServerProblem

RUN_FIELDS = {"task": str, "targets": list, "spec_fingerprint": str, "aggregator": str, "ranks": list,
              "lora_alpha": (int, float)}
REGISTER_FIELDS = {"client_id": str, "token": str, "rank": int, "run": dict}
ROUND_FIELDS = {"round": int, "state": str, "selected": bool, "uploaded": bool, "rank": int}
PROFILE_FIELDS = {"rank": int}


class BadServerAnswer(ServerProblem):
    """The server answered, but not as the protocol says (another service at the URL, a proxy page, a bug)."""


def json_object(response, what: str) -> dict:
    """The response body as a JSON object, or BadServerAnswer quoting what came instead."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("content-type", "no content type")
        snippet = " ".join(response.text[:80].split())
        raise BadServerAnswer(f"{what}: the server answered {response.status_code} with {kind}, not a JSON object "
                              f"({snippet!r}); is --server the URL of a hetlora server?")
    return body


def require(body: dict, fields: dict, what: str) -> dict:
    """`body` when every field is present with its type (bool is not an int), else BadServerAnswer."""
    for name, kinds in fields.items():
        value = body.get(name)
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise BadServerAnswer(f"{what}: the server's answer has no valid {name!r} (got {str(value)[:40]}); "
                                  "is the server a hetlora server of the same protocol version?")
    return body


def check_run(run: dict, what: str = "run config") -> dict:
    """The run config's fields the client uses (section 5, `GET /v1/run`)."""
    require(run, RUN_FIELDS, what)
    if not run["ranks"] or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in run["ranks"]):
        raise BadServerAnswer(f"{what}: 'ranks' must be a non-empty list of positive integers, got {run['ranks']!r}")
    labels = run.get("labels")
    if run["task"] == "classification" and not (isinstance(labels, list) and labels
                                                and all(isinstance(x, str) for x in labels)):
        raise BadServerAnswer(f"{what}: a classification run needs 'labels', a list of strings")
    return run
