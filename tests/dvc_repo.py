"""Run the demo DAG through DVC in a throwaway git repo: the helpers the DVC-level tests share."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


# The stages' `python` and `dvc` must be this interpreter's, also when pytest runs unactivated.
STAGE_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
# The demo shrunk for DVC-level tests: fewer images, folds and epochs, set with -S as a user would.
SHRINK = [
    "data.demo.generate.n_prompts=16",
    "data.demo.generate.images_per_prompt=5",
    "split.grouped_kfold.k=3",
    "probe.recipe.epochs=4",
    "ma_agiqa.recipe.epochs=2",
    "ipiqa.recipe.epochs=2",
]


def run_in(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run a command (``dvc ...`` with this interpreter's DVC) in ``cwd``; fail the test with its output.

    ``env`` adds variables to STAGE_ENV (e.g. ``traced_env``'s).
    """
    if args[0] == "dvc":
        args = [sys.executable, "-m", "dvc", *args[1:]]
    proc = subprocess.run(
        args, cwd=cwd, env={**STAGE_ENV, **(env or {})}, capture_output=True, text=True, **kw
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def snapshot_repo(dest: Path) -> Path:
    """A git repo at ``dest`` holding the working tree's tracked and untracked-not-ignored files.

    Nothing DVC caches comes along, so its stages run for real.
    """
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    run_in(["git", "init", "-q"], dest)
    run_in([*GIT, "add", "-A"], dest)
    run_in([*GIT, "commit", "-qm", "snapshot"], dest)
    run_in(["dvc", "config", "--local", "core.check_update", "false"], dest)
    return dest


def copy_project(dest: Path, params: dict) -> Path:
    """The project's code (pipeline/, stages/) and ``params`` as params.yaml in ``dest``, to run stages
    by hand there (``python -m stages.<name>``, cwd ``dest``) as DVC would."""
    for package in ("pipeline", "stages"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def traced_env(repo: Path, log: Path) -> dict[str, str]:
    """Variables that make every Python process log the project files it imported (tests/import_trace)."""
    tracer = Path(__file__).parent / "import_trace"
    path = os.pathsep.join(p for p in (str(tracer), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "AGIQA_IMPORT_LOG": str(log), "AGIQA_IMPORT_ROOT": str(repo)}
