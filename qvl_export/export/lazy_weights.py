"""Tracing without the weights in memory: skeleton modules, lazily bound checkpoint tensors.

A part's module is built with its parameters left uninitialised (``skeleton``): the allocator
maps large uninitialised tensors without touching them, so a 28-layer decoder costs no resident
memory. It is traced with the exporter's optimizer off - the optimizer would fold
``Transpose(weight)`` into new constants computed from those uninitialised values - and every
initializer that is a parameter is then bound to an ``onnx_ir.LazyTensor`` that reads its
checkpoint tensor (memory-mapped safetensors) only when the part is saved, converted to the
part's dtype on the way (a bf16 checkpoint is never copied whole to fp32). Transposes of weights
become lazy transposed tensors; then the exporter's own optimizer runs (``optimize_ir``), with
nothing large left to fold. So a part is written tensor by tensor: one tensor in flight.

Valid for modules whose parameters are all in the load plan (every export-ready module of
``models/``): a parameter left unbound would be saved as uninitialised memory, so ``bind_lazy``
refuses a traced graph with any unbound parameter.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.loading.weights import (FLOAT_DTYPES, CheckpointWeights, dtype_unsupported, flattens_to,
                                        shape_mismatch)

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build modules inside this block with their parameters uninitialised (``torch.nn.init`` does
    nothing): the weights are bound from the checkpoint after tracing, never copied into them."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _ir_dtype(numpy_dtype: str):
    import onnx_ir as ir

    return {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}[numpy_dtype]


def _reader(weights: CheckpointWeights, source: str, dtype: str, transpose: bool,
            shape: tuple[int, ...]) -> Callable:
    """A function that reads ``source`` now, in ``dtype``, transposed / reshaped to ``shape``."""
    def read():
        import onnx_ir as ir
        import torch

        tensor = weights.get(source, dtype=getattr(torch, dtype))
        if transpose:
            tensor = tensor.t()
        tensor = tensor.reshape(shape).contiguous()
        if dtype == "bfloat16":  # numpy has no bfloat16: the same bits through ml_dtypes
            import ml_dtypes

            return ir.tensor(tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=source)
        return ir.tensor(tensor.numpy(), name=source)
    return read


def bind_lazy(model, weights: CheckpointWeights, plan: list[tuple[str, str, tuple[int, ...]]],
              transposed: set[str], dtype: str = "float32") -> None:
    """Replace every parameter initializer of a traced ``model`` by a lazy read of its checkpoint
    tensor. ``plan``: (parameter name, checkpoint name, shape the checkpoint tensor must have) as
    ``loading.weights.load_plan`` gives it; ``transposed``: parameters stored as the transpose of
    their checkpoint tensor. Shapes and dtypes are checked from the safetensors headers first."""
    import onnx_ir as ir

    inits = model.graph.initializers
    planned = {name for name, _, _ in plan}
    for name, source, expected in plan:
        if name not in inits:
            continue  # a parameter the trace did not use
        value = inits[name]
        param_shape = tuple(value.const_value.shape) if value.const_value is not None else tuple(value.shape)
        found = weights.shape(source)
        flatten = name not in transposed and flattens_to(found, expected)
        if found != expected and not flatten:
            raise QvlError(shape_mismatch(source, expected, found))
        if weights.dtype(source) not in FLOAT_DTYPES:
            raise QvlError(dtype_unsupported(source, weights.dtype(source)))
        value.const_value = ir.LazyTensor(_reader(weights, source, dtype, name in transposed, param_shape),
                                          dtype=_ir_dtype(dtype), shape=ir.Shape(param_shape), name=name)
    unbound = [n for n, v in inits.items() if n not in planned and _is_parameter_like(v)]
    if unbound:
        raise QvlError(f"internal: traced parameters without a checkpoint tensor: {unbound[:3]}")


def _is_parameter_like(value) -> bool:
    """Large floating initializers that the plan did not bind (buffers are small and computed)."""
    from qvl_export.export.trace_cache import is_placeholder

    const = value.const_value
    if is_placeholder(const):  # a cached graph's parameter: never a buffer
        return True
    return const is not None and not hasattr(const, "_func") and const.size > (1 << 16)


def fold_weight_transposes(model) -> int:
    """``Transpose(W)`` of a lazily bound weight -> one lazily transposed initializer (the exporter's
    optimizer would read W to fold it). Only 2-D transposes whose input has no other consumer."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not isinstance(src.const_value, ir.LazyTensor) or len(src.uses()) != 1:
            continue
        perm = node.attributes.get("perm")
        rank = len(src.const_value.shape)
        if rank != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        lazy = src.const_value
        shape = tuple(lazy.shape)[::-1]
        out = node.outputs[0]
        new = ir.Value(name=f"{src.name}.T", shape=ir.Shape(shape), type=ir.TensorType(lazy.dtype),
                       const_value=ir.LazyTensor(_transposed(lazy), dtype=lazy.dtype, shape=ir.Shape(shape),
                                                 name=f"{src.name}.T"))
        model.graph.register_initializer(new)
        out.replace_all_uses_with(new)
        if out in model.graph.outputs:
            continue
        model.graph.remove(node, safe=True)
        del model.graph.initializers[src.name]
        count += 1
    return count


def _transposed(lazy) -> Callable:
    def read():
        import onnx_ir as ir

        return ir.tensor(np.ascontiguousarray(lazy.numpy().T), name=lazy.name)
    return read
