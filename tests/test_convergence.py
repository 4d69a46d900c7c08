"""Convergence: a tiny CLIP trained with the Triton kernels (interpreted on CPU) follows the same loss curve
as with the PyTorch references (Liger-Kernel's mini-model test), masked images and packed captions included."""
import pytest
import torch

from clipfast.data import pack_text
from clipfast.loss import clip_loss
from clipfast.model import CLIP
from clipfast.presets import from_name
from clipfast.reduce import image_keep_indices
from kernels._common import interpreting

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")

STEPS = 12


def _batches(device):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    lengths = [2, 5, 3, 7, 4, 6, 2, 5]
    seqs = [[49406, *torch.randint(300, 2000, (n - 2,), generator=g).tolist(), 49407] for n in lengths]
    text, cu, max_len = pack_text(seqs)
    return images.to(device), text.to(device), cu.to(device), max_len


def _curve(kernels: str, device) -> list[float]:
    torch.manual_seed(0)
    cfg = from_name("demo", **{"vision.layers": 1, "vision.width": 64, "vision.heads": 2, "text.layers": 1,
                               "text.width": 64, "text.heads": 2})
    cfg.embed_dim = 32
    model = CLIP(cfg, kernels=kernels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, text, cu, max_len = _batches(device)
    gen = torch.Generator(device=device).manual_seed(1)
    losses = []
    for _ in range(STEPS):
        keep = image_keep_indices("random", images.shape[0], cfg.vision.grid, 0.25, device=device, generator=gen)
        img, txt, scale = model(images, text, cu, max_len, keep=keep)
        loss = clip_loss(img, txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_same_loss_curve_with_and_without_kernels():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = _curve("ref", device)
    fused = _curve("triton", device)
    assert ref[-1] < 0.5 * ref[0], ref  # it learns: the curve is not flat
    for step, (a, b) in enumerate(zip(ref, fused)):
        # fp32 throughout; kernel and reference differ only by summation order, amplified over the steps
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (step, ref, fused)
