"""HDF5 feature store: round trip, provenance checks, resumable writes (incl. SIGKILL), block reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline
from pipeline import store as store_module
from pipeline.store import FeatureStore, StoreMismatch, StoreWriter, _spans

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"feat": ((3, 4), "float16"), "label": ((), "int64")}
PROVENANCE = {"encoder": {"model": "tiny", "layers": [6, 7]}, "manifest_hash": "abc", "dtype": "float16"}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """HDF5 chunks of a few rows, so that tiny test stores have many chunks, as real ones do."""
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 64)


def ids_of(n: int) -> list[str]:
    return [f"img{i:03d}" for i in range(n)]


def fake_rows(start: int, stop: int) -> dict[str, np.ndarray]:
    rows = np.arange(start, stop)
    feat = rows[:, None, None] + np.arange(12).reshape(3, 4) / 16
    return {"feat": feat.astype(np.float16), "label": rows * 7}


EXTRAS = {"prompts": np.array(["a cat", "a dog"], dtype=object), "text_states": np.ones((2, 5), np.float32)}


def write_store(
    path: Path, n: int = 10, chunk_rows: int = 3, order=None, provenance=PROVENANCE, **kw
) -> Path:
    kw = {"extras": EXTRAS, **kw}
    with StoreWriter(path, ids_of(n), provenance, SCHEMA, chunk_rows=chunk_rows, **kw) as w:
        pending = w.pending()
        for start, stop in order(pending) if order else pending:
            w.write(start, stop, fake_rows(start, stop))
    return path


def test_round_trip(tmp_path):
    path = write_store(tmp_path / "f.h5")
    assert not (tmp_path / "f.h5.partial").exists()
    with FeatureStore(path) as store:
        assert store.ids == ids_of(10) and len(store) == 10
        assert store.provenance == {
            **PROVENANCE,
            "package_version": pipeline.__version__,
            "format_version": 1,
            "schema": {"feat": [[3, 4], "float16"], "label": [[], "int64"]},
        }
        assert store.names == ["feat", "label"] and sorted(store.extras) == ["prompts", "text_states"]
        assert store.shape("feat") == (10, 3, 4) and store.dtype("feat") == np.float16
        np.testing.assert_array_equal(store.read_all("feat"), fake_rows(0, 10)["feat"])
        got = store.read("label", ["img007", "img002", "img007", "img009"])
        np.testing.assert_array_equal(got, [49, 14, 49, 63])
        assert store.read_all("prompts").tolist() == ["a cat", "a dog"]
        np.testing.assert_array_equal(store.read_all("text_states"), np.ones((2, 5)))
        with pytest.raises(KeyError, match="nope"):
            store.rows(["img001", "nope"])
        with pytest.raises(IndexError, match="10"):
            store.read_rows("feat", [3, 10])
        with pytest.raises(KeyError, match="prompts"):
            store.read("prompts", ["img001"])


def test_expect_names_each_differing_key(tmp_path):
    path = write_store(tmp_path / "f.h5")
    FeatureStore(
        path, expect={"manifest_hash": "abc", "encoder": {"layers": (6, 7), "model": "tiny"}}
    ).close()
    with pytest.raises(StoreMismatch) as err:
        FeatureStore(path, expect={"manifest_hash": "xyz", "dtype": "float16", "weights_sha256": "00"})
    assert set(err.value.diffs) == {"manifest_hash", "weights_sha256"}
    message = str(err.value)
    assert str(path) in message and '"xyz"' in message and '"abc"' in message and "<missing>" in message
    with pytest.raises(StoreMismatch, match=r"format_version: expected 1\.0, found 1$"):
        FeatureStore(path, expect={"format_version": 1.0})  # typed: a float is not the int stored
    with pytest.raises(FileNotFoundError, match=r"other\.h5"):
        FeatureStore(tmp_path / "other.h5")


def test_bytes_do_not_depend_on_write_order_or_dict_order(tmp_path):
    a = write_store(tmp_path / "a.h5")
    shuffled = {k: PROVENANCE[k] for k in reversed(PROVENANCE)}
    b = write_store(tmp_path / "b.h5", order=lambda p: p[::-1], provenance=shuffled, chunk_rows=2)
    assert a.read_bytes() == b.read_bytes()
    c = write_store(tmp_path / "c.h5", provenance={**PROVENANCE, "manifest_hash": "abd"})
    assert a.read_bytes() != c.read_bytes()


def test_exception_keeps_partial_and_rerun_computes_only_missing_rows(tmp_path):
    path = tmp_path / "f.h5"
    with (
        pytest.raises(RuntimeError, match="boom"),
        StoreWriter(path, ids_of(10), PROVENANCE, SCHEMA, 3, extras=EXTRAS) as w,
    ):
        for start, stop in w.pending()[:2]:
            w.write(start, stop, fake_rows(start, stop))
        raise RuntimeError("boom")
    assert not path.exists() and (tmp_path / "f.h5.partial").exists()
    with pytest.raises(ValueError, match="unfinished"):
        FeatureStore(tmp_path / "f.h5.partial")
    with StoreWriter(path, ids_of(10), PROVENANCE, SCHEMA, chunk_rows=3, extras=EXTRAS) as w:
        assert w.pending() == [(6, 9), (9, 10)]
        for start, stop in w.pending():
            w.write(start, stop, fake_rows(start, stop))
    assert path.read_bytes() == write_store(tmp_path / "clean.h5").read_bytes()


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"provenance": {**PROVENANCE, "manifest_hash": "new"}}, 'manifest_hash was "abc", now "new"'),
        ({"image_ids": [*ids_of(9), "other"]}, "image ids differ"),
        ({"schema": {**SCHEMA, "feat": ((3, 4), "float32")}}, "schema was"),
        ({"compression": "gzip"}, "compressed with None"),
        ({"extras": {"prompts": np.array(["a cow"], dtype=object)}}, "extras were \\[\\], now"),
    ],
)
def test_mismatched_partial_is_set_aside_with_a_warning(tmp_path, change, reason):
    path = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt), StoreWriter(path, ids_of(10), PROVENANCE, SCHEMA, 5) as w:
        w.write(0, 5, fake_rows(0, 5))
        raise KeyboardInterrupt
    args = {"image_ids": ids_of(10), "provenance": PROVENANCE, "schema": SCHEMA, **change}
    with pytest.warns(UserWarning, match=reason), StoreWriter(path, chunk_rows=5, **args) as w:
        assert w.pending() == [(0, 5), (5, 10)]
        for start, stop in w.pending():
            w.write(start, stop, fake_rows(start, stop))
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.read_all("label"), np.arange(10) * 7)
    (aside,) = tmp_path.glob("f.h5.partial.discarded-*")
    with h5py.File(aside) as old:  # the old rows are kept, not deleted
        assert old["_done"][()].sum() == 5


def test_unreadable_partial_is_set_aside(tmp_path):
    (tmp_path / "f.h5.partial").write_bytes(b"not hdf5")
    with pytest.warns(UserWarning, match="unreadable"):
        write_store(tmp_path / "f.h5")
    assert FeatureStore(tmp_path / "f.h5").ids == ids_of(10)
    assert [p.read_bytes() for p in tmp_path.glob("f.h5.partial.discarded-*")] == [b"not hdf5"]


def test_clean_exit_with_missing_rows_refuses_to_finalize(tmp_path):
    with (
        pytest.raises(RuntimeError, match="7 rows never written"),
        StoreWriter(tmp_path / "f.h5", ids_of(10), PROVENANCE, SCHEMA, chunk_rows=3) as w,
    ):
        w.write(0, 3, fake_rows(0, 3))
    assert not (tmp_path / "f.h5").exists() and (tmp_path / "f.h5.partial").exists()


def test_bad_input_is_named(tmp_path):
    path = tmp_path / "f.h5"
    with pytest.raises(ValueError, match="duplicate image ids \\['a'\\]"):
        StoreWriter(path, ["a", "b", "a"], PROVENANCE, SCHEMA)
    with pytest.raises(ValueError, match="package_version"):
        StoreWriter(path, ["a"], {"package_version": "9"}, SCHEMA)
    with pytest.raises(ValueError, match="'when'"):
        StoreWriter(path, ["a"], {"when": object()}, SCHEMA)
    with StoreWriter(path, ids_of(4), PROVENANCE, SCHEMA, chunk_rows=2) as w:
        with pytest.raises(ValueError, match="'feat' for rows 0:2 has shape \\(2, 4, 3\\)"):
            w.write(0, 2, {**fake_rows(0, 2), "feat": np.zeros((2, 4, 3))})
        with pytest.raises(ValueError, match="need arrays \\['feat', 'label'\\]"):
            w.write(0, 2, {"feat": fake_rows(0, 2)["feat"]})
        with pytest.raises(ValueError, match="'label' has dtype float64"):
            w.write(0, 2, {**fake_rows(0, 2), "label": np.zeros(2)})
        with pytest.raises(ValueError, match="outside 0:4"):
            w.write(2, 5, fake_rows(2, 5))
        for start, stop in w.pending():
            w.write(start, stop, fake_rows(start, stop))


def test_extras_are_written_at_creation(tmp_path):
    """Nothing is written after the rows: a kill before the final rename cannot cost metadata."""
    path = tmp_path / "f.h5"
    with StoreWriter(
        path, ids_of(2), PROVENANCE, SCHEMA, extras={"prompts": ["a cat", "ein Hund über"]}
    ) as w:
        with h5py.File(w.partial, "r", locking=False) as f:
            assert f["prompts"].asstr()[()].tolist() == ["a cat", "ein Hund über"]
        w.write(0, 2, fake_rows(0, 2))
    assert FeatureStore(path).read_all("prompts").tolist() == ["a cat", "ein Hund über"]
    with pytest.raises(ValueError, match="'feat'"):
        StoreWriter(tmp_path / "g.h5", ids_of(2), PROVENANCE, SCHEMA, extras={"feat": np.zeros(3)})


def test_compressed_store_round_trips(tmp_path):
    path = write_store(tmp_path / "f.h5", compression="gzip")
    with h5py.File(path) as f:
        assert f["feat"].compression == "gzip"
    with FeatureStore(path) as store:
        np.testing.assert_array_equal(store.read_all("feat"), fake_rows(0, 10)["feat"])


def test_iter_blocks_respects_budget_and_order(tmp_path):
    path = write_store(tmp_path / "f.h5", n=50, chunk_rows=7)
    order = np.random.default_rng(0).permutation(50)
    row_bytes = 3 * 4 * 2
    with FeatureStore(path) as store:
        blocks = list(store.iter_blocks("feat", order, budget_bytes=10 * row_bytes + 5))
        assert [len(rows) for rows, _ in blocks] == [10] * 5
        for k, (rows, array) in enumerate(blocks):
            np.testing.assert_array_equal(rows, np.sort(order[10 * k : 10 * k + 10]))
            np.testing.assert_array_equal(array, fake_rows(0, 50)["feat"][rows])
            assert array.nbytes <= 10 * row_bytes + 5
        tiny = list(store.iter_blocks("label", np.array([3, 1, 3]), budget_bytes=1))
        assert [rows.tolist() for rows, _ in tiny] == [[3], [1], [3]]


def test_spans_read_through_cheap_gaps_only():
    rows = np.array([0, 1, 2, 5, 6, 40, 41])
    assert _spans(rows, row_bytes=1 << 20) == [(0, 3), (5, 7), (40, 42)]  # big rows: one call per run
    assert _spans(rows, row_bytes=16 << 10) == [(0, 7), (40, 42)]  # 16 KiB rows: read a 2-row gap
    every_other = np.arange(0, 4000, 2)  # 8 KiB rows: gaps are read through, up to 8 MiB (1024 rows) a call
    assert _spans(every_other, row_bytes=8 << 10) == [(0, 1023), (1024, 2047), (2048, 3071), (3072, 3999)]
    assert _spans(np.arange(10), row_bytes=64 << 20) == [(0, 10)]  # a run is never split


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import numpy as np
import pipeline.store
from pipeline.store import StoreWriter

pipeline.store.CHUNK_BYTES = 64  # HDF5 chunks of two rows, so the layout has many chunks
out, log, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
ids = [f"img{i:03d}" for i in range(24)]
schema = {"feat": ((3, 5), "float16"), "label": ((), "int64")}
prompts = {"prompts": np.array(["a cat", "a dog"], dtype=object)}
with StoreWriter(out, ids, {"encoder": "slow-fake"}, schema, chunk_rows=4, extras=prompts) as writer:
    for start, stop in writer.pending():
        time.sleep(delay)  # the "encoder"
        rows = np.arange(start, stop)
        arrays = {"feat": (rows[:, None, None] + np.arange(15).reshape(3, 5) / 16).astype(np.float16),
                  "label": rows * 7}
        with log.open("a") as f:
            f.write(f"computed {start} {stop}\\n")
        writer.write(start, stop, arrays)
        with log.open("a") as f:
            f.write(f"committed {start} {stop}\\n")
"""


