"""The aggregation server: HTTP API (app.py), the round state machine (rounds.py), storage (store.py).

The pure aggregation rules live in `hetlora.engine.aggregation`. Protocol: docs/PROTOCOL.md.
"""
