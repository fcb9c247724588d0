"""``qvl-export bench --serve``: the load test runs both server settings on the same requests, bounded."""

from __future__ import annotations

import json

from click.testing import CliRunner

from qvl_export.cli import main
from qvl_export.serving import loadtest


def test_load_test_figures(serve_artifacts, tmp_path):
    results = loadtest.run_load_test(serve_artifacts, clients=2, requests=6, max_tokens=8, threads=1, context=512,
                                     warmup=1)
    assert [r.setting for r in results] == ["1 client", "batch 1", "continuous"]
    for r in results:
        assert r.requests == 6 and r.errors == 0 and r.tokens_per_s > 0 and r.latency_p95_s >= r.latency_p50_s > 0
    assert results[1].mean_batch == 1.0
    assert len({r.tokens for r in results}) == 1  # greedy: every setting generates the same tokens
    text = loadtest.table(results)
    assert "continuous / batch 1" in text and "continuous / 1 client" in text
    saved = json.loads(loadtest.report(results, tmp_path).read_text())
    assert [r["setting"] for r in saved["results"]] == ["1 client", "batch 1", "continuous"]


def test_bench_serve_refuses_a_folder_without_artifacts(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--serve", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.output and "Traceback" not in result.output
