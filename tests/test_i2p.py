"""Image2Prompt on the tiny demo CLIP: loss falls, tower round-trips, provenance follows it, runs resume."""

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.data import generate_demo, load_rgb
from pipeline.encoders import create_encoder
from pipeline.encoders.clip import build_clip_model
from pipeline.encoders.common import adapted_tower, resize_normalize, sha256_file, write_disabled
from pipeline.i2p import WEIGHTS, I2PConfig, pretrain_image2prompt, read_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"epochs": 3, "batch_size": 8, "lr": 1e-3}


@pytest.fixture(scope="module")
def clip_cfg() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())["extract"]["clip"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("pairs")
    manifest = generate_demo(root, seed=1, n_prompts=6, images_per_prompt=3, size=64)
    return [(root / p, t) for p, t in zip(manifest["path"], manifest["prompt"], strict=True)]


@pytest.fixture(scope="module")
def trained(clip_cfg, pairs, tmp_path_factory):
    """One uninterrupted run: (adapted model, record, output folder)."""
    out = tmp_path_factory.mktemp("i2p")
    model = build_clip_model(clip_cfg, "demo")
    record = pretrain_image2prompt(model, pairs, I2PConfig(**RECIPE), out, checkpoint=out / "ckpt.pt")
    return model, record, out


def mean_loss(model, pairs) -> float:
    """1 - cos(image embedding, prompt embedding), averaged over pairs, computed here independently."""
    size = model.visual.image_size
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    x = torch.stack([resize_normalize(load_rgb(p), size, mean, std) for p, _ in pairs])
    with torch.no_grad():
        image = model.encode_image(x)
        text = model.encode_text(open_clip.tokenize([t for _, t in pairs]))
    return float(1 - torch.nn.functional.cosine_similarity(image, text).mean())


def test_image2prompt_lowers_the_loss_on_its_pairs(trained, clip_cfg, pairs):
    model, record, _ = trained
    before, after = mean_loss(build_clip_model(clip_cfg, "demo"), pairs), mean_loss(model, pairs)
    assert record["loss_before"] == pytest.approx(before, abs=1e-4)
    assert record["loss_after"] == pytest.approx(after, abs=1e-4)
    assert after < 0.5 * before
    assert len(record["train_loss"]) == RECIPE["epochs"]
    assert record["train_loss"][-1] < record["train_loss"][0]
    assert record["pairs"] == record["pairs_kept"] == len(pairs)


def test_only_the_image_tower_trains(trained, clip_cfg):
    model, _, _ = trained
    start = build_clip_model(clip_cfg, "demo").state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert any(k.startswith("visual.attnpool.") for k in changed)


def test_saved_tower_round_trips_strictly(trained, clip_cfg, tmp_path):
    model, record, out = trained
    weights = out / WEIGHTS
    assert record["sha256"] == sha256_file(weights)
    assert adapted_tower(out, "clip") == weights
    loaded = build_clip_model(clip_cfg, "demo", image_tower=weights).visual.state_dict()
    assert loaded.keys() == model.visual.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.visual.state_dict().items())
    partial = load_file(weights)
    partial.pop("attnpool.c_proj.weight")
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"(?s)partial\.safetensors.*Missing.*attnpool\.c_proj\.weight"):
        build_clip_model(clip_cfg, "demo", image_tower=tmp_path / "partial.safetensors")


