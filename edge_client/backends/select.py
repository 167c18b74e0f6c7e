"""`--backend auto`: pick the fastest backend this platform offers, and say why.

Order (from `hetlora bench` on x86_64; see docs/EXPORT.md):
  x86_64 / AMD64  onnx when onnxruntime-training imports and artifacts exist (about torch speed,
                  lower memory), else torch
  aarch64 (Pi, Jetson)  torch (ExecuTorch training on aarch64 is unproven here: docs/DEVICES.md;
                  onnxruntime-training has no aarch64 wheel)
No backend trains without torch: ExecuTorch's Python runtime (its pybindings and TrainingModule) imports
torch itself, and so do the trainers' LoRA and objective code; without torch `auto` is a UserError.
  Termux (Android)  torch (the only backend with a Termux build)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform

from hetlora.errors import UserError

log = logging.getLogger(__name__)


def is_termux() -> bool:
    return "com.termux" in os.environ.get("PREFIX", "") or "TERMUX_VERSION" in os.environ


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose_backend(*, has_artifacts: bool, machine: str | None = None, termux: bool | None = None,
                   have=available) -> tuple[str, str]:
    """(backend, reason) for this platform; `machine`, `termux` and `have` are injectable for tests."""
    machine = (machine or platform.machine()).lower()
    if not have("torch"):
        raise UserError("no training backend without torch: torch, ONNX Runtime and ExecuTorch training all "
                        "need it here (ExecuTorch's Python runtime imports torch itself); install the client "
                        "extra: pip install 'hetlora-edge[client]'")
    termux = is_termux() if termux is None else termux
    if termux:
        return "torch", "Termux: torch is the only training backend with an Android/Termux build"
    if machine in ("x86_64", "amd64"):
        if has_artifacts and have("onnxruntime.training"):
            return "onnx", "x86_64 with onnxruntime-training and exported artifacts: ONNX Runtime trains at torch speed"
        if not has_artifacts:
            return "torch", "x86_64 without --artifacts: torch"
        return "torch", "x86_64 without onnxruntime-training: torch"
    if machine in ("aarch64", "arm64"):
        if have("torch"):
            return "torch", (f"{machine}: torch eager (ExecuTorch training is unproven on {machine}; "
                             "onnxruntime-training has no aarch64 wheel)")
    return "torch", f"{machine}: torch (no faster backend known for this platform)"