def logged_rows(log: Path, kind: str) -> set[int]:
    lines = log.read_text().splitlines() if log.exists() else []
    return {r for line in lines if line.startswith(kind) for r in range(*map(int, line.split()[1:]))}


def test_sigkill_then_rerun_completes_without_recomputing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out, first, second = tmp_path / "f.h5", tmp_path / "first.log", tmp_path / "second.log"

    def run(path: Path, log: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(path), str(log), str(delay)], env=env, cwd=ROOT
        )

    proc = run(out, first, delay=0.4)
    deadline = time.monotonic() + 60
    while len(logged_rows(first, "committed")) < 8:  # two chunks of 4 rows
        assert proc.poll() is None and time.monotonic() < deadline, "writer ended before it was killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (tmp_path / "f.h5.partial").exists()

    assert run(out, second, delay=0).wait() == 0
    assert run(tmp_path / "clean.h5", tmp_path / "clean.log", delay=0).wait() == 0
    all_rows = set(range(24))
    committed, computed_first = logged_rows(first, "committed"), logged_rows(first, "computed")
    computed_again = logged_rows(second, "computed")
    assert len(committed) >= 8 and len(computed_first - committed) <= 4  # at most the chunk in flight
    assert computed_again == all_rows - committed
    assert computed_first | computed_again == all_rows
    assert out.read_bytes() == (tmp_path / "clean.h5").read_bytes()
    with FeatureStore(out, expect={"encoder": "slow-fake"}) as store:
        np.testing.assert_array_equal(store.read_all("label"), np.arange(24) * 7)
