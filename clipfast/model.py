"""CLIP = VisionTransformer (or open_clip's ModifiedResNet, clipfast.resnet) + causal TextTransformer, single-device.

Parameter names are open_clip's (`visual.conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`,
`text_projection`, ...), so a state_dict moves between the two with at most a reshape (clipfast.interop).

- Image tower: `kernels.masked_patch_embed` embeds only the kept patches (keep=None: all) and adds
  their position embeddings in one op; the class token is prepended after it.
- Text tower: captions arrive packed end to end (ids (T,), cu_seqlens (S+1,)): embeddings, norms and
  MLPs see only real tokens, positions restart per caption, attention is `kernels.varlen_attention`
  (causal), and each caption is pooled at its last token, the end-of-text token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipfast.layers import (
    LAYER_NORMS,
    MLP,
    MLP_CHOICES,
    VISION_ATTENTIONS,
    Attention,
    LayerNorm,
    ResidualAttentionBlock,
    Transformer,
    _impl,
)
from clipfast.presets import ModelConfig, TextConfig, VisionConfig
from kernels import masked_patch_embed

# OpenAI CLIP's pixel statistics (open_clip's OPENAI_DATASET_MEAN / STD), applied to uint8 images.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def sincos_2d(width: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / open_clip `get_2d_sincos_pos_embed`), (grid² [+1], width)."""
    assert width % 4 == 0, "sin-cos position embedding needs width divisible by 4"
    gh, gw = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="xy")  # open_clip puts w first

    def emb_1d(pos):
        omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([emb_1d(gh), emb_1d(gw)], dim=1).float()
    if cls_token:
        emb = torch.cat([torch.zeros(1, width), emb], dim=0)
    return emb


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, kernels: str = "auto"):
        super().__init__()
        self.cfg, self.impl = cfg, _impl(kernels)
        w, p = cfg.width, cfg.patch_size
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        if cfg.pos_embed == "learned":
            self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, w))
        elif cfg.pos_embed == "sincos":
            self.positional_embedding = nn.Parameter(sincos_2d(w, cfg.grid), requires_grad=False)
        else:
            raise ValueError(f"vision.pos_embed must be 'learned' or 'sincos', got {cfg.pos_embed!r}")
        if cfg.pool not in ("tok", "avg"):
            raise ValueError(f"vision.pool must be 'tok' or 'avg', got {cfg.pool!r}")
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> normalised floats in the weights' dtype; floats pass through."""
        if images.dtype == torch.uint8:
            images = (images.float() / 255.0 - self.mean) / self.std
        return images.to(self.conv1.weight.dtype)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, project: bool = True) -> torch.Tensor:
        """(B, embed_dim) image features; project=False: the pooled (B, width) features before the projection."""
        B, _, H, W = images.shape
        p = self.cfg.patch_size
        if H % p or W % p or (H // p) * (W // p) != self.positional_embedding.shape[0] - 1:
            raise ValueError(
                f"images of {H}x{W} px do not match this model's {self.cfg.image_size} px / patch {p} grid "
                f"({self.positional_embedding.shape[0] - 1} positions); resize the model (clipfast.interop)"
            )
        w = self.conv1.weight.reshape(self.cfg.width, -1)  # (D, 3*p*p)
        pos = self.positional_embedding.to(w.dtype)
        if images.dtype == torch.uint8:  # normalisation folded into the kernel's loads: no float copy of the batch
            x = masked_patch_embed(images, keep, w, None, pos[1:], p, impl=self.impl, mean=self.mean.view(-1),
                                   std=self.std.view(-1), out_dtype=w.dtype)  # (B, K, D)
        else:
            x = masked_patch_embed(images.to(w.dtype), keep, w, None, pos[1:], p, impl=self.impl)  # (B, K, D)
        cls = (self.class_embedding.to(x.dtype) + pos[0]).expand(B, 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1))
        x = self.transformer(x)
        if self.cfg.pool == "tok":  # LayerNorm is per token: norm-then-pick == pick-then-norm
            pooled = self.ln_post(x[:, 0])
        elif self.cfg.final_ln_after_pool:  # CLIPA: mean of the patch tokens, then the norm
            pooled = self.ln_post(x[:, 1:].mean(dim=1))
        else:
            pooled = self.ln_post(x[:, 1:]).mean(dim=1)
        return pooled @ self.proj if project else pooled


def _logit_scale_to_0d(module, state_dict, prefix, local_metadata):
    """Saved 0-d, as open_clip keeps it. (Not an empty tensor: ZeRO stage 3's placeholder for a partitioned one.)"""
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].numel() == 1:
        state_dict[key] = state_dict[key].reshape(())
    return state_dict


def _logit_scale_to_1d(state_dict, prefix, *args):
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


