"""Semantic extraction speed on tiny configs (CPU): batching in the transformers backend, and the shared
mPLUG-Owl2 pass that gives features and zero-shot scores from one vision pass.

1. ``vlm`` encoder (a tiny random model of ``--family``, the demo's): one batched ``encode`` of B images
   x 2 prompts per forward, against one call per image and prompt (encoders of one prompt each, batch 1).
   Target >= 1.8x; the features must agree (same rows).
2. ``semantic`` encoder (the demo's tiny mPLUG-Owl2): features + Q-Align log-probabilities + VQAScore P(yes)
   from ``SharedPass`` (vision once), against the three parts run separately (vision three times).
   Target >= 1.4x; the outputs must be equal.

Each timing is the best of ``--repeats`` after one warm-up, on the demo's 64 px images (``dvc repro``
draws them; run from the project root).

    python benchmarks/vlm_throughput.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from pipeline.encoders import create_encoder

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def images(n: int) -> list[Image.Image]:
    manifest = pd.read_csv(ROOT / "data/demo/manifest.csv", dtype=str).head(n)
    return [Image.open(ROOT / "data/raw/demo" / p).convert("RGB") for p in manifest["path"]]


def vlm_batching(cfg: dict, family: str, n: int, batch: int, repeats: int) -> dict:
    cfg = {**cfg, "zeroshot": [], "demo": {**cfg["demo"], "family": family}}  # features alone
    batched = create_encoder("vlm", cfg, "demo")
    single = [create_encoder("vlm", {**cfg, "prompts": [p]}, "demo") for p in cfg["prompts"]]
    pixels = torch.stack([batched.preprocess(im) for im in images(n)])

    def run_batched() -> np.ndarray:
        return np.concatenate([batched.encode(pixels[s : s + batch])["features"] for s in range(0, n, batch)])

    def run_single() -> np.ndarray:
        rows = [[enc.encode(pixels[i : i + 1])["features"][0, 0] for enc in single] for i in range(n)]
        return np.array(rows)

    gap = float(np.abs(run_batched().astype(np.float32) - run_single().astype(np.float32)).max())
    t_batched, t_single = best(run_batched, repeats), best(run_single, repeats)
    return {"batched_s": t_batched, "single_s": t_single, "ratio": t_single / t_batched, "max_gap": gap}


def shared_pass(cfg: dict, n: int, repeats: int, parts: tuple[str, ...]) -> dict:
    """``parts`` of the semantic encoder's outputs from one vision pass vs each part on its own."""
    from pipeline.encoders.semantic.mplug_owl2.zeroshot import SharedPass, vqascore_prompt_ids

    enc = create_encoder("semantic", {**cfg, "zeroshot": ["qalign", "vqascore"]}, "demo")
    manifest = pd.read_csv(ROOT / "data/demo/manifest.csv", dtype=str).head(n)
    pixels = torch.stack([enc.preprocess(im) for im in images(n)])
    asked = vqascore_prompt_ids(enc.tokenizer, manifest["prompt"].tolist()) if "vqascore" in parts else None
    full = enc.shared
    shared = SharedPass(*(getattr(full, name) if name in parts else None for name in PARTS))
    alone = {
        "extractor": lambda: full.extractor(pixels),
        "qalign": lambda: full.qalign(pixels),
        "vqascore": lambda: full.vqascore(pixels, asked),
    }

    def together() -> dict:
        return shared(pixels, asked)

    def apart() -> list:
        return [alone[name]() for name in parts]

    a, b = together(), apart()
    gap = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.values(), b, strict=True))
    t_together, t_apart = best(together, repeats), best(apart, repeats)
    return {"shared_s": t_together, "separate_s": t_apart, "ratio": t_apart / t_together, "max_gap": gap}


PARTS = ("extractor", "qalign", "vqascore")  # SharedPass's arguments, in order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    extract = params["extract"]
    v = vlm_batching(extract[params["vlms"][0]], args.family, args.images, args.batch, args.repeats)
    print(
        f"vlm ({args.family}, {args.images} images x 2 prompts): batched {v['batched_s']:.2f} s, "
        f"one call per image and prompt {v['single_s']:.2f} s: {v['ratio']:.2f}x (target 1.8), "
        f"max |gap| {v['max_gap']:.1e}"
    )
    for parts in (("extractor", "qalign"), PARTS):
        s = shared_pass(extract["semantic"], args.images, args.repeats, parts)
        print(
            f"{' + '.join(parts)} ({args.images} images): one vision pass {s['shared_s']:.3f} s, separate "
            f"passes {s['separate_s']:.3f} s: {s['ratio']:.2f}x (target 1.4), max |gap| {s['max_gap']:.1e}"
        )


if __name__ == "__main__":
    main()
