"""Semantic features: pooled mPLUG-Owl2 hidden states for every (image, prompt) pair.

MA-AGIQA runs the whole model once per prompt (twice, in fact: once more for logits it never reads) and
averages the last hidden state over every position. `SemanticExtractor` computes the same numbers with
less work:

* the vision tower and abstractor run once per image, shared by all prompts;
* the text before the image placeholder does not depend on the image, so under causal attention its
  keys, values and hidden states are computed once per prompt and reused for every image (prompt caching);
* the per-image part (visual tokens + the text after them) of all prompts goes through ONE batched
  decoder forward, right-padded, with a mask that lets each row see its own prompt prefix and, causally,
  its own real tokens; pooling counts only real positions, so padding changes nothing;
* the decoder stops at the requested hidden layer and `lm_head` is never run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import IMAGE_TOKEN_INDEX, KV, MplugOwl2

log = logging.getLogger(__name__)
POOLINGS = ("mean", "last", "mean_visual", "mean_text")


@dataclass
class Prefixes:
    """Per prompt: the text before the image, run once. Prompts are right-padded to a common length."""

    lengths: Tensor  # (P,) real prefix lengths
    kv: list[KV]  # per decoder layer run, (P, heads, T, head_dim) each
    sums: Tensor  # (P, C) float32 sum of the pooled hidden state over the real prefix positions


class SemanticExtractor:
    """`extractor(pixels (B, 3, H, W)) -> (B, P, C)` float32 features, one per prompt, on the model's device.

    `prompt_ids` are token id lists with exactly one IMAGE_TOKEN_INDEX (see `processing.tokenize_prompt`).
    `hidden_layer` indexes the hidden states like transformers' `output_hidden_states` (0 = embeddings,
    -1 = the final-normed last layer). `pooling`: `mean` over all positions (MA-AGIQA), `last` position,
    `mean_visual` over the visual tokens, `mean_text` over the text tokens.
    """

    def __init__(
        self,
        model: MplugOwl2,
        prompt_ids: Sequence[Sequence[int]],
        pooling: str = "mean",
        hidden_layer: int = -1,
    ):
        n = model.cfg.num_hidden_layers
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if not -(n + 1) <= hidden_layer <= n:
            raise ValueError(f"hidden_layer {hidden_layer} out of range for {n + 1} hidden states")
        if not prompt_ids:
            raise ValueError("at least one prompt is needed")
        self.model, self.pooling, self.layer = model, pooling, hidden_layer % (n + 1)
        self.max_images: int | None = None  # lowered after a CUDA out-of-memory error
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        split = []
        for p, ids in enumerate(prompt_ids):
            where = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
            if len(where) != 1:
                raise ValueError(f"prompt {p} must contain exactly one image token, found {len(where)}")
            split.append((list(ids[: where[0]]), list(ids[where[0] + 1 :])))
        if pooling == "mean_text" and any(not (a or b) for a, b in split):
            raise ValueError("pooling 'mean_text' needs text tokens in every prompt")
        self.suffixes = [torch.tensor(b, dtype=torch.long, device=self.device) for _, b in split]
        with torch.inference_mode():
            self.prefixes = self._run_prefixes([a for a, _ in split])

    def _run_prefixes(self, prefixes: list[list[int]]) -> Prefixes:
        lengths = torch.tensor([len(a) for a in prefixes], device=self.device)
        width = max(1, int(lengths.max()))
        ids = torch.zeros(len(prefixes), width, dtype=torch.long, device=self.device)
        for p, a in enumerate(prefixes):
            ids[p, : len(a)] = torch.tensor(a, dtype=torch.long)
        x = self.model.model.embed_tokens(ids)
        positions = torch.arange(width, device=self.device).expand(len(prefixes), -1)
        # Right padding under a causal mask: real positions never see the padding.
        (state,), kv = self.model.model.decode(x, torch.zeros_like(ids), positions, self.layer, keep_kv=True)
        real = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        return Prefixes(lengths=lengths, kv=kv, sums=(state.float() * real[..., None]).sum(1))

    @torch.inference_mode()
    def __call__(self, pixels: Tensor) -> Tensor:
        out, start = [], 0
        while start < len(pixels):
            n = min(self.max_images or len(pixels), len(pixels) - start)
            try:
                out.append(self._features(pixels[start : start + n]))
                start += n
                continue
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
            self.max_images = n // 2
            log.warning("out of memory with %d images per forward; retrying with %d", n, self.max_images)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return torch.cat(out)

    def _features(self, pixels: Tensor) -> Tensor:
        model, pre = self.model.model, self.prefixes
        images = self.model.encode_images(pixels.to(self.device, self.dtype))  # (B, V, C)
        b, nv, c = images.shape
        p = len(self.suffixes)
        rows = b * p  # image-major: row r is image r // p with prompt r % p
        prompt = torch.arange(p, device=self.device).repeat(b)
        text_len = torch.tensor([len(s) for s in self.suffixes], device=self.device)[prompt]
        width = nv + int(text_len.max())
        step = torch.arange(width, device=self.device)[None, :]
        real = step < nv + text_len[:, None]  # (rows, width)

        x = images.new_zeros(rows, width, c)
        x[:, :nv] = images.repeat_interleave(p, dim=0)
        for q, suffix in enumerate(self.suffixes):
            x[q::p, nv : nv + len(suffix)] = model.embed_tokens(suffix)
        visual = step < nv
        modality = visual.long().expand(rows, -1)
        prefix_len = pre.lengths[prompt]
        positions = prefix_len[:, None] + step
        # Each row attends to its own prompt's real prefix and, causally, to its own tokens.
        t = pre.kv[0][0].shape[2] if pre.kv else 0
        sees_prefix = torch.arange(t, device=self.device) < prefix_len[:, None, None]  # (rows, 1, t)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        mask = torch.cat([sees_prefix.expand(-1, width, -1), causal.expand(rows, -1, -1)], dim=2)[:, None]
        past = [(k[prompt], v[prompt]) for k, v in pre.kv]
        (h,), _ = model.decode(x, modality, positions, self.layer, past=past, mask=mask)
        return self._pool(h.float(), real, visual, prompt).view(b, p, c)

    def _pool(self, h: Tensor, real: Tensor, visual: Tensor, prompt: Tensor) -> Tensor:
        pre = self.prefixes
        if self.pooling == "last":
            return h[torch.arange(len(h), device=h.device), real.sum(1) - 1]
        keep = {"mean": real, "mean_visual": real & visual, "mean_text": real & ~visual}[self.pooling]
        total = (h * keep[..., None]).sum(1)
        count = keep.sum(1)
        if self.pooling != "mean_visual":  # the prefix is text
            total, count = total + pre.sums[prompt], count + pre.lengths[prompt]
        return total / count[:, None]
