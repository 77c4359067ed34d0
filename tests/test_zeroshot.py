"""Zero-shot scorers on the mPLUG-Owl2 port: parity with the original's logits, padding, the shared pass."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from stand_ins import ChunkTable
from torch.testing import assert_close

from pipeline.encoders.common import single_token_ids
from pipeline.encoders.semantic.mplug_owl2 import zeroshot
from pipeline.encoders.semantic.mplug_owl2.checkpoint import load_model
from pipeline.encoders.semantic.mplug_owl2.extract import SemanticExtractor
from pipeline.encoders.semantic.mplug_owl2.tiny import byte_tokenizer
from pipeline.encoders.semantic.mplug_owl2.zeroshot import (
    RATING_WORDS,
    QAlignScorer,
    SharedPass,
    VQAScorer,
    qalign_prompt_ids,
    qalign_score,
    vqascore_prompt_ids,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mplug-owl2-tiny"
EXACT = {"atol": 1e-5, "rtol": 0}
CASES = ("case_a", "case_b")
WORDS = [40, 41, 42, 43, 44]  # stand-ins for excellent..bad in the fixture's 128-id vocabulary
YES = 50


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    if not (FIXTURE / "expected.safetensors").exists():
        pytest.skip(f"mPLUG-Owl2 fixture not found at {FIXTURE}")
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="module")
def model(expected):
    return load_model(FIXTURE, lm_head=True)


def ids_of(expected, case: str) -> list[int]:
    return expected[f"{case}.input_ids"][0].tolist()  # case_a: 9 ids, image at 5; case_b: 15 ids, at 8


def answer_logits(expected, case: str) -> torch.Tensor:
    """The original's logits at the last position, where the answer token would come: (2, 128)."""
    return expected[f"{case}.logits"][:, -1]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_the_original(model, expected, case):
    ids, images = expected[f"{case}.input_ids"], expected[f"{case}.images"]
    with torch.no_grad():
        full = model.lm_head(model(ids, images)[-1])
    assert_close(full, expected[f"{case}.logits"], **EXACT)
    scorer = VQAScorer(model, YES)  # the cached-prefix, padded path every scorer uses
    got = scorer.logits(model.encode_images(images), [ids_of(expected, case)] * 2)
    assert_close(got, answer_logits(expected, case), **EXACT)


@pytest.mark.parametrize("case", CASES)
def test_qalign_equals_a_direct_computation_from_the_original_logits(model, expected, case):
    log_probs = QAlignScorer(model, ids_of(expected, case), WORDS)(expected[f"{case}.images"])
    logits = answer_logits(expected, case)
    assert log_probs.shape == (2, 5)
    assert_close(log_probs, logits.log_softmax(-1)[:, WORDS], **EXACT)
    direct = logits[:, WORDS].softmax(-1) @ torch.tensor([5.0, 4, 3, 2, 1])
    assert_close(qalign_score(log_probs), direct, **EXACT)
    assert ((direct >= 1) & (direct <= 5)).all() and (direct[0] - direct[1]).abs() > 1e-3  # images differ


def test_vqascore_mixed_prompts_equal_the_original(model, expected):
    """One batch, each image with its own prompt: different prefixes (5 / 8 ids) and suffixes (3 / 6)."""
    images = torch.cat([expected["case_a.images"][:1], expected["case_b.images"][1:]])
    p_yes = VQAScorer(model, YES)(images, [ids_of(expected, "case_a"), ids_of(expected, "case_b")])
    direct = torch.stack(
        [
            answer_logits(expected, "case_a")[0].softmax(-1)[YES],
            answer_logits(expected, "case_b")[1].softmax(-1)[YES],
        ]
    )
    assert_close(p_yes, direct, atol=0, rtol=1e-5)  # relative: P(yes) is ~0.005


