"""Code identity: what a cached result was computed by, beyond its params.

A store's provenance names its params (model, prompts, dtype...), but the same params run through
other code, or another torch, can give other numbers. ``code_identity`` adds a digest of the project
source files this process has imported (the modules under ``pipeline/`` and ``stages/``, which are
exactly the code deps its DVC stage declares, as tests/test_pipeline_e2e.py checks), the versions of
the numeric libraries, and the kind of device. A scratch file or checkpoint written by other code is
then set aside instead of being resumed into a store that mixes two versions. Output folders (run
folders, manifests, bundles) are built beside their place and renamed onto it (``built_beside``), so a
failed write never leaves one that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
LIBRARIES = ("torch", "transformers", "timm", "open_clip_torch", "numpy", "h5py", "pillow")


def source_files() -> list[Path]:
    """The project's source files among the modules loaded so far, sorted by relative path.

    Chosen by file, not by module name: ``python -m stages.extract`` runs that file as ``__main__``.
    """
    packages = [ROOT / package for package in PACKAGES]
    files = set()
    for module in list(sys.modules.values()):
        if file := getattr(module, "__file__", None):
            path = Path(file).resolve()
            if path.suffix == ".py" and any(path.is_relative_to(package) for package in packages):
                files.add(path)
    return sorted(files, key=lambda f: f.relative_to(ROOT).as_posix())


def source_digest() -> str:
    """sha256 over (relative path, bytes) of every imported project source file."""
    h = hashlib.sha256()
    for file in source_files():
        h.update(file.relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(file.read_bytes() + b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that compute features (None when not installed)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_kind(device: str) -> str:
    """``cpu``, or ``cuda`` with the GPU's name: kernels (and last bits) differ between the two."""
    if not device.startswith("cuda"):
        return device.split(":")[0]
    import torch

    return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"


def code_identity(device: str) -> dict[str, object]:
    """Provenance of the code that computes: call it after the encoder (and its modules) is built."""
    return {"source_sha256": source_digest(), "libraries": library_versions(), "device": device_kind(device)}


def set_aside(path: Path, why: str) -> Path:
    """Rename a stale partial result to ``<name>.discarded-<time>`` (never delete: it may hold hours of
    GPU work) and warn, saying why; returns the new path."""
    aside = path.with_name(f"{path.name}.discarded-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
    os.replace(path, aside)
    warnings.warn(f"set {path} aside as {aside.name}: {why}", stacklevel=3)
    return aside


@contextmanager
def built_beside(out: Path) -> Iterator[Path]:
    """A fresh ``<out>.partial`` folder to write an output folder into; renamed onto ``out`` when the
    block ends normally. After an error ``out`` is as it was and nothing at ``out`` looks complete."""
    building = out.with_name(out.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    yield building
    shutil.rmtree(out, ignore_errors=True)
    building.replace(out)
