"""Shared pieces of the kernel microbenchmarks (pytest-benchmark).

Timing is device-synchronised: each benchmarked call ends with `torch.cuda.synchronize()` on CUDA,
so the wall time pytest-benchmark records covers the kernels, not just their launch.
"""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synced(fn):
    """Wrap `fn` so that it returns only after the device has finished its work."""
    if DEVICE != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def record_rate(benchmark, flops: float | None = None, nbytes: float | None = None):
    """Store TFLOP/s and GB/s (from the median time) in the benchmark's extra_info after it ran; nothing under
    --benchmark-disable (each benchmark then runs once, untimed, as a test)."""
    if benchmark.stats is None:
        return
    t = benchmark.stats.stats.median
    benchmark.extra_info["device"] = device_name()
    benchmark.extra_info["median_ms"] = round(t * 1e3, 4)
    if flops is not None:
        benchmark.extra_info["tflops"] = round(flops / t / 1e12, 4)
    if nbytes is not None:
        benchmark.extra_info["gbps"] = round(nbytes / t / 1e9, 3)


@pytest.fixture
def device():
    return DEVICE
