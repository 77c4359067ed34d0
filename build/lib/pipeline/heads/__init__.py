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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES = ("probe", "ma_agiqa", "ipiqa")


def register_head(name: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"head {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_families() -> None:
    for family in _FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{family}":
                raise


def list_heads() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def create_head(name: str, n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg) -> nn.Module:
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown head {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](n_outputs=n_outputs, input_shapes=input_shapes, **cfg)
