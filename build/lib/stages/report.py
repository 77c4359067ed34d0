"""Stage `report`: metrics/<dataset>/ and metrics/cross/<pair>/ -> reports/metrics.json + summary.md.

``reports/metrics.json`` is the one DVC metrics file, kept short so that ``dvc metrics diff`` reads
as a table: per dataset, run and output the mean over splits of each metric, the bootstrap interval
(``lo``, ``hi``: over test images) of SRCC and PLCC, and the worst generator's SRCC; e.g.
``demo.ma_agiqa.quality.srcc.mean``. Cross-dataset pairs sit under ``cross.<pair>``. Medians, stds,
intervals over splits and per-group tables are in ``metrics/`` and ``reports/summary.md``, which
also prints the published numbers of ``pipeline/anchors.csv`` beside ours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import typer

from pipeline.anchors import ANCHORS, load_anchors
from stages import read_params

PARAMS = ("datasets", "profile", "cross.pairs")
OUTPUTS = ("quality", "alignment")
COLUMNS = ("srcc", "plcc", "krcc", "plcc_raw", "rmse")
# What reports/metrics.json keeps of each output's summary: metric -> statistics.
TRACKED = {
    "srcc": ("mean", "lo", "hi"),
    "plcc": ("mean", "lo", "hi"),
    "krcc": ("mean",),
    "plcc_raw": ("mean",),
    "rmse": ("mean",),
}


def tracked(runs: dict) -> dict:
    """The short form of one metrics.json (run -> output -> metric -> statistic) for DVC."""
    out = {}
    for run, res in runs.items():
        entry: dict = {"n_splits": res["n_splits"]}
        for output in OUTPUTS:
            if output not in res:
                continue
            entry[output] = {
                m: {s: res[output][m][s] for s in keep if s in res[output][m]} for m, keep in TRACKED.items()
            }
            if "generator" in res[output].get("worst", {}):
                entry[output]["worst_generator"] = {"srcc": res[output]["worst"]["generator"]["srcc"]}
        out[run] = entry
    return out


def _num(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(stats: dict, prefix: str = "") -> str:
    if f"{prefix}lo" not in stats:
        return "–"
    return f"[{_num(stats[f'{prefix}lo'], 3)}, {_num(stats[f'{prefix}hi'], 3)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def protocol_line(res: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in res.get("protocol_params", {}).items())
    select = {"val": "on the validation part", "test_oracle": "on the test part (test oracle, optimistic)"}
    hashes = f"hash `{res['protocol_hash'][:12]}`"
    if "train_protocol_hash" in res:  # cross-dataset: the test parts' splits, then the train parts'
        hashes = (
            f"hashes `{res['protocol_hash'][:12]}` (test) and `{res['train_protocol_hash'][:12]}` (train)"
        )
    return (
        f"Protocol `{res['protocol']}` ({params}), {hashes}, {res['n_splits']} "
        f"split(s); epoch selected {select.get(res['select'], res['select'])}, one epoch per split for "
        "every metric (SRCC and PLCC from the same epoch)."
    )


def results_tables(runs: dict) -> list[str]:
    """Mean ± std per metric; then medians and both intervals of SRCC and PLCC."""
    main, spread = [], []
    for run, res in runs.items():
        for output in OUTPUTS:
            if output not in res:
                continue
            r = res[output]
            cells = [f"{_num(r[m]['mean'])} ± {_num(r[m]['std'])}" for m in COLUMNS]
            main.append(
                [run, output, str(res["n_splits"]), res["select"], f"`{res['protocol_hash'][:12]}`", *cells]
            )
            spread.append(
                [run, output]
                + [
                    x
                    for m in ("srcc", "plcc")
                    for x in (_num(r[m]["median"]), _interval(r[m]), _interval(r[m], "splits_"))
                ]
            )
    lines = _table(["run", "output", "splits", "select", "protocol hash", *COLUMNS], main)
    lines += [
        "Medians over splits and 95% bootstrap intervals of the mean (over test images; over splits):",
        "",
    ]
    header = ["run", "output"] + [
        f"{m} {s}" for m in ("SRCC", "PLCC") for s in ("median", "CI images", "CI splits")
    ]
    return lines + _table(header, spread)


def read_groups(path: Path) -> pd.DataFrame:
    """groups.csv with group names kept as text ("None" is a name) and empty metrics as NaN."""
    text = {c: str for c in ("run", "output", "by", "group")}
    return pd.read_csv(path, dtype=text, keep_default_na=False, na_values={m: [""] for m in COLUMNS})


def group_tables(runs: dict, groups: pd.DataFrame) -> list[str]:
    """SRCC per generator and per variant (columns), one row per run and output, worst group named."""
    lines = []
    for by, part in groups.groupby("by", sort=False):
        names = sorted(part["group"].unique())
        rows = []
        for (run, output), rows_of in part.groupby(["run", "output"], sort=False):
            srcc = dict(zip(rows_of["group"], rows_of["srcc"], strict=True))
            worst = runs[run][output]["worst"].get(by, {}).get("group", "–")
            rows.append([run, output, *(_num(srcc.get(g, math.nan), 3) for g in names), worst])
        lines += [f"SRCC per {by} (mean over splits; groups of at least 3 test images per split):", ""]
        lines += _table(["run", "output", *names, "worst"], rows)
    return lines


def anchor_rows(anchors: pd.DataFrame) -> list[list[str]]:
    rows = []
    for a in anchors.itertuples():
        verified = "" if a.verified == "yes" else " (unverified)"
        rows.append(
            [
                a.method,
                a.output,
                _num(a.srcc),
                _num(a.plcc),
                _num(a.krcc),
                _num(a.rmse),
                a.protocol,
                a.select,
                a.plcc_fit,
                a.source + verified,
            ]
        )
    return rows


def beside_published(runs: dict, anchors: pd.DataFrame, dataset: str, train_dataset: str = "") -> list[str]:
    """Our runs with the published numbers of the same method, then the other published methods."""
    mine = anchors[(anchors["dataset"] == dataset) & (anchors["train_dataset"] == train_dataset)]
    if mine.empty:
        return [
            f"No published numbers for `{dataset}` in `{ANCHORS.name}` (it covers "
            f"{', '.join(sorted(anchors['dataset'].unique()))}).",
            "",
        ]
    rows = []
    for run, res in runs.items():
        for output in OUTPUTS:
            if output in res:
                r = res[output]
                rows.append(
                    [
                        f"**ours: {run}**",
                        output,
                        _num(r["srcc"]["mean"]),
                        _num(r["plcc"]["mean"]),
                        _num(r["krcc"]["mean"]),
                        _num(r["rmse"]["mean"]),
                        f"{res['protocol']} ({res['n_splits']} splits)",
                        res["select"],
                        "logistic (raw in `plcc_raw`)",
                        "this run",
                    ]
                )
        rows += anchor_rows(mine[(mine["run"] == run)])
    rows += anchor_rows(mine[~mine["run"].isin(list(runs))])
    header = ["method", "output", "SRCC", "PLCC", "KRCC", "RMSE", "protocol", "select", "PLCC fit", "source"]
    note = "Beside published numbers (different protocols are not comparable; see the protocol column):"
    return [note, "", *_table(header, rows)]


def dataset_section(
    title: str, runs: dict, groups: pd.DataFrame, anchors: pd.DataFrame, level: int = 2, **kw
) -> list[str]:
    if not runs:
        return [f"{'#' * level} {title}", "", "No runs.", ""]
    lines = [f"{'#' * level} {title}", "", protocol_line(next(iter(runs.values()))), ""]
    return lines + results_tables(runs) + group_tables(runs, groups) + beside_published(runs, anchors, **kw)


def main(metrics_dir: Path, out_json: Path, out_md: Path) -> None:
    p = read_params(PARAMS)
    anchors = load_anchors()
    lines = [
        "# Results",
        "",
        f"Profile: `{p['profile']}`. Test-part metrics per run and output: mean ± std over splits (PLCC "
        "and RMSE after the 4-parameter logistic fitted on each split's test part; `plcc_raw` without "
        "it). 95% intervals are percentile bootstraps: over test images (the logistic held fixed) and "
        "over splits. Per-split rows: `metrics/<dataset>/per_split.csv`; per-group: `groups.csv`.",
        "",
    ]
    if p["profile"] == "demo":
        lines += [
            "Demo profile: synthetic images and tiny random backbones. "
            "These numbers say nothing about AGIQA.",
            "",
        ]
    tracked_all = {}
    for ds in p["datasets"]:
        runs = json.loads((metrics_dir / ds / "metrics.json").read_text())
        groups = read_groups(metrics_dir / ds / "groups.csv")
        tracked_all[ds] = tracked(runs)
        lines += dataset_section(ds, runs, groups, anchors, dataset=ds)
    if p["cross.pairs"]:
        tracked_all["cross"] = {}
        lines += [
            "## Cross-dataset",
            "",
            "Trained on the first dataset's train parts, tested on the second's "
            "test parts (split k with split k); the logistic is fitted on the test set.",
            "",
        ]
        for pair, spec in p["cross.pairs"].items():
            folder = metrics_dir / "cross" / pair
            runs = json.loads((folder / "metrics.json").read_text())
            groups = read_groups(folder / "groups.csv")
            tracked_all["cross"][pair] = tracked(runs)
            lines += dataset_section(
                f"{pair}: {spec['train']} -> {spec['test']}",
                runs,
                groups,
                anchors,
                level=3,
                dataset=spec["test"],
                train_dataset=spec["train"],
            )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(tracked_all, indent=2) + "\n")
    out_md.write_text("\n".join(lines))
    typer.echo(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    typer.run(main)
