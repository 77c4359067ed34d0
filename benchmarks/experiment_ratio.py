"""How long a stage-2 ablation takes against a full `dvc repro` of the demo (target: at most 30%).

In a throwaway git clone of the working tree (tracked and untracked-not-ignored files, so the
committed DVC cache is not reused), it times ``dvc repro -f`` (every stage, extraction included),
commits the result, then times ``dvc exp run -S <setting>`` for each setting and lists the stages
that experiment ran. Wall times include DVC's own work (hashing, the experiment's commit). Exits 1
when an experiment exceeds ``--target`` of the full run.

    python benchmarks/experiment_ratio.py                                   # fusion.experts=4
    python benchmarks/experiment_ratio.py -S fusion.experts=5 -S ipiqa.qa_token=false
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def _clone(dest: Path) -> None:
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    _run(["git", "init", "-q"], dest)
    _commit(dest, "snapshot")
    _run([sys.executable, "-m", "dvc", "config", "--local", "core.check_update", "false"], dest)


def _commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(
        [
            "git",
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@localhost",
            "commit",
            "-qm",
            message,
            "--allow-empty",
        ],
        repo,
    )


def _timed(args: list[str], repo: Path) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = _run([sys.executable, "-m", "dvc", *args], repo)
    return time.perf_counter() - start, re.findall(r"Running stage '([^']+)'", out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-S", dest="settings", action="append", help="a `dvc exp run -S` setting (repeatable)"
    )
    parser.add_argument(
        "--target", type=float, default=0.30, help="largest allowed experiment / full-run ratio"
    )
    args = parser.parse_args()
    settings = args.settings or ["fusion.experts=4"]
    with tempfile.TemporaryDirectory(prefix="agiqa-ratio-") as tmp:
        repo = Path(tmp)
        _clone(repo)
        full, _ = _timed(["repro", "-f"], repo)
        _commit(repo, "full run")
        rows = []
        for setting in settings:
            seconds, ran = _timed(["exp", "run", "-S", setting], repo)
            rows.append(
                {
                    "setting": setting,
                    "seconds": round(seconds, 1),
                    "ratio": round(seconds / full, 3),
                    "ran": ran,
                }
            )
            _run(["git", "checkout", "-q", "."], repo)
            _run([sys.executable, "-m", "dvc", "checkout", "-q"], repo)
    print(json.dumps({"full_repro_s": round(full, 1), "experiments": rows}, indent=2))
    if any(r["ratio"] > args.target for r in rows):
        raise SystemExit(f"an experiment took more than {args.target:.0%} of the full repro")


if __name__ == "__main__":
    main()
