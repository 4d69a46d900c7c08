"""open_clip's ModifiedResNet image tower (OpenAI CLIP's RN50 / RN101 / RN50x4 ...), single-device code.

Same architecture, parameter names and shapes as open_clip 3.3.0's `modified_resnet.py`, so `visual.*` state dicts
move between the two unchanged (clipfast.interop):

- stem: three 3x3 convolutions (the first with stride 2), each with BatchNorm and ReLU, then a 2x2 average pool;
- four stages of Bottleneck blocks (1x1, 3x3, 1x1 convolutions, 4x expansion); a stride-2 block averages 2x2
  after its 3x3 convolution and before its 1x1 shortcut convolution (anti-aliased strides), total stride 32;
- AttentionPool2d: the mean of the final feature map prepended as a token, a learned position embedding over
  the (image_size // 32)^2 grid plus that token, multi-head attention, the mean token's output projected to
  embed_dim by c_proj.

Differences in how, not what: the attention pool computes only the mean token's query and output (open_clip computes
every position's and keeps the first: the same result, (N - 1) fewer q and c_proj rows), with
F.scaled_dot_product_attention. Input as the VisionTransformer takes it: uint8 (B, 3, H, W) normalised here with
CLIP's mean / std, or floats already normalised.

Not for ResNets: patch masks (`keep`; a ResNet reduces image tokens only by resolution, image_reduction="resize"),
activation checkpointing (a recomputed BatchNorm would update its running statistics twice), the vision attention
kernels and compiled transformer blocks (there are none here): CLIP's switches for those leave this tower as it is.
BatchNorm statistics are per rank, as in open_clip (no SyncBatchNorm).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipfast.layers import sdpa
from clipfast.model import IMAGE_MEAN, IMAGE_STD
from clipfast.presets import VisionConfig

EXPANSION = 4


def final_grid(size: int) -> int:
    """Side of the final feature map for `size` px: the stride-2 convolution (padding 1) gives ceil(size / 2), then
    four 2x2 average pools floor-divide by 16."""
    return (size + 1) // 2 // 16


def check_image_size(size: int) -> None:
    """A ResNet's attention pool has (size // 32)^2 positions, as in open_clip: 32 px or more, not 31 mod 32 (the
    stride-2 stem rounds up, so its final grid would be one more)."""
    if size < 32 or final_grid(size) != size // 32:
        raise ValueError(f"a ResNet image tower needs image_size 32 or more and not 31 mod 32 (its attention pool has "
                         f"(image_size // 32)^2 positions, as in open_clip); got {size}")


class _Float32Stats:
    """Batch norm whose running statistics stay float32 when the model is cast to bf16 or fp16 (DeepSpeed's bf16
    mode and clipfast.engine cast every buffer with the weights). In bf16 (8 significant bits) an update of momentum x
    (batch statistic - running one) below half a unit in the last place is lost, so a running mean stalls short of
    the batch means: 68.0 instead of 70.5 for channel means of 70.5 and std 3 after 300 batches, 0.8 std off in
    evaluation (tests/test_resnet.py). The bf16 weight and bias are cast to float32 per call (C values each): torch's
    batch norm takes a bf16 input with float32 weight and statistics (as under autocast), not bf16 weights with
    float32 statistics; the output keeps the input's dtype. The same parameters, buffers and state_dict as torch's
    batch norm it is mixed into (BatchNorm2d here, BatchNorm1d for SLIP's head)."""

    def _apply(self, fn, recurse=True):
        stats = {n: b for n in ("running_mean", "running_var") if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for n, old in stats.items():
            new = self._buffers[n]
            if new.dtype in (torch.bfloat16, torch.float16) and old.dtype == torch.float32:
                self._buffers[n] = old.to(new.device)  # moved where the module went, not cast
        return self

    def forward(self, x):
        w, b = self.weight, self.bias
        if w is None or self.running_mean is None or w.dtype == self.running_mean.dtype:
            return super().forward(x)
        factor = self.momentum or 0.0  # (statistics are kept: track_running_stats)
        if self.training:  # as nn.BatchNorm2d counts batches
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, w.float(), b.float(), self.training, factor,
                            self.eps)


class BatchNorm2d(_Float32Stats, nn.BatchNorm2d):
    """nn.BatchNorm2d with float32 running statistics in a bf16 model (_Float32Stats)."""


class BatchNorm1d(_Float32Stats, nn.BatchNorm1d):
    """nn.BatchNorm1d with float32 running statistics in a bf16 model (_Float32Stats): SLIP's projection head, which
    DeepSpeed's bf16 engine (parameters cast, buffers kept float32) left with bf16 weights beside float32 statistics,
    a dtype error in torch's batch norm at the first step."""


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:  # open_clip's keys: downsample.0 (conv), downsample.1 (norm)
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)),
                                                         ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                                                         ("1", BatchNorm2d(out))]))  # fmt: skip

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.avgpool(F.relu(self.bn2(self.conv2(y)), inplace=True))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)), inplace=True)


