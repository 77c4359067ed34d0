"""IP-IQA head (Qu et al., ICME 2024) on cached CLIP RN50 feature maps.

Two streams over the RN50 feature map (B, C, G, G), concatenated [image, text] into an MLP:

- image stream: CLIP's attention pooling (query = the mean token), initialised from the CLIP
  checkpoint's ``visual.attnpool``, its position table resized bicubically to the cached grid;
- prompt stream: a fresh attention pooling whose query is the prompt's CLIP text feature.

``qa_token`` picks how the text side trains:

- ``unfrozen_wte`` (default, the released code): no token is inserted; the pooled state is the
  end-of-text state; the token embeddings, text position table and text projection train (the
  original's ``qa_token: True`` unfreezes the embedding table, and its freezing helper misses the
  two bare Parameters). Default because it is what produced the published code's numbers and the
  golden fixture.
- ``appended``: the paper's learnable [QA] token, appended after end-of-text and run through the
  frozen tower; its output state is the query and it is the only trained text weight.
- ``none``: text frozen; the end-of-text features are computed once and looked up.

The original's ``head_scale`` is a learning-rate multiplier for the MLP, see ``IPIQA.param_groups``.
Reference: ../shared/references/ipiqa-head.md.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.heads import register_head

QA_TOKEN_MODES = ("unfrozen_wte", "appended", "none")
FUSIONS = ("dual", "image")


def interpolate_pos_embed(table: Tensor, grid: int) -> Tensor:
    """CLIP's (1 + s*s, C) position table -> (1 + grid*grid, C) as IP-IQA does at 512 px.

    Row 0 (the mean token) is kept; the s x s grid rows are resized bicubically (align_corners False).
    """
    n, channels = table.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"position table has {n} rows, expected 1 + a square grid")
    if side == grid:
        return table.clone()
    rows = table[1:].reshape(1, side, side, channels).permute(0, 3, 1, 2)
    rows = F.interpolate(rows, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], rows.permute(0, 2, 3, 1).reshape(grid * grid, channels)])


def single_query_attention(
    query: Tensor, tokens: Tensor, k_proj: nn.Linear, v_proj: nn.Linear, num_heads: int
) -> Tensor:
    """Multi-head attention of one query per row (B, C) over ``tokens`` (B, N, C) -> (B, C).

    With a single query the key and value projections fold onto the small side,
    q_h . (W_kh x + b_kh) = (W_kh^T q_h) . x + const and
    sum_n a_hn (W_vh x_n + b_vh) = W_vh (sum_n a_hn x_n) + b_vh,
    so no token is ever projected: at RN50 / 512 px, 64x fewer FLOPs than projecting 257 tokens.
    The constant q_h . b_kh cancels in the softmax, so ``k_proj.bias`` (kept for the checkpoint's
    names) has no effect, exactly as in the original.
    """
    b, _, c = tokens.shape
    d = c // num_heads
    q = query.view(b, num_heads, d) * d**-0.5
    q_in_tokens = torch.einsum("bhd,hdc->bhc", q, k_proj.weight.view(num_heads, d, c))
    attn = torch.einsum("bhc,bnc->bhn", q_in_tokens, tokens).softmax(-1)
    mixed = torch.einsum("bhn,bnc->bhc", attn, tokens)
    out = torch.einsum("bhc,hdc->bhd", mixed, v_proj.weight.view(num_heads, d, c))
    return out.reshape(b, c) + v_proj.bias


class AttentionPool(nn.Module):
    """CLIP's AttentionPool2d with one query: the mean token (image stream) or a given vector (text stream).

    Tokens are [mean over the grid; grid row-major] plus this pool's own position table.
    """

    def __init__(
        self, channels: int, grid: int, num_heads: int, output_dim: int, query_dim: int | None = None
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, channels) / channels**0.5)
        self.q_proj = nn.Linear(query_dim or channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, output_dim)

    def forward(self, feature_map: Tensor, query: Tensor | None = None) -> Tensor:
        x = feature_map.flatten(2).transpose(1, 2)
        tokens = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding
        q = self.q_proj(tokens[:, 0] if query is None else query)
        return self.out_proj(single_query_attention(q, tokens, self.k_proj, self.v_proj, self.num_heads))


class MLPHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, as the original's MLPHead."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(in_dim, in_dim)
        self.out_proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


class PromptText(nn.Module):
    """CLIP text features (B, D) of the batch's prompts, indexed into the dataset's unique prompts.

    Prompts are tokenised once. Only the embedding rows the prompts use are kept: the forward and the
    gradients are those of the full table, without 25 M parameters per checkpoint. The frozen tower
    (transformer, ln_final) is held outside the module tree, so its weights stay out of
    ``state_dict()`` and ``parameters()``; ``_apply`` still moves it with ``.to()``.
    """

    def __init__(self, clip_model: nn.Module, prompts: list[str], qa_token: str = "unfrozen_wte"):
        super().__init__()
        import open_clip  # imported here: only heads that run a text tower pay its start-up cost

        if qa_token not in QA_TOKEN_MODES:
            raise ValueError(f"ipiqa: qa_token must be one of {QA_TOKEN_MODES}, got {qa_token!r}")
        if not prompts:
            raise ValueError("ipiqa: the prompt stream needs the dataset's prompts (got none)")
        if clip_model.text_pool_type != "argmax" or not isinstance(clip_model.text_projection, Tensor):
            raise ValueError(
                "ipiqa: needs a CLIP text tower with argmax pooling and a matrix text_projection"
            )
        self.qa_token = qa_token
        appended = int(qa_token == "appended")
        ids = open_clip.tokenize(prompts, context_length=clip_model.context_length - appended)
        eot = int(ids.max())  # end-of-text is the largest id, which is what argmax pooling relies on
        if eot >= clip_model.vocab_size:
            raise ValueError(f"ipiqa: token id {eot} outside the text tower's {clip_model.vocab_size} rows")
        self.register_buffer("pool_at", ids.argmax(-1) + appended)  # end-of-text, or the [QA] slot after it
        used, compact = torch.unique(F.pad(ids, (0, appended)), return_inverse=True)
        self.register_buffer("token_ids", compact)
        self.register_buffer("vocab_ids", used, persistent=False)  # the kept rows' ids in the full table

        wte = clip_model.token_embedding.weight.detach()
        text_weights = {
            "token_embedding": wte[used],
            "positional_embedding": clip_model.positional_embedding.detach(),
            "text_projection": clip_model.text_projection.detach(),
        }
        for name, value in text_weights.items():
            if qa_token == "unfrozen_wte":
                setattr(self, name, nn.Parameter(value.clone()))
            else:
                self.register_buffer(name, value.clone())
        if appended:  # starts as a second end-of-text token, the state CLIP was trained to summarise into
            self.qa_embedding = nn.Parameter(wte[eot].clone())

        tower = nn.ModuleDict({"transformer": clip_model.transformer, "ln_final": clip_model.ln_final})
        tower = copy.deepcopy(tower).eval().requires_grad_(False)
        if qa_token == "none":
            with torch.no_grad():
                rows = torch.arange(len(prompts)).split(64)
                self.register_buffer("features", torch.cat([self._encode(r, tower) for r in rows]))
        else:
            object.__setattr__(self, "tower", tower)

    def retarget(self, clip_model: nn.Module, prompts: list[str]) -> PromptText:
        """This trained text side over other prompts (new images' prompts, another dataset's).

        Trained weights carry over: the token rows the training prompts used, the position table and
        projection (``unfrozen_wte``), the [QA] token (``appended``). A token no training prompt used
        keeps its published row from ``clip_model``, as it would have in a full table during
        training, where rows that no batch indexes get no gradient.
        """
        new = PromptText(clip_model, prompts, self.qa_token)
        trained = {int(t): row for t, row in zip(self.vocab_ids, self.token_embedding.detach(), strict=True)}
        with torch.no_grad():
            if self.qa_token == "unfrozen_wte":
                for i, token in enumerate(new.vocab_ids.tolist()):
                    if token in trained:
                        new.token_embedding[i] = trained[token]
                new.positional_embedding.copy_(self.positional_embedding)
                new.text_projection.copy_(self.text_projection)
            if self.qa_token == "appended":
                new.qa_embedding.copy_(self.qa_embedding)
        return new.to(self.pool_at.device)

    def _apply(self, fn, recurse=True):
        if "tower" in self.__dict__:
            self.tower._apply(fn)
        return super()._apply(fn, recurse)

    def _encode(self, rows: Tensor, tower: nn.ModuleDict) -> Tensor:
        """Features of prompts ``rows``; the tower runs only up to the longest pooled position.

        Attention is causal, so positions after the pooled one never reach it.
        """
        ids, pool_at = self.token_ids[rows], self.pool_at[rows]
        length = int(pool_at.max()) + 1
        x = F.embedding(ids[:, :length], self.token_embedding) + self.positional_embedding[:length]
        if self.qa_token == "appended":
            slot = pool_at[:, None] == torch.arange(length, device=x.device)
            x = torch.where(slot[..., None], self.qa_embedding, x)
        causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        x = tower.transformer(x, attn_mask=causal)
        x = tower.ln_final(x[torch.arange(len(rows), device=x.device), pool_at])
        return x @ self.text_projection

    def forward(self, prompt_index: Tensor) -> Tensor:
        n_prompts = len(self.pool_at)
        if prompt_index.numel() and not 0 <= int(prompt_index.min()) <= int(prompt_index.max()) < n_prompts:
            raise IndexError(f"ipiqa: batch['prompt_index'] outside 0..{n_prompts - 1}")
        if self.qa_token == "none":
            return self.features[prompt_index]
        unique, inverse = torch.unique(prompt_index, return_inverse=True)
        return self._encode(unique, self.tower)[inverse]


class IPIQA(nn.Module):
    """[image pool, text pool] -> MLP head. ``text_dim`` None builds the image-only ablation."""

    inputs = ("clip",)

    def __init__(
        self,
        channels: int,
        grid: int,
        embed_dim: int,
        num_heads: int,
        n_outputs: int,
        text_dim: int | None = None,
        prompt_text: PromptText | None = None,
        dropout: float = 0.5,
        head_scale: float = 10.0,
    ):
        super().__init__()
        self.head_scale = head_scale
        self.image_pool = AttentionPool(channels, grid, num_heads, embed_dim)
        self.text_pool = (
            None if text_dim is None else AttentionPool(channels, grid, num_heads, embed_dim, text_dim)
        )
        self.prompt_text = prompt_text
        self.mlp = MLPHead(embed_dim * (1 if text_dim is None else 2), n_outputs, dropout)

    def predict(self, feature_map: Tensor, text_feature: Tensor | None = None) -> Tensor:
        """Outputs from a feature map (B, C, G, G) and, for the dual stream, text features (B, D)."""
        pooled = [self.image_pool(feature_map)]
        if self.text_pool is not None:
            pooled.append(self.text_pool(feature_map, text_feature))
        return self.mlp(torch.cat(pooled, -1))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        feature_map = batch["clip"].float()
        if self.text_pool is None:
            return self.predict(feature_map)
        if self.prompt_text is None:
            raise RuntimeError("ipiqa: built without a text tower; call predict() with text features")
        if "prompt_index" not in batch:
            raise KeyError("ipiqa: the batch has no 'prompt_index' (the dual stream needs each row's prompt)")
        return self.predict(feature_map, self.prompt_text(batch["prompt_index"]))

    def with_prompts(self, clip_model: nn.Module, prompts: list[str]) -> None:
        """Make ``prompt_index`` index ``prompts`` (scoring new images), keeping the trained text side."""
        if self.prompt_text is not None:
            self.prompt_text = self.prompt_text.retarget(clip_model, prompts)

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer groups as the original: the MLP at ``base_lr * head_scale``, the rest at ``base_lr``.

        The original's head_scale 10 is this lr multiplier (params named ``head.*``), not an output scale.
        """
        mlp = [p for p in self.mlp.parameters() if p.requires_grad]
        in_mlp = {id(p) for p in mlp}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_mlp]
        return [{"params": rest, "lr": base_lr}, {"params": mlp, "lr": base_lr * self.head_scale}]


