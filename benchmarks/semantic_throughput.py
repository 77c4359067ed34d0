"""Semantic-feature throughput: `SemanticExtractor` against the original's work pattern, in one run.

Reference style repeats MA-AGIQA's getFeature.py: for each prompt separately, batches of 8 images, and per
batch two full forwards (vision + abstractor + LLM each), one whose logits are thrown away and one for the
hidden states, then the mean over all positions. Ours: vision once per image, the prompt text before the
image cached, all prompts in one batched decoder forward, no lm_head. Same model, same images, same
prompt token layout as MA-AGIQA's two prompts; the features must agree (cosine >= 0.9999).

    python benchmarks/semantic_throughput.py                                   # CPU, small random config
    python benchmarks/semantic_throughput.py --size 7b --device cuda --images 256 [--our-batch 32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.encoders.semantic.mplug_owl2.config import AbstractorConfig, MplugOwl2Config, VisionConfig
from pipeline.encoders.semantic.mplug_owl2.extract import SemanticExtractor
from pipeline.encoders.semantic.mplug_owl2.model import IMAGE_TOKEN_INDEX, MplugOwl2
from pipeline.encoders.semantic.mplug_owl2.tiny import randomize_

# A scaled-down model with the real token geometry on the LLM side (65 visual tokens, MA-AGIQA's prompt
# lengths) and about the real split of work between the vision side and one decoder pass.
SMALL = MplugOwl2Config(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=4,
    vision=VisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224
    ),
    abstractor=AbstractorConfig(
        hidden_size=256,
        encoder_hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=704,
        grid_size=16,
    ),
)
SIZES = {"small": SMALL, "7b": MplugOwl2Config()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# MA-AGIQA's prompts tokenize to 31 and 36 ids with the image placeholder at index 24 and 29 (spec 3.3).
PROMPT_LAYOUT = ((24, 6), (29, 6))  # (ids before the placeholder, ids after it)


def build_model(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> MplugOwl2:
    """The `size` architecture with random weights (and an lm_head, which the reference style runs)."""
    return build_model_from_config(SIZES[size], device, dtype, seed)


def build_model_from_config(
    cfg: MplugOwl2Config, device: str, dtype: torch.dtype, seed: int = 0
) -> MplugOwl2:
    """`cfg` with random weights and an lm_head, allocated straight on `device` (meta, then `to_empty`)."""
    with torch.device("meta"):
        model = MplugOwl2(cfg, lm_head=True).to(dtype)
    if torch.device(device).type != "meta":
        # std 0.02 (transformers' initializer_range) keeps the 7B's attention from saturating in bf16
        model = randomize_(model.to_empty(device=device), seed, std=0.02)
    return model.requires_grad_(False).eval()


def random_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for before, after in PROMPT_LAYOUT:
        ids = torch.randint(3, vocab_size, (before + after,), generator=g).tolist()
        prompts.append([1, *ids[1:before], IMAGE_TOKEN_INDEX, *ids[before:]])
    return prompts


@torch.inference_mode()
def reference_features(
    model: MplugOwl2, prompts: list[list[int]], pixels: torch.Tensor, batch: int
) -> torch.Tensor:
    per_prompt = []
    for ids in prompts:
        rows = []
        for i in range(0, len(pixels), batch):
            images = pixels[i : i + batch]
            input_ids = torch.tensor(ids, device=images.device).expand(len(images), -1)
            model.lm_head(model(input_ids, images)[-1])  # the original's first call: logits, never used
            rows.append(model(input_ids, images)[-1].mean(dim=1).float())
        per_prompt.append(torch.cat(rows))
    return torch.stack(per_prompt, dim=1)


def our_features(
    model: MplugOwl2, prompts: list[list[int]], pixels: torch.Tensor, batch: int
) -> torch.Tensor:
    extractor = SemanticExtractor(model, prompts)  # includes the one-off prompt-prefix pass
    return torch.cat([extractor(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on GPU"
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="reference-style batch size (the original's 8)")
    parser.add_argument("--our-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("float32" if args.device == "cpu" else "bfloat16")]

    model = build_model(args.size, args.device, dtype)
    cfg = model.cfg
    prompts = random_prompts(cfg.vocab_size)
    g = torch.Generator().manual_seed(1)
    res = cfg.vision.image_size
    pixels = torch.randn(args.images, 3, res, res, generator=g).to(args.device, dtype)

    reference_features(model, prompts, pixels[: args.batch], args.batch)  # warm-up
    our_features(model, prompts, pixels[: args.our_batch], args.our_batch)
    ref, t_ref = timed(lambda: reference_features(model, prompts, pixels, args.batch), args.device)
    ours, t_ours = timed(lambda: our_features(model, prompts, pixels, args.our_batch), args.device)

    cosine = F.cosine_similarity(ours.float(), ref, dim=-1).min().item()
    n = args.images
    print(
        f"size={args.size} device={args.device} dtype={str(dtype).removeprefix('torch.')} "
        f"threads={torch.get_num_threads()} images={n} prompts={len(prompts)} "
        f"vision_tokens={cfg.vision.grid**2 + 1} llm={cfg.num_hidden_layers}x{cfg.hidden_size}"
    )
    print(f"reference-style (batch {args.batch}): {t_ref:8.2f} s  {n / t_ref:8.2f} images/s")
    print(f"ours            (batch {args.our_batch}): {t_ours:8.2f} s  {n / t_ours:8.2f} images/s")
    print(
        f"speed-up: {t_ref / t_ours:.2f}x   min cosine: {cosine:.6f}   "
        f"max abs diff: {(ours - ref).abs().max():.2e}"
    )
    if cosine < 0.9999:
        raise SystemExit(f"features disagree: min cosine {cosine:.6f} < 0.9999")


if __name__ == "__main__":
    main()
