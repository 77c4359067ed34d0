"""Zero-shot scorers on the mPLUG-Owl2 port: Q-Align / OneAlign quality and VQAScore-style alignment.

Both read the next-token distribution at the answer position (the last token of the prompt) of one
forward pass; nothing is generated. They reuse `extract`'s machinery: the text before the image is run
once per distinct prefix and its keys/values are shared by every row, and rows of different lengths go
through ONE right-padded, masked decoder forward, `lm_head` running only on each row's last real position.
`SharedPass` runs the vision tower and abstractor once per image for the semantic features and both scores.

Checkpoints: Q-Align / OneAlign (`q-future/one-align`, `q-future/q-align-*`) are mPLUG-Owl2
(`model_type` "mplug_owl2", `MPLUGOwl2LlamaForCausalLM`) with the same parameter names, so they load
through `checkpoint.load_model(..., lm_head=True)`. Their config.json adds training-only keys
(`image_aspect_ratio` "pad", `freeze_vision_model`, `tune_visual_abstractor`, ...), which the config
reader ignores; saved under transformers 4.36 they may lack the `rotary_emb.inv_freq` buffers, which this
port computes whether present or not. Their processor is the same expand2square (CLIP mean) + CLIP 448
preprocessing as `processing.ImagePreprocessor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.encoders.common import VQASCORE_QUESTION, OomBackoff

from .extract import Prefixes, SemanticExtractor, decode_rows, run_prefixes, split_prompt
from .model import MplugOwl2
from .processing import build_prompt, tokenize_prompt

RATING_WORDS = ("excellent", "good", "fair", "poor", "bad")
RATING_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)
# Q-Align's quality prompt. "newline" is the HF `score()` (and pyiqa) string, the one the model card's
# regression value (singapore_flyer.jpg -> 1.911) was computed with; "space" is what the evaluation script
# `iqa_eval.py` builds from the mplug_owl2 conversation (one token different).
_QALIGN_QUESTION = "USER: How would you rate the quality of this image?\n<|image|>"
QALIGN_PROMPTS = {
    "newline": _QALIGN_QUESTION + "\nASSISTANT: The quality of the image is",
    "space": _QALIGN_QUESTION + " ASSISTANT: The quality of the image is",
}
# VQAScore's question and answer (t2v_metrics), in mPLUG-Owl2's own conversation format: the image first.
VQASCORE_TEMPLATE = "USER: <|image|>{question} ASSISTANT:"


def qalign_prompt_ids(tokenizer, variant: str = "newline") -> list[int]:
    """Token ids of the Q-Align quality prompt (`QALIGN_PROMPTS[variant]`), image placeholder included."""
    if variant not in QALIGN_PROMPTS:
        raise ValueError(
            f"Q-Align prompt variant must be one of {', '.join(QALIGN_PROMPTS)}; got {variant!r}"
        )
    return tokenize_prompt(QALIGN_PROMPTS[variant], tokenizer)


def vqascore_prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of the VQAScore question about each generation prompt."""
    return [
        tokenize_prompt(build_prompt(VQASCORE_QUESTION.format(p), VQASCORE_TEMPLATE), tokenizer)
        for p in prompts
    ]


def qalign_score(log_probs: Tensor, weights: Sequence[float] = RATING_WEIGHTS) -> Tensor:
    """(B, 5) rating-word log-probabilities -> (B,) score: softmax over the five words · `weights`.

    The softmax over the five renormalises, so full-vocabulary log-probabilities and the five raw logits give
    the same score. weights (1, 0.75, 0.5, 0.25, 0) (`QAlignScorer` in scorer.py) give (score - 1) / 4.
    """
    return log_probs.float().softmax(-1) @ torch.tensor(weights, dtype=torch.float32, device=log_probs.device)


class AnswerLogits(OomBackoff):
    """Next-token logits at the last position of prompts that each hold one image, batched.

    Prefix keys/values are computed for the distinct texts before the image of a call and kept for as
    long as the next call has the same ones (a fixed template: computed once per scorer).
    """

    def __init__(self, model: MplugOwl2):
        if model.lm_head is None:
            raise ValueError("zero-shot scores need the language-model head: load_model(..., lm_head=True)")
        self.model = model
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self._cached: tuple[list[tuple[int, ...]], Prefixes] | None = None

    def _prefixes(self, texts: list[tuple[int, ...]]) -> tuple[Prefixes, Tensor]:
        """The cached prefixes of these texts and each row's index into them."""
        distinct = list(dict.fromkeys(texts))
        if self._cached is None or self._cached[0] != distinct:
            self._cached = distinct, run_prefixes(self.model, distinct, self.model.cfg.num_hidden_layers)
        index = {text: p for p, text in enumerate(distinct)}
        return self._cached[1], torch.tensor([index[t] for t in texts], device=self.device)

    @torch.inference_mode()
    def logits(self, images: Tensor, prompt_ids: Sequence[Sequence[int]]) -> Tensor:
        """Visual tokens (B, V, C) and one prompt per image -> (B, vocab) float32 next-token logits."""
        if len(prompt_ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompt_ids)} prompts")
        split = [split_prompt(ids, f"prompt {r}") for r, ids in enumerate(prompt_ids)]
        prefixes, prompt = self._prefixes([tuple(a) for a, _ in split])
        suffixes = [torch.tensor(b, dtype=torch.long, device=self.device) for _, b in split]
        image = torch.arange(len(images), device=self.device)
        n = self.model.cfg.num_hidden_layers
        h, real, _ = decode_rows(self.model, images, prefixes, image, prompt, suffixes, n)
        last = h[image, real.sum(1) - 1]  # the answer position: each row's last real token
        return self.model.lm_head(last).float()

    def _encode(self, pixels: Tensor) -> Tensor:
        return self.model.encode_images(pixels.to(self.device, self.dtype))


