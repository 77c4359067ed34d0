"""MA-AGIQA head: shapes and ablations at tiny widths, TAB math, parity with the original's golden tensors."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from pipeline.heads import create_head, list_heads
from pipeline.heads.ma_agiqa import STREAMS, load_original_state_dict
from pipeline.heads.maniqa_blocks import TAB

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ma-agiqa-head"
TINY_SHAPES = {"vit": (784, 32), "semantic": (2, 16)}
TINY = {"embed_dim": 16, "dim_mlp": 24, "shared_hidden": 32}


def tiny_batch(b: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(b, *shape, generator=gen).to(dtype) for k, shape in TINY_SHAPES.items()}


def tiny_head(name: str = "ma_agiqa", n_outputs: int = 1, **cfg) -> torch.nn.Module:
    torch.manual_seed(1)  # at these widths some seeds (0 among them) init fc_score dead: f = 0 everywhere
    return create_head(name, n_outputs, TINY_SHAPES, **{**TINY, **cfg}).eval()


def test_heads_registered():
    assert {"ma_agiqa", "maniqa", "semantic_only"} <= set(list_heads())


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_shapes_for_k_experts(k):
    head = tiny_head(experts=k, n_outputs=2)
    batch = tiny_batch()
    experts = head.expert_outputs(batch)
    assert experts.shape == (3, k, 784)
    assert len(head.shared) == k - 3
    assert head.mix_weights(experts).shape == (3, k)
    assert head(batch).shape == (3, 2)


@pytest.mark.parametrize(
    "streams", [list(c) for r in (1, 2, 3) for c in itertools.combinations(STREAMS, r)], ids="+".join
)
def test_stream_subsets_read_only_their_inputs(streams):
    head = tiny_head(streams=streams)
    assert head.inputs == ("vit",) * ("maniqa" in streams) + ("semantic",) * (streams != ["maniqa"])
    batch = {k: v for k, v in tiny_batch().items() if k in head.inputs}
    with torch.no_grad():
        out = head(batch)
        assert out.shape == (3, 1)
        assert head.gate.weight.shape == (len(streams), 784 * len(streams))
        # Row 0 of `semantic` is semantic_content, row 1 coherence: only the used rows may matter.
        for row, prompt in enumerate(("semantic_content", "coherence")):
            if "semantic" not in batch:
                continue
            moved = batch["semantic"].clone()
            moved[:, row] += 1.0
            changed = not torch.allclose(head({**batch, "semantic": moved}), out)
            assert changed == (prompt in streams), prompt


def test_fewer_experts_than_streams_raises():
    with pytest.raises(ValueError, match="drop streams"):
        tiny_head(experts=2)


def test_gradients_reach_every_expert():
    head = tiny_head(experts=5)
    batch = tiny_batch()
    assert (head.maniqa(batch["vit"])[0] > 0).any(), "precondition: some patch score f > 0 at init"
    head(batch).sum().backward()
    modules = {**head.experts, **{f"shared.{i}": m for i, m in enumerate(head.shared)}}
    modules.update(maniqa_branch=head.maniqa, gate=head.gate)
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"


@pytest.mark.parametrize("act", ["relu", "softplus"])
def test_score_unit_dead_at_init_trains_only_with_softplus(act):
    """Score unit negative on every patch: relu gives f = 0 and no gradient to the branch, softplus not."""
    head = tiny_head(streams=["maniqa"], score_act=act)
    with torch.no_grad():
        head.maniqa.fc_score[3].bias.fill_(-50.0)
    vit = tiny_batch()["vit"]
    f, _ = head.maniqa(vit)
    head({"vit": vit}).sum().backward()
    grad = head.maniqa.conv1.weight.grad.abs().sum()
    if act == "relu":
        assert (f == 0).all() and grad == 0
    else:
        assert (f > 0).all() and grad > 0


def test_score_act_is_checked():
    with pytest.raises(ValueError, match="score_act must be one of"):
        tiny_head(score_act="gelu")


def test_tab_matches_direct_computation():
    torch.manual_seed(0)
    b, c, n = 2, 6, 16
    tab = TAB(n).eval()
    x = torch.randn(b, c, n)
    q, k, v = (x @ lin.weight.T + lin.bias for lin in (tab.c_q, tab.c_k, tab.c_v))
    y = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(n), dim=-1) @ v  # (b, c, n): attention among channels
    # out[b, i, j] = x[b, i, j] + y[b, kk % C, kk // C] with kk = i * N + j (transpose-then-reshape).
    kk = torch.arange(c * n)
    expected = x + y[:, kk % c, kk // c].reshape(b, c, n)
    torch.testing.assert_close(tab(x), expected)


def test_gate_kinds():
    batch = tiny_batch()
    with torch.no_grad():
        soft = tiny_head(gate="softmax", experts=4)
        w = soft.mix_weights(soft.expert_outputs(batch))
        torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
        assert (w > 0).all()

        mean = tiny_head(gate="mean", experts=4)
        assert mean.gate is None
        experts = mean.expert_outputs(batch)
        torch.testing.assert_close(mean(batch), mean.out(experts.mean(dim=1)))
    with pytest.raises(ValueError, match="gate"):
        tiny_head(gate="sigmoid")


def test_float16_features_are_cast():
    head = tiny_head()
    half = tiny_batch(dtype=torch.float16)
    with torch.no_grad():
        out = head(half)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, head({k: v.float() for k, v in half.items()}))


def test_maniqa_head_is_weighted_mean_of_patch_scores():
    torch.manual_seed(1)
    head = create_head("maniqa", 2, TINY_SHAPES, embed_dim=16, dim_mlp=24).eval()
    assert head.inputs == ("vit",)
    batch = {"vit": tiny_batch()["vit"]}
    with torch.no_grad():
        out = head(batch)
        f, w = head.maniqa(batch["vit"])
    assert out.shape == (3, 2) and (f > 0).any()
    torch.testing.assert_close(out, (f * w).sum(dim=1) / w.sum(dim=1))
    assert ((out >= f.amin(dim=1) - 1e-6) & (out <= f.amax(dim=1) + 1e-6)).all()


def test_semantic_only_head():
    head = create_head("semantic_only", 1, {"semantic": (2, 16)})
    assert head.inputs == ("semantic",) and head.streams == ["semantic_content", "coherence"]
    assert head({"semantic": torch.randn(4, 2, 16)}).shape == (4, 1)
    with pytest.raises(ValueError, match="prompt streams only"):
        create_head("semantic_only", 1, TINY_SHAPES, streams=["maniqa"])


def test_train_mode_differs_only_by_dropout():
    batch = tiny_batch()
    quiet = tiny_head(drop=0.0, drop_path=0.0)
    with torch.no_grad():
        torch.testing.assert_close(quiet.train()(batch), quiet.eval()(batch))
        noisy = tiny_head().train()
        assert not torch.allclose(noisy(batch), noisy(batch))


def test_bad_shapes_and_options_name_the_problem():
    with pytest.raises(ValueError, match="'vit'"):
        create_head("ma_agiqa", 1, {"semantic": (2, 16)})
    with pytest.raises(ValueError, match="N=780"):
        create_head("maniqa", 1, {"vit": (780, 32)}, **{"embed_dim": 16, "dim_mlp": 24})
    with pytest.raises(ValueError, match="prompts"):
        create_head("ma_agiqa", 1, {"vit": (784, 32), "semantic": (3, 16)}, **TINY)
    with pytest.raises(TypeError, match="embed_dimm"):
        tiny_head(embed_dimm=8)
    head = tiny_head()
    with pytest.raises(ValueError, match=r"batch\['vit'\]"):
        head({**tiny_batch(), "vit": torch.randn(3, 784, 33)})
    with pytest.raises(KeyError, match="semantic"):
        head({"vit": tiny_batch()["vit"]})


# --- parity with the original implementation (shared/fixtures/ma-agiqa-head) ---------------------------

# Max abs diff allowed, relative to the tensor's max |value|. The README suggests atol = rtol = 1e-5,
# but that assumes the fixture machine's BLAS: here a single Linear(4096, 784) already differs by
# 7e-6, and the fixture itself sits up to 1.5e-5 (relative) from a float64 forward, as do we.
# Observed worst here: 2.2e-5. tanh-GELU (the subtlest documented mistake) shows up as 3.6e-4.
PARITY_RTOL = 1e-4
PARITY_KEYS = [
    *(f"maniqa.{k}" for k in ("tab1_0", "tab1_1", "conv1", "swin1", "tab2_0", "tab2_1", "conv2", "swin2")),
    "maniqa.f_score",
    "maniqa.w_weight",
    *(f"afm.{k}" for k in ("maniqa_vec_pre_fc784", "maniqa_vec_post_fc784", "semantic_content_784")),
    *(f"afm.{k}" for k in ("coherence_784", "gate_weights", "fused")),
    "output.score",
]


def _need_fixture():
    if not (FIXTURE / "expected.safetensors").exists():
        pytest.skip(f"fixture not found at {FIXTURE}")
    from safetensors.torch import load_file

    return load_file


def _fixture_inputs(expected: dict) -> dict[str, torch.Tensor]:
    vit = torch.cat([expected[f"inputs.vit_block{i}_out"][:, 1:] for i in (6, 7, 8, 9)], dim=2)
    semantic = torch.stack([expected["inputs.semantic_content"], expected["inputs.coherence"]], dim=1)
    return {"vit": vit, "semantic": semantic}


def _capture(head) -> dict[str, torch.Tensor]:
    """Forward hooks recording the intermediates the fixture stores, under its key names."""
    got, m = {}, head.maniqa
    outputs = {
        "maniqa.tab1_0": m.tab1[0],
        "maniqa.tab1_1": m.tab1[1],
        "maniqa.conv1": m.conv1,
        "maniqa.swin1": m.swin1,
        "maniqa.tab2_0": m.tab2[0],
        "maniqa.tab2_1": m.tab2[1],
        "maniqa.conv2": m.conv2,
        "maniqa.swin2": m.swin2,
        "maniqa.f_score": m.fc_score,
        "maniqa.w_weight": m.fc_weight,
        "afm.maniqa_vec_post_fc784": head.experts["maniqa"],
        "afm.semantic_content_784": head.experts["semantic_content"],
        "afm.coherence_784": head.experts["coherence"],
        "afm.gate_weights": head.gate,
        "output.score": head.out,
    }
    for key, module in outputs.items():
        module.register_forward_hook(lambda _m, _i, out, key=key: got.__setitem__(key, out))
    head.experts["maniqa"].register_forward_hook(
        lambda _m, i, _o: got.__setitem__("afm.maniqa_vec_pre_fc784", i[0])
    )
    head.out.register_forward_hook(lambda _m, i, _o: got.__setitem__("afm.fused", i[0]))
    return got


def _original_state(load_file) -> dict[str, torch.Tensor]:
    """The fixture's used weights and buffers, plus NaN for the unused modules a real checkpoint holds."""
    state = {
        **load_file(FIXTURE / "head_state.safetensors"),
        **load_file(FIXTURE / "head_buffers.safetensors"),
    }
    for entry in json.loads((FIXTURE / "param_order.json").read_text()):
        if not entry["used"]:
            state[entry["name"]] = torch.full(entry["shape"], float("nan"))
    state["vit.blocks.0.norm1.weight"] = torch.full((64,), float("nan"))
    return state


