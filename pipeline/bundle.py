"""Exported bundles: a trained run as a self-contained folder to hand on or publish on the Hub.

A bundle holds the run's weights (``split<k>.safetensors``), ``config.json`` (the run's record,
plus where and from which commit it was exported and a sha256 of the params it was trained with),
an Image2Prompt image tower when the run used one, and a ``README.md`` model card in the Hugging
Face layout (YAML front matter with a ``model-index`` block of its metrics and intervals). Nothing in
it is pickled or executable. ``Scorer.from_pretrained`` loads a bundle folder or a hub repo id;
the encoders are not copied (they are the published checkpoints the record names by digest or
revision), and a bundle whose rebuilt encoders differ from its record is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pipeline.provenance import built_beside
from pipeline.runs import TrainedRun

TOWER_FILE = "image_tower.safetensors"


def git_revision(folder: Path) -> str | None:
    """The commit of the checkout holding ``folder`` (``-dirty`` when it has changes), else None."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def params_sha256(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def _metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """model-index metric entries: per output, mean over splits of each metric, with its interval."""
    rows = []
    for output in ("quality", "alignment"):
        for metric, stats in metrics.get(output, {}).items():
            if not isinstance(stats, dict) or "mean" not in stats:
                continue
            name = f"{output} {metric.upper()} (mean over {metrics.get('n_splits', '?')} splits)"
            if "lo" in stats:
                name += f", 95% interval [{stats['lo']:.4f}, {stats['hi']:.4f}]"
            rows.append({"type": metric, "value": round(float(stats["mean"]), 6), "name": name})
    return rows


def model_card(run: TrainedRun, metrics: dict[str, Any] | None) -> str:
    """README.md: front matter (library, tags, datasets, model-index) and a short human description."""
    import yaml

    record = run.record
    head, dataset = record["head"]["name"], record["dataset"]
    front: dict[str, Any] = {
        "library_name": "agiqa-pipeline",
        "tags": ["image-quality-assessment", "ai-generated-images", head],
        "datasets": [dataset],
    }
    if metrics:
        front["model-index"] = [
            {
                "name": f"{dataset}-{record['run']}",
                "results": [
                    {
                        "task": {"type": "image-quality-assessment", "name": "Image quality assessment"},
                        "dataset": {"name": dataset, "type": dataset},
                        "metrics": _metric_rows(metrics),
                    }
                ],
            }
        ]
    encoders = ", ".join(
        f"{name} ({prov.get('model')}, {prov.get('profile')})" for name, prov in record["stores"].items()
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {record['run']} on {dataset}",
        "",
        f"An agiqa-pipeline `{head}` head trained on cached features of {encoders}.",
        f"Outputs: {', '.join(run.outputs)}, in the MOS units of {dataset} (train.target_norm "
        f"`{record['target_norm']}` undone per split). Protocol `{record['protocol']}` "
        f"({run.n_splits} splits, hash `{record['protocol_hash'][:12]}`), epoch selected on "
        f"`{record['select']}`.",
        "",
        "```python",
        "from pipeline.scoring import Scorer",
        "",
        'scores = Scorer.from_pretrained("<this folder or repo id>").score(["image.png"])',
        "```",
        "",
        "or `agiqa score IMAGES --model <this folder or repo id>`. The encoders are the published",
        "checkpoints recorded in `config.json` (by weights digest or revision); they are rebuilt and",
        "checked, never shipped here.",
    ]
    if metrics:
        lines += ["", "| output | metric | mean | 95% interval |", "|---|---|---|---|"]
        for output in run.outputs:
            for metric, stats in metrics.get(output, {}).items():
                if isinstance(stats, dict) and "mean" in stats:
                    interval = f"[{stats['lo']:.4f}, {stats['hi']:.4f}]" if "lo" in stats else ""
                    lines.append(f"| {output} | {metric} | {stats['mean']:.4f} | {interval} |")
    return "\n".join(lines) + "\n"


def export_bundle(run_dir: Path, out: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write the bundle of ``run_dir`` to ``out`` (built beside it, renamed when complete)."""
    run = TrainedRun.load(run_dir)
    record = json.loads(json.dumps(run.record))
    with built_beside(out) as building:
        for split in record["splits"]:
            shutil.copyfile(run.root / split["weights"], building / split["weights"])
        clip_spec = record["head"].get("clip_model") or {}
        if clip_spec.get("image_tower"):
            shutil.copyfile(run.resolve(clip_spec["image_tower"]), building / TOWER_FILE)
            clip_spec["image_tower"] = TOWER_FILE
        record["exported"] = {
            "from": str(run_dir),
            "git_revision": git_revision(Path(run_dir).resolve().parent),
            "params_sha256": params_sha256(record.get("params", {})),
        }
        (building / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        (building / "README.md").write_text(model_card(run, metrics))
    return out


def push_to_hub(bundle: Path, repo_id: str, revision: str | None = None, private: bool = True) -> str:
    """Upload a bundle folder to a Hub model repo (created when missing); returns the commit url."""
    from huggingface_hub import HfApi

    TrainedRun.load(bundle)  # refuse to publish an incomplete or altered bundle
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(bundle), repo_id=repo_id, revision=revision, commit_message="agiqa export"
    )
    return str(commit)
