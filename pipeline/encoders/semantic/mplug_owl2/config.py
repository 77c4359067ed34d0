"""mPLUG-Owl2 configuration, read from and written to the original checkpoint's config.json format.

The defaults are the values of MAGAer13/mplug-owl2-llama2-7b (MPLUGOwl2Config() in the original code), so a
config.json that omits a key falls back to the released model, as the original does. Only the keys that
change the computation are kept; training-only and generic PretrainedConfig keys are ignored on read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "mplug_owl2"


class ConfigError(ValueError):
    """A config.json that is not a supported mPLUG-Owl2 configuration."""


@dataclass(frozen=True)
class VisionConfig:
    """ViT-L/14 vision tower (`visual_config.visual_model`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class AbstractorConfig:
    """Visual abstractor (`visual_config.visual_abstractor`): learned queries cross-attending to the ViT."""

    hidden_size: int = 1024
    encoder_hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    num_learnable_queries: int = 64
    layer_norm_eps: float = 1e-6
    grid_size: int = 32


@dataclass(frozen=True)
class MplugOwl2Config:
    """The modality-adaptive LLaMA-2 (top-level keys) plus the two visual sub-configs."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)

    def __post_init__(self) -> None:
        v, a = self.vision, self.abstractor
        checks = [
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size % num_attention_heads != 0"),
            (v.image_size % v.patch_size == 0, "visual_model: image_size % patch_size != 0"),
            (
                a.encoder_hidden_size == v.hidden_size,
                "visual_abstractor: encoder_hidden_size != vision width",
            ),
            (a.hidden_size == a.encoder_hidden_size, "visual_abstractor: hidden_size != encoder_hidden_size"),
            (a.grid_size == v.grid, "visual_abstractor: grid_size != image_size / patch_size"),
            (a.hidden_size % 4 == 0, "visual_abstractor: hidden_size must be a multiple of 4 (2-D sin-cos)"),
        ]
        failed = [msg for ok, msg in checks if not ok]
        if failed:
            raise ConfigError("; ".join(failed))

    @property
    def num_visual_tokens(self) -> int:
        """Tokens that replace the image placeholder: the learned queries plus the appended `vit_eos`."""
        return self.abstractor.num_learnable_queries + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> MplugOwl2Config:
        """Parse an original config.json dict; refuse other models and settings this port lacks."""
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        visual = d.get("visual_config") or {}
        vm, va = visual.get("visual_model") or {}, visual.get("visual_abstractor") or {}
        unsupported = {
            "hidden_act": (d.get("hidden_act", "silu"), "silu"),
            "rope_scaling": (d.get("rope_scaling"), None),
            "attention_bias": (d.get("attention_bias", False), False),
            "num_key_value_heads": (
                d.get("num_key_value_heads", d.get("num_attention_heads", 32)),
                d.get("num_attention_heads", 32),
            ),
            "visual_model.hidden_act": (vm.get("hidden_act", "quick_gelu"), "quick_gelu"),
            "visual_model.use_cls_token": (vm.get("use_cls_token", True), True),
            "visual_model.use_post_layernorm": (vm.get("use_post_layernorm", True), True),
            "visual_abstractor.use_cls_token": (va.get("use_cls_token", True), True),
            "visual_abstractor.add_v2t_pos_emb": (va.get("add_v2t_pos_emb", False), False),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ConfigError(f"{source}: {key}={got!r} is not supported (this port implements {want!r})")
        if va.get("grid_size") is None:  # the original treats a null grid_size as 32
            va = {**va, "grid_size": 32}
        try:
            vision, abstractor = (
                VisionConfig(**_pick(VisionConfig, vm)),
                AbstractorConfig(**_pick(AbstractorConfig, va)),
            )
            return cls(**_pick(cls, d), vision=vision, abstractor=abstractor)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> MplugOwl2Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; not an mPLUG-Owl2 checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The original config.json layout, so a saved checkpoint reads like a released one."""
        top = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("vision", "abstractor")}
        return {
            "architectures": ["MPLUGOwl2LlamaForCausalLM"],
            "model_type": MODEL_TYPE,
            **top,
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "rope_scaling": None,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "visual_config": {
                "visual_model": {
                    **dataclasses.asdict(self.vision),
                    "hidden_act": "quick_gelu",
                    "use_cls_token": True,
                    "use_post_layernorm": True,
                    "model_type": "mplug_owl_vision_model",
                },
                "visual_abstractor": {
                    **dataclasses.asdict(self.abstractor),
                    "use_cls_token": True,
                    "add_v2t_pos_emb": False,
                    "model_type": "mplug_owl_visual_abstract",
                },
            },
        }


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - {"vision", "abstractor"}
    return {k: v for k, v in d.items() if k in names}
