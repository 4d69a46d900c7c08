"""Triton kernels for clipfast. Each op runs anywhere: the Triton kernel on CUDA, its `*_ref` on CPU.

Every public op takes `impl=None | "triton" | "ref"`: None picks Triton for CUDA tensors and the
reference otherwise; "triton" forces the kernel (on CPU tensors that needs TRITON_INTERPRET=1).
"""
from kernels.gelu import linear_gelu, linear_gelu_ref
from kernels.layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from kernels.linear import column_sums, linear_bias
from kernels.mlp import mlp, mlp_ref
from kernels.patch_embed import masked_patch_embed, masked_patch_embed_ref
from kernels.short_attention import short_attention_qkvpacked, short_attention_ref
from kernels.varlen_attention import varlen_attention, varlen_attention_qkvpacked, varlen_attention_ref

__all__ = ["add_layer_norm", "add_layer_norm_ref", "column_sums", "layer_norm", "layer_norm_ref", "linear_bias",
           "linear_gelu", "linear_gelu_ref", "masked_patch_embed", "masked_patch_embed_ref", "mlp", "mlp_ref",
           "short_attention_qkvpacked", "short_attention_ref", "varlen_attention", "varlen_attention_qkvpacked",
           "varlen_attention_ref"]
