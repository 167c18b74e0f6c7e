"""Predicted peak memory (resident set) of LoRA training, per training backend.

    peak = runtime + weights + workspace * activations + trainable * bytes * (1 + 1 + optimizer_slots)

- runtime: the process before the model exists (Python + torch + transformers imported) plus what
  a first training step allocates once (thread pools, kernel scratch); a measured constant. A backend whose
  loaded program holds more than torch does adds its own measured constant (`BACKEND_PROGRAM_BYTES`).
- weights: the frozen base model, `frozen_params * bytes(dtype)`.
- activations: the tensors autograd keeps for backward, summed over layers
      per layer = bytes * (c_h * b*s*h + c_kv * b*s*kv + c_i * b*s*I + c_att * b*a*s^2 + n_lora * b*s*r)
  with per-architecture counts (`ACTIVATION_COUNTS`), plus the output head's logits for a causal LM:
  f*b*s*V, the head running only at the f share of positions that have a target (a chat reply is about a
  third of its row, a plain-text row all of it; TARGET_FRACTION when unknown). The artifact backends
  (onnx, executorch) have fixed shapes and run the head at every position: f = 1 for them.
  b batch, s sequence, h hidden, kv key/value width, I FFN width, a heads, r rank.
- workspace: peak RSS per byte of saved activations (activation gradients alive during backward,
  temporaries and what the allocator keeps); a measured factor per architecture.
- activation checkpointing (torch backend only): each layer keeps only its input, b*s*h, and is recomputed
  in backward, so the saved activations are L*b*s*h + one layer's full set + the head's logits, with a larger
  measured workspace factor (the recomputed layer's and the head's transients now dominate).
- trainable: LoRA parameters (sum of r * (in + out)) plus dense ones (a classification head), each with
  a gradient and `optimizer_slots` state tensors (AdamW keeps 2: exp_avg, exp_avg_sq; SGD 0).

Pure arithmetic on model shape numbers: no torch needed, so the server and a device's policy can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hetlora.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "sgd": 0}

# Tensors one transformer layer saves for backward, counted with torch.autograd.graph.saved_tensors_hooks
# on transformers 5.23 (sdpa attention, training mode, LoRA on every linear layer of the block):
#   bert: 10 (b,s,h) [linear inputs, q/k/v, residual and LayerNorm tensors, dropout masks], 2 (b,s,I)
#         [GELU input and output], 3 (b,a,s,s) [softmax output, dropout mask, dropped probabilities: with
#         attention dropout on, CPU sdpa takes the math path and materialises the scores].
#   llama: 6 (b,s,h), 2 (b,s,kv) [k, v for the flash kernel: no (s,s) tensor], 4 (b,s,I) [gate, up,
#          SiLU(gate), their product].
ACTIVATION_COUNTS = {
    "bert": {"hidden": 10, "kv": 0, "intermediate": 2, "attention": 3},
    "llama": {"hidden": 6, "kv": 2, "intermediate": 4, "attention": 0},
}
ARCHITECTURES = {"bert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama"}

# Calibrated with benchmarks/bench_memory.py on this project's build machine (x86_64, glibc, torch 2.13,
# transformers 5.23, 2 threads): MiniLM-L6 at ranks 4..64, batch x seq 8x64 and 16x128, peak RSS over two
# AdamW steps; least squares of (measured - weights - trainable state) on (1, saved activations) over
# those 10 rows. 16x64 and 4x256 were held out (see the benchmark's table). Staged RSS of the same process:
# 250 MB after importing torch + transformers, 412 MB after loading MiniLM (91 MB of weights), so the
# runtime constant is about 250 MB of libraries + 70 MB transient of the weight load + 145 MB that the
# first training step allocates once. The workspace factor of about 2 is activation gradients alive
# during backward plus what glibc's allocator keeps (peak RSS is 2-8% noisy run to run).
# Llama: SmolLM2-135M-Instruct at ranks 4 and 32, batch x seq 4x64, 8x64 and 8x128 (targets on a third of each
# row), the runtime constant held at MiniLM's: workspace 1.70 (least squares), within 7% on those rows.
# ExecuTorch on a Llama: SmolLM2-135M rank 8 from its XNNPACK artifacts, frozen weights read in place from the
# .ptd (not packed at load), peaked at 2212 MiB at batch 8 x 64 and 1670 MiB at 4 x 64 (`hetlora bench`), 56 and
# 95 MiB above the torch formula with the head at every position: the program's own state (1,658 delegate
# instances, their XNNPACK workspaces), a constant of 75 MiB (the mean). When XNNPACK packed the weights at load
# the excess was 702-708 MiB: each frozen weight packed once per layout (forward W, backward W^T). The sixth
# session's programs (loss shifted on the hidden states, MLP weights in blocks) peaked at 2142 and 1687 MiB:
# predicted +4.2% and -2.2% with the same constant, which is kept.
# MiniLM's ExecuTorch peak (757 MiB at 16 x 64, rank 8) is under the bert factor's prediction: no constant.
# Activation checkpointing (benchmarks/bench_memory.py --activation-checkpointing, RUNTIME_BYTES held, least squares
# of the excess over weights and trainable state on the checkpointed saved bytes): SmolLM2-135M rank 8 peaked at
# 1309, 1646, 1920 and 2916 MB at 4x64, 8x64, 8x128 and 16x128 (targets on a third of each row), factor 5.26,
# within 8% on each (a repeat gave 1370-2988 MB; the tests allow 10%). MiniLM rank 8 and 32 at 8x64, 16x128 and
# 32x128: 2.47 (its transients are small next to the weights).
RUNTIME_BYTES = 464_000_000
WORKSPACE_FACTORS = {"bert": 1.97, "llama": 1.70}
CHECKPOINTED_WORKSPACE_FACTORS = {"bert": 2.47, "llama": 5.26}
BACKEND_PROGRAM_BYTES = {("llama", "executorch"): 75 * 2**20}
TARGET_FRACTION = 0.5
BACKENDS = ("torch", "onnx", "executorch")
HEAD_AT_EVERY_POSITION = frozenset({"onnx", "executorch"})


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformer that set its training memory and cost."""

    architecture: str  # a key of ACTIVATION_COUNTS
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    frozen_params: int  # every base-model parameter
    matmul_params: int  # the parameters of the layers' linear maps (what a token's matmuls touch)

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a Hugging Face config.json dict (BERT or Llama family); parameter counts by closed form."""
        mtype = config.get("model_type", "")
        if mtype not in ARCHITECTURES:
            raise UserError(f"the memory model knows model types {sorted(ARCHITECTURES)}, not {mtype!r}; "
                            "use one of those or pass the numbers to ModelShape directly")
        try:
            h, layers, heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
            inter, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"config.json lacks a number the memory model needs: {exc}") from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        positions = int(config.get("max_position_embeddings") or 0)
        arch = ARCHITECTURES[mtype]
        if arch == "bert":
            layer = 4 * (h * h + h) + 2 * h * inter + inter + h + 2 * 2 * h
            embed = (vocab + positions + int(config.get("type_vocab_size", 2))) * h + 2 * h
            frozen = embed + layers * layer + h * h + h  # + pooler
            matmul = layers * (4 * h * h + 2 * h * inter)
        else:
            kv = kv_heads * (h // heads)
            matmul_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
            head = 0 if config.get("tie_word_embeddings") else vocab * h
            frozen = vocab * h + layers * (matmul_layer + 2 * h) + h + head
            matmul = layers * matmul_layer + vocab * h
        return cls(arch, h, layers, heads, kv_heads, inter, vocab, positions, frozen, matmul)

    @classmethod
    def from_model_dir(cls, model_dir) -> "ModelShape":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"{model_dir} is not a model folder (no config.json)")
        return cls.from_config(json.loads(path.read_text()))

    @property
    def head_matmul_params(self) -> int:
        """The output head's share of `matmul_params` (a causal LM's vocab projection; BERT's count has none)."""
        return self.vocab * self.hidden if self.architecture == "llama" else 0

    def default_lora_modules(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one block: the default LoRA targets."""
        h, i = self.hidden, self.intermediate
        if self.architecture == "bert":
            return [(h, h)] * 4 + [(h, i), (i, h)]
        kv = self.kv_heads * (h // self.heads)
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def default_lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.default_lora_modules())


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory in bytes, by component; `total` is their sum."""

    runtime: int
    weights: int
    activations: int
    lora_params: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.activations + self.lora_params + self.gradients + self.optimizer_state

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "weights": self.weights, "activations": self.activations,
                "lora_params": self.lora_params, "gradients": self.gradients,
                "optimizer_state": self.optimizer_state, "total": self.total}


