"""DVC stage entry points: thin typer commands over ``pipeline``. Each declares ``PARAMS``.

``PARAMS`` lists the params.yaml keys the stage reads, as templates over its arguments
(``data.{dataset}``); dvc.yaml must declare exactly these (tests/test_dvc_contract.py). The one
undeclared section is ``runtime`` (device, workers, chunk size, memory budget): it changes speed,
not results, so changing it must not invalidate GPU-hours of cached features.
"""

from __future__ import annotations

from typing import Any

from pipeline import params


def read_params(templates: tuple[str, ...], **fmt: str) -> dict[str, Any]:
    """Load the declared keys, formatted with the stage's arguments; keyed by template."""
    keys = [t.format(**fmt) for t in templates]
    values = params.load(*keys)
    return {t: values[k] for t, k in zip(templates, keys, strict=True)}


def runtime() -> dict[str, Any]:
    return params.load("runtime")["runtime"]


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_manifest(path):
    """Read a manifest CSV keeping ids, groups and prompts as strings and empty MOS as NaN."""
    import pandas as pd

    text = {c: str for c in ("image_id", "path", "prompt", "group", "generator", "variant", "sha256")}
    return pd.read_csv(
        path, dtype=text, keep_default_na=False, na_values={"mos_quality": [""], "mos_align": [""]}
    )
