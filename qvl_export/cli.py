"""Command line: ``qvl-export build | run | parity``.

Errors caused by input (bad paths, unsupported models, unreadable images, ...) print one line and
exit 2; a failed parity gate exits 1. ``--debug`` shows tracebacks for unexpected failures.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from qvl_export.core import precisions
from qvl_export.core.errors import QvlError
from qvl_export.core.parts import TARGETS

log = logging.getLogger("qvl_export")


class _Group(click.Group):
    """Turns user and environment failures into one ``error: ...`` line (exit 2), interrupts into 130
    (SIGINT) / 143 (SIGTERM), anything else into a one-line internal failure (exit 3)."""

    class _Command(click.Command):
        def invoke(self, ctx):
            import os

            from qvl_export.core.errors import invalid_utf8, invalid_utf8_message

            # click decodes command-line bytes that are not UTF-8 as lone surrogates: refuse them here,
            # naming the option, before they reach a tokenizer or a file name
            for param in self.params:
                value = ctx.params.get(param.name)
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    is_path = isinstance(item, os.PathLike)
                    text = os.fspath(item) if is_path else item
                    if isinstance(text, str) and invalid_utf8(text):
                        label = (max(param.opts, key=len) if isinstance(param, click.Option)
                                 else param.human_readable_name)
                        is_path = is_path or isinstance(param.type, click.Path)
                        raise QvlError(invalid_utf8_message(label, text, is_path))
            ctx.meta["qvl_export.command"] = (self, dict(ctx.params))
            return super().invoke(ctx)

    command_class = _Command

    def invoke(self, ctx):
        import errno

        from qvl_export.core.errors import disk_error, disk_error_message, missing_module_message, unicode_error_message

        try:
            return super().invoke(ctx)
        except QvlError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            from qvl_export.signals import Terminated

            name, code = ("SIGTERM", err.exit_code) if isinstance(err, Terminated) else ("SIGINT", 130)
            click.echo(f"interrupted ({name}); nothing was left half-written.", err=True)
            sys.exit(code)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except ModuleNotFoundError as err:
            message = missing_module_message(err, f"qvl-export {ctx.invoked_subcommand}")
            if message is None:
                self._internal(ctx, err)
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        except UnicodeError as err:
            click.echo(f"error: {unicode_error_message(err)}", err=True)
            sys.exit(2)
        except Exception as err:  # a full / read-only / unwritable disk, else an internal failure
            disk = disk_error(err)
            if disk is None:
                if isinstance(err, OSError) and err.errno == errno.EPIPE:
                    raise  # click's main quiets a closed stdout (| head)
                self._internal(ctx, err)
            command, params = ctx.meta.get("qvl_export.command", (None, {}))
            opts = [o for p in (command.params if command else []) for o in getattr(p, "opts", [])]
            out = next((params[k] for k in ("output", "out_dir", "bundle", "artifacts") if params.get(k)), None)
            click.echo(f"error: {disk_error_message(disk, out, has_output_option='-o' in opts)}", err=True)
            sys.exit(2)

    @staticmethod
    def _internal(ctx, err):
        if ctx.obj and ctx.obj.get("debug"):
            raise err
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        click.echo(f"error: internal failure {type(err).__name__}: {first[:300]} "
                   "(re-run with --debug for the traceback and report it)", err=True)
        sys.exit(3)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal failures.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.pass_context
def main(ctx, debug: bool, verbose: bool):
    """Export, optimize and verify Qwen2-VL / Qwen2.5-VL models for ONNX Runtime and TensorRT."""
    from qvl_export.signals import interrupt_on_sigterm

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.call_on_close(interrupt_on_sigterm())  # SIGTERM cleans up like Ctrl-C, for this command only
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def _say(msg: str) -> None:
    click.echo(f"[qvl-export] {msg}", err=True)


def _warn(msg: str) -> None:
    click.echo(f"[qvl-export] warning: {msg}", err=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def engine(bundle):
    """Build the TensorRT engines of BUNDLE here, on the GPU that will run them.

    Needs only the runtime install plus TensorRT and cuda-python (no torch, no onnx-ir): every file is
    checked against the manifest's sha256 first, then the engines are built and recorded."""
    from qvl_export.building.trt_target import build_engines

    build_engines(bundle, _warn, _say)
    _say(f"engines written into {bundle}; run it with 'qvl-export run {bundle} ...'")


