"""Trained runs: the folder a train stage writes, and the one way to apply its heads to features.

A run folder (``runs/<dataset>/<run>/``) or an exported bundle describes itself. Its record
(``run.json``; ``config.json`` in a bundle) holds:

- ``head``: the registered head name, its JSON builder config, the per-row input shapes, the
  outputs, the training prompts of a prompt-aware head, and the CLIP model its text side is built
  from (IP-IQA);
- ``stores``: the provenance of every feature store it read, which says how to rebuild each
  encoder (``config``) and which weights it ran (``weights_sha256`` or a pinned revision);
- ``splits``: per split the weights file (safetensors), its sha256, and the target ``offset`` and
  ``scale`` that training regressed against, so that ``output * scale + offset`` is in MOS units;
- what ``evaluate`` reads: protocol, its hash, selection mode, best epochs, recipe.

Weights are safetensors and the record is JSON: loading a run never unpickles or executes code.
``TrainedRun`` applies a run to features: ``score``, ``cross`` and ``export`` all go through it,
so a live score is computed exactly as the cached evaluation was. torch is imported where a head
is built, so that reading a record (``evaluate``) stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "agiqa-run/1"
RECORD_FILES = ("run.json", "config.json")  # a run folder's record, a bundle's record


class RunError(ValueError):
    """A run folder or bundle that is incomplete, of another format, or altered; names the file."""


def weights_file(k: int) -> str:
    return f"split{k}.safetensors"


def record_path(root: Path) -> Path:
    """The record of a run folder (run.json) or a bundle (config.json)."""
    for name in RECORD_FILES:
        if (root / name).is_file():
            return root / name
    raise RunError(
        f"{root} has no run.json or config.json: not a trained run folder or an exported bundle "
        "(run `dvc repro` for the train stage that writes it, or `agiqa export` a run)"
    )


def read_record(root: Path) -> dict[str, Any]:
    """The record of a run folder or bundle, checked for this format."""
    path = record_path(Path(root))
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise RunError(
            f"{path} has format {record.get('format')!r}, this version reads {FORMAT!r}: "
            "re-run the train stage that wrote it (`dvc repro`)"
        )
    return record


def save_weights(folder: Path, k: int, state: dict) -> dict[str, str]:
    """Write split ``k``'s weights as safetensors; returns its entry of the record's ``splits``."""
    from safetensors.torch import save_file

    from pipeline.encoders.common import sha256_file

    path = folder / weights_file(k)
    save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, str(path))
    return {"weights": path.name, "sha256": sha256_file(path)}


def split_entry(weights: dict[str, str], offset: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    """A split's record: weights and the float32 target offset and scale, exact through JSON."""
    return {
        **weights,
        "offset": [float(v) for v in np.asarray(offset, np.float32)],
        "scale": [float(v) for v in np.asarray(scale, np.float32)],
    }


def prediction_frame(
    manifest: pd.DataFrame, k: int, part: str, rows: np.ndarray, preds: dict[str, np.ndarray]
) -> pd.DataFrame:
    """The predictions.csv rows of split ``k``'s ``part``: image ids, and per output its target (the
    manifest's MOS) and prediction, for manifest ``rows``."""
    import pandas as pd

    from pipeline.train import TARGETS

    frame = pd.DataFrame({"split": k, "part": part, "image_id": manifest["image_id"].to_numpy()[rows]})
    for output, values in preds.items():
        frame[f"target_{output}"] = manifest[TARGETS[output]].to_numpy()[rows]
        frame[f"pred_{output}"] = values
    return frame


