"""One training epoch of cached features: the HDF5 store vs one ``.pt`` file per image.

The ``.pt`` layout is the original MA-AGIQA one (one ``torch.save``d tensor per image per
feature). Every reader delivers the same shuffled batches (checked), as a trainer consumes them:

- ``pt files``: ``torch.load`` each image of a batch and stack;
- ``h5 per batch``: the store's ``read_rows`` for each batch's (random) rows, i.e. item by item;
- ``h5 blocks``: ``iter_blocks`` over the shuffled order within a memory budget, then batches
  gathered in memory (what stage-2 training does).

    python benchmarks/store_read.py [--images 600] [--shape 784 768] [--out store_read.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.store import FeatureStore, StoreWriter

Batches = Iterator[torch.Tensor]


def write_layouts(
    root: Path, n: int, shape: tuple[int, ...], dtype: str, seed: int
) -> tuple[Path, Path, dict]:
    """Write the same random features as an HDF5 store and as per-image .pt files."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i:05d}" for i in range(n)]
    store, pt_dir = root / "features.h5", root / "pt"
    pt_dir.mkdir()
    seconds = {"h5": 0.0, "pt": 0.0}
    with StoreWriter(store, ids, {"benchmark": "store_read"}, {"features": (shape, dtype)}) as writer:
        for start, stop in writer.pending():
            rows = rng.standard_normal((stop - start, *shape), dtype=np.float32).astype(dtype)
            t = time.perf_counter()
            writer.write(start, stop, {"features": rows})
            seconds["h5"] += time.perf_counter() - t
            t = time.perf_counter()
            for i, row in zip(range(start, stop), rows, strict=True):
                torch.save(torch.from_numpy(row.copy()), pt_dir / f"{ids[i]}.pt")
            seconds["pt"] += time.perf_counter() - t
    return store, pt_dir, seconds


def pt_batches(pt_dir: Path, ids: list[str], batches: list[np.ndarray]) -> Batches:
    for batch in batches:
        yield torch.stack([torch.load(pt_dir / f"{ids[i]}.pt", weights_only=True) for i in batch])


def h5_per_batch(store: FeatureStore, batches: list[np.ndarray]) -> Batches:
    for batch in batches:
        yield torch.from_numpy(store.read_rows("features", batch))


def h5_blocks(store: FeatureStore, order: np.ndarray, batch_size: int, budget_bytes: int) -> Batches:
    block_rows = budget_bytes // (
        int(np.prod(store.shape("features")[1:])) * store.dtype("features").itemsize
    )
    for b, (rows, block) in enumerate(store.iter_blocks("features", order, budget_bytes)):
        local = np.searchsorted(rows, order[b * block_rows : (b + 1) * block_rows])
        for i in range(0, len(local), batch_size):
            yield torch.from_numpy(block[local[i : i + batch_size]])


def time_epoch(make: Callable[[], Batches], repeats: int) -> tuple[float, list[bytes]]:
    """Best wall time of a full pass, and a fingerprint of each batch to check the readers agree."""
    best, prints = float("inf"), []
    for _ in range(repeats):
        t = time.perf_counter()
        prints = [batch.reshape(len(batch), -1)[:, :8].numpy().tobytes() for batch in make()]
        best = min(best, time.perf_counter() - t)
    return best, prints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shape", type=int, nargs="+", default=[784, 768])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget-mb", type=int, default=256, help="memory budget of one block")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per reader; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; on a busy 2-core box more threads only spin
    shape, n = tuple(args.shape), args.images
    row_bytes = int(np.prod(shape)) * np.dtype(args.dtype).itemsize
    # whole batches per block, so the block reader yields exactly the batches of the others
    budget = max(1, args.budget_mb * 2**20 // row_bytes // args.batch_size) * args.batch_size * row_bytes

    with tempfile.TemporaryDirectory(prefix="store_read_") as tmp:
        store_path, pt_dir, write_seconds = write_layouts(Path(tmp), n, shape, args.dtype, args.seed)
        order = np.random.default_rng(args.seed + 1).permutation(n)
        batches = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        with FeatureStore(store_path) as store:
            readers = {
                "pt files": lambda: pt_batches(pt_dir, store.ids, batches),
                "h5 per batch": lambda: h5_per_batch(store, batches),
                "h5 blocks": lambda: h5_blocks(store, order, args.batch_size, budget),
            }
            timed = {name: time_epoch(make, args.repeats) for name, make in readers.items()}
    reference = timed["pt files"][1]
    for name, (_, prints) in timed.items():
        if prints != reference:
            raise RuntimeError(f"{name} delivered different batches from the .pt reader")

    base = timed["pt files"][0]
    results = {
        name: {"seconds": round(s, 4), "images_per_s": round(n / s, 1), "speedup_vs_pt": round(base / s, 2)}
        for name, (s, _) in timed.items()
    }
    print(
        f"{n} images of {shape} {args.dtype}, shuffled batches of {args.batch_size}, "
        f"block budget {budget / 2**20:.0f} MiB, best of {args.repeats} epochs"
    )
    print(f"{'reader':<14}{'seconds':>9}{'images/s':>11}{'vs .pt':>8}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds']:>9.3f}{r['images_per_s']:>11.0f}{r['speedup_vs_pt']:>7.1f}x")
    print(f"write: h5 {write_seconds['h5']:.2f} s, pt {write_seconds['pt']:.2f} s")
    if args.out:
        report = {
            "images": n,
            "shape": list(shape),
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "budget_bytes": budget,
            "repeats": args.repeats,
            "read": results,
            "write_seconds": {k: round(v, 3) for k, v in write_seconds.items()},
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
