"""SemanticExtractor: MA-AGIQA's pooled features, batched padded prompts, pooling options, OOM back-off."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from pipeline.encoders.semantic.mplug_owl2.checkpoint import load_model
from pipeline.encoders.semantic.mplug_owl2.extract import POOLINGS, SemanticExtractor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mplug-owl2-tiny"
EXACT = {"atol": 1e-5, "rtol": 0}


@pytest.fixture(scope="module")
def fixture():
    if not (FIXTURE / "expected.safetensors").exists():
        pytest.skip(f"mPLUG-Owl2 fixture not found at {FIXTURE}")
    expected = load_file(FIXTURE / "expected.safetensors")
    prompts = [expected[f"{case}.input_ids"][0].tolist() for case in ("case_a", "case_b")]  # 9 and 15 ids
    return load_model(FIXTURE), expected, prompts


def reference(model, ids, images, pooling, layer):
    """Pooling computed from the plain full forward of one prompt (the original's computation)."""
    states = model(torch.tensor([ids] * len(images)), images)[layer]
    t, v = ids.index(-200), model.cfg.num_visual_tokens
    visual = torch.zeros(states.shape[1], dtype=torch.bool)
    visual[t : t + v] = True
    return {
        "mean": states.mean(1),
        "last": states[:, -1],
        "mean_visual": states[:, visual].mean(1),
        "mean_text": states[:, ~visual].mean(1),
    }[pooling]


def test_default_mode_reproduces_the_original_pooled_mean(fixture):
    """Both fixture prompts in one batched forward: case_a's row is padded, case_b's is not."""
    model, expected, prompts = fixture
    extractor = SemanticExtractor(model, prompts)
    for p, case in enumerate(("case_a", "case_b")):
        features = extractor(expected[f"{case}.images"])
        assert features.shape == (2, 2, model.cfg.hidden_size) and features.dtype == torch.float32
        assert_close(features[:, p], expected[f"{case}.pooled_mean"], **EXACT)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("layer", [-1, 0, 1, -2])
def test_padded_rows_equal_single_prompt_runs_and_the_full_forward(fixture, pooling, layer):
    model, expected, prompts = fixture
    images = expected["case_b.images"]
    batched = SemanticExtractor(model, prompts, pooling, layer)(images)
    with torch.no_grad():
        for p, ids in enumerate(prompts):
            single = SemanticExtractor(model, [ids], pooling, layer)(images)[:, 0]
            assert_close(batched[:, p], single, **EXACT)
            assert_close(single, reference(model, ids, images, pooling, layer), **EXACT)


def test_pooling_options_differ(fixture):
    model, expected, prompts = fixture
    images = expected["case_a.images"]
    outs = [SemanticExtractor(model, prompts, pooling)(images) for pooling in POOLINGS]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-3, (POOLINGS[i], POOLINGS[j])


def test_lm_head_is_never_run(fixture):
    model, expected, prompts = fixture
    model_with_head = load_model(FIXTURE, lm_head=True)
    calls = []
    model_with_head.lm_head.register_forward_hook(lambda *args: calls.append(1))
    features = SemanticExtractor(model_with_head, prompts)(expected["case_a.images"])
    assert calls == [] and model.lm_head is None
    assert_close(features, SemanticExtractor(model, prompts)(expected["case_a.images"]), atol=0, rtol=0)


def test_vision_runs_once_per_image(fixture, monkeypatch):
    model, expected, prompts = fixture
    extractor = SemanticExtractor(model, prompts * 2)  # four prompts
    seen = []
    vision = model.model.vision_model
    monkeypatch.setattr(vision, "forward", lambda x, f=vision.forward: seen.append(len(x)) or f(x))
    extractor(expected["case_a.images"])
    assert seen == [2]


def test_out_of_memory_halves_the_batch_and_keeps_order(fixture, monkeypatch):
    model, expected, prompts = fixture
    images = torch.cat([expected["case_a.images"], expected["case_b.images"]] * 2)  # 8 images
    extractor = SemanticExtractor(model, prompts)
    full = extractor(images)
    real = extractor._features
    sizes = []

    def limited(pixels):
        sizes.append(len(pixels))
        if len(pixels) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixels)

    monkeypatch.setattr(extractor, "_features", limited)
    assert_close(extractor(images), full, **EXACT)
    assert sizes == [8, 4, 2, 2, 2, 2] and extractor.max_images == 2


def test_out_of_memory_with_one_image_is_raised(fixture, monkeypatch):
    model, expected, prompts = fixture
    extractor = SemanticExtractor(model, prompts)

    def always(pixels):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(extractor, "_features", always)
    with pytest.raises(torch.OutOfMemoryError):
        extractor(expected["case_a.images"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, "pooling must be one of"),
        ({"hidden_layer": 3}, "hidden_layer 3 out of range"),
        ({"hidden_layer": -4}, "hidden_layer -4 out of range"),
        ({"prompt_ids": [[1, 5, 6]]}, "prompt 0 must contain exactly one image token, found 0"),
        ({"prompt_ids": [[1, -200, 2, -200]]}, "found 2"),
        ({"prompt_ids": [[-200]], "pooling": "mean_text"}, "needs text tokens"),
        ({"prompt_ids": []}, "at least one prompt"),
    ],
)
def test_bad_arguments_are_refused(fixture, kwargs, match):
    model, _, prompts = fixture
    kwargs = {"prompt_ids": prompts} | kwargs
    with pytest.raises(ValueError, match=match):
        SemanticExtractor(model, **kwargs)


def test_prompt_starting_with_the_image(fixture):
    """No text before the image: no prefix to cache, still the plain forward's numbers."""
    model, expected, _ = fixture
    ids = [-200, 9, 10, 11]
    images = expected["case_a.images"]
    got = SemanticExtractor(model, [ids, [1, 5, -200, 7]])(images)[:, 0]
    assert_close(got, reference(model, ids, images, "mean", -1), **EXACT)
