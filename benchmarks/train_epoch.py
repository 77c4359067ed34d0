"""One training epoch of the MA-AGIQA head on an AGIQA-3k-shaped synthetic store, within a memory budget.

Writes random float16 stores with ``StoreWriter``, chunk by chunk (never whole in RAM): ViT tokens
``(N, 784, 3072)`` (2,982 images, AGIQA-3k, is about 14 GB) and mPLUG-Owl2 prompt vectors
``(N, 2, 4096)``. Then, each in a fresh process so that its peak RSS is its own:

- ``read``: one shuffled pass of ``pipeline.features.Features`` batches with ``--budget-gb``
  (default: half the store, so it streams two blocks) and no model. Its RSS growth (peak minus
  the RSS before the pass) must stay within the budget + two batches (the one delivered and the
  one being gathered) + ``READ_SLACK``;
- ``model``: two training steps of the head on one batch held in RAM: what training costs
  whatever the store (weights, gradients, Adam moments, activations);
- ``epoch``: one epoch of ``pipeline.train.train_split`` (paper recipe: Adam, batch 8) over every
  image through the same ``Features``; validation runs on 3 images, as ``select: val`` needs. Its
  growth must stay within the budget + the model's growth + one more copy of the weights (the
  best epoch's state) + ``SLACK``.

The script exits 1 if either bound is exceeded. A block holds ``budget // row bytes`` rows and
batches do not cross blocks, so keep a block >= one batch. The stores were just written, so reads
come from the page cache: samples/s (which includes building the head, the slower first step and
validation) is the compute-bound figure, not a cold-disk one. RSS and its peak come from /proc
(Linux), the peak reset before each measured pass.

The head's time goes mostly to its four channel-attention blocks (TAB) over the 3,072 token
channels, which ``--embed-dim`` and ``--dim-mlp`` do not shrink: ``--channels 768`` (one ViT
block) is the quick run.

    python benchmarks/train_epoch.py                        # 16 images, AGIQA-3k rows, paper-size head
    python benchmarks/train_epoch.py --images 64 --channels 768 --embed-dim 96 --dim-mlp 96   # quick
    python benchmarks/train_epoch.py --images 2982 --budget-gb 4 --device cuda   # AGIQA-3k size
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.store import FeatureStore, StoreWriter
from pipeline.train import Recipe, RunConfig, train_split

MiB = 2**20
READ_SLACK = 16 * MiB  # h5py chunk cache and metadata, one read span (store.SPAN_BYTES), index arrays
SLACK = 128 * MiB  # the above, plus allocator rounding around the model's activations


def _status_bytes(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) * 1024


def start_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux clear_refs) and return it: the baseline."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS:")


def peak_rss() -> int:
    return _status_bytes("VmHWM:")


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    return {"vit": (784, args.channels), "semantic": (2, 4096)}


def write_store(path: Path, n: int, row_shape: tuple[int, ...], seed: int) -> None:
    """Random float16 rows, about 64 MiB per chunk."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 64 * MiB // (int(np.prod(row_shape)) * 2))
    ids = [f"img{i:05d}" for i in range(n)]
    schema = {"features": (row_shape, "float16")}
    with StoreWriter(path, ids, {"benchmark": "train_epoch"}, schema, chunk) as writer:
        for start, stop in writer.pending():
            rows = rng.standard_normal((stop - start, *row_shape), dtype=np.float32)
            writer.write(start, stop, {"features": rows.astype(np.float16)})


def build(args: argparse.Namespace) -> torch.nn.Module:
    """The paper's MA-AGIQA head (3 experts, linear gate, afm_width 784); the MANIQA widths from args."""
    return create_head(
        "ma_agiqa", n_outputs=1, input_shapes=shapes(args), embed_dim=args.embed_dim, dim_mlp=args.dim_mlp
    )


