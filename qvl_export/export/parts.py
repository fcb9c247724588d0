"""Tracing: one export-ready module per part -> one ONNX model (onnx-ir) with dynamic axes.

A part is traced from a skeleton of its module (parameters uninitialised, no resident memory)
with ``torch.onnx.export(dynamo=True)``, and its initializers are then bound lazily to the
checkpoint's tensors (``export/lazy_weights.py``): nothing of the weights is read until the part
is saved, one tensor at a time. ``PartSpec.build`` still gives the module with its weights loaded,
for the tests that compare a traced part with its torch module.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from qvl_export.core.spec import ModelSpec
from qvl_export.loading.weights import CheckpointWeights

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OPSET = 19  # Q/DQ for int8 and fp8 (E4M3) needs >= 19


@dataclass
class PartSpec:
    """What a part is: how to build its module and example inputs, and its dynamic axes."""

    name: str
    module: Callable[[], "torch.nn.Module"]  # noqa: F821  (the export-ready module; weights not loaded)
    example: Callable[["torch.nn.Module"], tuple]  # noqa: F821
    dynamic: Callable[["torch.nn.Module"], tuple]  # noqa: F821
    axes: dict[str, dict[int, str]] = field(default_factory=dict)  # input/output name -> {axis: name}
    # inputs that take the part's dtype in an fp16/bf16 trace (rotary tables and ids stay as they are)
    low_precision_inputs: tuple[str, ...] = ()
    weights: CheckpointWeights | None = None
    prefix: str = ""  # checkpoint name prefix of the module's parameters
    # module -> (aliases: parameter -> checkpoint name, transposed: parameter -> checkpoint name)
    names: Callable[["torch.nn.Module"], tuple[dict[str, str], dict[str, str]]] = \
        lambda m: (getattr(m, "weight_aliases", dict)(), getattr(m, "transposed_weights", dict)())  # noqa: E731
    # everything the module and its example inputs are built from (JSON-able): the trace cache's key;
    # empty: never cached
    description: dict = field(default_factory=dict)

    def build(self):
        """The module with the checkpoint's weights loaded (shapes checked)."""
        m = self.module()
        aliases, transposed = self.names(m)
        self.weights.load_into(m, self.prefix, aliases, transposed or None)
        return m

    def skeleton(self):
        """The module with its parameters left uninitialised (bound lazily after tracing)."""
        from qvl_export.export.lazy_weights import skeleton

        with skeleton():
            return self.module()


