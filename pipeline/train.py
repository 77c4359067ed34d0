"""Train a head on cached features over every split of a protocol, selecting the epoch per split.

One loop for every head (nanoGPT spirit): the recipe (optimizer, lr, schedule, epochs, batch)
is data, the head is built by a factory, features come from ``Features`` (resident or streamed
within a memory budget). Per split it keeps the best epoch's weights and predictions, chosen on
the validation part (``select: val``) or, for comparison with papers that did so, on the test
part (``select: test_oracle``). The criterion is MA-AGIQA's and IP-IQA's: the sum of raw SRCC
and PLCC, over every output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from tqdm import tqdm

from pipeline.features import Features

TARGETS = {"quality": "mos_quality", "alignment": "mos_align"}


@dataclass
class Recipe:
    """A paper's optimisation settings (one per head family in params.yaml)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "constant"
    t_max: int = 50

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine_epoch", "cosine_step"):
            raise ValueError(f"schedule must be constant, cosine_epoch or cosine_step, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


@dataclass
class RunConfig:
    """The shared ``train`` section: what is not a paper's recipe.

    ``view_prob`` stands in for the papers' image augmentation on frozen, cached features: the
    probability that a training row is replaced by one of its store's cached views (see
    ``pipeline.features``). It does nothing for stores extracted without extra views.

    ``shuffle_labels`` makes a run its own chance-level control: the MOS of the train part and of
    the val part are each permuted (seeded) before training and epoch selection, the test part is
    scored against the true MOS. ``dvc exp run -S train.shuffle_labels=true`` then ``dvc metrics
    diff`` shows how far every run is above what it learns from no signal.
    """

    seed: int = 0
    device: str = "auto"  # device and memory_budget_gb come from params `runtime`: speed only
    memory_budget_gb: float = 4.0
    select: str = "val"
    target_norm: str = "minmax"
    view_prob: float = 0.5
    shuffle_labels: bool = False

    def __post_init__(self) -> None:
        if self.select not in ("val", "test_oracle"):
            raise ValueError(f"train.select must be val or test_oracle, got {self.select!r}")
        if self.target_norm not in ("minmax", "zscore", "none"):
            raise ValueError(f"train.target_norm must be minmax, zscore or none, got {self.target_norm!r}")
        if not 0.0 <= self.view_prob <= 1.0:
            raise ValueError(f"train.view_prob must be in [0, 1], got {self.view_prob}")

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclass
class SplitResult:
    """One split's selected head. ``offset`` and ``scale`` (per output, from the train part's MOS) map
    its outputs to MOS units: ``output * scale + offset``; a run keeps them to score new images."""

    best_epoch: int
    state: dict[str, torch.Tensor]
    predictions: pd.DataFrame
    curves: list[dict[str, float]] = field(default_factory=list)
    offset: np.ndarray | None = None
    scale: np.ndarray | None = None


def output_names(manifest: pd.DataFrame, outputs: str | list[str] = "auto") -> list[str]:
    """``quality`` always; ``alignment`` where every image has ``mos_align`` (AGIQA-3k, the demo)."""
    if outputs == "auto":
        return ["quality", "alignment"] if manifest["mos_align"].notna().all() else ["quality"]
    for name in outputs:
        if name not in TARGETS:
            raise ValueError(f"unknown output {name!r}; choose from {sorted(TARGETS)}")
        if manifest[TARGETS[name]].isna().any():
            raise ValueError(f"output {name!r} requested but {TARGETS[name]} has missing values")
    return list(outputs)


def _optimizer(head: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = head.param_groups(recipe.lr) if hasattr(head, "param_groups") else head.parameters()
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, recipe: Recipe):
    """cosine_step is MA-AGIQA's code: CosineAnnealingLR(T_max=50) stepped every batch."""
    if recipe.schedule == "cosine_epoch":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    if recipe.schedule == "cosine_step":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.t_max)
    return None


