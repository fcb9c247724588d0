"""Sibling MatMuls on one activation -> one MatMul over concatenated weights + Split (gate/up; q/k/v on request).

In every decoder layer the MLP's ``gate_proj`` and ``up_proj`` read the same normed hidden state, and
so do ``q_proj``, ``k_proj`` and ``v_proj`` (with bias). This pass concatenates sibling weights along N
(and the biases, when every member has one) so one MatMul [K, N1+N2(+N3)] (+ one bias Add) and a
``Split`` on the last axis replace them. Plain ONNX (MatMul, Add, Split): valid for both targets.

Candidates: the MatMul consumers of one value whose weight is a constant [K, N] initializer of one
dtype; a member's bias is a constant [N] added right after it (its MatMul output has no other reader).
Members with and without a bias are not mixed. ``kinds`` picks groups of 2 (``gate_up``) and/or 3
(``qkv``); the default is ``gate_up`` only, by measurement (onnxruntime 1.31 CPU, fp32, 2 threads,
hidden 2048 / intermediate 11008): one MatMul [2048, 22016] streams the weights of a decode step
(M = 1) ~20% faster than two [2048, 11008] ones (gate+up are ~60% of a layer's weight bytes; decode
step -7..-10% end to end), prefill (M = 300) unchanged. Packing q/k/v ([2048, 2560]) showed no gain
in decode or prefill, so it is left out; ``PackDecoderMatMuls(("gate_up", "qkv"))`` re-measures it.

The packed weight replaces the members' weights, so the model does not grow once
``remove_unused_after_fusions`` has dropped the members' initializers (this pass leaves them unread). Numbers: the same dot products in the same precision, only laid out side by side.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from qvl_export.passes.base import GraphPass, GraphPassResult

KINDS = {3: "qkv", 2: "gate_up"}


def _weight(node: ir.Node) -> ir.Value | None:
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer() or w.shape is None or w.shape.rank() != 2:
        return None
    return w


def _bias_add(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The ``Add(MatMul, bias [N])`` right after ``node`` when the MatMul output feeds only it."""
    out = node.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None
    add = out.uses()[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    n = node.inputs[1].shape[1]
    if other is None or other.const_value is None or other.shape is None or list(other.shape) != [n]:
        return None
    return add, other


class PackDecoderMatMuls(GraphPass, name="pack_decoder_matmuls", parts=("decoder",)):
    description = "gate/up MatMuls on one activation -> one MatMul over concatenated weights + Split"

    def __init__(self, kinds: tuple[str, ...] = ("gate_up",)):
        super().__init__()
        self.kinds = kinds

    def call(self, model: ir.Model) -> GraphPassResult:
        graph = model.graph
        groups: dict[ir.Value, list[ir.Node]] = defaultdict(list)
        for node in graph:
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and _weight(node) is not None:
                groups[node.inputs[0]].append(node)
        packed: dict[str, int] = defaultdict(int)
        skipped: list[str] = []
        for x, members in groups.items():
            if len(members) < 2:
                continue
            why = self._check(members)
            if why:
                skipped.append(f"{x.name}: {why}")
                continue
            self._rewrite(graph, x, members)
            packed[KINDS[len(members)]] += 1
        details = {"packed": dict(packed), **({"not_packed": skipped[:5]} if skipped else {})}
        return GraphPassResult(model, bool(packed), details)

    def _check(self, members: list[ir.Node]) -> str:
        """Why ``members`` cannot be packed ('' when they can)."""
        kind = KINDS.get(len(members))
        if kind is None or kind not in self.kinds:
            return f"{len(members)} siblings: packing {'/'.join(self.kinds)} groups only"
        weights = [m.inputs[1] for m in members]
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            return "weights differ in K or dtype"
        biases = [_bias_add(m) for m in members]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return "some members have a bias Add and some do not"
        return ""

    def _rewrite(self, graph: ir.Graph, x: ir.Value, members: list[ir.Node]) -> None:
        weights = [m.inputs[1] for m in members]
        sizes = [w.shape[1] for w in weights]
        biases = [_bias_add(m) for m in members]
        stem = members[0].name or weights[0].name
        # the packed weight is computed when the part is written (its members may be lazily bound
        # checkpoint tensors: concatenating them here would hold every packed layer in memory)
        shape = ir.Shape([weights[0].shape[0], sum(sizes)])
        w = ir.Value(name=f"{stem}.packed_weight", const_value=ir.LazyTensor(
            _concat([v.const_value for v in weights], f"{stem}.packed_weight"), dtype=weights[0].dtype,
            shape=shape, name=f"{stem}.packed_weight"))
        w.shape, w.type = shape, ir.TensorType(weights[0].dtype)
        graph.register_initializer(w)
        nodes = [ir.node("MatMul", [x, w], name=f"{stem}_packed")]
        y = nodes[-1].outputs[0]
        if biases[0] is not None:
            b = ir.Value(name=f"{stem}.packed_bias", const_value=ir.tensor(
                np.concatenate([bias.const_value.numpy() for _, bias in biases]), name=f"{stem}.packed_bias"))
            b.shape, b.type = ir.Shape(list(b.const_value.shape)), ir.TensorType(weights[0].dtype)
            graph.register_initializer(b)
            nodes.append(ir.node("Add", [y, b], name=f"{stem}_packed_bias"))
            y = nodes[-1].outputs[0]
        split_sizes = ir.Value(name=f"{stem}.packed_split", const_value=ir.tensor(np.asarray(sizes, np.int64)))
        split_sizes.shape, split_sizes.type = ir.Shape([len(sizes)]), ir.TensorType(ir.DataType.INT64)
        graph.register_initializer(split_sizes)
        nodes.append(ir.node("Split", [y, split_sizes], attributes={"axis": -1}, num_outputs=len(members),
                             name=f"{stem}_packed_split"))
        old_outputs = [(b[0] if b is not None else m).outputs[0] for m, b in zip(members, biases)]
        graph.insert_before(next(n for n in graph if n in set(members)), nodes)
        names = [old.name for old in old_outputs]
        for old, new in zip(old_outputs, nodes[-1].outputs):
            new.shape, new.type = old.shape, old.type
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        for m, bias in zip(members, biases):
            if bias is not None:
                graph.remove(bias[0], safe=True)
            graph.remove(m, safe=True)
        for name, new in zip(names, nodes[-1].outputs):
            new.name = name  # the projections keep their traced names (readable profiles)


def _concat(tensors: list, name: str):
    """A function giving the concatenation of ``tensors`` along axis 1 (read when called)."""
    def read():
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=1), name=name)
    return read
