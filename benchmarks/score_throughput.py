"""Live scoring against the cached path: `agiqa score` on N demo images vs the extract stages + the head.

The cached path is what a user runs without ``score``: one ``python -m stages.extract`` process per
encoder the run reads (writing its HDF5 store), then a process that loads the run's heads and
predicts from those stores. The live path is one ``agiqa score`` process on the same images. Both
start fresh processes, build the same models and average every split's head. Exits 1 when live /
cached exceeds ``--target`` (1.15), and checks that both paths give the same scores.

Needs the demo's ``dvc repro`` (the run folder, the manifest, the images).

    python benchmarks/score_throughput.py                         # runs/demo/ma_agiqa, all images
    python benchmarks/score_throughput.py --run runs/demo/ipiqa --images 240
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

HEAD = """
import sys
import numpy as np, pandas as pd
from pipeline.features import Features
from pipeline.runs import TrainedRun
from pipeline.store import FeatureStore
run, folder, out = TrainedRun.load(sys.argv[1]), sys.argv[2], sys.argv[4]
manifest = pd.read_csv(sys.argv[3], dtype=str)
stores = {name: FeatureStore(f"{folder}/{name}.h5") for name in run.inputs}
prompts = sorted(set(manifest["prompt"])) if run.needs_prompts else None
extras = {}
if prompts:
    extras["prompt_index"] = manifest["prompt"].map({t: i for i, t in enumerate(prompts)}).to_numpy()
features = Features(stores, manifest["image_id"].tolist(), budget_bytes=2**32, extras=extras)
np.save(out, run.predictor(None, prompts, "cpu")(features, np.arange(len(manifest))))
"""


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def cached_path(run: Path, inputs: list[str], manifest: Path, tmp: Path) -> tuple[float, np.ndarray]:
    seconds = 0.0
    for name in inputs:
        (tmp / f"{name}.h5").unlink(missing_ok=True)
        seconds += timed(
            [
                sys.executable,
                "-m",
                "stages.extract",
                "demo",
                name,
                str(manifest),
                "data/raw/demo",
                str(tmp / f"{name}.h5"),
                "--i2p",
                f"models/i2p/{name}",
            ]
        )
    seconds += timed([sys.executable, "-c", HEAD, str(run), str(tmp), str(manifest), str(tmp / "cached.npy")])
    return seconds, np.load(tmp / "cached.npy")


def live_path(run: Path, listing: Path, tmp: Path) -> tuple[float, pd.DataFrame]:
    out = tmp / "live.csv"
    seconds = timed(
        [sys.executable, "-m", "stages.cli", "score", str(listing), "--model", str(run), "--out", str(out)]
    )
    return seconds, pd.read_csv(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo/ma_agiqa"))
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.15)
    args = parser.parse_args()
    from pipeline.runs import TrainedRun

    run = TrainedRun.load(ROOT / args.run)
    manifest = pd.read_csv(ROOT / "data/demo/manifest.csv", dtype=str).head(args.images)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        listing = pd.DataFrame({"path": [str(ROOT / "data/raw/demo" / p) for p in manifest["path"]]})
        listing["prompt"] = manifest["prompt"].to_numpy()
        listing.to_csv(tmp / "images.csv", index=False)
        ratios = []
        for i in range(args.repeats):
            cached_s, cached = cached_path(args.run, run.inputs, tmp / "manifest.csv", tmp)
            live_s, live = live_path(args.run, tmp / "images.csv", tmp)
            gap = float(np.abs(live[run.outputs].to_numpy() - cached).max())
            ratios.append(live_s / cached_s)
            print(
                f"repeat {i}: {len(manifest)} images, {run.name} ({'+'.join(run.inputs)}): cached path "
                f"{cached_s:.2f} s, live score {live_s:.2f} s, ratio {ratios[-1]:.3f}, "
                f"max |score gap| {gap:.1e}"
            )
    median = statistics.median(ratios)
    print(f"median ratio live / cached {median:.3f} (target <= {args.target})")
    if median > args.target:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
