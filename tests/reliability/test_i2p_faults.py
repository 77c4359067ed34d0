"""Image2Prompt under faults: SIGKILLed training resumes to the clean run's weights, a code change sets
the resume checkpoint aside, a checkpoint holding a pickled object is refused without running it, and
pair paths may not leave their images folder. Stage tests run `python -m stages.pretrain_i2p` in a copy
of the project's code with a tiny recipe, as DVC would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dvc_repo import copy_project

from pipeline.data import generate_demo
from pipeline.encoders.clip import build_clip_model
from pipeline.i2p import I2PConfig, pretrain_image2prompt, read_pairs

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

# The stage, run with a hook: KILL=<n> SIGKILLs it inside the n-th checkpoint save, after the file
# is written under its temporary name and before its rename.
KILLING_STAGE = """
import os, runpy, signal, sys, torch
real, calls = torch.save, {"n": 0}
def save(*args, **kw):
    real(*args, **kw)
    calls["n"] += 1
    if calls["n"] == int(os.environ["KILL"]):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.argv = ["stages.pretrain_i2p", "models/i2p"]
runpy.run_module("stages.pretrain_i2p", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The project's code and params with Image2Prompt on, on 12 small demo pairs for 3 epochs."""
    tmp = tmp_path_factory.mktemp("i2p_project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["i2p"].update(enabled=True, pairs="demo")
    params["i2p"]["recipe"].update(epochs=EPOCHS, batch_size=4)
    params["i2p"]["demo"].update(n_prompts=4, images_per_prompt=3, size=32)
    params["runtime"].update(device="cpu", num_workers=0)
    return copy_project(tmp, params)


@pytest.fixture
def project(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "project")
    return tmp_path / "project"


def _pretrain(project: Path, kill: int | None = None) -> subprocess.CompletedProcess:
    command = ["-c", KILLING_STAGE] if kill else ["-m", "stages.pretrain_i2p", "models/i2p"]
    env = {**ENV, "KILL": str(kill or 0)}
    return subprocess.run(
        [sys.executable, *command], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )


def _epochs(stdout: str) -> list[int]:
    return [int(n) for n in re.findall(r"^epoch (\d+): train loss", stdout, re.M)]


def _weights_sha(project: Path) -> str:
    return json.loads((project / "models/i2p/clip/i2p.json").read_text())["sha256"]


@pytest.fixture(scope="module")
def clean_sha(template, tmp_path_factory) -> str:
    project = tmp_path_factory.mktemp("clean") / "project"
    shutil.copytree(template, project)
    run = _pretrain(project)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _epochs(run.stdout) == list(range(1, EPOCHS + 1))
    return _weights_sha(project)


@pytest.mark.slow  # the stage in subprocesses
@pytest.mark.parametrize("kill", [1, 2], ids=["first checkpoint unrenamed", "second checkpoint unrenamed"])
def test_killed_pretraining_resumes_to_the_clean_weights(project, clean_sha, kill):
    killed = _pretrain(project, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _epochs(killed.stdout) == list(range(1, kill))  # the killed epoch's echo comes after its save
    rerun = _pretrain(project)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _epochs(rerun.stdout) == list(range(kill, EPOCHS + 1)), "checkpointed epochs were trained again"
    assert _weights_sha(project) == clean_sha
    assert not (project / "models/i2p.partial").exists()


@pytest.mark.slow
def test_a_code_change_between_kill_and_rerun_sets_the_checkpoint_aside(project, clean_sha):
    assert _pretrain(project, kill=3).returncode == -signal.SIGKILL  # two epochs checkpointed
    i2p = project / "pipeline/i2p.py"
    i2p.write_text(i2p.read_text() + "\n# a fix\n")
    rerun = _pretrain(project)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _epochs(rerun.stdout) == list(range(1, EPOCHS + 1)), "resumed a checkpoint of other code"
    assert re.search(
        r"checkpoint\.pt aside as checkpoint\.pt\.discarded-\S+: made with another", rerun.stderr
    )
    assert len(list((project / "models/i2p.partial").glob("checkpoint.pt.discarded-*"))) == 1
    assert "checkpoints set aside" in rerun.stdout
    assert _weights_sha(project) == clean_sha  # a comment changes no number


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("pairs")
    manifest = generate_demo(root, seed=1, n_prompts=2, images_per_prompt=2, size=32)
    return [(root / p, t) for p, t in zip(manifest["path"], manifest["prompt"], strict=True)]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``, as a planted checkpoint could run anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_holding_a_pickled_object_is_refused_unexecuted(tmp_path, pairs):
    ckpt, marker = tmp_path / "ckpt.pt", tmp_path / "payload-ran"
    torch.save({"fingerprint": "x", "losses": [], "payload": Payload(marker)}, ckpt)
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["extract"]["clip"]
    seen = []
    with pytest.warns(UserWarning, match=r"ckpt\.pt aside .*unreadable as a weights-only checkpoint"):
        pretrain_image2prompt(
            build_clip_model(cfg, "demo"),
            pairs,
            I2PConfig(epochs=1, batch_size=4, lr=1e-3),
            tmp_path / "out",
            checkpoint=ckpt,
            on_epoch=lambda epoch, loss: seen.append(epoch),
        )
    assert not marker.exists(), "the checkpoint's pickled object was executed"
    assert seen == [1]
    assert len(list(tmp_path.glob("ckpt.pt.discarded-*"))) == 1


@pytest.mark.parametrize("where", ["../outside.png", "sub/../../outside.png", "absolute"])
def test_pair_paths_leaving_the_images_folder_are_refused_naming_file_and_row(tmp_path, pairs, where):
    images = pairs[0][0].parent
    outside = images.parent / "outside.png"
    shutil.copy(pairs[0][0], outside)  # the escaping path leads to a real image: only the check stops it
    (images / "sub").mkdir(exist_ok=True)
    path = str(outside) if where == "absolute" else where
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"path,prompt\n{pairs[0][0].name},a red circle\n{path},a blue square\n")
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(csv))}: path leaving the images folder .* row\(s\) \[3\]"
    ):
        read_pairs(csv, images)
