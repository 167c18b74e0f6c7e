"""What a command prints: one line per meaningful event, third-party chatter silenced at its source.

Verbosity -1 (-q): warnings and errors only, no progress bars.
Verbosity 0 (default): the project's loggers (PROJECT_LOGGERS: `hetlora.*` and the packages'
`__name__` loggers) at INFO; every other logger, the root included, at WARNING (executorch logs its
export steps on the root logger at INFO); the loggers in QUIET at ERROR; the Python warnings in
WARNINGS ignored; ONNX Runtime's C++ log at ERROR; transformers' own progress bars off. The
project's progress bars (export, rounds, bench) stay.
Verbosity 1 (-v): everything at DEBUG, nothing silenced.
Progress bars only ever go to a terminal: never into a log file or a journal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager

PROJECT_LOGGERS = ("hetlora", "edge_client", "server_stub", "exporter", "profiles", "simulation", "hetlora_flower")
# logger name -> why it is silenced by default
QUIET = {
    "torchao": "warns that its CUDA kernels fail to load in a CPU build of torch",
    "torch.utils._pytree": "deprecation warnings about torchao's enum registrations",
    "torch.onnx": "exporter progress and fallbacks, reported by the project as one line per artifact",
    "onnxscript": "optimizer and rewriter notes during ONNX export",
    "executorch": "partitioner and memory-planning notes",
    "urllib3": "a long 'Retrying (...)' line per retry; edge_client.retry logs each retry in one short line",
}
# (category, message regex, module regex, why): Python warnings of third-party code ignored by default
WARNINGS = [
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", "", "torch.export's own use of an old API"),
    (UserWarning, r"The tensor attributes .* were assigned during export", "",
     "the LoRA keep_mask and scale constants are baked into an artifact on purpose"),
    (UserWarning, r"Exporting aten::index operator of advanced indexing", "", "an ONNX opset note, no action"),
    (UserWarning, r"Warning: ONNX export of embedding with padding_idx", "",
     "the embeddings are frozen, so their padding row's gradient is never used"),
    (Warning, r"Converting a tensor to a Python boolean", r"transformers\.",
     "attention-mask code traced at a fixed shape, as the artifacts are"),
]
# native log lines dropped by native_stderr_filtered: ONNX Runtime's below ERROR (verbose, info, warning:
# "[W:onnxruntime:..."), and ExecuTorch's CPU probing when its threadpool starts ("[cpuinfo_utils.cpp:71] ...")
NATIVE_CHATTER = re.compile(r"\[[VIW]:onnxruntime:|\[cpuinfo_utils\.cpp:\d+\]")
ORT_ERROR = 3  # onnxruntime severity: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
_verbosity = 0


def verbosity() -> int:
    """The level set by `configure`: -1 quiet, 0 default, 1 verbose."""
    return _verbosity


def show_progress() -> bool:
    """Progress bars are drawn when stderr is a terminal, unless -q was given."""
    return _verbosity >= 0 and sys.stderr.isatty()


def configure(level: int) -> None:
    """Set the log levels for `level` (-1, 0 or 1) before any heavy import happens."""
    global _verbosity
    _verbosity = level
    root_level = logging.DEBUG if level > 0 else logging.WARNING
    logging.basicConfig(level=root_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(root_level)  # also when a host (pytest) configured logging first
    for name in PROJECT_LOGGERS:
        own = logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING
        logging.getLogger(name).setLevel(own)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.NOTSET if level > 0 else logging.ERROR)
    if level <= 0:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' sub-second weight-loading bar
        for category, message, module, _why in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_onnxruntime() -> None:
    """ONNX Runtime's own (C++) logger at ERROR unless -v; call after importing onnxruntime."""
    if _verbosity > 0 or "onnxruntime" not in sys.modules:
        return
    sys.modules["onnxruntime"].set_default_logger_severity(ORT_ERROR)


@contextmanager
def native_stderr_filtered():
    """Hold what native code writes to file descriptor 2 inside the block and pass it on afterwards without
    ONNX Runtime's verbose, info and warning lines and ExecuTorch's CPU-probing info lines (everything passes
    with -v). For C++ loggers that ignore the severity set from Python, such as ORT's training-graph builder."""
    if _verbosity > 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not NATIVE_CHATTER.search(line)]
            sys.stderr.write("".join(kept))
