"""The demo DAG through DVC in a throwaway clone: repro, an ablation that skips stage 1, a killed extract,
and every stage's code deps against what it really imported.

This is the quickstart contract (`dvc repro`, `dvc exp run -S`, `dvc metrics diff`) run for real
on a shrunken demo (fewer images and epochs, set with `-S` exactly as a user would).
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from dvc_repo import GIT, SHRINK, STAGE_ENV, snapshot_repo, traced_env
from dvc_repo import run_in as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A snapshot of the working tree after one shrunken demo run, committed."""
    dest = snapshot_repo(tmp_path_factory.mktemp("clone"))
    args = [a for s in SHRINK for a in ("-S", s)]
    _run(["dvc", "exp", "run", *args], dest, env=traced_env(dest, dest.parent / "imports.jsonl"))
    _run([*GIT, "add", "-A"], dest)
    _run([*GIT, "commit", "-qm", "baseline"], dest)
    return dest


def test_repro_writes_flat_metrics_for_every_run(repo):
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    runs = metrics["demo"]
    for run in ("probe_vit", "probe_clip", "probe_semantic", "probe_qwen2_5_vl", "ma_agiqa", "ipiqa"):
        # MA-AGIQA trains quality alone, as the paper (ma_agiqa.outputs); the others add alignment
        assert set(runs[run]) - {"alignment"} == {"quality", "n_splits"}, run
        assert ("alignment" in runs[run]) == (run != "ma_agiqa"), run
        assert runs[run]["n_splits"] == 3
        assert -1 <= runs[run]["quality"]["srcc"]["mean"] <= 1
    assert "These numbers say nothing about AGIQA" in (repo / "reports" / "summary.md").read_text()
    shown = _run(["dvc", "metrics", "show", "--md"], repo).stdout
    assert "demo.ma_agiqa.quality.srcc.mean" in shown


RUNS = ("probe_vit", "probe_clip", "probe_semantic", "ma_agiqa", "maniqa", "semantic_only", "ipiqa")


