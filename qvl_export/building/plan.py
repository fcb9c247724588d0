"""The build, declared: one ordered list of stages over in-memory models.

``STAGES`` is the whole build in the order it runs. A stage is a small named callable over the
``BuildContext``; a per-part stage runs once per part, and consecutive per-part stages run one part
at a time (vision, merger, decoder), so only one part's graph is in memory at once. Between the two
per-part groups the float folder is complete and loadable, which calibration needs:

    checks -> [trace -> graph passes -> save] per part -> manifest -> calibrate
           -> [quantize -> quantized passes -> lint -> save] per part -> engines -> commit

Every file is written through the ``ArtifactStore`` the ``open_store`` stage creates; a failure
anywhere removes the temporary folder whole. ``describe_stages`` lists the plan
(``qvl-export passes`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qvl_export.building import quantize_stage as q
from qvl_export.building import stages as s
from qvl_export.building.context import BuildContext
from qvl_export.building.settings import Reporter, Settings
from qvl_export.core.manifest import Manifest
from qvl_export.core.parts import PARTS


def _always(ctx: BuildContext, part: str | None = None) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # run(ctx) for a build stage, run(ctx, part) for a per-part stage
    doc: str  # one line: what it does and when it runs
    per_part: bool = False
    when: Callable[..., bool] = _always  # when(ctx, part) -> whether it runs


STAGES: tuple[Stage, ...] = (
    Stage("check_request", s.check_request, "target, precisions (registry rules), destination, pass names"),
    Stage("validate_checkpoint", s.validate_checkpoint, "config, tokenizer, chat template, every weight's shape"),
    Stage("check_device", s.check_device, "trt: device precisions, shape ranges, memory estimate", when=s.is_trt),
    Stage("load_documents", q.load_documents, "int8/fp8, AWQ int4: the calibration documents", when=q.is_calibrated),
    Stage("open_store", s.open_store, "temporary artifacts folder beside the destination"),
    Stage("trace", s.trace, "torch module -> ONNX in the precision's traced dtype", per_part=True),
    Stage("graph_passes", s.graph_passes, "the target's graph passes on the float graph", per_part=True),
    Stage("save_float", s.save_part, "write the float part, free it", per_part=True),
    Stage("write_manifest", s.write_manifest, "tokenizer and config files, chat template, unsealed manifest"),
    Stage("calibrate", q.calibrate, "int8/fp8, AWQ int4: activation statistics on the float artifacts (or the cache)",
          when=q.is_calibrated),
    Stage("quantize", q.quantize, "quantized parts: the precision kind's quantizer (Q/DQ or weight-only)",
          per_part=True),
    Stage("quantized_passes", s.quantized_passes, "builds that quantize: passes after Q/DQ / packing",
          per_part=True),
    Stage("lint", s.lint, "trt: the final graph against TensorRT's rules", per_part=True, when=s.is_trt),
    Stage("save_final", s.save_part, "write the parts that changed, record lint findings", per_part=True),
    Stage("engines", s.engines, "trt: bundle files, or the engines built here", when=s.is_trt),
    Stage("commit", s.commit, "seal checksums, write manifest and build log, move into place"),
)


def describe_stages() -> list[str]:
    """One line per stage, in order (``qvl-export passes`` prints them above the passes)."""
    return [f"{i:>2}. {st.name:<20} {'[per part]' if st.per_part else '[build]':<11} {st.doc}"
            for i, st in enumerate(STAGES, 1)]


def run_build(model_dir: str | Path, out_dir: str | Path, settings: Settings,
              reporter: Reporter | None = None, stages: tuple[Stage, ...] = STAGES) -> Manifest:
    """Run ``stages`` in order; on any failure (or interrupt) nothing is left half-written.

    The objects that exist before the build (the caller's, torch's modules) are frozen for its
    duration: the cycle collection after every stage (``_memory``) then walks only what the build
    made - 0.3 s a stage in a process that has imported torch and transformers, most of a small
    build's time."""
    import gc

    ctx = BuildContext(Path(model_dir), Path(out_dir), settings, reporter or Reporter())
    memory = ctx.build_log.setdefault("memory", [])  # resident memory after each stage (build_log.json)
    gc.collect()
    gc.freeze()
    try:
        for group in _groups(stages):
            if group[0].per_part:
                for part in PARTS:
                    for st in group:
                        if st.when(ctx, part):
                            st.run(ctx, part)
                            memory.append(_memory(f"{st.name}:{part}"))
            elif group[0].when(ctx):
                group[0].run(ctx)
                memory.append(_memory(group[0].name))
    except BaseException:
        if ctx.store is not None:
            ctx.store.abort()
        raise
    finally:
        gc.unfreeze()
    return ctx.manifest


def _memory(stage: str) -> dict:
    """Resident memory now and at its peak so far (MiB; Linux's /proc, else the peak alone). ``anon``
    is what the process holds itself; the rest of ``rss`` are file pages it maps (weights onnxruntime
    reads in place), which the kernel can drop.

    A stage's graphs are reference cycles (nodes, values, graph), which only the cycle collector frees,
    and it seldom runs on its own: collected here after every stage, so the next stage - and the parity
    gate after the build - does not run beside the last one's garbage (a 3B decoder=int4 build held
    2.7 GB of its packed decoder into the gate)."""
    import gc

    from qvl_export.building.stages import peak_rss_bytes

    gc.collect()

    out = {"stage": stage, "peak_mib": peak_rss_bytes() >> 20}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        out["rss_mib"] = int(fields["VmRSS"].split()[0]) >> 10
        out["anon_mib"] = int(fields["RssAnon"].split()[0]) >> 10
    except (OSError, KeyError, ValueError):
        pass
    return out


def _groups(stages: tuple[Stage, ...]) -> list[list[Stage]]:
    """Consecutive per-part stages form one group (run part by part); each build stage is its own."""
    groups: list[list[Stage]] = []
    for st in stages:
        if st.per_part and groups and groups[-1][0].per_part:
            groups[-1].append(st)
        else:
            groups.append([st])
    return groups
