"""HDF5 feature store: one row per image, in manifest order, with provenance attributes.

Layout of ``features/<ds>/<encoder>.h5``:

- ``image_id``: the manifest's ids (UTF-8 strings), which fixes the row order;
- one dataset per feature (the writer's ``schema``), shape ``(n_rows, *row_shape)``, chunked along
  rows (about 1 MiB per chunk, at least one row);
- optional non-row datasets (``write_extra``), e.g. text states per unique prompt;
- ``_done``: one flag per row, all true in a finished store;
- root attributes: the caller's provenance plus ``package_version``, ``format_version`` and
  ``schema``, each stored as a JSON string so that comparison is exact and typed.

Writing is resumable. Rows go to a scratch file (``<out>.partial``, outside DVC's reach, since DVC
deletes a stage's outputs before running it) whose datasets, extras included, are all written or
allocated in full when it is created (into ``<out>.partial.creating``, renamed when complete).
Committing a chunk then only fills bytes in place and sets its flags in a ``_done`` mask; no HDF5
metadata changes, so a killed writer leaves a readable file that loses at most the chunk in
flight, and the final bytes do not depend on the order or the number of runs that wrote the rows.
When every row is done the file is renamed onto ``<out>`` and the folder is fsynced.

One writer at a time: the writer holds an exclusive ``fcntl`` lock on ``<out>.writer.lock`` for its
whole life (the kernel drops it when the process dies, so a killed writer never leaves a stale
lock); a second writer stops with the first one's PID and host. A scratch file made for anything
else (other provenance, ids, schema or extras; or unreadable) is renamed aside,
``<out>.partial.discarded-<time>``, never deleted: it may hold hours of GPU work.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

import pipeline
from pipeline.provenance import set_aside

FORMAT_VERSION = 1
IDS, DONE = "image_id", "_done"
AUTO_KEYS = ("package_version", "format_version", "schema")
CHUNK_BYTES = 1 << 20  # target size of one HDF5 chunk (h5py's default chunk cache is 1 MiB)
GAP_BYTES = 256 << 10  # reading through a gap this small costs less than one more h5py call (~80 us)
SPAN_BYTES = 8 << 20  # largest temporary buffer used to read through gaps

LOCK_SUFFIX = ".writer.lock"

Schema = dict[str, tuple[tuple[int, ...], str]]


class StoreBusy(RuntimeError):
    """Another live process is writing the same store."""


class WriterLock:
    """An exclusive ``flock`` on ``<store>.writer.lock``, naming its holder inside the file.

    The lock file is never deleted: unlinking it while another process waits on it would let two
    writers hold locks on different inodes of the same name.
    """

    def __init__(self, store: Path, wait_s: float = 0.0):
        self.path = store.with_name(store.name + LOCK_SUFFIX)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.path.read_text().strip() or "another process"
                    os.close(self._fd)
                    raise StoreBusy(
                        f"{store} is in use by {holder} (lock {self.path}); wait for that run to end "
                        "or stop it, then rerun: finished chunks are kept"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: a rename is only on disk once its folder is)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreMismatch(ValueError):
    """A store's provenance differs from what was asked; ``diffs`` maps key -> (expected, found)."""

    def __init__(self, path: Path, diffs: dict[str, tuple[str, str]]):
        self.path, self.diffs = path, diffs
        lines = [f"  {key}: expected {exp}, found {found}" for key, (exp, found) in diffs.items()]
        super().__init__(f"feature store {path} does not match what was asked for:\n" + "\n".join(lines))


def _encode(attrs: dict) -> dict[str, str]:
    """Canonical JSON per top-level key: tuples become lists, dict keys are sorted, 1 != 1.0 != true."""
    out = {}
    for key, value in attrs.items():
        try:
            out[key] = json.dumps(value, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"provenance key {key!r} is not JSON-serialisable: {e}") from None
    return out


