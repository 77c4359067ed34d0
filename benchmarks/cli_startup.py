"""Start-up time of the command line: `agiqa --help` (target <= 1.0 s) and `agiqa score --help` (<= 1.5 s).

Each command runs ``--repeats`` times in a fresh process (the first run warms the page cache and is
dropped); the median wall time is compared with its target. Exits 1 when one is over.

    python benchmarks/cli_startup.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

TARGETS = {"agiqa --help": 1.0, "agiqa score --help": 1.5, "agiqa export --help": 1.5}


def wall(args: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    agiqa = [sys.executable, "-m", "stages.cli"]
    over = []
    for command, target in TARGETS.items():
        argv = agiqa + command.split()[1:]
        times = [wall(argv) for _ in range(args.repeats + 1)][1:]
        median = statistics.median(times)
        print(
            f"{command:22s} median {median:.3f} s "
            f"(min {min(times):.3f}, max {max(times):.3f}), target <= {target} s"
        )
        if median > target:
            over.append(command)
    heavy = ("torch", "transformers", "timm", "open_clip")
    probe = f"import sys, stages.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    print(
        "heavy modules imported by `import stages.cli`:",
        subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, text=True
        ).stdout.strip(),
    )
    if over:
        raise SystemExit(f"over target: {', '.join(over)}")


if __name__ == "__main__":
    main()