def test_clip_provenance_and_features_follow_the_tower(trained, clip_cfg, pairs):
    _, record, out = trained
    plain = create_encoder("clip", clip_cfg, "demo")
    adapted = create_encoder("clip", {**clip_cfg, "image_tower": out / WEIGHTS}, "demo")
    assert plain.provenance()["i2p"] is None
    assert adapted.provenance()["i2p"] == record["sha256"]
    assert {k: v for k, v in plain.provenance().items() if k not in ("i2p", "weights_sha256")} == {
        k: v for k, v in adapted.provenance().items() if k not in ("i2p", "weights_sha256")
    }
    x = plain.preprocess(load_rgb(pairs[0][0]))[None]
    a, b = plain.encode(x)["features"], adapted.encode(x)["features"]
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-2)
    prompts = [pairs[0][1]]
    np.testing.assert_array_equal(
        plain.extras(prompts)["text_states"], adapted.extras(prompts)["text_states"]
    )


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_its_checkpoint(trained, clip_cfg, pairs, tmp_path):
    _, straight, _ = trained
    ckpt = tmp_path / "scratch" / "ckpt.pt"
    ckpt.parent.mkdir()

    def stop_after_first(epoch: int, loss: float) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain_image2prompt(
            build_clip_model(clip_cfg, "demo"),
            pairs,
            I2PConfig(**RECIPE),
            tmp_path / "out",
            checkpoint=ckpt,
            on_epoch=stop_after_first,
        )
    assert ckpt.exists() and not (tmp_path / "out" / WEIGHTS).exists()
    seen = []
    model = build_clip_model(clip_cfg, "demo")
    record = pretrain_image2prompt(
        model,
        pairs,
        I2PConfig(**RECIPE),
        tmp_path / "out",
        checkpoint=ckpt,
        on_epoch=lambda epoch, loss: seen.append(epoch),
    )
    assert seen == [2, 3]  # epoch 1 came from the checkpoint
    assert not ckpt.exists()
    np.testing.assert_allclose(record["train_loss"], straight["train_loss"], rtol=1e-4)
    assert record["loss_before"] == straight["loss_before"]
    assert record["loss_after"] == pytest.approx(straight["loss_after"], rel=1e-4)


def test_checkpoint_of_another_config_is_discarded(clip_cfg, pairs, tmp_path):
    ckpt = tmp_path / "ckpt.pt"

    def stop(epoch: int, loss: float) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        pretrain_image2prompt(
            build_clip_model(clip_cfg, "demo"),
            pairs,
            I2PConfig(epochs=2, batch_size=8, lr=1e-3),
            tmp_path / "out",
            checkpoint=ckpt,
            on_epoch=stop,
        )
    seen = []
    with pytest.warns(UserWarning, match=r"ckpt\.pt aside as ckpt\.pt\.discarded-.*another config"):
        pretrain_image2prompt(
            build_clip_model(clip_cfg, "demo"),
            pairs,
            I2PConfig(epochs=1, batch_size=8, lr=1e-4),
            tmp_path / "out",
            checkpoint=ckpt,
            on_epoch=lambda epoch, loss: seen.append(epoch),
        )
    assert seen == [1]
    assert len(list(tmp_path.glob("ckpt.pt.discarded-*"))) == 1  # set aside, never deleted


def test_min_similarity_keeps_pairs_above_it(clip_cfg, pairs, tmp_path):
    model = build_clip_model(clip_cfg, "demo")
    size = model.visual.image_size
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    with torch.no_grad():
        image = model.encode_image(
            torch.stack([resize_normalize(load_rgb(p), size, mean, std) for p, _ in pairs])
        )
        text = model.encode_text(open_clip.tokenize([t for _, t in pairs]))
    cos = torch.nn.functional.cosine_similarity(image, text).numpy()
    threshold = float(np.median(cos))
    cfg = I2PConfig(epochs=1, batch_size=8, lr=1e-3, min_similarity=threshold)
    record = pretrain_image2prompt(model, pairs, cfg, tmp_path / "out")
    assert record["pairs_kept"] == int((cos > threshold).sum()) < len(pairs)
    assert record["loss_before"] == pytest.approx(float(1 - cos[cos > threshold].mean()), abs=1e-4)
    too_high = I2PConfig(epochs=1, batch_size=8, lr=1e-3, min_similarity=min(float(cos.max()) + 0.01, 0.99))
    with pytest.raises(ValueError, match="no pair has CLIP similarity above"):
        pretrain_image2prompt(build_clip_model(clip_cfg, "demo"), pairs, too_high, tmp_path / "out2")


