"""mPLUG-Owl2 parity with the original's golden tensors (fp32, CPU) and facts about the 7B architecture."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from pipeline.encoders.semantic.mplug_owl2.checkpoint import load_model
from pipeline.encoders.semantic.mplug_owl2.config import MplugOwl2Config
from pipeline.encoders.semantic.mplug_owl2.model import MplugOwl2, abstractor_positions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mplug-owl2-tiny"
ROOT = Path(__file__).resolve().parents[1]
EXACT = {"atol": 1e-5, "rtol": 0}


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    if not (FIXTURE / "expected.safetensors").exists():
        pytest.skip(f"mPLUG-Owl2 fixture not found at {FIXTURE}")
    return FIXTURE


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir, lm_head=True)  # the same loader a real checkpoint goes through


@pytest.fixture(scope="module")
def expected(fixture_dir):
    return load_file(fixture_dir / "expected.safetensors")


@pytest.mark.parametrize("case", ["case_a", "case_b"])
def test_reproduces_every_fixture_tensor(model, expected, case):
    ids, images = expected[f"{case}.input_ids"], expected[f"{case}.images"]
    with torch.no_grad():
        vision = model.model.vision_model(images)
        features = model.encode_images(images)
        states = model(ids, images)
        logits = model.lm_head(states[-1])  # extraction never runs lm_head; the parity test may
        _, modality = model.splice(ids, features)
    assert_close(vision, expected[f"{case}.vision_last_hidden_state"], **EXACT)
    assert_close(features, expected[f"{case}.image_features"], **EXACT)
    assert torch.equal(modality, expected[f"{case}.modality_indicators"])
    assert len(states) == model.cfg.num_hidden_layers + 1
    assert_close(torch.stack(states), expected[f"{case}.hidden_states"], **EXACT)
    assert_close(logits, expected[f"{case}.logits"], **EXACT)
    assert_close(states[-1].mean(dim=1), expected[f"{case}.pooled_mean"], **EXACT)


def test_last_hidden_state_is_after_the_final_norm(model, expected):
    """hidden_states[-1] is norm(last layer); the fixture's pre-norm output differs from it by ~3.6."""
    pre_norm = expected["case_a.last_layer_pre_norm"]
    assert_close(model.model.norm(pre_norm), expected["case_a.hidden_states"][-1], **EXACT)
    assert (pre_norm - expected["case_a.hidden_states"][-1]).abs().max() > 1


def test_sincos_tables_match_the_original_buffers(fixture_dir, model):
    stored = load_file(fixture_dir / "model.safetensors")
    cfg = model.cfg.abstractor
    query, key = abstractor_positions(
        cfg.hidden_size, cfg.num_learnable_queries, cfg.grid_size, torch.device("cpu")
    )
    prefix = "model.visual_abstractor.encoder.layers.0.crossattention.attention"
    assert_close(query, stored[f"{prefix}.q_pos_embed"], atol=1e-6, rtol=0)
    assert_close(key, stored[f"{prefix}.k_pos_embed"], atol=1e-6, rtol=0)
    assert key[0].abs().max() == 0  # the CLS row


def test_routing_matters(fixture_dir, expected):
    """Negative control: sending visual tokens through the text weights must break parity."""
    model = load_model(fixture_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for pair in (layer.input_layernorm, layer.post_attention_layernorm, attn.k_proj, attn.v_proj):
                pair.multiway[1].load_state_dict(pair.multiway[0].state_dict())
        states = model(expected["case_a.input_ids"], expected["case_a.images"])
    assert (states[-1].mean(dim=1) - expected["case_a.pooled_mean"]).abs().max() > 0.1


def test_7b_architecture_matches_the_released_parameter_counts():
    with torch.device("meta"):
        model = MplugOwl2(MplugOwl2Config(), lm_head=True)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    llm = count(model.model) - count(model.model.vision_model) - count(model.model.visual_abstractor)
    assert round(llm / 1e9, 3) == 7.681
    assert round(count(model.lm_head) / 1e9, 3) == 0.131
    assert round(count(model.model.vision_model) / 1e9, 3) == 0.304
    assert round(count(model.model.visual_abstractor) / 1e9, 3) == 0.081
    assert model.cfg.num_visual_tokens == 65
    names = set(model.state_dict())
    assert "model.layers.31.self_attn.k_proj.multiway.1.weight" in names
    assert "model.vision_model.encoder.layers.23.self_attn.query_key_value.bias" in names
    assert "model.visual_abstractor.encoder.layers.5.crossattention.output.mlp.ffn_ln.weight" in names


def test_benchmark_builds_the_7b_model_on_meta():
    spec = importlib.util.spec_from_file_location(
        "semantic_throughput", ROOT / "benchmarks" / "semantic_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.build_model("7b", "meta", torch.bfloat16)
    assert model.cfg == MplugOwl2Config()
    assert model.lm_head is not None and model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = bench.random_prompts(model.cfg.vocab_size)
    assert [len(p) for p in ids] == [31, 36] and [p.index(-200) for p in ids] == [24, 29]
