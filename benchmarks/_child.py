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


def run_each(script: str, names: list[str], child_args: list[str], results: dict, out: str, describe,
             threads: str, cache_prefix: str) -> None:
    """In the parent: one child per name (``python script --child NAME *child_args``), each
    with ``threads`` threads and a fresh Inductor cache directory; its report (or its error) is
    appended to ``results["archs"]`` and ``results`` written to ``out`` after every child, so a
    run cut short keeps what it measured. ``describe(entry)`` prints a measured entry."""
    import tempfile

    for name in names:
        env = dict(os.environ, OMP_NUM_THREADS=threads, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix=cache_prefix))
        entry, stderr = run(script, ["--child", name, *child_args], env)
        if entry is None:
            entry = {"arch": name, "error": stderr[-3000:]}
            print(f"{name:11s} FAILED: {stderr[-400:]}", flush=True)
        else:
            describe(entry)
        results["archs"].append(entry)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
