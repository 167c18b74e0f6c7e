"""The Flower ClientApp: the device client behind Flower messages.

  query  the ServerApp's introduction request -> {name, profile, n_samples, requested_rank}
  train  a plan (mode "head-statistics": round-0 head statistics; "head-fit": a head round, the head in the
         message fitted on the frozen features; otherwise a LoRA round on the adapter in the message)
         -> the wire bytes it produced and a report (samples; losses; a LoRA round's fresh profile, ranks)
A user mistake (no data, a model that does not fit the run) becomes a Flower error reply with its
one-line message; the ServerApp logs it and goes on without the node.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from hetlora.errors import UserError
from hetlora_flower.device import LocalNode, LocalNodes, node_settings
from hetlora_flower.records import INTRO, PLAN, REPORT, message_content, read_content

log = logging.getLogger("hetlora.flower")
USER_ERROR = 1000  # the Flower error code of a reply that carries a UserError's message
app = ClientApp()
nodes = LocalNodes()  # this process's nodes, kept between messages


def _local_node(context: Context, run: dict) -> LocalNode:
    return nodes.node(node_settings(dict(context.node_config), dict(context.run_config), context.node_id), run)


def _answer(message: Message, work) -> Message:
    try:
        payload, report = work()
    except UserError as exc:
        log.error("%s", exc)
        return Message(Error(code=USER_ERROR, reason=str(exc)), reply_to=message)
    return Message(message_content(payload, REPORT, report), reply_to=message)


@app.query()
def introduce(message: Message, context: Context) -> Message:
    _, doc = read_content(message.content, INTRO)
    return _answer(message, lambda: (None, _local_node(context, doc["run"]).introduction()))


@app.train()
def train(message: Message, context: Context) -> Message:
    payload, doc = read_content(message.content, PLAN)

    return _answer(message, lambda: _local_node(context, doc["run"]).answer(payload, doc.get("plan"),
                                                                           doc["client_id"]))