def _test_images(repo: Path, run: str, k: int) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Split k's test rows of a run's predictions.csv, with their image paths and prompts."""
    pred = pd.read_csv(repo / "runs" / "demo" / run / "predictions.csv", dtype={"image_id": str})
    test = pred[(pred["split"] == k) & (pred["part"] == "test")]
    manifest = pd.read_csv(repo / "data" / "demo" / "manifest.csv", dtype=str).set_index("image_id")
    rows = manifest.loc[test["image_id"]]
    return test, [str(repo / "data" / "raw" / "demo" / p) for p in rows["path"]], rows["prompt"].tolist()


def test_score_reproduces_the_predictions_evaluate_read_for_every_run(repo, monkeypatch):
    """The live path (encoders rebuilt from the stores' provenance, then the head) and the cached path
    (extract, train, predictions.csv) agree on split k's test images, for every head family."""
    from pipeline.scoring import Scorer

    monkeypatch.chdir(repo)  # the tiny semantic checkpoint is built under the project's .cache
    for run in RUNS:
        test, paths, prompts = _test_images(repo, run, k=1)
        scores = Scorer.from_pretrained(f"runs/demo/{run}", split=1, device="cpu").score(paths, prompts)
        for output in ("quality", "alignment"):
            if f"pred_{output}" in test:
                np.testing.assert_allclose(
                    scores[output], test[f"pred_{output}"], rtol=1e-5, atol=1e-5, err_msg=f"{run} {output}"
                )


def test_score_a_folder_export_a_bundle_and_score_with_it(repo, tmp_path):
    agiqa = [sys.executable, "-m", "stages.cli"]
    out = tmp_path / "folder.csv"
    _run([*agiqa, "score", "data/raw/demo", "--model", "runs/demo/ma_agiqa", "--out", str(out)], repo)
    n_images = len(pd.read_csv(repo / "data" / "demo" / "manifest.csv"))
    scores = pd.read_csv(out)
    assert len(scores) == n_images and scores["quality"].notna().all()
    assert json.loads(out.with_name("folder.csv.json").read_text())["split"] == "mean of all splits"

    test, paths, prompts = _test_images(repo, "ipiqa", k=0)
    listing = tmp_path / "images.csv"
    pd.DataFrame({"path": paths, "prompt": prompts}).to_csv(listing, index=False)
    bundle = tmp_path / "bundle"
    _run([*agiqa, "export", "runs/demo/ipiqa", "--out", str(bundle)], repo)
    card = (bundle / "README.md").read_text()
    assert "model-index:" in card and "quality SRCC (mean over 3 splits)" in card
    assert not list(bundle.glob("*.pt")) and not list(bundle.glob("*.pkl"))
    by_run, by_bundle = tmp_path / "run.csv", tmp_path / "bundle.csv"
    for model, dest in (("runs/demo/ipiqa", by_run), (str(bundle), by_bundle)):
        _run([*agiqa, "score", str(listing), "--model", model, "--split", "0", "--out", str(dest)], repo)
    pd.testing.assert_frame_equal(pd.read_csv(by_run), pd.read_csv(by_bundle))
    np.testing.assert_allclose(pd.read_csv(by_run)["alignment"], test["pred_alignment"], rtol=1e-5, atol=1e-5)

    no_prompt = subprocess.run(
        [*agiqa, "score", "data/raw/demo", "--model", str(bundle)],
        cwd=repo,
        env=STAGE_ENV,
        capture_output=True,
        text=True,
    )
    assert no_prompt.returncode != 0 and "'prompt' column, or --prompt TEXT" in no_prompt.stderr

    config = json.loads((bundle / "config.json").read_text())
    config["stores"]["clip"]["weights_sha256"] = "0" * 64
    (bundle / "config.json").write_text(json.dumps(config))
    tampered = subprocess.run(
        [*agiqa, "score", str(listing), "--model", str(bundle)],
        cwd=repo,
        env=STAGE_ENV,
        capture_output=True,
        text=True,
    )
    assert tampered.returncode != 0
    assert (
        "the clip encoder rebuilt here is not the one the run was trained on (weights_sha256"
        in tampered.stderr
    )


def test_score_lists_bad_images_or_stops_on_them(repo, tmp_path):
    images = sorted((repo / "data" / "raw" / "demo" / "images").glob("*.png"))[:3]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "zz_truncated.png").write_bytes(images[0].read_bytes()[:200])
    agiqa = [sys.executable, "-m", "stages.cli", "score", str(folder), "--model", "runs/demo/maniqa"]
    stopped = subprocess.run(agiqa, cwd=repo, env=STAGE_ENV, capture_output=True, text=True)
    assert stopped.returncode == 2 and "zz_truncated.png: not a readable image" in stopped.stderr
    out = tmp_path / "scores.csv"
    skipped = _run([*agiqa, "--on-bad-image", "skip", "--out", str(out)], repo)
    assert "skipped 1 bad image(s)" in skipped.stderr and "zz_truncated.png" in skipped.stderr
    scores = pd.read_csv(out, keep_default_na=False)
    assert len(scores) == 4 and (scores["skipped"] != "").tolist() == [False, False, False, True]
    assert scores["quality"].iloc[3] == ""  # no score for it, and no row silently dropped