def test_batched_rows_of_different_lengths_equal_each_row_alone(model, expected):
    """Padding must change nothing: same image prefix, suffixes of 3, 6 and 1 ids, and no prefix at all."""
    a, b = ids_of(expected, "case_a"), ids_of(expected, "case_b")
    prompts = [a, b, [1, 5, 6, 7, 8, -200, 9], [-200, 30, 31], b]
    images = torch.cat([expected["case_a.images"], expected["case_b.images"], expected["case_a.images"][1:]])
    scorer = VQAScorer(model, YES)
    batched = scorer(images, prompts)
    alone = torch.cat([scorer(images[r : r + 1], [p]) for r, p in enumerate(prompts)])
    assert_close(batched, alone, atol=0, rtol=1e-5)
    assert_close(batched[1], batched[4], atol=0, rtol=1e-5)  # same image, same prompt
    assert (batched[:4].max() - batched[:4].min()) > 1e-4  # and the rows do differ


def test_prefix_is_run_once_for_a_fixed_prompt(model, expected, monkeypatch):
    calls = []
    run = zeroshot.run_prefixes
    monkeypatch.setattr(zeroshot, "run_prefixes", lambda *a: calls.append(len(a[1])) or run(*a))
    qalign = QAlignScorer(model, ids_of(expected, "case_b"), WORDS)
    first = qalign(expected["case_a.images"])
    assert_close(qalign(expected["case_a.images"]), first, atol=0, rtol=0)
    assert calls == [1]
    vqa = VQAScorer(model, YES)
    vqa(expected["case_a.images"], [ids_of(expected, "case_a")] * 2)
    vqa(expected["case_a.images"], [ids_of(expected, "case_a"), ids_of(expected, "case_b")])
    assert calls == [1, 1, 2]  # a new set of prefixes is computed, batched


def test_multi_token_answer_word_is_named():
    tokenizer = byte_tokenizer()  # one id per byte: only one-letter words are single tokens
    assert single_token_ids(tokenizer, ["a", "Y"]) == [
        tokenizer("a")["input_ids"][1],
        tokenizer("Y")["input_ids"][1],
    ]
    with pytest.raises(ValueError, match=r"'excellent' is 9 tokens"):
        single_token_ids(tokenizer, RATING_WORDS)
    with pytest.raises(ValueError, match=r"'bad' is 3 tokens"):
        single_token_ids(tokenizer, ["a", "bad"])


def test_word_ids_skip_bos_and_prompt_variants_differ_by_the_separator():
    """Stand-in ids (the word ids are the commonly quoted, unverified LLaMA ones)."""
    words = dict(zip(RATING_WORDS, [15129, 1781, 6534, 6460, 4319], strict=True))
    table = {w: [1, i] for w, i in words.items()}
    question = "USER: How would you rate the quality of this image?\n"
    answer = "ASSISTANT: The quality of the image is"
    table |= {question: [1, 11], "\n" + answer: [1, 29871, 13, 22], " " + answer: [1, 29871, 22]}
    tokenizer = ChunkTable(table)
    assert single_token_ids(tokenizer, RATING_WORDS) == list(words.values())
    assert qalign_prompt_ids(tokenizer) == [1, 11, -200, 29871, 13, 22]  # default: HF score(), newline
    assert qalign_prompt_ids(tokenizer, "space") == [1, 11, -200, 29871, 22]  # iqa_eval.py
    with pytest.raises(ValueError, match="variant must be one of newline, space"):
        qalign_prompt_ids(tokenizer, "tab")


def test_vqascore_prompts_put_the_image_first_and_share_the_prefix():
    tokenizer = byte_tokenizer()
    ids = vqascore_prompt_ids(tokenizer, ["a cat", 'a "red" {car}'])
    heads = [p[: p.index(-200)] for p in ids]
    assert heads[0] == heads[1] and tokenizer.decode(heads[0], skip_special_tokens=True) == "USER: "
    tail = tokenizer.decode(ids[1][ids[1].index(-200) + 1 :])
    assert tail == 'Does this figure show "a "red" {car}"? Please answer yes or no. ASSISTANT:'


def test_qalign_score_weights():
    log_probs = torch.tensor([[0.0, -50, -50, -50, -50], [-50, -50, -50, -50, 0.0], [0.0, 0, 0, 0, 0]])
    assert_close(qalign_score(log_probs), torch.tensor([5.0, 1.0, 3.0]))
    assert_close(qalign_score(log_probs, (1, 0.75, 0.5, 0.25, 0)), (qalign_score(log_probs) - 1) / 4)
    assert_close(qalign_score(log_probs - 7), qalign_score(log_probs))  # renormalised over the five


