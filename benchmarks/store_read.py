"""One training epoch of cached features: the HDF5 store vs one ``.pt`` file per image per feature.

The ``.pt`` layout is the original MA-AGIQA one: one ``torch.save``d tensor per image per feature
(``--features`` files of ``--shape`` each); the store holds one ``(features, *shape)`` row per
image. Every reader delivers the same shuffled batches (checked), as a trainer consumes them:

- ``pt files``: ``torch.load`` every file of a batch's images and stack;
- ``h5 per batch``: the store's ``read_rows`` for each batch's (random) rows, i.e. item by item;
- ``h5 blocks``: ``iter_blocks`` over the shuffled order within a memory budget, then batches
  gathered in memory (what stage-2 training does).

    python benchmarks/store_read.py [--out store_read.json]   # AGIQA-3k: 2,982 images x 2 semantic vectors
    python benchmarks/store_read.py --images 600 --features 1 --shape 784 768   # one ViT block's tokens
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


def write_layouts(root: Path, ids: list[str], row_shape: tuple[int, ...], dtype: str, seed: int):
    """Write the same random rows as a store and as .pt files; return their paths and write times."""
    rng = np.random.default_rng(seed)
    store, pt_dir = root / "features.h5", root / "pt"
    pt_dir.mkdir()
    seconds = {"h5": 0.0, "pt": 0.0}
    with StoreWriter(store, ids, {"benchmark": "store_read"}, {"features": (row_shape, dtype)}) as writer:
        for start, stop in writer.pending():
            rows = rng.standard_normal((stop - start, *row_shape), dtype=np.float32).astype(dtype)
            t = time.perf_counter()
            writer.write(start, stop, {"features": rows})
            seconds["h5"] += time.perf_counter() - t
            t = time.perf_counter()
            for image_id, row in zip(ids[start:stop], rows, strict=True):
                for f, feature in enumerate(row):
                    torch.save(torch.from_numpy(feature.copy()), pt_dir / f"{image_id}_{f}.pt")
            seconds["pt"] += time.perf_counter() - t
    return store, pt_dir, seconds


def pt_batches(pt_dir: Path, ids: list[str], features: int, batches: list[np.ndarray]) -> Batches:
    def load(i: int) -> torch.Tensor:
        return torch.stack(
            [torch.load(pt_dir / f"{ids[i]}_{f}.pt", weights_only=True) for f in range(features)]
        )

    for batch in batches:
        yield torch.stack([load(i) for i in batch])


def h5_per_batch(store: FeatureStore, batches: list[np.ndarray]) -> Batches:
    for batch in batches:
        yield torch.from_numpy(store.read_rows("features", batch))


def h5_blocks(
    store: FeatureStore, order: np.ndarray, batch_size: int, block_rows: int, row_bytes: int
) -> Batches:
    for b, (rows, block) in enumerate(store.iter_blocks("features", order, block_rows * row_bytes)):
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
    parser.add_argument("--images", type=int, default=2982)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 4096], help="shape of one feature")
    parser.add_argument("--features", type=int, default=2, help="features (.pt files) per image")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget-mb", type=int, default=256, help="memory budget of one block")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per reader; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; on a busy 2-core box more threads only spin
    n, row_shape = args.images, (args.features, *args.shape)
    ids = [f"img{i:05d}" for i in range(n)]
    row_bytes = int(np.prod(row_shape)) * np.dtype(args.dtype).itemsize
    # whole batches per block, so the block reader yields exactly the batches of the others
    block_rows = max(1, args.budget_mb * 2**20 // row_bytes // args.batch_size) * args.batch_size
    order = np.random.default_rng(args.seed + 1).permutation(n)
    batches = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]

    with tempfile.TemporaryDirectory(prefix="store_read_") as tmp:
        store_path, pt_dir, write_seconds = write_layouts(Path(tmp), ids, row_shape, args.dtype, args.seed)
        with FeatureStore(store_path) as store:
            readers = {
                "pt files": lambda: pt_batches(pt_dir, ids, args.features, batches),
                "h5 per batch": lambda: h5_per_batch(store, batches),
                "h5 blocks": lambda: h5_blocks(store, order, args.batch_size, block_rows, row_bytes),
            }
            timed = {name: time_epoch(make, args.repeats) for name, make in readers.items()}
    for name, (_, prints) in timed.items():
        if prints != timed["pt files"][1]:
            raise RuntimeError(f"{name} delivered different batches from the .pt reader")

    base = timed["pt files"][0]
    results = {
        name: {"seconds": round(s, 4), "images_per_s": round(n / s, 1), "speedup_vs_pt": round(base / s, 2)}
        for name, (s, _) in timed.items()
    }
    print(
        f"{n} images x {args.features} feature(s) of {tuple(args.shape)} {args.dtype}, shuffled batches of "
        f"{args.batch_size}, blocks of {block_rows} rows ({block_rows * row_bytes / 2**20:.0f} MiB), "
        f"best of {args.repeats} epochs"
    )
    print(f"{'reader':<14}{'seconds':>9}{'images/s':>11}{'vs .pt':>8}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds']:>9.3f}{r['images_per_s']:>11.0f}{r['speedup_vs_pt']:>7.1f}x")
    print(f"write: h5 {write_seconds['h5']:.2f} s, pt {write_seconds['pt']:.2f} s")
    if args.out:
        report = {
            "images": n,
            "features": args.features,
            "shape": args.shape,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "block_bytes": block_rows * row_bytes,
            "repeats": args.repeats,
            "read": results,
            "write_seconds": {k: round(v, 3) for k, v in write_seconds.items()},
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