def test_stage2_experiment_reruns_no_extraction(repo):
    out = _run(["dvc", "exp", "run", "-S", "probe.model.hidden=32"], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran, out
    assert not any(s.startswith(("extract", "prepare", "split")) for s in ran), ran
    assert {"train_probe@demo-vit", "evaluate@demo", "report"} <= ran
    assert not any(s.startswith("train_ma_agiqa") for s in ran)
    diff = _run(["dvc", "metrics", "diff", "--json"], repo).stdout
    changed = json.loads(diff)["reports/metrics.json"]
    assert any(key.startswith("demo.probe_vit.") for key in changed)
    assert not any(key.startswith("demo.ma_agiqa.") for key in changed)


def test_fusion_and_qa_token_experiments_retrain_only_their_heads(repo):
    """fusion.experts is read by the full MA-AGIQA model alone (its ablations have their own stage)."""
    out = _run(["dvc", "exp", "run", "-S", "fusion.experts=4", "-S", "ipiqa.qa_token=false"], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"train_ma_agiqa@demo-ma_agiqa", "train_ipiqa@demo-ipiqa", "evaluate@demo", "report"}, ran
    changed = json.loads(_run(["dvc", "metrics", "diff", "--json"], repo).stdout)["reports/metrics.json"]
    assert any(key.startswith("demo.ma_agiqa.") for key in changed)
    # v["old"] == v["old"] drops NaN -> NaN entries, which DVC lists as changed
    others = {
        k: v
        for k, v in changed.items()
        if k.startswith(("demo.maniqa.", "demo.semantic_only.")) and v["old"] == v["old"]
    }
    assert not others, others


def test_ma_agiqa_on_another_vlm_retrains_its_heads_and_extracts_nothing(repo):
    """ma_agiqa.semantic_encoder switches MA-AGIQA's prompt experts to the store of the `vlms` entry
    qwen2_5_vl, which the DAG already extracted: only the MA-AGIQA heads train again."""
    out = _run(["dvc", "exp", "run", "-S", "ma_agiqa.semantic_encoder=qwen2_5_vl"], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert not any(
        s.startswith(("extract", "prepare", "split", "train_probe", "train_ipiqa")) for s in ran
    ), ran
    assert {"train_ma_agiqa@demo-ma_agiqa", "train_ma_agiqa_ablation@demo-semantic_only"} <= ran
    record = json.loads((repo / "runs" / "demo" / "ma_agiqa" / "run.json").read_text())
    assert record["stores"]["semantic"]["encoder"] == "vlm"
    assert record["head"]["input_shapes"]["semantic"][1] == record["stores"]["semantic"]["feature_dim"]


def test_killed_extract_resumes_without_recomputing_finished_chunks(repo):
    """SIGKILL mid-run, then rerun: only the missing rows are computed and the store equals a clean one."""
    out = repo / "features" / "demo" / "vit_resumed.h5"
    cmd = [
        sys.executable,
        "-m",
        "stages.extract",
        "demo",
        "vit",
        "data/demo/manifest.csv",
        "data/raw/demo",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    committed = 0
    for line in proc.stdout:
        if m := re.match(r"committed rows (\d+):(\d+)", line):
            committed += int(m.group(2)) - int(m.group(1))
            if committed >= 40:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and committed >= 40
    assert not out.exists() and out.with_name(out.name + ".partial").exists()
    done = _run(cmd, repo).stdout
    total = 80
    m = re.search(r"computed (\d+) of (\d+) rows", done)
    assert m, done
    assert int(m.group(2)) == total
    # rows committed before the kill are not recomputed; at most the chunk in flight is lost
    assert int(m.group(1)) <= total - committed
    with h5py.File(out) as a, h5py.File(repo / "features" / "demo" / "vit.h5") as b:
        np.testing.assert_array_equal(a["features"][()], b["features"][()])


def _traced_stages(repo: Path, log: Path) -> dict[str, list[str]]:
    """Stage name -> project files its process imported, matched by command line."""
    from dvc.repo import Repo

    runs = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        script = Path(entry["argv"][0])
        if script.parent == repo / "stages":
            runs[(f"stages.{script.stem}", *entry["argv"][1:])] = entry["files"]
    with Repo(str(repo)) as dvc:
        commands = {s.name: shlex.split(s.cmd) for s in dvc.index.stages}
    return {name: runs[tuple(cmd[2:])] for name, cmd in commands.items() if tuple(cmd[2:]) in runs}


def _is_code(repo: Path, dep: str) -> bool:
    """A project module or package folder (data files such as pipeline/anchors.csv are read, not imported)."""
    return dep.startswith(("stages/", "pipeline/")) and (dep.endswith(".py") or (repo / dep).is_dir())


def _code_deps(repo: Path, stage: str) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        (found,) = [s for s in dvc.index.stages if s.name == stage]
        return [d.def_path for d in found.deps if _is_code(repo, d.def_path)]


def _dep_problems(repo: Path, stage: str, imported: list[str]) -> list[str]:
    """Imported files outside every code dep; code deps never imported; folders with modules not imported."""
    deps = _code_deps(repo, stage)
    imported = [f for f in imported if f.startswith(("stages/", "pipeline/"))]

    def under(file: str, dep: str) -> bool:
        return file == dep or file.startswith(dep.rstrip("/") + "/")

    problems = [f"imports {f}, not under any dep" for f in imported if not any(under(f, d) for d in deps)]
    problems += [f"declares {d}, never imported" for d in deps if not any(under(f, d) for f in imported)]
    for dep in (d for d in deps if (repo / d).is_dir()):
        modules = {p.relative_to(repo).as_posix() for p in (repo / dep).rglob("*.py")}
        problems += [f"declares {dep} but never imports {m}" for m in sorted(modules - set(imported))]
    return problems


def test_every_stage_depends_on_exactly_the_code_it_imports(repo):
    """Each stage process was traced (tests/import_trace): its deps cover what it imported, nothing more."""
    traced = _traced_stages(repo, repo.parent / "imports.jsonl")
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        stages = {s.name for s in dvc.index.stages}
    assert set(traced) == stages, f"stages not traced: {sorted(stages - set(traced))}"
    problems = {stage: p for stage in sorted(traced) if (p := _dep_problems(repo, stage, traced[stage]))}
    assert not problems, json.dumps(problems, indent=2)


def test_adding_a_variant_or_dropping_an_encoder_retrains_nothing_that_exists(repo):
    """probe and ipiqa params are declared per key, never as the sections that also list the runs."""
    out = _run(["dvc", "exp", "run", "-S", "ipiqa.variants=[ipiqa,ipiqa_image_only]"], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"train_ipiqa@demo-ipiqa_image_only", "evaluate@demo", "report"}, ran
    out = _run(["dvc", "exp", "run", "-S", "probe.encoders=[vit,clip]"], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"evaluate@demo", "report"}, ran


def test_a_second_vlm_entry_extracts_its_own_store_alone(repo):
    """Two transformers VLMs side by side: a new `vlms` entry (a tiny LLaVA) gets its own extract stage
    and store, and its probe trains; no other extract stage and no other head runs. (The file's last
    test: it adds stages to the workspace's DAG.)"""
    llava = (
        "{checkpoint: llava-hf/llava-1.5-7b-hf, revision: main, prompts: [semantic_content, coherence], "
        "pooling: mean, hidden_layer: -1, max_side: 1024, demo: {seed: 0, family: llava}}"
    )
    settings = ["vlms=[qwen2_5_vl,llava]", f"+extract.llava={llava}"]
    settings.append("probe.encoders=[vit,clip,semantic,qwen2_5_vl,llava]")
    out = _run(["dvc", "exp", "run", *[a for s in settings for a in ("-S", s)]], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert {s for s in ran if s.startswith(("extract", "train"))} == {
        "extract_vlm@demo-llava",
        "train_probe@demo-llava",
    }
    with h5py.File(repo / "features" / "demo" / "llava.h5") as f:
        assert json.loads(f.attrs["encoder"]) == "vlm" and "llava" in json.loads(f.attrs["model_type"])
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert {"probe_llava", "probe_qwen2_5_vl"} <= set(metrics["demo"])
