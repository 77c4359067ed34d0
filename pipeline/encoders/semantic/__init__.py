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
from pipeline.encoders.common import (
    DEFAULT_CACHE_DIR,
    VQASCORE_ANSWER,
    VQASCORE_QUESTION,
    named_prompts,
    single_token_ids,
    torch_dtype,
)

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
from .mplug_owl2.zeroshot import (
    QALIGN_PROMPTS,
    RATING_WEIGHTS,
    RATING_WORDS,
    VQASCORE_TEMPLATE,
    QAlignScorer,
    SharedPass,
    VQAScorer,
    qalign_prompt_ids,
    vqascore_prompt_ids,
)

ZEROSHOT = ("qalign", "vqascore")


@register_encoder("semantic")
class SemanticEncoder:
    def __init__(self, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
        compute_dtype = torch_dtype(dtype)
        self.prompt_names, self.prompts = named_prompts(cfg, "semantic")
        self.template = cfg.get("prompt_template", PROMPT_TEMPLATE)
        chats = [build_prompt(q, self.template) for q in self.prompts]  # refuse a bad template before loading
        self.pooling, self.hidden_layer = cfg.get("pooling", "mean"), int(cfg.get("hidden_layer", -1))
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"extract.semantic.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}"
            )
        self.profile, self.dtype = profile, dtype
        self.zeroshot = [str(z) for z in cfg.get("zeroshot") or []]
        if unknown := sorted(set(self.zeroshot) - set(ZEROSHOT)):
            raise ValueError(f"extract.semantic.zeroshot: unknown {unknown}; choose among {list(ZEROSHOT)}")
        self.qalign_prompt = cfg.get("qalign_prompt", "newline")
        if self.qalign_prompt not in QALIGN_PROMPTS:
            raise ValueError(f"extract.semantic.qalign_prompt must be one of {list(QALIGN_PROMPTS)}")

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

        model = load_model(directory, dtype=compute_dtype, device=device, lm_head=bool(self.zeroshot))
        self.tokenizer = tokenizer = load_tokenizer(directory)
        self.prompt_ids = [tokenize_prompt(chat, tokenizer) for chat in chats]
        self.extractor = SemanticExtractor(model, self.prompt_ids, self.pooling, self.hidden_layer)
        # The demo's byte-level tokenizer has no one-token words: one-letter stand-ins, recorded as such.
        self.rating_words = [w[0] for w in RATING_WORDS] if profile == "demo" else list(RATING_WORDS)
        self.yes_word = VQASCORE_ANSWER[0] if profile == "demo" else VQASCORE_ANSWER
        qalign = vqascore = None
        if "qalign" in self.zeroshot:
            word_ids = single_token_ids(tokenizer, self.rating_words)
            qalign = QAlignScorer(model, qalign_prompt_ids(tokenizer, self.qalign_prompt), word_ids)
        if "vqascore" in self.zeroshot:
            vqascore = VQAScorer(model, single_token_ids(tokenizer, [self.yes_word])[0])
        self.shared = SharedPass(self.extractor, qalign, vqascore)
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
            **(self._zeroshot_provenance() if self.zeroshot else {}),
        }

    def _zeroshot_provenance(self) -> dict[str, Any]:
        return {
            "zeroshot": self.zeroshot,
            "qalign_prompt": {self.qalign_prompt: QALIGN_PROMPTS[self.qalign_prompt]},
            "rating_words": self.rating_words,
            "rating_weights": list(RATING_WEIGHTS),
            "vqascore_template": VQASCORE_TEMPLATE.format(question=VQASCORE_QUESTION),
            "vqascore_answer": self.yes_word,
        }

    @property
    def reads_prompts(self) -> bool:
        """VQAScore asks about each image's own generation prompt: ``encode`` needs them."""
        return "vqascore" in self.zeroshot

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        schema = {"features": ((len(self.prompts), self.feature_dim), "float16")}  # as MA-AGIQA saves them
        if "qalign" in self.zeroshot:  # log-probabilities of the five rating words (float32: small gaps)
            schema["qalign"] = ((len(RATING_WORDS),), "float32")
        if "vqascore" in self.zeroshot:
            schema["vqascore"] = ((1,), "float32")
        return schema

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessor(image)

    def encode(self, pixels: torch.Tensor, prompts: list[str] | None = None) -> dict[str, np.ndarray]:
        """Features, and the zero-shot outputs asked for, from one vision pass; ``prompts``: each image's
        generation prompt (VQAScore)."""
        if not self.zeroshot:
            return {"features": self.extractor(pixels).cpu().numpy().astype(np.float16)}
        if self.reads_prompts and (prompts is None or len(prompts) != len(pixels)):
            raise ValueError("extract.semantic.zeroshot has vqascore: encode needs each image's prompt")
        asked = vqascore_prompt_ids(self.tokenizer, prompts) if self.reads_prompts else None
        out = self.shared(pixels, asked)
        arrays = {"features": out["features"].cpu().numpy().astype(np.float16)}
        if "qalign" in out:
            arrays["qalign"] = out["qalign"].float().cpu().numpy()
        if "vqascore" in out:
            arrays["vqascore"] = out["vqascore"].float().cpu().numpy().reshape(-1, 1)
        return arrays

    def extras(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}
