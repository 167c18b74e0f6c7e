"""Following one upload's bytes through a running server: the modules they are handed into, in order.

A profile function (threading.setprofile: every thread started afterwards, so the server's event loop and its
worker threads) watches every call while armed. A call is on the data path when it is the route handler, or when
one of its arguments is the upload's bytes (by value) or an object derived from them: a carrier. What a call on the
path returns becomes a carrier when it holds content (bytes or tensors, a few levels down: not a row of numbers
about the upload), and so does what a carrier holds (a dataclass's fields, a container's items): the decoded
adapter, the checked update, the ClientResult kept for the combine step, the new global, its encoded bytes. Code
outside the repository's product packages is not watched (it passes the data on unseen), nor are generated
functions (a dataclass's __init__), nor a coroutine's or generator's resumptions.

`sequence(unit)` reads the calls as the units they enter (DataPath.sequence says how).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("hetlora", "server_stub", "hetlora_flower", "edge_client", "profiles")
SCALARS = (int, float, str, bool, type(None))
DEPTH = 3  # how far into a carrier its parts count as carriers too
CONTENT_DEPTH = 6  # how far down a value is searched for content (an Update's tensors are 5 levels down)
RESUMABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def product_module(frame) -> str | None:
    """The dotted module of a frame running product code from a file of this repository (None otherwise)."""
    path = Path(frame.f_code.co_filename)
    if not path.is_absolute() or ROOT not in path.parents:
        return None
    module = frame.f_globals.get("__name__", "")
    return module if module.split(".")[0] in PRODUCT else None


def _parts(value) -> list:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    return []


def _holds_content(value, depth: int) -> bool:
    """Whether `value` is, or holds within `depth` levels, tensor data or bytes: the upload's content, not the
    numbers said about it (a row, a statistics dict, a count)."""
    if isinstance(value, (bytes, bytearray, np.ndarray)):
        return True
    return depth > 0 and any(_holds_content(part, depth - 1) for part in _parts(value))


def _arguments(frame) -> list:
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARARGS) \
        + bool(code.co_flags & inspect.CO_VARKEYWORDS)
    return [frame.f_locals.get(name) for name in code.co_varnames[:count]]


class DataPath:
    """The calls on the path of the bytes given to `follow`, from `route` (module, function) until `end` (a function
    name) returns: `entries`, each (its module, the modules of its calling product frames, innermost first).
    `profile` is the function for threading.setprofile."""

    def __init__(self, route: tuple[str, str], end: str):
        self.route, self.end = route, end
        self.body, self.armed = b"", False
        self.done = threading.Event()
        self.entries: list[tuple[str, list[str]]] = []
        self.calls: list[str] = []  # every call on the path (module.function), for a failure message
        self._carriers: dict[int, object] = {}  # id -> the object (kept alive, so an id is not reused)
        self._on_path: dict[int, object] = {}  # id(frame) -> frame of the calls on the path
        self._started: dict[int, object] = {}  # generator and coroutine frames already entered
        self._lock = threading.Lock()

    def follow(self, body: bytes) -> None:
        """Start watching: the next call of the route is the path's start, `body` its bytes."""
        self.body, self.armed = body, True

    def sequence(self, unit: Callable[[str], str | None]) -> list[str]:
        """The units entered, consecutive repeats collapsed. `unit(module)` names a module's unit (None: transparent,
        neither an entry nor a break); an entry is a call on the path from another unit than the callee's."""
        sequence = []
        for module, callers in self.entries:
            callee = unit(module)
            caller = next((unit(m) for m in callers if unit(m) is not None), None)
            if callee is not None and callee != caller and (not sequence or sequence[-1] != callee):
                sequence.append(callee)
        return sequence

    @staticmethod
    def returns(sequence: list[str]) -> Counter:
        """Per unit, how many entries of `sequence` come back to it after it was left."""
        return Counter(unit for k, unit in enumerate(sequence) if unit in sequence[:k])

    def profile(self, frame, event, arg):
        if not self.armed or event not in ("call", "return"):
            return
        with self._lock:
            if event == "call":
                self._call(frame)
            elif id(frame) in self._on_path and not frame.f_code.co_flags & RESUMABLE:
                del self._on_path[id(frame)]
                self._carry(arg, DEPTH)
                if frame.f_code.co_name == self.end:
                    self.armed = False
                    self.done.set()

    def _call(self, frame) -> None:
        if frame.f_code.co_flags & RESUMABLE:
            if id(frame) in self._started:
                return  # a resumption, not a call
            self._started[id(frame)] = frame
        module = product_module(frame)
        if module is None:
            return
        route = (module, frame.f_code.co_name) == self.route
        if not route and not (self.entries and any(self._carries(v) for v in _arguments(frame))):
            return
        self._on_path[id(frame)] = frame
        self.calls.append(f"{module}.{frame.f_code.co_name}")
        callers, caller = [], frame.f_back
        while caller is not None and product_module(caller) is not None:
            callers.append(product_module(caller))
            caller = caller.f_back
        self.entries.append((module, callers))

    def _carries(self, value) -> bool:
        if isinstance(value, (bytes, bytearray)) and len(value) == len(self.body) and value == self.body:
            self._carry(value, DEPTH)
            return True
        if id(value) in self._carriers:
            return True
        return any(id(part) in self._carriers for part in _parts(value) if not isinstance(part, SCALARS))

    def _carry(self, value, depth: int) -> None:
        if depth == 0 or id(value) in self._carriers or not _holds_content(value, CONTENT_DEPTH):
            return
        self._carriers[id(value)] = value
        if not isinstance(value, np.ndarray):
            for part in _parts(value):
                self._carry(part, depth - 1)