def test_shared_pass_equals_the_separate_passes(model, expected, monkeypatch):
    images = torch.cat([expected["case_a.images"], expected["case_b.images"]])
    prompts = [ids_of(expected, "case_a"), ids_of(expected, "case_b")]
    vqa_prompts = [prompts[0], prompts[1], prompts[1], [-200, 30, 31]]
    extractor = SemanticExtractor(model, prompts)
    qalign, vqa = QAlignScorer(model, prompts[1], WORDS), VQAScorer(model, YES)
    separate = {"features": extractor(images), "qalign": qalign(images), "vqascore": vqa(images, vqa_prompts)}
    seen = []
    vision = model.model.vision_model
    monkeypatch.setattr(vision, "forward", lambda x, f=vision.forward: seen.append(len(x)) or f(x))
    shared = SharedPass(extractor, qalign, vqa)(images, vqa_prompts)
    assert seen == [4]  # the vision tower ran once for all three outputs
    assert shared.keys() == separate.keys()
    for key, value in separate.items():
        assert_close(shared[key], value, atol=0, rtol=0, msg=key)
    headless = SemanticExtractor(load_model(FIXTURE), prompts)(images)  # the extraction as it is today
    assert_close(shared["features"], headless, atol=0, rtol=0)
    assert_close(shared["features"][:2, 0], expected["case_a.pooled_mean"], **EXACT)
    assert SharedPass(qalign=qalign)(images).keys() == {"qalign"}


def test_shared_pass_out_of_memory_halves_and_keeps_order(model, expected, monkeypatch):
    images = torch.cat([expected["case_a.images"], expected["case_b.images"]])
    prompts = [ids_of(expected, c) for c in CASES] * 2
    shared = SharedPass(qalign=QAlignScorer(model, prompts[0], WORDS), vqascore=VQAScorer(model, YES))
    full = shared(images, prompts)
    real = shared._run

    def limited(pixels, ids):
        if len(pixels) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(pixels, ids)

    monkeypatch.setattr(shared, "_run", limited)
    halved = shared(images, prompts)
    assert shared.max_images == 1
    for key in full:
        assert_close(halved[key], full[key], **EXACT)


def test_bad_arguments_are_refused(model, expected):
    headless = load_model(FIXTURE)
    with pytest.raises(ValueError, match=r"lm_head=True"):
        VQAScorer(headless, YES)
    with pytest.raises(ValueError, match="exactly one image token, found 0"):
        QAlignScorer(model, [1, 5, 6], WORDS)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        VQAScorer(model, YES)(expected["case_a.images"], [ids_of(expected, "case_a")])
    vqa = VQAScorer(model, YES)
    with pytest.raises(ValueError, match="prompt_ids are needed exactly when"):
        SharedPass(vqascore=vqa)(expected["case_a.images"])
    with pytest.raises(ValueError, match="share one model"):
        SharedPass(SemanticExtractor(headless, [ids_of(expected, "case_a")]), vqascore=vqa)


def test_lm_head_is_off_by_default(model):
    """Extraction loads what it did before: no head, and every other tensor as with the head."""
    headless = load_model(FIXTURE)
    assert headless.lm_head is None
    state, with_head = headless.state_dict(), model.state_dict()
    assert set(with_head) - set(state) == {"lm_head.weight"}
    assert all(torch.equal(state[k], with_head[k]) for k in state)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(model) - nbytes(headless) == 128 * 64 * 4  # vocab x width x fp32


def test_a_q_align_style_checkpoint_loads(model, tmp_path):
    """Q-Align's config adds training-only keys; saved by transformers 4.36 it has no inv_freq buffers."""
    config = json.loads((FIXTURE / "config.json").read_text())
    config |= {
        "image_aspect_ratio": "pad",
        "freeze_vision_model": False,
        "tune_visual_abstractor": True,
        "visual_abstractor_lr": None,
        "transformers_version": "4.36.1",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(FIXTURE / "model.safetensors").items() if "inv_freq" not in k}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(tmp_path, lm_head=True)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())
