"""Linear / MLP probe on pooled frozen features: the baseline papers report for any backbone."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads import register_head


def pool(x: torch.Tensor) -> torch.Tensor:
    """Mean and std over positions, concatenated: one vector per image from any cached layout.

    (B, N, C) ViT tokens pool over tokens, (B, C, H, W) CNN maps over space. The std carries the
    local-contrast statistics (noise, blur, blocking) that a mean washes out, as in classic IQA
    statistic pooling. (B, P, D) per-prompt vectors are also 3-D, so ``Probe`` flattens those.
    """
    tokens = x.flatten(2).transpose(1, 2) if x.ndim == 4 else x
    return torch.cat([tokens.mean(dim=1), tokens.std(dim=1)], dim=1)


class Probe(nn.Module):
    """pool -> BatchNorm (features standardised over the data, as a classic probe z-scores them)
    -> Linear (hidden=0) or Linear-GELU-Dropout-Linear."""

    def __init__(
        self,
        encoder: str,
        in_shape: tuple[int, ...],
        n_outputs: int,
        hidden: int,
        dropout: float,
        flatten: bool,
    ):
        super().__init__()
        self.inputs = (encoder,)
        self.flatten = flatten
        channels = in_shape[0] if len(in_shape) == 3 else in_shape[-1]
        dim = in_shape[0] * in_shape[1] if flatten else 2 * channels
        layers: list[nn.Module] = [nn.BatchNorm1d(dim, affine=False)]
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_outputs)]
        else:
            layers += [nn.Linear(dim, n_outputs)]
        self.net = nn.Sequential(*layers)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch[self.inputs[0]].float()
        x = x.flatten(1) if self.flatten else pool(x)
        return self.net(x)


@register_head("probe")
def probe(
    n_outputs: int,
    input_shapes: dict[str, tuple[int, ...]],
    encoder: str,
    per_prompt: bool = False,
    hidden: int = 256,
    dropout: float = 0.1,
) -> Probe:
    """Probe on one store; ``per_prompt`` stores (one vector per named prompt: mPLUG-Owl2, a VLM) are
    concatenated, not averaged."""
    if encoder not in input_shapes:
        raise KeyError(f"probe.encoder {encoder!r} has no features; available: {sorted(input_shapes)}")
    return Probe(encoder, input_shapes[encoder], n_outputs, hidden, dropout, flatten=per_prompt)
