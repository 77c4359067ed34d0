"""Head registry: light models trained on cached features (timm-style `register` + `create`).

A head is an ``nn.Module`` with

- ``inputs``: the encoder stores it reads, e.g. ``("vit", "semantic")``;
- ``forward(batch) -> Tensor[B, n_outputs]`` where ``batch`` maps each name in ``inputs`` to the
  rows' ``features`` array from that store (plus ``"prompt_index"`` for prompt-aware heads).

A head family registers a builder
``fn(n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg) -> nn.Module``, where
``input_shapes`` gives the per-row shape of each store's ``features`` (so tiny demo encoders and
the real ones build the same head) and ``cfg`` is the head's params section. Heads that need
more (IP-IQA's frozen CLIP text tower) take it as a keyword the train stage supplies.

``BUILTIN`` maps each built-in head to the module that registers it, so that ``create_head`` imports
that module alone (a train stage depends on exactly the code it runs) and ``list_heads`` imports
nothing. The registry is open: ``@register_head`` in any imported module, or an entry point in the
``agiqa.heads`` group (``name = "module:builder"``), adds a head.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

BUILTIN = {
    "probe": "probe",
    "ma_agiqa": "ma_agiqa",
    "maniqa": "ma_agiqa",
    "semantic_only": "ma_agiqa",
    "ipiqa": "ipiqa",
    "ipiqa_image_only": "ipiqa",
}
ENTRY_POINTS = "agiqa.heads"
_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_head(name: str) -> Callable:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"head {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def list_heads() -> list[str]:
    """Every name ``create_head`` accepts: built-in, registered, or declared by an entry point."""
    return sorted({*BUILTIN, *_REGISTRY, *_plugins()})


def _lookup(name: str) -> Callable[..., Any]:
    if name not in _REGISTRY:
        if name in BUILTIN:
            importlib.import_module(f"{__name__}.{BUILTIN[name]}")
        elif (plugin := _plugins().get(name)) is not None:
            builder = plugin.load()
            if name not in _REGISTRY:  # a plain builder, not registered by its module
                register_head(name)(builder)
    if name not in _REGISTRY:
        raise KeyError(f"unknown head {name!r}; known: {', '.join(list_heads())}")
    return _REGISTRY[name]


def create_head(name: str, n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg):
    """Build head ``name`` (an ``nn.Module``), importing only the module that defines it."""
    return _lookup(name)(n_outputs=n_outputs, input_shapes=input_shapes, **cfg)
