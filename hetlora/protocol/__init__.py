"""What client and server must agree on, importable without torch or FastAPI (numpy + safetensors only).

spec          AdapterSpec: adapted module names/shapes + dense tensors
wire          the adapter wire format (safetensors, scale folded in), decode + validate
head_stats    round-0 upload: per-class feature statistics, encode/decode + checks
energy        an upload's training seconds and estimated energy (watts x seconds), its check, a round's total
adapter_ops   truncate / select rank components of a wire Adapter
lora_rules    the training scale (alpha / r as a power of two) and HetLoRA's pruning rule
settings      TrainingSettings: the local training settings the run config and a plan carry
plan          ClientPlan / Tier: one client's round as the server's configure step decides it
atomic        crash-safe file writes (temp file + fsync + rename)
"""
