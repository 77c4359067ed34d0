"""Image2Prompt, IP-IQA's incremental pretraining of the CLIP image tower, run before extraction.

The image tower (RN50 trunk and ``attnpool``, whose projected output is CLIP's image embedding) is
fine-tuned so that ``encode_image(image)`` points where the frozen text tower puts the image's own
prompt: ``CosineEmbeddingLoss`` with target +1, as in the original's (unreleased) ``image2prompt``
task; the paper trained on DiffusionDB pairs whose CLIP similarity exceeds 0.35. The recipe and data
were not published, so everything here except the loss is ours:

- BatchNorm keeps its statistics (the tower runs in eval mode): batches are small and extraction runs
  in eval mode, so training optimises exactly the network that extraction then uses.
- Images get the extraction transform (whole-image bicubic resize, OpenAI mean/std) at the tower's
  native size (224 for RN50), where ``attnpool``'s position table fits; IP-IQA then runs the trunk at
  512 px and interpolates that table, as for the unadapted model.
- Shuffling and flips are drawn from (seed, epoch), so a run resumed from ``checkpoint`` (saved after
  every epoch) continues exactly as the uninterrupted run would have.

A finished run writes ``image_tower.safetensors`` (``model.visual``'s state dict) and ``i2p.json``
(config, pair counts, per-epoch loss, mean loss before and after, the weights' sha256); a disabled
one writes only ``i2p.json`` saying so. ``pipeline.encoders.common.adapted_tower`` reads either back.
The resume checkpoint is fingerprinted with the code that trains (``pipeline.provenance``) and loaded
with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.data import load_rgb
from pipeline.data.manifest import escapes_root
from pipeline.encoders.common import RECORD, resize_normalize, sha256_file
from pipeline.provenance import code_identity, set_aside

WEIGHTS = "image_tower.safetensors"


@dataclass
class I2PConfig:
    """Image2Prompt's settings (params.yaml ``i2p``); every field enters the resume fingerprint."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    accum_steps: int = 1
    min_similarity: float = 0.0
    hflip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("i2p: epochs, batch_size and accum_steps must be >= 1")
        if not 0.0 <= self.min_similarity < 1.0:
            raise ValueError(f"i2p.min_similarity must be in [0, 1), got {self.min_similarity}")


class PairImages(Dataset):
    """Image ``i`` preprocessed as extraction does, with its index (the loader's batches are index lists)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[i])
        return resize_normalize(
            image, self.size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        ), i


def read_pairs(csv: Path, images_root: Path | None = None) -> list[tuple[Path, str]]:
    """(image path, prompt) rows of a CSV with columns ``path,prompt``; paths relative to ``images_root``
    (default: the CSV's folder). Names the file and rows of missing columns, empty prompts, missing images."""
    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(f"i2p pairs file {csv} not found (a CSV with columns path,prompt)")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = {"path", "prompt"} - set(df.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)}; found {list(df.columns)}")
    root = Path(images_root) if images_root else csv.parent
    rows = df.index + 2  # the header is line 1
    escaping = df["path"].map(escapes_root)
    problems = (
        (df["prompt"].str.strip() == "", "empty prompt"),
        (df["path"] == "", "empty path"),
        (escaping, "path leaving the images folder (absolute or through ..)"),
    )
    for mask, what in problems:
        if mask.any():
            raise ValueError(f"{csv}: {what} in row(s) {rows[mask].tolist()[:5]}")
    paths = [root / p for p in df["path"]]
    absent = [f"row {r}: {p}" for r, p in zip(rows, paths, strict=True) if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{csv}: {len(absent)} image(s) not found, e.g. {absent[:5]}")
    return list(zip(paths, df["prompt"], strict=True))


def _image_size(visual: nn.Module) -> int:
    size = visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def _fingerprint(cfg: I2PConfig, pairs: list[tuple[Path, str]], visual: nn.Module, device: str) -> str:
    """Config, pairs, starting weights and code: a checkpoint made with other values is not resumed."""
    facts = [asdict(cfg), [[str(p), t] for p, t in pairs], code_identity(device)]
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    for name, tensor in visual.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _autocast(device: str):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slow and changes results)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


