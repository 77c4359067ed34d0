"""`agiqa doctor`: store sizes, and each check's verdict and fix on this (GPU-less, offline) machine."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.doctor import (
    MISSING,
    OK,
    WARN,
    check_disk,
    check_gpu,
    required_gpu_gib,
    run_checks,
    store_bytes,
)
from stages.doctor import main

ROOT = Path(__file__).resolve().parents[1]
AGIQA3K_LABELS = ROOT.parent / "shared" / "datasets" / "agiqa-3k" / "data.csv"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PNG = bytes.fromhex(  # a valid 1 x 1 grey PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63600000000200015e2f3b2c0000000049454e44ae426082"
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with the committed params.yaml and an empty hub cache."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def load(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def invoke(*args: str):
    app = typer.Typer()
    app.command()(main)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def fake_snapshot(cache: Path, repo: str, files: dict[str, str], ref: str = "main") -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/<file>}."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_store_bytes_follow_params(params):
    extract = params["extract"]
    assert store_bytes("vit", extract) == 784 * 3072 * 2  # (224/8)^2 tokens x 4 blocks x 768, float16
    two_views = {**extract, "vit": {**extract["vit"], "views": ["identity", "rot90"]}}
    assert store_bytes("vit", two_views) == 2 * 784 * 3072 * 2
    two_blocks = {**extract, "vit": {**extract["vit"], "blocks": [8, 9]}}
    assert store_bytes("vit", two_blocks) == 784 * 1536 * 2
    assert store_bytes("clip", extract) == 2048 * 16 * 16 * 2
    assert store_bytes("semantic", extract) == 2 * 4096 * 2
    with pytest.raises(ValueError, match=r"extract\.vit\.model"):
        store_bytes("vit", {**extract, "vit": {**extract["vit"], "model": "deit_small"}})


def test_gpu_need_is_the_largest_encoder():
    assert 17 < required_gpu_gib(["vit", "clip", "semantic"], "bfloat16") < 18  # 8.07e9 x 2 B + headroom
    assert required_gpu_gib(["semantic"], "float32") > 32
    assert required_gpu_gib(["vit", "clip"], "bfloat16") < 2


@pytest.mark.parametrize(
    ("total_gib", "free_gib", "status"), [(139, 120, OK), (139, 10, WARN), (16, 16, MISSING)]
)
def test_gpu_memory_verdict(params, monkeypatch, total_gib, free_gib, status):
    """The GPU branch without a GPU: torch.cuda answers as an H200 would (the only fake in this file)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H200"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free_gib * 2**30, total_gib * 2**30))
    check = check_gpu(params, "paper")
    assert check.status == status, check
    assert check.detail.startswith(f"cuda:0 NVIDIA H200, {total_gib:.1f} GiB, {free_gib:.1f} GiB free")
    assert bool(check.fix) == (status != OK)


def test_paper_profile_stops_on_this_machine(project):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU; the check expects none")
    result = invoke("--profile", "paper", "--datasets", "agiqa3k", "--params", str(project / "params.yaml"))
    assert result.exit_code == 1, result.output
    assert "hf download MAGAer13/mplug-owl2-llama2-7b --revision main" in result.output
    assert "ln -s /path/to/agiqa3k data/raw/agiqa3k" in result.output

    checks = by_name(run_checks(load(project), "paper", ["agiqa3k"], project))
    assert checks["gpu"].status == MISSING
    assert checks["gpu"].detail.startswith(
        "no CUDA GPU: stage 1 of the paper profile needs one with >= 17.5 GiB"
    )
    assert checks["dataset agiqa3k"].status == MISSING and "data.csv" in checks["dataset agiqa3k"].fix
    assert "2982 images (published size)" in checks["stores agiqa3k"].detail
    for encoder, repo in [
        ("semantic", "MAGAer13/mplug-owl2-llama2-7b"),
        ("vit", "timm/vit_base_patch8_224.augreg_in21k_ft_in1k"),
        ("clip", "timm/resnet50_clip.openai"),
    ]:
        check = checks[f"weights {encoder}"]
        assert check.status == MISSING, check
        assert f"hf download {repo} --revision main" in check.fix


def test_bad_params_file_is_named(project):
    (project / "params.yaml").write_text(
        (project / "params.yaml").read_text().replace("profile: demo", "profile: Paper")
    )
    result = invoke("--params", str(project / "params.yaml"))
    assert result.exit_code == 1
    assert "profile: 'Paper' is not one of demo, paper" in result.output


def test_demo_profile_needs_no_gpu_nor_weights(project):
    result = invoke("--profile", "demo", "--params", str(project / "params.yaml"))
    assert result.exit_code == 0, result.output
    checks = by_name(run_checks(load(project), "demo", ["demo"], project))
    assert checks["gpu"].status == OK and "not needed by the demo" in checks["gpu"].detail
    assert checks["weights"].status == OK and "not needed by the demo" in checks["weights"].detail
    assert checks["dataset demo"].status == OK


