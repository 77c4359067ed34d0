"""MA-AGIQA head (Wang et al., ACM MM'24) on cached features, plus its MANIQA and semantic-only ablations.

Streams, each a vector of width ``afm_width`` (784 in the paper, = the 28 x 28 patches):

- ``semantic_content``, ``coherence``: an mPLUG-Owl2 prompt vector (row of ``batch["semantic"]``)
  through Linear(D, width) -> ReLU -> Dropout;
- ``maniqa``: the MANIQA branch over the cached ViT tokens gives per-patch score f and weight w;
  the per-patch products f * w (N of them, not summed) go through Linear(N, width).

AFM fusion: the experts are the S streams (in ``streams`` order; the paper's is
[semantic_content, coherence, maniqa]) plus ``experts - S`` shared experts, small MLPs over the
concatenated streams. A gate, Linear over the concatenated streams, gives one weight per expert:
raw (``linear``, as the original code: no softmax), ``softmax``, or ``mean`` (no gate, plain
average). The weighted sum goes through Linear(width, n_outputs).

``load_original_state_dict`` loads the original code's state dict (``wangpuyi/MA-AGIQA``
``models/MA_AGIQA.py``) by its parameter names; the parity test checks it against golden tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.heads import register_head
from pipeline.heads.maniqa_blocks import ManiqaBranch

PROMPTS = ("semantic_content", "coherence")
STREAMS = (*PROMPTS, "maniqa")
GATES = ("linear", "softmax", "mean")
_SET_BY_HEAD = {"n_tokens", "in_channels", "n_scores", "drop"}
_MANIQA_KEYS = set(inspect.signature(ManiqaBranch).parameters) - _SET_BY_HEAD


def _features(batch: Mapping[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """``batch[key]`` as float32 (caches may hold float16), checked against the per-row shape built for."""
    if key not in batch:
        raise KeyError(f"batch has no {key!r} features (has: {', '.join(batch)})")
    x = batch[key]
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"batch[{key!r}] rows have shape {tuple(x.shape[1:])}, head was built for {shape}")
    return x.float()


def _vit_branch(
    input_shapes: Mapping[str, Sequence[int]], n_scores: int, drop: float, cfg: dict
) -> ManiqaBranch:
    if "vit" not in input_shapes:
        raise ValueError(f"the maniqa stream needs input_shapes['vit'] (got keys {sorted(input_shapes)})")
    n_tokens, channels = input_shapes["vit"]
    return ManiqaBranch(n_tokens, channels, n_scores=n_scores, drop=drop, **cfg)


class MAAGIQA(nn.Module):
    """Streams -> experts -> gated mixture -> score; ``forward(batch) -> (B, n_outputs)``.

    Options (all keyword, flat): ``streams`` (subset of ``prompts`` + "maniqa", mixing order),
    ``experts`` (K >= S, default S), ``gate`` ("linear" | "softmax" | "mean"), ``prompts`` (names of
    the rows of ``batch["semantic"]``), ``afm_width`` (784), ``shared_hidden`` (256, hidden width of
    the shared experts), ``drop`` (0.1, every dropout), and the MANIQA branch's ``embed_dim`` (768),
    ``dim_mlp`` (768), ``window_size`` (4), ``depths`` ([2, 2]), ``num_heads`` ([4, 4]), ``num_tab`` (2),
    ``scale`` (0.8), ``drop_path`` (0.1, stochastic-depth maximum), ``score_act`` ("relu", see
    ``ManiqaBranch``).
    """

    def __init__(
        self,
        n_outputs: int,
        input_shapes: Mapping[str, Sequence[int]],
        streams: Sequence[str] = STREAMS,
        experts: int | None = None,
        gate: str = "linear",
        prompts: Sequence[str] = PROMPTS,
        afm_width: int = 784,
        shared_hidden: int = 256,
        drop: float = 0.1,
        **maniqa_cfg,
    ) -> None:
        super().__init__()
        streams, prompts = list(streams), list(prompts)
        if unknown := [s for s in streams if s != "maniqa" and s not in prompts]:
            raise ValueError(
                f"fusion.streams names {unknown}, which the semantic features do not hold: their prompts "
                f"are {prompts} (extract.semantic.prompts), so streams are among {[*prompts, 'maniqa']}"
            )
        if not streams or len(set(streams)) != len(streams):
            raise ValueError(f"streams must be distinct names from {[*prompts, 'maniqa']}; got {streams}")
        n_experts = len(streams) if experts is None else experts
        if n_experts < len(streams):
            raise ValueError(
                f"experts={n_experts} is fewer than the {len(streams)} streams {streams}; every stream is an "
                "expert, so drop streams (the `streams` list) instead of lowering `experts`"
            )
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}; got {gate!r}")
        if bad := set(maniqa_cfg) - _MANIQA_KEYS:
            raise TypeError(f"unknown MA-AGIQA options {sorted(bad)}")

        self.streams, self.prompts, self.gate_kind = streams, prompts, gate
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        uses_semantic = any(s != "maniqa" for s in streams)
        self.inputs = ("vit",) * ("maniqa" in streams) + ("semantic",) * uses_semantic

        self.experts = nn.ModuleDict()
        if uses_semantic:
            if "semantic" not in input_shapes:
                raise ValueError(
                    f"prompt streams need input_shapes['semantic'] (got keys {sorted(input_shapes)})"
                )
            n_prompts, sem_dim = input_shapes["semantic"]
            if n_prompts != len(prompts):
                raise ValueError(
                    f"input_shapes['semantic'] has {n_prompts} prompts, `prompts` names {prompts}"
                )
        for name in streams:
            if name == "maniqa":
                self.maniqa = _vit_branch(input_shapes, 1, drop, maniqa_cfg)
                self.experts[name] = nn.Linear(input_shapes["vit"][0], afm_width)
            else:
                self.experts[name] = nn.Sequential(nn.Linear(sem_dim, afm_width), nn.ReLU(), nn.Dropout(drop))
        joint = len(streams) * afm_width
        self.shared = nn.ModuleList(
            nn.Sequential(
                nn.Linear(joint, shared_hidden),
                nn.ReLU(),
                nn.Dropout(drop),
                nn.Linear(shared_hidden, afm_width),
            )
            for _ in range(n_experts - len(streams))
        )
        self.gate = None if gate == "mean" else nn.Linear(joint, n_experts)
        self.out = nn.Linear(afm_width, n_outputs)

    def expert_outputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, K, afm_width): the S stream experts in ``streams`` order, then the shared experts."""
        outs = []
        for name in self.streams:
            if name == "maniqa":
                f, w = self.maniqa(_features(batch, "vit", self.input_shapes["vit"]))
                outs.append(self.experts[name]((f * w).squeeze(-1)))
            else:
                semantic = _features(batch, "semantic", self.input_shapes["semantic"])
                outs.append(self.experts[name](semantic[:, self.prompts.index(name)]))
        joint = torch.cat(outs, dim=1)
        outs += [mlp(joint) for mlp in self.shared]
        return torch.stack(outs, dim=1)

    def mix_weights(self, experts: Tensor) -> Tensor:
        """(B, K) mixing weights; the gate reads the concatenated streams (not the shared experts)."""
        if self.gate is None:
            return experts.new_full(experts.shape[:2], 1 / experts.shape[1])
        logits = self.gate(experts[:, : len(self.streams)].flatten(1))
        return logits.softmax(dim=-1) if self.gate_kind == "softmax" else logits

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        experts = self.expert_outputs(batch)
        fused = torch.bmm(self.mix_weights(experts).unsqueeze(1), experts).squeeze(1)
        return self.out(fused)


