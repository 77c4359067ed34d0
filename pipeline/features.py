"""Mini-batches of cached features for stage-2 heads, within a memory budget.

When every store a head reads fits the budget, the rows are read once into RAM (one contiguous
h5py read per store) and shared by all splits and epochs. Otherwise each epoch walks the
shuffled rows in blocks that fit the budget: a block is read with the store's run-coalescing
reader, then shuffled and cut into batches. Randomness is therefore "shuffle within blocks of
a shuffled order", which is what large-scale loaders do and costs one sequential pass per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.store import FeatureStore

Batch = dict[str, torch.Tensor]


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
        self.stores = stores
        self.extras = {k: torch.as_tensor(v) for k, v in (extras or {}).items()}
        self.row_bytes = sum(
            int(np.prod(s.shape("features")[1:])) * s.dtype("features").itemsize for s in stores.values()
        )
        self.n_rows = len(image_ids)
        self.block_rows = max(1, budget_bytes // max(self.row_bytes, 1))
        self.resident: dict[str, torch.Tensor] | None = None
        if self.row_bytes * self.n_rows <= budget_bytes:
            self.resident = {name: torch.from_numpy(s.read_all("features")) for name, s in stores.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(s.shape("features")[1:]) for name, s in self.stores.items()}

    def _gather(self, rows: np.ndarray, arrays: dict[str, torch.Tensor], local: np.ndarray) -> Batch:
        batch = {name: arr[local] for name, arr in arrays.items()}
        batch.update({k: v[rows] for k, v in self.extras.items()})
        return batch

    def batches(
        self, rows: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[np.ndarray, Batch]]:
        """Yield (row indices, batch) over ``rows``; shuffled when ``rng`` is given."""
        rows = np.array(rows, dtype=np.int64)  # a copy: pandas 3 hands out read-only arrays
        order = rng.permutation(rows) if rng is not None else rows
        if self.resident is not None:
            for i in range(0, len(order), batch_size):
                chunk = order[i : i + batch_size]
                yield chunk, self._gather(chunk, self.resident, chunk)
            return
        for b in range(0, len(order), self.block_rows):
            block = np.sort(order[b : b + self.block_rows])
            arrays = {
                name: torch.from_numpy(np.ascontiguousarray(s.read_rows("features", block)))
                for name, s in self.stores.items()
            }
            local = rng.permutation(len(block)) if rng is not None else np.arange(len(block))
            for i in range(0, len(local), batch_size):
                sel = local[i : i + batch_size]
                yield block[sel], self._gather(block[sel], arrays, sel)

    @staticmethod
    def to(batch: Batch, device: str) -> Batch:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
