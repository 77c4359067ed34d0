"""Prompt template, MA-AGIQA token ids (spec 3.3), tokenizers, expand2square and CLIP preprocessing."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import ChunkTable
from transformers import CLIPImageProcessorPil

from pipeline.encoders.semantic.mplug_owl2.checkpoint import CheckpointError, resolve_checkpoint
from pipeline.encoders.semantic.mplug_owl2.config import MplugOwl2Config
from pipeline.encoders.semantic.mplug_owl2.processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImagePreprocessor,
    build_prompt,
    expand2square,
    load_tokenizer,
    tokenize_prompt,
)
from pipeline.encoders.semantic.mplug_owl2.tiny import byte_tokenizer, ensure_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEMANTIC = (
    "Evaluate the input image to determine if its quality is compromised due to a lack of meaningful "
    "semantic content."
)
COHERENCE = "Evaluate if the image quality is compromised due to violations of coherence."
# Spec 3.3: the LLaMA-2 ids of MA-AGIQA's two prompts (-200 = image placeholder).
SEMANTIC_IDS = [
    1, 3148, 1001, 29901, 382, 4387, 403, 278, 1881, 1967, 304, 8161, 565, 967, 11029, 338, 19632, 3368, 2861,
    304, 263, 10225, 310, 6593, 1319, 28837, 2793, 29889, 13, -200, 29871, 319, 1799, 9047, 13566, 29901,
]  # fmt: skip
COHERENCE_IDS = [
    1, 3148, 1001, 29901, 382, 4387, 403, 565, 278, 1967, 11029, 338, 19632, 3368, 2861, 304, 5537, 800, 310,
    16165, 261, 663, 29889, 13, -200, 29871, 319, 1799, 9047, 13566, 29901,
]  # fmt: skip
ASSISTANT_IDS = [1, 29871, 319, 1799, 9047, 13566, 29901]  # " ASSISTANT:" on its own, with BOS


def test_prompt_string_is_the_mplug_owl2_conversation():
    assert build_prompt(COHERENCE) == f"USER: {COHERENCE}\n<|image|> ASSISTANT:"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("USER: {question} ASSISTANT:", "<|image|>"),
        ("USER: <|image|> ASSISTANT:", "{question}"),
        ("USER: {question}\n<|image|><|image|> ASSISTANT:", "<|image|>"),
    ],
)
def test_bad_templates_are_refused(template, match):
    with pytest.raises(ValueError, match=rf"template .*must contain '{match}'"):
        build_prompt(COHERENCE, template)


def test_question_with_image_placeholder_is_refused():
    with pytest.raises(ValueError, match="must not contain the image placeholder"):
        build_prompt("look <|image|>")


@pytest.mark.parametrize(
    ("question", "expected", "image_at"), [(SEMANTIC, SEMANTIC_IDS, 29), (COHERENCE, COHERENCE_IDS, 24)]
)
def test_ma_agiqa_prompt_ids_from_chunk_ids(question, expected, image_at):
    """Our template + assembly reproduce spec 3.3, given the LLaMA ids of each text chunk."""
    t = expected.index(-200)
    tokenizer = ChunkTable({f"USER: {question}\n": expected[:t], " ASSISTANT:": ASSISTANT_IDS})
    ids = tokenize_prompt(build_prompt(question), tokenizer)
    assert ids == expected and ids.index(-200) == image_at
    assert len(ids) - 1 + MplugOwl2Config().num_visual_tokens == len(expected) + 64  # 95 / 100 positions


def test_bos_handling_without_and_with_bos():
    no_bos = ChunkTable({"a": [5, 6], "b": [7]})
    no_bos.bos_token_id = None
    assert tokenize_prompt("a<|image|>b", no_bos) == [5, 6, -200, 7]
    assert tokenize_prompt("a<|image|>", ChunkTable({"a": [1, 5], "": [1]})) == [1, 5, -200]


def real_tokenizer_dir() -> Path:
    local = os.environ.get("MPLUG_OWL2_CHECKPOINT")
    try:
        directory, _ = resolve_checkpoint(local or "MAGAer13/mplug-owl2-llama2-7b", None if local else "main")
    except CheckpointError as e:
        pytest.skip(f"the real mPLUG-Owl2 tokenizer is not available offline ({e.__class__.__name__})")
    if not (directory / "tokenizer.model").exists():
        pytest.skip(f"{directory} has no tokenizer.model")
    return directory


def test_real_tokenizer_gives_the_spec_ids():
    tokenizer = load_tokenizer(real_tokenizer_dir())
    assert tokenize_prompt(build_prompt(SEMANTIC), tokenizer) == SEMANTIC_IDS
    assert tokenize_prompt(build_prompt(COHERENCE), tokenizer) == COHERENCE_IDS


def test_sentencepiece_tokenizer_dir_loads_like_the_original(tmp_path):
    """A LLaMA-style tokenizer.model through AutoTokenizer gives [BOS] + sentencepiece ids, as the slow
    tokenizer the original used (dummy prefix on every chunk, newline as a byte piece)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([build_prompt(SEMANTIC), build_prompt(COHERENCE)] * 20),
        model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False, minloglevel=2,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,  # as LLaMA's tokenizer.model
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False})
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokenizer = load_tokenizer(tmp_path)
    for chunk in (f"USER: {COHERENCE}\n", " ASSISTANT:"):
        assert tokenizer(chunk)["input_ids"] == [1, *sp.encode(chunk)]


