"""Streaming calibration: activation statistics taken while the float artifacts run, never stored.

Each part to calibrate gets a *tap* graph beside it in the artifacts folder being built: the same
graph, its weights still in the part's own data file (nothing is copied), with every weighted
MatMul/Gemm's activation input added as a graph output. The runtime loads the tap graphs in place of
the parts, so one onnxruntime session per part runs the calibration documents - the weights are
resident once, as when the artifacts run - and every tapped activation goes straight into
``ActivationStats``:

- its absolute max and RMS (the precision guard, fp8's max calibration),
- the sum of |x| per input channel over every row (AWQ's activation-aware int4 scales),
- onnxruntime's own calibration collectors (``MinMax`` / ``HistogramCollector`` for the
  percentile, entropy and distribution methods: the int8 ranges), fed one run at a time exactly as
  ``quantize_static`` feeds them with ``CalibStridedMinMax=1``,
- an evenly spaced sample of rows, bounded in bytes per tensor, for the guard's local error (rows
  of the first runs), or, for AWQ (``method="awq"``), spread evenly over every row of every run.

So memory is the parts' weights plus the statistics, whatever the number of documents; the decoder's
KV caches are never copied (they were what made recorded feeds grow with the documents).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_FEEDS = 8  # runs whose rows are sampled for the local error estimate
SAMPLE_BYTES = 4 << 20  # at most this much of sampled rows per tensor (float32)
MAX_ROWS = 4096  # and at most this many rows


@dataclass
class WeightedNode:
    name: str  # ONNX node name
    scope: str  # module path from the exporter's metadata, e.g. "layers.3.mlp.down_proj"
    weight: str  # initializer name of the constant input
    activation: str  # the activation input
    op_type: str  # MatMul or Gemm
    trans_b: bool = False  # Gemm's transB: weight stored [N, K]
    has_bias: bool = False  # Gemm with a constant bias


def weighted_nodes(model) -> list[WeightedNode]:
    """MatMul/Gemm nodes of an onnx-ir model whose second input is an initializer, in graph order."""
    out = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or w.const_value is None or not w.is_initializer():
            continue
        trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None
        out.append(WeightedNode(node.name, _scope(node) or node.name, w.name, x.name, node.op_type, trans_b, bias))
    return out


def _scope(node) -> str | None:
    value = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not value:
        return None
    scopes = [s.strip(" '\"") for s in value.strip("[]").split(",")]
    modules = [s for s in scopes if s and "." in s or s in ("lm_head",)]
    return modules[-1] if modules else None


TAP_BYTES = 2 << 20  # rows of an activation a tap returns per run, at most (float32)
TAP_OUTPUTS = ("max", "min", "sumsq", "count", "abssum", "rows")  # per tapped activation, in this order


def write_tap_graph(part_path: Path, tap_path: Path) -> list[str]:
    """Write the part's graph with taps on its weighted ops' activation inputs to ``tap_path`` (same
    folder: the weights stay in the part's data file, nothing is copied). Returns the tapped
    activations; each adds the outputs ``TAP_OUTPUTS``: its exact max, min, sum of squares and
    element count, the sum of |x| per channel (last axis) over all rows, reduced in the graph, and
    every k-th of its rows (k so that at most
    ``TAP_BYTES`` come back), so a run returns a bounded amount whatever the page size and depth."""
    import onnx_ir as ir

    model = ir.load(part_path)  # external tensors stay on disk
    values = {n.name: n for n in model.graph}
    taps: list[str] = []
    for n in weighted_nodes(model):
        if n.activation not in taps:
            taps.append(n.activation)
            model.graph.outputs.extend(_tap(model, values[n.name].inputs[0]))
    ir.save(model, tap_path)  # no external_data argument: tensors keep pointing at the part's file
    return taps


def _tap(model, x) -> list:
    import onnx_ir as ir

    graph = model.graph
    rank = len(x.shape) if x.shape is not None else 2
    width = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else 1024
    cap = max(16, TAP_BYTES // (4 * width))

    def const(name: str, value) -> ir.Value:
        v = ir.Value(name=f"{x.name}.tap_{name}", const_value=ir.tensor(np.asarray(value), name=f"{x.name}.tap_{name}"))
        graph.register_initializer(v)
        return v

    def op(kind: str, inputs, out: str | None = None, **attrs) -> ir.Value:
        node = ir.Node("", kind, inputs, attributes=[ir.Attr(k, _attr_type(v), v) for k, v in attrs.items()],
                       name=f"{x.name}.tap_{kind}_{len(graph)}", num_outputs=1)
        node.outputs[0].name = f"{x.name}.tap_{out}" if out else f"{node.name}_out"
        graph.append(node)
        return node.outputs[0]

    outs = [op("ReduceMax", [x], "max", keepdims=0), op("ReduceMin", [x], "min", keepdims=0),
            op("ReduceSumSquare", [x], "sumsq", keepdims=0), op("Size", [x], "count")]
    flat = op("Flatten", [x], axis=max(1, rank - 1))  # [rows, width]
    outs.append(op("ReduceSum", [op("Abs", [flat]), const("rows_axis", np.array([0], np.int64))], "abssum",
                   keepdims=0))  # [width]
    rows = op("Gather", [op("Shape", [flat]), const("zero", np.array([0], np.int64))])
    step = op("Max", [op("Div", [op("Add", [rows, const("cap_less_one", np.array([cap - 1], np.int64))]),
                                 const("cap", np.array([cap], np.int64))]), const("one", np.array([1], np.int64))])
    outs.append(op("Slice", [flat, const("start", np.array([0], np.int64)), rows, const("zero_axis", np.array([0], np.int64)),
                             step], "rows"))
    x_dtype = x.dtype or ir.DataType.FLOAT
    for v, dtype in zip(outs, (x_dtype, x_dtype, x_dtype, ir.DataType.INT64, x_dtype, x_dtype)):
        v.type = ir.TensorType(dtype)
    return outs


def _attr_type(value):
    import onnx_ir as ir

    return ir.AttributeType.INT if isinstance(value, int) else ir.AttributeType.FLOAT


@dataclass
class TensorStats:
    abs_max: float = 0.0
    sum_sq: float = 0.0
    count: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    abs_sum: np.ndarray | None = None  # sum of |x| per channel over every row seen [width], float64
    row_count: int = 0  # rows behind abs_sum
    stride: int = 1  # spread sampling: every stride-th row of the whole stream is kept
    phase: int = 0  # spread sampling: rows of the stream to skip before the next one kept
    # AWQ (method "awq"): the rows and |x| sums of generated tokens (decode steps) apart from the
    # context's (prefill: page and prompt tokens), which outnumber them ~100 to 1
    generated: "TensorStats | None" = None

    def keep_spread(self, rows: np.ndarray, cap: int) -> None:
        """Keep every ``stride``-th row of the stream of all runs' rows; when more than ``cap`` are
        kept, drop every other one and double the stride - an even sample of everything seen."""
        if self.phase < len(rows):
            self.rows.append(np.array(rows[self.phase::self.stride], copy=True))
        self.phase = (self.phase - len(rows)) % self.stride
        while sum(len(r) for r in self.rows) > cap:
            kept = self.sample()
            self.rows = [kept[::2]]
            # the next kept row of the new stream: the old next row if kept rows were even, else one stride on
            self.phase += self.stride * (len(kept) % 2)
            self.stride *= 2

    @property
    def rms(self) -> float:
        return float(np.sqrt(self.sum_sq / self.count)) if self.count else 0.0

    def channel_mean(self) -> np.ndarray | None:
        """Mean |x| per channel over every calibration row (AWQ's activation salience), or None."""
        return None if self.abs_sum is None or not self.row_count else self.abs_sum / self.row_count

    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows, axis=0) if self.rows else np.zeros((0, 0), np.float32)


class ActivationStats:
    """Running statistics of a part's tapped activations (see the module docstring)."""

    def __init__(self, names: list[str], method: str):
        from onnxruntime.quantization.calibrate import HistogramCollector

        self.names = list(names)
        self.method = method  # max, percentile, entropy, distribution; awq: max, rows spread over every run
        self.tensors = {n: TensorStats() for n in self.names}
        self.runs = 0
        self._minmax: dict[str, tuple[float, float]] = {}
        self._histograms = None
        self._fixed: dict[str, tuple[float, float]] | None = None
        if method not in ("max", "awq"):
            self._histograms = HistogramCollector(method=method, symmetric=True, num_bins=2048,
                                                  num_quantized_bins=128, percentile=99.999, scenario="same")

    def update(self, taps: dict[str, list[np.ndarray]], generated: bool = False) -> None:
        """One run's tap outputs: activation -> [max, min, sum of squares, count, |x| sums, rows]
        (``TAP_OUTPUTS``). ``generated``: a decode step's run (AWQ keeps its rows and |x| sums apart)."""
        rows_by_name = {}
        for name, (hi, lo, sumsq, count, abssum, rows) in taps.items():
            t = self.tensors[name]
            rows = np.asarray(rows, dtype=np.float32)
            rows_by_name[name] = rows
            pool = t
            if self.method == "awq" and generated:
                pool = t.generated = t.generated or TensorStats()
            if int(count):
                hi, lo = float(hi), float(lo)
                t.abs_max = max(t.abs_max, abs(hi), abs(lo))
                t.sum_sq += float(sumsq)
                t.count += int(count)
                abssum = np.asarray(abssum, dtype=np.float64).reshape(-1)
                pool.abs_sum = abssum if pool.abs_sum is None else pool.abs_sum + abssum
                pool.row_count += int(count) // max(1, abssum.size)
                old_lo, old_hi = self._minmax.get(name, (np.inf, -np.inf))
                self._minmax[name] = (min(old_lo, lo), max(old_hi, hi))
            if self.method == "awq" and rows.size:
                pool.keep_spread(rows, max(1, min(MAX_ROWS, SAMPLE_BYTES // (4 * rows.shape[1]))))
            elif self.runs < SAMPLE_FEEDS and rows.size:
                cap = max(1, min(MAX_ROWS, SAMPLE_BYTES // (4 * rows.shape[1])) // SAMPLE_FEEDS)
                if len(rows) > cap:  # even sample: the error estimate needs rows, not all of them
                    rows = rows[np.linspace(0, len(rows) - 1, cap).astype(int)]
                t.rows.append(np.array(rows, copy=True))
        if self._histograms is not None:
            _quietly(self._histograms.collect, {k: [v] for k, v in rows_by_name.items() if v.size})
        self.runs += 1

    def ranges(self) -> dict[str, tuple[float, float]]:
        """tensor -> (low, high) calibration range of the method (onnxruntime's collectors)."""
        if self._fixed is not None:
            return dict(self._fixed)
        if self._histograms is None:
            return dict(self._minmax)
        result = _quietly(self._histograms.compute_collection_result)
        out = {}
        for name, value in result.items():
            if hasattr(value, "range_value"):  # TensorData (entropy / distribution)
                value = value.range_value
            out[name] = (float(value[0]), float(value[1]))
        return out

    # -- the --calib-cache form: JSON-able facts + named arrays ---------------------------------
    def describe(self) -> dict:
        hist = self._histograms.histogram_dict if self._histograms is not None else {}
        return {"names": self.names, "method": self.method, "runs": self.runs,
                "tensors": {n: [t.abs_max, t.sum_sq, t.count, len(t.rows), t.row_count]
                            + ([len(t.generated.rows), t.generated.row_count] if t.generated else [])
                            for n, t in self.tensors.items()},
                "minmax": self._minmax, "fixed": self._fixed,
                "histograms": {n: len(v) for n, v in hist.items()}}

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (name, t) in enumerate(self.tensors.items()):
            for j, r in enumerate(t.rows):
                out[f"rows_{i}_{j}"] = r
            if t.abs_sum is not None:
                out[f"abssum_{i}"] = t.abs_sum
            if t.generated is not None:
                for j, r in enumerate(t.generated.rows):
                    out[f"gen_rows_{i}_{j}"] = r
                if t.generated.abs_sum is not None:
                    out[f"gen_abssum_{i}"] = t.generated.abs_sum
        if self._histograms is not None:
            for i, name in enumerate(self.names):
                for j, item in enumerate(self._histograms.histogram_dict.get(name, ())):
                    out[f"hist_{i}_{j}"] = np.asarray(item)
        return out

    @classmethod
    def from_arrays(cls, info: dict, arrays: dict[str, np.ndarray]) -> "ActivationStats":
        st = cls(info["names"], info["method"])
        st.runs = int(info["runs"])
        for i, name in enumerate(st.names):
            abs_max, sum_sq, count, chunks, row_count, *gen = info["tensors"][name]
            st.tensors[name] = TensorStats(float(abs_max), float(sum_sq), int(count),
                                           [arrays[f"rows_{i}_{j}"] for j in range(int(chunks))],
                                           arrays.get(f"abssum_{i}"), int(row_count))
            if gen:
                st.tensors[name].generated = TensorStats(
                    rows=[arrays[f"gen_rows_{i}_{j}"] for j in range(int(gen[0]))],
                    abs_sum=arrays.get(f"gen_abssum_{i}"), row_count=int(gen[1]))
            n = info["histograms"].get(name)
            if n and st._histograms is not None:
                items = [arrays[f"hist_{i}_{j}"] for j in range(int(n))]
                st._histograms.histogram_dict[name] = tuple(items[:2]) + tuple(a[()] for a in items[2:])
        st._minmax = {k: tuple(v) for k, v in info["minmax"].items()}
        st._fixed = {k: tuple(v) for k, v in info["fixed"].items()} if info.get("fixed") else None
        return st

    def scale(self, factor: float) -> None:
        """Multiply every statistic and range by ``factor`` (a test makes calibration wrong with it)."""
        self._fixed = {k: (lo * factor, hi * factor) for k, (lo, hi) in self.ranges().items()}
        for t in self.tensors.values():
            t.abs_max *= factor
            t.sum_sq *= factor * factor
            for pool in (t, t.generated) if t.generated else (t,):
                pool.rows = [r * factor for r in pool.rows]
                if pool.abs_sum is not None:
                    pool.abs_sum = pool.abs_sum * abs(factor)


def release(tensor) -> None:
    """Drop a lazily read tensor's memory map (its pages would otherwise stay counted as resident)."""
    drop = getattr(tensor, "release", None)
    if drop is not None:
        drop()


def _quietly(fn, *args):
    """onnxruntime's collectors print progress lines to stdout; keep stdout for the tool's output."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


class TappingBackend:
    """Wraps a runtime backend whose tapped parts run their tap graphs: the part's own outputs go back
    to the pipeline, the tapped activations into that part's ``ActivationStats`` (only on the runs
    ``keep`` accepts)."""

    def __init__(self, inner, stats: dict[str, ActivationStats], plain_outputs: dict[str, int],
                 keep: Callable[[str, dict], bool]):
        self._inner = inner
        self._stats = stats
        self._plain = plain_outputs  # part -> number of its own outputs (taps follow them)
        self._keep = keep

    def run(self, part: str, feeds: dict[str, np.ndarray]):
        outs = self._inner.run(part, feeds)
        if part not in self._stats:
            return outs
        n, k = self._plain[part], len(TAP_OUTPUTS)
        if self._keep(part, feeds):
            names = self._stats[part].names
            generated = part == "decoder" and feeds["input_ids"].shape[1] == 1
            self._stats[part].update({name: outs[n + k * i:n + k * (i + 1)] for i, name in enumerate(names)},
                                     generated)
        return outs[:n]

    def __getattr__(self, name):
        return getattr(self._inner, name)
