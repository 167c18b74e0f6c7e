"""Trainable on-device artifacts (ExecuTorch `.pte`, ONNX Runtime training) per LoRA rank tier.

Needs the `export` extra. Devices never import this package: they read the artifacts with
`edge_client.backends`.
"""

EXECUTORCH_DELEGATES = ("xnnpack", "portable")  # default first; see exporter/executorch_export.py
