"""mPLUG-Owl2 inputs as MA-AGIQA prepares them: square-padded CLIP pixels and the chat prompt's token ids."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, CLIPImageProcessorPil, PreTrainedConfig, PreTrainedTokenizerBase

from .model import IMAGE_TOKEN_INDEX

IMAGE_TOKEN = "<|image|>"
# The `mplug_owl2` conversation (TWO_NO_SYS: no system text) with the user message "<question>\n<|image|>" and
# an empty assistant turn renders to exactly this string.
PROMPT_TEMPLATE = "USER: {question}\n<|image|> ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def expand2square(image: Image.Image) -> Image.Image:
    """Pad to a square with the CLIP-mean colour (122, 116, 104), the image centred (offset rounded down)."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, tuple(int(255 * m) for m in CLIP_MEAN))
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


class ImagePreprocessor:
    """PIL image -> (3, R, R) float32: RGB, expand2square, bicubic resize, CLIP normalisation.

    Uses transformers' PIL-backend CLIP processor, which matches the original (transformers 4.31) bit for bit;
    the default torchvision-backend `CLIPImageProcessor` does not.
    """

    def __init__(self, resolution: int):
        self.resolution = resolution
        self.processor = CLIPImageProcessorPil(
            size={"shortest_edge": resolution},
            crop_size={"height": resolution, "width": resolution},
            resample=Image.Resampling.BICUBIC,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    def __call__(self, image: Image.Image) -> Tensor:
        return self.processor(expand2square(image.convert("RGB")), return_tensors="pt")["pixel_values"][0]


def build_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """Fill `template` (one `{question}` and one `<|image|>`) with a question."""
    for marker in ("{question}", IMAGE_TOKEN):
        if template.count(marker) != 1:
            raise ValueError(f"prompt template {template!r} must contain {marker!r} exactly once")
    if IMAGE_TOKEN in question:
        raise ValueError(f"prompt {question!r} must not contain the image placeholder {IMAGE_TOKEN!r}")
    return template.replace("{question}", question)


def tokenize_prompt(prompt: str, tokenizer) -> list[int]:
    """Token ids with IMAGE_TOKEN_INDEX where `<|image|>` stands, as the original `tokenizer_image_token`.

    Each text chunk is tokenized on its own (so each gets the tokenizer's BOS and sentencepiece's dummy
    prefix); when the first chunk starts with BOS, one BOS is kept at the front and every chunk drops its own.
    """
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    drop = 1 if chunks[0][:1] == [bos] and bos is not None else 0
    ids = chunks[0][:drop]
    for i, chunk in enumerate(chunks):
        ids += ([IMAGE_TOKEN_INDEX] if i else []) + list(chunk[drop:])
    return ids


class SentencePieceTokenizer:
    """LLaMA's `tokenizer.model` read with sentencepiece itself: [BOS] + `encode(text)` per call.

    This is what the original's slow `LlamaTokenizer` (transformers 4.31, legacy mode) returns. The
    transformers 5 LlamaTokenizer converts the model to a fast tokenizer that merges the dummy-prefix
    space of a chunk starting with a space (" ASSISTANT:" loses one id), so it cannot reproduce the
    original ids.
    """

    def __init__(self, model_file: Path, add_bos: bool = True):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id = self.processor.bos_id()
        self.add_bos = add_bos

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self.bos_token_id] * self.add_bos + self.processor.encode(text)}


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase | SentencePieceTokenizer:
    """The checkpoint's tokenizer: sentencepiece `tokenizer.model` (real LLaMA) or `tokenizer.json` (demo)."""
    has_json, has_spm = (directory / "tokenizer.json").exists(), (directory / "tokenizer.model").exists()
    if not (has_json or has_spm):
        raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model")
    if has_spm:
        config = directory / "tokenizer_config.json"
        add_bos = json.loads(config.read_text()).get("add_bos_token", True) if config.exists() else True
        return SentencePieceTokenizer(directory / "tokenizer.model", add_bos=add_bos)
    # The tokenizer files alone define the tokenizer; a blank config keeps transformers from parsing the
    # mplug_owl2 config.json, a model type it does not know.
    return AutoTokenizer.from_pretrained(str(directory), config=PreTrainedConfig())
