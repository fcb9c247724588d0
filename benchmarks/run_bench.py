#!/usr/bin/env python
"""Benchmark PyTorch eager vs our ONNX Runtime artifacts (same as ``qvl-export bench``).

    python benchmarks/run_bench.py --model qwen2.5-vl-3b --layers 4 --threads 2 -o bench-out

See benchmarks/README.md for what is measured.
"""

import click

from qvl_export.bench import click_options, run_bench_cli


@click.command()
@click_options
def main(**options):
    """Benchmark PyTorch eager vs the ONNX Runtime artifacts on random weights at the real widths."""
    run_bench_cli(**options)


if __name__ == "__main__":
    main()