@pytest.fixture(scope="module")
def fixture_run():
    load_file = _need_fixture()
    expected = load_file(FIXTURE / "expected.safetensors")
    config = json.loads((FIXTURE / "config.json").read_text())["constructor_args"]
    head = create_head(
        "ma_agiqa",
        config["num_outputs"],
        {"vit": (784, 4 * config["embed_dim"]), "semantic": (2, 4096)},
        embed_dim=config["embed_dim"],
        dim_mlp=config["dim_mlp"],
    ).eval()
    state = _original_state(load_file)
    load_original_state_dict(head, state)
    got = _capture(head)
    with torch.no_grad():
        head(_fixture_inputs(expected))
    return head, state, expected, got


@pytest.mark.parametrize("key", PARITY_KEYS)
def test_fixture_parity(fixture_run, key):
    _, _, expected, got = fixture_run
    exp = expected[key]
    torch.testing.assert_close(got[key], exp, rtol=0, atol=PARITY_RTOL * exp.abs().max().item())


def test_loader_is_strict(fixture_run):
    head, state, _, _ = fixture_run
    missing = {k: v for k, v in state.items() if k != "gating.bias"}
    with pytest.raises(KeyError, match=r"gating\.bias \(head: gate\.bias\)"):
        load_original_state_dict(head, missing)
    with pytest.raises(KeyError, match=r"fc_typo\.weight"):
        load_original_state_dict(head, {**state, "fc_typo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        load_original_state_dict(head, {**state, "conv1.weight": torch.zeros(64, 255, 1, 1)})
    mask_key = "swintransformer2.layers.1.blocks.1.attn_mask"
    with pytest.raises(ValueError, match=mask_key):
        load_original_state_dict(head, {**state, mask_key: torch.zeros(49, 16, 16)})
    no_coherence = create_head(
        "ma_agiqa",
        1,
        {"vit": (784, 256), "semantic": (2, 4096)},
        embed_dim=64,
        dim_mlp=96,
        streams=["semantic_content", "maniqa"],
    )
    with pytest.raises(KeyError, match=r"fc4096_784_b2\.0\.weight"):
        load_original_state_dict(no_coherence, state)


def test_fixture_parity_paper_size():
    """Paper widths (embed_dim = dim_mlp = 768), weights regenerated by the fixture's documented recipe.

    With these random weights stage 2 is badly conditioned (activations in the thousands, near one-hot
    TAB softmax): the fixture's own float32 result is 1e-3 (score) to 7e-2 (sigmoid weights) from a
    float64 forward, so only the well-conditioned semantic experts are held to 1e-5; the rest must
    agree on average, which still catches any structural mistake.
    """
    load_file = _need_fixture()
    full = FIXTURE / "fullsize"
    expected = load_file(full / "expected_outputs.safetensors")
    torch.manual_seed(0)
    state = {}
    for entry in json.loads((full / "param_order.json").read_text()):
        z = torch.randn(entry["shape"])
        value = 1 + 0.2 * z if len(entry["shape"]) == 1 and entry["name"].endswith("weight") else 0.05 * z
        if entry["used"]:
            state[entry["name"]] = value.half().float()
    torch.manual_seed(1)
    blocks = torch.randn(4, 2, 785, 768)
    sums = json.loads((full / "checksums.json").read_text())["inputs_sha256_fp32_le"]
    for i in range(4):
        assert hashlib.sha256(blocks[i].numpy().tobytes()).hexdigest() == sums[f"vit_block{6 + i}_out"]

    head = create_head("ma_agiqa", 1, {"vit": (784, 3072), "semantic": (2, 4096)}).eval()
    load_original_state_dict(head, state)
    got = _capture(head)
    inputs = {
        "vit": blocks[:, :, 1:].permute(1, 2, 0, 3).reshape(2, 784, 3072),
        "semantic": torch.stack([expected["inputs.semantic_content"], expected["inputs.coherence"]], dim=1),
    }
    with torch.no_grad():
        head(inputs)
    for key, exp in expected.items():
        if not key.startswith(("afm.", "maniqa.", "output.")):
            continue
        scale = exp.abs().max().item()
        if key in ("afm.semantic_content_784", "afm.coherence_784"):
            torch.testing.assert_close(got[key], exp, rtol=0, atol=1e-5 * scale)
        else:
            assert (got[key] - exp).abs().mean().item() <= 1e-2 * scale, key