def vision_part(spec: ModelSpec, weights: CheckpointWeights, window_attention: str = "fused") -> PartSpec:
    import torch
    from torch.export import Dim

    from qvl_export.models.vision import VisionEncoder

    v = spec.vision
    if v.family == "qwen3_vl":
        return _qwen3_vision_part(spec, weights)

    def module():
        return VisionEncoder(v, window_attention).eval()

    # S is a whole number of windows (Qwen2.5-VL) or merge units (Qwen2-VL)
    group = v.window_tokens if v.windowed else v.merge_unit
    units = 3 if v.windowed else 12

    def example(m):
        s = group * units
        g = torch.Generator().manual_seed(0)
        ids = torch.zeros(s, dtype=torch.int64)
        ids[s // 2:] = 1
        ids[-2:] = -1
        return (torch.randn(s, v.patch_dim, generator=g), torch.randn(s, v.head_dim, generator=g).cos(),
                torch.randn(s, v.head_dim, generator=g).sin(), ids)

    def dynamic(m):
        seq = group * Dim("units", min=1, max=1 << 20)
        return ({0: seq}, {0: seq}, {0: seq}, {0: seq})

    axes = {n: {0: "vision_tokens"} for n in ("patches", "rope_cos", "rope_sin", "image_ids", "vision_hidden")}
    return PartSpec("vision", module, example, dynamic, axes, ("patches",), weights, "visual.",
                    description=_describe("vision", spec, window_attention=window_attention))


def _qwen3_vision_part(spec: ModelSpec, weights: CheckpointWeights) -> PartSpec:
    """Qwen3-VL: natural order (no windows), plus the position-table taps; DeepStack features out."""
    import torch
    from torch.export import Dim

    from qvl_export.models.vision import Qwen3VisionEncoder

    v = spec.vision

    def module():
        return Qwen3VisionEncoder(v).eval()

    def example(m):
        s = v.merge_unit * 12
        g = torch.Generator().manual_seed(0)
        ids = torch.zeros(s, dtype=torch.int64)
        ids[s // 2:] = 1
        taps = torch.randint(0, v.num_position_embeddings, (s, 4), generator=g)
        weights_ = torch.rand(s, 4, generator=g)
        return (torch.randn(s, v.patch_dim, generator=g), torch.randn(s, v.head_dim, generator=g).cos(),
                torch.randn(s, v.head_dim, generator=g).sin(), ids, taps, weights_ / weights_.sum(-1, keepdim=True))

    def dynamic(m):
        seq = v.merge_unit * Dim("units", min=1, max=1 << 20)
        return ({0: seq}, {0: seq}, {0: seq}, {0: seq}, {0: seq}, {0: seq})

    axes = {n: {0: "vision_tokens"} for n in ("patches", "rope_cos", "rope_sin", "image_ids", "pos_indices",
                                               "pos_weights", "vision_hidden")}
    axes["deepstack_hidden"] = {1: "vision_tokens"}
    return PartSpec("vision", module, example, dynamic, axes, ("patches",), weights, "visual.",
                    description=_describe("vision", spec))


def merger_part(spec: ModelSpec, weights: CheckpointWeights) -> PartSpec:
    import torch
    from torch.export import Dim

    from qvl_export.models.vision import Merger, Qwen3Merger

    v = spec.vision
    if v.family == "qwen3_vl":  # the merger and the DeepStack mergers: [S, C], [L, S, C] in
        def module3():
            return Qwen3Merger(v).eval()

        def example3(m):
            g = torch.Generator().manual_seed(1)
            hidden = torch.randn(v.merge_unit * 6, v.hidden_size, generator=g)
            if not v.deepstack:
                return (hidden,)
            return hidden, torch.randn(v.deepstack, v.merge_unit * 6, v.hidden_size, generator=g)

        def dynamic3(m):
            seq = v.merge_unit * Dim("units", min=1, max=1 << 20)
            return ({0: seq}, {1: seq}) if v.deepstack else ({0: seq},)

        axes3 = {"vision_hidden": {0: "vision_tokens"}, "deepstack_hidden": {1: "vision_tokens"},
                 "image_embeds": {0: "image_tokens"}, "deepstack_embeds": {1: "image_tokens"}}
        return PartSpec("merger", module3, example3, dynamic3, axes3, ("vision_hidden", "deepstack_hidden"),
                        weights, "visual.", description=_describe("merger", spec))

    def module():
        return Merger(v).eval()

    def example(m):
        return (torch.randn(v.merge_unit * 6, v.hidden_size, generator=torch.Generator().manual_seed(1)),)

    def dynamic(m):
        return ({0: v.merge_unit * Dim("units", min=1, max=1 << 20)},)

    axes = {"vision_hidden": {0: "vision_tokens"}, "image_embeds": {0: "image_tokens"}}
    return PartSpec("merger", module, example, dynamic, axes, ("vision_hidden",), weights, "visual.merger.",
                    description=_describe("merger", spec))


def decoder_part(spec: ModelSpec, weights: CheckpointWeights) -> PartSpec:
    import torch
    from torch.export import Dim

    from qvl_export.models.decoder import DeepStackDecoder, Decoder

    t = spec.text
    deepstack = spec.vision.deepstack  # Qwen3-VL: one more input, deepstack_embeds [L, N, H]

    def module():
        if deepstack:
            return DeepStackDecoder(t, spec.tokens.image_token_id, deepstack).eval()
        return Decoder(t, spec.tokens.image_token_id).eval()

    def example(m):
        b, seq, past, n_img = 2, 7, 3, 4
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, t.vocab_size, (b, seq), generator=g)
        ids[0, 1:3] = spec.tokens.image_token_id
        ids[1, 2:4] = spec.tokens.image_token_id
        pos = torch.arange(past, past + seq).expand(3, b, seq).contiguous()
        kv = [torch.randn(b, t.num_key_value_heads, past, t.head_dim, generator=g)
              for _ in range(2 * t.num_hidden_layers)]
        ds = (torch.randn(deepstack, n_img, t.hidden_size, generator=g),) if deepstack else ()
        return (ids, torch.randn(n_img, t.hidden_size, generator=g), *ds, pos, *kv)

    def dynamic(m):
        batch, seq, past, n_img = Dim("batch", max=256), Dim("seq", max=1 << 17), Dim("past", max=1 << 17), \
            Dim("image_tokens", max=1 << 17)
        kv = tuple({0: batch, 2: past} for _ in range(2 * t.num_hidden_layers))
        ds = ({1: n_img},) if deepstack else ()
        return ({0: batch, 1: seq}, {0: n_img}, *ds, {1: batch, 2: seq}, kv)  # *past is one tuple

    axes = {"input_ids": {0: "batch", 1: "seq"}, "image_embeds": {0: "image_tokens"},
            "deepstack_embeds": {1: "image_tokens"},
            "position_ids": {1: "batch", 2: "seq"}, "logits": {0: "batch"}}
    for i in range(t.num_hidden_layers):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "past_plus_seq"}
    low = ("image_embeds", "deepstack_embeds") + tuple(n for n in axes if n.startswith("past_key_values."))
    return PartSpec("decoder", module, example, dynamic, axes, low, weights, "model.",
                    description=_describe("decoder", spec))


