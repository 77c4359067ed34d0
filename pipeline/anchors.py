"""Published AGIQA numbers (``anchors.csv`` beside this file), which the report prints beside ours.

One row per method, dataset and output (methods.md §0, §1): SRCC and PLCC (KRCC and RMSE where
published), the protocol they were measured under, how the epoch was selected (``val``,
``test_oracle`` or ``unknown``), whether PLCC was taken after the 4-parameter logistic
(``logistic``, ``raw``, ``unknown``), the source, and ``verified``: ``no`` where the number was not
checked against the original table. ``run`` names the run of this toolkit that implements the method
(empty for methods it does not); ``train_dataset`` is set for cross-dataset numbers (trained there,
tested on ``dataset``). Dataset names are this toolkit's (``agiqa3k``, ``aigcqa20k``, ``agiqa1k``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

ANCHORS = Path(__file__).with_name("anchors.csv")
COLUMNS = (
    "method",
    "run",
    "dataset",
    "train_dataset",
    "output",
    "srcc",
    "plcc",
    "krcc",
    "rmse",
    "protocol",
    "select",
    "plcc_fit",
    "verified",
    "source",
)
CHOICES = {
    "output": ("quality", "alignment"),
    "select": ("val", "test_oracle", "none", "unknown"),  # none: zero-shot, no epoch to select
    "plcc_fit": ("logistic", "raw", "unknown"),
    "verified": ("yes", "no"),
}


def load_anchors(path: Path = ANCHORS) -> pd.DataFrame:
    """Read and check the anchors file; empty text cells become "" and missing numbers NaN."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    for column in ("method", "dataset", "source"):
        blank = table[column].str.strip() == ""
        if blank.any():
            raise ValueError(f"{path}: empty {column} on rows {[i + 2 for i in table.index[blank]]}")
    for column, allowed in CHOICES.items():
        bad = ~table[column].isin(allowed)
        if bad.any():
            row = int(table.index[bad][0]) + 2
            raise ValueError(f"{path}, row {row}: {column} {table[column][bad].iloc[0]!r} not in {allowed}")
    for column in ("srcc", "plcc", "krcc", "rmse"):
        values = pd.to_numeric(table[column].replace("", None), errors="coerce")
        bad = values.isna() & (table[column] != "")
        if bad.any():
            row = int(table.index[bad][0]) + 2
            raise ValueError(f"{path}, row {row}: {column} {table[column][bad].iloc[0]!r} is not a number")
        table[column] = values.astype("float64")
    if table["srcc"].isna().any():
        raise ValueError(
            f"{path}: every row needs an SRCC (rows {[i + 2 for i in table.index[table['srcc'].isna()]]})"
        )
    return table
