"""The transformer's layers, with open_clip's parameter names: LayerNorm, MLP and Attention, each able to run a
clipfast kernel in place of torch's ops (chosen per module by CLIP.set_layer_norm / set_mlp / set_vision_attention),
the pre-norm ResidualAttentionBlock that leaves its last residual add to the next block's norm, and Transformer."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import (
    add_layer_norm,
    layer_norm,
    linear_bias,
    linear_gelu,
    mlp,
    short_attention_qkvpacked,
    varlen_attention_qkvpacked,
)
from kernels._common import interpreting
from kernels.layer_norm import fuses_add
from kernels.short_attention import TILE_MAX, fuses_bias


def _impl(kernels: str):
    return None if kernels == "auto" else kernels


def sdpa(q, k, v, causal: bool = False, **kw):
    """F.scaled_dot_product_attention, in float32 for bf16/fp16 inputs on the CPU: there torch's bf16 kernel runs
    up to ~5x slower than float32 (forward and backward, one thread, 8-197 tokens: `python bench/cpu_attention.py`),
    while the matmuls around it gain from bf16 (AMX). Output in q's dtype."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)


LAYER_NORMS = ("torch", "triton")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same state_dict) that can run `kernels.layer_norm`: impl "torch" is
    F.layer_norm; "triton" the fused kernel (dW and dB in dx's pass) on CUDA tensors and under the interpreter,
    F.layer_norm elsewhere and inside torch.compile (which fuses the norm itself). Set by CLIP.set_layer_norm."""

    impl = "torch"

    def _kernel(self, x) -> bool:
        return self.impl == "triton" and (x.is_cuda or interpreting()) and not torch.compiler.is_compiling()

    def forward(self, x):
        if self._kernel(x):
            return layer_norm(x, self.weight, self.bias, self.eps, impl="triton")
        return super().forward(x)

    def fuses_add(self, x, dtype) -> bool:
        """Whether add_forward(x, delta) with a delta of dtype runs `kernels.add_layer_norm`, which adds a linear
        layer's bias too: the layer making delta can then leave its bias out (and the separate sum for its gradient)."""
        return self._kernel(x) and fuses_add(x, dtype, "triton")

    def add_forward(self, x, delta, delta_bias=None):
        """(x + delta (+ delta_bias), this norm of it): a residual add and the norm after it, in one pass of
        `kernels.add_layer_norm` where fuses_add, else the add and then forward."""
        if self.fuses_add(x, delta.dtype):
            return add_layer_norm(x, delta, self.weight, self.bias, self.eps, rb=delta_bias, impl="triton")
        s = x + (delta if delta_bias is None else delta + delta_bias)
        return s, super().forward(s)


VISION_ATTENTIONS = ("sdpa", "triton")
MLPS = ("torch", "triton")  # (plain, kernel): what "auto" picks between (clipfast.engine.resolve_kernels)
# "triton_gemm": kernels.mlp, the GELU inside two Triton matmuls; for bench/throughput.py --kernels-mlp only (1.4x
# slower than cuBLAS and the separate GELU passes on an H100 at f0bc99c), not a trainer choice
MLP_CHOICES = (*MLPS, "triton_gemm")


class MLP(nn.Sequential):
    """c_fc, GELU, c_proj (open_clip's names and state_dict). impl "triton" (CLIP.set_mlp) runs c_fc and the GELU as
    `kernels.linear_gelu` on CUDA tensors and under the interpreter (the GELU backward writes the bias gradient in the
    same pass), and the block's qkv projection, where the attention does not add its bias, as `kernels.linear_bias`
    (its bias gradient by kernels.column_sums); "triton_gemm" the whole MLP as `kernels.mlp` (the GELU and its
    gradient in the epilogues of Triton matmuls), the qkv projection as "triton"; torch's modules elsewhere and
    inside torch.compile."""

    impl = "torch"

    def __init__(self, width: int, hidden: int):
        super().__init__(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                      ("c_proj", nn.Linear(hidden, width))]))  # fmt: skip

    def kernel(self, x) -> bool:
        """Whether this MLP's kernels run for x (impl not "torch", a CUDA tensor or the interpreter, not inside
        torch.compile); the block's qkv projection follows it (kernels.linear_bias)."""
        return self.impl != "torch" and (x.is_cuda or interpreting()) and not torch.compiler.is_compiling()

    def forward(self, x, proj_bias: bool = True):
        """proj_bias=False: c_proj without its bias (the caller adds it: kernels.add_layer_norm's rb)."""
        kernel = self.kernel(x)
        if kernel and self.impl == "triton_gemm":
            return mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight,
                       self.c_proj.bias if proj_bias else None, impl="triton")
        if kernel:
            h = linear_gelu(x, self.c_fc.weight, self.c_fc.bias, impl="triton")
        else:
            h = self.gelu(self.c_fc(x))
        return F.linear(h, self.c_proj.weight, self.c_proj.bias if proj_bias else None)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names. Dense (B, N, D) input runs SDPA, or with
    dense_impl "triton" (CLIP.set_vision_attention) `kernels.short_attention_qkvpacked` for N <= 64 tokens on CUDA and
    under the interpreter (one tile per sequence and head; dq, dk, dv written into one gradient); packed input runs
    `kernels.varlen_attention_qkvpacked`."""

    dense_impl = "sdpa"

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal: bool = False, cu_seqlens=None, max_seqlen: int = 0, impl=None):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(self.core(qkv, causal, cu_seqlens, max_seqlen, impl))

    def _short_kernel(self, x, cu_seqlens) -> bool:
        """Whether core() runs kernels.short_attention for x (qkv or the stream it is projected from, (B, N, .))."""
        return (cu_seqlens is None and self.dense_impl == "triton" and x.shape[1] <= TILE_MAX
                and (x.is_cuda or interpreting()))

    def fuses_qkv_bias(self, x, cu_seqlens=None) -> bool:
        """Whether core() on the projection of x (the block's stream, (B, N, D) dense) runs kernels.short_attention,
        which adds in_proj_bias inside the kernel (and sums its gradient in the backward kernel): the projection can
        then leave the bias out."""
        return (x.dim() == 3 and self._short_kernel(x, cu_seqlens)
                and fuses_bias(x, x.shape[1], self.in_proj_bias.dtype, "triton"))

    def core(self, qkv, causal: bool = False, cu_seqlens=None, max_seqlen: int = 0, impl=None, bias=None):
        """Attention of the projected qkv, (B, N, 3D) dense or (T, 3D) packed, before the output projection. bias:
        the projection's, not yet added (where fuses_qkv_bias), else None."""
        D = qkv.shape[-1] // 3
        kernel = self._short_kernel(qkv, cu_seqlens)
        if bias is not None and not kernel:
            qkv, bias = qkv + bias, None
        if cu_seqlens is None:  # dense (B, N, D)
            B, N, _ = qkv.shape
            if kernel:
                o = short_attention_qkvpacked(qkv.view(B, N, 3, self.heads, D // self.heads), causal, bias=bias,
                                              impl="triton")  # fmt: skip
                return o.reshape(B, N, D)
            # unbind over the q/k/v axis, then transpose each: backward stacks dq, dk, dv (each laid out (B, N, H, d),
            # as SDPA allocates them) along that axis into qkv's own layout, one contiguous copy. Unbinding a permuted
            # (3, B, H, N, d) view instead stacked into that order and then copied back: two transposing copies per
            # block (the H200 profile at efae470: 9.8 of 93.5 ms per B/16 step)
            q, k, v = (t.transpose(1, 2) for t in qkv.view(B, N, 3, self.heads, D // self.heads).unbind(2))
            return sdpa(q, k, v, causal).transpose(1, 2).reshape(B, N, D)
        T = qkv.shape[0]  # packed (T, 3D): the kernel's backward writes dq, dk, dv into one (T, 3, H, d) gradient
        qkv = qkv.view(T, 3, self.heads, D // self.heads)
        return varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal=causal, impl=impl).reshape(T, D)


_COMPILED: dict = {}


def _compiled(backend: str):
    """torch.compile'd ResidualAttentionBlock.pre / .post, one pair per backend, dynamic in the token count (packed
    text changes it every step). The attention between them stays outside: a Triton kernel or SDPA already."""
    if backend not in _COMPILED:
        _COMPILED[backend] = tuple(torch.compile(f, backend=backend, dynamic=True)
                                   for f in (ResidualAttentionBlock.pre, ResidualAttentionBlock.post))
    return _COMPILED[backend]


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block. forward(x, ..., pending, pending_bias) -> (x, m, m_bias): the stream x after the attention's
    residual add, and the MLP's output m, whose residual add is left to the next block (ln_1.add_forward(x, m, m_bias):
    one pass with the norm under layer_norm "triton") or to the end of the Transformer. m_bias is None, or c_proj's
    bias where the norms add it in their pass (ln_2.fuses_add; the same for out_proj's bias before ln_2): then no
    linear layer here adds a bias to the stream, and no separate sum makes the bias's gradient (48 of the 73
    bias-gradient sums that took 3.8 of 76.2 ms of device time per B/16 step with the kernels, H100 profile at
    49ad34c). With
    torch's norms these are the same ops, in the same order, as `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, hidden)
        self.compile_backend = None  # set by CLIP.compile_blocks

    def forward(self, x, causal=False, cu_seqlens=None, max_seqlen=0, impl=None, pending=None, pending_bias=None):
        fused = self.attn.fuses_qkv_bias(x, cu_seqlens)  # the attention kernel adds the qkv bias
        qkv_bias = self.attn.in_proj_bias if fused else None
        if self.compile_backend:  # the same two compiled functions serve every block (parameters are inputs)
            pre, post = _compiled(self.compile_backend)
            x, qkv = pre(self, x, pending, pending_bias, not fused)
            return post(self, x, self.attn.core(qkv, causal, cu_seqlens, max_seqlen, impl, qkv_bias))
        x, qkv = self.pre(x, pending, pending_bias, not fused)
        return self.post(x, self.attn.core(qkv, causal, cu_seqlens, max_seqlen, impl, qkv_bias))

    def pre(self, x, pending=None, pending_bias=None, qkv_bias: bool = True):
        """Everything before the attention itself: the previous block's pending residual add, layer norm, the qkv
        projection (without its bias where the attention adds it). Returns (stream, qkv)."""
        if pending is None:
            h = self.ln_1(x)
        else:
            x, h = self.ln_1.add_forward(x, pending, pending_bias)
        if qkv_bias and self.mlp.kernel(h):  # the bias gradient by kernels.column_sums, not torch's reduction
            return x, linear_bias(h, self.attn.in_proj_weight, self.attn.in_proj_bias, impl="triton")
        return x, F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias if qkv_bias else None)

    def post(self, x, o):
        """Everything after it: output projection, residual add + layer norm, MLP. Returns (stream, MLP output, its
        bias or None): the last residual add is pending."""
        out_proj, c_proj = self.attn.out_proj, self.mlp.c_proj
        fused = self.ln_2.fuses_add(x, out_proj.weight.dtype)  # then ln_2 adds out_proj's bias, ln_1 c_proj's next
        x, h = self.ln_2.add_forward(x, F.linear(o, out_proj.weight, None if fused else out_proj.bias),
                                     out_proj.bias if fused else None)  # fmt: skip
        return x, self.mlp(h, proj_bias=not fused), c_proj.bias if fused else None


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x, causal=False, cu_seqlens=None, max_seqlen=0, impl=None):
        pending = bias = None  # each block's last residual add is done by the next block's first norm
        for block in self.resblocks:  # (ResidualAttentionBlock), with the MLP's bias where the norms add it
            if self.grad_checkpointing and self.training:
                x, pending, bias = checkpoint(block, x, causal, cu_seqlens, max_seqlen, impl, pending, bias,
                                              use_reentrant=False)
            else:
                x, pending, bias = block(x, causal, cu_seqlens, max_seqlen, impl, pending, bias)
        if pending is None:
            return x
        return x + (pending if bias is None else pending + bias)
