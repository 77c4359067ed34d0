"""Reading images as 8-bit RGB, and checking that every manifest row has a decodable image.

Every image is read the way a viewer shows it: EXIF orientation applied (a phone JPEG stored sideways
is seen upright), transparency composited onto white, 16-bit and CMYK converted. ``check_images``
records each file's sha256 in the manifest, so that a replaced image changes the manifest (and DVC
re-extracts it) and ``load_rgb(path, sha256)`` refuses bytes that changed since ``prepare``.
Images above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels) are
reported as bad rather than decoded. A 1 x 1 image is a valid image: the encoders resize every image.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline.data.labels import DATASET_GUIDES

BAD_COLUMNS = ("image_id", "path", "row", "reason")


class ImageChanged(ValueError):
    """An image's bytes differ from the sha256 that ``prepare`` recorded in the manifest."""


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    Transparent pixels are composited onto white (their stored colour is arbitrary, often black).
    16-bit grayscale is scaled to 8 bits (PIL's own conversion clips everything above 255 to white).
    Palette, 1-bit, grayscale and CMYK go through PIL's conversion (CMYK without colour management).
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _WIDE_GRAY_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, sha256: str | None = None) -> Image.Image:
    """Decode an image file as upright 8-bit RGB; every encoder uses this.

    With ``sha256`` (the manifest's), bytes that changed since ``prepare`` raise ``ImageChanged``.
    """
    data = Path(path).read_bytes()
    if sha256 is not None and (found := hashlib.sha256(data).hexdigest()) != sha256:
        raise ImageChanged(
            f"{path} changed since prepare (sha256 {found[:12]}..., the manifest has {sha256[:12]}...): "
            "run `dvc repro` so that prepare records it and its features are extracted again"
        )
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def _inspect(file: Path) -> tuple[str | None, str]:
    """(why ``file`` is not a usable image or None, sha256 of its bytes). Decodes it fully (JPEGs at 1/8
    scale, which still reads every byte of the stream), because only a full decode notices a truncated
    file; PIL's decompression-bomb warning counts as a failure."""
    if not file.exists():
        return "missing file", ""
    if not file.is_file():
        return "not a regular file", ""
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return "empty file", digest
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                ImageOps.exif_transpose(image)
    except Exception as err:  # any decoder failure means the same thing here: unusable image
        return f"not a readable image ({type(err).__name__}: {err})", digest
    return None, digest


def check_images(
    manifest: pd.DataFrame,
    root: Path,
    on_bad_image: str = "error",
    dataset: str | None = None,
    workers: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the manifest into rows whose image decodes (with their ``sha256``) and a `bad` table
    (image_id, path, row, reason).

    on_bad_image: "error" stops with every bad file listed (file, manifest row, reason); "skip" returns
    them in `bad` for the caller to write as an artifact. A root that does not exist, or in which not
    a single image is found, is always an error that says what layout is expected and, when `dataset`
    names a known dataset kind, where to get it. Files are decoded on `workers` threads (default: one
    per CPU; Pillow decodes without holding the GIL), as every image is decoded in full.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
    root = Path(root)
    guide = DATASET_GUIDES.get(dataset or "", "")
    example = root / manifest["path"].iloc[0] if len(manifest) else root
    layout = f"Expected each manifest path under the root, e.g. {example}. {guide}".strip()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset image folder {root} does not exist. {layout}")
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        inspected = list(pool.map(_inspect, [root / path for path in manifest["path"]]))
    reasons, digests = [r for r, _ in inspected], [d for _, d in inspected]
    is_bad = np.array([reason is not None for reason in reasons], dtype=bool)
    if len(manifest) and all(reason == "missing file" for reason in reasons):
        raise FileNotFoundError(f"none of the {len(manifest)} images was found under {root}. {layout}")
    bad = pd.DataFrame(
        {
            "image_id": manifest["image_id"].to_numpy()[is_bad],
            "path": manifest["path"].to_numpy()[is_bad],
            "row": manifest.index.to_numpy()[is_bad],
            "reason": [reason for reason in reasons if reason is not None],
        },
        columns=list(BAD_COLUMNS),
    )
    if len(bad) and on_bad_image == "error":
        listed = "\n".join(f"  {root / b.path} (row {b.row}): {b.reason}" for b in bad.head(10).itertuples())
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(
            f"{len(bad)} bad image(s) under {root}; fix them or set on_bad_image: skip\n{listed}{more}"
        )
    good = manifest.assign(sha256=digests)[~is_bad]
    return good, bad
