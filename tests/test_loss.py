import torch
import torch.nn.functional as F

from clipfast.loss import clip_loss


def _features(b, e, seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return img, txt


def test_matches_symmetric_cross_entropy():
    img, txt = _features(6, 8, 0)
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(clip_loss(img, txt, scale).double(), ref)


def test_local_loss_over_ranks_gives_global_gradient():
    """Two simulated ranks, each computing its own rows against gathered features: the summed per-rank
    losses' gradients (what all_gather's backward delivers) equal the global loss's gradients."""
    img, txt = _features(8, 5, 1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    g_img, g_txt = torch.autograd.grad(clip_loss(img, txt, scale), (img, txt))
    total = 0
    for rank in range(2):
        rows = slice(4 * rank, 4 * rank + 4)
        total = total + clip_loss(img[rows], txt[rows], scale, img, txt, offset=4 * rank)
    l_img, l_txt = torch.autograd.grad(total / 2, (img, txt))
    assert torch.allclose(g_img, l_img) and torch.allclose(g_txt, l_txt)


def test_perfect_alignment_has_low_loss():
    img, _ = _features(4, 16, 2)
    assert clip_loss(img, img, torch.tensor(100.0, dtype=torch.float64)) < 1e-3