@dataclass
class TrainedRun:
    """A run folder or bundle, loaded: its heads, rebuilt and checked, applied to features."""

    root: Path
    record: dict[str, Any]

    @classmethod
    def load(cls, root: Path | str) -> TrainedRun:
        """Read the record and verify every weights file against the sha256 it records."""
        from pipeline.encoders.common import sha256_file

        root = Path(root)
        record = read_record(root)
        if not record["splits"]:
            raise RunError(f"{root} holds no trained heads (a {record.get('family')} run): nothing to apply")
        for k, split in enumerate(record["splits"]):
            path = root / split["weights"]
            if not path.is_file():
                raise RunError(f"{path} (split {k}'s weights) is missing from {root}")
            if sha256_file(path) != split["sha256"]:
                raise RunError(f"{path} differs from the sha256 its record holds: the weights were altered")
        return cls(root, record)

    @property
    def name(self) -> str:
        return f"{self.record['dataset']}/{self.record['run']}"

    @property
    def outputs(self) -> list[str]:
        return list(self.record["head"]["outputs"])

    @property
    def inputs(self) -> list[str]:
        """The feature stores (encoders) the head reads."""
        return list(self.record["head"]["input_shapes"])

    @property
    def n_splits(self) -> int:
        return len(self.record["splits"])

    @property
    def needs_prompts(self) -> bool:
        """Whether the head reads each image's prompt (IP-IQA's prompt stream)."""
        return self.record["head"].get("prompts") is not None

    @property
    def batch_size(self) -> int:
        """Predictions run in the recipe's batches, as training's evaluation did."""
        return int(self.record["recipe"]["batch_size"])

    def target_scale(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        split = self.record["splits"][k]
        return np.asarray(split["offset"], np.float32), np.asarray(split["scale"], np.float32)

    def resolve(self, path: str) -> Path:
        """A path the record names: relative to the run folder or bundle when there, else as written."""
        inside = self.root / path
        return inside if inside.exists() else Path(path)

    @cached_property
    def clip_model(self):
        """The CLIP model whose text tower a prompt-aware head runs (built once per run)."""
        spec = self.record["head"].get("clip_model")
        if spec is None:
            return None
        from pipeline.encoders.clip import build_clip_model
        from pipeline.encoders.common import sha256_file

        tower = None
        if spec.get("image_tower"):
            tower = self.resolve(spec["image_tower"])
            if not tower.is_file() or sha256_file(tower) != spec["image_tower_sha256"]:
                raise RunError(
                    f"{self.root}: the Image2Prompt image tower {tower} is missing or differs from the "
                    "sha256 the record holds"
                )
        return build_clip_model(spec["cfg"], spec["profile"], image_tower=tower)

    def head(self, k: int, prompts: list[str] | None = None, device: str = "cpu"):
        """Split ``k``'s head with its weights, in eval mode; ``prompts``: the prompt list that the
        batches' ``prompt_index`` indexes, when it is not the training one (see ``with_prompts``)."""
        from safetensors.torch import load_file

        from pipeline.heads import create_head

        spec = self.record["head"]
        kwargs = dict(spec["config"])
        if spec.get("clip_model") is not None:
            kwargs["clip_model"] = self.clip_model
        if spec.get("prompts") is not None:
            kwargs["prompts"] = spec["prompts"]
        shapes = {name: tuple(shape) for name, shape in spec["input_shapes"].items()}
        head = create_head(spec["name"], n_outputs=len(self.outputs), input_shapes=shapes, **kwargs)
        path = self.root / self.record["splits"][k]["weights"]
        try:
            head.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as err:
            raise RunError(
                f"{path} does not fit head {spec['name']!r} as its record builds it: {err}"
            ) from err
        if prompts is not None and list(prompts) != spec.get("prompts"):
            if not hasattr(head, "with_prompts"):
                raise RunError(f"head {spec['name']!r} reads no prompts")
            head.with_prompts(self.clip_model, list(prompts))
        return head.to(device).eval()

    def splits(self, split: int | None) -> list[int]:
        """``split`` alone, or every split (the ensemble) when None."""
        if split is None:
            return list(range(self.n_splits))
        if not 0 <= split < self.n_splits:
            raise RunError(f"{self.name} has splits 0..{self.n_splits - 1}, not {split}")
        return [split]

    def predictor(
        self, split: int | None = None, prompts: list[str] | None = None, device: str = "cpu"
    ) -> Predictor:
        """Split ``split``'s head, or every split's (their mean is an ensemble) when None, built once
        and applied to as many feature blocks as needed."""
        return Predictor(
            [(self.head(k, prompts, device), *self.target_scale(k)) for k in self.splits(split)],
            self.batch_size,
            device,
        )


@dataclass
class Predictor:
    """Built heads with their target scales: features in, MOS-unit predictions out."""

    heads: list[tuple[Any, np.ndarray, np.ndarray]]
    batch_size: int
    device: str

    def __call__(self, features, rows: np.ndarray) -> np.ndarray:
        """(rows x outputs) predictions on ``features`` (a ``pipeline.features.Features``), in MOS units:
        one head's, or the mean of every head's."""
        from pipeline.train import predict

        preds = [
            predict(head, features, rows, self.batch_size, self.device) * scale + offset
            for head, offset, scale in self.heads
        ]
        return preds[0] if len(preds) == 1 else np.mean(preds, axis=0, dtype=np.float64).astype(np.float32)
