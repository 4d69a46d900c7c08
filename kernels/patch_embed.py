"""Masked patch embedding: gather kept patches + patch GEMM + bias + pos-embed (work in progress).

out[b, k] = patch(images[b], keep[b, k]) @ weight.T + bias + pos_embed[keep[b, k]]      # (B, K, D)

This first version carries the reference and the public op (reference path); the Triton kernels follow.
"""
import torch

from kernels._common import use_triton


def _check(images, keep, weight, bias, pos_embed, patch_size):
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {p}")
    N = (H // p) * (W // p)
    if weight.dim() != 2 or weight.shape[1] != C * p * p:
        raise ValueError(f"weight must be (D, C*p*p) = (D, {C * p * p}), got {tuple(weight.shape)}")
    D = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be ({D},), got {tuple(bias.shape)}")
    if tuple(pos_embed.shape) != (N, D):
        raise ValueError(f"pos_embed must be (N, D) = ({N}, {D}), got {tuple(pos_embed.shape)}")
    if keep is not None:
        if keep.dim() != 2 or keep.shape[0] != B:
            raise ValueError(f"keep must be (B, K) = ({B}, K), got {tuple(keep.shape)}")
        if keep.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"keep must be int32 or int64, got {keep.dtype}")
    return B, C, H, W, N, D


def masked_patch_embed_ref(images, keep, weight, bias, pos_embed, patch_size, upcast=False):
    """Plain PyTorch: unfold patches -> gather rows `keep` -> `@ weight.T + bias + pos_embed[keep]`.

    Computes in the images' dtype (parameters are cast to it, as autocast would), or in float32 when
    `upcast`; returns the images' dtype. Differentiable in weight, bias and pos_embed (and images).
    """
    B, C, H, W, N, D = _check(images, keep, weight, bias, pos_embed, patch_size)
    p = patch_size
    dt = torch.float32 if upcast else images.dtype
    x = images.to(dt).reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, N, C * p * p)
    pos = pos_embed.to(dt)
    if keep is not None:
        x = x[torch.arange(B, device=x.device)[:, None], keep.long()]  # (B, K, C*p*p)
        pos = pos[keep.long()]  # (B, K, D)
    out = x @ weight.to(dt).t() + pos
    if bias is not None:
        out = out + bias.to(dt)
    return out.to(images.dtype)


def masked_patch_embed(images, keep, weight, bias, pos_embed, patch_size, *, impl=None, deterministic=False):
    """(B, C, H, W) images -> (B, K, D) embeddings of the kept patches. See the module docstring."""
    if images.requires_grad:
        raise ValueError("masked_patch_embed gives no gradient to images; pass images without requires_grad")
    if use_triton(images, impl):
        raise NotImplementedError("the Triton path of masked_patch_embed is not written yet")
    return masked_patch_embed_ref(images, keep, weight, bias, pos_embed, patch_size)
