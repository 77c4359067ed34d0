"""Named split protocols, and splits.json: the train/val/test image ids every stage-2 run uses.

A split is {"train": [image_ids], "val": [...], "test": [...]} (val may be empty), ids in manifest
order. Protocols named after a paper reproduce that paper's code draw for draw (see
references/methods.md §7); `grouped_kfold` is the honest default. Randomness comes from Python's
`random.Random` and numpy's legacy `RandomState`, whose streams are frozen across versions, so the same
params give the same splits on any machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

PARTS = ("train", "val", "test")
Split = dict[str, list[str]]


def _split(manifest: pd.DataFrame, part_of_row: list[str]) -> Split:
    ids = manifest["image_id"].to_list()
    return {part: [i for i, p in zip(ids, part_of_row, strict=True) if p == part] for part in PARTS}


def _by_group(manifest: pd.DataFrame, part_of_group: dict[str, str]) -> Split:
    return _split(manifest, [part_of_group[g] for g in manifest["group"]])


def _are_indices(groups: pd.Series) -> bool:
    return all(g.isdigit() and str(int(g)) == g for g in groups.unique())


def ipiqa_grouped(
    manifest: pd.DataFrame, repeats: int = 10, seed: int = 42, train_fraction: float = 0.8, draw: str = "auto"
) -> list[Split]:
    """IP-IQA: `repeats` random train/test splits by group, no val; one RNG seeding for all repeats.

    draw="permutation" (AGIQA-3k): groups are prompt indices, integers 0..n-1 with n = largest + 1
    (300 on AGIQA-3k, also when bad images removed a whole prompt); each repeat draws the legacy numpy
    `permutation(n)` and the groups among its first int(train_fraction * n) entries train.
    draw="walk" (AGIQA-1k): rows in manifest order, i.e. the label file's order; the first time a
    group appears, one stdlib `random() < train_fraction` sends it to train, else to test.
    draw="auto" picks "permutation" when every group is a plain non-negative integer ("0", "17", as
    the AGIQA-3k loader writes them) and "walk" otherwise (AGIQA-1k, AIGCQA-20k, the demo, prompt-
    grouped CSV data). Both streams are seeded once with `seed` and run on through the repeats, as the
    original seeds once at start-up. A walk over a manifest that lost a whole group to bad images
    draws differently from the original from that group on.
    """
    groups = manifest["group"]
    if draw == "auto":
        draw = "permutation" if _are_indices(groups) else "walk"
    splits = []
    if draw == "permutation":
        if not _are_indices(groups):
            raise ValueError("ipiqa_grouped: draw='permutation' needs groups that are non-negative integers")
        n = max(int(g) for g in groups.unique()) + 1
        state = np.random.RandomState(seed)
        for _ in range(repeats):
            train = {str(g) for g in state.permutation(n)[: int(train_fraction * n)]}
            splits.append(
                _by_group(manifest, {g: "train" if g in train else "test" for g in groups.unique()})
            )
    elif draw == "walk":
        stream = random.Random(seed)
        for _ in range(repeats):
            part_of_group: dict[str, str] = {}
            for g in groups:
                if g not in part_of_group:
                    part_of_group[g] = "train" if stream.random() < train_fraction else "test"
            splits.append(_by_group(manifest, part_of_group))
    else:
        raise ValueError(f"ipiqa_grouped: draw must be 'auto', 'permutation' or 'walk', not {draw!r}")
    return splits


def ma_agiqa_random(
    manifest: pd.DataFrame, seed: int = 20, cuts: tuple[float, float] = (0.7, 0.8)
) -> list[Split]:
    """MA-AGIQA: one image-level split (prompts leak across parts, as in the paper).

    Row indices in manifest (file) order are shuffled by stdlib `random.seed(seed); random.shuffle`;
    the cumulative cuts are truncated with int() as the original does: train = idx[:int(N*0.7)],
    val = idx[int(N*0.7):int(N*0.8)], test = the rest (AGIQA-3k: 2087 / 298 / 597).
    """
    n = len(manifest)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    first, second = int(n * cuts[0]), int(n * cuts[1])
    part_of_row = [""] * n
    for position, row in enumerate(order):
        part_of_row[row] = "train" if position < first else "val" if position < second else "test"
    return [_split(manifest, part_of_row)]


def grouped_kfold(
    manifest: pd.DataFrame, k: int = 5, val_fraction: float = 0.1, seed: int = 0
) -> list[Split]:
    """k folds by group; fold i tests on group fold i, validates on round(val_fraction * rest) groups
    drawn from the other folds, trains on the remaining groups. Every image is tested exactly once and
    no group touches two parts of a split. Groups are sorted before shuffling, so row order is irrelevant.
    """
    groups = np.array(sorted(manifest["group"].unique()))
    if not 2 <= k <= len(groups):
        raise ValueError(f"grouped_kfold: k={k} needs 2 <= k <= number of groups ({len(groups)})")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"grouped_kfold: val_fraction={val_fraction} must be in [0, 1)")
    state = np.random.RandomState(seed)
    folds = np.array_split(state.permutation(groups), k)
    splits = []
    for i, test in enumerate(folds):
        rest = state.permutation(np.concatenate([f for j, f in enumerate(folds) if j != i]))
        n_val = round(val_fraction * len(rest))
        part_of_group = {g: "test" for g in test} | {g: "val" for g in rest[:n_val]}
        part_of_group |= {g: "train" for g in rest[n_val:]}
        splits.append(_by_group(manifest, part_of_group))
    return splits


def _ids(values: list[str], limit: int = 5) -> str:
    more = len(values) - limit
    return ", ".join(map(repr, values[:limit])) + (f" and {more} more" if more > 0 else "")


def _in_manifest_order(manifest: pd.DataFrame, part_of: dict[str, str], source: str) -> Split:
    unknown = sorted(set(part_of) - set(manifest["image_id"]))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} image ids not in the manifest: {_ids(unknown)}")
    bad = sorted({p for p in part_of.values() if p not in PARTS})
    if bad:
        raise ValueError(f"{source}: unknown parts {bad}; parts are {list(PARTS)}")
    ids = manifest["image_id"].to_list()
    return {part: [i for i in ids if part_of.get(i) == part] for part in PARTS}


def _from_json(manifest: pd.DataFrame, path: Path) -> list[Split]:
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("splits"), list):
        raise ValueError(f"{path}: expected an object with a 'splits' list (the splits.json layout)")
    splits = document["splits"]
    if "hash" in document and split_hash(splits) != document["hash"]:
        raise ValueError(f"{path}: the splits do not match the recorded hash; the file was edited")
    out = []
    for k, split in enumerate(splits):
        pairs = [(str(i), part) for part, image_ids in split.items() for i in image_ids]
        repeated = sorted(i for i, n in Counter(i for i, _ in pairs).items() if n > 1)
        if repeated:
            raise ValueError(f"{path}, split {k}: image ids listed twice: {_ids(repeated)}")
        out.append(_in_manifest_order(manifest, dict(pairs), f"{path}, split {k}"))
    return out


def _from_folder(manifest: pd.DataFrame, folder: Path) -> list[Split]:
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no per-split CSV files (image_id,part) found")
    out = []
    for file in files:
        table = pd.read_csv(file, dtype=str, keep_default_na=False)
        missing = [c for c in ("image_id", "part") if c not in table.columns]
        if missing:
            raise ValueError(f"{file}: missing columns {missing}; expected image_id,part")
        repeated = sorted(table.loc[table["image_id"].duplicated(), "image_id"].unique())
        if repeated:
            raise ValueError(f"{file}: image ids listed twice: {_ids(repeated)}")
        out.append(
            _in_manifest_order(manifest, dict(zip(table["image_id"], table["part"], strict=True)), str(file))
        )
    return out


def custom(manifest: pd.DataFrame, path: str | Path) -> list[Split]:
    """The user's own splits, checked against the manifest.

    ``path`` is a JSON file in the splits.json layout (a ``hash``, when present, must match) or a
    folder of per-split CSVs ``image_id,part`` taken in file-name order, as ``write_splits`` writes
    them. Images a file does not list are in no part of that split; every id must be in the
    manifest and appear once per split; errors name the file and the offending ids. DVC does not
    track the user's files: after editing them, rerun with ``dvc repro -f split@<dataset>``.
    """
    path = Path(path)
    if path.is_dir():
        return _from_folder(manifest, path)
    if path.is_file():
        return _from_json(manifest, path)
    raise FileNotFoundError(f"split.custom.path: {path} is neither a JSON file nor a folder of CSVs")


PROTOCOLS: dict[str, Callable[..., list[Split]]] = {
    "ipiqa_grouped": ipiqa_grouped,
    "ma_agiqa_random": ma_agiqa_random,
    "grouped_kfold": grouped_kfold,
    "custom": custom,
}


def make_splits(protocol: str, manifest: pd.DataFrame, **params) -> list[Split]:
    """Run a named protocol on a manifest; params are that protocol's keyword arguments.

    Ids and groups are compared as strings, so a manifest whose groups are integers (3 == "3") gives
    the same splits as one read back from disk.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown split protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    if manifest["image_id"].duplicated().any():
        raise ValueError("make_splits: the manifest's image_id values are not unique")
    return PROTOCOLS[protocol](manifest.astype({"image_id": str, "group": str}), **params)