@torch.no_grad()
def _cosines(model, images, rows, prompt_of, targets, batch_size, device, num_workers) -> np.ndarray:
    """Cosine between each listed pair's image embedding and its prompt's text embedding."""
    out = np.zeros(len(images), dtype=np.float64)
    batches = [rows[i : i + batch_size].tolist() for i in range(0, len(rows), batch_size)]
    loader = DataLoader(images, batch_sampler=batches, num_workers=num_workers)
    for pixels, index in loader:
        with _autocast(device):
            emb = model.encode_image(pixels.to(device))
        cos = nn.functional.cosine_similarity(emb.float(), targets[prompt_of[index]], dim=-1)
        out[index.numpy()] = cos.cpu().numpy()
    return out[rows]


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume(checkpoint: Path | None, fingerprint: str) -> dict | None:
    """The checkpoint's state when it was made by exactly this run; otherwise set it aside, saying why."""
    if checkpoint is None or not checkpoint.exists():
        return None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        why = "made with another config, pair list, start model or code"
        if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
            return state
    except Exception as err:  # any unpickling failure means the same: not a checkpoint of ours
        why = f"unreadable as a weights-only checkpoint ({type(err).__name__}: {err})"
    set_aside(checkpoint, why)
    return None


def pretrain_image2prompt(
    model: nn.Module,
    pairs: list[tuple[Path, str]],
    cfg: I2PConfig,
    out_dir: Path,
    device: str = "cpu",
    checkpoint: Path | None = None,
    num_workers: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune ``model.visual`` in place on ``pairs`` and write its weights and record to ``out_dir``.

    ``model`` is an open_clip CLIP (text tower frozen throughout). ``checkpoint`` (outside any DVC
    output) is written after every epoch, resumed when its fingerprint matches and removed at the end.
    ``on_epoch(epochs_done, mean_train_loss)`` is called after each epoch. Returns the record.
    """
    if not pairs:
        raise ValueError("i2p: no (image, prompt) pairs to train on")
    prompts = sorted({prompt for _, prompt in pairs})
    number = {prompt: i for i, prompt in enumerate(prompts)}
    prompt_of = torch.tensor([number[prompt] for _, prompt in pairs])
    model = model.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        tokens = open_clip.tokenize(prompts, context_length=model.context_length).to(device)
        targets = torch.cat([model.encode_text(t) for t in tokens.split(256)]).float()
    images = PairImages([path for path, _ in pairs], _image_size(model.visual))
    every = np.arange(len(pairs))

    def cosines(rows: np.ndarray) -> np.ndarray:
        return _cosines(model, images, rows, prompt_of, targets, cfg.batch_size, device, num_workers)

    fingerprint = _fingerprint(cfg, pairs, model.visual, device)
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _resume(checkpoint, fingerprint)
    if state is None:
        start = cosines(every)
        kept = every[start > cfg.min_similarity] if cfg.min_similarity > 0 else every
        if not len(kept):
            raise ValueError(
                f"i2p: no pair has CLIP similarity above min_similarity {cfg.min_similarity} "
                f"(highest {start.max():.3f})"
            )
        state = {"kept": kept.tolist(), "loss_before": float(1 - start[kept].mean()), "losses": []}
    else:
        model.visual.load_state_dict(state["visual"])
        optimizer.load_state_dict(state["optimizer"])
    kept, losses = np.array(state["kept"], dtype=np.int64), state["losses"]

    criterion = nn.CosineEmbeddingLoss()
    model.visual.requires_grad_(True)
    for epoch in range(len(losses), cfg.epochs):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]))
        order = kept[torch.randperm(len(kept), generator=g).numpy()]
        flip = torch.rand(len(pairs), generator=g) < (0.5 if cfg.hflip else 0.0)
        batches = [order[i : i + cfg.batch_size].tolist() for i in range(0, len(order), cfg.batch_size)]
        loader = DataLoader(
            images, batch_sampler=batches, num_workers=num_workers, pin_memory=device.startswith("cuda")
        )
        total = 0.0
        for step, (pixels, index) in enumerate(tqdm(loader, desc=f"i2p epoch {epoch + 1}", leave=False)):
            pixels = torch.where(flip[index, None, None, None], pixels.flip(-1), pixels).to(device)
            with _autocast(device):
                emb = model.encode_image(pixels)
            ones = torch.ones(len(index), device=device)
            loss = criterion(emb.float(), targets[prompt_of[index]], ones)
            (loss / cfg.accum_steps).backward()
            if (step + 1) % cfg.accum_steps == 0 or step + 1 == len(batches):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(index)
        losses.append(total / len(kept))
        if checkpoint is not None:
            visual = {k: v.cpu() for k, v in model.visual.state_dict().items()}
            _save_atomic(
                {**state, "fingerprint": fingerprint, "visual": visual, "optimizer": optimizer.state_dict()},
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])
    model.visual.requires_grad_(False)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.visual.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    record = {
        "encoder": "clip",
        "enabled": True,
        "weights": WEIGHTS,
        "sha256": sha256_file(weights),
        "config": asdict(cfg),
        "image_size": images.size,
        "pairs": len(pairs),
        "pairs_kept": len(kept),
        "prompts": len(prompts),
        "loss_before": state["loss_before"],
        "loss_after": float(1 - cosines(kept).mean()),
        "train_loss": losses,
    }
    tmp = out_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / RECORD)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return record
