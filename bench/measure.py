"""How bench/throughput.py measures a step: its memory (what persists, the transient peak) and its time, with the
columns interleaved step by step so that they see the same load."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from clipfast.optim import MasterAdamW


def persistent_bytes(model, opt) -> int:
    """Weights + optimizer state (the gradients are freed after each step: zero_grad(set_to_none=True))."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(model.get_buffer(name).numel() * model.get_buffer(name).element_size() for name, _ in
             model.named_buffers())
    n += opt.master_bytes() if isinstance(opt, MasterAdamW) else 0
    return n + sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop lines, written straight to file descriptor 2."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def step_peak_bytes(step, batch, device) -> int:
    """Transient peak of one step above what was allocated before it (activations, gradients, workspaces)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def time_interleaved(steps: dict, batches: list, n_steps: int, device) -> tuple[dict, dict]:
    """Per-step seconds of each step function, alternating which goes first, so both see the same load.

    Returns (wall, cpu): wall-clock seconds (CUDA events on a GPU) and, on CPU, process CPU seconds, which
    time-slicing by other jobs on a shared machine does not inflate (with one intra-op thread they equal the
    wall time of an idle machine); None on a GPU.
    """
    names = list(steps)
    cuda = device.type == "cuda"
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for i in range(n_steps):
        b = batches[i % len(batches)]
        for name in names if i % 2 == 0 else names[::-1]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # note: sync point: each step starts on an idle GPU, so neither column hides its launch overhead
                # behind the other's queued kernels
                torch.cuda.synchronize(device)
                start.record()
                steps[name](b)
                end.record()
                wall[name].append((start, end))
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                steps[name](b)
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize(device)
        return {n: [s.elapsed_time(e) / 1e3 for s, e in wall[n]] for n in names}, None
    return wall, cpu
