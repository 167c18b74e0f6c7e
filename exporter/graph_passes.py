"""Rewrites of the joint forward + backward ATen graph before ExecuTorch lowering; each keeps the math exact.

Measured on MiniLM rank 8 (16 x 64), ExecuTorch's CPU kernels (ETDump):
the portable `addmm` is a naive loop and took 90% of a 15.5 s step; as `mm` + `add` the step took 2.2 s.
`linear(x, W)` on a frozen W lets XNNPACK read W as stored, with no transposed copy (see executorch_export.py).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

aten = torch.ops.aten


def frozen_parameters(program: ExportedProgram) -> set[Node]:
    """Placeholders of parameters that get no gradient: the base weights, constant for the program's life."""
    sig = program.graph_signature
    trained = set(sig.backward_signature.gradients_to_parameters.values()) if sig.backward_signature else set()
    return {node for node in program.graph.nodes if node.op == "placeholder"
            and sig.inputs_to_parameters.get(node.name, None) not in (None, *trained)}


def rewrite_empty_permuted(program: ExportedProgram) -> int:
    """aten.empty_permuted (not core ATen; Llama's backward uses it) -> empty + permute.

    empty_permuted(size, layout) allocates sizes in `layout` order and views them back in logical order:
    empty([size[i] for i in layout]).permute(inverse(layout)).
    """
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.target != aten.empty_permuted.default:
            continue
        size, layout = node.args[0], list(node.args[1])
        inverse = [layout.index(i) for i in range(len(layout))]
        with graph.inserting_before(node):
            physical = graph.call_function(aten.empty.memory_format, ([size[i] for i in layout],), dict(node.kwargs))
            physical.meta = dict(node.meta)
            _replace(graph, node, aten.permute.default, (physical, inverse))
        count += 1
    return _finish(program, count)


def drop_inverse_permutes(program: ExportedProgram) -> int:
    """permute(permute(x, p), q) -> x when q undoes p (the backward of a linear transposes W^T back to W)."""
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        inner = node.args[0] if node.target == aten.permute.default else None
        if getattr(inner, "target", None) != aten.permute.default:
            continue
        p, q = list(inner.args[1]), list(node.args[1])
        if [p[i] for i in q] == list(range(len(p))):
            node.replace_all_uses_with(inner.args[0])
            graph.erase_node(node)
            count += 1
    return _finish(program, count)


def split_addmm(program: ExportedProgram, *, linearize: set[Node] = frozenset()) -> int:
    """addmm(b, x, W^T) -> linear(x, W, b) when W is in `linearize`; every other addmm -> add(mm(x, M), b).

    Also mm(x, W^T) -> linear(x, W) for W in `linearize`. Only addmm with beta = alpha = 1 (what a
    linear layer decomposes into) is rewritten.
    """
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.target == aten.addmm.default and not node.kwargs:
            bias, x, weight = node.args
            with graph.inserting_before(node):
                if _is_transpose_of(weight, linearize):
                    _replace(graph, node, aten.linear.default, (x, weight.args[0], bias))
                else:
                    product = graph.call_function(aten.mm.default, (x, weight))
                    product.meta = dict(node.meta)
                    _replace(graph, node, aten.add.Tensor, (product, bias))
            count += 1
        elif node.target == aten.mm.default and _is_transpose_of(node.args[1], linearize):
            with graph.inserting_before(node):
                _replace(graph, node, aten.linear.default, (node.args[0], node.args[1].args[0]))
            count += 1
    return _finish(program, count)


def simplify_elementwise(program: ExportedProgram) -> int:
    """Exact rewrites of scalar-loop CPU ops into what XNNPACK takes or into nothing.

    pow(x, 2) -> mul(x, x) (XNNPACK's multiply; both round x*x once); pow(x, 1) -> x; expand(x, size)
    to x's own shape -> x; alias(x) -> x. On SmolLM2 (RMSNorm forward and backward, attention backward)
    these ran on ExecuTorch's portable kernels, one thread: pow 140 ms and expand_copy 70 ms of a 1.8 s
    step (ETDump). ExecuTorch runs an alias as a copy: 1,026 a step, two of them of the (B*T, V) log-softmax.
    A node feeding the graph's output is left alone (the output must stay a distinct tensor).
    """
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or any(user.op == "output" for user in node.users):
            continue
        if node.target == aten.pow.Tensor_Scalar and not node.kwargs:
            x, exponent = node.args
            if isinstance(exponent, bool) or exponent not in (1, 2):
                continue
            if exponent == 1:
                node.replace_all_uses_with(x)
                graph.erase_node(node)
            else:
                with graph.inserting_before(node):
                    _replace(graph, node, aten.mul.Tensor, (x, x))
            count += 1
        elif node.target == aten.alias.default or (node.target == aten.expand.default
                                                    and _same_shape(node, node.args[0])):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            count += 1
    return _finish(program, count)


def split_long_contractions(program: ExportedProgram, *, longer_than: int = 8192, chunk: int = 1024) -> int:
    """mm(a, b) over a contraction K > `longer_than` -> sum over j of mm(a[:, j:j+chunk], b[j:j+chunk, :]).

    XNNPACK's GEMM walks the whole K for every tile of the output, so a long contraction streams its
    operands from memory again and again. SmolLM2's output head backward, (512 x 49,152) @ (49,152 x 576)
    at 8 x 64 tokens, ran at 60 GFLOPS in one product and at about 190 in 48 products of K = 1024
    (single-op programs, 2 threads). Only the summation order changes: equal up to rounding.
    """
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.target != aten.mm.default or any(user.op == "output" for user in node.users):
            continue
        a, b = node.args
        k = a.meta["val"].shape[1]
        if k <= longer_than:
            continue
        with graph.inserting_before(node):
            total = None
            for start in range(0, k, chunk):
                end = min(start + chunk, k)
                part = _call(graph, aten.mm.default, (_call(graph, aten.slice.Tensor, (a, 1, start, end)),
                                                      _call(graph, aten.slice.Tensor, (b, 0, start, end))))
                total = part if total is None else _call(graph, aten.add.Tensor, (total, part))
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        count += 1
    return _finish(program, count)


def _call(graph, target, args) -> Node:
    """A new node target(*args) whose meta["val"] is computed from its inputs' fake values."""
    node = graph.call_function(target, args)
    node.meta["val"] = target(*[arg.meta["val"] if isinstance(arg, Node) else arg for arg in args])
    return node


def _same_shape(node: Node, source) -> bool:
    out, src = node.meta.get("val"), getattr(source, "meta", {}).get("val")
    return (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor)
            and tuple(out.shape) == tuple(src.shape))


def _is_transpose_of(node, candidates: set[Node]) -> bool:
    return (getattr(node, "target", None) == aten.permute.default and list(node.args[1]) == [1, 0]
            and node.args[0] in candidates)


def _replace(graph, node: Node, target, args) -> Node:
    new = graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _finish(program: ExportedProgram, count: int) -> int:
    if count:
        program.graph_module.graph.eliminate_dead_code()
        program.graph_module.graph.lint()
        program.graph_module.recompile()
    return count
