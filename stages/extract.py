"""Stage `extract@<dataset>-<encoder>`: images -> features/<dataset>/<encoder>.h5 (stage 1, frozen).

``--kind`` builds a named entry (``extract_vlm@<dataset>-<name>``, section ``extract.<name>``) with the
encoder of that kind; the store records the kind as ``encoder``.

Resumable: rows are committed in chunks to ``<out>.partial``; a killed run loses at most the
chunk in flight and a rerun computes only the missing chunks. A partial file made with another
encoder config, manifest, or code (``pipeline.provenance``: the project sources this process runs,
library versions, device kind) is set aside and rebuilt, so a store never mixes two versions.
Images are decoded and preprocessed in DataLoader workers while the model runs.
``--i2p models/i2p/<encoder>`` is the encoder's Image2Prompt record: when it holds an adapted image
tower (clip only), the encoder loads it.

Sharded (``pipeline.shards``): with ``runtime.processes: N`` the stage runs itself as N torchrun ranks
(one per GPU) and rank 0 merges their shards; under a torchrun you launch (any number of nodes) each
rank computes its shard and rank 0 merges; ``--shard i/N`` computes one shard and stops (cluster
array tasks), and a later plain run (``dvc repro``) merges them. The merged store is the
single-process store, byte for byte.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.data import load_rgb, manifest_hash
from pipeline.encoders import create_encoder
from pipeline.encoders.common import adapted_tower
from pipeline.provenance import code_identity, set_aside
from pipeline.shards import SHARD_KEY, Shard, ShardError, merge, shard_folder
from pipeline.store import FeatureStore, StoreMismatch, StoreWriter
from stages import read_manifest, read_params, resolve_device, runtime

PARAMS = ("profile", "extract.dtype", "extract.batch_size", "extract.{encoder}")


class Images(Dataset):
    """Decoded, preprocessed images; bytes that differ from the manifest's sha256 stop the run."""

    def __init__(self, paths: list[Path], digests: list[str], preprocess):
        self.paths, self.digests, self.preprocess = paths, digests, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.paths[i], self.digests[i]))


