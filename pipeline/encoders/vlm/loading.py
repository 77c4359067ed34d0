"""Load an image-text-to-text checkpoint (hub id or local folder) and name its weights.

A hub id is first resolved to a snapshot folder with huggingface_hub (which honours HF_HUB_OFFLINE and the
cache), so the model is always read from a folder by `AutoProcessor.from_pretrained` and
`AutoModelForImageTextToText.from_pretrained`: a hub checkpoint, a local one and the demo's tiny model take
the same path. A hub snapshot is named by its commit; a local folder, which has none, by a digest of its
stored tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from pipeline.encoders.common import combine_digests, hub_snapshot, tensor_digest

# What a transformers VLM folder needs; no pickled `.bin` weights and no remote code.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def weights_digest(folder: Path) -> str:
    """`state_digest` of the tensors stored in the folder's safetensors files, read one tensor at a time."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights")
    hashes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            hashes |= {key: tensor_digest(key, f.get_tensor(key)) for key in f.keys()}  # noqa: SIM118 (not iterable)
    return combine_digests(hashes)


def load_vlm(
    source: str | Path, revision: str | None, dtype: torch.dtype, device: str
) -> tuple[PreTrainedModel, ProcessorMixin, dict[str, Any]]:
    """(model in eval mode on `device`, processor padding on the right, provenance of the weights)."""
    folder, commit = hub_snapshot(source, revision, HUB_FILES, what="extract.<name>.checkpoint")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    # Right padding keeps every real token at the position it has when its row runs alone.
    processor.tokenizer.padding_side = "right"
    origin = {"revision": commit} if commit else {"weights_sha256": weights_digest(folder)}
    return model, processor, {"checkpoint": str(source), **origin}
