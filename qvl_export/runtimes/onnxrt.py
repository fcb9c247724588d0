"""ONNX Runtime backend of the thin runtime: one InferenceSession per part.

A decoder whose KV inputs are fixed-capacity buffers (``seqlens_k`` among its inputs, see
``passes/fuse_decoder_attention.py``) runs through IOBinding with each ``present.{i}.*`` output bound
to the memory of its ``past_key_values.{i}.*`` input: GroupQueryAttention sees the same buffer on both
sides and writes only the new rows. Every other part (and the plain decoder) runs with ``session.run``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from qvl_export.core import precisions as registry
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest

log = logging.getLogger(__name__)


def session_options(part, threads: int | None, lean: bool = False, path: Path | None = None):
    """(SessionOptions, disabled optimizers) for one part, as every session of ours opens it.

    ``lean`` (calibration's tap graphs): onnxruntime keeps the weights where they are - memory-mapped
    from the part's data file - instead of packing a private copy of every MatMul weight for its GEMM
    kernels (runs are slower, the weights are resident once), and runs nodes in priority order, which
    reduces each tapped activation as soon as it exists: in the default order the reductions wait for
    the end of the graph and every tapped activation stays alive until then (measured on the 32-layer
    Qwen2-VL-2B vision tower, 4932 patches: 6.0 GB of activations instead of 0.7)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if lean:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    prec = registry.get(part.precision)
    disabled = []
    if prec.cpu_fake_quant:
        # the CPU provider has no kernels for the type (float8): run the Q/DQ pairs as written
        # instead of letting the QDQ optimizers move the quantized tensors into ops that lack them,
        # and dequantize each weight when it is read rather than folding every DequantizeLinear into an
        # fp32 copy of its weight at load (a 3B fp8 decoder: 12 GB of folded copies beside the 3 GB of
        # fp8 weights, the parity gate's peak at 20.8 GiB)
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        disabled.append("ConstantFolding")
    # integer kernels: keep the one-Q/DQ-pair-per-MatMul layout of the unshare_dequantize pass (common-
    # subexpression elimination would merge the copies back and the MatMuls would not fuse)
    if prec.integer_kernels:
        disabled.append("CommonSubexpressionElimination")
        # x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 x s8 with vpmaddubsw, which saturates the
        # sum of each product pair at int16: an int8 ViT read 0.995 vision cosine and the trained demo
        # lost 11.6 points (AMD EPYC, AVX2). onnxruntime then turns the s8 weights into u8 and runs its
        # exact u8 x u8 kernels; on VNNI / ARM CPUs the option does nothing.
        # onnxruntime cannot convert an int8 weight read by more than one DequantizeLinear (a tied
        # embedding's Gather beside the lm_head MatMul): it names both u8 copies alike and fails to load
        if path is None or not _shared_int8_weight(path):
            opts.add_session_config_entry("session.x64quantprecision", "1")
        elif path not in _WARNED:
            _WARNED.add(path)
            log.warning("%s: an int8 weight feeds more than one node, so onnxruntime runs it on its u8 x s8 "
                        "kernels (inexact on x86 CPUs without VNNI)", path.name)
    return opts, disabled or None


_WARNED: set[Path] = set()


def _shared_int8_weight(path: Path) -> str | None:
    """The first int8 initializer dequantized for more than one consumer in the graph at ``path`` - one
    DequantizeLinear read by several nodes, or several reading it - else None (the graph only: external
    weights are not read). A Gather of its int8 rows beside a single DequantizeLinear does not count."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    dequantized: dict[str, int] = {}  # int8 initializer -> DequantizeLinear nodes reading it
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in int8:
            dequantized[node.input[0]] = dequantized.get(node.input[0], 0) + 1
            if uses.get(node.output[0], 0) > 1:
                return node.input[0]
    # int8 rows gathered before dequantizing (the ort target's tied table: Gather beside one DQ) are fine
    return next((name for name, count in dequantized.items() if count > 1), None)


class OrtBackend:
    """Runs the parts named in the manifest with onnxruntime (CPU unless providers say otherwise).

    ``max_open``: keep at most this many sessions open, opening each part's session when it runs and
    closing the one used longest ago (calibration: one at a time, so the vision tower's weights and
    activations are never resident beside the decoder's - a session's memory-mapped weights leave
    the process with it). None (the runtime): every session is opened at load, so a broken part is
    named before the first request."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None, lean: bool = False, max_open: int | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads, self.lean, self.max_open = threads, lean, max_open
        self.sessions = {}
        self.output_names: dict[str, list[str]] = {}
        self.in_place: dict[str, dict[str, str]] = {}
        if self.providers == ["CPUExecutionProvider"] and not registry.runs_on_cpu(manifest.precisions):
            no_kernels = [f"{name} ({part.precision})" for name, part in manifest.parts.items()
                          if not registry.get(part.precision).cpu_kernels]
            engines = (" build its TensorRT engines on the GPU device ('qvl-export engine FOLDER') and run those, or"
                       if manifest.target == "trt" else "")
            raise QvlError(f"{self.folder.name}: onnxruntime's CPU provider has no kernels for {', '.join(no_kernels)}:"
                           f"{engines} rebuild with fp16 to run it here.")
        for name, part in manifest.parts.items():
            if not (self.folder / part.file).exists():
                raise QvlError(f"{self.folder / part.file} is missing; the artifacts folder is incomplete: rebuild it.")
            if max_open is None:
                self._open(name)

    def _open(self, name: str):
        import onnxruntime as ort

        session = self.sessions.pop(name, None)
        if session is None:
            while self.max_open is not None and len(self.sessions) >= self.max_open:
                del self.sessions[next(iter(self.sessions))]  # the one used longest ago
            part = self.manifest.parts[name]
            path = self.folder / part.file
            opts, disabled = session_options(part, self.threads, self.lean, path)
            try:
                session = ort.InferenceSession(str(path), opts, providers=self.providers,
                                               disabled_optimizers=disabled)
            except Exception as err:
                raise QvlError(f"onnxruntime could not load {path.name} ({str(err).splitlines()[0]}); "
                               "rebuild the artifacts.") from None
            self.output_names[name] = [o.name for o in session.get_outputs()]
            self.in_place[name] = in_place_outputs([i.name for i in session.get_inputs()], self.output_names[name])
        self.sessions[name] = session  # most recently used last
        return session

    def run(self, part: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of ``part`` in manifest order (in-place outputs are their input arrays, updated)."""
        session = self.sessions[part] if self.max_open is None else self._open(part)
        if self.in_place[part]:
            return run_in_place(session, self.output_names[part], feeds, self.in_place[part])
        return session.run(self.output_names[part], feeds)


_PRESENT = re.compile(r"present\.(\d+)\.(key|value)")


def in_place_outputs(input_names: list[str], output_names: list[str]) -> dict[str, str]:
    """``{output: input}`` pairs that share one buffer: ``present.{i}.*`` -> ``past_key_values.{i}.*`` of a
    decoder with buffer KV inputs (it has ``seqlens_k``); empty for every other graph."""
    if "seqlens_k" not in input_names:
        return {}
    pairs = {}
    for name in output_names:
        m = _PRESENT.fullmatch(name)
        if m and f"past_key_values.{m[1]}.{m[2]}" in input_names:
            pairs[name] = f"past_key_values.{m[1]}.{m[2]}"
    return pairs


def run_in_place(session, output_names: list[str], feeds: dict[str, np.ndarray],
                 shared: dict[str, str]) -> list[np.ndarray]:
    """``session.run`` through IOBinding; each ``shared`` output is written into its input's array.

    The shared inputs must be C-contiguous and writeable (a KVCache's buffers are); one that is not is
    copied first and the copy is returned in its place, so the result is right either way.
    """
    binding = session.io_binding()
    buffers = {}
    for name in set(shared.values()):
        arr = feeds[name]
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = np.ascontiguousarray(arr).copy()
        buffers[name] = arr
    alive = []  # inputs bound by address must outlive the run
    for name, arr in feeds.items():
        if name in buffers:
            buf = buffers[name]
            binding.bind_input(name, "cpu", 0, buf.dtype.type, list(buf.shape), buf.ctypes.data)
        else:
            alive.append(np.ascontiguousarray(arr))
            binding.bind_cpu_input(name, alive[-1])
    for name in output_names:
        if name in shared:
            buf = buffers[shared[name]]
            binding.bind_output(name, "cpu", 0, buf.dtype.type, list(buf.shape), buf.ctypes.data)
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    return [buffers[shared[name]] if name in shared else values[i].numpy() for i, name in enumerate(output_names)]