def test_read_pairs_names_file_and_rows(tmp_path, pairs):
    images = pairs[0][0].parent
    good = tmp_path / "pairs.csv"
    good.write_text(f"path,prompt\n{pairs[0][0].name},a red circle\n{pairs[1][0].name},a blue square\n")
    assert read_pairs(good, images) == [(pairs[0][0], "a red circle"), (pairs[1][0], "a blue square")]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,prompt\nx.png,a\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*missing column.*path"):
        read_pairs(bad)
    bad.write_text(f"path,prompt\n{pairs[0][0].name},a\nnope.png,b\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.csv.*row 3"):
        read_pairs(bad, images)
    bad.write_text(f"path,prompt\n{pairs[0][0].name},\n")
    with pytest.raises(ValueError, match=r"empty prompt in row\(s\) \[2\]"):
        read_pairs(bad, images)


def test_adapted_tower_reads_disabled_and_wrong_records(tmp_path):
    write_disabled(tmp_path / "clip", "clip", "off")
    assert adapted_tower(tmp_path / "clip", "clip") is None
    with pytest.raises(ValueError, match="record of encoder 'clip', not 'vit'"):
        adapted_tower(tmp_path / "clip", "vit")
    with pytest.raises(FileNotFoundError, match="pretrain_i2p"):
        adapted_tower(tmp_path / "missing", "clip")


def test_stage_writes_one_record_per_encoder_and_vit_records_never_change(tmp_path, monkeypatch):
    """The DAG relies on this: models/i2p/vit and /semantic are byte-identical whether i2p is on or off."""
    from pipeline.encoders import list_encoders
    from stages import pretrain_i2p

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["i2p"].update(enabled=True, demo={"seed": 1, "n_prompts": 2, "images_per_prompt": 2, "size": 32})
    params["i2p"]["recipe"].update(epochs=1, batch_size=4)
    params["runtime"].update(device="cpu", num_workers=0)
    monkeypatch.chdir(tmp_path)
    snapshots = {}
    for enabled in (True, False):
        params["i2p"]["enabled"] = enabled
        Path("params.yaml").write_text(yaml.safe_dump(params))
        pretrain_i2p.main(Path("models/i2p"))
        assert sorted(p.name for p in Path("models/i2p").iterdir()) == sorted(list_encoders())
        assert not Path("models/i2p.partial").exists()
        snapshots[enabled] = {
            p.as_posix(): p.read_bytes() for p in Path("models/i2p").rglob("*") if p.is_file()
        }
    on, off = snapshots[True], snapshots[False]
    assert adapted_tower(Path("models/i2p/clip"), "clip") is None
    assert set(on) - set(off) == {f"models/i2p/clip/{WEIGHTS}"}
    assert json.loads(on["models/i2p/clip/i2p.json"])["enabled"] is True
    for encoder in set(list_encoders()) - {"clip"}:
        assert on[f"models/i2p/{encoder}/i2p.json"] == off[f"models/i2p/{encoder}/i2p.json"]


def test_train_refuses_clip_features_from_another_image_tower(tmp_path):
    from types import SimpleNamespace

    from stages.train import check_image_tower

    tower = tmp_path / "image_tower.safetensors"
    tower.write_bytes(b"weights")
    adapted = SimpleNamespace(path="features/demo/clip.h5", provenance={"i2p": sha256_file(tower)})
    plain = SimpleNamespace(path="features/demo/clip.h5", provenance={"i2p": None})
    check_image_tower(adapted, tower)
    check_image_tower(plain, None)
    with pytest.raises(ValueError, match="extracted with Image2Prompt weights None"):
        check_image_tower(plain, tower)
    with pytest.raises(ValueError, match="but this run uses None"):
        check_image_tower(adapted, None)
