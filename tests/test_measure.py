"""fxmem.measure.peak_memory: the peak is measured from the allocator, above what was in use at the start."""

import pytest
import torch

from fxmem.measure import measure_training, peak_memory

MIB = 2**20


def test_cpu_peak_counts_what_was_alive_together_not_the_sum():
    def fn():
        a = torch.ones(MIB // 4)        # 1 MiB
        b = torch.ones(2 * MIB // 4)    # 2 MiB, alive with a: 3 MiB
        del a, b
        c = torch.ones(MIB // 4)        # 1 MiB after both were freed
        return c

    peak, out = peak_memory(fn, device="cpu")
    assert 3 * MIB <= peak.peak_bytes < 3 * MIB + 64 * 1024
    assert out.numel() == MIB // 4 and peak.device == "cpu"


def test_memory_allocated_before_the_call_does_not_count():
    held = torch.ones(4 * MIB // 4)  # 4 MiB, allocated before

    def fn():
        return held * 2                   # one new 4 MiB tensor

    peak, _ = peak_memory(fn, device="cpu")
    assert 4 * MIB <= peak.peak_bytes < 5 * MIB


def test_a_block_from_an_earlier_measurement_freed_in_this_one_does_not_lower_the_peak():
    """The profiler knows the size of a block allocated in an earlier profiled window and reports
    its free; it was allocated before this call, so it must not count (it made test order matter)."""
    _, kept = peak_memory(lambda: torch.ones(MIB // 4), device="cpu")   # 1 MiB that outlives its window

    def fn():
        nonlocal kept
        kept = None                       # frees the 1 MiB allocated before this call
        return torch.ones(2 * MIB // 4)   # 2 MiB

    peak, _ = peak_memory(fn, device="cpu")
    assert 2 * MIB <= peak.peak_bytes < 2 * MIB + 64 * 1024


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        peak_memory(lambda: None, device="meta")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_uses_max_memory_allocated():
    def fn():
        a = torch.ones(MIB // 4, device="cuda")
        b = torch.ones(MIB // 4, device="cuda")
        return a + b

    peak, _ = peak_memory(fn, device="cuda")
    assert 3 * MIB <= peak.peak_bytes < 4 * MIB


def test_measure_training_reports_the_measured_peak():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    x = torch.randn(128, 64)
    m = measure_training("eager", model, lambda mod: mod, (x,), steps=1)
    # the step creates every weight gradient (2 × 128 KiB) and the [128, 512] activations (256 KiB)
    assert m.peak_bytes >= 2 * 64 * 512 * 4 + 128 * 512 * 4
