"""`vlm` encoder: any transformers image-text-to-text model, one pooled LLM hidden state per prompt per image.

`cfg` is a `vlms` entry's params section, `extract.<name>`: `checkpoint` (hub id or local folder),
`revision`, `prompts` (feature order: MA-AGIQA's names `semantic_content`, `coherence`, or any question
verbatim), `pooling` (`mean` | `last` | `mean_visual` | `mean_text`, as the `semantic` encoder),
`hidden_layer` (indexes `output_hidden_states`: 0 = embeddings, -1 = the final-normed last layer),
`max_side` (default 1024),
`demo: {family, seed, cache_dir}`. The demo profile builds a tiny random model of `demo.family` (see
`tiny.FAMILIES`), saves it with `save_pretrained` under `demo.cache_dir` and loads it back through the loader
of hub checkpoints.

Each prompt is the user turn "<image> question" rendered by the processor's own chat template with the
generation prompt; the rendered texts go into the provenance.

Images travel from the DataLoader workers as a fixed-shape uint8 RGBA canvas (4, max_side, max_side): the RGB
image at the top left, alpha 255 over it and 0 over the padding. VLM processors need the original pixels
(Qwen keeps the aspect ratio, LLaVA-OneVision and Idefics3 tile by size) and mixed-size images cannot be
stacked, while a fixed shape keeps the extract stage's default collate; `encode` cuts each image back out
exactly by its alpha. Only an image whose longer side exceeds `max_side` is resized (bicubic, aspect kept).

`encode` sends every (image, prompt) pair of a batch through ONE forward of the base model (no `lm_head`),
with everything the processor returns (Qwen's `mm_token_type_ids` and `image_grid_thw`, Idefics3's
`pixel_attention_mask`, ...). The processor runs the image transform once per pair: processed pixels have
family-specific layouts (Qwen's flattened patches, tiles), so repeating them per prompt would need per-family
code, and the transform costs little beside the forward. Rows are right-padded and pooled with the
attention mask, so a padded row gives what the pair gives alone. Image positions are the tokens equal to the
processor's image token id; `mean_text` pools every other real token (template and image-wrapper tokens
included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch import Tensor

from pipeline.encoders import register_encoder
from pipeline.encoders.common import (
    DEFAULT_CACHE_DIR,
    VQASCORE_ANSWER,
    VQASCORE_QUESTION,
    OomBackoff,
    named_prompts,
    single_token_ids,
    torch_dtype,
)

from .loading import load_vlm
from .tiny import ensure_tiny_checkpoint

# pooling -> the positions it averages (`last`: the last real token, the one that would be generated from)
POOLED_POSITIONS = {"mean": "all", "last": "last", "mean_visual": "image", "mean_text": "text"}
POOLINGS = tuple(POOLED_POSITIONS)
DEFAULT_MAX_SIDE = 1024


def to_canvas(image: Image.Image, side: int) -> Tensor:
    """RGB image -> uint8 (4, side, side): the image top left, alpha 255 over it; shrunk only if larger."""
    image = image.convert("RGB")
    w, h = image.size
    if max(w, h) > side:
        scale = side / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
    canvas = torch.zeros(4, side, side, dtype=torch.uint8)
    canvas[:3, :h, :w] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    canvas[3, :h, :w] = 255
    return canvas


def from_canvas(canvas: Tensor) -> Image.Image:
    """The exact RGB image `to_canvas` packed."""
    alpha = canvas[3] > 0
    h, w = int(alpha[:, 0].sum()), int(alpha[0].sum())
    return Image.fromarray(canvas[:3, :h, :w].permute(1, 2, 0).cpu().numpy())


def pool(h: Tensor, mask: Tensor, visual: Tensor, pooling: str) -> Tensor:
    """(rows, L, C) states -> (rows, C): `mask` marks real tokens, `visual` image tokens; any padding side."""
    if pooling == "last":
        index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return h[torch.arange(len(h), device=h.device), index.masked_fill(~mask, -1).amax(1)]
    keep = {"mean": mask, "mean_visual": mask & visual, "mean_text": mask & ~visual}[pooling]
    count = keep.sum(1, keepdim=True)
    if bool((count == 0).any()):
        raise ValueError(f"pooling {pooling!r}: a row has no such positions")
    return (h * keep[..., None]).sum(1) / count


@register_encoder("vlm")
class VlmEncoder(OomBackoff):
    def __init__(self, cfg: dict[str, Any], profile: str, device: str = "cpu", dtype: str = "float32"):
        compute_dtype = torch_dtype(dtype)
        self.prompt_names, self.prompts = named_prompts(cfg, "<name>")
        self.pooling, self.hidden_layer = cfg.get("pooling", "mean"), int(cfg.get("hidden_layer", -1))
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"extract.<name>.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}"
            )
        self.max_side = int(cfg.get("max_side", DEFAULT_MAX_SIDE))
        if self.max_side < 1:
            raise ValueError(
                f"extract.<name>.max_side must be a positive number of pixels; got {self.max_side}"
            )
        self.profile, self.dtype = profile, dtype

        if profile == "demo":
            demo = cfg.get("demo") or {}
            family, seed = demo.get("family", "qwen2_vl"), int(demo.get("seed", 0))
            folder = ensure_tiny_checkpoint(Path(demo.get("cache_dir", DEFAULT_CACHE_DIR)), family, seed)
            self.model, self.processor, self.source = load_vlm(folder, None, compute_dtype, device)
            # Named by what built it, not by the cache path, so that stores match across machines.
            self.source["checkpoint"] = f"tiny-random-{family}-seed{seed}"
        else:
            if not cfg.get("checkpoint"):
                raise ValueError("extract.<name>.checkpoint is required (a hub id or a local folder)")
            checkpoint, revision = cfg["checkpoint"], cfg.get("revision")
            self.model, self.processor, self.source = load_vlm(checkpoint, revision, compute_dtype, device)
        self.device, self.compute_dtype = device, compute_dtype

        text_config = self.model.config.get_text_config()
        n = text_config.num_hidden_layers
        if not -(n + 1) <= self.hidden_layer <= n:
            raise ValueError(
                f"extract.<name>.hidden_layer {self.hidden_layer} out of range for {n + 1} hidden states"
            )
        self.feature_dim = text_config.hidden_size
        self.image_token = getattr(self.processor, "image_token", None)
        self.image_token_id = getattr(self.processor, "image_token_id", None)
        config = self.model.config
        placed = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        if self.image_token is None or self.image_token_id != placed:
            # The model puts image features where input_ids == its id: pooling must see the same positions.
            raise ValueError(
                f"{type(self.processor).__name__}'s image token {self.image_token!r} "
                f"(id {self.image_token_id}) is not the model's image token id {placed}"
            )
        self.texts = [self._render(q) for q in self.prompts]
        self.zeroshot = [str(z) for z in cfg.get("zeroshot") or []]
        if self.zeroshot not in ([], ["vqascore"]):
            raise ValueError(f"extract.<name>.zeroshot: only vqascore is offered, got {self.zeroshot}")
        # The demo's byte-level tokenizers have no one-token words: a one-letter stand-in, recorded as such.
        self.yes_word = VQASCORE_ANSWER[0] if profile == "demo" else VQASCORE_ANSWER
        if self.zeroshot:
            self.yes_id = single_token_ids(self.processor.tokenizer, [self.yes_word])[0]

    def _render(self, question: str) -> str:
        """The processor's chat template: one user turn, image then question, and the generation prompt."""
        if self.image_token in question:
            raise ValueError(f"extract.<name>.prompts: {question!r} must not contain {self.image_token!r}")
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        if text.count(self.image_token) != 1:
            raise ValueError(f"the chat template rendered {text!r}: expected one {self.image_token!r}")
        return text

    def provenance(self) -> dict[str, Any]:
        return {
            "encoder": "vlm",
            "profile": self.profile,
            "model_type": self.model.config.model_type,
            "model_class": type(self.model).__name__,
            **self.source,
            "transformers": transformers.__version__,
            "prompt_names": self.prompt_names,
            "prompts": self.prompts,
            "rendered_prompts": self.texts,
            # The weights digest or commit does not cover a local folder's tokenizer and image processor.
            "prompt_token_ids": [self.processor.tokenizer(t)["input_ids"] for t in self.texts],
            "image_processor": json.loads(self.processor.image_processor.to_json_string()),
            "pooling": self.pooling,
            "pooled_positions": POOLED_POSITIONS[self.pooling],
            "image_token": self.image_token,
            "padding_side": self.processor.tokenizer.padding_side,
            "hidden_layer": self.hidden_layer,
            "compute_dtype": self.dtype,
            "max_side": self.max_side,
            "preprocess": "rgb; longer side > max_side: bicubic downscale to max_side; then the processor",
            "feature_dim": self.feature_dim,
            **(
                {
                    "zeroshot": self.zeroshot,
                    "vqascore_question": VQASCORE_QUESTION,
                    "vqascore_answer": self.yes_word,
                }
                if self.zeroshot
                else {}
            ),
        }

    @property
    def reads_prompts(self) -> bool:
        """VQAScore asks about each image's own generation prompt: ``encode`` needs them."""
        return bool(self.zeroshot)

    def schema(self) -> dict[str, tuple[tuple[int, ...], str]]:
        schema = {"features": ((len(self.prompts), self.feature_dim), "float16")}
        if self.zeroshot:
            schema["vqascore"] = ((1,), "float32")
        return schema

    def preprocess(self, image: Image.Image) -> Tensor:
        return to_canvas(image, self.max_side)

    def encode(self, pixels: Tensor, prompts: list[str] | None = None) -> dict[str, np.ndarray]:
        images = [from_canvas(canvas) for canvas in pixels]
        out = {"features": self.features(images).cpu().numpy().astype(np.float16)}
        if self.zeroshot:
            if prompts is None or len(prompts) != len(images):
                raise ValueError("extract.<name>.zeroshot has vqascore: encode needs each image's prompt")
            out["vqascore"] = self.vqascore(images, prompts).cpu().numpy().reshape(-1, 1)
        return out

    @torch.inference_mode()
    def vqascore(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        """VQAScore: P(yes) from a softmax over the vocabulary after "Does this figure show "<prompt>"? ...",
        at each row's last real token (right padding), one forward for the batch."""
        texts = [self._render(VQASCORE_QUESTION.format(p)) for p in prompts]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(
            self.device, dtype=self.compute_dtype
        )
        states = self.model.base_model(**inputs).last_hidden_state
        last = inputs["attention_mask"].sum(1) - 1
        logits = self.model.get_output_embeddings()(states[torch.arange(len(texts)), last])
        return logits.float().softmax(-1)[:, self.yes_id]

    def extras(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {}

    @torch.inference_mode()
    def features(self, images: list[Image.Image]) -> Tensor:
        """(B, n_prompts, hidden) float32 features; after an out-of-memory error, fewer images per forward."""
        return torch.cat(self._chunks(len(images), lambda s: self._forward(images[s])))

    def _forward(self, images: list[Image.Image]) -> Tensor:
        p = len(self.texts)
        inputs = self.processor(
            text=self.texts * len(images),  # image-major: row r is image r // p with prompt r % p
            images=[image for image in images for _ in range(p)],
            padding=True,
            return_tensors="pt",
        ).to(self.device, dtype=self.compute_dtype)  # casts floating tensors only
        states = self.model.base_model(**inputs, output_hidden_states=True).hidden_states[self.hidden_layer]
        mask = inputs["attention_mask"].bool()
        visual = inputs["input_ids"] == self.image_token_id
        return pool(states.float(), mask, visual, self.pooling).view(len(images), p, -1)
