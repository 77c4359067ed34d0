"""Stage `report`: metrics/<dataset>/metrics.json for every dataset -> reports/metrics.json + summary.md.

``reports/metrics.json`` is the one DVC metrics file: {dataset: {run: {output: {metric: {mean,
median, std}}}}}, which DVC flattens to keys like ``demo.ma_agiqa.quality.srcc.mean``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from stages import read_params

PARAMS = ("datasets", "profile")
COLUMNS = ("srcc", "krcc", "plcc", "plcc_raw", "rmse")


def summary_table(dataset: str, runs: dict) -> list[str]:
    lines = [
        f"### {dataset}",
        "",
        "| run | output | splits | select | protocol | " + " | ".join(COLUMNS) + " |",
        "|---" * (5 + len(COLUMNS)) + "|",
    ]
    for run, res in runs.items():
        for output in ("quality", "alignment"):
            if output not in res:
                continue
            cells = [f"{res[output][m]['mean']:.4f} ± {res[output][m]['std']:.4f}" for m in COLUMNS]
            lines.append(
                f"| {run} | {output} | {res['n_splits']} | {res['select']} | {res['protocol']} | "
                + " | ".join(cells)
                + " |"
            )
    return [*lines, ""]


def main(metrics_dir: Path, out_json: Path, out_md: Path) -> None:
    p = read_params(PARAMS)
    merged = {ds: json.loads((metrics_dir / ds / "metrics.json").read_text()) for ds in p["datasets"]}
    numeric = {
        ds: {run: {k: v for k, v in res.items() if isinstance(v, dict | int)} for run, res in runs.items()}
        for ds, runs in merged.items()
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(numeric, indent=2) + "\n")
    lines = [
        "# Results",
        "",
        f"Profile: `{p['profile']}`. Test-part metrics, mean ± std over splits "
        "(PLCC and RMSE after the 4-parameter logistic fit; `plcc_raw` without it).",
        "",
    ]
    if p["profile"] == "demo":
        lines += [
            "Demo profile: synthetic images and tiny random backbones. "
            "These numbers say nothing about AGIQA.",
            "",
        ]
    for ds, runs in merged.items():
        lines += summary_table(ds, runs)
    out_md.write_text("\n".join(lines))
    typer.echo(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    typer.run(main)
