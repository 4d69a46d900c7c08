"""A batch larger than memory, with the contrastive loss still over all of it (GradCache; open_clip's --accum-freq).

Accumulating micro-batch gradients of micro-batch losses would change CLIP's loss: each image would only meet the
captions of its own micro-batch as negatives. Here (`accum_steps=A`) each rank's batch is split into A micro-batches:

1. every micro-batch through the model without gradient: the features of the whole batch, cached;
2. each micro-batch again with gradient; its features replace their cached copies, the loss is computed over the
   whole batch (all ranks, as without accumulation) and back-propagated.

The gradient of micro-batch j's pass is the whole loss's gradient through micro-batch j's features, so the A passes
add up to the whole batch's gradient, equal to one step without accumulation (tests/test_accum.py). The logit scale
enters every pass's loss but takes its gradient from the first only. Memory: one micro-batch's activations plus the
(batch, embed) features; compute: one forward more per sample (about a third more than forward + backward).

Batch norms (a ResNet tower, SLIP's head) see micro-batches in both passes, and the first pass leaves their running
statistics alone (momentum 0 while it runs), so each micro-batch updates them once, as a step without accumulation
would per batch.
"""
from __future__ import annotations

import contextlib

import torch

# which output of CLIP.forward is per sample, and along which dim: img (b, E), txt (b, E), scale (), SSL z (V, b, D)
_SAMPLE_DIM = (0, 0, None, 1)


def split_batch(batch: dict, keep: torch.Tensor | None, n: int) -> list[dict]:
    """The loader's batch (clipfast.data.loader) as n equal micro-batches: images, views, packed text (each its own
    cu_seqlens from 0; max_len the batch's), keep indices."""
    b = batch["images"].shape[0]
    if b % n:
        raise ValueError(f"accum_steps={n} does not divide the per-rank batch of {b} samples")
    m, cu = b // n, batch["cu_seqlens"]
    bounds = cu[::m].tolist()  # the micro-batches' first tokens (slicing the text needs them on the host: one sync)
    out = []
    for j in range(n):
        lo, hi = j * m, (j + 1) * m
        out.append({
            "images": batch["images"][lo:hi],
            "views": None if batch.get("views") is None else batch["views"][:, lo:hi],
            "text": batch["text"][bounds[j] : bounds[j + 1]],
            "cu_seqlens": cu[lo : hi + 1] - bounds[j],
            "max_len": batch["max_len"],
            "keep": None if keep is None else keep[lo:hi],
        })
    return out


def check_accum(cfg, world: int) -> None:
    """The global batch splits evenly over the ranks (under either engine: each rank's loader takes batch_size // world,
    and samples/s and the LR count batch_size), and accum_steps is a positive divisor of the per-rank batch (with
    cuda_graph too: clipfast.graph captures both passes over the micro-batches in one graph)."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} ranks")
    n = cfg.accum_steps
    if n < 1:
        raise ValueError(f"accum_steps must be 1 (no accumulation) or more, got {n}")
    if (cfg.batch_size // world) % n:
        raise ValueError(f"accum_steps={n} does not divide the per-rank batch: batch_size {cfg.batch_size} over "
                         f"{world} rank(s) is {cfg.batch_size // world} samples each")
    micro = cfg.batch_size // world // n
    if micro < 2 and _has_batch_norms(cfg):  # torch: "Expected more than 1 value per channel when training"
        which = " and ".join(w for w, on in (("the ResNet image tower", _is_resnet(cfg)),
                                              ("SLIP head", bool(cfg.ssl_weight))) if on)
        raise ValueError(f"batch_size {cfg.batch_size} over {world} rank(s) and accum_steps={n} leaves {micro} sample "
                         f"per pass, and this model's batch norms ({which}) need 2 or more")


def _is_resnet(cfg) -> bool:
    from clipfast.presets import from_name

    try:
        return from_name(cfg.model).vision.kind == "resnet"
    except KeyError:  # (an unknown model is named where the model is checked)
        return False


def _has_batch_norms(cfg) -> bool:
    return bool(cfg.ssl_weight) or _is_resnet(cfg)


@contextlib.contextmanager
def bn_stats_frozen(model: torch.nn.Module):
    """Batch norms normalise with their batch's statistics as in training but leave the running ones unchanged."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if any(m.momentum is None for m in bns):  # a cumulative average would still count the batch (checked before any
        raise ValueError("a batch norm with momentum=None cannot skip a batch")  # momentum is changed)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


def _splice(cached: list, live, j: int, dim: int | None):
    if dim is None:
        return live
    parts = [c.detach() for c in cached]
    parts[j] = live
    return torch.cat(parts, dim=dim)


def cached_passes(model, forward, micros: list[dict], loss_fn, backward) -> tuple[torch.Tensor, dict]:
    """The two passes above. forward(micro) -> CLIP.forward's outputs; loss_fn(outputs) -> (loss, parts) over the
    whole batch; backward(loss, last: bool) back-propagates one pass (the caller steps after the last). Returns the
    first pass's loss and parts, detached (every pass's loss is the same number)."""
    with torch.no_grad(), bn_stats_frozen(model):
        cached = [forward(mb) for mb in micros]
    loss0, parts0 = None, {}
    for j, mb in enumerate(micros):
        live = forward(mb)
        outs = [_splice([c[k] for c in cached], live[k], j, dim) for k, dim in enumerate(_SAMPLE_DIM[:len(live)])]
        if j:
            outs[2] = outs[2].detach()  # the logit scale: its whole gradient came with the first pass
        loss, parts = loss_fn(outs)
        backward(loss, j == len(micros) - 1)
        if j == 0:
            loss0, parts0 = loss.detach(), {k: v.detach() for k, v in parts.items()}
    return loss0, parts0
