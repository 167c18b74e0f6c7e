"""Device-side runtime: local LoRA training, self-pruning, profiling and the server protocol."""
