"""Import tracer for tests/test_pipeline_e2e.py: with this folder on PYTHONPATH and AGIQA_IMPORT_LOG
set, every Python process appends, at exit, its argv and the project source files it imported (those
under AGIQA_IMPORT_ROOT) to the log, one JSON line per process. DVC starts each stage as a process of
its own, so the log holds what each stage really ran, lazy imports included.
"""

import atexit
import json
import os
import sys
from pathlib import Path


def _dump() -> None:
    root = Path(os.environ["AGIQA_IMPORT_ROOT"]).resolve()
    files = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(root):
            files.add(Path(file).resolve().relative_to(root).as_posix())
    with open(os.environ["AGIQA_IMPORT_LOG"], "a") as log:
        log.write(json.dumps({"argv": sys.argv, "files": sorted(files)}) + "\n")


if os.environ.get("AGIQA_IMPORT_LOG"):
    atexit.register(_dump)
