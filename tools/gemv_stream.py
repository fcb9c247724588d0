"""How fast onnxruntime's single-row (decode) matrix kernels stream weights on this machine.

    python tools/gemv_stream.py [--kinds fp32,dqmm,nbits8-b128,nbits4-b32] [--threads 2] [--cached]

One graph per kind: many distinct 1536 x 8960 weights (Qwen2-VL-2B's MLP shape; 48 of them, 24 in
fp32 - well past the last-level cache) each multiplied by the same [1, 1536] row, as a decode step
multiplies. ``dqmm``: ``DynamicQuantizeMatMul`` with int8 per-column weights (our int8 decoder's op);
``nbitsB-bN``: ``MatMulNBits`` with B-bit weights in blocks of N at accuracy level 4 (int8
activations; our int4 decoder's op, and its 8-bit form); ``fp32``: ``MatMul``. ``--cached``: one
weight only, which the cache holds (the kernel's compute rate, not the memory's). Prints ms per run,
weight GB/s and weights/s. Random weights: the timing does not depend on the values.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qvl_export.building.weight_only import block_quantizer

K, N = 1536, 8960


def graph(kind: str, count: int, rng) -> tuple[bytes, int]:
    nodes, inits, outs = [], [], []
    for i in range(count):
        w = rng.standard_normal((K, N), dtype=np.float32) * 0.02
        if kind == "fp32":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        elif kind == "dqmm":
            scale = np.abs(w).max(0) / 127
            inits += [numpy_helper.from_array(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), f"q{i}"),
                      numpy_helper.from_array(scale.astype(np.float32), f"s{i}")]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", f"q{i}", f"s{i}"], [f"y{i}"],
                                          domain="com.microsoft"))
        elif kind.startswith("nbits"):
            bits, block = int(kind[5]), int(kind.split("-b")[1])
            packed, scale, _ = block_quantizer(bits, block).qbits_block_quant(w)  # our packer's onnxruntime quantizer
            inits += [numpy_helper.from_array(packed, f"q{i}"), numpy_helper.from_array(scale, f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                          K=K, N=N, bits=bits, block_size=block, accuracy_level=4))
        else:
            raise SystemExit(f"unknown kind {kind!r}: fp32, dqmm, nbits4-b32, nbits8-b128, ...")
        outs.append(f"y{i}")
    nodes.append(helper.make_node("Sum", outs, ["y"]))
    g = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), sum(t.ByteSize() for t in inits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="fp32,dqmm,nbits8-b32,nbits8-b128,nbits4-b32,nbits4-b128")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts")
    ap.add_argument("--cached", action="store_true", help="one weight, held by the cache")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, K)).astype(np.float32)
    for kind in args.kinds.split(","):
        count = 1 if args.cached else (24 if kind == "fp32" else 48)  # fp32: under protobuf's 2 GB
        model, nbytes = graph(kind, count, rng)
        for threads in (int(t) for t in args.threads.split(",")):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            runs = args.runs * (15 if args.cached else 1)
            for _ in range(3):
                sess.run(None, {"x": x})
            t0 = time.perf_counter()
            for _ in range(runs):
                sess.run(None, {"x": x})
            dt = (time.perf_counter() - t0) / runs
            print(f"{kind:12s} threads {threads}: {dt * 1e3:7.2f} ms  {nbytes / dt / 1e9:6.1f} GB/s of weights "
                  f"({nbytes / 1e6:.0f} MB)  {count * K * N / dt / 1e9:6.1f} G weights/s", flush=True)
            del sess


if __name__ == "__main__":
    main()
