"""The real `extract` stage under faults: SIGKILL mid-run, a code change between the kill and the rerun,
runtime settings that must change no byte, and sharded runs (torchrun ranks, array tasks, their merge).
Each test works in a copy of the project's code with a shrunken demo, running `python -m stages.*` as DVC
would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc_repo import copy_project

from pipeline.store import FeatureStore

pytestmark = pytest.mark.slow  # whole stages in subprocesses, each loading torch and timm

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 12


def _stage(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _set_runtime(project: Path, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["runtime"].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The project's code and params (a 12-image demo, chunks of 2 rows), prepared and ready to extract."""
    tmp = tmp_path_factory.mktemp("prepared")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["demo"]["generate"].update(n_prompts=4, images_per_prompt=3)
    params["runtime"].update(chunk_rows=2, device="cpu")
    params["extract"]["batch_size"] = 2
    copy_project(tmp, params)
    _stage(tmp, "stages.generate_demo", "data/raw/demo")
    _stage(tmp, "stages.prepare", "demo", "data/demo")
    _stage(tmp, "stages.pretrain_i2p", "models/i2p")
    return tmp


@pytest.fixture
def project(prepared, tmp_path) -> Path:
    shutil.copytree(prepared, tmp_path / "project")
    return tmp_path / "project"


def _extract(project: Path, out: str, encoder: str = "vit") -> list[str]:
    return [
        "stages.extract",
        "demo",
        encoder,
        "data/demo/manifest.csv",
        "data/raw/demo",
        out,
        "--i2p",
        f"models/i2p/{encoder}",
    ]


def _kill_after_commits(project: Path, out: str, rows: int, *options: str) -> int:
    """Run extract, SIGKILL it once ``rows`` rows are committed; return how many were."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", *_extract(project, out), *options],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    committed = 0
    for line in proc.stdout:
        if m := re.match(r"committed rows (\d+):(\d+)", line):
            committed += int(m.group(2)) - int(m.group(1))
            if committed >= rows:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return committed


def _computed(output: str) -> int:
    m = re.search(r"computed (\d+) of (\d+) rows", output)
    assert m and int(m.group(2)) == N_IMAGES, output
    return int(m.group(1))


def test_killed_extract_resumes_to_the_bytes_of_a_clean_run(project):
    committed = _kill_after_commits(project, "features/demo/vit.h5", rows=4)
    assert not (project / "features/demo/vit.h5").exists()
    rerun = _stage(project, *_extract(project, "features/demo/vit.h5"))
    assert _computed(rerun.stdout) <= N_IMAGES - committed
    clean = _stage(project, *_extract(project, "features/demo/clean.h5"))
    assert _computed(clean.stdout) == N_IMAGES
    assert (project / "features/demo/vit.h5").read_bytes() == (
        project / "features/demo/clean.h5"
    ).read_bytes()


@pytest.mark.parametrize(
    "source", ["pipeline/encoders/vit/__init__.py", "stages/extract.py"], ids=["encoder", "stage (__main__)"]
)
def test_a_code_change_between_kill_and_rerun_sets_the_partial_aside(project, source):
    """Fix the encoder, or the stage that ``python -m`` runs as ``__main__``, after a kill: the rerun
    must not mix rows of two code versions."""
    _kill_after_commits(project, "features/demo/vit.h5", rows=4)
    edited = project / source
    edited.write_text(edited.read_text() + "\n# a fix\n")
    rerun = _stage(project, *_extract(project, "features/demo/vit.h5"))
    assert _computed(rerun.stdout) == N_IMAGES
    assert "aside" in rerun.stderr and "source_sha256" in rerun.stderr
    assert len(list((project / "features/demo").glob("vit.h5.partial.discarded-*"))) == 1


def test_runtime_settings_change_no_byte_of_the_store(project):
    _stage(project, *_extract(project, "features/demo/a.h5"))
    _set_runtime(project, chunk_rows=3, num_workers=1, device="auto")
    _stage(project, *_extract(project, "features/demo/b.h5"))
    assert (project / "features/demo/a.h5").read_bytes() == (project / "features/demo/b.h5").read_bytes()


def test_two_extracts_on_one_store_never_lose_rows(project):
    """A second extract started while the first runs stops with the first one's PID, nothing deleted."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", *_extract(project, "features/demo/vit.h5")],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in first.stdout:
        if line.startswith("committed rows"):
            first.send_signal(signal.SIGSTOP)  # holds its lock, as a slow GPU run would
            break
    second = _stage(project, *_extract(project, "features/demo/vit.h5"), check=False)
    first.send_signal(signal.SIGCONT)
    first.stdout.read()
    assert first.wait() == 0
    assert second.returncode != 0 and f"in use by PID {first.pid}" in second.stderr
    with FeatureStore(project / "features/demo/vit.h5") as store:  # refuses an unfinished store
        assert len(store) == N_IMAGES
    assert not list((project / "features/demo").glob("vit.h5.partial*"))


