"""Stage-1 stores shared through a DVC remote, held once on disk (slow: runs DVC in two clones).

The team workflow of the README, for real: a first clone runs stage 1 (``dvc repro extract``),
commits ``dvc.lock`` and ``dvc push``es to a local-folder remote; a second ``git clone`` of it pulls
stage 1 (``dvc pull --with-deps extract``), finds it up to date (``dvc status extract``) and runs
stage 2 with ``dvc exp run -S fusion.experts=4``, which trains every head and runs no ``extract@``
stage.

Last bits: a store computed on another machine (a GPU, another BLAS) differs from what this one
would compute, and DVC must trust the pushed bytes through the lock's md5, never recompute them. The
first clone stands in for that machine: after its extract stages ran, one bit of the ViT store is
flipped and ``dvc commit`` records that store, as if it had been extracted elsewhere; the second
clone must hold exactly those bytes, up to date, although its own extraction would give others.

Link cache (``cache.type`` in the committed ``.dvc/config``): in both clones every store in the
workspace must be the cache object named by its md5 in ``dvc.lock``, not a second copy: the same
inode (hardlink), a symlink to it, or the same physical extents (reflink, asked through FIEMAP). With
DVC's default ``reflink,copy`` on a file system without reflinks (ext4) this fails.

Time: 61 s on 2 idle CPU cores (94 s with them shared), almost all of it the start-up of each
stage's process, so the demo is shrunk further than ``SHRINK`` (36 images, 2 folds, 1 epoch, no
bootstrap), stage 2 keeps one probe and one ablation (all four encoders' stores are kept), and each
stage runs once: stage 1 in the first clone, stage 2 in the second.
"""

import fcntl
import hashlib
import os
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from dvc_repo import GIT, run_in, snapshot_repo

pytestmark = pytest.mark.slow

SMALL = {
    "data.demo.generate.n_prompts": 12,
    "data.demo.generate.images_per_prompt": 3,
    "split.grouped_kfold.k": 2,
    "split.grouped_kfold.val_fraction": 0.25,
    "probe.encoders": ["vit"],
    "probe.recipe.epochs": 1,
    "ma_agiqa.ablations": ["maniqa"],
    "ma_agiqa.recipe.epochs": 1,
    "ipiqa.recipe.epochs": 1,
    "evaluate.bootstrap": 0,
}
DATASET = "demo"
ELSEWHERE = "vit"  # the store that stands in for one computed on another machine


