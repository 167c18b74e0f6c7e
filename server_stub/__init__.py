"""The aggregation server: HTTP API (app.py), the round state machine (rounds.py), storage (store.py).

The pure aggregation rules live in `server_stub.aggregation`. Protocol: docs/PROTOCOL.md.
"""
