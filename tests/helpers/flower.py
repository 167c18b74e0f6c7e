"""The in-process Flower tests' labels and rows, a Grid that hands every message to the ClientApp of its node in this
process, and the influence bound as the strategy applies it."""

from __future__ import annotations

from flwr.serverapp import Grid

from hetlora_flower import client_app
from hetlora.engine.aggregation.bounds import bound_influence
from tests.conftest import ARTIFACT_LABELS

LABELS = list(ARTIFACT_LABELS)  # the session's exported artifacts (conftest.tiny_artifacts) fit these runs
ROWS = [("how do I activate my new card", "card"), ("send money to my friend abroad", "transfer"),
        ("what is the exchange rate for euros", "rate"), ("convert pounds to euros for me", "rate")]


def bounded(rule, start, results):
    """The results after bounded influence, each measured from the start its plan gave it (meta rank, indices)."""
    starts = [rule.upload_start(start, res.adapter.meta["rank"], res.indices) for res in results]
    return bound_influence(starts, results)[0]


class LoopbackGrid(Grid):
    """Each message goes to the ClientApp of its node in this process; `traffic` keeps (message, reply) pairs."""

    def __init__(self, contexts: dict):
        self.contexts, self.traffic = contexts, []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            replies.append(self.answer(message))
            self.traffic.append((message, replies[-1]))
        return replies

    def answer(self, message):
        """The reply of the message's node (a subclass may stand for a node that lies)."""
        return client_app.app(message, self.contexts[message.metadata.dst_node_id])

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError
