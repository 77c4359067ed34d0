"""Score new images with a trained run or an exported bundle: the library behind ``agiqa score``.

``Scorer`` rebuilds every encoder the head reads from the provenance of the stores it was trained
on (same config, profile, compute dtype and batch size as stage 1), refuses an encoder whose
rebuilt weights or settings differ from that record, and then runs stage 1's own ``preprocess``
and ``encode`` and the head through ``pipeline.runs`` (the path ``cross`` uses): a live score is
computed as the cached features and predictions were. Features are cast to the stores' float16.

    scorer = Scorer.from_pretrained("runs/agiqa3k/ma_agiqa")   # or a bundle folder, or a hub repo id
    scores = scorer.score(["a.png", "b.png"])                  # DataFrame: path, quality[, alignment]

Images are scored in blocks of ``block_rows`` (whole batches), so memory does not grow with the input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.runs import RunError, TrainedRun

log = logging.getLogger(__name__)

# The image types scored from a folder: those PIL decodes that image datasets ship.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Provenance keys that describe the data or the run of stage 1, not the encoder.
RUN_KEYS = ("dataset", "manifest_hash", "batch_size", "code", "config")


class EncoderMismatch(RunError):
    """An encoder rebuilt here differs from the one the run's features were extracted with."""


def collect_inputs(source: Path) -> pd.DataFrame:
    """``path`` (and ``prompt`` when given) per image of INPUT: one image file, a folder (recursive,
    sorted) or a CSV with a ``path`` column (relative to the CSV's folder) and optional ``prompt``."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return pd.DataFrame({"path": [str(p) for p in files]})
    if source.suffix.lower() == ".csv":
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise ValueError(f"{source}: no 'path' column (columns: {list(table.columns)})")
        paths = [str(source.parent / p) for p in table["path"]]
        frame = pd.DataFrame({"path": paths})
        if "prompt" in table.columns:
            frame["prompt"] = table["prompt"].to_numpy()
        return frame
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    return pd.DataFrame({"path": [str(source)]})


def rebuild_encoder(name: str, provenance: dict[str, Any], device: str, image_tower: Path | None = None):
    """Encoder ``name`` as its store records it, checked: any setting or weights digest that differs
    is refused; other library versions than stage 1's are logged (features may move in the last bits)."""
    from pipeline.encoders import create_encoder

    config = provenance.get("config")
    if config is None:
        raise EncoderMismatch(
            f"the {name} store this run read records no encoder config (extracted by an older version): "
            "re-run `dvc repro` to extract and train again"
        )
    cfg = {**config["cfg"], **({"image_tower": image_tower} if image_tower is not None else {})}
    if "views" in cfg:  # the extra views are training augmentation: scoring reads the identity view alone
        cfg["views"] = ["identity"]
    cfg.pop("zeroshot", None)  # zero-shot scores are stage-1 outputs no head reads
    kind = provenance.get("encoder", name)  # the registered encoder: a head input names its role
    encoder = create_encoder(kind, cfg, provenance["profile"], device=device, dtype=config["dtype"])
    built = encoder.provenance()
    skip = (*RUN_KEYS, "views")
    diffs = {k: (provenance.get(k), v) for k, v in built.items() if k not in skip and provenance.get(k) != v}
    versions = {k: d for k, d in diffs.items() if k.endswith("_version")}
    for key, (then, now) in versions.items():
        log.warning("%s encoder: %s %s here, %s when its features were extracted", name, key, now, then)
    if refused := {k: d for k, d in diffs.items() if k not in versions}:
        listed = "; ".join(f"{k}: recorded {a!r}, rebuilt {b!r}" for k, (a, b) in refused.items())
        raise EncoderMismatch(
            f"the {name} encoder rebuilt here is not the one the run was trained on ({listed})"
        )
    return encoder


class _Images:
    """Decoded, preprocessed images for every encoder at once; a bad file is returned, not raised."""

    def __init__(self, images: Sequence, preprocess: dict[str, Any]):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, dict[str, Any] | None, str]:
        from PIL import Image

        from pipeline.data.images import load_rgb, to_rgb

        item = self.images[i]
        try:
            image = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(Path(item))
        except Exception as err:  # any decoder failure: an unusable image, reported by the caller
            return i, None, f"not a readable image ({type(err).__name__}: {err})"
        return i, {name: fn(image) for name, fn in self.preprocess.items()}, ""


def _collate(items: list) -> tuple[list[int], dict[str, Any], list[tuple[int, str]]]:
    import torch

    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    pixels = {name: torch.stack([x[name] for _, x in good]) for name in (good[0][1] if good else {})}
    return [i for i, _ in good], pixels, bad


@dataclass
class Scorer:
    """A trained run applied to images; ``split`` None averages every split's head (an ensemble)."""

    run: TrainedRun
    device: str = "auto"
    split: int | None = None
    batch_size: int | None = None
    num_workers: int = 0
    block_rows: int = 512
    source: str = ""
    _encoders: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.run.splits(self.split)  # refuse a split the run does not have before any work
        self.source = self.source or str(self.run.root)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, revision: str | None = None, **kwargs) -> Scorer:
        """A run folder, a bundle folder, or a Hugging Face Hub repo id of a bundle (downloaded into
        the hub cache, ``HF_HUB_OFFLINE=1`` honoured; ``revision`` a branch, tag or commit)."""
        local = Path(path_or_id)
        if local.is_dir():
            return cls(TrainedRun.load(local), source=str(local), **kwargs)
        from pipeline.encoders.common import CheckpointError, hub_snapshot

        try:
            folder, _ = hub_snapshot(str(path_or_id), revision)
        except CheckpointError as err:  # not a folder, not a repo id, or the hub cannot provide it offline
            raise FileNotFoundError(
                f"{path_or_id}: not a local run or bundle folder, and the Hugging Face Hub could not provide "
                f"it at revision {revision or 'main'} ({err})"
            ) from err
        source = f"{path_or_id}@{revision}" if revision else str(path_or_id)
        return cls(TrainedRun.load(folder), source=source, **kwargs)

    @property
    def description(self) -> str:
        heads = (
            f"split {self.split}" if self.split is not None else f"mean of {self.run.n_splits} split heads"
        )
        return f"{self.run.name} ({self.run.record['head']['name']}, {heads}) from {self.source}"

    def encoders(self) -> dict[str, Any]:
        """Every encoder the head reads, rebuilt once and checked against the run's record."""
        if not self._encoders:
            tower = None
            clip_spec = self.run.record["head"].get("clip_model") or {}
            if clip_spec.get("image_tower"):
                tower = self.run.resolve(clip_spec["image_tower"])
            for name in self.run.inputs:
                self._encoders[name] = rebuild_encoder(
                    name, self.run.record["stores"][name], self.device, tower if name == "clip" else None
                )
        return self._encoders

    def _batch_size(self) -> int:
        if self.batch_size:
            return self.batch_size
        return int(next(iter(self.run.record["stores"].values()))["batch_size"])

    def score(
        self,
        images: Sequence[str | Path | Any],
        prompts: Sequence[str] | str | None = None,
        on_bad_image: str = "error",
        progress: bool | None = None,
    ) -> pd.DataFrame:
        """One row per image: ``path`` (or the position of a PIL image), the head's outputs in the MOS
        units of its training data, and ``skipped`` (why) when ``on_bad_image='skip'`` dropped any."""
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        from pipeline.features import Features

        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
        images = list(images)
        names = [str(x) if isinstance(x, str | os.PathLike) else f"<image {i}>" for i, x in enumerate(images)]
        texts = self._prompts(prompts, len(images))
        vocabulary = sorted(set(texts)) if texts is not None else None
        predictor = self.run.predictor(self.split, vocabulary, self.device)
        encoders = self.encoders()
        missing = [
            n
            for n, x in zip(names, images, strict=True)
            if isinstance(x, str | os.PathLike) and not Path(x).is_file()
        ]
        if missing and on_bad_image == "error":
            raise FileNotFoundError(
                f"{len(missing)} image file(s) not found, e.g. {missing[:3]}; or score with on_bad_image=skip"
            )
        batch = self._batch_size()
        loader = DataLoader(
            _Images(images, {name: enc.preprocess for name, enc in encoders.items()}),
            batch_size=batch,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.startswith("cuda"),
        )
        scores = np.full((len(images), len(self.run.outputs)), np.nan, dtype=np.float32)
        skipped: dict[int, str] = {}
        block: list[tuple[list[int], dict[str, np.ndarray]]] = []

        def flush() -> None:
            rows = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in block])
            arrays = {name: np.concatenate([f[name] for _, f in block]) for name in encoders}
            extras = {}
            if vocabulary is not None:
                position = {t: j for j, t in enumerate(vocabulary)}
                extras["prompt_index"] = np.array([position[texts[r]] for r in rows], dtype=np.int64)
            scores[rows] = predictor(Features.in_memory(arrays, extras), np.arange(len(rows)))
            block.clear()

        with tqdm(
            total=len(images), desc="score", unit="img", disable=None if progress is None else not progress
        ) as bar:
            for index, pixels, bad in loader:
                for i, why in bad:
                    if on_bad_image == "error":
                        raise ValueError(f"{names[i]}: {why}; or score with on_bad_image=skip")
                    skipped[i] = why
                if index:
                    features = {name: enc.encode(pixels[name])["features"] for name, enc in encoders.items()}
                    block.append((index, features))
                if sum(len(i) for i, _ in block) >= self.block_rows:
                    flush()
                bar.update(len(index) + len(bad))
            if block:
                flush()
        frame = pd.DataFrame({"path": names})
        for j, output in enumerate(self.run.outputs):
            frame[output] = scores[:, j]
        if skipped:
            frame["skipped"] = [skipped.get(i, "") for i in range(len(images))]
        return frame

    def _prompts(self, prompts: Sequence[str] | str | None, n: int) -> list[str] | None:
        """Each image's prompt for a head that reads them (IP-IQA), else None (ignored)."""
        if not self.run.needs_prompts:
            return None
        if prompts is None:
            raise ValueError(
                f"{self.run.name} ({self.run.record['head']['name']}) reads each image's prompt: give a CSV "
                "with a 'prompt' column, or --prompt TEXT for every image (Python: score(..., prompts=...))"
            )
        texts = [prompts] * n if isinstance(prompts, str) else [str(p) for p in prompts]
        if len(texts) != n:
            raise ValueError(f"{len(texts)} prompts for {n} images")
        if blank := [i for i, t in enumerate(texts) if not t.strip()]:
            raise ValueError(f"blank prompt for image(s) at rows {blank[:5]}")
        return texts
