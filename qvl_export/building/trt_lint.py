"""TensorRT-rules lint for every ONNX graph handed to TensorRT (runs on CPU, no TensorRT needed).

Rules (TensorRT 10.x ONNX parser and explicit quantization):
- default ONNX domain only: no ``com.microsoft`` contrib ops, no custom domains;
- opset within what the parser reads (9..22; above 20 is flagged for JetPack's TensorRT 10.3);
- no operator the parser lacks (sequence ops, random sampling, integer matmul/conv, ...);
- no float64 tensors (TensorRT clamps them to float32);
- explicit quantization: Q/DQ zero points are 0; Q/DQ types are int8 or float8e4m3fn; a weighted
  op (MatMul/Gemm/Conv) fed by a DequantizeLinear has both its inputs dequantized; weights are
  quantized per output channel and activations per tensor; outputs of weighted ops are not
  quantized directly (TensorRT fuses Q/DQ into the following op's input instead);
- int4 is weight-only: an INT4 DequantizeLinear reads a constant initializer (no QuantizeLinear to
  int4), with per-block scales (``block_size`` 64 or 128) along one of the weight's two dims, feeds a
  MatMul/Gemm whose activation input is not quantized, and (a warning) outputs fp16/bf16, the
  activations TensorRT's weight-only GEMMs take.

Findings are data: ``LintFinding(level, rule, node, message)``; ``errors`` fail a trt build.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

MIN_OPSET, MAX_OPSET, JETPACK_MAX_OPSET = 9, 22, 20
UNSUPPORTED = frozenset({
    "Bernoulli", "BitShift", "Compress", "ConcatFromSequence", "ConvInteger", "Det", "DynamicQuantizeLinear",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RandomNormal",
    "RandomNormalLike", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer",
    "StringConcat", "StringSplit", "RegexFullMatch", "TfIdfVectorizer", "Unique", "Col2Im",
})
WEIGHTED = ("MatMul", "Gemm", "Conv")
QDQ_TYPES = (ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN)
INT4_BLOCK_SIZES = (64, 128)


@dataclass(frozen=True)
class LintFinding:
    level: str  # "error" | "warning"
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: [{self.rule}] {self.node}: {self.message}"


def _const(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _is_weight(value: ir.Value) -> bool:
    """A DQ input that is a constant (an initializer, possibly through a Q of a constant)."""
    if _const(value) is not None:
        return True
    p = value.producer()
    return p is not None and p.op_type == "QuantizeLinear" and _const(p.inputs[0]) is not None


def lint_model(model: ir.Model, name: str = "model") -> list[LintFinding]:
    out: list[LintFinding] = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        out.append(LintFinding("error", "opset", name, f"default-domain opset {opset} is outside "
                                                       f"{MIN_OPSET}..{MAX_OPSET} read by TensorRT 10"))
    elif opset > JETPACK_MAX_OPSET:
        out.append(LintFinding("warning", "opset", name, f"opset {opset} > {JETPACK_MAX_OPSET}: JetPack 6's "
                                                         "TensorRT 10.3 may not parse it"))
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        label = node.name or node.op_type
        if node.domain not in ("", "ai.onnx"):
            out.append(LintFinding("error", "domain", label, f"{node.domain}:{node.op_type} is not a standard ONNX "
                                                             "op (contrib ops are for the ort target only)"))
            continue
        if node.op_type in UNSUPPORTED:
            out.append(LintFinding("error", "op", label, f"{node.op_type} is not supported by TensorRT's parser"))
        for v in list(node.outputs):
            if v.dtype == ir.DataType.DOUBLE:
                out.append(LintFinding("warning", "dtype", label, f"{v.name} is float64; TensorRT clamps it "
                                                                  "to float32"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out.extend(_lint_qdq(node, label))
        if node.op_type in WEIGHTED:
            out.extend(_lint_weighted(node, label))
    return out


def _lint_qdq(node: ir.Node, label: str) -> list[LintFinding]:
    out = []
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    zp_val = _const(zp)
    if zp is not None and (zp_val is None or zp_val.astype("float64").any()):
        out.append(LintFinding("error", "qdq-zero-point", label, "zero point must be a constant 0 "
                                                                 "(TensorRT quantization is symmetric)"))
    qtype = node.outputs[0].dtype if node.op_type == "QuantizeLinear" else node.inputs[0].dtype
    if qtype is None and zp is not None:
        qtype = zp.dtype
    if qtype == ir.DataType.INT4:
        return out + _lint_int4(node, label)
    if qtype is not None and qtype not in QDQ_TYPES:
        out.append(LintFinding("error", "qdq-type", label, f"{qtype} quantization; TensorRT takes int8 or "
                                                           "float8e4m3fn"))
    if node.op_type == "QuantizeLinear":
        src = node.inputs[0].producer()
        if src is not None and src.op_type in WEIGHTED:
            out.append(LintFinding("warning", "qdq-output", label, f"quantizes the output of {src.op_type} "
                                                                   f"'{src.name}': quantize the next op's inputs "
                                                                   "instead"))
    return out


def _is_int4_weight(value: ir.Value) -> bool:
    p = value.producer()
    return p is not None and p.op_type == "DequantizeLinear" and p.inputs[0].dtype == ir.DataType.INT4


def _lint_int4(node: ir.Node, label: str) -> list[LintFinding]:
    """int4 Q/DQ: TensorRT's weight-only form (the weight read without copying it: no ``numpy()``)."""
    if node.op_type == "QuantizeLinear":
        return [LintFinding("error", "int4-weight-only", label, "quantizes to int4 in the graph; TensorRT takes int4 "
                                                                "for weights only (an INT4 initializer read by a "
                                                                "DequantizeLinear)")]
    out = []
    w = node.inputs[0]
    if not (w.is_initializer() and w.const_value is not None):
        out.append(LintFinding("error", "int4-weight-only", label, "dequantizes a computed int4 tensor; TensorRT "
                                                                   "takes int4 for constant weights only"))
    block = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
    rank = len(w.shape) if w.shape is not None else 2
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    if block not in INT4_BLOCK_SIZES:
        out.append(LintFinding("error", "int4-block", label, f"int4 block size {block or 'none (per channel)'}; "
                                                             f"TensorRT takes blocks of {INT4_BLOCK_SIZES}"))
    if axis % max(rank, 1) < rank - 2:
        out.append(LintFinding("error", "int4-block", label, f"blocks along axis {axis}; TensorRT blocks one of the "
                                                             "last two dims"))
    scale = node.inputs[1]
    if scale is not None and scale.shape is not None and len(scale.shape) != rank:
        out.append(LintFinding("error", "int4-block", label, f"scale of rank {len(scale.shape)} for a rank-{rank} "
                                                             "weight; block scales have the weight's rank"))
    readers = [user.op_type for user, _ in node.outputs[0].uses()]
    if any(op not in ("MatMul", "Gemm") for op in readers):
        out.append(LintFinding("error", "int4-weight-only", label, f"int4 weights read by {sorted(set(readers))}; "
                                                                   "TensorRT's weight-only GEMMs are MatMul/Gemm"))
    dtype = node.outputs[0].dtype or (scale.dtype if scale is not None else None)  # DQ outputs the scale's type
    if dtype not in (None, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        out.append(LintFinding("warning", "int4-activations", label, f"int4 weights dequantized to {dtype}; "
                                                                     "TensorRT's weight-only GEMMs take fp16/bf16 "
                                                                     "activations"))
    return out


def _lint_weighted(node: ir.Node, label: str) -> list[LintFinding]:
    ins = [v for v in node.inputs[:2] if v is not None]
    dq = [v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in ins]
    if not any(dq):
        return []
    if any(_is_int4_weight(v) for v in ins):  # weight-only: the activation stays in float
        if all(dq):
            return [LintFinding("error", "int4-weight-only", node.name or node.op_type,
                                "int4 weights with quantized activations; TensorRT's int4 is weight-only")]
        return []
    out = []
    if not all(dq):
        out.append(LintFinding("error", "qdq-inputs", label, f"{node.op_type} has one quantized input only: "
                                                             "quantize both (activation and weight)"))
    for v, is_dq in zip(ins, dq):
        if not is_dq:
            continue
        deq = v.producer()
        scale = _const(deq.inputs[1])
        if _is_weight(deq.inputs[0]):
            axis = deq.attributes["axis"].as_int() if "axis" in deq.attributes else 1
            w_rank = len(deq.inputs[0].shape) if deq.inputs[0].shape is not None else 2
            if node.op_type == "MatMul":
                out_axis = w_rank - 1
            elif node.op_type == "Gemm":  # B is [K, N], or [N, K] with transB
                trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
                out_axis = 0 if trans_b else 1
            else:
                out_axis = 0
            if scale is not None and scale.size > 1 and axis % max(w_rank, 1) != out_axis:
                out.append(LintFinding("error", "qdq-weight-axis", label, f"weight scale axis {axis}; per output "
                                                                          f"channel is axis {out_axis}"))
        elif scale is not None and scale.size != 1:
            out.append(LintFinding("error", "qdq-activation", label, "activation quantized per channel; "
                                                                      "TensorRT wants per-tensor activation scales"))
    return out


def lint_errors(findings: list[LintFinding]) -> list[LintFinding]:
    return [f for f in findings if f.level == "error"]
