"""SLIP (Mu, Kirillov, Wagner, Xie: "SLIP: Self-supervision meets Language-Image Pre-training", 2021): CLIP's loss
plus SimCLR's on two augmented views of each image, through the same image tower and a 3-layer MLP head.

    deepspeed clipfast/train.py --config configs/demo.py ssl_weight=1 ssl_hidden=512 ssl_dim=64

The head is SLIP's: Linear(width, hidden) BN ReLU, Linear(hidden, hidden) BN ReLU, Linear(hidden, dim) over the image
tower's pooled features before its projection (SLIP: hidden 4096, dim 256, temperature 0.1, loss weight 1). Each
view is its own crop (area 0.08-1) with SimCLR's flip, colour jitter, grayscale and blur (clipfast.data.augment),
drawn in the DALI pipeline beside the CLIP view. The loss is clipfast.loss.simclr_loss; with several ranks the head's
batch norms are synchronised on CUDA (SLIP's SyncBatchNorm) and per rank on the CPU (torch's SyncBatchNorm is
CUDA-only). Cost: two more image-tower passes per sample (counted in the trainer's MFU, clipfast.flops.ssl_flops).
"""
from __future__ import annotations

import torch
from torch import nn

from clipfast.resnet import BatchNorm1d


class SSLHead(nn.Sequential):
    def __init__(self, width: int, hidden: int, dim: int):
        if min(width, hidden, dim) < 1:
            raise ValueError(f"SSL head sizes must be positive, got width={width} hidden={hidden} dim={dim}")
        super().__init__(
            nn.Linear(width, hidden), BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )


def check_ssl(cfg) -> None:
    """SLIP's settings, checked before anything is built."""
    if cfg.ssl_weight < 0:
        raise ValueError(f"ssl_weight must be >= 0 (0: no SLIP loss), got {cfg.ssl_weight}")
    if not cfg.ssl_weight:
        import dataclasses
        import logging

        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name.startswith("ssl_")}
        unused = [k for k in ("ssl_temperature", "ssl_hidden", "ssl_dim", "ssl_crop_scale")
                  if _as_list(getattr(cfg, k)) != _as_list(defaults[k])]
        if unused:
            logging.getLogger("clipfast.config").warning(
                "%s set, but ssl_weight is 0: no SLIP head or loss, so they change nothing", ", ".join(unused))
        return
    if not cfg.ssl_temperature > 0:  # (NaN too: a NaN loss at the first step)
        raise ValueError(f"ssl_temperature must be > 0, got {cfg.ssl_temperature}")
    for key in ("ssl_hidden", "ssl_dim"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1 (the SSL head's sizes), got {getattr(cfg, key)}")
    if cfg.cuda_graph:
        raise ValueError("ssl_weight > 0 (SLIP) does not run in the CUDA-graphed step: set cuda_graph=false")
    lo, hi = cfg.ssl_crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"ssl_crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(cfg.ssl_crop_scale)}")


def _as_list(value) -> list:
    """A setting as a list, for comparing a tuple default with a list from JSON or a scalar with itself."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def sync_batch_norms(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """SLIP's SyncBatchNorm for the head where it can be (several ranks on CUDA)."""
    if world > 1 and device.type == "cuda" and getattr(model, "ssl_head", None) is not None:
        model.ssl_head = nn.SyncBatchNorm.convert_sync_batchnorm(model.ssl_head)
    return model


def without_head(state_dict: dict) -> dict:
    """The CLIP model's weights alone: the SSL head is for training (model.pt and open_clip leave it out)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("ssl_head.")}
