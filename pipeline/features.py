"""Mini-batches of cached features for stage-2 heads, within a memory budget.

When every store a head reads fits the budget, the rows are read once into RAM (one contiguous
h5py read per store) and shared by all splits and epochs. Otherwise each epoch reads, block by
block, the rows of the next batches that fit the budget (with the store's run-coalescing reader)
and frees them before the next block. Either way the epoch's batches are the same: a permutation
of the rows cut in order, with the same random draws, so the memory budget (a ``runtime`` setting)
changes speed and memory, never a number.

Augmentation by cached views: a store may hold, beside its ``features`` row (the identity view),
a row dataset ``views`` of shape ``(V - 1, *feature shape)``: the same encoder on transformed
images (``extract.vit.views``). Training batches then replace each row, with probability
``view_prob``, by one of its extra views drawn uniformly (one draw per row, shared by every store
that has views); evaluation batches always carry the identity view. Views count in the memory
budget: a resident store holds all of them, a streamed block reads them with its rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.store import FeatureStore

Batch = dict[str, torch.Tensor]


def _row_bytes(store: FeatureStore, name: str) -> int:
    return int(np.prod(store.shape(name)[1:])) * store.dtype(name).itemsize


class Features:
    """Row-aligned features of several stores (+ per-row extras such as ``prompt_index``)."""

    def __init__(
        self,
        stores: dict[str, FeatureStore],
        image_ids: list[str],
        budget_bytes: int,
        extras: dict[str, np.ndarray] | None = None,
    ):
        for name, store in stores.items():
            if list(store.ids) != list(image_ids):
                raise ValueError(
                    f"feature store {store.path} ({name}) rows do not match the manifest's image ids; "
                    "re-run its extract stage"
                )
            if "views" in store.names and store.shape("views")[2:] != store.shape("features")[1:]:
                raise ValueError(
                    f"feature store {store.path} ({name}): views rows {store.shape('views')[1:]} do not "
                    f"stack features rows {store.shape('features')[1:]}"
                )
        self.stores = stores
        self.extras = {k: torch.tensor(v) for k, v in (extras or {}).items()}
        self.views = [name for name, s in stores.items() if "views" in s.names]
        self.row_bytes = sum(_row_bytes(s, "features") for s in stores.values())
        self.row_bytes += sum(_row_bytes(stores[name], "views") for name in self.views)
        self.n_rows = len(image_ids)
        self.block_rows = max(1, budget_bytes // max(self.row_bytes, 1))
        self.resident: dict[str, torch.Tensor] | None = None
        self.resident_views: dict[str, torch.Tensor] = {}
        if self.row_bytes * self.n_rows <= budget_bytes:
            self.resident = {name: torch.from_numpy(s.read_all("features")) for name, s in stores.items()}
            self.resident_views = {
                name: torch.from_numpy(stores[name].read_all("views")) for name in self.views
            }

    @classmethod
    def in_memory(
        cls, arrays: dict[str, np.ndarray], extras: dict[str, np.ndarray] | None = None
    ) -> Features:
        """Features computed live (``agiqa score``), held in RAM like resident stores, without views."""
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"feature arrays of different lengths: { {k: len(a) for k, a in arrays.items()} }"
            )
        self = cls.__new__(cls)
        self.stores, self.views, self.resident_views = {}, [], {}
        self.extras = {k: torch.tensor(v) for k, v in (extras or {}).items()}
        self.resident = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        self.n_rows = sizes.pop()
        self.row_bytes = sum(a[0].nbytes for a in arrays.values()) if self.n_rows else 0
        self.block_rows = self.n_rows
        return self

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(s.shape("features")[1:]) for name, s in self.stores.items()}

    def _gather(self, rows: np.ndarray, arrays: dict[str, torch.Tensor], local: np.ndarray) -> Batch:
        batch = {name: arr[torch.from_numpy(local)] for name, arr in arrays.items()}
        batch.update({k: v[torch.from_numpy(rows)] for k, v in self.extras.items()})
        return batch

    @staticmethod
    def _read(store: FeatureStore, name: str, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(store.read_rows(name, rows)))

    @staticmethod
    def _swap_views(
        batch: Batch, views: dict[str, torch.Tensor], local: np.ndarray, rng: np.random.Generator, p: float
    ) -> None:
        """Replace each row of ``batch`` with probability ``p`` by one of its extra views, in place."""
        swap, pick = rng.random(len(local)) < p, rng.random(len(local))
        at = torch.from_numpy(np.flatnonzero(swap))
        for name, extra in views.items():
            k = torch.from_numpy((pick[swap] * extra.shape[1]).astype(np.int64))
            batch[name][at] = extra[torch.from_numpy(local[swap]), k]

    def _blocks(self, chunks: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """Consecutive batches grouped so that each group's rows fit the budget (or one batch alone)."""
        block: list[np.ndarray] = []
        size = 0
        for chunk in chunks:
            if block and size + len(chunk) > self.block_rows:
                yield block
                block, size = [], 0
            block.append(chunk)
            size += len(chunk)
        if block:
            yield block

    def batches(
        self,
        rows: np.ndarray,
        batch_size: int,
        rng: np.random.Generator | None = None,
        view_prob: float = 0.0,
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        """Yield (row indices, batch) over ``rows``, in order, or shuffled when ``rng`` is given.

        With ``rng`` and ``view_prob > 0`` (training), rows of stores with cached views are
        augmented (see the module docstring); a store without views never consumes the ``rng``.
        """
        if not 0.0 <= view_prob <= 1.0:
            raise ValueError(f"view_prob must be in [0, 1], got {view_prob}")
        augment = rng is not None and view_prob > 0 and bool(self.views)
        rows = np.array(rows, dtype=np.int64)  # a copy: pandas 3 hands out read-only arrays
        order = rng.permutation(rows) if rng is not None else rows
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if self.resident is not None:
            for chunk in chunks:
                batch = self._gather(chunk, self.resident, chunk)
                if augment:
                    self._swap_views(batch, self.resident_views, chunk, rng, view_prob)
                yield chunk, batch
            return
        for block in self._blocks(chunks):
            held = np.unique(np.concatenate(block))
            arrays = {name: self._read(s, "features", held) for name, s in self.stores.items()}
            views = {name: self._read(self.stores[name], "views", held) for name in self.views if augment}
            for chunk in block:
                local = np.searchsorted(held, chunk)
                batch = self._gather(chunk, arrays, local)
                if augment:
                    self._swap_views(batch, views, local, rng, view_prob)
                yield chunk, batch
            del arrays, views  # free this block before reading the next: one block in RAM at a time

    @staticmethod
    def to(batch: Batch, device: str) -> Batch:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
