"""Two demo repros give the same bytes, whatever the `runtime` settings (slow: runs DVC twice).

`runtime` is deliberately not a DVC param: changing it re-runs nothing, so it must not change a
byte of what a run writes. The second run changes every runtime key at once (chunk size, workers,
two torchrun ranks per extract stage, a memory budget so small that stage 2 streams every store), in a
second clone; every output file of both runs must be byte-identical: manifests and images, splits,
HDF5 stores (written without timestamps), trained weights, predictions, curves, metrics and the report.

Both runs set MKL's conditional numerical reproducibility mode (``MKL_CBWR=AUTO,STRICT``, see the
README's "What reproduces"). Without it MKL does not promise equal results from run to run: in CI,
after other slow tests in the same session, one split of a probe trained to other last bits in the
first run (never reproduced alone, in sixteen reruns, or under load), so the runtime settings this
test is about could not be told apart from MKL's own variation.
"""

from pathlib import Path

import pytest
from dvc_repo import SHRINK, run_in, snapshot_repo

pytestmark = pytest.mark.slow

OUTPUTS = ("data", "splits", "features", "models", "runs", "metrics", "reports")
REPRODUCIBLE = {"MKL_CBWR": "AUTO,STRICT"}
RUNTIME = [
    "runtime.device=cpu",
    "runtime.num_workers=1",
    "runtime.chunk_rows=7",
    "runtime.processes=2",
    "runtime.memory_budget_gb=0.00005",
]


def _repro(dest: Path, extra: list[str]) -> dict[str, bytes]:
    repo = snapshot_repo(dest)
    run_in(["dvc", "exp", "run", *[a for s in [*SHRINK, *extra] for a in ("-S", s)]], repo, env=REPRODUCIBLE)
    files = {}
    for top in OUTPUTS:
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and path.name != ".gitignore" and not path.name.endswith(".writer.lock"):
                files[path.relative_to(repo).as_posix()] = path.read_bytes()
    return files


def test_runtime_settings_change_no_output_byte(tmp_path):
    first = _repro(tmp_path / "a", [])
    second = _repro(tmp_path / "b", RUNTIME)
    assert set(first) == set(second)
    assert any(name.endswith(".h5") for name in first) and any(n.endswith("predictions.csv") for n in first)
    differ = sorted(name for name in first if first[name] != second[name])
    assert not differ, f"{len(differ)} of {len(first)} files differ: {differ[:20]}"
