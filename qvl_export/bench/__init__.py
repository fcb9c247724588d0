"""Benchmark harness: PyTorch eager vs our ONNX Runtime artifacts (``qvl-export bench``).

    from qvl_export.bench import run_bench
    report = run_bench("qwen2.5-vl-3b", layers=4, threads=2, out_dir="bench-out")

Wiring into the click CLI (``cli.py``)::

    from qvl_export.bench import click_options

    @main.command()
    @click_options
    def bench(**options):
        \"\"\"Benchmark PyTorch eager vs the ONNX Runtime artifacts on random weights.\"\"\"
        from qvl_export.bench import run_bench_cli
        run_bench_cli(**options)

``OPTIONS`` lists the same options as data (``(param_decls, kwargs)`` for ``click.option``).
Importing this package is cheap: torch, transformers and onnxruntime load only in the workers.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.bench.configs import MODELS

__all__ = ["run_bench", "run_bench_cli", "click_options", "OPTIONS", "MODELS"]

OPTIONS: list[tuple[tuple[str, ...], dict]] = [
    (("--model",), dict(type=str, default="qwen2.5-vl-3b", show_default=True,
                        help=f"Shape to benchmark (random weights): {', '.join(MODELS)}.")),
    (("--layers",), dict(type=int, default=0, show_default=True,
                         help="Cut vision and LLM depth to N layers for a quick look (0 = full depth, what README's "
                              "figures use; a cut keeps per-layer costs comparable).")),
    (("--threads",), dict(type=int, default=2, show_default=True, help="Threads for every engine.")),
    (("-o", "--output", "out_dir"), dict(type=str, default="bench-out", show_default=True,
                                         help="Folder for bench.json, table.txt and the plot.")),
    (("--pixels",), dict(type=str, default="448,896,1344", show_default=True,
                         help="Square page sides for the vision figures, comma separated.")),
    (("--video",), dict(type=str, default="16x448", show_default=True,
                        help="FRAMESxSIDE of the video clip timed on the vision encoder (0: none).")),
    (("--decode-tokens",), dict(type=int, default=64, show_default=True)),
    (("--prompt-tokens",), dict(type=int, default=32, show_default=True, help="Text tokens after the page.")),
    (("--repeats",), dict(type=int, default=3, show_default=True, help="Timed runs per figure (median).")),
    (("--skip-torch",), dict(is_flag=True, help="Measure only our artifacts.")),
    (("--no-profile",), dict(is_flag=True, help="Skip the onnxruntime profile of the decoder and vision graphs.")),
    (("--reuse",), dict(is_flag=True, help="Keep and reuse the checkpoint and artifacts of an identical earlier run.")),
    (("--idle-wait",), dict(type=float, default=0.0, show_default=True,
                            help="Seconds to wait at most, before each worker, for other processes to go quiet.")),
    (("--retries",), dict(type=int, default=0, show_default=True,
                          help="Re-run a worker this many times when other processes used > 0.25 cores meanwhile.")),
    (("--quantized",), dict(type=str, default="", show_default=False,
                            help="Also build and time our artifacts at these precisions against our fp32 (int8).")),
    (("--calib-limit",), dict(type=int, default=4, show_default=True,
                              help="Built-in calibration documents for the --quantized builds.")),
    (("--peers",), dict(type=str, default="", show_default=False,
                        help="Also build and time the LLM with these peers' own tools: ort-genai, llama.cpp "
                             "(when installed).")),
    (("--llama-cpp-src",), dict(type=str, default=None,
                                help="llama.cpp source tree (its convert_hf_to_gguf.py) for --peers llama.cpp; "
                                     "default $QVL_LLAMA_CPP_SRC.")),
    (("--memory-reserve-mb",), dict(type=float, default=1024.0, show_default=True,
                                    help="Stop a worker when available memory falls below this.")),
    (("--serve", "serve_artifacts"), dict(type=str, default=None,
                                          help="Load-test 'qvl-export serve' on this artifacts folder instead "
                                               "(loopback only): batch 1 vs continuous batching, same requests.")),
    (("--clients",), dict(type=int, default=4, show_default=True, help="--serve: concurrent clients.")),
    (("--requests",), dict(type=int, default=32, show_default=True, help="--serve: requests in all, per setting.")),
    (("--max-tokens",), dict(type=int, default=64, show_default=True, help="--serve: max_tokens of every request.")),
]


def click_options(func):
    """Decorate a click command with every bench option."""
    import click

    for decls, kwargs in reversed(OPTIONS):
        func = click.option(*decls, **kwargs)(func)
    return func


def run_bench(*args, **kwargs):
    """See :func:`qvl_export.bench.harness.run_bench`."""
    from qvl_export.bench.harness import run_bench as impl

    return impl(*args, **kwargs)


def run_bench_cli(model: str, layers: int, threads: int, out_dir: str, pixels: str, decode_tokens: int,
                  prompt_tokens: int, repeats: int, skip_torch: bool, no_profile: bool, reuse: bool,
                  idle_wait: float, retries: int, memory_reserve_mb: float, quantized: str = "",
                  calib_limit: int = 4, peers: str = "", llama_cpp_src: str | None = None,
                  video: str = "16x448", serve_artifacts: str | None = None, clients: int = 4, requests: int = 32,
                  max_tokens: int = 64) -> dict:
    """The CLI entry: parse the option strings, run, print the table to stdout."""
    import sys

    if serve_artifacts:
        from qvl_export.serving import loadtest

        results = loadtest.run_load_test(serve_artifacts, clients=clients, requests=requests, max_tokens=max_tokens,
                                         threads=threads, progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr,
                                                                                     flush=True))
        print(loadtest.table(results))
        print(f"\nwritten: {loadtest.report(results, out_dir)}")
        return {"serve": [r.__dict__ for r in results]}
    from qvl_export.bench.harness import run_bench as impl

    sides = tuple(int(p) for p in str(pixels).replace(" ", "").split(",") if p)
    report = impl(model, None if layers == 0 else layers, threads, Path(out_dir), sides, decode_tokens,
                  prompt_tokens, skip_torch, repeats=repeats, profile=not no_profile, reuse=reuse,
                  memory_reserve_mb=memory_reserve_mb, idle_wait_s=idle_wait, retries=retries,
                  quantized=tuple(q for q in quantized.replace(" ", "").split(",") if q), calib_limit=calib_limit,
                  peers=_peers(peers), llama_cpp_src=llama_cpp_src, video=_clip(video),
                  progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    from qvl_export.bench.report import table

    print(table(report))
    print(f"\nwritten: {Path(out_dir) / 'bench.json'}, {Path(out_dir) / 'table.txt'}, "
          f"{Path(out_dir) / 'encoder_time_vs_pixels.png'}")
    return report


def _peers(names: str) -> tuple[str, ...]:
    from qvl_export.bench.peers import parse

    return parse(names)


def _clip(text: str) -> tuple[int, int] | None:
    """``"16x448"`` -> (16, 448); ``"0"`` or ``""`` -> None."""
    from qvl_export.core.errors import QvlError

    text = str(text).strip().lower()
    if text in ("", "0", "none"):
        return None
    frames, _, side = text.partition("x")
    if not (frames.isdigit() and side.isdigit() and int(frames) >= 1 and int(side) >= 28):
        raise QvlError(f"--video {text!r}: give FRAMESxSIDE, e.g. 16x448 (side at least 28), or 0 for none.")
    return int(frames), int(side)
