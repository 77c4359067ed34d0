"""Checkpoint loading: formats, strictness, clear errors, hub cache, digests, shard-by-shard memory."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from pipeline.encoders.common import state_digest
from pipeline.encoders.semantic.mplug_owl2.checkpoint import (
    CheckpointError,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
    weights_digest,
)
from pipeline.encoders.semantic.mplug_owl2.config import ConfigError, MplugOwl2Config, VisionConfig
from pipeline.encoders.semantic.mplug_owl2.tiny import TINY_CONFIG, ensure_tiny_checkpoint, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mplug-owl2-tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache"), seed=0)


@pytest.fixture
def copy(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    res = model.cfg.vision.image_size
    images = torch.randn(2, 3, res, res, generator=g)
    ids = torch.tensor([[1, 40, 41, 42, -200, 43, 44]] * 2)
    with torch.no_grad():
        return model(ids, images)[-1]


def test_tiny_checkpoint_has_the_released_layout(tiny_dir):
    n = TINY_CONFIG.num_hidden_layers + 1
    index = json.loads((tiny_dir / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        f"pytorch_model-{k}-of-{n}.bin" for k in range(1, n + 1)
    )
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] == f"pytorch_model-1-of-{n}.bin"
    assert index["weight_map"]["lm_head.weight"] == f"pytorch_model-{n}-of-{n}.bin"
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "mplug_owl2" and "visual_config" in config
    assert MplugOwl2Config.from_dict(config) == TINY_CONFIG


def test_load_is_strict_frozen_and_skips_lm_head(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.float16)
    assert model.lm_head is None
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 and not p.requires_grad for p in params)
    reference = tiny_model(0)
    loaded = load_model(tiny_dir, lm_head=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_sharded_safetensors_and_bin_give_the_same_model(tiny_dir, tmp_path):
    model = tiny_model(0)
    save_checkpoint(model, tmp_path / "st", safetensors=True)
    assert (tmp_path / "st" / "model.safetensors.index.json").exists()
    assert_close(run(load_model(tmp_path / "st")), run(load_model(tiny_dir)), atol=0, rtol=0)
    assert weights_digest(tmp_path / "st") == weights_digest(tiny_dir) == state_digest(model.state_dict())


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_streamed_tensors_equal_the_saved_ones_in_the_target_dtype(tmp_path, stored, safetensors):
    saved = tiny_model(0).to(stored)
    save_checkpoint(saved, tmp_path, safetensors=safetensors)
    loaded = load_model(tmp_path, dtype=torch.bfloat16, lm_head=True)
    want = {key: t.to(torch.bfloat16) for key, t in saved.state_dict().items()}
    state = loaded.state_dict()
    assert state.keys() == want.keys()
    for key, tensor in state.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, want[key]), key
    assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in loaded.parameters())
    for shard in [*tmp_path.glob("*.safetensors"), *tmp_path.glob("*.bin")]:  # the model owns its memory:
        with shard.open("r+b") as f:  # rewriting the files in place does not change it
            f.write(bytes(shard.stat().st_size))
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[key]), key


def test_single_file_bin(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path)
    torch.save(tiny_model(0).state_dict(), tmp_path / "pytorch_model.bin")
    assert_close(run(load_model(tmp_path)), run(load_model(tiny_dir)), atol=0, rtol=0)


def test_missing_shard_is_named(copy):
    (copy / "pytorch_model-2-of-3.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-2-of-3\.bin"):
        load_model(copy)


def test_unexpected_key_is_named(copy):
    shard = torch.load(copy / "pytorch_model-3-of-3.bin", weights_only=True)
    shard["model.extra_adapter.weight"] = torch.zeros(3)
    torch.save(shard, copy / "pytorch_model-3-of-3.bin")
    index = json.loads((copy / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.extra_adapter.weight"] = "pytorch_model-3-of-3.bin"
    (copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected key.*model\.extra_adapter\.weight"):
        load_model(copy)


def test_unexpected_key_in_single_safetensors_is_named(tmp_path):
    if not FIXTURE.exists():
        pytest.skip(f"fixture not found at {FIXTURE}")
    shutil.copy(FIXTURE / "config.json", tmp_path)
    state = load_file(FIXTURE / "model.safetensors") | {"model.layers.7.mlp.gate_proj.weight": torch.zeros(1)}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.mlp\.gate_proj\.weight"):
        load_model(tmp_path)


def test_missing_key_is_named(copy):
    shard = torch.load(copy / "pytorch_model-3-of-3.bin", weights_only=True)
    del shard["model.norm.weight"]
    torch.save(shard, copy / "pytorch_model-3-of-3.bin")
    index = json.loads((copy / "pytorch_model.bin.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing key.*model\.norm\.weight"):
        load_model(copy)


def test_shard_disagreeing_with_index_is_named(copy):
    shard = torch.load(copy / "pytorch_model-1-of-3.bin", weights_only=True)
    shard.pop("model.layers.0.mlp.up_proj.weight")
    torch.save(shard, copy / "pytorch_model-1-of-3.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model-1-of-3\.bin.*model\.layers\.0\.mlp\.up_proj\.weight"
    ):
        load_model(copy)


def test_shape_mismatch_is_named(copy):
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] = 100
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"
    ):
        load_model(copy)


def test_config_of_another_model_is_refused(copy):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llama"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: model_type is 'llama', expected 'mplug_owl2'"):
        load_model(copy)


def test_unsupported_config_values_are_refused():
    config = TINY_CONFIG.to_dict()
    with pytest.raises(ConfigError, match="rope_scaling"):
        MplugOwl2Config.from_dict({**config, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="grid_size"):
        MplugOwl2Config(vision=VisionConfig(image_size=224))


def test_config_round_trip_and_released_defaults():
    assert MplugOwl2Config.from_dict(TINY_CONFIG.to_dict()) == TINY_CONFIG
    released = MplugOwl2Config.from_dict({"model_type": "mplug_owl2"})
    assert (
        released == MplugOwl2Config() and released.rms_norm_eps == 1e-6 and released.vision.image_size == 448
    )


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG.to_dict()))
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)


def test_hub_id_resolves_from_the_offline_cache(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-owl2"
    shutil.copytree(tiny_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    directory, commit = resolve_checkpoint("acme/tiny-owl2", "main")
    assert commit == sha and directory == repo / "snapshots" / sha
    assert_close(run(load_model("acme/tiny-owl2", "main")), run(load_model(tiny_dir)), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match=r"acme/tiny-owl2.*v9"):
        resolve_checkpoint("acme/tiny-owl2", "v9")
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub repo id"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_host_memory_holds_one_shard_at_a_time(tmp_path):
    """Loading to fp16 peaks near the fp16 model plus one shard, far below fp32 model + full state dict."""
    cfg = MplugOwl2Config(
        vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=4,
        vision=TINY_CONFIG.vision, abstractor=TINY_CONFIG.abstractor,
    )  # fmt: skip
    with torch.device("meta"):
        from pipeline.encoders.semantic.mplug_owl2.model import MplugOwl2

        model = MplugOwl2(cfg)
    save_checkpoint(model.to_empty(device="cpu"), tmp_path)
    fp32 = sum(f.stat().st_size for f in tmp_path.glob("*.bin"))
    largest = max(f.stat().st_size for f in tmp_path.glob("*.bin"))
    child = textwrap.dedent(f"""
        import re, torch
        from pipeline.encoders.semantic.mplug_owl2.checkpoint import load_model
        def kb(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        with torch.device("meta"):  # the first meta init imports torch's decompositions (~150 MB)
            torch.nn.Embedding(2, 2)
        base = kb("VmRSS")
        load_model({str(tmp_path)!r}, dtype=torch.float16)
        print((kb("VmHWM") - base) * 1024)
    """)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read peak memory")
    peak = int(
        subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    )
    assert peak < fp32 / 2 + 2 * largest + 32 * 2**20, (peak, fp32, largest)
