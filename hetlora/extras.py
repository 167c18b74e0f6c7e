"""Which extra of hetlora-edge installs a missing package: one line instead of a ModuleNotFoundError.

The extras are those of pyproject.toml; a command that exists only for one extra (serve, export) names
that extra for any of its packages, other commands name the smallest extra that brings the package.
"""

from __future__ import annotations

# top-level import name -> the smallest extra that installs it
EXTRA_OF_MODULE = {
    "torch": "client", "transformers": "client", "tokenizers": "client", "requests": "client",
    "tqdm": "client", "psutil": "client",
    "fastapi": "server", "uvicorn": "server", "starlette": "server", "pydantic": "server",
    "executorch": "executorch",
    "onnx": "export", "onnxruntime": "export", "onnxscript": "export",
    "matplotlib": "plots",
    "peft": "dev",
    "sklearn": "evaluate",
}
COMMAND_EXTRA = {"serve": "server", "export": "export"}
MODEL_STACK = {"torch", "transformers", "tokenizers"}  # hetlora.models: in the client, server and export extras
EXTRA_MODULES = {"server": {"fastapi", "uvicorn", "starlette", "pydantic"} | MODEL_STACK,
                 "export": {"executorch", "onnx", "onnxruntime", "onnxscript"} | MODEL_STACK}


def extra_for(command: str, module: str | None) -> str | None:
    """The extra that provides top-level package `module` for `command`; None for anything else."""
    top = (module or "").split(".")[0]
    own = COMMAND_EXTRA.get(command)
    if own and top in EXTRA_MODULES[own]:
        return own
    return EXTRA_OF_MODULE.get(top)


def missing_extra_message(command: str, module: str) -> str | None:
    """'hetlora CMD: needs X; install the E extra: pip install 'hetlora-edge[E]'', or None if unknown."""
    extra = extra_for(command, module)
    if extra is None:
        return None
    return (f"hetlora {command}: needs the Python package '{module.split('.')[0]}', not installed; "
            f"install the {extra} extra: pip install 'hetlora-edge[{extra}]'")