def _describe(part: str, spec: ModelSpec, **options) -> dict:
    """What a part's traced graph is built from: the spec (its generation settings aside) and options."""
    stated = spec.to_dict()
    stated.pop("generation", None)
    return {"part": part, "spec": stated, **options}


def trace_part(part: PartSpec, dtype: str = "float32"):
    """Trace a skeleton of the part's module and bind its weights lazily; returns an ``onnx_ir.Model``.

    ``dtype``: the precision's ``trace_dtype`` (core.precisions), a torch dtype name. float16 /
    bfloat16: the parameters and the part's activation inputs take that dtype (the checkpoint's
    tensors are converted as they are read); buffers (rotary frequencies, section tables) stay
    float32, and the modules' own ``.float()`` casts keep norms, rotary and softmax in float32 - so
    the graph carries exactly the casts the modules declare.

    The exporter's optimizer is off for the trace (it would fold transposes of the uninitialised
    weights into constants); it runs after the weights are bound, with every weight transpose
    already folded lazily, so it finds nothing large to fold and reads no weight.

    A part with a ``description`` is looked up in the trace cache first (``export/trace_cache.py``):
    the graph before its weights are bound depends on the description and ``dtype`` only.
    """
    from onnxscript.optimizer import optimize_ir

    from qvl_export.export import trace_cache
    from qvl_export.export.lazy_weights import bind_lazy, fold_weight_transposes
    from qvl_export.loading.weights import load_plan

    module = part.skeleton()
    aliases, transposed = part.names(module)
    plan = load_plan(module, part.prefix, aliases, transposed)
    key = trace_cache.trace_key(part.description, dtype) if part.description else None
    model = trace_cache.load(key) if key else None
    if model is not None:
        log.info("%s: traced graph read from the trace cache", part.name)
    else:
        model = trace_cache.settle(_export(part, module, dtype), {name for name, _, _ in plan}, key)
    bind_lazy(model, part.weights, plan, set(transposed), dtype)
    _own_initializers(model)  # the buffers (rotary tables): small, computed by the module
    del module
    gc.collect()
    fold_weight_transposes(model)
    optimize_ir(model)
    return model


def _export(part: PartSpec, module, dtype: str):
    """``torch.onnx.export`` of the skeleton ``module`` on the part's example inputs in ``dtype``."""
    import torch

    args = part.example(module)
    if dtype != "float32":
        low = getattr(torch, dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.data = torch.empty_like(p.data, dtype=low)  # values come from the checkpoint
        names = list(module.input_names)
        flat = []
        for i, a in enumerate(args):
            if isinstance(a, (tuple, list)):
                flat.append(type(a)(x.to(low) for x in a))  # *past
            elif names[i] in part.low_precision_inputs:
                flat.append(a.to(low))
            else:
                flat.append(a)
        args = tuple(flat)
    log.info("tracing %s", part.name)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        # the exporter warns about merged axis names and missing torchvision ops: not actionable here
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=list(module.input_names),
            output_names=list(module.output_names),
            dynamic_shapes=part.dynamic(module),
            opset_version=OPSET,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    model = program.model
    _rename_dims(model, part.axes)
    return model


@contextlib.contextmanager
def _quiet_exporter():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _rename_dims(model, axes: dict[str, dict[int, str]]) -> None:
    """Give the symbolic dims stable, readable names (the exporter calls them s0, s1, ...)."""
    import onnx_ir as ir

    for value in list(model.graph.inputs) + list(model.graph.outputs):
        spec = axes.get(value.name)
        if not spec or value.shape is None:
            continue
        dims = list(value.shape)
        for axis, name in spec.items():
            if axis < len(dims) and not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(dims)


def _own_initializers(model) -> None:
    """Copy the initializers the torch exporter still backs with torch storage (the module's buffers)
    into numpy-owned tensors; lazily bound weights stay lazy."""
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        const = value.const_value
        if const is not None and not isinstance(const, (ir.Tensor, ir.LazyTensor)):
            value.const_value = ir.tensor(const.numpy(), name=value.name)
