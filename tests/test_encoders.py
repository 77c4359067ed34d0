"""Every registered encoder, built as the demo profile builds it, against independent computations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.encoders import create_encoder, list_encoders


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


def _section(params, kind: str) -> dict:
    """A kind's demo params: its own extract section, or for vlm the first `vlms` entry's."""
    return params["extract"][params["vlms"][0] if kind == "vlm" else kind]


class _Built(dict):
    """Builds each demo encoder on first use, once per module."""

    def __init__(self, params):
        super().__init__()
        self.params = params

    def __missing__(self, name):
        self[name] = create_encoder(name, _section(self.params, name), "demo")
        return self[name]


@pytest.fixture(scope="module")
def encoders(params):
    return _Built(params)


@pytest.mark.parametrize("name", list_encoders())
def test_schema_provenance_and_determinism(name, encoders, params, image):
    enc = encoders[name]
    pixels = torch.stack([enc.preprocess(image), enc.preprocess(image.rotate(90))])
    asked = {"prompts": ["a red fox", "a cat"]} if getattr(enc, "reads_prompts", False) else {}
    out = enc.encode(pixels, **asked)
    schema = enc.schema()
    assert set(out) == set(schema)
    for key, (shape, dtype) in schema.items():
        assert out[key].shape == (2, *shape)
        assert out[key].dtype == np.dtype(dtype)
        assert np.isfinite(out[key]).all()
    assert not np.array_equal(out["features"][0], out["features"][1])
    json.dumps(enc.provenance())  # must be storable as attributes
    again = create_encoder(name, _section(params, name), "demo").encode(pixels, **asked)
    np.testing.assert_array_equal(again["features"], out["features"])


def test_vit_tokens_equal_block_outputs_read_by_hooks(encoders, image):
    """MA-AGIQA hooks every block and concatenates blocks 6..9 without CLS: do exactly that."""
    enc = encoders["vit"]
    captured = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o)) for blk in enc.model.blocks]
    pixels = enc.preprocess(image)[None]
    with torch.no_grad():
        enc.model(pixels)
    for h in hooks:
        h.remove()
    expected = torch.cat([captured[b][:, 1:] for b in (6, 7, 8, 9)], dim=-1)
    got = enc.encode(pixels)["features"]
    side = enc.model.patch_embed.grid_size[0]
    assert got.shape == (1, side * side, 4 * enc.model.embed_dim)
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3)  # float16 storage


def test_vit_preprocess_is_whole_image_bicubic_half_normalised(encoders, image, params):
    x = encoders["vit"].preprocess(image)
    size = params["extract"]["vit"]["demo"]["img_size"]
    ref = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (ref - 0.5) / 0.5, atol=1e-6)


def test_clip_map_is_trunk_before_attnpool_and_text_matches_open_clip(encoders, image):
    import open_clip

    enc = encoders["clip"]
    v = enc.model.visual
    pixels = enc.preprocess(image)[None]
    with torch.no_grad():
        trunk = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))
        pooled = v.attnpool(trunk)
    np.testing.assert_allclose(enc.encode(pixels)["features"], trunk.numpy(), rtol=2e-3, atol=2e-3)
    assert pooled.shape[-1] == enc.model.text_projection.shape[1]
    prompts = ["a red circle on a blue background", "a dog"]
    extras = enc.extras(prompts)
    tokens = open_clip.get_tokenizer(enc.arch)(prompts)
    np.testing.assert_array_equal(extras["text_tokens"], tokens.numpy())
    with torch.no_grad():
        ref = enc.model.encode_text(tokens)
    np.testing.assert_allclose(extras["text_features"], ref.numpy(), rtol=1e-5, atol=1e-5)
    assert (extras["text_tokens"][np.arange(2), extras["text_eot"]] == 49407).all()


def test_unknown_encoder_and_profile_are_named():
    with pytest.raises(KeyError, match="unknown encoder 'nope'"):
        create_encoder("nope", {}, "demo")
    with pytest.raises(ValueError, match="profile must be"):
        create_encoder("vit", {}, "full")
