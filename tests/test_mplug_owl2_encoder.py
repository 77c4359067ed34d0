"""The `semantic` registry encoder: demo profile through the real loader, paper profile on a local folder."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.encoders import create_encoder
from pipeline.encoders.semantic.mplug_owl2.checkpoint import load_model
from pipeline.encoders.semantic.mplug_owl2.processing import build_prompt, load_tokenizer, tokenize_prompt
from pipeline.encoders.semantic.mplug_owl2.tiny import TINY_CONFIG, ensure_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = [
    "Evaluate the input image to determine if its quality is compromised due to a lack of meaningful "
    "semantic content.",
    "Evaluate if the image quality is compromised due to violations of coherence.",
]


def section(tmp_path, **overrides):
    cfg = {
        "checkpoint": "MAGAer13/mplug-owl2-llama2-7b",
        "revision": "main",
        "prompts": PROMPTS,
        "pooling": "mean",
        "hidden_layer": -1,
        "demo": {"seed": 0, "cache_dir": str(tmp_path / "cache")},
    }
    return cfg | overrides


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enc")
    return create_encoder("semantic", section(tmp), profile="demo"), tmp


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)) for i in range(3)]


def test_demo_encoder_end_to_end(demo):
    encoder, tmp = demo
    assert encoder.schema() == {"features": ((2, TINY_CONFIG.hidden_size), "float16")}
    pixels = torch.stack([encoder.preprocess(im) for im in images()])
    assert pixels.shape == (3, 3, 112, 112)
    out = encoder.encode(pixels)
    assert (
        set(out) == {"features"}
        and out["features"].shape == (3, 2, 64)
        and out["features"].dtype == np.float16
    )
    assert encoder.extras(["a prompt"]) == {}

    # The same numbers as the original's computation: one full forward per prompt, mean over every position.
    (directory,) = (tmp / "cache").iterdir()
    model, tokenizer = load_model(directory), load_tokenizer(directory)
    for p, question in enumerate(PROMPTS):
        ids = tokenize_prompt(build_prompt(question), tokenizer)
        with torch.no_grad():
            expected = model(torch.tensor([ids] * 3), pixels)[-1].mean(1)
        np.testing.assert_allclose(out["features"][:, p], expected.half().numpy(), atol=1e-3, rtol=1e-3)


def test_demo_provenance(demo):
    encoder, _ = demo
    prov = encoder.provenance()
    json.dumps(prov)
    assert prov["checkpoint"] == "tiny-random-seed0" and len(prov["weights_sha256"]) == 64
    assert prov["prompts"] == PROMPTS and prov["pooling"] == "mean" and prov["hidden_layer"] == -1
    assert (
        prov["profile"] == "demo"
        and prov["compute_dtype"] == "float32"
        and prov["resolution"] == 112
        and prov["feature_dim"] == 64
    )
    assert [ids.count(-200) for ids in prov["prompt_token_ids"]] == [1, 1]
    assert prov["prompt_template"] == "USER: {question}\n<|image|> ASSISTANT:"


def test_demo_checkpoint_is_reused_and_seeded(demo, tmp_path):
    encoder, tmp = demo
    again = create_encoder("semantic", section(tmp), profile="demo")
    assert len(list((tmp / "cache").iterdir())) == 1
    assert again.provenance() == encoder.provenance()
    other = create_encoder(
        "semantic", section(tmp, demo={"seed": 1, "cache_dir": str(tmp / "cache")}), "demo"
    )
    assert other.provenance()["weights_sha256"] != encoder.provenance()["weights_sha256"]


def test_paper_profile_on_a_local_folder(tmp_path):
    directory = ensure_tiny_checkpoint(tmp_path, seed=3)
    encoder = create_encoder(
        "semantic",
        section(tmp_path, checkpoint=str(directory), pooling="last", hidden_layer=1),
        "paper",
        dtype="bfloat16",
    )
    prov = encoder.provenance()
    assert (
        prov["checkpoint"] == str(directory) and "revision" not in prov and len(prov["weights_sha256"]) == 64
    )
    assert (
        prov["profile"] == "paper"
        and prov["compute_dtype"] == "bfloat16"
        and prov["pooling"] == "last"
        and prov["hidden_layer"] == 1
    )
    assert encoder.schema()["features"] == ((2, 64), "float16")
    out = encoder.encode(torch.stack([encoder.preprocess(im) for im in images()]))
    assert out["features"].dtype == np.float16 and np.isfinite(out["features"]).all()


@pytest.mark.parametrize(
    ("overrides", "kwargs", "match"),
    [
        ({"prompts": []}, {}, "prompts must be a non-empty list"),
        ({}, {"dtype": "int8"}, "dtype must be auto or one of"),
        ({"checkpoint": None}, {}, "checkpoint is required"),
        ({"prompt_template": "USER: {question} ASSISTANT:"}, {}, "must contain '<|image|>'"),
        ({"pooling": "max"}, {}, "pooling must be one of"),
        ({"hidden_layer": 7}, {"profile": "demo"}, "hidden_layer 7 out of range"),
    ],
)
def test_bad_sections_are_refused(tmp_path, overrides, kwargs, match):
    """Paper-profile cases fail before any checkpoint is looked up (none is available offline)."""
    kwargs = {"profile": "paper"} | kwargs
    with pytest.raises(ValueError, match=match.replace("|", r"\|")):
        create_encoder("semantic", section(tmp_path, **overrides), **kwargs)


def test_prompt_names_stand_for_ma_agiqa_questions(tmp_path):
    """params name MA-AGIQA's questions; the store's provenance records the verbatim text asked."""
    enc = create_encoder(
        "semantic", section(tmp_path, prompts=["semantic_content", "coherence", "Is it sharp?"]), "demo"
    )
    prov = enc.provenance()
    assert prov["prompts"] == [*PROMPTS, "Is it sharp?"]
    assert prov["prompt_names"] == ["semantic_content", "coherence", "Is it sharp?"]
    assert enc.schema()["features"][0][0] == 3
