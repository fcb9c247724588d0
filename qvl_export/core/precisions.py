"""The precision registry: every precision qvl-export builds, described once.

Everything that depends on a precision looks it up here: what a part is traced in, whether and how
it is quantized (calibrated W8A8 Q/DQ, or weight-only), which targets and parts take it, whether
onnxruntime's CPU provider can run it (so the parity gate can run here), which GPUs TensorRT needs
for it, the bytes per weight / activation / token-table entry of the memory estimate, how lossy it
is (end-to-end gates take the lossiest part's thresholds) and which entry of ``parity/gates.json``
holds its thresholds. Adding a precision means adding a row here and, when it quantizes, its
quantizer (``building/quantize_stage.py`` names one per ``kind``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl_export.core.errors import QvlError
from qvl_export.core.parts import PARTS, TARGETS

FLOAT, CALIBRATED, WEIGHT_ONLY = "float", "calibrated", "weight_only"
DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}


@dataclass(frozen=True)
class Precision:
    name: str
    kind: str  # FLOAT (traced in trace_dtype), CALIBRATED (static W8A8 Q/DQ), WEIGHT_ONLY (packed weights)
    trace_dtype: str  # the dtype the part's graph is traced in ("float32" for every quantized precision)
    weight_bytes: float  # stored bytes per weight (engine or part; scales not counted)
    # bytes per activation element at run time: a strongly typed engine runs what the graph says, and
    # int8 / fp8 graphs are traced in fp32 (only the quantized MatMuls run in 8 bits)
    act_bytes: float
    # bytes per token-table entry by target: the table is a Gather, not a weighted op, so TensorRT keeps
    # it in the traced dtype, while the ort target's quantize_embeddings pass stores int8 rows
    table_bytes: tuple[tuple[str, float], ...]
    lossiness: int  # rank: end-to-end gates (prefill, steps, greedy) take the lossiest part's thresholds
    targets: tuple[str, ...] = TARGETS
    parts: tuple[str, ...] = PARTS
    cpu_kernels: bool = True  # onnxruntime's CPU provider runs it (the parity gate can run on this machine)
    min_sm: tuple[int, int] | None = None  # TensorRT needs at least this compute capability
    bits: int | None = None
    gate: str = ""  # key of parity/gates.json (default: the name)
    hint: str = ""  # what to use instead when a part or target cannot take it
    # calibrated precisions: the precision guard keeps an op in float above this local relative error
    # (measured: random-weight and trained demo models sit at 0.5-2% for int8, 2-4% for fp8)
    guard_budget: float | None = None
    # onnxruntime CPU: no kernels for the quantized type, so its Q/DQ pairs run as written (fake quant)
    cpu_fake_quant: bool = False
    # onnxruntime CPU: integer kernels need one Q/DQ pair per consumer (common-subexpression
    # elimination would merge the unshare_dequantize pass's copies back)
    integer_kernels: bool = False
    # what a one-word ``--precision`` leaves in another precision, part -> precision (name every part
    # to override): fp8 builds quantize the decoder and keep the vision tower fp16 and the merger fp32
    keeps: tuple[tuple[str, str], ...] = ()
    # target -> the dtype its graphs are traced in where it differs from ``trace_dtype``: TensorRT's int4
    # weight-only GEMMs take fp16 activations, onnxruntime's MatMulNBits fp32 ones
    trace_on: tuple[tuple[str, str], ...] = ()

    def traced(self, target: str) -> str:
        """The dtype a part of this precision is traced in for ``target``."""
        return dict(self.trace_on).get(target, self.trace_dtype)

    def act_bytes_on(self, target: str) -> float:
        """Bytes per activation element at run time on ``target``."""
        traced = self.traced(target)
        return self.act_bytes if traced == self.trace_dtype else DTYPE_BYTES[traced]

    @property
    def quantized(self) -> bool:
        return self.kind != FLOAT

    @property
    def calibrated(self) -> bool:
        return self.kind == CALIBRATED

    @property
    def gate_key(self) -> str:
        return self.gate or self.name

    def token_table_bytes(self, target: str) -> float:
        return dict(self.table_bytes).get(target, self.weight_bytes)

    def default_assignment(self) -> str:
        """The ``--precision`` text that applies it wherever it may go (``int8``, ``decoder=int4``)."""
        if self.parts == PARTS:
            return self.name
        return ",".join(f"{p}={self.name}" for p in self.parts)


def _float(name, dtype, nbytes, rank, **kw) -> Precision:
    return Precision(name, FLOAT, dtype, nbytes, nbytes, (("ort", nbytes), ("trt", nbytes)), rank, **kw)


REGISTRY: dict[str, Precision] = {p.name: p for p in (
    _float("fp32", "float32", 4.0, 0),
    _float("fp16", "float16", 2.0, 1),
    _float("bf16", "bfloat16", 2.0, 2, targets=("trt",), cpu_kernels=False,
           hint="onnxruntime's CPU provider has no bf16 kernels, so bf16 parts could not be run or checked here: "
                "use fp16, or bf16 with --target trt."),
    # fp8 keeps the vision tower in fp16 and the merger in fp32, as TensorRT-LLM and TensorRT Edge-LLM build
    # fp8 models (Edge-LLM keeps the 3B merger in fp32 for fp16 overflow). Measured on the trained form
    # reader: an all-fp8 build turns a decisive video prefill from 0.996 to 0.556 (KL 0.56: the vision
    # tower's E4M3 error compounding through the fp8 decoder; either alone stays under 0.01), this mix keeps
    # it (KL 2.6e-4) and every answer; ``vision=fp8,merger=fp8,decoder=fp8`` still builds all of it in fp8.
    Precision("fp8", CALIBRATED, "float32", 1.0, 4.0, (("ort", 1.0), ("trt", 4.0)), 3, min_sm=(8, 9), bits=8,
              guard_budget=0.10, cpu_fake_quant=True, keeps=(("vision", "fp16"), ("merger", "fp32"))),
    Precision("int8", CALIBRATED, "float32", 1.0, 4.0, (("ort", 1.0), ("trt", 4.0)), 4, bits=8,
              guard_budget=0.06, integer_kernels=True),
    # decoder weight-only: MatMulNBits on the ort target (fp32 activations, int8 token rows); on the trt
    # target int4 DequantizeLinear blocks (TensorRT's weight-only form) in an fp16 graph (fp16 token table).
    # A one-word --precision int4 means decoder=int4 (the vision parts stay fp32), as weight-only int4 is
    # applied to the LLM by TensorRT-LLM, onnxruntime-genai and llama.cpp alike
    Precision("int4", WEIGHT_ONLY, "float32", 0.5, 4.0, (("ort", 1.0), ("trt", 2.0)), 5, parts=("decoder",),
              bits=4, trace_on=(("trt", "float16"),), keeps=(("vision", "fp32"), ("merger", "fp32")),
              hint="int4 is weight-only quantization for the decoder (decode is memory-bound; the vision "
                   "parts are compute-bound): use --precision decoder=int4."),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Precision:
    try:
        return REGISTRY[name]
    except KeyError:
        raise QvlError(f"Precision {name!r} is not available; use one of {', '.join(NAMES)}.") from None


def parse(text: str | None) -> dict[str, str]:
    """``int8`` (every part but those the precision ``keeps``) or ``vision=fp16,decoder=int8`` (unnamed
    parts: fp32) -> part -> precision."""
    text = (text or "fp32").strip()
    if "=" not in text:
        out = {p: text for p in PARTS}
        out.update(REGISTRY[text].keeps if text in REGISTRY else ())
    else:
        out = {p: "fp32" for p in PARTS}
        for item in text.split(","):
            part, _, prec = item.partition("=")
            part, prec = part.strip(), prec.strip()
            if part not in PARTS:
                raise QvlError(f"Unknown part {part!r} in --precision; parts are {', '.join(PARTS)}.")
            out[part] = prec
    for part, prec in out.items():
        if prec not in REGISTRY:
            raise QvlError(f"Precision {prec!r} ({part}) is not available; use one of {', '.join(NAMES)}.")
    return out


def label(precisions: dict[str, str]) -> str:
    """One word when every part has the same precision, else ``vision=..,merger=..,decoder=..``."""
    values = set(precisions.values())
    return values.pop() if len(values) == 1 else ",".join(f"{k}={v}" for k, v in precisions.items())


def check(precisions: dict[str, str], target: str) -> None:
    """Refuse, in one line, a precision that a part or the target cannot take."""
    for part, name in precisions.items():
        p = get(name)
        if part not in p.parts or target not in p.targets:
            where = f"the {part} part" if part not in p.parts else f"--target {target}"
            raise QvlError(p.hint or f"{name} is not available for {where}.")


def lossiest(precisions: dict[str, str]) -> Precision:
    return max((get(p) for p in precisions.values()), key=lambda p: p.lossiness)


def of_kind(precisions: dict[str, str], kind: str) -> dict[str, str]:
    """The parts whose precision is of ``kind`` (FLOAT, CALIBRATED, WEIGHT_ONLY)."""
    return {part: p for part, p in precisions.items() if get(p).kind == kind}


def runs_on_cpu(precisions: dict[str, str]) -> bool:
    return all(get(p).cpu_kernels for p in precisions.values())
