"""Rank tiers for heterogeneous devices: the policy data (tiers.json), the memory and cost models,
the tier decision (policy.py) and the device catalog (devices/*.json, catalog.py)."""
