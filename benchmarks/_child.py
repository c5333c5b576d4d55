"""A benchmark's measurement in a fresh process: the child prints one marked JSON line, the parent reads it.

A fresh process per case keeps compile caches, Dynamo state and what a backend leaves in the
process from leaking into the next case, and lets a case choose its own environment
(``TORCHINDUCTOR_CACHE_DIR``, ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

MARK = "RESULT "


def report(result: Any) -> None:
    """In the child: hand ``result`` (JSON-serialisable) to the parent."""
    print(MARK + json.dumps(result), flush=True)


def run(script: str, args: list[str], env: dict[str, str]) -> tuple[Any | None, str]:
    """In the parent: run ``python script *args`` with ``env``; ``(its report or None, its stderr)``."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    return (None if line is None else json.loads(line[len(MARK):])), proc.stderr
