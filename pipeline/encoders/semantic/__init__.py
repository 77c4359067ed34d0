"""`semantic` encoder: MA-AGIQA's mPLUG-Owl2 features, one pooled LLM hidden state per prompt per image.

`cfg` is the `extract.semantic` params section: `checkpoint` (hub id or local directory), `revision`,
`prompts` (feature order: MA-AGIQA's names `semantic_content`, `coherence`, or any question
verbatim), `pooling`, `hidden_layer`, optional `prompt_template`, `demo: {seed, cache_dir}`.
The demo profile builds a tiny random model from the seed, saves it in the released checkpoint layout under
`demo.cache_dir` and loads it back through the same loader as the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.encoders import register_encoder
from pipeline.encoders.common import torch_dtype

from .mplug_owl2.checkpoint import load_model, resolve_checkpoint, weights_digest
from .mplug_owl2.extract import POOLINGS, SemanticExtractor
from .mplug_owl2.processing import (
    PROMPT_TEMPLATE,
    ImagePreprocessor,
    build_prompt,
    load_tokenizer,
    tokenize_prompt,
)
from .mplug_owl2.tiny import ensure_tiny_checkpoint

DEFAULT_CACHE_DIR = ".cache/agiqa"

# MA-AGIQA's two questions (getFeature.py), by the names its loader gives their features. A params
# entry that is one of these names stands for the question; any other string is asked verbatim.
MA_AGIQA_PROMPTS = {
    "semantic_content": "Evaluate the input image to determine if its quality is compromised due to a "
    "lack of meaningful semantic content.",
    "coherence": "Evaluate if the image quality is compromised due to violations of coherence.",
}


@register_encoder("semantic")
class SemanticEncoder:
    def __init__(self, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
        compute_dtype = torch_dtype(dtype)
        prompts = cfg.get("prompts")
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError("extract.semantic.prompts must be a non-empty list of non-empty strings")
        self.prompt_names = list(prompts)
        self.prompts = [MA_AGIQA_PROMPTS.get(p, p) for p in prompts]
        self.template = cfg.get("prompt_template", PROMPT_TEMPLATE)
        chats = [build_prompt(q, self.template) for q in self.prompts]  # refuse a bad template before loading
        self.pooling, self.hidden_layer = cfg.get("pooling", "mean"), int(cfg.get("hidden_layer", -1))
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"extract.semantic.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}"
            )
        self.profile, self.dtype = profile, dtype

        if profile == "demo":
            demo = cfg.get("demo") or {}
            seed = int(demo.get("seed", 0))
            directory = ensure_tiny_checkpoint(Path(demo.get("cache_dir", DEFAULT_CACHE_DIR)), seed)
            self.source = {
                "checkpoint": f"tiny-random-seed{seed}",
                "weights_sha256": weights_digest(directory),
            }
        else:
            if not cfg.get("checkpoint"):
                raise ValueError("extract.semantic.checkpoint is required (a hub id or a local directory)")
            directory, commit = resolve_checkpoint(cfg["checkpoint"], cfg.get("revision"))
            self.source = {"checkpoint": str(cfg["checkpoint"])}
            # A hub commit pins the weights; a local folder is identified by its content.
            self.source |= {"revision": commit} if commit else {"weights_sha256": weights_digest(directory)}

        model = load_model(directory, dtype=compute_dtype, device=device)
        tokenizer = load_tokenizer(directory)
        self.prompt_ids = [tokenize_prompt(chat, tokenizer) for chat in chats]
        self.extractor = SemanticExtractor(model, self.prompt_ids, self.pooling, self.hidden_layer)
        self.preprocessor = ImagePreprocessor(model.cfg.vision.image_size)
        self.feature_dim = model.cfg.hidden_size

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder": "semantic",
            "profile": self.profile,
            "model": "mplug-owl2",
            **self.source,
            "prompt_names": self.prompt_names,
            "prompts": self.prompts,
            "prompt_template": self.template,
            "prompt_token_ids": self.prompt_ids,
            "pooling": self.pooling,
            "hidden_layer": self.hidden_layer,
            "compute_dtype": self.dtype,
            "resolution": self.preprocessor.resolution,
            "preprocess": "expand2square(122,116,104)+clip-pil-bicubic",
            "feature_dim": self.feature_dim,
        }

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"features": ((len(self.prompts), self.feature_dim), "float16")}  # as MA-AGIQA saves them

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessor(image)

    def encode(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        return {"features": self.extractor(pixels).cpu().numpy().astype(np.float16)}

    def extras(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}
