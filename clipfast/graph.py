"""A whole training step (forward, loss, backward, optimizer) replayed as one CUDA graph.

Why: at CLIPA's token counts a step is too small to keep an H100 busy from eager PyTorch. The H200 run at
758b73d (bench/results/nvidia-h200-2026-11-26) timed B/16 at 96 px / 8 text tokens, batch 256, at 45 ms a
step and 12% MFU, while its ~5.4 TFLOP need ~10 ms of matmuls: the CPU launching ~1,500 kernels one by one
is the bottleneck, and open_clip's eager step is bound the same way (47 ms). A graph launches them all in one
call.

What must be static for a graph, and how each is made so:
- image batch (B, 3, H, W) and keep indices (B, K): fixed by the run's batch size and mask ratio;
- packed text: its token count T changes with every batch. Text is padded to a bucket, T_cap = a multiple of
  `text_bucket` tokens, one graph per bucket (a handful per run: T of B log-normal captions varies by a few
  percent). The padding forms P extra captions of 1..context_length tokens each (P fixed per bucket), so the
  model sees ordinary packed captions, positions stay inside the position table, and attention never mixes
  a padding token with a real one. Their features are computed and dropped: the loss sees the first B rows.
  Cost: at most `text_bucket + P` padded text tokens per step.
- max_seqlen: the model's context length (the kernels need only cu_seqlens).

Each new bucket runs its first step eagerly on a side stream (that compiles the Triton kernels for the shape,
initialises cuBLAS and the optimizer state) and is then captured; later steps replay. Every call is one
real step. The optimizer must be built with capturable=True (AdamW(fused=True, capturable=True)); a learning
rate that changes must be a device tensor updated in place (`lr_on_device`; torch's LR schedulers fill it).
clipfast.optim.MasterAdamW (bf16 weights, fp32 masters: how clipfast.train runs under DeepSpeed bf16) is
capturable with capturable=True; without clipping its update then runs inside the backward by default (each
parameter once its gradient is complete, a branch of the graph beside the backward: overlap_optimizer).
On several ranks (world > 1, clipfast.dp) the loss gathers every rank's features and the gradients are averaged over
the ranks, bucket by bucket inside the backward (overlap_reduce, clipfast.dp.OverlappedAverage) or after it, both
captured as collectives. NCCL allows that where every rank captures the collective together and replays the graph
made from that capture: the ranks agree on each step's text bucket (one all-reduce of three host integers over a gloo
group, `agree_text_layout`), so they capture and replay the same graphs at the same steps. The update inside the
backward is off there.
Autocast runs with its weight-cast cache off, as graphs require. All graphs share one memory pool; each keeps its
static inputs, outputs and gradients referenced, so no graph's live tensors are reused by another.
"""
from __future__ import annotations

import contextlib
import math

import torch

from clipfast.accum import cached_passes
from clipfast.dp import OverlappedAverage, average_gradients, reduced_backward
from clipfast.loss import distributed_clip_loss
from clipfast.optim import MasterAdamW, clipped_step

# GraphedTrainStep's default for overlap_optimizer (1: on where it can be, 0: off); bench/throughput.py
# --knob graph.OVERLAP_OPTIMIZER=0 times the step without it
OVERLAP_OPTIMIZER = 1


