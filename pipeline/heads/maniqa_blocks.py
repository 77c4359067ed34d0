"""MANIQA's building blocks over cached ViT tokens: transposed attention, its Swin stage, the branch.

Written from ``shared/references/ma-agiqa-head.md`` (sections 3-5). Submodule and parameter names
follow the original code inside each block (``c_q``, ``layers.0.blocks.1.attn.qkv``, ``fc_score.3``)
so that loading an original checkpoint only has to rename the top-level prefixes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn


class TAB(nn.Module):
    """Transposed attention block: attention among channels, each channel a vector over the N positions.

    The original ends by transposing the attended (B, C, N) tensor to (B, N, C) and *reshaping*
    (not transposing) it back to (B, C, N), which scrambles channels and positions when C != N.
    The fixture shows this matters (3.5e-2 on the score), so it is kept.
    """

    def __init__(self, n_tokens: int, drop: float = 0.1) -> None:
        super().__init__()
        self.c_q = nn.Linear(n_tokens, n_tokens)
        self.c_k = nn.Linear(n_tokens, n_tokens)
        self.c_v = nn.Linear(n_tokens, n_tokens)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        b, c, n = x.shape
        # SDPA's default scale 1/sqrt(last dim) is the original's 1/sqrt(N); attention is C x C.
        y = F.scaled_dot_product_attention(self.c_q(x), self.c_k(x), self.c_v(x))
        return x + self.drop(y.transpose(1, 2).reshape(b, c, n))


class SwinLayer(nn.Module):
    """Swin blocks (timm's, alternating shift 0 and window // 2), then conv3x3 + ReLU; (B, H, W, C) in/out.

    The caller wraps it in MANIQA's scaled residual ``x = scale * layer(x) + x``.
    """

    def __init__(
        self,
        dim: int,
        grid: int,
        depth: int,
        num_heads: int,
        window_size: int,
        dim_mlp: int,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution=(grid, grid),
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if j % 2 == 0 else window_size // 2,
                # timm sizes the MLP as int(dim * ratio); the +0.5 makes that exactly dim_mlp.
                mlp_ratio=(dim_mlp + 0.5) / dim,
                drop_path=drop_path[j],
            )
            for j in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return F.relu(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class SwinStage(nn.Module):
    """MANIQA's Swin variant: input dropout, layers with scaled residual, no patch merging; (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        grid: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        dim_mlp: int,
        scale: float,
        drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.drop = nn.Dropout(drop)
        self.layers = nn.ModuleList(
            SwinLayer(dim, grid, depth, heads, window_size, dim_mlp, rates[start : start + depth])
            for depth, heads, start in zip(depths, num_heads, starts, strict=True)
        )
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(x).permute(0, 2, 3, 1)
        for layer in self.layers:
            x = self.scale * layer(x) + x
        return x.permute(0, 3, 1, 2)


def _patch_head(dim: int, n_out: int, drop: float, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(drop), nn.Linear(dim, n_out), act)


SCORE_ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus}


class ManiqaBranch(nn.Module):
    """Float ViT tokens (B, N, C) -> per-patch score f >= 0 and weight 0 < w < 1, each (B, N, n_scores).

    TAB x num_tab -> 1x1 conv C->embed_dim -> Swin stage -> TAB x num_tab -> 1x1 conv to embed_dim // 2
    -> Swin stage -> fc_score and fc_weight (Sigmoid) per token. The token grid stays sqrt(N).

    ``score_act``: the last activation of fc_score. ``relu`` is the original's. Its single unit can be
    dead at initialisation (negative for every patch of every image), and then the branch gives
    f = 0 and no gradient, for good: a MA-AGIQA head trains on its semantic streams alone and nothing
    says so. ``softplus`` (also >= 0, never dead) avoids that. ``benchmarks/maniqa_init.py`` counts
    how often it happens.
    """

    def __init__(
        self,
        n_tokens: int,
        in_channels: int,
        n_scores: int = 1,
        embed_dim: int = 768,
        dim_mlp: int = 768,
        window_size: int = 4,
        depths: Sequence[int] = (2, 2),
        num_heads: Sequence[int] = (4, 4),
        num_tab: int = 2,
        scale: float = 0.8,
        drop: float = 0.1,
        drop_path: float = 0.1,
        score_act: str = "relu",
    ) -> None:
        super().__init__()
        if score_act not in SCORE_ACTIVATIONS:
            raise ValueError(f"score_act must be one of {sorted(SCORE_ACTIVATIONS)}; got {score_act!r}")
        grid = math.isqrt(n_tokens)
        if grid * grid != n_tokens or grid % window_size:
            raise ValueError(
                f"MANIQA needs a square token grid divisible by window_size={window_size}; "
                f"got N={n_tokens} tokens"
            )
        self.grid = grid
        half = embed_dim // 2
        stage = dict(
            grid=grid,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=window_size,
            dim_mlp=dim_mlp,
            scale=scale,
            drop=drop,
            drop_path=drop_path,
        )
        self.tab1 = nn.Sequential(*(TAB(n_tokens, drop) for _ in range(num_tab)))
        self.conv1 = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.swin1 = SwinStage(embed_dim, **stage)
        self.tab2 = nn.Sequential(*(TAB(n_tokens, drop) for _ in range(num_tab)))
        self.conv2 = nn.Conv2d(embed_dim, half, kernel_size=1)
        self.swin2 = SwinStage(half, **stage)
        self.fc_score = _patch_head(half, n_scores, drop, SCORE_ACTIVATIONS[score_act]())
        self.fc_weight = _patch_head(half, n_scores, drop, nn.Sigmoid())

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        b = tokens.shape[0]
        x = self.tab1(tokens.transpose(1, 2))
        x = self.swin1(self.conv1(x.reshape(b, -1, self.grid, self.grid)))
        x = self.tab2(x.flatten(2))
        x = self.swin2(self.conv2(x.reshape(b, -1, self.grid, self.grid)))
        x = x.flatten(2).transpose(1, 2)
        return self.fc_score(x), self.fc_weight(x)
