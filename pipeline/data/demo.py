"""A synthetic AGIQA-like dataset, drawn from a seed, that a model can learn something from.

Each prompt names a coloured shape on a coloured background ("a small red circle on a gray
background"). Fake generators render it more or less solidly (the object's opacity scales the alignment
MOS), sometimes wrongly (another colour or shape, or no object at all: lower alignment MOS), and degrade
it at a known strength (blur, noise, JPEG, colour cast: lower quality MOS). Each
generator has its own favourite degradation, strength range and error rate, so per-generator results
differ as they do on real data. group = prompt, several images per prompt, so grouped splits matter.

Randomness comes from numpy's legacy RandomState, whose stream numpy keeps frozen across versions, so
one seed gives the same manifest everywhere and the same PNG bytes wherever Pillow's zlib and JPEG
codecs (used for the JPEG degradation) are the same.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.manifest import validate_manifest

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (235, 210, 40),
    "purple": (130, 50, 170),
    "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128), **COLOURS}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.2, "large": 0.36}  # shape radius as a fraction of the image side
DEGRADATIONS = ("blur", "noise", "jpeg", "cast")
# name: (favourite degradation, largest strength, chance of drawing the wrong content)
GENERATORS = {
    "pixelsmith": ("blur", 0.9, 0.10),
    "grainworks": ("noise", 1.0, 0.20),
    "blockdiff": ("jpeg", 0.8, 0.15),
    "tintgan": ("cast", 1.0, 0.30),
    "sharpshot": ("blur", 0.35, 0.05),
}
SUPERSAMPLE = 3
Content = tuple[str, str, str, str]  # (size word, colour, shape, background)


def _prompts(rs: np.random.RandomState, n: int) -> list[Content]:
    combos = [
        (size, colour, shape, bg)
        for size in SIZES
        for colour in COLOURS
        for shape in SHAPES
        for bg in BACKGROUNDS
        if bg != colour
    ]
    if n > len(combos):
        raise ValueError(f"the demo has {len(combos)} distinct prompts; n_prompts={n} is too many")
    return [combos[i] for i in sorted(rs.choice(len(combos), n, replace=False))]


def _draw(content: Content, size: int, presence: float, rs: np.random.RandomState) -> Image.Image:
    """Paint the shape, at opacity ``presence``, over a background with a soft vertical gradient; the
    shape's mask is drawn at SUPERSAMPLE x size and box-filtered down, which gives it anti-aliased edges."""
    shape_size, colour, shape, bg = content
    big = size * SUPERSAMPLE
    r = SIZES[shape_size] * big * rs.uniform(0.85, 1.15)
    cx, cy = rs.uniform(r + 2, big - r - 2, size=2)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)], fill=255)
    else:
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64)[..., None] / 255
    alpha *= 0.0 if shape == "none" else presence  # "none": the generator left the object out
    shade = np.linspace(-18, 18, size)[:, None, None] * rs.choice([-1, 1])
    # fine diagonal texture: the detail that blur and JPEG destroy, as real images have
    yy, xx = np.mgrid[0:size, 0:size]
    texture = 24 * np.sin(2 * np.pi * (xx + yy) / rs.uniform(3.0, 5.0) + rs.uniform(0, 2 * np.pi))[..., None]
    background = np.clip(np.array(BACKGROUNDS[bg], dtype=np.float64) + shade + texture, 0, 255)
    pixels = background * (1 - alpha) + np.array(COLOURS[colour], dtype=np.float64) * alpha
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def _degrade(image: Image.Image, kind: str, strength: float, rs: np.random.RandomState) -> Image.Image:
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=0.2 + 1.8 * strength))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=round(70 - 65 * strength))
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")
    pixels = np.asarray(image, dtype=np.float64)
    if kind == "noise":
        pixels = pixels + rs.normal(0.0, 3.0 + 45.0 * strength, size=pixels.shape)
    else:  # cast: wash towards a sepia tint and lose contrast, as over-stylised renders do
        grey = pixels.mean(axis=2, keepdims=True)
        pixels = (1 - strength) * pixels + strength * (0.6 * grey + np.array([70.0, 45.0, 10.0]))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _wrong(content: Content, rs: np.random.RandomState) -> tuple[Content, float]:
    """Content the generator draws instead of the prompt's, and the alignment MOS that goes with it."""
    shape_size, colour, shape, bg = content
    mistake = rs.choice(["colour", "shape", "both", "missing"])
    if mistake == "missing":
        return (shape_size, colour, "none", bg), 1.0
    if mistake in ("colour", "both"):
        colour = str(rs.choice([c for c in COLOURS if c not in (colour, bg)]))
    if mistake in ("shape", "both"):
        shape = str(rs.choice([s for s in SHAPES if s != shape]))
    return (shape_size, colour, shape, bg), {"colour": 2.6, "shape": 2.0, "both": 1.2}[mistake]


def generate_demo(
    root: Path, seed: int = 0, n_prompts: int = 60, images_per_prompt: int = 6, size: int = 112
) -> pd.DataFrame:
    """Write root/images/demo_NNNN.png and return their manifest (paths relative to root).

    variant = the degradation applied, for per-variant breakdowns. Earlier demo_*.png files in
    root/images are removed first, so the folder holds exactly this manifest's images.
    """
    rs = np.random.RandomState(seed)
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("demo_*.png"):
        old.unlink()
    names = list(GENERATORS)
    rows = []
    for p, content in enumerate(_prompts(rs, n_prompts)):
        shape_size, colour, shape, bg = content
        prompt = f"a {shape_size} {colour} {shape} on {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"
        for k in range(images_per_prompt):
            generator = names[(p + k) % len(names)]
            favourite, top, error_rate = GENERATORS[generator]
            kind = favourite if rs.uniform() < 0.7 else str(rs.choice(DEGRADATIONS))
            strength = rs.uniform(0.0, top)
            drawn, align = (content, 4.4) if rs.uniform() >= error_rate else _wrong(content, rs)
            presence = rs.uniform(0.25, 1.0)  # how solidly the object is rendered (1 = opaque)
            align = 1.0 + (align - 1.0) * presence
            image = _degrade(_draw(drawn, size, presence, rs), kind, strength, rs)
            image_id = f"demo_{len(rows):04d}"
            image.save(images / f"{image_id}.png")
            rows.append(
                {
                    "image_id": image_id,
                    "path": f"images/{image_id}.png",
                    "prompt": prompt,
                    "mos_quality": round(float(np.clip(4.6 - 3.4 * strength + rs.normal(0, 0.15), 0, 5)), 4),
                    "mos_align": round(float(np.clip(align + rs.normal(0, 0.2), 0, 5)), 4),
                    "group": prompt,
                    "generator": generator,
                    "variant": kind,
                }
            )
    manifest = pd.DataFrame(rows)
    manifest.index = pd.RangeIndex(2, len(manifest) + 2)
    return validate_manifest(manifest, f"demo (seed {seed})")