def _set_params(repo: Path, values: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = params
        for name in parents:
            node = node[name]
        assert leaf in node, key
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _stores(repo: Path) -> dict[str, Path]:
    encoders = yaml.safe_load((repo / "params.yaml").read_text())["encoders"]
    return {encoder: repo / "features" / DATASET / f"{encoder}.h5" for encoder in encoders}


def _locked_md5(repo: Path, encoder: str) -> str:
    stage = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][f"extract@{DATASET}-{encoder}"]
    (out,) = stage["outs"]
    assert out["path"] == f"features/{DATASET}/{encoder}.h5"
    return out["md5"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _extents(path: Path) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of each extent of ``path`` (Linux FIEMAP, synced first); [] if unknown."""
    fs_ioc_fiemap, fiemap_flag_sync, count = 0xC020660B, 1, 256
    buf = bytearray(struct.pack("=QQLLLL", 0, 2**64 - 1, fiemap_flag_sync, 0, count, 0) + bytes(56 * count))
    try:
        with open(path, "rb") as f:
            fcntl.ioctl(f.fileno(), fs_ioc_fiemap, buf)
    except OSError:
        return []
    mapped = struct.unpack_from("=L", buf, 20)[0]
    return [struct.unpack_from("=QQQ", buf, 32 + 56 * i) for i in range(mapped)]


def _held_once(store: Path, cached: Path) -> str | None:
    """How ``store`` shares its bytes with the cache object ``cached``, or None for a second copy."""
    assert cached.is_file(), f"{cached} is not in the cache"
    if store.is_symlink():
        return "symlink" if store.resolve() == cached.resolve() else None
    if os.path.samefile(store, cached):
        return "hardlink"
    mine, theirs = _extents(store), _extents(cached)
    return "reflink" if mine and all(p != 0 for _, p, _ in mine) and mine == theirs else None


def _assert_links_into_cache(repo: Path) -> None:
    for encoder, store in _stores(repo).items():
        md5 = _locked_md5(repo, encoder)
        cached = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        how = _held_once(store, cached)
        assert how, f"{store} is a copy of {cached}, not a link into the cache (st_ino {store.stat().st_ino})"


def _flip_last_bit(store: Path, scratch: Path) -> None:
    """Rewrite ``store`` with the lowest bit of one feature flipped: new bytes through a new file, never
    in place (a hardlinked store is the cache object itself)."""
    shutil.copyfile(store, scratch)
    with h5py.File(scratch, "r+") as f:
        first = f["features"][0]
        bits = first.view(np.uint16).copy()
        bits.flat[0] ^= 1
        f["features"][0] = bits.view(first.dtype)
    os.replace(scratch, store)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict:
    """The first clone (stage 1 run and pushed), its remote, and a second clone that pulled from it."""
    top = tmp_path_factory.mktemp("team")
    first = snapshot_repo(top / "first")
    _set_params(first, SMALL)
    run_in([*GIT, "commit", "-qam", "small demo"], first)
    run_in(["dvc", "repro", "extract"], first)
    recomputed = _md5(_stores(first)[ELSEWHERE])
    _flip_last_bit(_stores(first)[ELSEWHERE], top / "elsewhere.h5")
    run_in(["dvc", "commit", "-f", f"extract@{DATASET}-{ELSEWHERE}"], first)
    run_in(["dvc", "remote", "add", "-d", "team", str(top / "remote")], first)
    run_in([*GIT, "add", "-A"], first)
    run_in([*GIT, "commit", "-qm", "stage 1 extracted; remote team"], first)
    run_in(["dvc", "push"], first)

    second = top / "second"
    run_in(["git", "clone", "-q", str(first), str(second)], top)
    run_in(["dvc", "config", "--local", "core.check_update", "false"], second)
    # stage 1's outputs and what they were made from; a plain `dvc pull` would also ask for stage 2's
    # outputs that dvc.lock names (here the full demo's, committed) and exit 1 as nobody pushed them
    run_in(["dvc", "pull", "--with-deps", "extract"], second)
    return {"first": first, "second": second, "recomputed": recomputed}


def test_workspace_stores_are_links_into_the_cache(team):
    for clone in ("first", "second"):
        _assert_links_into_cache(team[clone])


def test_pulled_clone_holds_the_pushed_stores_up_to_date(team):
    first, second = team["first"], team["second"]
    status = run_in(["dvc", "status", "extract"], second).stdout
    assert "Data and pipelines are up to date." in status, status
    for encoder, store in _stores(second).items():
        pushed = _stores(first)[encoder]
        assert store.read_bytes() == pushed.read_bytes(), encoder
        assert _md5(store) == _locked_md5(second, encoder) == _locked_md5(first, encoder), encoder
    # the ViT store is the one "computed elsewhere": the clone has its bytes, not what it would compute
    assert _locked_md5(second, ELSEWHERE) != team["recomputed"]


def test_stage2_experiment_in_the_clone_runs_no_extract_stage(team):
    second = team["second"]
    before = {encoder: _md5(store) for encoder, store in _stores(second).items()}
    out = run_in(["dvc", "exp", "run", "-S", "fusion.experts=4"], second).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert not {stage for stage in ran if stage.startswith("extract@")}, out
    assert {f"train_ma_agiqa@{DATASET}-ma_agiqa", f"train_probe@{DATASET}-vit", "report"} <= ran, out
    for encoder in before:
        assert f"Stage 'extract@{DATASET}-{encoder}' didn't change, skipping" in out, out
    assert {encoder: _md5(store) for encoder, store in _stores(second).items()} == before
    status = run_in(["dvc", "status"], second).stdout
    assert "Data and pipelines are up to date." in status, status
    _assert_links_into_cache(second)
