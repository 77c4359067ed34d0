"""Fault injection on the feature store: kills at every step of a write, concurrent writers and
readers, a full disk, non-finite rows. Each kill is a real SIGKILL of a writer process; the rerun
must finish with a store byte-identical to an uninterrupted one, recomputing no committed chunk.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import store as store_module
from pipeline.store import FeatureStore, StoreBusy, StoreWriter

ROOT = Path(__file__).resolve().parents[2]
N_ROWS, CHUNK = 12, 4
IDS = [f"img{i:03d}" for i in range(N_ROWS)]
SCHEMA = {"feat": ((3, 5), "float16"), "label": ((), "int64")}
EXTRAS = {"prompts": np.array(["a cat", "a dog"], dtype=object)}

# The writer, run as a process. KILL=<what>:<n> SIGKILLs it at the n-th call of one step of a write:
# flush (HDF5 buffers to disk: at creation, then twice per chunk), setitem (one dataset's rows of a
# chunk), replace (the scratch file's rename at creation, then the store's final rename), fsync_dir.
WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import h5py, numpy as np
    import pipeline.store as store

    out, log = Path(sys.argv[1]), Path(sys.argv[2])
    what, _, nth = os.environ.get("KILL", ":0").partition(":")
    calls = {"n": 0}

    def killing(fn):
        def wrapped(*args, **kw):
            calls["n"] += 1
            if calls["n"] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kw)
        return wrapped

    if what == "flush":
        store.StoreWriter._flush = staticmethod(killing(store.StoreWriter._flush))
    elif what == "setitem":
        h5py.Dataset.__setitem__ = killing(h5py.Dataset.__setitem__)
    elif what == "replace":
        store.os.replace = killing(os.replace)
    elif what == "fsync_dir":
        store.fsync_dir = killing(store.fsync_dir)
    store.CHUNK_BYTES = 64
    ids = [f"img{i:03d}" for i in range(12)]
    schema = {"feat": ((3, 5), "float16"), "label": ((), "int64")}
    extras = {"prompts": np.array(["a cat", "a dog"], dtype=object)}
    with store.StoreWriter(out, ids, {"encoder": "fake"}, schema, chunk_rows=4, extras=extras) as w:
        for start, stop in w.pending():
            rows = np.arange(start, stop)
            feat = (rows[:, None, None] + np.arange(15).reshape(3, 5) / 16).astype(np.float16)
            with log.open("a") as f:
                f.write(f"{start} {stop}\\n")
            w.write(start, stop, {"feat": feat, "label": rows * 7})
    """
)


def _run_writer(tmp: Path, out: Path, log: Path, kill: str = "") -> int:
    script = tmp / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL": kill}
    return subprocess.run([sys.executable, str(script), str(out), str(log)], env=env, cwd=tmp).returncode


def _computed(log: Path) -> list[int]:
    lines = log.read_text().split("\n") if log.exists() else []
    return [r for line in lines if line for r in range(*map(int, line.split()))]


def _contents(path: Path) -> dict[str, object]:
    """Every attribute and every dataset (values, dtype, chunking) of a store, for a readable diff."""
    with h5py.File(path, "r") as f:
        out: dict[str, object] = {f"attr {k}": v for k, v in f.attrs.items()}
        for name, ds in f.items():
            out[name] = (ds.dtype, ds.chunks, ds[()].tolist())
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("clean")
    assert _run_writer(tmp, tmp / "f.h5", tmp / "log") == 0
    return tmp / "f.h5"


KILLS = {
    "flush:1": "creating the scratch file, before its first flush",
    "replace:1": "creation done, before the scratch file's rename",
    "fsync_dir:1": "after the scratch file's rename, before the folder fsync",
    "setitem:1": "inside the first chunk: no dataset written",
    "setitem:2": "inside the first chunk: feat written, label not",
    "flush:2": "first chunk's rows written, not flushed, flags not set",
    "setitem:3": "first chunk's rows flushed, flags not set",
    "flush:3": "first chunk's flags set, not flushed",
    "setitem:5": "inside the second chunk, between its datasets",
    "setitem:7": "second chunk committed, before the third starts",
    "setitem:9": "inside the last chunk, rows flushed, flags not set",
    "flush:7": "last chunk's flags set, not flushed",
    "replace:2": "every row committed, before the final rename",
    "fsync_dir:2": "after the final rename, before the folder fsync",
}


@pytest.mark.parametrize("kill", list(KILLS), ids=list(KILLS.values()))
def test_sigkill_anywhere_then_rerun_gives_the_clean_bytes(tmp_path, clean, kill):
    out, first, second = tmp_path / "f.h5", tmp_path / "first.log", tmp_path / "second.log"
    assert _run_writer(tmp_path, out, first, kill) == -9, "the writer was not killed"
    done_before = set()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        with h5py.File(partial, "r") as f:
            done_before = set(np.flatnonzero(f["_done"][()]).tolist())
    finished = out.exists()  # killed after the final rename: nothing left to do
    if not finished:
        assert _run_writer(tmp_path, out, second) == 0
    assert _contents(out) == _contents(clean)
    assert out.read_bytes() == clean.read_bytes()
    recomputed = set(_computed(second))
    assert not recomputed & done_before, f"committed rows computed again: {sorted(recomputed & done_before)}"
    assert recomputed == (set() if finished else set(range(N_ROWS)) - done_before)
    assert not partial.exists() and not list(tmp_path.glob("*.discarded-*"))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 64)


