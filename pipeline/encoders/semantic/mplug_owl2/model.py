"""Native PyTorch mPLUG-Owl2: ViT-L/14 vision tower, visual abstractor, modality-adaptive LLaMA-2.

Written from ../shared/references/mplug-owl2.md. Module and parameter names mirror the original checkpoint
(`model.vision_model...`, `model.visual_abstractor...`, `model.layers.{i}...`, `lm_head`), so loading is a 1:1
name map. The model holds no buffers: the fixed sin-cos tables and RoPE angles are computed in the forward
pass, which lets the 7B model be built on the meta device and filled shard by shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AbstractorConfig, MplugOwl2Config, VisionConfig

IMAGE_TOKEN_INDEX = -200  # the placeholder id that the visual tokens replace


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(b, n, -1)


class Stack(nn.Module):
    """A list of layers under the name `layers`, so parameter names read `encoder.layers.{i}...`."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


# ----------------------------------------------------------------------------------------------------------
# Vision tower


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, d))
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.pre_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # row-major patch order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pre_layernorm(x + self.position_embedding)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # The fused projection is laid out per head as [q_h | k_h | v_h], not as [Q | K | V].
        q, k, v = self.query_key_value(x).view(b, n, self.heads, 3, -1).permute(3, 0, 2, 1, 4)
        return self.dense(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionModel(nn.Module):
    """Pre-LN ViT with a CLS token; returns all tokens after `post_layernorm` (B, 1 + grid², width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = Stack([VisionLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ----------------------------------------------------------------------------------------------------------
# Visual abstractor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Fixed 1-D sin-cos table (len(positions), dim): all sines first, then all cosines, in float32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2))
    angle = positions.float()[:, None] * omega[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def abstractor_positions(dim: int, queries: int, grid: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Query table (Q, dim) and key table (1 + grid², dim): a zero CLS row, then [column ‖ row] halves."""
    query = sincos_1d(dim, torch.arange(queries, device=device))
    index = torch.arange(grid, device=device)
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    patches = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return query, torch.cat([patches.new_zeros(1, dim), patches])


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the hidden activations."""

    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.intermediate_size
        self.w1, self.w3, self.w2 = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.ffn_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class CrossAttention(nn.Module):
    """One abstractor layer: the queries attend to [themselves ; the vision tokens]."""

    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        # The original builds these three LayerNorms without an eps, so they use PyTorch's default 1e-5.
        self.norm1, self.normk = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.ModuleDict({name: nn.Linear(d, d) for name in ("query", "key", "value")})
        self.output = nn.ModuleDict(
            {"out_proj": nn.Linear(d, d), "norm2": nn.LayerNorm(d), "mlp": AbstractorMLP(cfg)}
        )

    def forward(self, x: Tensor, vision: Tensor, pos_q: Tensor, pos_kv: Tensor) -> Tensor:
        qn = self.norm1(x)
        kv = torch.cat([qn, self.normk(vision)], dim=1)
        q = split_heads(self.attention.query(qn + pos_q), self.heads)
        k = split_heads(self.attention.key(kv + pos_kv), self.heads)
        v = split_heads(self.attention.value(kv), self.heads)  # values get no positions
        attn = merge_heads(F.scaled_dot_product_attention(q, k, v))
        y = qn + self.output.out_proj(attn)  # the residual starts from the normalised queries, not from x
        return y + self.output.mlp(self.output.norm2(y))


class VisualAbstractor(nn.Module):
    """Vision tokens -> `num_learnable_queries` LLM-width tokens plus the learned `vit_eos` token."""

    def __init__(self, cfg: AbstractorConfig, llm_width: int):
        super().__init__()
        self.cfg = cfg
        self.query_embeds = nn.Parameter(torch.zeros(1, cfg.num_learnable_queries, cfg.hidden_size))
        self.encoder = Stack(
            [nn.ModuleDict({"crossattention": CrossAttention(cfg)}) for _ in range(cfg.num_hidden_layers)]
        )
        self.visual_fc = nn.Linear(cfg.hidden_size, llm_width)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, llm_width))

    def forward(self, vision: Tensor) -> Tensor:
        cfg, b = self.cfg, vision.shape[0]
        pos_q, pos_k = abstractor_positions(
            cfg.hidden_size, cfg.num_learnable_queries, cfg.grid_size, vision.device
        )
        pos_q, pos_kv = pos_q.to(vision.dtype), torch.cat([pos_q, pos_k]).to(vision.dtype)
        x = self.query_embeds.expand(b, -1, -1)
        for layer in self.encoder.layers:
            x = layer.crossattention(x, vision, pos_q, pos_kv)
        return torch.cat([self.visual_fc(x), self.vit_eos.expand(b, -1, -1)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Modality-adaptive LLaMA-2


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, cast back, then scale (the order matters in fp16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class Route:
    """Flat token indices (into batch * length) of each modality, computed once per forward."""

    text: Tensor
    visual: Tensor

    @classmethod
    def from_modality(cls, modality: Tensor) -> Route:
        flat = modality.reshape(-1).bool()
        return cls(text=(~flat).nonzero().squeeze(1), visual=flat.nonzero().squeeze(1))


class Multiway(nn.Module):
    """Two copies of a module, `multiway.0` for text tokens and `multiway.1` for visual tokens.

    Each copy runs only on its own tokens (gather, apply, scatter), as in the original.
    """

    def __init__(self, make: Callable[[], nn.Module]):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, x: Tensor, route: Route) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        text = self.multiway[0](flat.index_select(0, route.text))
        visual = self.multiway[1](flat.index_select(0, route.visual))
        out = text.new_empty(flat.shape[0], text.shape[-1])
        out.index_copy_(0, route.text, text).index_copy_(0, route.visual, visual)
        return out.view(*x.shape[:-1], -1)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, L, head_dim) for integer positions (B, L); angles in float32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / theta**exponent
    angle = positions.float()[..., None] * inv_freq
    emb = torch.cat([angle, angle], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


KV = tuple[Tensor, Tensor]


class Attention(nn.Module):
    """Causal multi-head attention with modality-specific K and V projections and RoPE."""

    def __init__(self, cfg: MplugOwl2Config):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = Multiway(lambda: nn.Linear(c, c, bias=False))
        self.v_proj = Multiway(lambda: nn.Linear(c, c, bias=False))
        self.o_proj = nn.Linear(c, c, bias=False)

    def forward(
        self, x: Tensor, route: Route, rope: tuple[Tensor, Tensor], past: KV | None, mask: Tensor | None
    ) -> tuple[Tensor, KV]:
        """`past` holds (k, v) of earlier positions; `mask` (bool, True = attend) is required with it."""
        q = apply_rope(split_heads(self.q_proj(x), self.heads), *rope)
        k = apply_rope(split_heads(self.k_proj(x, route), self.heads), *rope)
        v = split_heads(self.v_proj(x, route), self.heads)
        kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(merge_heads(out)), kv


class MLP(nn.Module):
    def __init__(self, cfg: MplugOwl2Config):
        super().__init__()
        c, h = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(c, h, bias=False)
        self.up_proj = nn.Linear(c, h, bias=False)
        self.down_proj = nn.Linear(h, c, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MplugOwl2Config):
        super().__init__()
        self.input_layernorm = Multiway(lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = Multiway(lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, route: Route, rope: tuple[Tensor, Tensor], past: KV | None, mask: Tensor | None
    ) -> tuple[Tensor, KV]:
        h, kv = self.self_attn(self.input_layernorm(x, route), route, rope, past, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x, route)), kv


class MplugOwl2Model(nn.Module):
    """Everything under the checkpoint's `model.` prefix: the LLM body and both visual modules."""

    def __init__(self, cfg: MplugOwl2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision_model = VisionModel(cfg.vision)
        self.visual_abstractor = VisualAbstractor(cfg.abstractor, cfg.hidden_size)

    def decode(
        self,
        x: Tensor,
        modality: Tensor,
        positions: Tensor,
        upto: int,
        *,
        past: list[KV] | None = None,
        mask: Tensor | None = None,
        all_states: bool = False,
        keep_kv: bool = False,
    ) -> tuple[list[Tensor], list[KV]]:
        """Run the decoder on embeddings `x` (B, L, C) until hidden state `upto` exists.

        Hidden states follow the transformers convention: index 0 is the input, index i the output of layer
        i-1, and index N (= num layers) the *final-normed* output of the last layer. Returns the states
        (all of 0..upto, or only `upto`) and, with `keep_kv`, each layer's (k, v) for reuse as `past`.
        `modality` (B, L) is 1 for visual tokens; `positions` (B, L) are the RoPE positions.
        """
        n = len(self.layers)
        route = Route.from_modality(modality)
        head_dim = x.shape[-1] // self.cfg.num_attention_heads
        rope = rope_tables(positions, head_dim, self.cfg.rope_theta, x.dtype)
        states, kvs = [x], []
        for i, layer in enumerate(self.layers[: min(upto, n)]):
            x, kv = layer(x, route, rope, None if past is None else past[i], mask)
            states.append(self.norm(x) if i == n - 1 else x)
            if keep_kv:
                kvs.append(kv)
            if not all_states:
                states = states[-1:]
        return states, kvs


class MplugOwl2(nn.Module):
    """MPLUGOwl2LlamaForCausalLM: `model` plus an optional `lm_head` (feature extraction never needs it)."""

    def __init__(self, cfg: MplugOwl2Config, lm_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = MplugOwl2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if lm_head else None

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> visual tokens (B, num_queries + 1, hidden_size)."""
        return self.model.visual_abstractor(self.model.vision_model(pixels))

    def splice(self, input_ids: Tensor, image_features: Tensor) -> tuple[Tensor, Tensor]:
        """Replace the single IMAGE_TOKEN_INDEX of each row by that row's visual tokens.

        Returns the embeddings (B, T - 1 + V, C) and the modality indicator (1 = visual).
        """
        embeds, modality = [], []
        for row, (ids, image) in enumerate(zip(input_ids, image_features, strict=True)):
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if len(where) != 1:
                raise ValueError(f"input_ids row {row}: expected one image token, found {len(where)}")
            t = where[0]
            text = self.model.embed_tokens(torch.cat([ids[:t], ids[t + 1 :]]))
            embeds.append(torch.cat([text[:t], image, text[t:]]))
            modality.append(
                torch.cat([ids.new_zeros(t), ids.new_ones(len(image)), ids.new_zeros(len(text) - t)])
            )
        return torch.stack(embeds), torch.stack(modality)

    def forward(self, input_ids: Tensor, images: Tensor) -> list[Tensor]:
        """All hidden states, as the original's `model(input_ids, images, output_hidden_states=True)`.

        Pure causal attention, no padding: every row must have the same length (as in MA-AGIQA).
        """
        embeds, modality = self.splice(input_ids, self.encode_images(images))
        positions = torch.arange(embeds.shape[1], device=embeds.device).expand(embeds.shape[0], -1)
        states, _ = self.model.decode(embeds, modality, positions, len(self.model.layers), all_states=True)
        return states
