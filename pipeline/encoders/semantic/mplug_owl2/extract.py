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

`run_prefixes` and `decode_rows` are shared with the zero-shot scorers (`zeroshot.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from pipeline.encoders.common import OomBackoff

from .model import IMAGE_TOKEN_INDEX, KV, MplugOwl2

POOLINGS = ("mean", "last", "mean_visual", "mean_text")


@dataclass
class Prefixes:
    """Per prompt: the text before the image, run once. Prompts are right-padded to a common length."""

    lengths: Tensor  # (P,) real prefix lengths
    kv: list[KV]  # per decoder layer run, (P, heads, T, head_dim) each
    sums: Tensor  # (P, C) float32 sum of the pooled hidden state over the real prefix positions


def split_prompt(ids: Sequence[int], name: str = "prompt") -> tuple[list[int], list[int]]:
    """The token ids before and after the single IMAGE_TOKEN_INDEX."""
    where = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(where) != 1:
        raise ValueError(f"{name} must contain exactly one image token, found {len(where)}")
    return list(ids[: where[0]]), list(ids[where[0] + 1 :])


def run_prefixes(model: MplugOwl2, prefixes: Sequence[Sequence[int]], upto: int) -> Prefixes:
    """Run the texts before the image once, batched and right-padded, keeping each layer's keys/values."""
    device = model.model.embed_tokens.weight.device
    lengths = torch.tensor([len(a) for a in prefixes], device=device)
    width = max(1, int(lengths.max()))
    ids = torch.zeros(len(prefixes), width, dtype=torch.long, device=device)
    for p, a in enumerate(prefixes):
        ids[p, : len(a)] = torch.tensor(a, dtype=torch.long)
    x = model.model.embed_tokens(ids)
    positions = torch.arange(width, device=device).expand(len(prefixes), -1)
    # Right padding under a causal mask: real positions never see the padding.
    (state,), kv = model.model.decode(x, torch.zeros_like(ids), positions, upto, keep_kv=True)
    real = torch.arange(width, device=device)[None, :] < lengths[:, None]
    return Prefixes(lengths=lengths, kv=kv, sums=(state.float() * real[..., None]).sum(1))


def decode_rows(
    model: MplugOwl2,
    images: Tensor,
    prefixes: Prefixes,
    image: Tensor,
    prompt: Tensor,
    suffixes: Sequence[Tensor],
    upto: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """ONE batched decoder forward over rows of [visual tokens of `images[image[r]]` ; `suffixes[r]`].

    Row r continues the cached prefix `prompt[r]`: it sees that prefix's real positions and, causally, its
    own tokens, never the padding. Returns hidden state `upto` (R, W, C), the real-position mask (R, W) and
    the visual-position mask (1, W).
    """
    device = images.device
    nv = images.shape[1]
    lengths = torch.tensor([len(s) for s in suffixes], device=device)
    text = pad_sequence(list(suffixes), batch_first=True)  # zeros where a row has no text
    width = nv + text.shape[1]
    step = torch.arange(width, device=device)[None, :]
    real = step < nv + lengths[:, None]  # (rows, width)
    visual = step < nv
    embeds = torch.where(real[:, nv:, None], model.model.embed_tokens(text), 0)
    x = torch.cat([images[image], embeds], dim=1)
    modality = visual.long().expand(len(x), -1)
    prefix_len = prefixes.lengths[prompt]
    positions = prefix_len[:, None] + step
    t = prefixes.kv[0][0].shape[2] if prefixes.kv else 0
    sees_prefix = torch.arange(t, device=device) < prefix_len[:, None, None]  # (rows, 1, t)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = torch.cat([sees_prefix.expand(-1, width, -1), causal.expand(len(x), -1, -1)], dim=2)[:, None]
    past = [(k[prompt], v[prompt]) for k, v in prefixes.kv]
    (h,), _ = model.model.decode(x, modality, positions, upto, past=past, mask=mask)
    return h, real, visual


class SemanticExtractor(OomBackoff):
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
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        split = [split_prompt(ids, f"prompt {p}") for p, ids in enumerate(prompt_ids)]
        if pooling == "mean_text" and any(not (a or b) for a, b in split):
            raise ValueError("pooling 'mean_text' needs text tokens in every prompt")
        self.suffixes = [torch.tensor(b, dtype=torch.long, device=self.device) for _, b in split]
        with torch.inference_mode():
            self.prefixes = run_prefixes(model, [a for a, _ in split], self.layer)

    @torch.inference_mode()
    def __call__(self, pixels: Tensor) -> Tensor:
        return torch.cat(self._chunks(len(pixels), lambda s: self._features(pixels[s])))

    def _features(self, pixels: Tensor) -> Tensor:
        return self.from_images(self.model.encode_images(pixels.to(self.device, self.dtype)))

    @torch.inference_mode()
    def from_images(self, images: Tensor) -> Tensor:
        """Features from visual tokens already computed by `model.encode_images` (B, V, C) -> (B, P, C)."""
        b, p = len(images), len(self.suffixes)
        # Image-major rows: row r is image r // p with prompt r % p.
        image = torch.arange(b, device=self.device).repeat_interleave(p)
        prompt = torch.arange(p, device=self.device).repeat(b)
        suffixes = [self.suffixes[q] for q in prompt.tolist()]
        h, real, visual = decode_rows(self.model, images, self.prefixes, image, prompt, suffixes, self.layer)
        return self._pool(h.float(), real, visual, prompt).view(b, p, -1)

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