def _rows(start: int, stop: int) -> dict[str, np.ndarray]:
    rows = np.arange(start, stop)
    return {"feat": (rows[:, None, None] + np.zeros((3, 5))).astype(np.float16), "label": rows * 7}


def _writer(path: Path, **kw) -> StoreWriter:
    return StoreWriter(path, IDS, {"encoder": "fake"}, SCHEMA, chunk_rows=CHUNK, extras=EXTRAS, **kw)


def test_a_second_writer_is_refused_naming_the_first(tmp_path, small_chunks):
    with _writer(tmp_path / "f.h5") as first:
        first.write(0, 4, _rows(0, 4))
        with pytest.raises(StoreBusy, match=rf"in use by PID {os.getpid()} on {socket.gethostname()}"):
            _writer(tmp_path / "f.h5")
        for start, stop in first.pending():
            first.write(start, stop, _rows(start, stop))
    assert FeatureStore(tmp_path / "f.h5").read_all("label").tolist() == [r * 7 for r in range(N_ROWS)]


def test_a_second_writer_can_wait_for_the_first_then_finds_its_rows(tmp_path):
    """The first writer, in another process, holds the lock for a while and dies; the second waits."""
    out = tmp_path / "f.h5"
    holder = textwrap.dedent(
        f"""
        import time, numpy as np, pipeline.store as store
        w = store.StoreWriter({str(out)!r}, {IDS!r}, {{"encoder": "fake"}}, {SCHEMA!r}, chunk_rows=4,
                              extras={{"prompts": np.array(["a cat", "a dog"], dtype=object)}})
        rows = np.arange(0, 4)
        feat = (rows[:, None, None] + np.zeros((3, 5))).astype(np.float16)
        w.write(0, 4, {{"feat": feat, "label": rows * 7}})
        print("holding", flush=True)
        time.sleep(1.5)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"holding"
    with pytest.raises(StoreBusy, match=f"PID {proc.pid}"):
        _writer(out)
    with _writer(out, wait_s=30) as second:  # the holder exits without finishing: its lock goes with it
        assert proc.poll() is not None
        assert second.pending() == [(4, 8), (8, 12)]
        for start, stop in second.pending():
            second.write(start, stop, _rows(start, stop))
    assert FeatureStore(out).read_all("label").tolist() == [r * 7 for r in range(N_ROWS)]


def test_a_reader_holding_the_partial_open_does_not_cost_the_rows(tmp_path, small_chunks):
    out = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt), _writer(out) as w:
        w.write(0, 4, _rows(0, 4))
        raise KeyboardInterrupt
    peek = (  # another process with the partial open read-only: HDF5's shared lock, as h5ls takes
        "import sys, time, h5py\n"
        "f = h5py.File(sys.argv[1], 'r'); print(int(f['_done'][()].sum()), flush=True); time.sleep(60)"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", peek, str(out.with_name("f.h5.partial"))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "4"
        with _writer(out) as resumed:
            assert resumed.pending() == [(4, 8), (8, 12)]
            for start, stop in resumed.pending():
                resumed.write(start, stop, _rows(start, stop))
    finally:
        reader.kill()
    assert not list(tmp_path.glob("*.discarded-*"))
    assert FeatureStore(out).read_all("label").tolist() == [r * 7 for r in range(N_ROWS)]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES], ids=["disk full", "permission denied"])
def test_a_failing_disk_keeps_the_previous_store_and_says_so(tmp_path, small_chunks, monkeypatch, err):
    out = tmp_path / "f.h5"
    with _writer(out) as w:
        for start, stop in w.pending():
            w.write(start, stop, _rows(start, stop))
    previous = out.read_bytes()
    calls = {"n": 0}
    real_flush = StoreWriter._flush

    def failing_flush(f):
        calls["n"] += 1
        if calls["n"] == 3:  # creation, the first chunk's rows, then its flags: the disk fails
            raise OSError(err, os.strerror(err))
        real_flush(f)

    monkeypatch.setattr(StoreWriter, "_flush", staticmethod(failing_flush))
    failed = rf"f\.h5\.partial: writing rows 0:4 failed .*{out} is untouched"
    with pytest.raises(OSError, match=failed) as e, _writer(out) as w:
        w.write(0, 4, _rows(0, 4))
    assert e.value.errno == err
    assert out.read_bytes() == previous


def test_creation_failure_leaves_no_scratch_file(tmp_path, monkeypatch):
    def refuse(*args, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store_module.h5py, "File", refuse)
    with pytest.raises(
        OSError, match=r"f\.h5\.partial: cannot create the scratch file \(Permission denied\)"
    ):
        _writer(tmp_path / "f.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5.writer.lock"]


@pytest.mark.parametrize("value", [np.nan, np.inf, 70000.0], ids=["nan", "inf", "float16 overflow"])
def test_non_finite_rows_are_refused_naming_row_and_image(tmp_path, small_chunks, value):
    with _writer(tmp_path / "f.h5") as w:
        rows = _rows(4, 8)
        rows["feat"] = rows["feat"].astype(np.float32)
        rows["feat"][2, 1, 3] = value
        with pytest.raises(
            ValueError, match=r"'feat' is NaN or infinite in 1 row\(s\) .*row 6 \(image img006\)"
        ):
            w.write(4, 8, rows)
        assert w.pending()[1] == (4, 8)  # nothing of that chunk was committed
        for start, stop in w.pending():
            w.write(start, stop, _rows(start, stop))
