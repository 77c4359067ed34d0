"""Run records (pipeline.runs): a written run loads back to the same predictions, and a run folder or
bundle that is incomplete or altered is refused by name; score's inputs and prompts (pipeline.scoring)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.features import Features
from pipeline.heads import create_head
from pipeline.runs import FORMAT, RunError, TrainedRun
from pipeline.scoring import Scorer, collect_inputs
from pipeline.train import SplitResult
from stages.train import write_run

SHAPES = {"vit": (4, 6)}


def _record(prompts: list[str] | None = None) -> dict:
    return {
        "format": FORMAT,
        "dataset": "toy",
        "run": "probe_vit",
        "head": {
            "name": "probe",
            "config": {"encoder": "vit", "hidden": 8, "dropout": 0.0},
            "input_shapes": {k: list(v) for k, v in SHAPES.items()},
            "outputs": ["quality", "alignment"],
            "prompts": prompts,
            "clip_model": None,
        },
        "recipe": {"batch_size": 4},
        "stores": {"vit": {"encoder": "vit"}},
    }


@pytest.fixture
def run_dir(tmp_path):
    """A two-split probe run written by the train stage's writer, with known target scales."""
    results = []
    for k in range(2):
        torch.manual_seed(k)
        head = create_head("probe", 2, SHAPES, encoder="vit", hidden=8, dropout=0.0)
        frame = pd.DataFrame({"split": [k], "part": ["test"], "image_id": ["a"]})
        offset, scale = np.float32([1.0 + k, 2.0]), np.float32([3.0, 0.5 + k])
        results.append(SplitResult(0, head.state_dict(), frame, [], offset, scale))
    write_run(tmp_path / "probe_vit", results, _record())
    return tmp_path / "probe_vit"


def test_a_written_run_predicts_what_its_heads_give_in_mos_units(run_dir):
    run = TrainedRun.load(run_dir)
    x = np.random.default_rng(0).normal(size=(10, *SHAPES["vit"])).astype(np.float16)
    features = Features.in_memory({"vit": x})
    expected = []
    for k in range(2):
        torch.manual_seed(k)
        head = create_head("probe", 2, SHAPES, encoder="vit", hidden=8, dropout=0.0).eval()
        with torch.no_grad():
            out = head({"vit": torch.from_numpy(x)}).numpy()
        offset, scale = run.target_scale(k)
        expected.append(out * scale + offset)
        np.testing.assert_allclose(run.predictor(k)(features, np.arange(10)), expected[-1], rtol=1e-6)
    ensemble = run.predictor()(features, np.arange(10))
    np.testing.assert_allclose(ensemble, np.mean(expected, axis=0), rtol=1e-6)
    with pytest.raises(RunError, match=r"splits 0\.\.1, not 2"):
        run.predictor(2)


def test_altered_or_missing_weights_are_refused_by_name(run_dir):
    weights = run_dir / "split1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RunError, match=r"split1.safetensors differs from the sha256"):
        TrainedRun.load(run_dir)
    weights.unlink()
    with pytest.raises(RunError, match=r"split1.safetensors \(split 1's weights\) is missing"):
        TrainedRun.load(run_dir)


def test_records_of_another_format_or_no_record_are_refused(run_dir, tmp_path):
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "format": "agiqa-run/0"}))
    with pytest.raises(RunError, match="format 'agiqa-run/0'"):
        TrainedRun.load(run_dir)
    with pytest.raises(RunError, match=r"no run\.json or config\.json"):
        TrainedRun.load(tmp_path)


def test_score_inputs_from_a_folder_a_csv_or_one_file(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "sub/a.JPG", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    found = collect_inputs(tmp_path / "imgs")["path"].tolist()
    assert found == [str(tmp_path / "imgs" / "b.png"), str(tmp_path / "imgs" / "sub" / "a.JPG")]
    (tmp_path / "list.csv").write_text("path,prompt\nimgs/b.png,a red fox\n")
    table = collect_inputs(tmp_path / "list.csv")
    assert table.to_dict("records") == [{"path": str(tmp_path / "imgs" / "b.png"), "prompt": "a red fox"}]
    (tmp_path / "bad.csv").write_text("file\nimgs/b.png\n")
    with pytest.raises(ValueError, match=r"bad.csv: no 'path' column \(columns: \['file'\]\)"):
        collect_inputs(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        collect_inputs(tmp_path / "empty")


def test_a_prompt_reading_head_without_prompts_names_the_column_and_the_flag(tmp_path):
    record = {**_record(prompts=["a red fox"]), "splits": [{"weights": "split0.safetensors"}]}
    scorer = Scorer(TrainedRun(tmp_path, record), device="cpu")
    with pytest.raises(ValueError, match=r"'prompt' column, or --prompt TEXT"):
        scorer.score(["x.png"])
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        scorer.score(["x.png"], prompts=["a", "b"])


def test_a_hub_repo_id_loads_from_the_hub_cache_offline(run_dir, tmp_path, monkeypatch):
    """Scorer.from_pretrained(repo_id, revision) goes through huggingface_hub's cache (its layout
    built by hand: snapshots/<commit>/ and refs/main), with HF_HUB_OFFLINE set: no network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "a" * 40
    snapshot = cache / "models--lab--agiqa-probe" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in run_dir.iterdir():
        target = "config.json" if file.name == "run.json" else file.name
        (snapshot / target).write_bytes(file.read_bytes())
    (cache / "models--lab--agiqa-probe" / "refs").mkdir()
    (cache / "models--lab--agiqa-probe" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for revision in (None, commit):
        scorer = Scorer.from_pretrained("lab/agiqa-probe", revision=revision, device="cpu")
        assert scorer.run.root == snapshot and scorer.run.record["run"] == "probe_vit"
    assert scorer.source == f"lab/agiqa-probe@{commit}"
    with pytest.raises(FileNotFoundError, match="lab/other: not a local run or bundle folder"):
        Scorer.from_pretrained("lab/other", device="cpu")


def test_encoders_are_rebuilt_from_store_provenance_and_checked(params):
    """score rebuilds an encoder from its store's record: the same weights (by digest), the identity view
    alone (extra views are training augmentation), and any other difference refused by key."""
    from pipeline.encoders import create_encoder
    from pipeline.scoring import EncoderMismatch, rebuild_encoder

    cfg = {**params["extract"]["vit"], "views": ["identity", "hflip"]}
    stage1 = create_encoder("vit", cfg, "demo", dtype="float32")
    provenance = {**stage1.provenance(), "config": {"cfg": cfg, "dtype": "float32"}, "batch_size": 16}
    rebuilt = rebuild_encoder("vit", json.loads(json.dumps(provenance)), "cpu")
    assert rebuilt.views == ["identity"] and rebuilt.weights_sha256 == stage1.weights_sha256
    with pytest.raises(EncoderMismatch, match=r"vit encoder rebuilt here .*\(weights_sha256: recorded '0+'"):
        rebuild_encoder("vit", {**provenance, "weights_sha256": "0" * 64}, "cpu")
    with pytest.raises(EncoderMismatch, match="records no encoder config"):
        rebuild_encoder("vit", {k: v for k, v in provenance.items() if k != "config"}, "cpu")