def test_demo_tokenizer_round_trips_through_autotokenizer(tmp_path):
    directory = ensure_tiny_checkpoint(tmp_path, seed=0)
    tokenizer = load_tokenizer(directory)
    assert type(tokenizer).__name__ != "ChunkTable" and len(tokenizer) == len(byte_tokenizer())
    ids = tokenize_prompt(build_prompt("Is it sharp? é"), tokenizer)
    assert ids[0] == 1 and ids.count(-200) == 1 and ids.count(1) == 1
    t = ids.index(-200)
    assert tokenizer.decode(ids[1:t]) == "USER: Is it sharp? é\n"
    assert tokenizer.decode(ids[t + 1 :]) == " ASSISTANT:"
    assert max(ids) < 259


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_tokenizer(tmp_path)


def test_expand2square_pads_with_the_clip_mean_colour():
    wide = Image.new("RGB", (10, 5), (255, 0, 0))
    square = expand2square(wide)
    assert square.size == (10, 10)
    pixels = np.asarray(square)
    assert (pixels[2:7] == [255, 0, 0]).all()  # pasted at y = (10 - 5) // 2 = 2
    assert (pixels[:2] == [122, 116, 104]).all() and (pixels[7:] == [122, 116, 104]).all()
    tall = np.asarray(expand2square(Image.new("RGB", (3, 8), (0, 255, 0))))
    assert (tall[:, 2:5] == [0, 255, 0]).all() and (tall[:, :2] == [122, 116, 104]).all()
    same = Image.new("RGB", (4, 4))
    assert expand2square(same) is same


def test_preprocessing_is_bit_exact_with_the_reference_recipe():
    """Spec 3.1: expand2square, PIL bicubic to 448x448, /255 in float32, CLIP normalisation, CHW."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    ours = ImagePreprocessor(448)(image)
    resized = np.asarray(expand2square(image).resize((448, 448), Image.Resampling.BICUBIC), dtype=np.float32)
    manual = ((resized / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)
    assert ours.dtype == torch.float32 and ours.shape == (3, 448, 448)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(manual)))
    released = CLIPImageProcessorPil(  # MAGAer13's preprocessor_config.json, PIL backend
        size=448, crop_size=448, do_center_crop=True, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    assert torch.equal(ours, released(expand2square(image), return_tensors="pt")["pixel_values"][0])
    assert torch.equal(ours.half(), torch.from_numpy(np.ascontiguousarray(manual)).half())


def test_preprocessing_converts_to_rgb():
    grey = Image.new("L", (20, 30), 200)
    out = ImagePreprocessor(56)(grey)
    assert out.shape == (3, 56, 56)
