"""Encoder registry: frozen stage-1 models that turn images into cached features.

Every encoder is a class registered with ``@register_encoder(name)`` and built by
``create_encoder(name, cfg, profile, device, dtype)``, where ``cfg`` is its ``extract.<name>``
section of params.yaml. ``profile="demo"`` builds a tiny randomly initialised model of the same
family through the same code; ``profile="paper"`` loads the real weights. The shared API:

- ``provenance() -> dict``: json-serialisable facts written into the store's attributes
  (model id, weights tag or hash, resolution, pooling, prompts...). A reader refuses a store whose
  provenance differs.
- ``schema() -> dict[name, (shape, dtype)]``: the per-image arrays it writes (always ``features``).
- ``preprocess(image: PIL.Image) -> Tensor``: runs in DataLoader workers.
- ``encode(pixels: Tensor[B, 3, H, W]) -> dict[name, np.ndarray]``: one batch, rows in input order.
- ``extras(prompts: list[str]) -> dict[name, np.ndarray]``: arrays not indexed by image
  (e.g. CLIP text states per unique prompt); empty for most encoders.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, type] = {}
_MODULES = {"vit": "vit", "clip": "clip", "semantic": "semantic"}


def register_encoder(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_encoders() -> list[str]:
    return sorted(_MODULES)


def create_encoder(name: str, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
    """Build encoder ``name``; imports only that encoder's module (and its heavy libraries)."""
    if name not in _MODULES:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    if profile not in ("demo", "paper"):
        raise ValueError(f"profile must be 'demo' or 'paper', got {profile!r}")
    importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return _REGISTRY[name](cfg, profile=profile, device=device, dtype=dtype)
