"""A tiny random mPLUG-Owl2 and a byte-level tokenizer, saved in the real checkpoint layout.

The demo profile and the tests build this from a seed, write it like a released checkpoint (config.json,
one `.bin` shard per decoder layer, a tokenizer directory) and read it back through `load_model` and
`load_tokenizer`, so they exercise the same loading path as the 7B model. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipeline.encoders.common import publish_dir, state_digest

from .checkpoint import save_checkpoint
from .config import AbstractorConfig, MplugOwl2Config, VisionConfig
from .model import MplugOwl2

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in LLaMA

TINY_CONFIG = MplugOwl2Config(
    vocab_size=len(SPECIAL_TOKENS) + 256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    vision=VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112
    ),
    abstractor=AbstractorConfig(
        hidden_size=32,
        encoder_hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_learnable_queries=64,  # 65 visual tokens, as the real model
        grid_size=8,
    ),
)


def randomize_(model: MplugOwl2, seed: int, std: float = 0.05) -> MplugOwl2:
    """Norm weights 1 + 0.2·N(0,1), everything else std·N(0,1), in registration order.

    Norm weights away from 1 make the text and visual branches of each Multiway differ, so a routing bug
    changes the output (the default all-ones init would hide it).
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=device)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 and name.endswith("weight") else std * noise)
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic byte-level tokenizer (no merges): LLaMA's special ids, then one id per byte; adds BOS."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *symbols])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(seed: int, cfg: MplugOwl2Config = TINY_CONFIG) -> MplugOwl2:
    """The random tiny model, with an `lm_head` so a saved checkpoint has every key a released one has."""
    with torch.device("meta"):  # skip the default init: randomize_ overwrites every parameter
        model = MplugOwl2(cfg, lm_head=True)
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def ensure_tiny_checkpoint(cache_root: Path, seed: int) -> Path:
    """Write the tiny model and tokenizer under `cache_root` once; the folder name carries the weights' hash.

    The folder appears atomically (built aside, then renamed), so a crash never leaves a half-written one.
    """
    model = tiny_model(seed)
    digest = state_digest(model.state_dict())
    directory = Path(cache_root) / f"mplug-owl2-tiny-seed{seed}-{digest[:12]}"

    def write(folder: Path) -> None:
        save_checkpoint(model, folder)
        byte_tokenizer().save_pretrained(folder)

    return publish_dir(directory, write)