class QAlignScorer(AnswerLogits):
    """`scorer(pixels (B, 3, H, W)) -> (B, 5)` log-probabilities of the rating words, for `qalign_score`.

    The log-probabilities are over the full vocabulary (they also tell how much mass the five words get);
    the Q-Align score renormalises over the five, so it is unchanged.
    """

    def __init__(self, model: MplugOwl2, prompt_ids: Sequence[int], word_ids: Sequence[int]):
        super().__init__(model)
        split_prompt(prompt_ids, "the Q-Align prompt")
        self.prompt_ids, self.word_ids = list(prompt_ids), list(word_ids)

    @torch.inference_mode()
    def __call__(self, pixels: Tensor) -> Tensor:
        return torch.cat(self._chunks(len(pixels), lambda s: self.from_images(self._encode(pixels[s]))))

    def from_images(self, images: Tensor) -> Tensor:
        logits = self.logits(images, [self.prompt_ids] * len(images))
        return logits.log_softmax(-1)[:, self.word_ids]


class VQAScorer(AnswerLogits):
    """`scorer(pixels (B, 3, H, W), prompt_ids) -> (B,)` P(answer) for each image's own question.

    As VQAScore: the probability of the answer token from a softmax over the FULL vocabulary (t2v_metrics
    does this for its decoder models; the CLIP-FlanT5 path's exp(-cross-entropy) is the same thing), not
    a yes-vs-no renormalisation. Only the answer token itself (LLaMA's "▁Yes"), no EOS after it.
    """

    def __init__(self, model: MplugOwl2, answer_id: int):
        super().__init__(model)
        self.answer_id = answer_id

    @torch.inference_mode()
    def __call__(self, pixels: Tensor, prompt_ids: Sequence[Sequence[int]]) -> Tensor:
        def run(s: slice) -> Tensor:
            return self.from_images(self._encode(pixels[s]), prompt_ids[s])

        return torch.cat(self._chunks(len(pixels), run))

    def from_images(self, images: Tensor, prompt_ids: Sequence[Sequence[int]]) -> Tensor:
        return F.softmax(self.logits(images, prompt_ids), dim=-1)[:, self.answer_id]


class SharedPass(OomBackoff):
    """Vision tower and abstractor ONCE per image, then any of: semantic features, Q-Align, VQAScore.

    `shared(pixels, prompt_ids)` -> {"features": (B, P, C), "qalign": (B, 5), "vqascore": (B,)}, the keys of
    the parts given, each equal to what that part computes on its own. Each part keeps its own cached
    prompt prefix (their texts differ); the decoder runs once per part, so no row is padded to another
    task's length.
    """

    def __init__(
        self,
        extractor: SemanticExtractor | None = None,
        qalign: QAlignScorer | None = None,
        vqascore: VQAScorer | None = None,
    ):
        parts = [p for p in (extractor, qalign, vqascore) if p is not None]
        if not parts:
            raise ValueError("SharedPass needs at least one of extractor, qalign, vqascore")
        if any(p.model is not parts[0].model for p in parts):
            raise ValueError("SharedPass parts must share one model")
        self.model, self.extractor, self.qalign, self.vqascore = parts[0].model, extractor, qalign, vqascore
        self.device = self.model.model.embed_tokens.weight.device
        self.dtype = self.model.model.embed_tokens.weight.dtype

    @torch.inference_mode()
    def __call__(
        self, pixels: Tensor, prompt_ids: Sequence[Sequence[int]] | None = None
    ) -> dict[str, Tensor]:
        if (prompt_ids is None) != (self.vqascore is None):
            raise ValueError("prompt_ids are needed exactly when a VQAScore scorer is given")
        chunks = self._chunks(
            len(pixels), lambda s: self._run(pixels[s], None if prompt_ids is None else prompt_ids[s])
        )
        return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}

    def _run(self, pixels: Tensor, prompt_ids: Sequence[Sequence[int]] | None) -> dict[str, Tensor]:
        images = self.model.encode_images(pixels.to(self.device, self.dtype))
        out = {}
        if self.extractor is not None:
            out["features"] = self.extractor.from_images(images)
        if self.qalign is not None:
            out["qalign"] = self.qalign.from_images(images)
        if self.vqascore is not None:
            out["vqascore"] = self.vqascore.from_images(images, prompt_ids)
        return out
