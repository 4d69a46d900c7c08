"""Image augmentation inside the DALI pipeline: "CLIP + data augmentation" and SLIP's self-supervised views.

The "Scaling (Down) CLIP" study (Li, Xie, Cubuk 2024) compares plain CLIP, CLIP + data augmentation, FLIP and SLIP
at small budgets. The augmentations here are SimCLR's (Chen et al. 2020), the set SLIP (Mu et al. 2021) draws its
two self-supervised views with, as DALI operators on the decoded, cropped and resized uint8 HWC images, so they run
where the decode runs (the GPU on CUDA) and never on the training step:

- horizontal flip, p = 0.5;
- colour jitter, p = 0.8: brightness, contrast and saturation factors uniform in [0.6, 1.4], hue shifted by up to
  +-0.1 of the colour wheel (+-36 degrees; torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1));
- grayscale, p = 0.2;
- Gaussian blur, p = 0.5, sigma uniform in [0.1, 2.0] px at 224 px, scaled with the training resolution (at 96 px,
  [0.04, 0.86] px): the same blur relative to the image, as CLIPA's low-resolution images are the full-size ones
  resized.

`simclr_noflip` leaves the flip out. Each image draws its own coins and factors from the pipeline's seed
(rank-dependent), so the views are reproducible.
"""
from __future__ import annotations

AUGMENTS = ("none", "simclr", "simclr_noflip")  # simclr_noflip: for data a mirror changes (digits, text in images)
BLUR_SIGMA_224 = (0.1, 2.0)  # SimCLR's blur sigma range, in pixels of a 224 px image


def check_augment(name: str) -> str:
    if name not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {name!r}")
    return name


def simclr(images, image_size: int, device: str, flip: bool = True):
    """SimCLR's flip, colour jitter, grayscale and blur of a batch of uint8 HWC images (DALI DataNodes). Call inside a
    pipeline built with enable_conditionals=True: each transform runs only on the images whose coin came up."""
    from nvidia.dali import fn

    if flip:
        images = fn.flip(images, device=device, horizontal=fn.random.coin_flip(probability=0.5))
    if fn.random.coin_flip(probability=0.8):
        images = fn.color_twist(images, device=device, brightness=fn.random.uniform(range=[0.6, 1.4]),
                                contrast=fn.random.uniform(range=[0.6, 1.4]),
                                saturation=fn.random.uniform(range=[0.6, 1.4]), hue=fn.random.uniform(range=[-36, 36]))
    if fn.random.coin_flip(probability=0.2):
        images = fn.color_twist(images, device=device, saturation=0.0)
    if fn.random.coin_flip(probability=0.5):
        lo, hi = (s * image_size / 224 for s in BLUR_SIGMA_224)
        images = fn.gaussian_blur(images, device=device, sigma=fn.random.uniform(range=[lo, hi]))
    return images