def _score(pred: np.ndarray, target: np.ndarray) -> float:
    """SRCC + raw PLCC summed over outputs; NaN (constant predictions) counts as worst."""
    total = 0.0
    for j in range(target.shape[1]):
        if np.std(pred[:, j]) == 0:
            return -math.inf
        total += (
            stats.spearmanr(pred[:, j], target[:, j]).statistic
            + stats.pearsonr(pred[:, j], target[:, j]).statistic
        )
    return float(total)


@torch.no_grad()
def predict(
    head: nn.Module, features: Features, rows: np.ndarray, batch_size: int, device: str
) -> np.ndarray:
    """Predictions aligned with ``rows`` (streamed reads come back in block order)."""
    head.eval()
    seen, out = [], []
    for batch_rows, batch in features.batches(rows, batch_size):
        seen.append(batch_rows)
        out.append(head(features.to(batch, device)).float().cpu().numpy())
    position = {row: i for i, row in enumerate(np.concatenate(seen))}
    return np.concatenate(out)[[position[r] for r in rows]]


def target_scale(train_targets: np.ndarray, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) per output from the train part's MOS: heads regress ``(mos - offset) / scale``
    and their outputs map back with ``* scale + offset`` (also for another dataset's images).

    minmax -> [0, 1] keeps targets non-negative, which MANIQA's ReLU score head requires;
    none regresses raw MOS as both papers do (few steps are then spent moving the bias to ~3).
    """
    if norm == "minmax":
        return train_targets.min(axis=0), np.ptp(train_targets, axis=0) + 1e-8
    if norm == "zscore":
        return train_targets.mean(axis=0), train_targets.std(axis=0) + 1e-8
    return np.zeros(train_targets.shape[1]), np.ones(train_targets.shape[1])


def shuffled_labels(
    targets: np.ndarray,
    parts: dict[str, np.ndarray],
    rng: np.random.Generator,
    shuffle: tuple[str, ...] = ("train", "val"),
) -> np.ndarray:
    """``targets`` with each listed part's rows permuted among themselves."""
    out = targets.copy()
    for part in shuffle:
        rows = parts[part]
        out[rows] = targets[rng.permutation(rows)]
    return out


class TrainingDiverged(RuntimeError):
    """A loss or a prediction became NaN or infinite; the message names run, split and epoch."""


def _check_finite(preds: dict[str, np.ndarray], parts, image_ids, where: str) -> None:
    for part, pred in preds.items():
        bad = ~np.isfinite(pred).all(axis=1)
        if bad.any():
            named = image_ids[parts[part][bad]][:5].tolist() if image_ids is not None else []
            raise TrainingDiverged(f"{where}: {int(bad.sum())} non-finite {part} predictions, images {named}")


def train_split(
    build: Callable[[], nn.Module],
    features: Features,
    targets: np.ndarray,
    parts: dict[str, np.ndarray],
    recipe: Recipe,
    run: RunConfig,
    split_seed: int,
    where: str = "split",
    image_ids: np.ndarray | None = None,
) -> SplitResult:
    """Train one head on ``parts['train']`` rows, select the epoch on val or test, keep its state.

    ``where`` ("dataset/run, split k") and ``image_ids`` name what failed when a loss or a prediction
    turns NaN or infinite (``TrainingDiverged``). An epoch whose selection score is NaN (constant
    predictions) is never selected over one with a finite score.
    """
    select_on = "val" if run.select == "val" else "test"
    if len(parts[select_on]) < 3:
        raise ValueError(
            f"select: {run.select} needs a '{select_on}' part of at least 3 images, "
            f"got {len(parts[select_on])}; "
            "use a protocol with a validation part (grouped_kfold, ma_agiqa_random) or select: test_oracle"
        )
    device = run.torch_device
    torch.manual_seed(split_seed)
    head = build().to(device)
    opt = _optimizer(head, recipe)
    sched = _scheduler(opt, recipe)
    rng = np.random.default_rng(split_seed)
    fit = shuffled_labels(targets, parts, rng) if run.shuffle_labels else targets
    mean, std = target_scale(fit[parts["train"]], run.target_norm)
    y = torch.tensor((fit - mean) / std, dtype=torch.float32)
    # The control selects its epoch on shuffled MOS too: on val, or (test_oracle) on the test part
    # permuted apart, so that no true MOS reaches it before it is scored.
    oracle = shuffled_labels(targets, parts, rng, ("test",)) if run.shuffle_labels else targets
    truth = {"val": fit, "test": oracle}
    best: SplitResult | None = None
    best_score = -math.inf
    curves = []
    for epoch in range(recipe.epochs):
        head.train()
        losses = []
        train_batches = features.batches(parts["train"], recipe.batch_size, rng=rng, view_prob=run.view_prob)
        for rows, batch in train_batches:
            pred = head(features.to(batch, device))
            loss = nn.functional.mse_loss(pred.float(), y[rows].to(device))
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"{where}, epoch {epoch}: training loss is {loss.item()}; lower the learning rate "
                    "or check the features for extreme values"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if recipe.schedule == "cosine_step":
                sched.step()
            losses.append(loss.item())
        if recipe.schedule == "cosine_epoch":
            sched.step()
        preds = {
            p: predict(head, features, parts[p], recipe.batch_size, device) * std + mean
            if len(parts[p])
            else np.zeros((0, targets.shape[1]))
            for p in ("val", "test")
        }
        _check_finite(preds, parts, image_ids, f"{where}, epoch {epoch}")
        scores = {p: _score(preds[p], truth[p][parts[p]]) if len(parts[p]) >= 3 else math.nan for p in preds}
        curves.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val_score": scores["val"],
                "test_score": scores["test"],
            }
        )
        score = scores[select_on] if math.isfinite(scores[select_on]) else -math.inf
        if best is None or score > best_score:
            best_score = score
            best = SplitResult(epoch, copy.deepcopy(head.state_dict()), _frame(preds, parts, targets))
    assert best is not None
    best.curves, best.offset, best.scale = curves, mean, std
    return best


