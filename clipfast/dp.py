"""Data parallelism without DeepSpeed: what `engine=torch` needs on several ranks (clipfast.engine, clipfast.graph).

Every rank holds the whole model and optimizer state (ZeRO stage 0, as DDP): the ranks start from rank 0's weights
(`broadcast_module`), and after each step's backward every gradient becomes the mean over the ranks
(`average_gradients`), so every rank makes the same update. Each rank's loss is the contrastive loss of its own rows
against every rank's features (clipfast.loss.distributed_clip_loss), so the mean over ranks is the whole batch's loss
and its gradient, as under DeepSpeed.

Why not torch's DistributedDataParallel: its reducer works from autograd hooks on an eager backward, and a CUDA graph
captures a whole step (forward, loss, backward, all-reduce, optimizer) that replays with no Python at all. Here the
all-reduce is plain collectives, which a graph captures like any other kernel (NCCL allows it).

`OverlappedAverage` overlaps them with the backward, as DDP's reducer does: a bucket's all-reduce is launched from
the hooks as soon as each of its gradients is complete, on a stream of its own, so the last layers' gradients travel
while the first layers' are still being computed; `finish()` after the backward waits for them. Without it (and
where a step's gradients are only complete after the backward: bf16 sums over micro-batches) `average_gradients`
reduces them all after the backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# gradients per all-reduce: one collective a bucket (ViT-L/16's 0.86 GB of bf16 gradients in 446 tensors: 4 buckets),
# where one a tensor would pay a collective's fixed latency 446 times a step; the flat copy costs this much memory more
BUCKET_BYTES = 256 << 20
# OverlappedAverage's buckets: small enough that the first leaves early in the backward (DDP's default, 25 MB)
OVERLAP_BUCKET_BYTES = 25 << 20


def buckets(tensors: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """`tensors` in order, grouped into runs of one dtype and device of at most bucket_bytes each (a larger tensor
    alone in its own)."""
    out, size, key = [], 0, None
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        k = (t.dtype, t.device)
        if not out or k != key or size + nbytes > bucket_bytes:
            out.append([])
            size, key = 0, k
        out[-1].append(t)
        size += nbytes
    return out


def average_gradients(params, world: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Each parameter's gradient replaced by its mean over the `world` ranks, in place, a flat bucket per all-reduce.

    Every rank must pass the same parameters in the same order. A parameter without a gradient on this rank gets a
    zero one first, so the buckets line up on every rank (CLIP gives every parameter a gradient each step). Sum then
    divide: gloo has no average. Collectives only, no host synchronisation: it can be captured in a CUDA graph."""
    if world == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat.div_(world)
        torch._foreach_copy_(bucket, _unflatten_dense_tensors(flat, bucket))


class OverlappedAverage:
    """average_gradients(params, world) overlapped with the backward: begin() before the backward (of the last pass,
    where gradients accumulate over several), finish() after it; the gradients are then the mean over the ranks.

    The parameters are bucketed in reverse order (the backward completes the last layers' gradients first) by
    `buckets`. Each parameter's post-accumulate-grad hook counts down its bucket; a complete bucket is flattened and
    all-reduced (async_op) there and then, but only in bucket order: every rank must issue the same collectives in
    the same order (NCCL matches them by order, and nothing promises that the hooks fire in one order on every rank),
    so a bucket completed early waits for the ones before it. On CUDA the bucket's copy and collective run on the
    reducer's stream, after the work so far on every stream that made one of its gradients (each hook's current
    stream: autograd's stream for that parameter); finish() divides and copies back there, and the current stream
    waits for it. A parameter with no gradient by finish() gets a zero one (as
    average_gradients gives it). Collectives only, no host synchronisation on CUDA: a CUDA graph captures it. The means
    equal average_gradients' bit for bit on 2 ranks; on more, to rounding (a ring's order of addition depends on an
    element's place in its bucket, and the two bucket otherwise)."""

    def __init__(self, params, world: int, bucket_bytes: int = OVERLAP_BUCKET_BYTES):
        self.world, self.params = int(world), list(params)
        if not self.params:
            raise ValueError("OverlappedAverage: no parameters")
        self.buckets = buckets(self.params[::-1], bucket_bytes)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        device = self.params[0].device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # (made outside any capture)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self._armed = False
        self.launched = 0  # buckets whose all-reduce this backward has launched so far
        self._left, self._streams, self._inflight, self._seen = [], [], [], set()

    def begin(self) -> None:
        if self._armed:  # (its launched buckets would be dropped, their gradients never averaged)
            raise RuntimeError("OverlappedAverage.begin() twice without finish(): call finish() after each backward "
                               "that began")
        self._armed, self.launched, self._inflight, self._seen = True, 0, [], set()
        self._left = [len(b) for b in self.buckets]
        self._streams = [[] for _ in self.buckets]

    def abort(self) -> None:
        """After a backward that raised: disarmed, the launched all-reduces dropped unwaited (a rank whose backward
        failed may never see the others' match them), the gradients left as they are."""
        self._armed, self._inflight, self.launched = False, [], 0

    @torch.no_grad()
    def _on_grad(self, p) -> None:
        if not self._armed:
            return
        if id(p) in self._seen:  # (its bucket may already be on its way without this share)
            raise RuntimeError(f"OverlappedAverage: a parameter of shape {tuple(p.shape)} had its gradient "
                               f"accumulated twice in one backward (a reentrant checkpoint or a second backward "
                               f"before finish()): reduce after the backward instead (overlap_reduce=false)")
        self._seen.add(id(p))
        i = self._bucket_of[id(p)]
        if self.stream is not None:
            here = torch.cuda.current_stream(self.stream.device)
            if all(here != s for s in self._streams[i]):
                self._streams[i].append(here)
        self._left[i] -= 1
        while self.launched < len(self.buckets) and self._left[self.launched] == 0:
            self._launch(self.launched)

    def _launch(self, i: int, after_current: bool = False) -> None:
        bucket = self.buckets[i]
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ctx = contextlib.nullcontext()
        if self.stream is not None:
            waits = self._streams[i] + ([torch.cuda.current_stream(self.stream.device)] if after_current else [])
            for s in waits:
                self.stream.wait_stream(s)
            ctx = torch.cuda.stream(self.stream)
        with ctx:
            grads = [p.grad for p in bucket]
            flat = _flatten_dense_tensors(grads)
            self._inflight.append((grads, flat, dist.all_reduce(flat, async_op=True)))
        self.launched += 1

    @torch.no_grad()
    def finish(self) -> None:
        """After the backward: the buckets not yet launched (a parameter that got no gradient) launched, every
        all-reduce waited for (on CUDA by the reducer's stream, not the host), the gradients set to the means."""
        if not self._armed:
            raise RuntimeError("OverlappedAverage.finish() without begin() before the backward")
        self._armed = False
        while self.launched < len(self.buckets):  # after the whole backward, which the current stream follows
            self._launch(self.launched, after_current=True)
        ctx = contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)
        with ctx:
            for grads, flat, work in self._inflight:
                work.wait()
                flat.div_(self.world)
                torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self._inflight = []


def reduced_backward(loss: torch.Tensor, reducer: OverlappedAverage | None) -> None:
    """loss.backward() with `reducer` (None: none) armed for it: begin() before, abort() where it raises (the next
    backward starts afresh); the caller calls finish() once the pass's gradients are the step's."""
    if reducer is None:
        loss.backward()
        return
    reducer.begin()
    try:
        loss.backward()
    except BaseException:
        reducer.abort()
        raise


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` set to rank `src`'s (each rank seeds its own initialisation)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)