class MANIQA(nn.Module):
    """MANIQA's own reduction of the branch: score = sum_n(f * w) / sum_n(w), one (f, w) pair per output."""

    inputs = ("vit",)

    def __init__(
        self, n_outputs: int, input_shapes: Mapping[str, Sequence[int]], drop: float = 0.1, **maniqa_cfg
    ) -> None:
        super().__init__()
        self.maniqa = _vit_branch(input_shapes, n_outputs, drop, maniqa_cfg)
        self.vit_shape = tuple(input_shapes["vit"])

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        f, w = self.maniqa(_features(batch, "vit", self.vit_shape))
        return (f * w).sum(dim=1) / w.sum(dim=1)


@register_head("ma_agiqa")
def build_ma_agiqa(n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg) -> MAAGIQA:
    """The paper's head; ``streams``/``experts``/``gate`` give the fusion ablations (see ``MAAGIQA``)."""
    return MAAGIQA(n_outputs, input_shapes, **cfg)


@register_head("semantic_only")
def build_semantic_only(n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg) -> MAAGIQA:
    """MA-AGIQA without the image branch: only the prompt streams (default: all of ``prompts``, MA-AGIQA's
    two first in the paper's order, so that the order of the cached rows never changes the model)."""
    prompts = list(cfg.get("prompts", PROMPTS))
    cfg.setdefault("streams", [p for p in PROMPTS if p in prompts] + [p for p in prompts if p not in PROMPTS])
    if "maniqa" in cfg["streams"]:
        raise ValueError(f"semantic_only takes prompt streams only; got streams={list(cfg['streams'])}")
    return MAAGIQA(n_outputs, input_shapes, **cfg)