_TEXT_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# the text tower's stream priority (CUDA: 0 the default, lower numbers run first when both streams have work ready);
# read when the stream is made. 0 was measured (c9d6f1c); bench/throughput.py --knob model.TEXT_STREAM_PRIORITY=-1
# times the other
TEXT_STREAM_PRIORITY = 0


def _text_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream CLIP.set_tower_streams runs the text tower on, one per device (shared by all models), made in the
    first step, which is eager: GraphedTrainStep captures only after one."""
    if device not in _TEXT_STREAMS:
        _TEXT_STREAMS[device] = torch.cuda.Stream(device, priority=TEXT_STREAM_PRIORITY)
    return _TEXT_STREAMS[device]


class CLIP(nn.Module):
    """open_clip's CLIP layout: `visual` plus the text tower's modules at the top level. `visual` is a
    VisionTransformer, or a ModifiedResNet where cfg.vision.kind is "resnet": then the switches for ViT blocks
    (set_vision_attention, compile_blocks, grad checkpointing) leave the image tower as it is (clipfast.resnet)."""

    def __init__(self, cfg: ModelConfig, kernels: str = "auto"):
        super().__init__()
        self.cfg, self.impl = cfg, _impl(kernels)
        t: TextConfig = cfg.text
        v = cfg.vision
        bad = [f"{tower}.width {w} is not divisible by {tower}.heads {h}" for tower, w, h in
               (("vision", v.width, v.heads), ("text", t.width, t.heads)) if h < 1 or w % h and
               (tower == "text" or v.kind == "vit")]  # fmt: skip
        if v.kind == "vit" and (v.patch_size < 1 or v.image_size % v.patch_size):
            bad.append(f"vision.image_size {v.image_size} is not a multiple of vision.patch_size {v.patch_size}")
        if bad:  # (the forward would fail on the first batch, with a reshape's message)
            raise ValueError(f"model {cfg.name!r}: " + "; ".join(bad))
        if cfg.vision.kind == "resnet":
            from clipfast.resnet import ModifiedResNet  # imports this module's IMAGE_MEAN

            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim)
        elif cfg.vision.kind == "vit":
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, kernels)
        else:
            raise ValueError(f"vision.kind must be 'vit' or 'resnet', got {cfg.vision.kind!r}")
        self.context_length = t.context_length
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        # Held as shape (1,): DeepSpeed 0.19.8 broadcasts parameters through .view(torch.uint8), which fails
        # for 0-dim tensors. The state_dict hooks keep open_clip's 0-dim layout on save and load.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self._register_state_dict_hook(_logit_scale_to_0d)
        self._register_load_state_dict_pre_hook(_logit_scale_to_1d)
        self._init_text()
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        self.tower_streams = False
        self.ssl_head = None  # SLIP's self-supervised head, added for training by add_ssl_head

    def add_ssl_head(self, hidden: int, dim: int) -> CLIP:
        """SLIP: an MLP (clipfast.slip.SSLHead) over the image tower's pooled features, trained with SimCLR's loss on
        augmented views of the images (forward's `views`). A training-only part: model.pt and open_clip leave it out
        (its keys start with "ssl_head.")."""
        from clipfast.slip import SSLHead

        vit = isinstance(self.visual, VisionTransformer)
        width = self.visual.cfg.width if vit else self.cfg.embed_dim
        self.ssl_head = SSLHead(width, hidden, dim).to(self.logit_scale.device)
        return self

    def ssl_features(self, images):
        """What SLIP's head reads: a ViT's pooled features before its projection; a ResNet's attention-pool output
        (its projection, c_proj, is inside the pool)."""
        if isinstance(self.visual, VisionTransformer):
            return self.visual(images, project=False)
        return self.visual(images)

    def _init_text(self):
        # open_clip's init: small embeddings, depth-scaled projections
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def _set_each(self, root: nn.Module, cls: type, attr: str, value) -> CLIP:
        for m in root.modules():
            if isinstance(m, cls):
                setattr(m, attr, value)
        return self

    @staticmethod
    def _check_choice(key: str, impl: str, choices: tuple) -> str:
        if impl not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {impl!r}")
        return impl

    def compile_blocks(self, backend: str | None = "inductor") -> CLIP:
        """Compile the non-attention part of every transformer block (layer norms, projections, MLP, residuals) with
        torch.compile, fusing its elementwise work; None undoes it. The attention kernels stay as they are."""
        return self._set_each(self, ResidualAttentionBlock, "compile_backend", backend)

    def set_layer_norm(self, impl: str = "torch") -> CLIP:
        """Every layer norm's implementation: "torch" (F.layer_norm) or "triton" (kernels.layer_norm on CUDA)."""
        return self._set_each(self, LayerNorm, "impl", self._check_choice("layer_norm", impl, LAYER_NORMS))

    def set_vision_attention(self, impl: str = "sdpa") -> CLIP:
        """The image tower's attention: "sdpa" (F.scaled_dot_product_attention) or "triton" (kernels.short_attention
        for sequences of up to 64 tokens on CUDA, e.g. B/16 at 112 px or less; SDPA for longer ones and on the CPU)."""
        impl = self._check_choice("vision_attention", impl, VISION_ATTENTIONS)
        return self._set_each(self.visual, Attention, "dense_impl", impl)

    def set_mlp(self, impl: str = "torch") -> CLIP:
        """Every MLP: "torch" (nn.Linear, nn.GELU), "triton" (c_fc and the GELU as kernels.linear_gelu on CUDA) or
        "triton_gemm" (the MLP as kernels.mlp on CUDA: the GELU in the matmuls' epilogues)."""
        return self._set_each(self, MLP, "impl", self._check_choice("mlp", impl, MLP_CHOICES))

    def set_tower_streams(self, enable: bool = True) -> CLIP:
        """On CUDA, forward() runs the text tower on a second stream beside the image tower (and autograd runs
        each backward op on its forward op's stream, so the two backward passes overlap too; in a CUDA graph the
        towers become parallel branches). The text tower's small matmuls and its memory-bound kernels leave SMs
        idle that the image tower's work can take. Off by default; CPU tensors ignore it."""
        self.tower_streams = bool(enable)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> CLIP:
        """Both transformers'; a ResNet image tower runs without (clipfast.resnet says why)."""
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable
        return self

    def encode_image(self, images, keep=None, normalize: bool = False):
        x = self.visual(images, keep)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_packed(self, ids, cu_seqlens, max_seqlen: int, normalize: bool = False):
        """ids (T,) packed captions, each ending with its end-of-text token; cu_seqlens (S+1,) int32."""
        T = ids.shape[0]
        S = cu_seqlens.shape[0] - 1
        if max_seqlen > self.context_length:
            raise ValueError(f"caption of {max_seqlen} tokens exceeds the text context of {self.context_length}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        # output_size keeps repeat_interleave free of a host-device sync
        seq = torch.repeat_interleave(torch.arange(S, device=ids.device), lengths, output_size=T)  # (T,)
        pos = torch.arange(T, device=ids.device) - cu_seqlens[seq].long()
        # F.embedding and index_select rather than indexing: the backward of positional_embedding[pos] is an
        # accumulating index_put that sorts T indices into context_length rows, and x[eot]'s one too (two
        # indexing_backward kernels, 0.69 ms of a B/16 112 px step on an H100 at 49ad34c); embedding's backward and
        # index_add do the same sums
        x = self.token_embedding(ids) + F.embedding(pos, self.positional_embedding)  # (T, D)
        x = self.transformer(x, causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, impl=self.impl)
        x = self.ln_final(x.index_select(0, cu_seqlens[1:].long() - 1))  # end-of-text token of each caption, (S, D)
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize: bool = False):
        """Padded (B, L) tokens as open_clip takes them (end-of-text = the highest id in each row)."""
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.transformer(x, causal=True)
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])
        x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, text, cu_seqlens, max_seqlen: int, keep=None, views=None):
        """Returns L2-normalised image and text features (B, E) and the logit scale exp(t) clamped at 100; with SLIP's
        `views` (V, B, 3, H, W) also the SSL head's outputs for them, (V, B, dim): one image-tower pass for all V views,
        the head per view (its batch norms see one view at a time, as SLIP's)."""
        if self.tower_streams and images.is_cuda:
            main, side = torch.cuda.current_stream(images.device), _text_stream(images.device)
            side.wait_stream(main)  # the inputs were written on the caller's stream
            with torch.cuda.stream(side):
                txt = self.encode_text_packed(text, cu_seqlens, max_seqlen, normalize=True)
            img = self.encode_image(images, keep, normalize=True)
            main.wait_stream(side)
            txt.record_stream(main)  # made on the side stream, read on the caller's: not reused before that is done
        else:
            img = self.encode_image(images, keep, normalize=True)
            txt = self.encode_text_packed(text, cu_seqlens, max_seqlen, normalize=True)
        scale = self.logit_scale.exp().clamp(max=100).squeeze(0)
        if views is None:
            return img, txt, scale
        if self.ssl_head is None:
            raise ValueError("forward got SSL views but the model has no SSL head (CLIP.add_ssl_head)")
        V, B = views.shape[:2]
        h = self.ssl_features(views.flatten(0, 1)).unflatten(0, (V, B))  # (V, B, width)
        return img, txt, scale, torch.stack([self.ssl_head(h[i]) for i in range(V)])