def setup(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


def open_features(args: argparse.Namespace, paths: dict[str, Path]) -> Features:
    setup(args)
    stores = {name: FeatureStore(path) for name, path in paths.items()}
    return Features(stores, stores["vit"].ids, budget_bytes=int(args.budget_gb * 2**30))


def read_phase(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    features = open_features(args, paths)
    base = start_rss()
    t = time.perf_counter()
    for _ in features.batches(np.arange(features.n_rows), args.batch_size, rng=np.random.default_rng(0)):
        pass
    seconds = time.perf_counter() - t
    return {
        "growth": peak_rss() - base,
        "seconds": seconds,
        "resident": features.resident is not None,
        "block_rows": features.block_rows,
        "batch_bytes": min(args.batch_size, features.n_rows) * features.row_bytes,
    }


def model_phase(args: argparse.Namespace) -> dict:
    setup(args)
    base = start_rss()
    head = build(args).to(args.device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-5, weight_decay=1e-5)
    batch = {
        k: torch.randn(args.batch_size, *s, dtype=torch.float16, device=args.device)
        for k, s in shapes(args).items()
    }
    target = torch.zeros(args.batch_size, 1, device=args.device)
    for _ in range(2):  # the second step holds the Adam moments and the activations at once
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(head(batch), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return {
        "growth": peak_rss() - base,
        "param_bytes": sum(p.numel() * p.element_size() for p in head.parameters()),
        "params": sum(p.numel() for p in head.parameters()),
        "step_seconds": seconds,
    }


def epoch_phase(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    features = open_features(args, paths)
    rows = np.arange(features.n_rows)
    parts = {"train": rows, "val": rows[:3], "test": rows[:0]}
    targets = np.random.default_rng(args.seed).uniform(1, 5, (len(rows), 1)).astype(np.float32)
    recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=1e-5, weight_decay=1e-5, schedule="cosine_step")
    run = RunConfig(device=args.device, memory_budget_gb=args.budget_gb)
    base = start_rss()
    t = time.perf_counter()
    train_split(lambda: build(args), features, targets, parts, recipe, run, split_seed=args.seed)
    seconds = time.perf_counter() - t
    gpu = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return {"growth": peak_rss() - base, "seconds": seconds, "gpu_peak": gpu}


def in_fresh_process(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16, help="2982 = AGIQA-3k (about 14 GB of tokens)")
    parser.add_argument("--budget-gb", type=float, help="Features memory budget (default: half the store)")
    parser.add_argument("--channels", type=int, default=3072, help="ViT token width (4 blocks x 768)")
    parser.add_argument("--embed-dim", type=int, default=768, help="MANIQA width (paper 768)")
    parser.add_argument("--dim-mlp", type=int, default=768, help="MANIQA Swin MLP width (paper 768)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dir", type=Path, help="write the stores here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")

    # A fixed glibc mmap threshold returns every freed array above 128 KiB to the OS, so that RSS counts
    # what is alive rather than what malloc keeps for reuse; the phases' processes inherit it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    store_bytes = sum(args.images * int(np.prod(s)) * 2 for s in shapes(args).values())
    if args.budget_gb is None:
        args.budget_gb = store_bytes / 2 / 2**30
    budget = int(args.budget_gb * 2**30)
    with tempfile.TemporaryDirectory(prefix="train_epoch_", dir=args.dir) as tmp:
        paths = {name: Path(tmp) / f"{name}.h5" for name in shapes(args)}
        t = time.perf_counter()
        for k, (name, shape) in enumerate(shapes(args).items()):
            write_store(paths[name], args.images, shape, args.seed + k)
        write_seconds = time.perf_counter() - t
        read = in_fresh_process(read_phase, args, paths)
        model = in_fresh_process(model_phase, args)
        epoch = in_fresh_process(epoch_phase, args, paths)

    read_allowed = budget + 2 * read["batch_bytes"] + READ_SLACK
    epoch_allowed = budget + model["growth"] + model["param_bytes"] + SLACK
    ok = read["growth"] <= read_allowed and epoch["growth"] <= epoch_allowed
    results = {
        "images": args.images,
        "device": args.device,
        "head": {
            "channels": args.channels,
            "embed_dim": args.embed_dim,
            "dim_mlp": args.dim_mlp,
            "params": model["params"],
        },
        "batch_size": args.batch_size,
        "store_bytes": store_bytes,
        "budget_bytes": budget,
        "streamed": not read["resident"],
        "block_rows": read["block_rows"],
        "write_seconds": round(write_seconds, 2),
        "read": {"growth_bytes": read["growth"], "allowed_bytes": read_allowed, "seconds": read["seconds"]},
        "model_growth_bytes": model["growth"],
        "epoch": {
            "growth_bytes": epoch["growth"],
            "allowed_bytes": epoch_allowed,
            "seconds": epoch["seconds"],
        },
        "within_budget": ok,
        "samples_per_s": round(args.images / epoch["seconds"], 3),
        "compute_only_samples_per_s": round(args.batch_size / model["step_seconds"], 3),
        "gpu_peak_bytes": epoch["gpu_peak"],
    }

    def verdict(growth: int, allowed: int) -> str:
        status = "OK" if growth <= allowed else "OVER"
        return f"RSS +{growth / MiB:,.0f} MiB, allowed {allowed / MiB:,.0f} MiB: {status}"

    print(
        f"{args.images} images: store {store_bytes / MiB:,.0f} MiB ({args.images} x 784 x {args.channels} + "
        f"{args.images} x 2 x 4096 fp16, written in {write_seconds:.1f} s), budget {budget / MiB:,.0f} MiB "
        f"-> {'streamed' if results['streamed'] else 'resident'}, {read['block_rows']} rows per block"
    )
    print(
        f"head: MA-AGIQA, embed_dim {args.embed_dim}, dim_mlp {args.dim_mlp}, "
        f"{model['params'] / 1e6:.1f} M parameters, batch {args.batch_size}, {args.device}"
    )
    print(
        f"read pass, no model: {args.images / read['seconds']:,.0f} samples/s, "
        f"{verdict(read['growth'], read_allowed)} (budget + 2 batches + {READ_SLACK // MiB} MiB)"
    )
    print(f"model alone (2 steps on one batch in RAM): RSS +{model['growth'] / MiB:,.0f} MiB")
    print(
        f"epoch: {verdict(epoch['growth'], epoch_allowed)} "
        f"(budget + model + weights copy + {SLACK // MiB} MiB)"
    )
    print(
        f"epoch: {epoch['seconds']:.1f} s, {results['samples_per_s']:.3f} samples/s "
        f"(compute alone: {results['compute_only_samples_per_s']:.3f} samples/s)"
    )
    if epoch["gpu_peak"] is not None:
        print(f"GPU peak allocated: {epoch['gpu_peak'] / MiB:,.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
