"""Sharded stores (pipeline/shards.py) without processes: the row blocks, and the merge's checks and bytes.

The real stage under torchrun and array tasks is in tests/reliability/test_extract_faults.py (slow).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import SHARD_KEY, Shard, ShardError, merge, shard_folder
from pipeline.store import StoreWriter

SCHEMA = {"features": ((2, 3), "float16")}
EXTRAS = {"text_prompts": np.array(["a cat", "a dog"], dtype=object)}
KNOWN = {"dataset": "toy", "manifest_hash": "abc", "batch_size": 4, "config": {"cfg": {"x": [1, 2]}}}
N, BATCH = 22, 4


def rows(start: int, stop: int) -> dict[str, np.ndarray]:
    values = np.arange(start, stop)[:, None, None] + np.arange(6).reshape(2, 3) / 8
    return {"features": values.astype(np.float16)}


IDS = [f"img{i:02d}" for i in range(N)]


def write(path: Path, ids: list[str], provenance: dict, first: int = 0) -> None:
    with StoreWriter(path, ids, provenance, SCHEMA, chunk_rows=BATCH, extras=EXTRAS) as w:
        for start, stop in w.pending():
            w.write(start, stop, rows(first + start, first + stop))


def write_shards(out: Path, count: int, known: dict = KNOWN, skip: tuple[int, ...] = ()) -> None:
    for i in range(count):
        if i in skip:
            continue
        shard = Shard(i, count)
        start, stop = shard.rows(N, BATCH)
        record = {"index": i, "count": count, "rows": [start, stop], "sources": {}}
        write(shard.path(out), IDS[start:stop], {**known, SHARD_KEY: record}, first=start)


@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_shards_are_contiguous_blocks_of_whole_batches(count):
    blocks = [Shard(i, count).rows(N, BATCH) for i in range(count)]
    assert blocks[0][0] == 0 and blocks[-1][1] == N
    assert all(a[1] == b[0] for a, b in pairwise(blocks))
    assert all(start % BATCH == 0 and stop > start for start, stop in blocks)
    assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= BATCH  # near-equal


def test_bad_shard_specs_are_refused():
    with pytest.raises(ValueError, match="at most 6 shards"):
        Shard(0, 7).rows(N, BATCH)
    for text in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="i/N"):
            Shard.parse(text)
    assert Shard.parse(" 2 / 8 ") == Shard(2, 8)


def test_torchrun_environment_names_the_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert Shard.from_env() == Shard(3, 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Shard.from_env() is None


def test_merge_gives_the_single_process_store_byte_for_byte(tmp_path):
    write(tmp_path / "single.h5", IDS, KNOWN)
    out = tmp_path / "sharded.h5"
    write_shards(out, 3)
    assert merge(out, IDS, BATCH, KNOWN, chunk_rows=8) == 3
    assert out.read_bytes() == (tmp_path / "single.h5").read_bytes()
    assert not shard_folder(out).exists()


def test_merge_names_missing_and_unfinished_shards(tmp_path):
    out = tmp_path / "s.h5"
    write_shards(out, 3, skip=(1, 2))
    (shard_folder(out) / "00002-of-00003.h5.partial").write_bytes(b"")
    with pytest.raises(
        ShardError, match=r"00001-of-00003\.h5 \(missing\), 00002-of-00003\.h5 \(unfinished\)"
    ):
        merge(out, IDS, BATCH, KNOWN)
    assert not out.exists()


def test_merge_refuses_mixed_counts(tmp_path):
    out = tmp_path / "s.h5"
    write_shards(out, 2)
    write_shards(out, 3)
    with pytest.raises(ShardError, match=r"different counts \(2 \(2 files\), 3 \(3 files\)\)"):
        merge(out, IDS, BATCH, KNOWN)


def test_merge_refuses_a_stale_or_disagreeing_shard(tmp_path):
    out = tmp_path / "s.h5"
    write_shards(out, 2)
    with pytest.raises(
        ShardError, match=r"00000-of-00002\.h5: stale shard \(manifest_hash is \"abc\", now \"new\""
    ):
        merge(out, IDS, BATCH, {**KNOWN, "manifest_hash": "new"})
    other = tmp_path / "o.h5"
    write_shards(other, 2)
    (shard_folder(other) / "00001-of-00002.h5").unlink()
    start, stop = Shard(1, 2).rows(N, BATCH)
    record = {"index": 1, "count": 2, "rows": [start, stop], "sources": {}}
    write(Shard(1, 2).path(other), IDS[start:stop], {**KNOWN, "device": "cuda", SHARD_KEY: record}, start)
    with pytest.raises(ShardError, match=r"00001-of-00002\.h5: differs from 00000-of-00002\.h5 in device"):
        merge(other, IDS, BATCH, KNOWN)


def test_merge_refuses_a_shard_whose_source_changed(tmp_path, monkeypatch):
    import pipeline.shards as shards

    source = tmp_path / "encoder.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(shards, "ROOT", tmp_path)
    out = tmp_path / "s.h5"
    for i in range(2):
        start, stop = Shard(i, 2).rows(N, BATCH)
        sources = {"encoder.py": shards._sha256(source)}
        record = {"index": i, "count": 2, "rows": [start, stop], "sources": sources}
        write(Shard(i, 2).path(out), IDS[start:stop], {**KNOWN, SHARD_KEY: record}, first=start)
    source.write_text("x = 2\n")
    with pytest.raises(ShardError, match=r"stale shard \(changed since: encoder\.py\)"):
        merge(out, IDS, BATCH, KNOWN)
