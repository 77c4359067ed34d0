"""The `vlm` encoder on tiny random models of four transformers families, offline.

Parity is against the plain transformers forward of each (image, prompt) pair alone, so it checks the
batching (padding, masks, every processor output passed on) and the pooling, not the models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.encoders import create_encoder
from pipeline.encoders.common import MA_AGIQA_PROMPTS
from pipeline.encoders.vlm import POOLINGS, from_canvas, to_canvas
from pipeline.encoders.vlm.loading import load_vlm, weights_digest
from pipeline.encoders.vlm.tiny import FAMILIES, ensure_tiny_checkpoint, tiny_vlm

# A long and a short prompt, and two image sizes that give different numbers of image tokens (Qwen, Idefics3),
# so every batch is padded.
PROMPTS = ["semantic_content", "ok?"]
SIZES = [(48, 96), (64, 64)]  # (height, width)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-cache")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def demo_cfg(cache: Path, family: str, **overrides) -> dict:
    """A params-shaped `extract.vlm` section."""
    cfg = {
        "checkpoint": "Qwen/Qwen2-VL-2B-Instruct",
        "revision": "main",
        "prompts": PROMPTS,
        "pooling": "mean",
        "hidden_layer": -1,
        "demo": {"seed": 0, "family": family, "cache_dir": str(cache)},
    }
    return cfg | overrides


def reference(model, processor, image: Image.Image, text: str, pooling: str, layer: int) -> torch.Tensor:
    """Plain transformers: the pair alone (no padding), full model, pooled by hand."""
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        h = model(**inputs, output_hidden_states=True).hidden_states[layer][0]
    config = model.config
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    visual = inputs["input_ids"][0] == image_token
    assert visual.any() and (~visual).any()
    return {
        "mean": h.mean(0),
        "last": h[-1],
        "mean_visual": h[visual].mean(0),
        "mean_text": h[~visual].mean(0),
    }[pooling]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_with_each_pair_alone(cache: Path, images: list[Image.Image], family: str) -> None:
    for pooling in POOLINGS:
        for layer in (-1, 1):
            enc = create_encoder("vlm", demo_cfg(cache, family, pooling=pooling, hidden_layer=layer), "demo")
            batch = enc.processor(
                text=enc.texts * 2, images=[im for im in images for _ in PROMPTS], padding=True
            )
            assert not all(all(row) for row in batch["attention_mask"]), "the batch must be padded"
            got = enc.features(images)
            assert got.shape == (len(images), len(PROMPTS), enc.feature_dim)
            for i, image in enumerate(images):
                for p, text in enumerate(enc.texts):
                    want = reference(enc.model, enc.processor, image, text, pooling, layer)
                    err = (got[i, p] - want).abs().max().item()
                    assert err <= 1e-5, f"{family} {pooling} layer {layer} image {i} prompt {p}: {err}"
            # The image comes before the question, so under causal attention its states ignore the prompt.
            assert torch.allclose(got[:, 0], got[:, 1]) == (pooling == "mean_visual")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vqascore_equals_each_question_alone(cache: Path, images: list[Image.Image], family: str) -> None:
    """P(yes) of a padded batch of questions of different lengths, against the full model's own logits for
    each (image, question) alone: the answer position is each row's last real token."""
    enc = create_encoder("vlm", demo_cfg(cache, family, zeroshot=["vqascore"]), "demo")
    prompts = ["a red fox sitting in deep snow under a pale winter sky", "cat"]
    got = enc.vqascore(images, prompts)
    for image, prompt, p_yes in zip(images, prompts, got, strict=True):
        text = enc._render(f'Does this figure show "{prompt}"? Please answer yes or no.')
        inputs = enc.processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            want = enc.model(**inputs).logits[0, -1].softmax(-1)[enc.yes_id]
        assert abs(p_yes.item() - want.item()) <= 1e-4 * want.item(), (
            family,
            prompt,
            p_yes.item(),
            want.item(),
        )
    pixels = torch.stack([enc.preprocess(image) for image in images])
    out = enc.encode(pixels, prompts)
    assert out["vqascore"].shape == (2, 1) and enc.schema()["vqascore"] == ((1,), "float32")
    with pytest.raises(ValueError, match="needs each image's prompt"):
        enc.encode(pixels)


def test_encode_through_the_default_collate(cache: Path, images: list[Image.Image]) -> None:
    """preprocess -> torch.stack (the extract stage's collate) -> encode: the features, as the schema says."""
    enc = create_encoder("vlm", demo_cfg(cache, "qwen2_vl", max_side=96), "demo")
    pixels = torch.stack([enc.preprocess(image) for image in images])
    assert pixels.shape == (2, 4, 96, 96) and pixels.dtype == torch.uint8
    out = enc.encode(pixels)
    (shape, dtype) = enc.schema()["features"]
    assert out["features"].shape == (len(images), *shape) and out["features"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["features"], enc.features(images).numpy().astype(np.float16))
    assert enc.extras(["a prompt"]) == {}


