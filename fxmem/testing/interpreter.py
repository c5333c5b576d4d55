"""Run a kernel test file again under Triton's interpreter, in a fresh process.

Triton reads ``TRITON_INTERPRET`` when it is first imported. A pytest process that imported it
earlier without the variable cannot run kernels on the CPU, so a kernel test module re-runs
itself in a subprocess with the variable set (and a marker so that run does not recurse).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SUBPROCESS_MARKER = "FXMEM_TEST_SUBPROCESS"


def rerun_under_interpreter(test_file: str, *, interpreter_on: bool, timeout: float = 600) -> None:
    """Skip when the interpreter is already on here (the tests ran in this process); otherwise
    run ``test_file`` under ``TRITON_INTERPRET=1`` and assert every test in it passed."""
    if interpreter_on or os.environ.get(SUBPROCESS_MARKER):
        pytest.skip("the interpreter is on in this process: the kernel tests run here")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", SUBPROCESS_MARKER: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