def split_hash(splits: list[Split]) -> str:
    """SHA-256 of the splits as sets: each part's ids sorted, canonical JSON."""
    canonical = [{part: sorted(split.get(part, [])) for part in PARTS} for split in splits]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def write_splits(path: Path, protocol: str, params: dict, splits: list[Split]) -> str:
    """Write splits.json and, in the folder of the same stem beside it (splits/), split_00.csv ...
    (image_id,part) for other tools; earlier split_*.csv there are removed. Returns the hash."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"write_splits: {path} should end in .json")
    digest = split_hash(splits)
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("split_*.csv"):
        old.unlink()
    width = max(2, len(str(len(splits) - 1)))
    for i, split in enumerate(splits):
        target = folder / f"split_{i:0{width}d}.csv"
        with open(target, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_id", "part"])
            writer.writerows((image_id, part) for part in PARTS for image_id in split.get(part, []))
    document = {"protocol": protocol, "params": params, "hash": digest, "splits": splits}
    _write_atomic(path, json.dumps(document, indent=1) + "\n")
    return digest


def read_splits(path: Path) -> dict:
    """Read splits.json, refusing a file whose splits no longer match its recorded hash."""
    path = Path(path)
    document = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in ("protocol", "params", "hash", "splits") if key not in document]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if split_hash(document["splits"]) != document["hash"]:
        raise ValueError(f"{path}: the splits do not match the recorded hash; the file was edited")
    return document