class AttentionPool2d(nn.Module):
    def __init__(self, grid: int, width: int, heads: int, embed_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, embed_dim)

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, C)
        h, d = self.heads, C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, h, d).transpose(1, 2)  # (B, h, 1, d): only the mean token's output is kept
        k = self.k_proj(x).view(B, -1, h, d).transpose(1, 2)  # (B, h, N, d)
        v = self.v_proj(x).view(B, -1, h, d).transpose(1, 2)  # (B, h, N, d)
        o = sdpa(q, k, v).reshape(B, C)  # (B, h, 1, d) -> (B, C)
        return self.c_proj(o)  # (B, embed_dim)


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        layers, w, size = tuple(cfg.resnet_layers), cfg.width, cfg.image_size
        if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"vision.resnet_layers must be four block counts >= 1 (RN50: (3, 4, 6, 3)), got {layers}")
        if w < 2 or w % 2 or (w * 32) % cfg.heads:
            raise ValueError(f"a ResNet's vision.width must be even and width * 32 a multiple of vision.heads; "
                             f"got width {w}, heads {cfg.heads}")
        check_image_size(size)
        self.conv1 = nn.Conv2d(3, w // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, kernel_size=3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = w
        for i, blocks in enumerate(layers):
            planes = w * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            stage += [Bottleneck(planes * EXPANSION, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * EXPANSION
        self.attnpool = AttentionPool2d(size // 32, w * 32, cfg.heads, embed_dim)
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)
        self._init()

    def _init(self):
        """open_clip's: attention pool projections N(0, width^-1/2); each block's last norm scale zero (every block
        starts as its shortcut); the convolutions keep torch's default init."""
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for name, p in self.named_parameters():
            if name.startswith("layer") and name.endswith("bn3.weight"):
                nn.init.zeros_(p)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> normalised floats in the weights' dtype; floats pass through."""
        if images.dtype == torch.uint8:
            images = (images.float() / 255.0 - self.mean) / self.std
        return images.to(self.conv1.weight.dtype)

    def stem(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        return self.avgpool(x)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is not None:
            raise ValueError("a ResNet image tower takes no patch mask (keep): masking is for ViTs; a ResNet reduces "
                             "image tokens only by resolution (image_reduction='resize' with a smaller image_size)")
        _, _, H, W = images.shape
        n = self.attnpool.positional_embedding.shape[0] - 1
        if final_grid(H) * final_grid(W) != n:
            raise ValueError(f"images of {H}x{W} px give a {final_grid(H)}x{final_grid(W)} final grid; this ResNet's "
                             f"attention pool has {n} positions ({self.cfg.image_size} px); resize the model "
                             f"(clipfast.interop)")
        x = self.stem(self.normalize(images))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, width * 32, H / 32, W / 32)
        return self.attnpool(x)
