"""hetlora-edge: federated LoRA fine-tuning on heterogeneous edge devices."""

__version__ = "0.1.0"
