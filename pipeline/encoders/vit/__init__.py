"""timm ViT multi-layer token features: MANIQA's (and so MA-AGIQA's) input.

MA-AGIQA hooks every block of ``vit_base_patch8_224`` and keeps the raw outputs of blocks
6, 7, 8, 9 (0-based, no final norm), drops the CLS token and concatenates on channels:
(784 tokens, 4 x 768 = 3072). timm's ``forward_intermediates`` returns exactly those tensors.
The weights are the AugReg in21k->in1k fine-tune the original's vendored timm 0.5.5 loaded,
which current timm names ``augreg_in21k_ft_in1k`` (its default tag is another checkpoint).

The paper fine-tunes the ViT on rotated and flipped images; a frozen, cached ViT can only offer
those as precomputed views. ``views`` (params ``extract.vit.views``) lists them: ``features`` is
always the identity view and, when more are listed, the row dataset ``views`` holds the others
(in list order) as ``(V - 1, tokens, channels)``, for ``Features`` to draw from in training. A
view is a full forward pass of the transformed image (position embeddings make a rotated image's
tokens differ from rotated tokens). MA-AGIQA's "horizontal flip" is ``np.fliplr`` on a C x H x W
array, which flips rows: that is ``vflip`` here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import timm
import torch

from pipeline.encoders import register_encoder
from pipeline.encoders.common import resize_normalize, state_digest, torch_dtype

# Image transforms on (B, 3, H, W) pixels; rotations are counter-clockwise, as np.rot90 and PIL's rotate.
VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
    "rot180": lambda x: x.rot90(2, (-2, -1)),
    "rot270": lambda x: x.rot90(3, (-2, -1)),
}


def check_views(views: list[str]) -> list[str]:
    """``extract.vit.views``: distinct registered names, identity first (it is the ``features`` row)."""
    views = [str(v) for v in views]
    if unknown := [v for v in views if v not in VIEWS]:
        raise ValueError(f"extract.vit.views: unknown views {unknown}; known: {', '.join(VIEWS)}")
    if not views or views[0] != "identity" or len(set(views)) != len(views):
        raise ValueError(f"extract.vit.views must be distinct names starting with identity, got {views}")
    return views


@register_encoder("vit")
class ViTTokens:
    """Concatenated patch tokens of selected ViT blocks, per image (N_tokens, blocks x width)."""

    def __init__(self, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
        self.cfg, self.profile, self.device = cfg, profile, device
        self.dtype = torch_dtype(dtype)
        self.blocks = [int(b) for b in cfg["blocks"]]
        self.views = check_views(cfg.get("views", ["identity"]))
        if profile == "paper":
            name = f"{cfg['model']}.{cfg['pretrained']}" if cfg.get("pretrained") else cfg["model"]
            self.model = timm.create_model(
                name, pretrained=True, num_classes=0, img_size=int(cfg["img_size"])
            )
        else:
            torch.manual_seed(int(cfg["demo"]["seed"]))
            overrides = {k: v for k, v in cfg["demo"].items() if k != "seed"}
            self.model = timm.create_model(cfg["model"], pretrained=False, num_classes=0, **overrides)
        if max(self.blocks) >= len(self.model.blocks):
            raise ValueError(
                f"extract.vit.blocks {self.blocks} but the model has {len(self.model.blocks)} blocks"
            )
        self.weights_sha256 = state_digest(self.model.state_dict())
        self.model.eval().requires_grad_(False).to(device=device, dtype=self.dtype)
        data_cfg = self.model.pretrained_cfg
        self.size = int(self.model.patch_embed.img_size[0])
        self.mean, self.std = data_cfg.get("mean", (0.5, 0.5, 0.5)), data_cfg.get("std", (0.5, 0.5, 0.5))
        grid = self.size // self.model.patch_embed.patch_size[0]
        self.shape = (grid * grid, len(self.blocks) * self.model.embed_dim)

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder": "vit",
            "profile": self.profile,
            "model": self.cfg["model"],
            "pretrained": self.cfg.get("pretrained") if self.profile == "paper" else "random",
            "demo": self.cfg["demo"] if self.profile == "demo" else None,
            "weights_sha256": self.weights_sha256,
            "blocks": self.blocks,
            "views": self.views,
            "img_size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "timm_version": timm.__version__,
        }

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        schema = {"features": (self.shape, "float16")}
        if len(self.views) > 1:
            schema["views"] = ((len(self.views) - 1, *self.shape), "float16")
        return schema

    def preprocess(self, image) -> torch.Tensor:
        return resize_normalize(image, self.size, self.mean, self.std)

    @torch.inference_mode()
    def tokens(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, tokens, blocks x width) float16 for a batch of preprocessed pixels."""
        pixels = pixels.to(self.device, self.dtype)
        tokens = self.model.forward_intermediates(
            pixels, indices=self.blocks, norm=False, output_fmt="NLC", intermediates_only=True
        )
        return torch.cat(tokens, dim=-1).float().cpu().numpy().astype(np.float16)

    def encode(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        out = {"features": self.tokens(pixels)}
        if len(self.views) > 1:
            out["views"] = np.stack([self.tokens(VIEWS[v](pixels)) for v in self.views[1:]], axis=1)
        return out

    def extras(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}