@register_head("maniqa")
def build_maniqa(n_outputs: int, input_shapes: dict[str, tuple[int, ...]], **cfg) -> MANIQA:
    """MANIQA alone with its original weighted-mean reduction: the image-only baseline."""
    return MANIQA(n_outputs, input_shapes, **cfg)


# Original MA_AGIQA parameter-name prefixes -> ours (the names inside each block are the same).
ORIGINAL_PREFIXES = {
    "tablock1.": "maniqa.tab1.",
    "conv1.": "maniqa.conv1.",
    "swintransformer1.": "maniqa.swin1.",
    "tablock2.": "maniqa.tab2.",
    "conv2.": "maniqa.conv2.",
    "swintransformer2.": "maniqa.swin2.",
    "fc_score.": "maniqa.fc_score.",
    "fc_weight.": "maniqa.fc_weight.",
    "fc784_784.": "experts.maniqa.",
    "fc4096_784_a2.": "experts.semantic_content.",
    "fc4096_784_b2.": "experts.coherence.",
    "gating.": "gate.",
    "output_fc.": "out.",
}
# Modules the original defines but never calls in its forward (reference section 8), and its ViT.
ORIGINAL_UNUSED = (
    "vit.",
    "swintransformer1.downsample.",
    "swintransformer2.downsample.",
    "fc39_784.",
    "encoder_layer.",
    "fc_output.",
    "fc4096_784_a.",
    "fc4096_784_b.",
    "quality.",
    "fc784x3_1.",
    "fc4096_1024_a.",
    "fc4096_1024_b.",
)


def _rename(name: str, mapping: Mapping[str, str]) -> str | None:
    return next((new + name[len(old) :] for old, new in mapping.items() if name.startswith(old)), None)


@torch.no_grad()
def load_original_state_dict(head: MAAGIQA, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict named as the original MA_AGIQA module (e.g. a released checkpoint) into ``head``.

    Strict: every head parameter must be provided and every key must map to one, except the
    original's unused modules and ViT (``ORIGINAL_UNUSED``), which are skipped. The original's
    persistent buffers (relative-position index, shift mask) are not loaded but checked against
    ours (timm's), since a mismatch would mean a different window layout.
    """
    params = head.state_dict()
    buffers = dict(head.named_buffers())
    mapped, unexpected = {}, []
    for name, value in state_dict.items():
        if name.startswith(ORIGINAL_UNUSED):
            continue
        ours = _rename(name, ORIGINAL_PREFIXES)
        if ours in buffers:
            if not torch.equal(buffers[ours].to(value.dtype), value):
                raise ValueError(f"original buffer {name!r} differs from the head's {ours!r}")
        elif ours in params:
            mapped[name] = ours
        else:
            unexpected.append(name)
    back = {new: old for old, new in ORIGINAL_PREFIXES.items()}
    loaded = set(mapped.values())
    missing = [
        f"{_rename(k, back) or '(not in the original)'} (head: {k})" for k in params if k not in loaded
    ]
    if missing or unexpected:
        raise KeyError(
            f"original state dict does not fit the head; missing: {missing}; unexpected: {unexpected}"
        )
    wrong = [
        f"{name} {tuple(state_dict[name].shape)} vs head {ours} {tuple(params[ours].shape)}"
        for name, ours in mapped.items()
        if state_dict[name].shape != params[ours].shape
    ]
    if wrong:
        raise ValueError(f"original state dict has other shapes than the head: {wrong}")
    head.load_state_dict({ours: state_dict[name] for name, ours in mapped.items()})