def _options(*groups):
    """Apply groups of click options in the order written."""
    def decorate(f):
        for group in reversed(groups):
            for option in reversed(group):
                f = option(f)
        return f
    return decorate


# qvl-export build's options, grouped as building.settings groups them (settings_from_cli maps them)
_BUILD_OUTPUT = [
    click.argument("model_dir", required=False, type=click.Path(path_type=Path)),
    click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
                 help="Artifacts folder (default: build/<model name>)."),
    click.option("--target", type=click.Choice(list(TARGETS)), default="ort", show_default=True),
    click.option("--precision", default="fp32", show_default=True,
                 help=f"One of {', '.join(precisions.NAMES)} for every part (fp8: the decoder; the vision "
                      "tower stays fp16, the merger fp32; int4: the decoder, the rest fp32), or per part: "
                      "vision=fp16,merger=fp16,decoder=int8."),
]
_BUILD_CALIBRATION = [
    click.option("--calib-docs", type=click.Path(path_type=Path), default=None,
                 help="Folder of PNG/JPEG/WebP/PDF calibration documents (default: the built-in set)."),
    click.option("--calib-limit", type=click.IntRange(1), default=None, help="Use at most N calibration documents."),
    click.option("--calib-cache", type=click.Path(path_type=Path), default=None,
                 help="Folder to store / reuse the calibration feeds."),
    click.option("--calibrator", type=click.Choice(["percentile", "max", "entropy", "distribution"]),
                 default="percentile", show_default=True,
                 help="int8 activation calibrator (fp8 always uses max: amax / 448 per tensor)."),
    click.option("--activations", type=click.Choice(["auto", "static", "dynamic"]), default="auto",
                 show_default=True,
                 help="int8 activation scales: static (calibrated, in the graph) or dynamic (per run, "
                      "onnxruntime's DynamicQuantizeMatMul); auto: dynamic for the ort target's decoder, "
                      "static elsewhere (TensorRT and fp8 take static scales only)."),
    click.option("--range-search/--no-range-search", default=True, show_default=True,
                 help="Static int8 activation ranges: search each between the calibrator's range and its max by "
                      "the error it puts into the op's output (keeps massive activations unclipped)."),
    click.option("--sensitivity", is_flag=True, help="Print every quantized op's local quantization error."),
    click.option("--int4-method", type=click.Choice(["rtn", "awq"]), default="rtn", show_default=True,
                 help="int4 weights: rtn (round to nearest, no calibration) or awq (activation-aware scales and "
                      "clipping searched on the calibration documents: pass --calib-docs with your own)."),
    click.option("--int4-block", type=int, default=None,
                 help="int4 weights per scale: ort 16, 32 (default), 64, 128, 256; trt 64 (default), 128. Larger "
                      "blocks decode faster on CPU and round coarser; the parity gate judges the result."),
]
REFERENCE_WEIGHTS_HELP = ("The float32 reference of a bf16 / fp16 checkpoint: 'stored' holds the weights as stored and widens each module's own while it runs (about half the memory, slower decoding); 'float32' widens all at load. Same results either way.")
_BUILD_GRAPH = [
    click.option("--window-attention", type=click.Choice(["fused", "dense"]), default="fused", show_default=True,
                 help="Qwen2.5-VL window blocks: per-window attention, or the S x S mask baseline."),
    click.option("--parity/--no-parity", "run_parity", default=True, show_default=True,
                 help="Run the parity gate against the PyTorch reference after building."),
    click.option("--gates", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                 help="JSON file overriding the parity thresholds."),
    click.option("--reference-weights", type=click.Choice(["stored", "float32"]), default="stored",
                 show_default=True, help=REFERENCE_WEIGHTS_HELP),
    click.option("--eval-docs", "eval_docs", type=click.Path(path_type=Path), default=None,
                 help="Task gate: a folder of images / PDFs with prompts.txt (and answers.jsonl); the built "
                      "artifacts' answers must agree with transformers' (README 'Task gate')."),
    click.option("--passes", "only_passes", default=None,
                 help="Comma-separated passes to run (default: every pass of the target; 'none' for none)."),
    click.option("--skip-pass", "skip_passes", multiple=True, help="A pass to leave out; repeatable."),
]
_BUILD_TRT = [
    click.option("--device", default="x86-gpu", show_default=True,
                 help="trt target device: x86-gpu, jetson-orin, jetson-orin-nx, jetson-orin-nano, jetson-thor."),
    click.option("--bundle", is_flag=True, help="trt target: write a bundle to build the engines on the device."),
    click.option("--engine-min-pixels", default=56 * 56, show_default=True, type=click.IntRange(1)),
    click.option("--engine-opt-pixels", default=896 * 896, show_default=True, type=click.IntRange(1)),
    click.option("--engine-max-pixels", default=1344 * 1344, show_default=True, type=click.IntRange(1)),
    click.option("--max-images", default=1, show_default=True, type=click.IntRange(1), help="Images per prompt."),
    click.option("--max-seq", default=4096, show_default=True, type=click.IntRange(2), help="Prompt + new tokens."),
    click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1)),
]
_BUILD_CHECKPOINT = [
    click.option("--chat-template", "chat_template", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="A Jinja chat template to use instead of the checkpoint's (copied into the artifacts)."),
    click.option("--assume-default-preprocessing", is_flag=True,
                 help="Build a checkpoint that has no preprocessor_config.json with Qwen2-VL's default settings."),
    click.option("--force", is_flag=True, help="Replace an existing artifacts folder."),
]


