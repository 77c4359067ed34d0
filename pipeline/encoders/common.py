"""What every encoder shares: compute dtypes, the papers' whole-image resize, weights digests, and the
records of adapted weights.

Both papers resize the whole image to a square without cropping (MA-AGIQA: 224 bicubic,
IP-IQA: 512 bicubic), so the library transforms (resize shorter side + centre crop) would
change what the heads see. PIL bicubic differs from MA-AGIQA's cv2 INTER_CUBIC by rounding only.

A store's provenance names the weights it was computed with by ``state_digest``: a hub tag or a
file name can point at other bytes tomorrow, a digest of the tensors cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = ".cache/agiqa"

# MA-AGIQA's two questions (getFeature.py), by the names its loader gives their features. A params
# entry that is one of these names stands for the question; any other string is asked verbatim.
MA_AGIQA_PROMPTS = {
    "semantic_content": "Evaluate the input image to determine if its quality is compromised due to a "
    "lack of meaningful semantic content.",
    "coherence": "Evaluate if the image quality is compromised due to violations of coherence.",
}


def named_prompts(cfg: dict, section: str) -> tuple[list[str], list[str]]:
    """(names, texts) of ``extract.<section>.prompts``: MA-AGIQA's names stand for its questions, any other
    entry is asked verbatim; the names are how stage 2 binds streams to store rows."""
    prompts = cfg.get("prompts")
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"extract.{section}.prompts must be a non-empty list of non-empty strings")
    return list(prompts), [MA_AGIQA_PROMPTS.get(p, p) for p in prompts]


# VQAScore's question and answer (t2v_metrics), asked by every encoder with a language-model head.
VQASCORE_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
VQASCORE_ANSWER = "Yes"


def single_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The token id of each word as the model continues a prompt with it (tokenizer's BOS dropped).

    Q-Align takes `tokenizer(word).input_ids[1]` blindly; a word that is several tokens would silently
    score its first piece, so it is an error here.
    """
    ids = []
    for word in words:
        tokens = list(tokenizer(word)["input_ids"])
        if tokens[:1] == [tokenizer.bos_token_id]:
            tokens = tokens[1:]
        if len(tokens) != 1:
            raise ValueError(
                f"{word!r} is {len(tokens)} tokens {tokens} for this tokenizer; a zero-shot score needs "
                "exactly one token per answer word"
            )
        ids.append(tokens[0])
    return ids


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# `extract.dtype: auto`: what each profile computes in. The demo is a CPU check of the code (float32);
# the paper profile runs the 7B model on a GPU, where bfloat16 halves memory (about 15 GB, not 28).
AUTO_DTYPE = {"demo": "float32", "paper": "bfloat16"}


def resolve_dtype(name: str, profile: str) -> str:
    """``extract.dtype`` -> a name in DTYPES; ``auto`` depends on the profile only, never on the device."""
    resolved = AUTO_DTYPE[profile] if name == "auto" else name
    if resolved not in DTYPES:
        raise ValueError(f"extract.dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return resolved


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' -> torch dtype, with an error naming the bad value."""
    if name not in DTYPES:
        raise ValueError(f"extract.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resize_normalize(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB PIL image -> float32 (3, size, size), bicubic resize, (x/255 - mean) / std."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def tensor_digest(key: str, t: torch.Tensor) -> str:
    """sha256 of one named tensor: name, dtype, shape and bytes."""
    h = hashlib.sha256(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One sha256 over per-tensor digests, independent of their order."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor of a state dict (name, dtype, shape, bytes), independent of order."""
    return combine_digests({key: tensor_digest(key, t) for key, t in tensors.items()})


# Adapted-weights records, models/i2p/<encoder>/i2p.json: which fine-tuned weights (IP-IQA's Image2Prompt
# for the clip image tower) an encoder loads over its published ones. Every extract stage reads its own
# encoder's record; an encoder left as published has a constant record, so nothing downstream reruns.
RECORD = "i2p.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_disabled(out_dir: Path, encoder: str, why: str) -> None:
    """The record of an encoder left as published."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"encoder": encoder, "enabled": False, "why": why}
    (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def adapted_tower(record_dir: Path, encoder: str) -> Path | None:
    """The adapted weights recorded in ``record_dir`` for ``encoder``; None when left as published."""
    path = Path(record_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pretrain_i2p stage (dvc repro pretrain_i2p)")
    record = json.loads(path.read_text())
    if record.get("encoder") != encoder:
        raise ValueError(f"{path} is the record of encoder {record.get('encoder')!r}, not {encoder!r}")
    if not record.get("enabled"):
        return None
    weights = path.parent / record["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"{path} names {weights}, which is missing")
    return weights


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not match the model: the message names the file or key."""


def hub_snapshot(
    source: str | Path, revision: str | None, patterns: list[str] | None = None, what: str = "checkpoint"
) -> tuple[Path, str | None]:
    """A local directory as is (commit None), or a hub repo id fetched with huggingface_hub, or found in its
    cache (it reads HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE and the token itself): (directory, commit).
    ``patterns``: the files to fetch (all when None); ``what``: the key errors name."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, None
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise CheckpointError(f"{what} {str(source)!r} is neither a local directory nor a hub repo id")
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(str(source), revision=revision, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises many types; say what was asked for
        raise CheckpointError(f"cannot get {what} {source!r} (revision {revision!r}): {e}") from e
    return directory, directory.name


def publish_dir(directory: Path, write: Callable[[Path], None]) -> Path:
    """Create ``directory`` atomically: ``write`` fills a staging folder beside it, which is then renamed,
    so a crash never leaves a half-written folder. A folder that already exists is kept as it is (another
    process may have published the same content first)."""
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory.parent))
    try:
        write(staging)
        staging.chmod(0o755)
        staging.rename(directory)
    except OSError:
        if not directory.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


class OomBackoff:
    """Runs a batch in slices of at most ``max_images``, halving that after a CUDA out-of-memory error
    (kept for the rest of the run); a single image that does not fit is an error."""

    max_images: int | None = None

    def _chunks(self, total: int, run: Callable[[slice], T]) -> list[T]:
        out, start = [], 0
        while start < total:
            n = min(self.max_images or total, total - start)
            try:
                out.append(run(slice(start, start + n)))
                start += n
                continue
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
            self.max_images = n // 2
            log.warning("out of memory with %d images per forward; retrying with %d", n, self.max_images)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return out
