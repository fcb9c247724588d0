"""Weight-only decoder quantization (``--precision decoder=int4``): MatMulNBits on onnxruntime.

Decode is memory-bound: every step streams all decoder weights once, so bytes per weight set the
speed. onnxruntime's ``MatMulNBitsQuantizer`` stores each weighted MatMul's weights as 4-bit blocks
(``BLOCK_SIZE`` values share an fp32 scale, symmetric, round to nearest) in one ``MatMulNBits``
contrib op; ``accuracy_level`` 4 lets the CPU kernel quantize the activations to int8 per block and
run integer dot products (VNNI/AMX). No calibration data is needed. The token table is looked up
as int8 rows by the ``quantize_embeddings`` pass that follows.

onnxruntime only (a contrib op): TensorRT takes int8 / fp8 Q/DQ graphs instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from qvl_export.core.manifest import Manifest

log = logging.getLogger(__name__)

BITS = {"int4": 4}
BLOCK_SIZE = 32  # values per fp32 scale (demo model: exact match 0.896 vs fp32 0.900)
ACCURACY_LEVEL = 4  # int8 activations inside the kernel


def quantize_weight_only(folder: Path, manifest: Manifest, precisions: dict[str, str],
                         say: Callable[[str], None]) -> None:
    """Replace every weight-only part of the artifacts in ``folder`` in place; updates ``manifest``."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from qvl_export.building.artifacts import save_part

    summary = manifest.options.setdefault("quantization", {})
    for name, prec in precisions.items():
        if prec not in BITS:
            continue
        part = manifest.parts[name]
        src = folder / part.file
        model = onnx.load(str(src))
        before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
        quantizer = MatMulNBitsQuantizer(model, bits=BITS[prec], block_size=BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
        quantized = quantizer.model.model
        packed = sum(1 for n in quantized.graph.node if n.op_type == "MatMulNBits")
        if not packed:
            raise RuntimeError(f"{name}: no MatMul with constant weights to quantize ({before} MatMuls)")
        for path in [src, folder / part.external_data if part.external_data else None]:
            if path is not None and path.exists():
                path.unlink()
        part.file, part.external_data = save_part(ir.from_proto(quantized), folder, name)
        part.precision = prec
        summary[name] = {"part": name, "precision": prec, "method": "MatMulNBits weight-only (RTN, symmetric)",
                         "bits": BITS[prec], "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL,
                         "quantized_count": packed, "kept_high_precision": {}}
        say(f"{name}: {prec} weight-only, {packed} MatMuls packed into MatMulNBits "
            f"(blocks of {BLOCK_SIZE}, accuracy level {ACCURACY_LEVEL})")