@register_head("ipiqa")
def build_ipiqa(
    n_outputs: int,
    input_shapes: dict[str, tuple[int, ...]],
    clip_model: nn.Module | None = None,
    prompts: list[str] | None = None,
    qa_token: str = "unfrozen_wte",
    fusion: str = "dual",
    dropout: float = 0.5,
    head_scale: float = 10.0,
) -> IPIQA:
    """IP-IQA on cached ``clip`` feature maps; widths, heads and grid come from the map and ``clip_model``.

    ``fusion``: "dual" (image + prompt stream) or "image" (image stream only; needs no prompts).
    ``qa_token`` (dual only): "unfrozen_wte" | "appended" | "none", see the module docstring.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"ipiqa: fusion must be one of {FUSIONS}, got {fusion!r}")
    if clip_model is None:
        raise ValueError("ipiqa: needs clip_model (its visual.attnpool initialises the image stream)")
    if "clip" not in input_shapes:
        raise KeyError(f"ipiqa: input_shapes has no 'clip' store (has {sorted(input_shapes)})")
    shape = tuple(input_shapes["clip"])
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"ipiqa: input_shapes['clip'] must be (C, G, G), got {shape}")
    channels, grid, _ = shape
    attnpool = clip_model.visual.attnpool
    if attnpool.k_proj.in_features != channels:
        raise ValueError(
            f"ipiqa: clip store has {channels} channels, clip_model {attnpool.k_proj.in_features}"
        )

    prompt_text = PromptText(clip_model, prompts, qa_token) if fusion == "dual" else None
    head = IPIQA(
        channels,
        grid,
        embed_dim=attnpool.c_proj.out_features,
        num_heads=attnpool.num_heads,
        n_outputs=n_outputs,
        text_dim=clip_model.text_projection.shape[1] if fusion == "dual" else None,
        prompt_text=prompt_text,
        dropout=dropout,
        head_scale=head_scale,
    )
    pool = head.image_pool
    with torch.no_grad():
        pool.positional_embedding.copy_(interpolate_pos_embed(attnpool.positional_embedding.detach(), grid))
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(pool, name).load_state_dict(getattr(attnpool, name).state_dict())
        pool.out_proj.load_state_dict(attnpool.c_proj.state_dict())
    return head


@register_head("ipiqa_image_only")
def build_ipiqa_image_only(n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg) -> IPIQA:
    """The image-stream ablation (the paper's claim that the prompt stream helps)."""
    return build_ipiqa(n_outputs, input_shapes, **{**cfg, "fusion": "image"})


# (our name prefix, original IPIQA prefix); first match wins.
_ORIGINAL_PREFIXES = (
    ("image_pool.out_proj.", "attnpool.c_proj."),
    ("image_pool.", "attnpool."),
    ("text_pool.positional_embedding", "txt_attnpool.positional_embedding"),
    ("text_pool.", "txt_attnpool.cross_attn."),
    ("mlp.", "head."),
)


def original_name(name: str) -> str | None:
    """The original IPIQA state-dict key of our parameter ``name`` (None for the text-side weights)."""
    for ours, theirs in _ORIGINAL_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return None


def load_original_state_dict(head: IPIQA, state_dict: dict[str, Tensor]) -> None:
    """Load the original's head weights (``attnpool.*``, ``txt_attnpool.*``, ``head.*``) strictly by name."""
    targets = {original_name(n): p for n, p in head.named_parameters() if original_name(n) is not None}
    missing, unexpected = sorted(set(targets) - set(state_dict)), sorted(set(state_dict) - set(targets))
    if missing or unexpected:
        raise KeyError(f"ipiqa: original state dict: missing keys {missing}, unexpected keys {unexpected}")
    for key, param in targets.items():
        got, want = tuple(state_dict[key].shape), tuple(param.shape)
        if got != want:
            raise ValueError(f"ipiqa: {key} has shape {got}, the head expects {want}")
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(state_dict[key])