@pytest.mark.skipif(not AGIQA3K_LABELS.is_file(), reason=f"{AGIQA3K_LABELS} absent (shared datasets)")
def test_missing_images_are_counted_from_the_real_labels(project):
    raw = project / "data" / "raw" / "agiqa3k"
    raw.mkdir(parents=True)
    (raw / "data.csv").symlink_to(AGIQA3K_LABELS)
    names = [line.split(",")[0] for line in AGIQA3K_LABELS.read_text().splitlines()[1:]]
    for name in names[:5]:
        (raw / name).write_bytes(PNG)
    check = by_name(run_checks(load(project), "paper", ["agiqa3k"], project))["dataset agiqa3k"]
    assert check.status == MISSING
    assert check.detail.startswith(
        f"2977 of 2982 images listed in data.csv are not in data/raw/agiqa3k, e.g. {names[5]}"
    )

    for name in names[5:]:
        (raw / name).write_bytes(PNG)
    checks = by_name(run_checks(load(project), "paper", ["agiqa3k"], project))
    assert checks["dataset agiqa3k"].status == OK
    assert "2982 images (data.csv rows)" in checks["stores agiqa3k"].detail


def test_disk_verdict_counts_the_dvc_cache_copy(tmp_path):
    """DVC's default cache (reflink,copy) holds each store twice on ext4; the project's link cache once."""
    free = shutil.disk_usage(tmp_path).free
    assert check_disk(tmp_path, 1).status == OK
    assert check_disk(tmp_path, int(free * 0.75)).status == WARN  # fits once, not with the cache copy
    missing = check_disk(tmp_path, free * 10)
    assert missing.status == MISSING and f"at {tmp_path}" in missing.detail  # features/ absent: its parent
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    linked = check_disk(tmp_path, int(free * 0.75))
    assert linked.status == OK and "held once" in linked.detail


def test_semantic_weights_found_in_a_hub_cache(project):
    cfg = load(project)
    weights = lambda: by_name(run_checks(cfg, "paper", [], project))["weights semantic"]  # noqa: E731
    index = {"weight_map": {"a.weight": "pytorch_model-1-of-2.bin", "b.weight": "pytorch_model-2-of-2.bin"}}
    snapshot = fake_snapshot(
        project / "hub",
        "MAGAer13/mplug-owl2-llama2-7b",
        {
            "config.json": "{}",
            "tokenizer.model": "",
            "pytorch_model.bin.index.json": json.dumps(index),
            "pytorch_model-1-of-2.bin": "",
        },
    )
    assert weights().status == MISSING and "1 of 2 shards not cached" in weights().detail

    (snapshot / "pytorch_model-2-of-2.bin").write_text("")
    check = weights()
    assert check.status == WARN, check  # revision main is a branch: pin the commit
    assert check.fix == f"set extract.semantic.revision: {COMMIT} in params.yaml"

    cfg["extract"]["semantic"]["revision"] = COMMIT
    assert weights().status == OK


def test_library_weights_found_in_a_hub_cache(project):
    cfg = load(project)
    fake_snapshot(project / "hub", "timm/vit_base_patch8_224.augreg_in21k_ft_in1k", {"model.safetensors": ""})
    fake_snapshot(project / "hub", "timm/resnet50_clip.openai", {"open_clip_pytorch_model.bin": ""})
    checks = by_name(run_checks(cfg, "paper", [], project))
    assert checks["weights vit"].status == OK and COMMIT in checks["weights vit"].detail
    assert checks["weights clip"].status == OK


def test_vlm_store_size_and_gpu_need_come_from_its_cached_config(project):
    """A `vlms` entry's width and size are read from its cached config.json and safetensors index; until
    they are cached the store is not counted (WARN, the others still are) and its GPU need is 7B's."""
    params = load(project)
    params["encoders"], params["vlms"] = ["vit"], ["qwen2_5_vl"]
    extract = params["extract"]
    with pytest.raises(ValueError, match=r"hidden size of Qwen/Qwen2\.5-VL-7B-Instruct .* not cached"):
        store_bytes("qwen2_5_vl", extract, "vlm")
    checks = by_name(run_checks(params, "paper", ["agiqa3k"], project))
    assert checks["stores agiqa3k"].status == WARN and "qwen2_5_vl ?" in checks["stores agiqa3k"].detail
    assert "vit 14.4 GB" in checks["stores agiqa3k"].detail
    config = json.dumps({"text_config": {"hidden_size": 3584}})
    index = json.dumps({"metadata": {"total_size": 16_000_000_000}, "weight_map": {"w": "model.safetensors"}})
    fake_snapshot(
        project / "hub",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        {"config.json": config, "model.safetensors.index.json": index},
    )
    assert store_bytes("qwen2_5_vl", extract, "vlm") == 2 * 3584 * 2
    from pipeline.doctor import vlm_parameters

    assert vlm_parameters(extract["qwen2_5_vl"]) == 8e9
    assert required_gpu_gib(["vit"], "bfloat16", [8e9]) == pytest.approx(8e9 * 2 / 2**30 + 2.5)
    assert "weights qwen2_5_vl" in checks