def test_bfloat16_runs_close_to_float32(cache: Path, images: list[Image.Image]) -> None:
    """The paper profile's default dtype: floating inputs are cast to it, token ids and masks are not."""
    cfg = demo_cfg(cache, "qwen2_5_vl")
    full = create_encoder("vlm", cfg, "demo", dtype="float32").features(images)
    enc = create_encoder("vlm", cfg, "demo", dtype="bfloat16")
    assert enc.provenance()["compute_dtype"] == "bfloat16"
    torch.testing.assert_close(enc.features(images), full, atol=0.05, rtol=0)


def test_canvas_round_trip_and_downscale(images: list[Image.Image]) -> None:
    for image in images:
        back = from_canvas(to_canvas(image, 96))
        assert back.size == image.size
        np.testing.assert_array_equal(np.asarray(back), np.asarray(image))
    small = from_canvas(to_canvas(images[0], 32))  # 96x48 -> longer side 32
    assert small.size == (32, 16)
    gray = from_canvas(to_canvas(images[1].convert("L"), 96))
    assert gray.mode == "RGB" and gray.size == (64, 64)


def test_tiny_checkpoint_loads_like_a_hub_checkpoint(
    cache: Path, images: list[Image.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ensure_tiny_checkpoint(cache, "llava", 3)
    assert ensure_tiny_checkpoint(cache, "llava", 3) == folder
    built, _ = tiny_vlm("llava", 3)
    model, processor, source = load_vlm(folder, None, torch.float32, "cpu")
    loaded = model.state_dict()
    assert all(torch.equal(t, loaded[key]) for key, t in built.state_dict().items())
    assert processor.tokenizer.padding_side == "right"
    assert source == {"checkpoint": str(folder), "weights_sha256": weights_digest(folder)}
    assert weights_digest(folder) != weights_digest(ensure_tiny_checkpoint(cache, "llava", 4))

    # The same folder as a hub snapshot in an offline cache: named by its commit, not by a digest.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--agiqa--tiny-llava"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_model, _, hub_source = load_vlm("agiqa/tiny-llava", "main", torch.float32, "cpu")
    assert hub_source == {"checkpoint": "agiqa/tiny-llava", "revision": commit}
    assert all(torch.equal(t, hub_model.state_dict()[key]) for key, t in loaded.items())


def test_demo_provenance(cache: Path) -> None:
    enc = create_encoder("vlm", demo_cfg(cache, "idefics3", pooling="mean_text"), "demo")
    prov = enc.provenance()
    assert prov["encoder"] == "vlm" and prov["profile"] == "demo"
    assert prov["model_type"] == "idefics3" and prov["model_class"] == "Idefics3ForConditionalGeneration"
    assert prov["checkpoint"] == "tiny-random-idefics3-seed0" and len(prov["weights_sha256"]) == 64
    assert prov["prompt_names"] == PROMPTS
    assert prov["prompts"] == [MA_AGIQA_PROMPTS["semantic_content"], "ok?"]
    assert prov["rendered_prompts"][1] == "<|begin_of_text|>User:<image>ok?<end_of_utterance>\nAssistant:"
    assert prov["pooled_positions"] == "text" and prov["image_token"] == "<image>"
    assert prov["hidden_layer"] == -1 and prov["compute_dtype"] == "float32" and prov["feature_dim"] == 32
    assert enc.schema() == {"features": ((2, 32), "float16")}
    for family in FAMILIES:  # stores keep provenance as JSON
        prov = create_encoder("vlm", demo_cfg(cache, family), "demo").provenance()
        assert json.loads(json.dumps(prov)) == prov


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"pooling": "max"}, "extract.<name>.pooling"),
        ({"prompts": []}, "extract.<name>.prompts"),
        ({"prompts": ["fine", ""]}, "extract.<name>.prompts"),
        ({"prompts": ["look at <|image_pad|>"]}, "extract.<name>.prompts"),
        ({"hidden_layer": 3}, "extract.<name>.hidden_layer"),
        ({"max_side": 0}, "extract.<name>.max_side"),
        ({"demo": {"family": "mplug_owl2"}}, "extract.<name>.demo.family"),
    ],
)
def test_bad_config_names_the_key(cache: Path, overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        create_encoder("vlm", demo_cfg(cache, "qwen2_vl", **overrides), "demo")


def test_paper_profile_needs_a_checkpoint(cache: Path) -> None:
    with pytest.raises(ValueError, match=r"extract\.<name>\.checkpoint"):
        create_encoder("vlm", demo_cfg(cache, "qwen2_vl", checkpoint=""), "paper")
    with pytest.raises(ValueError, match=r"extract\.<name>\.checkpoint"):
        create_encoder("vlm", demo_cfg(cache, "qwen2_vl", checkpoint="not a repo id"), "paper")