def _same_store(a: Path, b: Path) -> None:
    """Equal array by array and in provenance, and then byte for byte (what DVC's md5 sees)."""
    with FeatureStore(a) as x, FeatureStore(b) as y:
        assert x.provenance == y.provenance
        assert x.ids == y.ids and x.names == y.names and x.extras == y.extras
        for name in x.names + x.extras:
            assert np.array_equal(x.read_all(name), y.read_all(name)), name
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("launch", ["torchrun", "runtime.processes"])
def test_two_torchrun_ranks_give_the_single_process_store(project, launch):
    """vit under a torchrun you launch; clip (per-prompt extras) under the one the stage launches."""
    encoder = "vit" if launch == "torchrun" else "clip"
    _stage(project, *_extract(project, "features/demo/single.h5", encoder))
    out = _extract(project, f"features/demo/{encoder}.h5", encoder)
    if launch == "torchrun":
        ranks = _stage(project, "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", *out)
    else:
        _set_runtime(project, processes=2)
        ranks = _stage(project, *out)
    assert (
        "shard 0/2 computed 6 of 6 rows" in ranks.stdout and "shard 1/2 computed 6 of 6 rows" in ranks.stdout
    )
    assert "merged 2 shards" in ranks.stdout
    _same_store(project / f"features/demo/{encoder}.h5", project / "features/demo/single.h5")
    assert not (project / f"features/demo/{encoder}.h5.shards").exists()


def test_a_killed_shard_resumes_alone_and_the_merge_gives_the_single_process_store(project):
    out = "features/demo/vit.h5"
    shard = _stage(project, *_extract(project, out), "--shard", "0/3")  # 12 rows, batches of 2: 4 rows each
    assert "shard 0/3 computed 4 of 4 rows" in shard.stdout
    assert _kill_after_commits(project, out, 2, "--shard", "1/3") == 2
    early = _stage(project, *_extract(project, out), check=False)
    assert early.returncode != 0
    assert "00001-of-00003.h5 (unfinished)" in early.stderr and "00002-of-00003.h5 (missing)" in early.stderr
    assert (
        "shard 1/3 computed 2 of 4 rows" in _stage(project, *_extract(project, out), "--shard", "1/3").stdout
    )
    assert (
        "shard 0/3 computed 0 of 4 rows" in _stage(project, *_extract(project, out), "--shard", "0/3").stdout
    )
    _stage(project, *_extract(project, out), "--shard", "2/3")
    assert "merged 3 shards" in _stage(project, *_extract(project, out)).stdout
    _stage(project, *_extract(project, "features/demo/single.h5"))
    _same_store(project / out, project / "features/demo/single.h5")


@pytest.mark.parametrize("change", ["code", "params"])
def test_a_merge_refuses_a_stale_shard(project, change):
    out = "features/demo/vit.h5"
    for spec in ("0/2", "1/2"):
        _stage(project, *_extract(project, out), "--shard", spec)
    if change == "code":
        edited = project / "pipeline/encoders/vit/__init__.py"
        edited.write_text(edited.read_text() + "\n# a fix\n")
        reason = "changed since: pipeline/encoders/vit/__init__.py"
    else:
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["extract"]["vit"]["blocks"] = [6, 7]
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        reason = "config is"
    merge = _stage(project, *_extract(project, out), check=False)
    assert merge.returncode != 0
    assert "00000-of-00002.h5: stale shard" in merge.stderr and reason in merge.stderr
    assert not (project / out).exists() and (project / "features/demo/vit.h5.shards").is_dir()
