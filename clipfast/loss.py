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