def chunk_batches(pending: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Row-index batches that never cross a chunk boundary, so each chunk commits as it completes."""
    return [
        list(range(s, min(s + batch_size, stop)))
        for start, stop in pending
        for s in range(start, stop, batch_size)
    ]


def launch(processes: int) -> None:
    """Re-run this command as ``processes`` torchrun ranks on this node; rank 0 merges their shards."""
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", f"--nproc-per-node={processes}", "-m", "stages.extract", *sys.argv[1:]])


def compute(
    enc,
    out: Path,
    provenance: dict,
    rows: tuple[int, int],
    manifest,
    images: Path,
    rt: dict,
    batch_size: int,
    device: str,
) -> int:
    """Extract manifest rows ``[start, stop)`` into the store ``out`` (resuming it); returns rows computed."""
    first, last = rows
    part = manifest.iloc[first:last]
    prompts = sorted(set(manifest["prompt"]))
    extras = enc.extras(prompts)
    if extras:
        extras["text_prompts"] = np.array(prompts, dtype=object)
    # Batches are rows [kB, (k+1)B) whatever the chunk size, the resume point or the shard (whose rows start
    # at a batch boundary): a forward pass's last bits can depend on its batch (measured for CLIP on CPU).
    chunk_rows = -(-rt["chunk_rows"] // batch_size) * batch_size
    ids = part["image_id"].tolist()
    with StoreWriter(out, ids, provenance, enc.schema(), chunk_rows=chunk_rows, extras=extras) as writer:
        pending = writer.pending()
        todo = sum(stop - start for start, stop in pending)
        paths = [images / path for path in part["path"]]
        dataset = Images(paths, part["sha256"].tolist(), enc.preprocess)
        loader = DataLoader(
            dataset,
            batch_sampler=chunk_batches(pending, batch_size),
            num_workers=rt["num_workers"],
            pin_memory=device.startswith("cuda"),
        )
        chunks = iter(pending)
        start, stop = next(chunks, (0, 0))
        buffer: list[dict[str, np.ndarray]] = []
        texts = part["prompt"].to_numpy()
        with tqdm(total=todo, desc=f"extract {out.name}", unit="img") as bar:
            for batch, pixels in zip(loader.batch_sampler, loader, strict=True):
                # an encoder that reads each image's generation prompt (VQAScore) gets it with the pixels
                asked = {"prompts": texts[batch].tolist()} if getattr(enc, "reads_prompts", False) else {}
                buffer.append(enc.encode(pixels, **asked))
                bar.update(len(pixels))
                if sum(len(b["features"]) for b in buffer) == stop - start:
                    writer.write(start, stop, {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]})
                    tqdm.write(f"committed rows {first + start}:{first + stop}")
                    buffer = []
                    start, stop = next(chunks, (0, 0))
    return todo


def main(
    dataset: str,
    encoder: str,
    manifest_path: Path,
    images: Path,
    out: Path,
    i2p: Annotated[
        Path | None, typer.Option(help="the pretrain_i2p record folder models/i2p/<encoder>")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="the encoder kind of a named entry (vlm for a `vlms` name); default: its name"),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="compute only shard i/N (0-based) into <out>.shards/, e.g. an array task"),
    ] = None,
) -> None:
    p = read_params(PARAMS, encoder=encoder)
    rt = runtime()
    part = Shard.parse(shard) if shard else Shard.from_env()
    if part is None and rt["processes"] > 1:
        return launch(rt["processes"])
    manifest = read_manifest(manifest_path)
    ids, batch_size = manifest["image_id"].tolist(), p["extract.batch_size"]
    label = f"{dataset}/{encoder}"
    known = {
        "dataset": dataset,
        "manifest_hash": manifest_hash(manifest),
        "batch_size": batch_size,
        "config": {"cfg": p["extract.{encoder}"], "dtype": p["extract.dtype"]},  # how to rebuild it: score
    }
    if part is None and shard_folder(out).exists():  # array tasks wrote the shards: merge them
        return merge_shards(label, out, ids, batch_size, known, rt["chunk_rows"])
    device = resolve_device(rt["device"])
    if part is not None and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    cfg = p["extract.{encoder}"]
    tower = adapted_tower(i2p, encoder) if i2p is not None else None
    if tower is not None:
        cfg = {**cfg, "image_tower": tower}
    enc = create_encoder(kind or encoder, cfg, p["profile"], device=device, dtype=p["extract.dtype"])
    provenance = {**enc.provenance(), **known, "code": code_identity(device)}
    run = partial(compute, enc, manifest=manifest, images=images, rt=rt, batch_size=batch_size, device=device)
    if part is None:
        todo = run(out, provenance, (0, len(ids)))
        return typer.echo(
            f"{label}: computed {todo} of {len(ids)} rows ({len(ids) - todo} resumed from {out}.partial)"
        )
    rows = part.rows(len(ids), batch_size)
    todo = compute_shard(
        run, part.path(out), {**provenance, SHARD_KEY: part.record(len(ids), batch_size)}, rows
    )
    typer.echo(f"{label}: shard {part.index}/{part.count} computed {todo} of {rows[1] - rows[0]} rows")
    if shard is None:  # a torchrun rank: once every rank is done, rank 0 merges
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(days=7))  # ranks may finish hours apart
        dist.barrier()
        if part.index == 0:
            merge_shards(label, out, ids, batch_size, provenance, rt["chunk_rows"])
        dist.barrier()
        dist.destroy_process_group()


def compute_shard(run, path: Path, provenance: dict, rows: tuple[int, int]) -> int:
    """A shard's rows into ``path``, unless an earlier run finished it with this provenance; one made
    with other provenance is set aside. Returns the rows computed."""
    try:
        FeatureStore(path, expect=provenance).close()
        return 0
    except FileNotFoundError:
        pass
    except StoreMismatch as e:
        set_aside(path, str(e))
    return run(path, provenance, rows)


def merge_shards(
    label: str, out: Path, ids: list[str], batch_size: int, expect: dict, chunk_rows: int
) -> None:
    """``pipeline.shards.merge``, with a refused shard as a one-line error (exit 1), not a traceback."""
    try:
        count = merge(out, ids, batch_size, expect, chunk_rows)
    except ShardError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{label}: merged {count} shards into {out}")


if __name__ == "__main__":
    typer.run(main)