def _diff(expected: dict[str, str], found: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (v, found.get(k, "<missing>")) for k, v in expected.items() if found.get(k) != v}


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal ``(start, stop)`` runs of consecutive values in sorted unique ``rows``."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, lasts = rows[np.r_[0, breaks]], rows[np.r_[breaks - 1, len(rows) - 1]]
    return [(int(s), int(e) + 1) for s, e in zip(starts, lasts, strict=True)]


def _spans(rows: np.ndarray, row_bytes: int) -> list[tuple[int, int]]:
    """Slices that cover sorted unique ``rows`` with few h5py calls.

    Neighbouring runs are merged when the gap between them is cheaper to read than a separate call
    and the merged slice fits the temporary buffer; runs of wanted rows are never split.
    """
    spans: list[tuple[int, int]] = []
    for lo, hi in _runs(rows):
        if (
            spans
            and (lo - spans[-1][1]) * row_bytes <= GAP_BYTES
            and (hi - spans[-1][0]) * row_bytes <= SPAN_BYTES
        ):
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


def _utf8(values: np.ndarray) -> np.ndarray:
    """Fixed-width UTF-8 strings: unlike variable-length ones they use no heap (whose state HDF5
    keeps in memory), so their bytes do not depend on the session that wrote them.
    """
    encoded = [str(v).encode() for v in values.ravel()]
    width = max([1, *map(len, encoded)])
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", width)).reshape(values.shape)


def _extra_array(array) -> np.ndarray:
    """A non-row dataset as stored: text as fixed-width UTF-8, anything else as it is."""
    array = np.asarray(array)
    return _utf8(array) if array.dtype.kind in "OUS" else array


def _same(dataset: h5py.Dataset, array: np.ndarray) -> bool:
    same_layout = dataset.shape == array.shape and dataset.dtype == array.dtype
    return same_layout and np.array_equal(dataset[()], array)


