"""Side-by-side measurements shared by the demo, ``fxmem bench`` and ``benchmarks/``.

Everything is measured in one process, one run, the same inputs: compile time (first call),
step time (median of the following calls), saved-activation bytes from outside
(``saved_tensors_hooks``) and parameter bytes. Timings on a CPU are reported as ratios to eager.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fxmem.analysis.saved import measure_saved_bytes
from fxmem.analysis.sizes import module_parameter_bytes


@dataclass
class TrainingMeasurement:
    name: str
    compile_s: float
    step_s: float
    saved_bytes: int
    param_bytes: int
    loss: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):  # (logits, loss)
        return out[1]
    return out.float().pow(2).mean()


def measure_training(
    name: str,
    model: torch.nn.Module,
    make_step_model: Callable[[torch.nn.Module], Callable],
    args: tuple,
    *,
    steps: int = 3,
    lr: float = 1e-3,
) -> TrainingMeasurement:
    """Train ``steps`` steps of ``make_step_model(model)`` with SGD; the first step includes compilation."""
    fn = make_step_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    times = []
    loss = torch.tensor(0.0)
    for _ in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _loss_of(fn(*args))
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    saved = measure_saved_bytes(lambda: fn(*args), model)
    return TrainingMeasurement(
        name=name,
        compile_s=times[0],
        step_s=statistics.median(times[1:]),
        saved_bytes=saved.bytes,
        param_bytes=module_parameter_bytes(model),
        loss=float(loss.detach()),
    )


def time_inference(fn: Callable, args: tuple, repeats: int = 5) -> tuple[float, float]:
    """(first-call seconds, median of the next ``repeats`` calls) under ``torch.no_grad``."""
    with torch.no_grad():
        start = time.perf_counter()
        fn(*args)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    return first, statistics.median(times)
