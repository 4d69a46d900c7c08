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


def gather_features(img, txt):
    """All ranks' features, with gradient. Returns (img_all, txt_all, offset of this rank's rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None, None, 0
    from torch.distributed.nn.functional import all_gather

    img_all = torch.cat(all_gather(img.contiguous()), dim=0)
    txt_all = torch.cat(all_gather(txt.contiguous()), dim=0)
    return img_all, txt_all, dist.get_rank() * img.shape[0]


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
