"""Read params.yaml sections. Stages read only the sections they declare in dvc.yaml (``PARAMS``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load(*keys: str, path: Path | str = "params.yaml") -> dict[str, Any]:
    """Return ``{key: value}`` for top-level or dotted keys (``extract.vit``), naming any missing key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stages from the repository root")
    cfg = yaml.safe_load(path.read_text()) or {}
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = cfg
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, dict) or part not in node:
                have = sorted(node) if isinstance(node, dict) else []
                prefix = ".".join(key.split(".")[:i]) or "<top level>"
                raise KeyError(f"{path}: key {key!r} missing ({part!r} not under {prefix}; found {have})")
            node = node[part]
        out[key] = node
    return out
