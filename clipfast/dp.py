"""Data parallelism without DeepSpeed: what `engine=torch` needs on several ranks (clipfast.engine, clipfast.graph).

Every rank holds the whole model and optimizer state (ZeRO stage 0, as DDP): the ranks start from rank 0's weights
(`broadcast_module`), and after each step's backward every gradient becomes the mean over the ranks
(`average_gradients`), so every rank makes the same update. Each rank's loss is the contrastive loss of its own rows
against every rank's features (clipfast.loss.distributed_clip_loss), so the mean over ranks is the whole batch's loss
and its gradient, as under DeepSpeed.

Why not torch's DistributedDataParallel: its reducer works from autograd hooks on an eager backward, and a CUDA graph
captures a whole step (forward, loss, backward, all-reduce, optimizer) that replays with no Python at all. Here the
all-reduce is plain collectives after the backward, which a graph captures like any other kernel (NCCL allows it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# gradients per all-reduce: one collective a bucket (ViT-L/16's 0.86 GB of bf16 gradients in 446 tensors: 4 buckets),
# where one a tensor would pay a collective's fixed latency 446 times a step; the flat copy costs this much memory more
BUCKET_BYTES = 256 << 20


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


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` set to rank `src`'s (each rank seeds its own initialisation)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)
