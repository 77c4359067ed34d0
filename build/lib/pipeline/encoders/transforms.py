"""Whole-image resize and normalisation shared by the timm and open_clip encoders.

Both papers resize the whole image to a square without cropping (MA-AGIQA: 224 bicubic,
IP-IQA: 512 bicubic), so the library transforms (resize shorter side + centre crop) would
change what the heads see. PIL bicubic differs from MA-AGIQA's cv2 INTER_CUBIC by rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def resize_normalize(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB PIL image -> float32 (3, size, size), bicubic resize, (x/255 - mean) / std."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' -> torch dtype, with an error naming the bad value."""
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"extract.dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]
