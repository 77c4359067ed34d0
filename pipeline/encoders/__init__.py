"""Encoder registry: frozen stage-1 models that turn images into cached features.

Every encoder is a class registered with ``@register_encoder(name)`` and built by
``create_encoder(name, cfg, profile, device, dtype)``, where ``cfg`` is its ``extract.<name>``
section of params.yaml. ``profile="demo"`` builds a tiny randomly initialised model of the same
family through the same code; ``profile="paper"`` loads the real weights.

Each built-in encoder is a sub-package, ``pipeline/encoders/<name>/``, holding all the code it runs
(beside ``common.py``, which all of them share), so that its DVC extract stage depends on exactly that
folder. The registry is open: a class registered under a new name, or a package that declares an
entry point in the ``agiqa.encoders`` group (``name = "module:Class"``), is an encoder like the
built-in ones. Listing names imports nothing, so validating params stays cheap.

The shared API:

- ``provenance() -> dict``: json-serialisable facts written into the store's attributes
  (model id, weights digest, resolution, pooling, prompts...). A reader refuses a store whose
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
from importlib.metadata import entry_points
from typing import Any

BUILTIN = ("vit", "clip", "semantic", "vlm")
# Encoders whose store row is one vector per named prompt (``prompt_names`` in the provenance): what
# MA-AGIQA's prompt experts read (``ma_agiqa.semantic_encoder``) and what a probe concatenates.
PROMPT_FEATURES = ("semantic", "vlm")
ENTRY_POINTS = "agiqa.encoders"
PROFILES = ("demo", "paper")
_REGISTRY: dict[str, type] = {}


def register_encoder(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def list_encoders() -> list[str]:
    """Every name ``create_encoder`` accepts: built-in, registered, or declared by an entry point."""
    return sorted({*BUILTIN, *_REGISTRY, *_plugins()})


def _lookup(name: str) -> type:
    """The class of encoder ``name``, importing only its own module (and its heavy libraries)."""
    if name not in _REGISTRY:
        if name in BUILTIN:
            importlib.import_module(f"{__name__}.{name}")
        elif (plugin := _plugins().get(name)) is not None:
            cls = plugin.load()
            if name not in _REGISTRY:  # a plain class, not registered by its module
                register_encoder(name)(cls)
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def create_encoder(name: str, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "auto"):
    """Build encoder ``name``; ``dtype`` is ``extract.dtype`` (``auto``: by profile, see common.py)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    cls = _lookup(name)
    from pipeline.encoders.common import resolve_dtype

    return cls(cfg, profile=profile, device=device, dtype=resolve_dtype(dtype, profile))