def _frame(preds: dict[str, np.ndarray], parts: dict[str, np.ndarray], targets: np.ndarray) -> pd.DataFrame:
    frames = []
    for part, pred in preds.items():
        rows = parts[part]
        frame = pd.DataFrame({"part": part, "row": rows})
        for j in range(targets.shape[1]):
            frame[f"target_{j}"] = targets[rows, j]
            frame[f"pred_{j}"] = pred[:, j] if len(rows) else []
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def train_protocol(
    build: Callable[[], nn.Module],
    features: Features,
    manifest: pd.DataFrame,
    splits: list[dict[str, list[str]]],
    outputs: list[str],
    recipe: Recipe,
    run: RunConfig,
    progress: bool = True,
    label: str = "run",
) -> list[SplitResult]:
    """Train every split; predictions come back keyed by image_id with named outputs.

    ``label`` ("dataset/run") starts the message of a run that diverges.
    """
    index = pd.Series(np.arange(len(manifest)), index=manifest["image_id"])
    image_ids = manifest["image_id"].to_numpy()
    targets = manifest[[TARGETS[o] for o in outputs]].to_numpy(dtype=np.float32)
    results = []
    for k, split in enumerate(tqdm(splits, desc="splits", disable=not progress)):
        parts = {p: index.loc[split.get(p, [])].to_numpy() for p in ("train", "val", "test")}
        result = train_split(
            build, features, targets, parts, recipe, run, run.seed + k, f"{label}, split {k}", image_ids
        )
        frame = result.predictions
        frame.insert(0, "split", k)
        frame.insert(2, "image_id", manifest["image_id"].to_numpy()[frame.pop("row").to_numpy()])
        rename = {}
        for j, name in enumerate(outputs):
            rename[f"target_{j}"], rename[f"pred_{j}"] = f"target_{name}", f"pred_{name}"
        result.predictions = frame.rename(columns=rename)
        results.append(result)
    return results
