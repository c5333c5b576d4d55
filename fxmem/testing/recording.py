"""A backend whose compiles are always recorded: for tests and benchmarks that read what fxmem did."""

from __future__ import annotations

from typing import Any

from fxmem.backend import FxmemBackend
from fxmem.config import parse_options
from fxmem.pipeline import Recorder


def recording_backend(**options: Any) -> FxmemBackend:
    """``fxmem.backend(**options)`` that runs fxmem's passes and partition on every compile and
    records them in ``.recorder`` (pass records, partitions, step timelines).

    ``fxmem.backend()`` lets AOTAutograd's on-disk cache serve a training compile, as
    ``torch.compile`` does; a hit skips the partition, so its recorder may stay empty when the same
    graph was compiled before (by an earlier test, or an earlier run). This one keeps that cache
    off — Inductor's FX-graph cache still serves the compiled graphs — as explain does."""
    return FxmemBackend(parse_options(options), Recorder())
