"""Tiny random VLMs of real transformers families with locally built processors, saved like hub checkpoints.

The demo profile and the tests build one from a family name and a seed with transformers' own config and
processor classes, write it with `save_pretrained` and load it back through `load_vlm`, the loader of hub
checkpoints, so they run the same code as a real model. Nothing is downloaded. The text side is a byte-level
tokenizer (one token per byte, so prompt lengths differ as much as their texts) plus each family's special
tokens, and a chat template shaped like the family's released one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlavaConfig,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from pipeline.encoders.common import publish_dir, state_digest

TEXT = {  # every family's language model: 2 layers, width 32, grouped-query attention
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def byte_tokenizer(specials: list[str], **roles: str) -> PreTrainedTokenizerFast:
    """Specials first (ids 0..), then one token per byte; `roles` names specials (bos_token="<s>", ...)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*specials, *symbols])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    return tokenizer


def _ids(tokenizer: PreTrainedTokenizerFast, **names: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in names.items()}


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen(config_cls: type[PretrainedConfig], vision: dict[str, Any]) -> Callable[[], tuple]:
    def build() -> tuple[PretrainedConfig, ProcessorMixin]:
        tok = byte_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        ids = _ids(
            tok,
            image_token_id="<|image_pad|>",
            video_token_id="<|video_pad|>",
            vision_start_token_id="<|vision_start|>",
            vision_end_token_id="<|vision_end|>",
        )
        text = TEXT | {
            "vocab_size": len(tok),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        config = config_cls(text_config=text, vision_config=vision, **ids)
        pixels = {"min_pixels": 28 * 28, "max_pixels": 112 * 112}
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixels),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(**pixels),
            chat_template=QWEN_TEMPLATE,
        )
        return config, processor

    return build


QWEN_VISION = {
    "depth": 2,
    "num_heads": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava() -> tuple[PretrainedConfig, ProcessorMixin]:
    tok = byte_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    text = TEXT | {"model_type": "llama", "vocab_size": len(tok), "bos_token_id": 1, "eos_token_id": 2}
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,  # the default feature layer is -2
        "num_attention_heads": 4,
        "image_size": 28,
        "patch_size": 14,
    }
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>")
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return config, processor


IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _idefics3() -> tuple[PretrainedConfig, ProcessorMixin]:
    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
        *tiles,
    ]
    tok = byte_tokenizer(
        specials, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<|end_of_text|>"
    )
    text = TEXT | {
        "model_type": "llama",
        "vocab_size": len(tok),
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 56,
        "patch_size": 14,
    }
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=1,
    )
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    return config, processor


FAMILIES: dict[str, Callable[[], tuple[PretrainedConfig, ProcessorMixin]]] = {
    "qwen2_vl": _qwen(Qwen2VLConfig, QWEN_VISION | {"embed_dim": 32, "hidden_size": 32}),
    "qwen2_5_vl": _qwen(
        Qwen2_5_VLConfig,
        QWEN_VISION
        | {
            "hidden_size": 32,
            "out_hidden_size": 32,
            "intermediate_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
    ),
    "llava": _llava,
    "idefics3": _idefics3,
}


def tiny_vlm(family: str, seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random model of `family` (a key of FAMILIES) from `seed`, in float32 eval mode, and its processor."""
    if family not in FAMILIES:
        raise ValueError(f"extract.<name>.demo.family must be one of {', '.join(FAMILIES)}; got {family!r}")
    config, processor = FAMILIES[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model.eval(), processor


def ensure_tiny_checkpoint(cache_root: Path, family: str, seed: int) -> Path:
    """Save the tiny model and processor under `cache_root` once; the folder name carries the weights' hash.

    The folder appears atomically (built aside, then renamed), so a crash never leaves a half-written one.
    """
    model, processor = tiny_vlm(family, seed)
    digest = state_digest(model.state_dict())
    directory = Path(cache_root) / f"vlm-tiny-{family}-seed{seed}-{digest[:12]}"

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return publish_dir(directory, write)
