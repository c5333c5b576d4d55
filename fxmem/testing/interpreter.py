"""Run a kernel test file again under Triton's interpreter, in a fresh process.

Triton reads ``TRITON_INTERPRET`` when it is first imported. A pytest process that imported it
earlier without the variable cannot run kernels on the CPU, so a kernel test module re-runs
itself in a subprocess with the variable set (and a marker so that run does not recurse).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

SUBPROCESS_MARKER = "FXMEM_TEST_SUBPROCESS"


# A kernel whose loop bound is a runtime int, as every fxmem kernel's K loop is. Triton 3.6's
# interpreter (the version beside torch 2.11) passes runtime ints as 1-element arrays and takes
# their ``__index__`` with ``int(array)``, which numpy >= 2.4 refuses; later Triton releases work.
_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count(out_ptr, n):
    acc = tl.full((1,), 0, tl.int32)
    for _ in range(0, n, 1):
        acc += 1
    tl.store(out_ptr + tl.arange(0, 1), acc)
out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
assert int(out[0]) == 3, out
"""


@functools.lru_cache(maxsize=1)
def interpreter_defect() -> str | None:
    """Why this machine's Triton interpreter cannot run fxmem's kernels, or None when it can.

    Probed once per process, in a subprocess (the interpreter must be on before triton is imported).
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return None
    import numpy
    import triton
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound under numpy "
            f"{numpy.__version__} ({last}); the kernels are checked where the interpreter works or on a GPU")


def require_working_interpreter() -> None:
    """Skip the calling test, with the reason, when the interpreter cannot run fxmem's kernels here."""
    defect = interpreter_defect()
    if defect:
        pytest.skip(defect)


def rerun_under_interpreter(test_file: str, *, interpreter_on: bool, timeout: float = 600) -> None:
    """Skip when the interpreter is already on here (the tests ran in this process); otherwise
    run ``test_file`` under ``TRITON_INTERPRET=1`` and assert every test in it passed."""
    if interpreter_on or os.environ.get(SUBPROCESS_MARKER):
        pytest.skip("the interpreter is on in this process: the kernel tests run here")
    require_working_interpreter()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", SUBPROCESS_MARKER: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
