"""Symmetric InfoNCE (CLIP loss). The loss is pure; the cross-rank gather lives beside it.

Scaling form ("gather with grad + local loss", open_clip's `gather_with_grad=True, local_loss=True`):
each rank gathers every rank's features with gradient, then computes only its own rows of the two
logit matrices: (b, B) instead of (B, B). Memory and FLOPs per rank grow with b·B, not B², and the
gradient reaching each rank's features is exact, because the all-gather's backward sums the
gradient contributions of all ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_loss(img, txt, logit_scale, img_all=None, txt_all=None, offset: int = 0):
    """Mean of image→text and text→image cross-entropy for the local rows.

    img, txt (b, E) L2-normalised local features; img_all, txt_all (B, E) all ranks' features (None on
    one rank); offset = this rank's first row in the global batch. logit_scale is exp(t), already clamped.
    """
    img_all = img if img_all is None else img_all
    txt_all = txt if txt_all is None else txt_all
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_per_image = logit_scale * img @ txt_all.T  # (b, B)
    logits_per_text = logit_scale * txt @ img_all.T  # (b, B)
    return 0.5 * (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels))


# torch 2.14 names them *_single and deprecates the old names, which torch 2.11 (the GPU image's) alone has
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class GatherWithGrad(torch.autograd.Function):
    """(b, ...) on each rank -> (world * b, ...), every rank's rows in rank order. Backward: the sum over the ranks of
    the gradient reaching this rank's rows (each rank's loss uses every rank's features): a reduce-scatter on NCCL, an
    all-reduce and a slice on gloo, which has no reduce-scatter. In place of torch.distributed.nn's all_gather
    (deprecated in torch 2.14; a list of tensors to concatenate, a copy more)."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather(out, x)
        return out

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        b = grad.shape[0] // world
        if dist.get_backend() == "nccl":
            out = grad.new_empty((b, *grad.shape[1:]))
            _reduce_scatter(out, grad)
            return out
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad[rank * b:(rank + 1) * b]


def gather_features(img, txt):
    """All ranks' features, with gradient. Returns (img_all, txt_all, offset of this rank's rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None, None, 0
    return GatherWithGrad.apply(img), GatherWithGrad.apply(txt), dist.get_rank() * img.shape[0]


def distributed_clip_loss(img, txt, logit_scale):
    img_all, txt_all, offset = gather_features(img, txt)
    return clip_loss(img, txt, logit_scale, img_all, txt_all, offset)


def simclr_loss(z1, z2, temperature: float, z1_all=None, z2_all=None, offset: int = 0):
    """SimCLR's NT-Xent over two views, as SLIP computes it: for view 1's row i, the positive is view 2's row i and the
    negatives every other row of both views; the same for view 2; the mean of the two cross-entropies.

    z1, z2 (b, D) local head outputs (normalised here); z1_all, z2_all (B, D) all ranks' (normalised, None on one
    rank); offset = this rank's first row in the global batch.
    """
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    z1_all = z1 if z1_all is None else F.normalize(z1_all.float(), dim=-1)
    z2_all = z2 if z2_all is None else F.normalize(z2_all.float(), dim=-1)
    labels = torch.arange(z1.shape[0], device=z1.device) + offset
    self_mask = F.one_hot(labels, z1_all.shape[0]) * 1e9  # a row is not its own negative
    l_11 = z1 @ z1_all.T / temperature - self_mask  # (b, B)
    l_22 = z2 @ z2_all.T / temperature - self_mask
    l_12 = z1 @ z2_all.T / temperature
    l_21 = z2 @ z1_all.T / temperature
    return 0.5 * (F.cross_entropy(torch.cat([l_12, l_11], 1), labels) +
                  F.cross_entropy(torch.cat([l_21, l_22], 1), labels))


def distributed_simclr_loss(z1, z2, temperature: float):
    z1_all, z2_all, offset = gather_features(z1, z2)
    return simclr_loss(z1, z2, temperature, z1_all, z2_all, offset)