def _row_dataset_options(n_rows: int, row_shape: tuple[int, ...], dtype: np.dtype, compression: str | None):
    """Chunks of whole rows (about CHUNK_BYTES); without compression, allocate all of it up front."""
    row_bytes = max(1, int(np.prod(row_shape)) * dtype.itemsize)
    chunk_rows = min(n_rows, max(1, CHUNK_BYTES // row_bytes))
    options = {"chunks": (chunk_rows, *row_shape), "compression": compression, "track_times": False}
    if compression is None:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        options.update(dcpl=dcpl, fill_time="never")
    return options


class StoreWriter:
    """Writes a feature store chunk by chunk, resumably; use as a context manager.

    ``schema`` maps dataset name -> (row shape, dtype name); ``extras`` holds the non-row datasets
    (e.g. text states per unique prompt), written when the scratch file is created. Loop over
    ``pending()`` and ``write`` each range; leaving the ``with`` block normally with every row
    written renames the scratch file onto ``path``. After an exception the scratch file stays, and
    a rerun with the same provenance, ids, schema and extras resumes from it; one that differs is
    set aside with a warning. ``wait_s``: how long to wait for another writer of the same store
    before stopping with ``StoreBusy``. With ``compression`` (e.g. ``"gzip"``) chunks are allocated
    as they are written, so a resumed file may differ in bytes (not in values) from a clean one.
    """

    def __init__(
        self,
        path: Path,
        image_ids: list[str],
        provenance: dict,
        schema: Schema,
        chunk_rows: int = 64,
        compression: str | None = None,
        extras: dict[str, np.ndarray] | None = None,
        wait_s: float = 0.0,
    ):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.ids = [str(i) for i in image_ids]
        self.chunk_rows = int(chunk_rows)
        self.compression = compression
        self._check_args(provenance, schema, extras or {})
        self.schema = {
            name: (tuple(map(int, shape)), np.dtype(dtype)) for name, (shape, dtype) in schema.items()
        }
        self.extras = {name: _extra_array(array) for name, array in (extras or {}).items()}
        auto = {
            "package_version": pipeline.__version__,
            "format_version": FORMAT_VERSION,
            "schema": {name: [list(shape), dtype.name] for name, (shape, dtype) in self.schema.items()},
        }
        self.attrs = _encode({**provenance, **auto})
        self._lock = WriterLock(self.path, wait_s)
        try:
            self._file = self._resume()
            if self._file is None:
                self._create()
                self._file = self._resume()
            if self._file is None:
                raise RuntimeError(f"{self.partial}: a freshly created scratch file does not resume")
            self._done = self._file[DONE][()].astype(bool)
        except BaseException:
            self._lock.release()
            raise

    def _check_args(self, provenance: dict, schema: Schema, extras: dict) -> None:
        if not self.ids:
            raise ValueError(f"{self.path}: no image ids to write")
        if duplicates := sorted(i for i, count in Counter(self.ids).items() if count > 1):
            raise ValueError(f"{self.path}: duplicate image ids {duplicates[:5]} ({len(duplicates)} in all)")
        if reserved := sorted(set(provenance) & set(AUTO_KEYS)):
            raise ValueError(f"{self.path}: provenance keys {reserved} are set by the store itself")
        if bad := sorted(n for n in [*schema, *extras] if n in (IDS, DONE) or "/" in n or not n):
            raise ValueError(f"{self.path}: invalid dataset names {bad} (reserved, empty or containing '/')")
        if both := sorted(set(schema) & set(extras)):
            raise ValueError(f"{self.path}: {both} named both as row datasets and as extras")
        if self.chunk_rows < 1:
            raise ValueError(f"{self.path}: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _resume(self) -> h5py.File | None:
        """Open the scratch file if it was made for exactly this store; otherwise set it aside, saying why.

        HDF5's own file locking is off for this open: this process holds the writer lock, and a
        reader peeking at the scratch file (which takes HDF5's shared lock) must not stop a resume.
        """
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "r+", locking=False)
        except OSError as e:
            reasons = [f"unreadable ({e})"]
        else:
            try:
                reasons = self._resume_mismatches(f)
            except (KeyError, OSError, ValueError) as e:
                reasons = [f"incomplete ({e})"]
            if not reasons:
                return f
            f.close()
        set_aside(self.partial, "; ".join(reasons))
        return None

    def _resume_mismatches(self, f: h5py.File) -> list[str]:
        found = {k: str(v) for k, v in f.attrs.items()}
        reasons = [f"{k} was {old}, now {new}" for k, (new, old) in _diff(self.attrs, found).items()]
        reasons += [f"unexpected key {k}" for k in sorted(set(found) - set(self.attrs))]
        if list(f[IDS].asstr()[()]) != self.ids:
            reasons.append("image ids differ")
        if f[DONE].shape != (len(self.ids),):
            reasons.append("its row mask has the wrong length")
        reasons += [
            f"{n} was compressed with {f[n].compression}"
            for n in self.schema
            if f[n].compression != self.compression
        ]
        stored = sorted(set(f) - {*self.schema, IDS, DONE})
        if stored != sorted(self.extras):
            reasons.append(f"extras were {stored}, now {sorted(self.extras)}")
        else:
            reasons += [f"extra {n} differs" for n, a in self.extras.items() if not _same(f[n], a)]
        return reasons

    def _create(self) -> None:
        """Lay out the whole file and close it; the caller then opens it exactly as a resumed run does.

        HDF5 keeps some allocation state only in memory (space reserved for metadata, heaps it has
        read), so a clean run must reach its first row through the same close, reopen and checks
        as a resumed one for both to end with the same bytes. The file is built under another name
        and renamed when complete, so a kill here leaves no half-made scratch file.
        """
        n = len(self.ids)
        building = self.partial.with_name(self.partial.name + ".creating")
        try:
            with h5py.File(building, "w") as f:
                for key in sorted(self.attrs):  # fixed order, so the header bytes do not depend on dict order
                    f.attrs[key] = self.attrs[key]
                f.create_dataset(IDS, data=_utf8(np.array(self.ids)), track_times=False)
                for name, (shape, dtype) in self.schema.items():
                    options = _row_dataset_options(n, shape, dtype, self.compression)
                    f.create_dataset(name, shape=(n, *shape), dtype=dtype, **options)
                for name in sorted(self.extras):
                    f.create_dataset(name, data=self.extras[name], track_times=False)
                f.create_dataset(DONE, data=np.zeros(n, dtype=bool), track_times=False)
                self._flush(f)
            os.replace(building, self.partial)
            fsync_dir(self.partial.parent)
        except OSError as e:
            building.unlink(missing_ok=True)
            why = e.strerror or e
            raise OSError(e.errno, f"{self.partial}: cannot create the scratch file ({why})") from e

    @staticmethod
    def _flush(f: h5py.File) -> None:
        """Push HDF5's buffers to the OS and to disk, so the ``_done`` flags never run ahead of the data."""
        f.flush()
        os.fsync(f.id.get_vfd_handle())

    def pending(self) -> list[tuple[int, int]]:
        """``(start, stop)`` row ranges not yet committed, at most ``chunk_rows`` long, in row order."""
        ranges = []
        for start in range(0, len(self.ids), self.chunk_rows):
            missing = np.flatnonzero(~self._done[start : start + self.chunk_rows]) + start
            ranges += _runs(missing)
        return ranges

    def _checked(self, start: int, stop: int, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` cast to the store's dtype, refusing a wrong shape or dtype and NaN / inf values."""
        shape, dtype = self.schema[name]
        array = np.asarray(array)
        if array.shape != (stop - start, *shape):
            raise ValueError(
                f"{self.partial}: {name!r} for rows {start}:{stop} has shape {array.shape}, "
                f"expected {(stop - start, *shape)}"
            )
        if not np.can_cast(array.dtype, dtype, "same_kind"):
            raise ValueError(f"{self.partial}: {name!r} has dtype {array.dtype}, store holds {dtype}")
        with np.errstate(over="ignore"):
            cast = array.astype(dtype, copy=False)
        if cast.dtype.kind == "f" and not (finite := np.isfinite(cast.reshape(len(cast), -1)).all(1)).all():
            bad = np.flatnonzero(~finite) + start
            named = ", ".join(f"row {r} (image {self.ids[r]})" for r in bad[:5])
            raise ValueError(
                f"{self.path}: {name!r} is NaN or infinite in {len(bad)} row(s) after casting to {dtype}: "
                f"{named}; the encoder diverged or overflowed {dtype} (try another extract.dtype)"
            )
        return cast

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        """Write rows ``start:stop`` of every schema dataset and commit them (they survive a kill)."""
        if not 0 <= start < stop <= len(self.ids):
            raise ValueError(f"{self.partial}: row range {start}:{stop} outside 0:{len(self.ids)}")
        if set(arrays) != set(self.schema):
            raise ValueError(
                f"{self.partial}: rows {start}:{stop} need arrays {sorted(self.schema)}, got {sorted(arrays)}"
            )
        checked = {name: self._checked(start, stop, name, arrays[name]) for name in self.schema}
        try:
            for name, array in checked.items():
                self._file[name][start:stop] = array
            self._flush(self._file)
            self._file[DONE][start:stop] = True
            self._flush(self._file)
        except OSError as e:
            raise OSError(
                e.errno,
                f"{self.partial}: writing rows {start}:{stop} failed ({e.strerror or e}); rows committed "
                f"before are kept and {self.path} is untouched: fix the cause and rerun to resume",
            ) from e
        self._done[start:stop] = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._file.close()
            if exc_type is not None:
                return
            missing = int((~self._done).sum())
            if missing:
                kept = f"kept {self.partial} for a rerun"
                raise RuntimeError(f"{self.path}: {missing} rows never written; {kept}")
            os.replace(self.partial, self.path)
            fsync_dir(self.path.parent)
        finally:
            self._lock.release()


class FeatureStore:
    """Read-only view of a finished store; ``expect`` lists provenance the caller relies on.

    Only the keys in ``expect`` are compared, as canonical JSON (so 1 and 1.0 differ); any
    difference raises ``StoreMismatch`` naming every differing key with both values.
    """

    def __init__(self, path: Path, expect: dict | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature store not found: {self.path}")
        self._file = h5py.File(self.path, "r")
        if not self._file[DONE][()].all():
            self._file.close()
            raise ValueError(f"{self.path} is an unfinished store (rows still missing); rerun its writer")
        found = {k: str(v) for k, v in self._file.attrs.items()}
        if expect and (diffs := _diff(_encode(expect), found)):
            self._file.close()
            raise StoreMismatch(self.path, diffs)
        self.provenance = {k: json.loads(v) for k, v in found.items()}
        self.names = list(self.provenance["schema"])
        self.extras = [k for k in self._file if k not in (*self.names, IDS, DONE)]
        self.ids: list[str] = list(self._file[IDS].asstr()[()])
        self._row_of = {image_id: i for i, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _rows_dataset(self, name: str) -> h5py.Dataset:
        if name not in self.names:
            raise KeyError(f"{self.path} has no row dataset {name!r} (it has {self.names})")
        return self._file[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Full dataset shape, ``(n_rows, *row_shape)`` for row datasets."""
        return tuple(self._file[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return self._file[name].dtype

    def rows(self, image_ids: list[str]) -> np.ndarray:
        """Row indices of ``image_ids``; KeyError naming the ids the store does not hold."""
        unknown = [i for i in image_ids if i not in self._row_of]
        if unknown:
            raise KeyError(f"{self.path} has no rows for image ids {unknown[:5]} ({len(unknown)} in all)")
        return np.array([self._row_of[i] for i in image_ids], dtype=np.int64)

    def read(self, name: str, image_ids: list[str]) -> np.ndarray:
        """Rows of ``image_ids``, in that order."""
        return self.read_rows(name, self.rows(image_ids))

    def read_rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed), in that order, reading only what is needed."""
        ds = self._rows_dataset(name)
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))]
            raise IndexError(f"{self.path}: row indices {bad[:5].tolist()} outside 0:{len(self)}")
        rows, inverse = np.unique(indices, return_inverse=True)
        data = self._read_sorted(ds, rows)
        return data if np.array_equal(rows, indices) else data[inverse]

    def read_all(self, name: str) -> np.ndarray:
        """A whole dataset (row or extra) in memory; strings come back as ``str`` objects."""
        if name not in self._file:
            raise KeyError(f"{self.path} has no dataset {name!r} (it has {sorted(self._file)})")
        ds = self._file[name]
        return ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]

    def iter_blocks(
        self, name: str, indices: np.ndarray, budget_bytes: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(rows, array)`` blocks covering ``indices``, ``array.nbytes <= budget_bytes`` (or one row).

        Block k holds the next budget's worth of ``indices`` (so a shuffled order gives random
        blocks, a sorted one gives sequential reads), de-duplicated and in ascending order, which
        is how they are read; shuffle within the block if needed. Reading takes one h5py call per
        contiguous run (short gaps are read through) and at most SPAN_BYTES of extra memory.
        """
        ds = self._rows_dataset(name)
        block_rows = max(1, budget_bytes // max(1, self._row_bytes(ds)))
        indices = np.asarray(indices, dtype=np.int64)
        for b in range(0, len(indices), block_rows):
            rows = np.unique(indices[b : b + block_rows])
            yield rows, self.read_rows(name, rows)

    @staticmethod
    def _row_bytes(ds: h5py.Dataset) -> int:
        return int(np.prod(ds.shape[1:])) * ds.dtype.itemsize

    def _read_sorted(self, ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
        for lo, hi in _spans(rows, self._row_bytes(ds)):
            p0, p1 = np.searchsorted(rows, [lo, hi])
            if hi - lo == p1 - p0:  # a pure run: read straight into the output
                ds.read_direct(out, np.s_[lo:hi], np.s_[p0:p1])
            else:
                out[p0:p1] = ds[lo:hi][rows[p0:p1] - lo]
        return out
