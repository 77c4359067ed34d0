"""timm ViT multi-layer token features: MANIQA's (and so MA-AGIQA's) input.

MA-AGIQA hooks every block of ``vit_base_patch8_224`` and keeps the raw outputs of blocks
6, 7, 8, 9 (0-based, no final norm), drops the CLS token and concatenates on channels:
(784 tokens, 4 x 768 = 3072). timm's ``forward_intermediates`` returns exactly those tensors.
The weights are the AugReg in21k->in1k fine-tune the original's vendored timm 0.5.5 loaded,
which current timm names ``augreg_in21k_ft_in1k`` (its default tag is another checkpoint).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import timm
import torch

from pipeline.encoders import register_encoder
from pipeline.encoders.transforms import resize_normalize, torch_dtype


@register_encoder("vit")
class ViTTokens:
    """Concatenated patch tokens of selected ViT blocks, per image (N_tokens, blocks x width)."""

    def __init__(self, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
        self.cfg, self.profile, self.device = cfg, profile, device
        self.dtype = torch_dtype(dtype)
        self.blocks = [int(b) for b in cfg["blocks"]]
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
            "blocks": self.blocks,
            "img_size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "timm_version": timm.__version__,
        }

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"features": (self.shape, "float16")}

    def preprocess(self, image) -> torch.Tensor:
        return resize_normalize(image, self.size, self.mean, self.std)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        pixels = pixels.to(self.device, self.dtype)
        tokens = self.model.forward_intermediates(
            pixels, indices=self.blocks, norm=False, output_fmt="NLC", intermediates_only=True
        )
        return {"features": torch.cat(tokens, dim=-1).float().cpu().numpy().astype(np.float16)}

    def extras(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}
