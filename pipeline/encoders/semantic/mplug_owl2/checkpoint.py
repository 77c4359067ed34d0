"""Load and save mPLUG-Owl2 checkpoints in the original layout (config.json + weight shards).

The released checkpoint is 33 pickled shards `pytorch_model-{k}-of-33.bin` plus
`pytorch_model.bin.index.json`; safetensors (single or sharded) are read too. Names map 1:1 onto
`MplugOwl2`'s parameters, except the buffers the original stored but that are computed here (RoPE
`inv_freq`, the abstractor's sin-cos tables) and `lm_head.weight` when logits are not wanted. Anything else
missing or left over is an error naming the key.

The model is built on the meta device and filled one tensor at a time: each weight file is memory-mapped,
and every tensor is read, put on the target device in the target dtype and assigned before the next one is
read. Host memory thus holds the loaded model (when the target is the CPU) plus the pages of the one file
being read, never a full-precision copy of a shard or of the model (benchmarks/load_memory.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

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


@contextmanager
def open_shard(path: Path) -> Iterator[tuple[list[str], Callable[[str], Tensor]]]:
    """A weight file's keys and a function reading one tensor by key, memory-mapped (nothing copied).

    A tensor read is a view of the file's pages, so memory is only spent when it is used; the mapping is
    released when the block exits and the caller holds no more of its tensors. A `.bin` tensor is dropped
    from the loaded dict as it is read, so the caller's reference is the last one.
    """
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt", device="cpu") as f:
            yield list(f.keys()), f.get_tensor
        return
    tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    try:
        yield list(tensors), tensors.pop
    finally:
        tensors.clear()


def place(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A new tensor of `tensor` in `dtype` on `device`, never aliasing the file it was read from.

    To an accelerator: move, then cast there. A blocking `tensor.to(device, dtype)` converts on the host
    first (a converted host copy of every tensor, made by the CPU); this way the host copies nothing and one
    tensor in the stored precision is briefly on the device. On the CPU: one conversion copy out of the
    mapped file, so the model owns its memory (it does not break when the file changes, nor page it back in
    from disk later).
    """
    if device.type == "cpu":
        return tensor.to(dtype=dtype, copy=True)
    return tensor.to(device).to(dtype)


def assign(model: nn.Module, key: str, tensor: Tensor) -> None:
    """Replace the (meta) parameter `key` of `model` by `tensor`, as `load_state_dict(assign=True)`."""
    module_name, _, name = key.rpartition(".")
    setattr(model.get_submodule(module_name), name, nn.Parameter(tensor, requires_grad=False))


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
    device = torch.device(device)
    loaded: set[str] = set()
    for file, listed in shards.items():
        path = directory / file
        with open_shard(path) as (keys, read):
            if listed is not None and set(keys) != set(listed):
                differ = _name_keys(set(keys) ^ set(listed))
                raise CheckpointError(f"{path}: its keys differ from what {index.name} lists: {differ}")
            for key in keys:
                if key in ignored:
                    continue
                if key not in expected:
                    raise CheckpointError(f"{path}: unexpected key {key!r} for this config")
                tensor = read(key)
                if tensor.shape != expected[key]:
                    want = list(expected[key])
                    raise CheckpointError(f"{path}: {key} has shape {list(tensor.shape)}, expected {want}")
                assign(model, key, place(tensor, device, dtype))
                del tensor  # the last reference to the mapped source: it may be unmapped with the file
                loaded.add(key)
    _check_keys(loaded, set(expected), set(), str(index))
    return model.requires_grad_(False).eval()


def weights_digest(directory: Path) -> str:
    """`state_digest` of a checkpoint's stored tensors, read tensor by tensor; any sharding or format."""
    hashes = {}
    for file in weight_shards(directory)[1]:
        with open_shard(directory / file) as (keys, read):
            hashes |= {key: tensor_digest(key, read(key)) for key in keys}
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