@main.command()
@_options(_BUILD_OUTPUT, _BUILD_CALIBRATION, _BUILD_GRAPH, _BUILD_TRT, _BUILD_CHECKPOINT)
def build(model_dir, output, run_parity, gates, eval_docs, reference_weights, **options):
    """Trace MODEL_DIR into ONNX parts (the built-in demo checkpoint when omitted), then check parity."""
    from qvl_export.building.plan import run_build
    from qvl_export.building.settings import Reporter, parity_skip_reason, resolve_model, settings_from_cli

    docs = None
    if eval_docs is not None:
        from qvl_export.core.errors import QvlError
        from qvl_export.parity.eval_docs import read_eval_docs

        if not run_parity:
            raise QvlError("--eval-docs is gated by the parity run; drop --no-parity or --eval-docs.")
        docs = read_eval_docs(eval_docs)  # bad documents fail before the build
    model_dir, output = resolve_model(model_dir, output, _say)
    settings = settings_from_cli(options)
    run_build(model_dir, output, settings, Reporter(_say, _warn))
    skipped = parity_skip_reason(settings) if run_parity else None
    if skipped:
        _say(skipped + (" (the --eval-docs task gate with it)" if docs else ""))
    elif run_parity:
        _parity(output, model_dir, gates, quick=True, verify=False,  # sealed by this very build a moment ago
                eval_docs=docs, reference_weights=reference_weights)


@main.command("passes")
@click.option("--target", type=click.Choice(["ort", "trt"]), default=None, help="Only this target's passes.")
def list_passes(target):
    """List the build's stages, then the graph passes in the order they run (the graph_passes stage's list,
    then the quantized_passes stage's), with the parts and targets they apply to."""
    from qvl_export.building.plan import describe_stages
    from qvl_export.core.parts import PARTS, TARGETS
    from qvl_export.passes import GRAPH_PASSES, QUANTIZED_PASSES

    click.echo("build stages:")
    for line in describe_stages():
        click.echo(f"  {line}")
    click.echo("")
    click.echo(f"{'pass':<30} {'stage':<10} {'targets':<9} {'parts':<24} description")
    for stage, classes in (("graph", GRAPH_PASSES), ("quantized", QUANTIZED_PASSES)):
        for p in (cls() for cls in classes):
            targets = [t for t in TARGETS if t in p.targets]
            if target and target not in targets:
                continue
            parts = [x for x in PARTS if x in p.parts]
            click.echo(f"{p.name:<30} {stage:<10} {','.join(targets):<9} {','.join(parts):<24} {p.description}")


