"""Sharded extraction on a CPU: N torchrun ranks x 1 thread against 1 process x 1 thread (target 1.7x at N=2).

Both run the real stage, ``python -m stages.extract <dataset> <encoder> ...``, on the demo's images
(so the demo's ``dvc repro`` must have run): once as a plain process, once under ``torchrun
--standalone --nproc-per-node N`` (each rank computes its shard, rank 0 merges), every process with
``OMP_NUM_THREADS=1``; the two stores must be equal byte for byte. Start-up (imports, model build) is
a fixed cost that the demo's 480 tiny-model images do not amortise, so each is run on the manifest
repeated ``--small`` and ``--large`` times (ids made unique) and images/s is the marginal rate,
(large - small images) / (large - small seconds): the rate a real dataset sees. The end-to-end wall
times are reported too. Exits 1 when the marginal speed-up is below ``--target``.

    python benchmarks/extract_scaling.py                      # the demo's semantic encoder, 2 ranks
    python benchmarks/extract_scaling.py --encoder vit --ranks 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def repeated(manifest: Path, times: int, out: Path) -> Path:
    """The manifest's rows ``times`` over, ids suffixed ``~k``: more images of the same kind."""
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    copies = [rows.assign(image_id=rows["image_id"] + f"~{k}") for k in range(times)]
    pd.concat(copies).to_csv(out, index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--encoder", default="semantic")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--small", type=int, default=1, help="copies of the manifest in the small run")
    parser.add_argument("--large", type=int, default=4, help="copies of the manifest in the large run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the median is used")
    parser.add_argument("--target", type=float, default=1.7)
    args = parser.parse_args()
    manifest = ROOT / "data" / args.dataset / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: run the demo's `dvc repro` first")
    walls: dict[tuple[str, int], float] = {}
    sizes: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for copies in (args.small, args.large):
            rows = repeated(manifest, copies, Path(tmp) / f"manifest{copies}.csv")
            sizes[copies] = sum(1 for _ in rows.open()) - 1
            inputs = [args.dataset, args.encoder, str(rows), str(ROOT / "data/raw" / args.dataset)]
            ranks = ["torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}", "-m"]
            single, sharded = [], []
            for k in range(args.repeats):
                one, many = Path(tmp) / f"one{copies}-{k}.h5", Path(tmp) / f"many{copies}-{k}.h5"
                i2p = ["--i2p", f"models/i2p/{args.encoder}"]
                single.append(timed(["stages.extract", *inputs, str(one), *i2p]))
                sharded.append(timed([*ranks, "stages.extract", *inputs, str(many), *i2p]))
                if one.read_bytes() != many.read_bytes():
                    raise SystemExit(
                        f"{one} and {many} differ: the sharded store is not the single-process one"
                    )
            walls["single", copies] = statistics.median(single)
            walls["sharded", copies] = statistics.median(sharded)
    extra = sizes[args.large] - sizes[args.small]
    rate = {
        kind: extra / (walls[kind, args.large] - walls[kind, args.small]) for kind in ("single", "sharded")
    }
    result = {
        "encoder": f"{args.dataset}/{args.encoder}",
        "ranks": args.ranks,
        "images": {"small": sizes[args.small], "large": sizes[args.large]},
        "wall_s": {f"{kind}_{size}": round(t, 2) for (kind, size), t in walls.items()},
        "images_per_s": {kind: round(r, 2) for kind, r in rate.items()},
        "speedup": round(rate["sharded"] / rate["single"], 3),
        "end_to_end_speedup_large": round(walls["single", args.large] / walls["sharded", args.large], 3),
        "target": args.target,
        "stores_equal": True,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if result["speedup"] < args.target:
        raise SystemExit(f"speed-up {result['speedup']} below the {args.target} target")


if __name__ == "__main__":
    main()
