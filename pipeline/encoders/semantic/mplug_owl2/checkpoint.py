"""Load and save mPLUG-Owl2 checkpoints in the original layout (config.json + weight shards).

The released checkpoint is 33 pickled shards `pytorch_model-{k}-of-33.bin` plus
`pytorch_model.bin.index.json`; safetensors (single or sharded) are read too. Names map 1:1 onto
`MplugOwl2`'s parameters, except the buffers the original stored but that are computed here (RoPE
`inv_freq`, the abstractor's sin-cos tables) and `lm_head.weight` when logits are not wanted. Anything else
missing or left over is an error naming the key. The model is built on the meta device and filled shard by
shard, so host memory holds one shard at a time (plus the model itself when the target device is the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.encoders.common import CheckpointError, combine_digests, hub_snapshot, tensor_digest

from .config import MplugOwl2Config
from .model import MplugOwl2

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def resolve_checkpoint(source: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """A local directory as is, or a hub repo id fetched (or found in the cache): (directory, commit).

    Safetensors are preferred; pickled `.bin` shards are fetched only when the repo has no safetensors
    (as MAGAer13/mplug-owl2-llama2-7b).
    """
    directory, commit = hub_snapshot(source, revision, ["*.json", "tokenizer.model", "*.safetensors"])
    if commit is not None and not any(directory.glob("*.safetensors")):
        directory, commit = hub_snapshot(source, revision, ["*.json", "tokenizer.model", "*.bin"])
    return directory, commit


def weight_shards(directory: Path) -> tuple[Path, dict[str, list[str] | None]]:
    """The index (or the single weight file), and each shard file with the keys the index assigns it."""
    for name in INDEX_FILES:
        index = directory / name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a weight index ({e!r})") from None
            shards: dict[str, list[str] | None] = {}
            for key, file in weight_map.items():
                shards.setdefault(file, []).append(key)
            missing = sorted(f for f in shards if not (directory / f).is_file())
            if missing:
                raise CheckpointError(f"{index}: shard file(s) not in {directory}: {', '.join(missing)}")
            return index, shards
    for name in SINGLE_FILES:
        if (directory / name).is_file():
            return directory / name, {name: None}  # keys unknown until it is read
    raise CheckpointError(f"{directory}: no weights (looked for {', '.join(INDEX_FILES + SINGLE_FILES)})")


def read_shard(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return tensors


def computed_keys(cfg: MplugOwl2Config) -> set[str]:
    """Buffers the original saved that this port computes instead (ignored when present)."""
    rope = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.num_hidden_layers)}
    prefix = "model.visual_abstractor.encoder.layers"
    sincos = {
        f"{prefix}.{i}.crossattention.attention.{name}"
        for i in range(cfg.abstractor.num_hidden_layers)
        for name in ("q_pos_embed", "k_pos_embed")
    }
    return rope | sincos


def _name_keys(keys: set[str], limit: int = 8) -> str:
    names = sorted(keys)
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_keys(keys: set[str], expected: set[str], ignored: set[str], where: str) -> None:
    unexpected, missing = keys - expected - ignored, expected - keys
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key(s) for this config: {_name_keys(unexpected)}")
    if missing:
        raise CheckpointError(f"{where}: missing key(s): {_name_keys(missing)}")


def load_model(
    source: str | Path,
    revision: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    lm_head: bool = False,
) -> MplugOwl2:
    """Build `MplugOwl2` from a checkpoint directory or hub id, strictly, in `dtype` on `device`, frozen.

    `lm_head=True` also loads `lm_head.weight`, for the zero-shot scores; features never need it. Q-Align /
    OneAlign checkpoints (q-future/one-align, q-future/q-align-*) are this architecture and load the same way.
    """
    directory, _ = resolve_checkpoint(source, revision)
    cfg = MplugOwl2Config.from_json_file(directory / "config.json")
    with torch.device("meta"):
        model = MplugOwl2(cfg, lm_head=lm_head)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    ignored = computed_keys(cfg) | (set() if lm_head else {"lm_head.weight"})
    index, shards = weight_shards(directory)
    if all(keys is not None for keys in shards.values()):  # fail before reading gigabytes
        _check_keys({k for keys in shards.values() for k in keys}, set(expected), ignored, str(index))
    loaded: set[str] = set()
    for file, listed in shards.items():
        path = directory / file
        tensors = read_shard(path)
        if listed is not None and set(tensors) != set(listed):
            differ = _name_keys(set(tensors) ^ set(listed))
            raise CheckpointError(f"{path}: its keys differ from what {index.name} lists: {differ}")
        batch = {}
        for key, tensor in tensors.items():
            if key in ignored:
                continue
            if key not in expected:
                raise CheckpointError(f"{path}: unexpected key {key!r} for this config")
            if tensor.shape != expected[key]:
                want = list(expected[key])
                raise CheckpointError(f"{path}: {key} has shape {list(tensor.shape)}, expected {want}")
            batch[key] = tensor.to(device=device, dtype=dtype)
        model.load_state_dict(batch, strict=False, assign=True)
        loaded |= batch.keys()
        del tensors, batch
    _check_keys(loaded, set(expected), set(), str(index))
    return model.requires_grad_(False).eval()


def weights_digest(directory: Path) -> str:
    """`state_digest` of a checkpoint's stored tensors, read shard by shard; any sharding or format."""
    hashes = {}
    for file in weight_shards(directory)[1]:
        hashes |= {key: tensor_digest(key, t) for key, t in read_shard(directory / file).items()}
    return combine_digests(hashes)


def save_checkpoint(model: MplugOwl2, directory: Path, safetensors: bool = False) -> None:
    """Write config.json and weights sharded as the original: one shard per decoder layer, then the rest."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    n = model.cfg.num_hidden_layers
    groups = [[k for k in state if k.startswith(f"model.layers.{i}.")] for i in range(n)]
    groups.append([k for k in state if not k.startswith("model.layers.")])
    weight_map = {}
    for k, keys in enumerate(groups, start=1):
        shard = {key: state[key] for key in keys}
        if safetensors:
            name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{k}-of-{len(groups)}.bin"
            torch.save(shard, directory / name)
        weight_map |= dict.fromkeys(keys, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILES[0 if safetensors else 1]).write_text(json.dumps(index, indent=2))
    config = model.cfg.to_dict() | {
        "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
