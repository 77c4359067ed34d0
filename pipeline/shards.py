"""Sharded stage-1 extraction: contiguous row blocks, one resumable store per shard, one merge.

Shard ``i`` of ``N`` computes a contiguous block of whole batches (rows ``[kB, (k+1)B)`` as a single
process batches them, so every feature keeps its bits) into ``<out>.shards/<i>-of-<N>.h5``, an ordinary
resumable store (``pipeline.store``) whose provenance adds a ``shard`` record: index, count, rows, and
the sha256 of each project source file the computing process ran. The merge checks every shard, then
copies them through a ``StoreWriter`` with the single-process provenance, so the final store is the
single-process store byte for byte: how many processes ran is a speed setting.

Shards come from ``torchrun`` ranks (``RANK`` / ``WORLD_SIZE``) or from cluster array tasks
(``--shard i/N``); no rank talks to another while computing, so a killed rank resumes its own shard
alone. A merge refuses a missing or unfinished shard, shards of mixed counts, and a stale one (other
params, manifest, package version, or a source file changed since), naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.provenance import ROOT, source_files
from pipeline.store import AUTO_KEYS, FeatureStore, StoreMismatch, StoreWriter

SHARD_KEY = "shard"
COPY_BYTES = 64 << 20  # rows copied per merge step
_NAME = re.compile(r"(\d+)-of-(\d+)\.h5(\.partial)?$")


class ShardError(ValueError):
    """A merge that cannot give the single-process store; the message names the shard file."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` (0-based ``i``), as an array task passes its index."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"--shard must be i/N with 0 <= i < N (e.g. 3/8), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def from_env(cls) -> Shard | None:
        """This torchrun rank's shard, or None outside torchrun (or with one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ["RANK"]), world) if world > 1 else None

    def rows(self, n_rows: int, batch_size: int) -> tuple[int, int]:
        """Rows ``[start, stop)``: the ``index``-th of ``count`` near-equal blocks of whole batches."""
        batches = -(-n_rows // batch_size)
        if self.count > batches:
            raise ValueError(
                f"{self.count} shards for {n_rows} rows in {batches} batches of {batch_size}: "
                f"use at most {batches} shards"
            )
        first, last = self.index * batches // self.count, (self.index + 1) * batches // self.count
        return first * batch_size, min(last * batch_size, n_rows)

    def path(self, out: Path) -> Path:
        return shard_folder(out) / f"{self.index:05d}-of-{self.count:05d}.h5"

    def record(self, n_rows: int, batch_size: int) -> dict[str, Any]:
        """The ``shard`` provenance entry: where it sits, and the code that computes it."""
        start, stop = self.rows(n_rows, batch_size)
        return {"index": self.index, "count": self.count, "rows": [start, stop], "sources": source_hashes()}


def shard_folder(out: Path) -> Path:
    return out.with_name(out.name + ".shards")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_hashes() -> dict[str, str]:
    """sha256 of each project source file loaded so far, by path: a merge re-hashes them to find
    shards computed by code that has changed since (``code_identity`` keeps only their joint digest)."""
    return {f.relative_to(ROOT).as_posix(): _sha256(f) for f in source_files()}


def _changed_sources(sources: dict[str, str]) -> list[str]:
    return [
        rel for rel, digest in sources.items() if not (ROOT / rel).is_file() or _sha256(ROOT / rel) != digest
    ]


def _found(folder: Path) -> dict[int, dict[int, Path]]:
    """Shard files in ``folder`` by count, then index (a finished file shadows its scratch file)."""
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if m := _NAME.fullmatch(path.name):
            index, count = int(m.group(1)), int(m.group(2))
            if not m.group(3) or index not in found.get(count, {}):
                found.setdefault(count, {})[index] = path
    return found


def _open_checked(path: Path, expect: dict[str, Any]) -> FeatureStore:
    """A finished shard whose provenance matches ``expect`` (compared as the store compares it) and
    whose recorded source files are unchanged; ``ShardError`` naming every reason otherwise."""
    try:
        store = FeatureStore(path, expect={**expect, "package_version": pipeline.__version__})
    except StoreMismatch as e:
        reasons = [f"{key} is {found}, now {wanted}" for key, (wanted, found) in e.diffs.items()]
        raise ShardError(f"{path}: stale shard ({'; '.join(reasons)}); delete it and recompute it") from None
    if changed := _changed_sources(store.provenance[SHARD_KEY]["sources"]):
        store.close()
        raise ShardError(
            f"{path}: stale shard (changed since: {', '.join(changed)}); delete it and recompute it"
        )
    return store


def merge(out: Path, ids: list[str], batch_size: int, expect: dict[str, Any], chunk_rows: int = 64) -> int:
    """Check the shards in ``<out>.shards`` and write ``out`` from them; returns how many were merged.

    ``expect`` holds provenance the caller knows without building the encoder (dataset, manifest hash,
    batch size, config; a rank that built it passes all of it). Every shard must match it, be made by
    the source files present now, agree with the other shards in everything else, and hold exactly its
    block of ``ids``. The shard folder is removed once ``out`` is complete.
    """
    folder = shard_folder(out)
    found = _found(folder)
    if not found:
        raise ShardError(f"{folder}: no shards to merge")
    if len(found) > 1:
        counts = ", ".join(f"{n} ({len(files)} files)" for n, files in sorted(found.items()))
        raise ShardError(f"{folder}: shards of different counts ({counts}); delete the set you do not want")
    count, files = next(iter(found.items()))
    absent = [
        f"{Shard(i, count).path(out).name} ({'unfinished' if i in files else 'missing'})"
        for i in range(count)
        if i not in files or files[i].suffix == ".partial"
    ]
    if absent:
        raise ShardError(
            f"{folder}: cannot merge, shard(s) {', '.join(absent)}; run `python -m stages.extract ... "
            f"--shard i/{count}` for each (an unfinished one resumes), then merge again"
        )
    blocks = [Shard(i, count).rows(len(ids), batch_size) for i in range(count)]
    stores: list[FeatureStore] = []
    try:
        for i in range(count):
            stores.append(_open_checked(files[i], expect))
        first = {k: v for k, v in stores[0].provenance.items() if k != SHARD_KEY}
        for i, (store, (start, stop)) in enumerate(zip(stores, blocks, strict=True)):
            prov = {k: v for k, v in store.provenance.items() if k != SHARD_KEY}
            if differ := sorted(k for k in {*prov, *first} if prov.get(k) != first.get(k)):
                raise ShardError(f"{files[i]}: differs from {files[0].name} in {', '.join(differ)}")
            if store.ids != ids[start:stop]:
                raise ShardError(f"{files[i]}: its image ids are not rows {start}:{stop} of the manifest")
        provenance = {k: v for k, v in first.items() if k not in AUTO_KEYS}
        schema = {name: (tuple(shape), dtype) for name, (shape, dtype) in first["schema"].items()}
        extras = {name: stores[0].read_all(name) for name in stores[0].extras}
        row_bytes = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in schema.values())
        step = max(1, COPY_BYTES // max(1, row_bytes))
        with StoreWriter(out, ids, provenance, schema, chunk_rows=chunk_rows, extras=extras) as writer:
            for store, (start, stop) in zip(stores, blocks, strict=True):
                for lo in range(start, stop, step):
                    hi = min(lo + step, stop)
                    writer.write(
                        lo,
                        hi,
                        {name: store.read_rows(name, np.arange(lo - start, hi - start)) for name in schema},
                    )
    finally:
        for store in stores:
            store.close()
    shutil.rmtree(folder)
    return count
