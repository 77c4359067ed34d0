"""How often MANIQA's score unit is dead at initialisation, for each ``score_act``.

fc_score ends in one ReLU unit. When its input is negative for every patch of every image at
initialisation, the branch outputs f = 0 and passes no gradient: it never trains. This builds the
branch under seeds 0..N-1 and counts the seeds whose scores are all zero on a batch of features:
the demo's cached ViT store (``--store``), or Gaussian tokens of the paper's shape (``--paper``).

    python benchmarks/maniqa_init.py --store features/demo/vit.h5
    python benchmarks/maniqa_init.py --paper --seeds 10
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import h5py
import numpy as np
import torch
import typer

from pipeline.heads.maniqa_blocks import SCORE_ACTIVATIONS, ManiqaBranch
from pipeline.params import load

PAPER = dict(embed_dim=768, dim_mlp=768, window_size=4, depths=[2, 2], num_heads=[4, 4], num_tab=2)


def main(
    store: Annotated[Path, typer.Option(help="a ViT feature store")] = Path("features/demo/vit.h5"),
    paper: Annotated[bool, typer.Option(help="paper sizes on N(0, 1) tokens (28 x 28 x 3072)")] = False,
    seeds: int = 20,
    images: int = 16,
) -> None:
    torch.set_grad_enabled(False)
    if paper:
        tokens, cfg, where = torch.randn(images, 784, 3072), PAPER, "paper sizes, N(0, 1) tokens"
    else:
        with h5py.File(store) as f:
            tokens = torch.from_numpy(f["features"][:images].astype(np.float32))
        cfg = {k: v for k, v in load("ma_agiqa.maniqa")["ma_agiqa.maniqa"].items() if k != "score_act"}
        where = f"params.yaml ma_agiqa.maniqa sizes, {store}"
    typer.echo(f"{where}: {images} images, seeds 0..{seeds - 1}")
    for act in SCORE_ACTIVATIONS:
        dead = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            branch = ManiqaBranch(tokens.shape[1], tokens.shape[2], score_act=act, **cfg).eval()
            f, _ = branch(tokens)
            dead.append(bool((f == 0).all()))
        seeds_dead = np.flatnonzero(dead).tolist()
        typer.echo(f"score_act={act}: dead at init for {sum(dead)} of {seeds} seeds {seeds_dead}")


if __name__ == "__main__":
    typer.run(main)
