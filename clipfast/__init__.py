"""clipfast: CLIP training the CLIPA way — few tokens, fused kernels, DALI data, DeepSpeed ZeRO."""
__version__ = "0.1.0"