@main.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image file (PNG/JPEG/WebP/...) or a PDF (each page one image); repeat for several images.")
@click.option("--pages", default=None, help="PDF pages to take, e.g. 1-3, 2 or 1,3-4 [default: every page].")
@click.option("--video", "videos", multiple=True, type=click.Path(path_type=Path),
              help="Video file (mp4/webm/mkv/mov/gif, sampled at --fps) or a folder of frame images (sorted by "
                   "name, taken as sampled at --fps); repeat for several. Videos come after the images.")
@click.option("--fps", default=None, type=click.FloatRange(0.0, min_open=True),
              help="Video frames sampled per second [default: 2.0].")
@click.option("--max-frames", default=None, type=click.IntRange(1),
              help="Most frames kept per video (evenly spaced) [default: 768, fewer when the context needs it].")
@click.option("--prompt", default=None, help="The user's question (one user turn after the images and videos).")
@click.option("--system", default=None,
              help="A system turn before the question (default: whatever the model's chat template writes).")
@click.option("--messages", "messages_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A JSON file with a whole chat: [{\"role\": ..., \"content\": ...}, ...] "
                   "(image items: {\"type\": \"image\", \"image\": PATH}; a PDF: one image per page, "
                   "\"pages\": \"1-3\" to choose).")
@click.option("--max-new-tokens", default=None, type=click.IntRange(1),
              help="[default: the checkpoint's generation_config.json max_new_tokens, else 128]")
@click.option("--temperature", default=None, type=click.FloatRange(0.0),
              help="0 = greedy [default: the checkpoint's generation_config.json]")
@click.option("--top-p", default=None, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="[default: the checkpoint's generation_config.json]")
@click.option("--top-k", default=None, type=click.IntRange(0), help="0 = off [default: the checkpoint's]")
@click.option("--repetition-penalty", default=None, type=click.FloatRange(0.0, min_open=True),
              help="1 = off [default: the checkpoint's]")
@click.option("--greedy", is_flag=True, help="Greedy decoding whatever the checkpoint's sampling settings.")
@click.option("--seed", default=None, type=int)
@click.option("--min-pixels", default=None, type=click.IntRange(1))
@click.option("--max-pixels", default=None, type=click.IntRange(1))
@click.option("--threads", default=None, type=click.IntRange(1))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
              help="Run a trt folder's ONNX parts on onnxruntime (debugging), or force TensorRT.")
@click.option("--skip-verify", is_flag=True, help="Do not check the artifacts' files against the manifest's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print text, token ids and timings as JSON.")
def run(artifacts, images, pages, videos, fps, max_frames, prompt, system, messages_file, max_new_tokens,
        temperature, top_p, top_k, repetition_penalty, greedy, seed, min_pixels, max_pixels, threads, backend,
        skip_verify, as_json):
    """Generate text for PROMPT about the images and videos (or for a --messages chat) with the thin runtime."""
    from qvl_export.core.manifest import Manifest
    from qvl_export.runtimes import pdf
    from qvl_export.runtimes.pipeline import Pipeline

    messages = None
    if messages_file is not None:
        if images or videos or prompt is not None or system is not None:
            raise QvlError("--messages holds the whole chat: give it without --image, --video, --prompt or --system.")
        messages = _read_messages(messages_file)
    elif prompt is None:
        raise QvlError("Give --prompt TEXT (with --image / --video files), or --messages FILE.json.")
    images = list(images)
    if pages is not None or messages is not None or any(pdf.is_pdf(i) for i in images):
        # PDF pages checked against what the artifacts take, and rendered, before the parts load
        limits = pdf.PageLimits.of(Manifest.read(artifacts), min_pixels, max_pixels)
        if messages is not None:
            messages = pdf.expand_messages(messages, limits, pages)
        else:
            images = pdf.expand(images, limits, pages)
    pipe = Pipeline.load(artifacts, threads=threads, backend=backend, verify=not skip_verify)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=top_p,
                  top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, min_pixels=min_pixels,
                  max_pixels=max_pixels, messages=messages, system=system, videos=[str(v) for v in videos], fps=fps,
                  max_frames=max_frames)
    prompt = prompt or ""
    if as_json:
        result = pipe.generate(images, prompt, **kwargs)
        out = {"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
               "finish_reason": result.finish_reason, "timings": result.timings}
        if result.videos:  # per video: frames used, their timestamps (s), grid, tokens, notes
            out["videos"] = result.videos
        click.echo(json.dumps(out))
        return
    for piece in pipe.stream(images, prompt, **kwargs):
        click.echo(piece, nl=False)
    click.echo()