def pad_segments(bucket: int, context_length: int) -> int:
    """P: padding captions per bucket, enough that P..P+bucket-1 tokens split into P parts of <= context_length."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 to pad text into captions, got {context_length}")
    return -(-2 * bucket // context_length) + 1


def padded_text_layout(total: int, num_seqs: int, bucket: int, context_length: int) -> tuple[int, list[int]]:
    """(T_cap, the P padding captions' end offsets) for T = `total` real tokens; python ints, no device work.

    T_cap is the smallest multiple of `bucket` holding T + P tokens (each padding caption gets at least one),
    and the padding splits as evenly as possible: every part has 1..context_length tokens.
    """
    p = pad_segments(bucket, context_length)
    cap = _own_cap(total, p, bucket)
    return cap, pad_ends(total, cap, p, context_length)


def _own_cap(total: int, p: int, bucket: int) -> int:
    """The smallest multiple of `bucket` holding `total` tokens and P = `p` padding captions of one token or more."""
    return -(-(total + p) // bucket) * bucket


def pad_ends(total: int, cap: int, p: int, context_length: int) -> list[int]:
    """The end offsets of P = `p` padding captions that fill `total` tokens up to `cap`, as evenly as they can."""
    base, extra = divmod(cap - total, p)
    ends, off = [], total
    for i in range(p):
        off += base + (i < extra)
        ends.append(off)
    assert ends[-1] == cap and base >= 1 and base + (extra > 0) <= context_length, (total, cap, p, context_length)
    return ends


def shared_text_layout(cap: int, t_min: int, t_max: int, bucket: int, context_length: int) -> tuple[int, int]:
    """(T_cap, P) that every data-parallel rank can pad its text to, from the largest of the ranks' own T_cap and the
    fewest and most real tokens a rank has: a multiple of `bucket` and a padding-caption count such that every rank's
    padding splits into P captions of 1..context_length tokens. P stays pad_segments' (one rank's) unless the ranks'
    token counts differ by more than about a bucket; then T_cap grows by buckets until P captions fit both ends.

    Why agreed: NCCL requires a collective captured in a CUDA graph to be captured, and replayed, by every rank of
    the communicator alike, so every rank must capture a new graph at the same step and replay the same one after."""
    p_min = pad_segments(bucket, context_length)
    while True:
        p = max(p_min, -(-(cap - t_min) // context_length))  # the rank with the fewest tokens pads the most
        if cap - t_max >= p:  # and the rank with the most still gives every padding caption a token
            return cap, p
        cap += bucket


def agree_text_layout(totals: list[int], bucket: int, context_length: int, group=None) -> tuple[int, list[list[int]]]:
    """(T_cap, each text's padding ends): one layout (shared_text_layout) for texts of `totals` tokens (a step's
    micro-batches) and, with a process `group`, for every rank's. One all-reduce of three host integers over the
    group: on a CPU (gloo) group it costs no device sync. One text and no group: padded_text_layout's."""
    t_min, t_max = min(totals), max(totals)
    cap = _own_cap(t_max, pad_segments(bucket, context_length), bucket)  # the fullest text's own layout
    if group is not None:
        import torch.distributed as dist

        x = torch.tensor([cap, -t_min, t_max], dtype=torch.int64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        cap, t_min, t_max = int(x[0]), -int(x[1]), int(x[2])
    cap, p = shared_text_layout(cap, t_min, t_max, bucket, context_length)
    return cap, [pad_ends(t, cap, p, context_length) for t in totals]


def host_values(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a CPU tensor to copy to `device` with non_blocking=True: in page-locked memory where the device
    is CUDA, so that the copy is queued like a kernel (from pageable memory CUDA stages it on the host, which may wait
    for the stream). Measured, it is little: the H100 profiles of the graphed B/16 step put the GPU's idle time
    before each replay at 239 us a step with the pageable copy (ce6046d) and 216 us with the pinned one (0bec72d),
    both under the profiler; the rest is the host launching the step's input copies (bench/results/
    nvidia-h100-80gb-hbm3-2026-11-28-{ce6046d,0bec72d}/profile.md, its gap table). (The pinned block is not reused
    before the copy has run: torch's host allocator records the copy's stream.)"""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory() if torch.device(device).type == "cuda" else t


def fill_micro_text(text_out, cu_out, text, cu_seqlens, bounds: list[int], ends: list[list[int]]) -> None:
    """Packed text (T,) and cu_seqlens (B+1,) as n micro-batches of m = B / n captions, each padded to T_cap:
    text_out (n, T_cap) the micro-batch's ids then zeros, cu_out (n, m + 1 + P) its cu_seqlens from 0 then the padding
    captions' ends. bounds: the n + 1 micro-batches' first tokens (host ints). Device copies, no sync."""
    n = len(ends)
    m = (cu_seqlens.numel() - 1) // n
    text_out.zero_()
    for j in range(n):
        lo, hi = bounds[j], bounds[j + 1]
        text_out[j, : hi - lo].copy_(text[lo:hi], non_blocking=True)
        torch.sub(cu_seqlens[j * m:(j + 1) * m + 1], lo, out=cu_out[j, : m + 1])
    cu_out[:, m + 1:].copy_(host_values(ends, cu_out.dtype, cu_out.device), non_blocking=True)  # (from each text's 0)


def pad_packed_text(text: torch.Tensor, cu_seqlens: torch.Tensor, bucket: int, context_length: int):
    """Packed (T,) ids + (S+1,) cu_seqlens -> (T_cap,) ids and (S+1+P,) cu_seqlens with the padding captions."""
    cap, ends = padded_text_layout(text.numel(), cu_seqlens.numel() - 1, bucket, context_length)
    ids = torch.zeros(cap, dtype=text.dtype, device=text.device)
    ids[: text.numel()] = text
    tail = host_values(ends, cu_seqlens.dtype, cu_seqlens.device).to(cu_seqlens.device, non_blocking=True)
    return ids, torch.cat([cu_seqlens, tail])


class GraphedTrainStep:
    """step(images, text, cu_seqlens, keep=None) -> loss: one training step of a clipfast CLIP, as CUDA graphs.

    model: clipfast.model.CLIP on a CUDA device; optimizer: capturable. autocast_dtype: torch.bfloat16 for
    mixed precision, None for none. The returned loss is the graph's static output tensor: read it (or
    .clone() it) before the next call. clip_grad_norm clips inside the graph (the norm never leaves the device).
    overlap_optimizer: update each parameter inside the backward as soon as its gradient is complete, on a stream
    of its own (MasterAdamW.set_overlap; in the graph a branch beside the backward): True needs MasterAdamW's Triton
    step and no clipping; None (default): on where that holds and OVERLAP_OPTIMIZER is 1. world > 1: one of that many
    data-parallel ranks (torch.distributed initialised; every rank calls step with its own batch of the same shapes);
    overlap_reduce: its gradient all-reduce inside the backward (clipfast.dp.OverlappedAverage), else after it.
    """

    def __init__(self, model, optimizer, *, autocast_dtype=torch.bfloat16, text_bucket: int = 256,
                 clip_grad_norm: float | None = None, overlap_optimizer: bool | None = None, world: int = 1,
                 accum_steps: int = 1, overlap_reduce: bool = True):
        if not next(model.parameters()).is_cuda:
            raise ValueError("GraphedTrainStep needs a model on a CUDA device (CUDA graphs)")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError(f"GraphedTrainStep needs a capturable optimizer: build {type(optimizer).__name__}"
                                 f"(..., capturable=True)")
        self.model, self.opt = model, optimizer
        self.autocast_dtype, self.bucket, self.clip = autocast_dtype, int(text_bucket), clip_grad_norm
        self.world, self.params = int(world), [p for p in model.parameters() if p.requires_grad]
        self.accum = int(accum_steps)
        if self.accum < 1:
            raise ValueError(f"accum_steps must be 1 or more, got {accum_steps}")
        # the ranks agree on each step's text layout over a CPU group: host integers, no device sync (every rank
        # makes it here, as new_group requires)
        self.host_group = None
        if self.world > 1:
            import torch.distributed as dist

            self.host_group = dist.new_group(backend="gloo")
        # world > 1: the gradients' all-reduce inside the backward, bucket by bucket (clipfast.dp), or after it
        self.reducer = OverlappedAverage(self.params, self.world) if self.world > 1 and overlap_reduce else None
        triton = isinstance(optimizer, MasterAdamW) and optimizer.triton
        can = triton and not clip_grad_norm and self.world == 1 and self.accum == 1
        if overlap_optimizer and not can:
            why = (f"world={world}" if self.world > 1 else f"accum_steps={accum_steps}" if self.accum > 1
                   else f"clip_grad_norm={clip_grad_norm}" if triton else f"a {type(optimizer).__name__} without it")
            raise ValueError(f"GraphedTrainStep(overlap_optimizer=True) needs MasterAdamW's Triton step, no "
                             f"clipping (the global norm comes after the whole backward), one rank (the gradients "
                             f"are averaged after it) and one pass (accum_steps=1), got {why}")
        self.overlap = can and (bool(OVERLAP_OPTIMIZER) if overlap_optimizer is None else overlap_optimizer)
        if can:
            optimizer.set_overlap(self.overlap)
        self.ctx = model.context_length
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, dict] = {}
        self.captures = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _forward(self, images, text, cu_seqlens, keep):
        with self._autocast():
            img, txt, scale = self.model(images, text, cu_seqlens, self.ctx, keep)
        return img, txt[: img.shape[0]], scale  # the padding captions' features dropped

    def _loss(self, outs):
        with self._autocast():
            return distributed_clip_loss(*outs), {}

    def _step(self, s):
        if self.accum == 1:
            loss, _ = self._loss(self._forward(s["images"], s["text"][0], s["cu_seqlens"][0], s["keep"]))
            if self.overlap:
                self.opt.begin_step()
            self._backward(loss, True)
        else:  # clipfast.accum's two passes over the micro-batches, the loss over the whole batch; gradients summed
            m = s["images"].shape[0] // self.accum
            micros = [(s["images"][j * m:(j + 1) * m], s["text"][j], s["cu_seqlens"][j],
                       None if s["keep"] is None else s["keep"][j * m:(j + 1) * m]) for j in range(self.accum)]
            loss, _ = cached_passes(self.model, lambda mb: self._forward(*mb), micros, self._loss, self._backward)
        if self.reducer is not None:
            self.reducer.finish()
        else:
            average_gradients(self.params, self.world)  # (one rank: nothing)
        # clipping folded into MasterAdamW's Triton step where it can be (the norm is read, the gradients not rewritten)
        with clipped_step(self.opt, list(self.model.parameters()), self.clip):
            self.opt.step()
        return loss

    def _backward(self, loss, last: bool) -> None:
        """One pass's backward; the last one's all-reduces the gradients (summed over the passes) as it goes."""
        reduced_backward(loss, self.reducer if last else None)

    def __call__(self, images, text, cu_seqlens, keep=None, cu_host=None) -> torch.Tensor:
        """One step. cu_host: cu_seqlens on the host, where accum_steps > 1 splits the text into micro-batches (without
        it, read from the device: a sync that waits for the step before)."""
        first, g = self._inputs(images, text, cu_seqlens, keep, cu_host)
        if not first:
            g["graph"].replay()
            return g["loss"]
        # a new shape: one eager step on a side stream (compiles, allocates the optimizer state), then capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.opt.zero_grad(set_to_none=True)
            loss = self._step(g).detach().clone()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # the graph allocates its own gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            # detached: a loss holding its autograd graph keeps the parameters' AccumulateGrad nodes (made on the
            # capture stream) alive into the next bucket's eager step, which then syncs across streams
            g["loss"] = self._step(g).detach()
        g["graph"] = graph
        g["grads"] = [p.grad for p in self.model.parameters()]  # keep the graph's gradients out of others' reach
        self.captures += 1
        return loss

    def _inputs(self, images, text, cu_seqlens, keep, cu_host) -> tuple[bool, dict]:
        """(whether the shape is new, its graph's static inputs filled with this batch): the text as accum_steps
        micro-batches, each padded to the step's (and the ranks') one layout."""
        n = self.accum
        if images.shape[0] % n:
            raise ValueError(f"accum_steps={n} does not divide the batch of {images.shape[0]} samples")
        if n == 1:
            bounds = [0, text.numel()]
        else:
            cu_host = cu_seqlens.cpu() if cu_host is None else cu_host  # (a sync where not given)
            bounds = cu_host[:: images.shape[0] // n].tolist()
        # every micro-batch, and on several ranks every rank, padded to one layout (NCCL's rule for captured
        # collectives: every rank captures and replays the same graph)
        cap, ends = agree_text_layout([b - a for a, b in zip(bounds, bounds[1:])], self.bucket, self.ctx,
                                      self.host_group)
        key = (tuple(images.shape), images.dtype, None if keep is None else tuple(keep.shape), cap,
               cu_seqlens.numel(), len(ends[0]))
        g = self.graphs.get(key)
        first = g is None
        if first:
            g = self.graphs[key] = {
                "images": torch.empty_like(images), "keep": None if keep is None else torch.empty_like(keep),
                "text": torch.zeros((n, cap), dtype=text.dtype, device=text.device),
                "cu_seqlens": torch.empty((n, (cu_seqlens.numel() - 1) // n + 1 + len(ends[0])),
                                          dtype=cu_seqlens.dtype, device=cu_seqlens.device),
            }
        # inputs into the graph's static buffers (device copies, no sync)
        g["images"].copy_(images, non_blocking=True)
        if keep is not None:
            g["keep"].copy_(keep, non_blocking=True)
        fill_micro_text(g["text"], g["cu_seqlens"], text, cu_seqlens, bounds, ends)
        return first, g


def lr_on_device(optimizer, device) -> None:
    """Each param group's lr as a float32 tensor on `device`, which a graph reads and a scheduler fills in place."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def default_text_bucket(batch: int, context_length: int) -> int:
    """~3% of the batch's padded text size, a multiple of 64 tokens, at least 64: few graphs, little padding."""
    return max(64, int(math.ceil(0.03 * batch * context_length / 64)) * 64)
