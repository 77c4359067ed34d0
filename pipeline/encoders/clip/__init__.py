"""open_clip features for IP-IQA: the image feature map before attention pooling, and text states.

IP-IQA replaces RN50's ``attnpool`` by Identity, runs the trunk at 512 px (grid 16 x 16) and
re-learns the pooling, so the cache holds layer4's map (2048 x 16 x 16). Text is frozen unless
the [QA] token is trained, so the cache also holds, per unique prompt, the token ids, the final
token states (after ``ln_final``), the end-of-text index and the projected EOT feature.
The demo profile uses ``RN50-tiny`` (model_configs/, the same ModifiedResNet and text tower).
With Image2Prompt (``pipeline/i2p.py``) the image tower is the adapted one: ``cfg["image_tower"]``
names its weights and the provenance records their sha256 (``i2p``, None when unadapted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file

from pipeline.encoders import register_encoder
from pipeline.encoders.common import resize_normalize, sha256_file, state_digest, torch_dtype

open_clip.add_model_config(Path(__file__).parent / "model_configs")


def build_clip_model(
    cfg: dict[str, Any], profile: str, image_tower: Path | str | None = None
) -> torch.nn.Module:
    """The frozen open_clip model of ``extract.clip``: pretrained (paper) or seeded random (demo).

    ``image_tower``: a ``model.visual`` state dict (safetensors, from Image2Prompt) loaded strictly
    over the image tower; the text tower stays as built.
    """
    if profile == "paper":
        model = open_clip.create_model(cfg["model"], pretrained=cfg["pretrained"])
    else:
        torch.manual_seed(int(cfg["demo"]["seed"]))
        model = open_clip.create_model(cfg["demo"]["model"], pretrained=None)
        _variance_preserving_trunk(model.visual)
    if image_tower is not None:
        try:
            model.visual.load_state_dict(load_file(image_tower), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{image_tower}: not an image tower of this clip model: {err}") from err
    return model.eval().requires_grad_(False)


def _variance_preserving_trunk(visual: torch.nn.Module) -> None:
    """He-initialise a random demo trunk so its features keep unit scale.

    open_clip zero-initialises each bottleneck's last BatchNorm (right for training from scratch),
    which makes a *frozen* random ResNet shrink activations ~1000x; the demo needs features a head
    can read. Only the demo profile calls this.
    """
    for module in visual.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)


@register_encoder("clip")
class ClipFeatures:
    """Per image: the trunk's last feature map (C, G, G). Per prompt: see ``extras``."""

    def __init__(self, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
        self.cfg, self.profile, self.device = cfg, profile, device
        self.dtype = torch_dtype(dtype)
        tower = cfg.get("image_tower")
        self.i2p = sha256_file(tower) if tower else None
        model = build_clip_model(cfg, profile, tower)
        self.weights_sha256 = state_digest(model.state_dict())
        self.model = model.to(device=device, dtype=self.dtype)
        self.arch = cfg["model"] if profile == "paper" else cfg["demo"]["model"]
        self.size = int(cfg["img_size"] if profile == "paper" else cfg["demo"]["img_size"])
        self.mean, self.std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.size, self.size, device=device, dtype=self.dtype)
            self.shape = tuple(self._feature_map(probe).shape[1:])

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder": "clip",
            "profile": self.profile,
            "model": self.arch,
            "pretrained": self.cfg["pretrained"] if self.profile == "paper" else "random",
            "demo": self.cfg["demo"] if self.profile == "demo" else None,
            "weights_sha256": self.weights_sha256,
            "img_size": self.size,
            "feature": "trunk layer4 map before attnpool",
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "open_clip_version": open_clip.__version__,
            "i2p": self.i2p,
        }

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"features": (self.shape, "float16")}

    def preprocess(self, image) -> torch.Tensor:
        return resize_normalize(image, self.size, self.mean, self.std)

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.visual.forward_intermediates(pixels, indices=[4], intermediates_only=True)
        return out["image_intermediates"][-1]

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        fmap = self._feature_map(pixels.to(self.device, self.dtype))
        return {"features": fmap.float().cpu().numpy().astype(np.float16)}

    @torch.inference_mode()
    def extras(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids, final token states, EOT index and projected EOT feature of each unique prompt."""
        tokens = open_clip.get_tokenizer(self.arch)(prompts).to(self.device)
        m = self.model
        x = m.token_embedding(tokens).to(self.dtype) + m.positional_embedding.to(self.dtype)
        states = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        eot = tokens.argmax(dim=-1)
        pooled = states[torch.arange(len(prompts), device=self.device), eot] @ m.text_projection
        return {
            "text_tokens": tokens.cpu().numpy().astype(np.int32),
            "text_states": states.float().cpu().numpy().astype(np.float16),
            "text_eot": eot.cpu().numpy().astype(np.int32),
            "text_features": pooled.float().cpu().numpy(),
        }
