"""Stage `extract@<dataset>-<encoder>`: images -> features/<dataset>/<encoder>.h5 (stage 1, frozen).

Resumable: rows are committed in chunks to ``<out>.partial``; a killed run loses at most the
chunk in flight and a rerun computes only the missing chunks. A partial file made with another
encoder config, manifest, or code (``pipeline.provenance``: the project sources this process runs,
library versions, device kind) is set aside and rebuilt, so a store never mixes two versions.
Images are decoded and preprocessed in DataLoader workers while the model runs.
``--i2p models/i2p/<encoder>`` is the encoder's Image2Prompt record: when it holds an adapted image
tower (clip only), the encoder loads it.
"""

from __future__ import annotations

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
from pipeline.provenance import code_identity
from pipeline.store import StoreWriter
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


def main(
    dataset: str,
    encoder: str,
    manifest_path: Path,
    images: Path,
    out: Path,
    i2p: Annotated[
        Path | None, typer.Option(help="the pretrain_i2p record folder models/i2p/<encoder>")
    ] = None,
) -> None:
    p = read_params(PARAMS, encoder=encoder)
    rt = runtime()
    device = resolve_device(rt["device"])
    manifest = read_manifest(manifest_path)
    cfg = p["extract.{encoder}"]
    tower = adapted_tower(i2p, encoder) if i2p is not None else None
    if tower is not None:
        cfg = {**cfg, "image_tower": tower}
    enc = create_encoder(encoder, cfg, p["profile"], device=device, dtype=p["extract.dtype"])
    provenance = {
        **enc.provenance(),
        "dataset": dataset,
        "manifest_hash": manifest_hash(manifest),
        "batch_size": p["extract.batch_size"],
        "config": {"cfg": p["extract.{encoder}"], "dtype": p["extract.dtype"]},  # how to rebuild it: score
        "code": code_identity(device),
    }
    ids = manifest["image_id"].tolist()
    prompts = sorted(set(manifest["prompt"]))
    extras = enc.extras(prompts)
    if extras:
        extras["text_prompts"] = np.array(prompts, dtype=object)
    schema = enc.schema()
    # Batches are rows [kB, (k+1)B) whatever the chunk size or the resume point: a forward pass's last
    # bits can depend on its batch (measured for CLIP on CPU), so batches are fixed by extract.batch_size.
    batch_size = p["extract.batch_size"]
    chunk_rows = -(-rt["chunk_rows"] // batch_size) * batch_size
    with StoreWriter(out, ids, provenance, schema, chunk_rows=chunk_rows, extras=extras) as writer:
        pending = writer.pending()
        todo = sum(stop - start for start, stop in pending)
        paths = [images / path for path in manifest["path"]]
        images = Images(paths, manifest["sha256"].tolist(), enc.preprocess)
        loader = DataLoader(
            images,
            batch_sampler=chunk_batches(pending, batch_size),
            num_workers=rt["num_workers"],
            pin_memory=device.startswith("cuda"),
        )
        chunks = iter(pending)
        start, stop = next(chunks, (0, 0))
        buffer: list[dict[str, np.ndarray]] = []
        texts = manifest["prompt"].to_numpy()
        with tqdm(total=todo, desc=f"extract {dataset}/{encoder}", unit="img") as bar:
            for rows, pixels in zip(loader.batch_sampler, loader, strict=True):
                # an encoder that reads each image's generation prompt (VQAScore) gets it with the pixels
                asked = {"prompts": texts[rows].tolist()} if getattr(enc, "reads_prompts", False) else {}
                buffer.append(enc.encode(pixels, **asked))
                bar.update(len(pixels))
                if sum(len(b["features"]) for b in buffer) == stop - start:
                    writer.write(start, stop, {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]})
                    tqdm.write(f"committed rows {start}:{stop}")
                    buffer = []
                    start, stop = next(chunks, (0, 0))
    typer.echo(
        f"{dataset}/{encoder}: computed {todo} of {len(ids)} rows "
        f"({len(ids) - todo} resumed from {out}.partial)"
    )


if __name__ == "__main__":
    typer.run(main)
