"""Packed (varlen) attention: q, k, v (T_total, H, d) with cu_seqlens (S+1,) int32, flash-attn layout.

This first version holds only the reference path (the Triton kernels follow in the next commit);
`varlen_attention` runs the reference on every device.
"""
import torch
import torch.nn.functional as F

from kernels._common import use_triton


def _seq_index(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its sequence id and its position inside that sequence; no host sync."""
    tok = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.long()
    seq = torch.searchsorted(cu[1:], tok, right=True)  # (T,)
    return seq, tok - cu[seq]


def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal=False, softmax_scale=None, upcast=False):
    """Scatter into a right-padded (S, H, max_seqlen, d) batch, run SDPA, gather the real rows back.

    Differentiable, no python loop over sequences: the CPU training path. With right padding, causal
    needs no mask (a real query at position i only sees keys 0..i, all real); non-causal masks padded
    keys for real queries (padded queries see everything, so no row is fully masked, even for empty
    sequences). upcast=True computes in float32, a dtype computes in that dtype; output in q's dtype.
    """
    T, H, d = q.shape
    S = cu_seqlens.numel() - 1
    L = int(max_seqlen)
    dtype = q.dtype
    cdt = (torch.float32 if upcast is True else upcast) if upcast else dtype
    seq, pos = _seq_index(cu_seqlens, T)

    def pad(x):
        buf = x.new_zeros(S, L, H, x.shape[-1], dtype=cdt)
        return buf.index_put((seq, pos), x.to(cdt)).transpose(1, 2)  # (S, H, L, d)

    mask = None
    if not causal:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        ar = torch.arange(L, device=q.device)
        real = ar[None, :] < lens[:, None]  # (S, L)
        mask = (real[:, None, None, :] | ~real[:, None, :, None])  # (S, 1, L, L)
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return o.transpose(1, 2)[seq, pos].to(dtype)  # (T, H, d)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, softmax_scale=None, *, impl=None):
    """Attention within each packed sequence. q, k, v (T_total, H, d); cu_seqlens (S+1,) int32 -> (T_total, H, d).

    max_seqlen is the caller's bound on the longest sequence (a python int: no device sync here).
    """
    if use_triton(q, impl) and impl == "triton":
        raise NotImplementedError("the Triton varlen attention kernel is not written yet; use impl='ref'")
    return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
