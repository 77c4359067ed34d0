"""Q-Align with the real OneAlign weights: the model card's regression value, when the weights are here.

Runs only where `q-future/one-align` is in the Hugging Face cache and `AGIQA_QALIGN_IMAGE` names the card's
`singapore_flyer.jpg` (neither is available offline here: the test then skips and says which is missing).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHECKPOINT = "q-future/one-align"
CARD_SCORE = 1.911  # the card: singapore_flyer.jpg, task quality


def _ready() -> tuple[Path, str]:
    from huggingface_hub import try_to_load_from_cache

    image = Path(os.environ.get("AGIQA_QALIGN_IMAGE", ""))
    if not image.is_file():
        pytest.skip("set AGIQA_QALIGN_IMAGE to the OneAlign card's singapore_flyer.jpg to run this check")
    if not isinstance(try_to_load_from_cache(CHECKPOINT, "config.json"), str):
        pytest.skip(f"{CHECKPOINT} is not in the Hugging Face cache (hf download {CHECKPOINT})")
    return image, CHECKPOINT


def test_onealign_reproduces_its_model_card_score():
    from pipeline.encoders import create_encoder
    from pipeline.zeroshot import qalign_score

    image, checkpoint = _ready()
    cfg = {
        "checkpoint": checkpoint,
        "revision": "main",
        "prompts": ["semantic_content"],
        "zeroshot": ["qalign"],
        "qalign_prompt": "newline",
    }
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    enc = create_encoder(
        "semantic", cfg, "paper", device=device, dtype="float16" if device == "cuda" else "float32"
    )
    out = enc.encode(enc.preprocess(Image.open(image))[None])
    score = qalign_score(out["qalign"], enc.provenance()["rating_weights"])
    np.testing.assert_allclose(score, [CARD_SCORE], atol=0.01)
