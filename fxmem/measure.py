"""Side-by-side measurements shared by the demo, ``fxmem bench`` and ``benchmarks/``.

Everything is measured in one process, one run, the same inputs: compile time (first call),
step time (median of the following calls), **peak memory measured from outside**
(:func:`peak_memory`), saved-activation bytes from outside (``saved_tensors_hooks``) and
parameter bytes. Timings on a CPU are reported as ratios to eager.

Peak memory is the figure fxmem answers to. It is measured, never estimated:

* CPU: every allocation and free the CPU allocator makes while ``fn`` runs, as recorded by
  ``torch.profiler`` with ``profile_memory=True`` (Inductor's buffers and eager ops alike); the
  peak is the highest running sum of those events.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` before, ``torch.cuda.max_memory_allocated``
  after (the caching allocator's allocated bytes, not its reserved pool).

Either way the figure is the peak *above* what was allocated when ``fn`` started: for a
training step that starts with ``grad=None``, it counts activations, temporaries and the
gradients the step creates, not the parameters that already existed.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from fxmem.analysis.saved import measure_saved_bytes
from fxmem.analysis.sizes import module_parameter_bytes

MEMORY_EVENT = "[memory]"


@dataclass(frozen=True)
class PeakMemory:
    """The measured peak of one call: bytes above the memory in use when it started."""

    peak_bytes: int
    device: str
    method: str

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20

    def __str__(self) -> str:
        return f"{self.mib:.1f} MiB peak on {self.device} ({self.method})"


def peak_memory(fn: Callable[[], Any], *, device: str | torch.device | None = None) -> tuple[PeakMemory, Any]:
    """Run ``fn()`` once and measure its peak memory from outside; returns ``(peak, fn's result)``.

    ``device`` is ``"cpu"`` or a CUDA device; by default CUDA when one is available, else the
    CPU. What ``fn`` returns is kept alive by the caller, so it counts in the peak (as it would
    in the caller's program), not after it.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return _cuda_peak(fn, dev)
    if dev.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' devices; got {str(dev)!r}")
    return _cpu_peak(fn)


def _cuda_peak(fn: Callable[[], Any], dev: torch.device) -> tuple[PeakMemory, Any]:
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - start
    return PeakMemory(peak, f"cuda:{torch.cuda.get_device_name(dev)}", "torch.cuda.max_memory_allocated"), result


def _cpu_peak(fn: Callable[[], Any]) -> tuple[PeakMemory, Any]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # The raw allocator events: FunctionEvent lists fold allocations into the ops that made them.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == MEMORY_EVENT and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    # Only frees of blocks allocated inside this window count. The profiler reports a free when
    # c10's CPU memory reporter knows the block's size, and its size table (process-wide) keeps
    # the blocks allocated in *earlier* profiled windows — and, stale, the addresses of those
    # freed while no profiler ran, so a later block at a reused address is "freed" with the old
    # size. Counting such frees lowered this window's peak depending on what ran before (a test
    # order dependence: tests/test_measure.py). The events carry no address, so a free is paired
    # with an outstanding allocation of the same size made in this window; one without is ignored.
    outstanding: Counter[int] = Counter()
    live = peak = 0
    for event in events:
        nbytes = event.nbytes()
        if nbytes > 0:
            outstanding[nbytes] += 1
        elif outstanding[-nbytes] > 0:
            outstanding[-nbytes] -= 1
        else:
            continue
        live += nbytes
        peak = max(peak, live)
    return PeakMemory(peak, "cpu", "torch.profiler allocator events"), result


def training_step_peak(step: Callable[[], Any], *, device: str | torch.device | None = None, warmup: int = 1) -> PeakMemory:
    """The peak of one call of ``step`` after ``warmup`` calls (compilation stays out of it)."""
    for _ in range(warmup):
        step()
    peak, _ = peak_memory(step, device=device)
    return peak


@dataclass
class TrainingMeasurement:
    name: str
    compile_s: float
    step_s: float
    saved_bytes: int
    param_bytes: int
    loss: float
    peak_bytes: int = 0  # one step (zero_grad, forward, backward, SGD update) measured by peak_memory

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_loss(out: Any) -> torch.Tensor | None:
    """What a measured training step differentiates — one rule for explain, fit and the benchmarks:

    * an HF output (or any object with a ``loss`` attribute or key) whose ``loss`` requires grad:
      that loss, as a training loop calls ``out.loss.backward()`` — the logits beside it are not
      differentiated (their gradient would be a ``[B, T, V]`` tensor and two head matmuls no real
      step has);
    * else the 0-dim outputs that require grad (a loss returned in a tuple, the built-in GPT's
      ``(logits, loss)``), summed;
    * else, for a model that returns activations, the mean of squares of every output that requires
      grad, summed: a stand-in loss whose gradient is as large as the output, as a real loss's is
      (a plain ``sum``'s is a broadcast constant no real loss has).

    ``None`` when nothing requires grad (the step then has no backward)."""
    import collections.abc

    loss = out.get("loss") if isinstance(out, collections.abc.Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    scalars = [t for t in leaves if t.dim() == 0]
    if scalars:
        return sum(scalars[1:], scalars[0])
    if not leaves:
        return None
    squares = [t.float().pow(2).mean() for t in leaves]
    return sum(squares[1:], squares[0])


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

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = training_loss(fn(*args))
        if loss is None:
            raise ValueError("measure_training: no output of the model requires grad, so a step has no backward "
                             "(is the model in eval mode, or are its parameters frozen?)")
        loss.backward()
        opt.step()
        return loss.detach()

    loss = torch.tensor(0.0)
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    peak, _ = peak_memory(step, device="cuda" if device.type == "cuda" else "cpu")
    saved = measure_saved_bytes(lambda: fn(*args), model)
    return TrainingMeasurement(
        name=name,
        compile_s=times[0],
        step_s=statistics.median(times[1:]),
        saved_bytes=saved.bytes,
        param_bytes=module_parameter_bytes(model),
        loss=float(loss),
        peak_bytes=peak.peak_bytes,
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