def _read_messages(path: Path) -> list:
    from qvl_export.runtimes.chat import check_messages

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise QvlError(f"--messages {path} is not a readable JSON file ({err}).") from None
    if isinstance(data, dict) and "messages" in data:  # an OpenAI-style request body
        data = data["messages"]
    messages = check_messages(data)
    base = path.parent  # relative image paths are relative to the messages file
    for m in messages:
        for item in m["content"] if isinstance(m.get("content"), list) else []:
            for key in ("image", "video"):
                value = item.get(key) if isinstance(item, dict) else None
                if isinstance(value, str) and not value.startswith(("data:", "file://", "http://", "https://")) \
                        and not Path(value).is_absolute():
                    item[key] = str(base / value)
    return messages


@main.command()
@click.argument("artifacts", type=click.Path(path_type=Path))
@click.option("--reference", "reference", required=True, type=click.Path(path_type=Path),
              help="The checkpoint the artifacts were built from (run with transformers).")
@click.option("--gates", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="JSON file overriding the thresholds of the precision's gates.")
@click.option("--quick", is_flag=True, help="Fewer cases and new tokens.")
@click.option("--skip-verify", is_flag=True, help="Do not check the artifacts' files against the manifest's sha256.")
@click.option("--eval-docs", "eval_docs", type=click.Path(path_type=Path), default=None,
              help="Task gate: a folder of images / PDFs with prompts.txt (and answers.jsonl).")
@click.option("--reference-weights", type=click.Choice(["stored", "float32"]), default="stored", show_default=True,
              help=REFERENCE_WEIGHTS_HELP)
def parity(artifacts, reference, gates, quick, skip_verify, eval_docs, reference_weights):
    """Compare ARTIFACTS stage by stage against the PyTorch reference; exit 1 when a gate fails."""
    _parity(artifacts, reference, gates, quick=quick, verify=not skip_verify, eval_docs=eval_docs,
            reference_weights=reference_weights)


def _parity(artifacts: Path, reference: Path, gates: Path | None, quick: bool, verify: bool = True,
            eval_docs=None, reference_weights: str = "stored") -> None:
    from qvl_export.parity.gate import run_parity

    report = run_parity(artifacts, reference, gates_file=gates, quick=quick, progress=_say, verify=verify,
                        eval_docs=eval_docs, reference_weights=reference_weights)
    click.echo(report.table())
    _say(f"report written to {Path(artifacts) / 'report.json'}")
    if not report.passed:
        from qvl_export.core.errors import GateFailed

        raise GateFailed(f"parity gate failed: {report.failure_summary()}")


def _bench_command():
    from qvl_export.bench import click_options

    @main.command()
    @click_options
    def bench(**options):
        """Benchmark PyTorch eager vs the ONNX Runtime artifacts on random weights at real widths."""
        from qvl_export.bench import run_bench_cli

        run_bench_cli(**options)


_bench_command()


from qvl_export.serving.command import serve  # noqa: E402 - click only; fastapi / uvicorn load when it runs

main.add_command(serve)

if __name__ == "__main__":
    main()
