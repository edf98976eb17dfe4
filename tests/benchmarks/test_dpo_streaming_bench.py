"""benchmarks/dpo_streaming.py at a tiny size: it writes both measurements and their ratios."""

from __future__ import annotations

import json

import torch

from tests.benchmarks.helpers import load_benchmark


def test_streaming_benchmark_measures_reading_and_training(tmp_path):
    module = load_benchmark("dpo_streaming")
    torch.set_num_threads(1)
    results = module.main(
        [
            "--pairs",
            "6",
            "--size",
            "48",
            "--batch",
            "2",
            "--steps",
            "2",
            "--step-ms",
            "5",
            "--out",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "results.json").read_text()) == results
    reading = results["reading"]
    assert reading["in_memory_bytes"] == 6 * 2 * 3 * 48 * 48
    assert reading["batch_read_ms_streamed"] > 0 and reading["batch_read_ms_in_memory"] > 0
    assert results["training"]["s_per_step_streamed"] > 0
    assert reading["batch_wait_ms_prefetched"] >= 0 and reading["gpu_step_ms"] == 5
    assert set(results["ratios"]) == {
        "batch_read_streamed_over_in_memory",
        "batch_wait_prefetched_over_in_memory",
        "dpo_step_streamed_over_in_memory",
    }
