"""benchmarks/load_memory.py runs end to end at a small size and reports its memory figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_small_run_reports_a_ratio(tmp_path):
    out, scratch = tmp_path / "load_memory.json", tmp_path / "scratch"
    scratch.mkdir()
    # ~20 MiB: fixed costs (the meta model, allocator) weigh more than at >= 1 GiB, so no target here
    argv = [sys.executable, "benchmarks/load_memory.py", "--size-mb", "20", "--target", "10"]
    argv += ["--tmp", str(scratch), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratio" in done.stdout and "7B" in done.stdout
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert run["format"] == "safetensors" and run["loader"] == "load_model"
    assert 18 * 2**20 <= run["disk_bytes"] <= 24 * 2**20 and run["shards"] > 2
    assert 0.95 * run["disk_bytes"] <= run["model_bytes"] <= run["disk_bytes"]  # all but the file headers
    # the loaded model is in RAM (it owns its memory), so the growth is at least its size
    assert run["peak_growth"] >= run["model_bytes"] and run["ratio"] == results["worst_ratio"] > 0
    assert run["peak_rss"] > run["base_rss"] > 0
    assert results["7b"]["disk_bytes"] > 14 * 2**30 and results["7b"]["peak_growth_by_ratio"] > 0
    assert not any(scratch.iterdir())  # the checkpoint is removed