def saved_activation_bytes(shape: ModelShape, batch: int, seq_len: int, rank: int, lora_modules_per_layer: int,
                           dtype: str = "float32", task: str = "classification",
                           target_fraction: float = TARGET_FRACTION, checkpointed: bool = False) -> int:
    """Bytes autograd keeps for backward (see the module docstring), before the workspace factor; `checkpointed`:
    with activation checkpointing (each layer's input, plus one layer's full set while it is recomputed)."""
    c = ACTIVATION_COUNTS[shape.architecture]
    tokens = batch * seq_len
    kv = shape.kv_heads * (shape.hidden // shape.heads)
    per_layer = (c["hidden"] * tokens * shape.hidden + c["kv"] * tokens * kv
                 + c["intermediate"] * tokens * shape.intermediate
                 + c["attention"] * batch * shape.heads * seq_len * seq_len
                 + lora_modules_per_layer * tokens * rank)
    head = target_fraction * tokens * shape.vocab if task == "causal-lm" else 0
    layers = shape.layers * tokens * shape.hidden + per_layer if checkpointed else shape.layers * per_layer
    return int(_dtype_bytes(dtype) * (layers + head))


def predict_peak_memory(shape: ModelShape, rank: int, batch: int, seq_len: int, *, lora_params: int | None = None,
                        lora_modules: int | None = None, dense_params: int = 0, dtype: str = "float32",
                        optimizer: str = "adamw", task: str = "classification",
                        target_fraction: float = TARGET_FRACTION, runtime_bytes: int = RUNTIME_BYTES,
                        workspace_factor: float | None = None, backend: str = "torch",
                        activation_checkpointing: bool = False) -> MemoryEstimate:
    """Peak training memory for one configuration (formula in the module docstring), on `backend`, with or
    without activation checkpointing (the torch backend's; an exported program's graph is fixed).

    `lora_params` / `lora_modules` (total adapted modules) come from an AdapterSpec when one is known
    (`spec.lora_parameter_count(rank)`, `len(spec.modules)`); by default every linear layer of every block.
    Trainable tensors are kept in float32 whatever the frozen weights' dtype.
    """
    for name, value in (("rank", rank), ("batch", batch), ("seq_len", seq_len)):
        if int(value) < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if optimizer not in OPTIMIZER_SLOTS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_SLOTS)}")
    if backend not in BACKENDS:
        raise UserError(f"unknown training backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if activation_checkpointing and backend != "torch":
        raise UserError(f"activation checkpointing is a torch-backend option; {backend} runs a fixed exported graph")
    if backend in HEAD_AT_EVERY_POSITION:
        target_fraction = 1.0
    if lora_params is None:
        lora_params = shape.default_lora_params(rank)
    if lora_modules is None:
        lora_modules = shape.layers * len(shape.default_lora_modules())
    per_layer_modules = -(-lora_modules // shape.layers)
    trainable_bytes = 4 * (lora_params + dense_params)
    activations = saved_activation_bytes(shape, batch, seq_len, rank, per_layer_modules, dtype, task, target_fraction,
                                         checkpointed=activation_checkpointing)
    if workspace_factor is None:
        factors = CHECKPOINTED_WORKSPACE_FACTORS if activation_checkpointing else WORKSPACE_FACTORS
        workspace_factor = factors[shape.architecture]
    return MemoryEstimate(
        runtime=int(runtime_bytes) + BACKEND_PROGRAM_BYTES.get((shape.architecture, backend), 0),
        weights=shape.frozen_params * _dtype_bytes(dtype),
        activations=int(workspace_factor * activations),
        lora_params=trainable_bytes,
        gradients=trainable_bytes,
        optimizer_state=OPTIMIZER_SLOTS[optimizer] * trainable_bytes,
    )


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]
