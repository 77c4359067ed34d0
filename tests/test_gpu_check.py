"""benchmarks/gpu_check.py: its dry run (the GPU run's code on CPU, tiny configs) and its section guard."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["mplug_owl2_7b", "vlm_2b", "ma_agiqa_epoch", "torchrun_scaling"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout), json.loads(out.read_text())


def test_dry_run_prints_one_json_with_every_section(dry_run):
    printed, written = dry_run
    assert printed == written
    assert printed["mode"] == "dry-run" and printed["machine"]["device"] == "cpu"
    assert list(printed["sections"]) == SECTIONS
    assert printed["errors"] == []
    for name, section in printed["sections"].items():
        assert "error" not in section, (name, section)
    assert 0 < printed["total_wall_s"] < printed["budget_s"]


def test_dry_run_measures_every_section(dry_run):
    sections = dry_run[0]["sections"]
    mplug = sections["mplug_owl2_7b"]
    assert list(mplug["batches"]) == ["1", "2"]
    assert all(b["images_per_s"] > 0 for b in mplug["batches"].values())
    reference = mplug["reference"]
    assert reference["ratio"] > 0
    assert reference["min_cosine"] >= 0.9999  # float32: both patterns compute the same features
    vlm = sections["vlm_2b"]
    assert vlm["batches"] and all(b["images_per_s"] > 0 for b in vlm["batches"].values())
    assert vlm["image_tokens_per_row"] > 0
    head = sections["ma_agiqa_epoch"]
    assert head["s_per_epoch"] > 0 and head["rows"] == 16 and head["compute_only_samples_per_s"] > 0
    scaling = sections["torchrun_scaling"]  # two CPU ranks under torchrun, each on its shard
    assert scaling["ranks"] == 2 and set(scaling["images_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in scaling["images_per_s"].values()) and scaling["speedup"] > 0
    for name in SECTIONS[:3]:
        assert sections[name]["seconds"] > 0 and sections[name]["peak_gpu_mem_gib"] is None


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_a_failing_section_is_recorded_and_one_over_budget_skipped(gpu_check):
    def fails(s, out, mem):
        out["partial"] = 1
        raise RuntimeError("CUDA out of memory (stand-in)")

    failed = gpu_check.run_section("x", fails, gpu_check.DRY, left=100)
    assert failed["partial"] == 1 and failed["error"].startswith("RuntimeError: CUDA out of memory")
    skipped = gpu_check.run_section("mplug_owl2_7b", fails, gpu_check.DRY, left=1)
    assert skipped["skipped"] == "time budget"


def test_a_section_past_the_time_left_is_interrupted(gpu_check):
    def slow(s, out, mem):
        out["started"] = True
        time.sleep(30)

    start = time.perf_counter()
    result = gpu_check.run_section("x", slow, gpu_check.DRY, left=0.3)
    assert time.perf_counter() - start < 10
    assert result["started"] and result["error"].startswith("SectionTimeout")
