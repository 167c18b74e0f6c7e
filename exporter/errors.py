"""Turn an exporter's failure into a UserError that names the operation it could not handle."""

from __future__ import annotations

import re

from hetlora.errors import UserError

# Patterns that export tools use to name the operation they reject.
OPERATION_PATTERNS = (
    r"operator '?([\w:.]+)'? to ONNX",          # torch.onnx legacy exporter
    r"Operator ([\w.]+) is not in Core ATen",   # ExecuTorch edge verifier
    r"(aten[:.]{1,2}\w+(?:\.\w+)?)",            # any aten op named in the message
    r"No gradient (?:builder|defined) for (\w+)",  # ORT gradient graph builder
    r"op_type[=:]\s*'?(\w+)",
)


def unsupported_operation(message: str) -> str | None:
    """The operation named in an exporter's error message, or None."""
    for pattern in OPERATION_PATTERNS:
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def export_error(backend: str, what: str, exc: BaseException) -> UserError:
    """A one-line UserError: which backend failed on which model, and the unsupported operation if known."""
    message = str(exc).strip()
    first = next((line.strip() for line in message.splitlines() if line.strip()), type(exc).__name__)
    op = unsupported_operation(message)
    reason = f"unsupported operation {op}" if op else f"{type(exc).__name__}"
    return UserError(f"cannot export {what} to {backend}: {reason} ({first[:300]}); "
                     f"choose another model or --backends, or train with --backend torch")
