"""The manifest: one row per image, the only thing downstream stages read about a dataset.

Loaders keep the source file's row number as the DataFrame index (the header is row 1, so the first
data row is row 2, as a spreadsheet shows it and as a text editor numbers a CSV's lines), so that
every error here and in `check_images` can point at the row to fix.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pandas as pd

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id",  # unique, stable key; feature stores and predictions are keyed by it
    "path",  # relative to the dataset root, POSIX separators
    "prompt",
    "mos_quality",
    "mos_align",  # NaN where the dataset has no alignment score
    "group",  # the unit that must not straddle train and test
    "generator",
    "variant",  # AGIQA-3k: normal/lowstep/highcorr/lowcorr; demo: degradation kind; else ""
)
TEXT_COLUMNS = ("image_id", "path", "prompt", "group", "generator", "variant")


class ManifestError(ValueError):
    """A label file or manifest that cannot be used as it is; the message names file and row."""


def _rows(df: pd.DataFrame, mask: pd.Series, limit: int = 5) -> str:
    rows = [str(r) for r in df.index[mask.to_numpy()][:limit]]
    more = int(mask.sum()) - len(rows)
    return ", ".join(rows) + (f" and {more} more" if more > 0 else "")


def escapes_root(path: str) -> bool:
    """An absolute path, a drive letter, or one that leaves its root through '..'."""
    norm = posixpath.normpath(path)
    return path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":") or norm.split("/")[0] == ".."


def _numeric(df: pd.DataFrame, column: str, source: str, allow_nan: bool) -> pd.Series:
    raw = df[column]
    blank = raw.isna() | raw.astype(str).str.strip().isin(["", "nan", "NaN"])
    values = pd.to_numeric(raw.where(~blank), errors="coerce").astype("float64")
    bad_text = values.isna() & ~blank
    if bad_text.any():
        first = df.index[bad_text.to_numpy()][0]
        raise ManifestError(
            f"{source}, row {first}: {column} {raw[bad_text].iloc[0]!r} is not a number "
            f"(rows {_rows(df, bad_text)})"
        )
    not_finite = np.isinf(values) | (values.isna() & ~allow_nan)
    if not_finite.any():
        raise ManifestError(f"{source}: {column} is missing or not finite in rows {_rows(df, not_finite)}")
    return values


def validate_manifest(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check the schema and return a typed copy holding exactly MANIFEST_COLUMNS, in that order.

    `source` names the file the rows came from; it starts every error message. Raises ManifestError on
    missing columns, blank or duplicate image ids, blank or escaping paths (absolute, or leaving the
    dataset root through ".."), a blank group, and a quality MOS that is missing, non-numeric or
    infinite (alignment MOS may be missing, never non-numeric).
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing manifest columns {missing}; has {list(df.columns)}")
    out = df.loc[:, list(MANIFEST_COLUMNS)].copy()
    for column in TEXT_COLUMNS:
        out[column] = out[column].fillna("").astype(str).str.strip()
    blank_prompt = out["prompt"] == ""
    if blank_prompt.any() and not blank_prompt.all():
        raise ManifestError(
            f"{source}: empty or blank prompt in rows {_rows(out, blank_prompt)} (column prompt); "
            "every image of a dataset with prompts needs one"
        )
    for column in ("image_id", "path", "group"):
        blank = out[column] == ""
        if blank.any():
            raise ManifestError(f"{source}: empty {column} in rows {_rows(out, blank)}")
    duplicated = out["image_id"].duplicated(keep=False)
    if duplicated.any():
        name = out.loc[duplicated, "image_id"].iloc[0]
        raise ManifestError(
            f"{source}: image {name!r} appears more than once, rows {_rows(out, out['image_id'] == name)} "
            f"({duplicated.sum()} rows share a name)"
        )
    escaping = out["path"].map(escapes_root)
    if escaping.any():
        first = out.index[escaping.to_numpy()][0]
        raise ManifestError(
            f"{source}, row {first}: path {out.loc[escaping, 'path'].iloc[0]!r} leaves the dataset root"
        )
    out["mos_quality"] = _numeric(out, "mos_quality", source, allow_nan=False)
    out["mos_align"] = _numeric(out, "mos_align", source, allow_nan=True)
    return out


def manifest_hash(df: pd.DataFrame) -> str:
    """SHA-256 of the manifest columns as CSV (floats at full precision, index ignored), with the images'
    own sha256 once ``check_images`` has added them.

    Feature stores record it, so a store built from other labels, images or row order is refused.
    """
    columns = [*MANIFEST_COLUMNS, *(["sha256"] if "sha256" in df else [])]
    text = df.loc[:, columns].to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
