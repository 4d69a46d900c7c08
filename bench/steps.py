"""The training steps bench/throughput.py times: clipfast eager, clipfast with compiled blocks, clipfast with its
opt-in kernels, clipfast as CUDA graphs (with or without the kernels), clipfast through the trainer's DeepSpeed
engine, and open_clip 3.3.0. Each builder takes (model config, grid point, device, precision, batch size) and returns
(model, optimizer, step) with step(batch) -> loss: forward, loss, backward, optimizer.
"""
from __future__ import annotations

import contextlib

import torch

from clipfast.graph import GraphedTrainStep, default_text_bucket, lr_on_device
from clipfast.loss import clip_loss
from clipfast.model import CLIP
from clipfast.optim import MasterAdamW
from clipfast.presets import ModelConfig
from clipfast.reduce import image_keep_indices, num_kept


def _autocast(device: torch.device, precision: str):
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model, precision: str = "fp32", **kw):
    # fused on CPU too (torch >= 2.4): 6x faster than the for-each loop on 2 cores (0.08 vs 0.50 s per 20M params),
    # and the same kernel for both columns, so the optimizer does not dilute the comparison more than it must
    if precision == "bf16_master":  # DeepSpeed's bf16 mode: bf16 weights, fp32 masters in the optimizer
        return MasterAdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True, **kw)
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True, **kw)


# every clipfast column's layer norms (CLIP.set_layer_norm): "torch" or "triton"; bench/throughput.py's
# --clipfast-layer-norm sets it for the run
LAYER_NORM = "torch"
# every clipfast column's image-tower attention (CLIP.set_vision_attention): "sdpa" or "triton"; set by
# bench/throughput.py's --clipfast-vision-attention
VISION_ATTENTION = "sdpa"
# every clipfast column's text tower on its own CUDA stream (CLIP.set_tower_streams), as clipfast.train runs it with
# engine=torch on CUDA; bench/throughput.py's --tower-streams (default on) sets it. The DeepSpeed column keeps one
# stream, as the trainer does.
TOWER_STREAMS = False


# the kernels' module-level switches that --knob may set (read by their code at each launch), with their values;
# model.TEXT_STREAM_PRIORITY is clipfast.model's (read when the text tower's stream is made), graph.OVERLAP_OPTIMIZER
# clipfast.graph's (read when a GraphedTrainStep is built)
KNOBS = {"short_attention.FWD_HEADS": ("0", "1", "2", "4"), "short_attention.FWD_STAGES": ("1", "2", "3"),
         "short_attention.BWD_HEADS": ("1", "2", "4"), "short_attention.BWD_STAGES": ("1", "2", "3"),
         "adamw.SLOTS": tuple(str(k) for k in range(1, 9)), "_common.FINISH": ("triton", "torch"),
         "model.TEXT_STREAM_PRIORITY": ("0", "-1"), "graph.OVERLAP_OPTIMIZER": ("1", "0"),
         "layer_norm.BWD_STAGES": ("0", "1", "2", "3"), "layer_norm.PROGRAMS_PER_SM": ("2", "4", "8", "16"),
         "gelu.BWD_STAGES": ("1", "2", "3"), "gelu.PROGRAMS_PER_SM": ("4", "8", "16"),
         "linear.SUMS": ("triton", "torch"), "linear.PROGRAMS_PER_SM": ("4", "8", "16")}


def knob_module(key: str):
    """The module a KNOBS switch lives in: clipfast.model / clipfast.graph for model.* / graph.*, else kernels.*."""
    import importlib

    mod = key.split(".")[0]
    return importlib.import_module(f"clipfast.{mod}" if mod in ("model", "graph") else f"kernels.{mod}")


def knob_problems(specs) -> list[str]:
    """What is wrong with "module.NAME=value" strings, each naming the valid switches or values (the scripts' usage
    errors); [] when all are good."""
    out = []
    for spec in specs or ():
        key, _, raw = spec.partition("=")
        if key not in KNOBS:
            out.append(f"--knob {spec!r}: the switches are {sorted(KNOBS)}")
        elif raw not in KNOBS[key]:
            out.append(f"--knob {spec!r}: {key} takes one of {KNOBS[key]}")
    return out


def set_knobs(specs) -> dict:
    """Set kernels' module switches from "module.NAME=value" strings (e.g. short_attention.FWD_HEADS=1,
    adamw.SLOTS=1, _common.FINISH=torch), so that a run can time a kernel variant against the default; returns
    {"module.NAME": value}. An unknown switch or value is an error that lists the valid ones."""
    problems = knob_problems(specs)
    if problems:
        raise ValueError("; ".join(problems))
    out = {}
    for spec in specs or ():
        key, _, raw = spec.partition("=")
        module, name = knob_module(key), key.split(".")[1]
        value = int(raw) if isinstance(getattr(module, name), int) else raw
        setattr(module, name, value)
        out[key] = value
    return out


def _eager_step(opt, device, precision: str, loss_of):
    """step(batch) -> loss: loss_of(batch) under the precision's autocast, backward, optimizer step; the eager
    step of both libraries, so the two columns differ only in their models and losses."""

    def step(b):
        with _autocast(device, precision):
            loss = loss_of(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _clipfast_model(cfg: ModelConfig, device, precision: str, layer_norm: str | None = None,
                    vision_attention: str | None = None, mlp: str = "torch") -> CLIP:
    """CLIP in the column's precision; layer norms and vision attention as given, else the run's (the globals)."""
    with torch.device(device):
        model = CLIP(cfg).train().set_layer_norm(layer_norm or LAYER_NORM)
        model.set_vision_attention(vision_attention or VISION_ATTENTION).set_mlp(mlp).set_tower_streams(TOWER_STREAMS)
    return model.to(torch.bfloat16) if precision in ("bf16", "bf16_master") else model


def clipfast_step_fn(cfg: ModelConfig, pt, device, precision, batch_size, compile_backend: str | None = None,
                     **kernels):
    model = _clipfast_model(cfg, device, precision, **kernels).compile_blocks(compile_backend)
    opt = _optimizer(model, precision)
    grid = cfg.vision.grid

    def loss_of(b):
        keep = image_keep_indices("random", batch_size, grid, pt.mask, device=device)  # None when mask == 0
        return clip_loss(*model(b.images, b.text, b.cu_seqlens, b.max_len, keep))

    return model, opt, _eager_step(opt, device, precision, loss_of)


# every opt-in kernel on (the kernels columns)
KERNELS = {"layer_norm": "triton", "vision_attention": "triton", "mlp": "triton"}


def clipfast_kernels_step_fn(cfg: ModelConfig, pt, device, precision, batch_size):
    """clipfast's eager step with every opt-in kernel: kernels.layer_norm for every layer norm (kernels.add_layer_norm
    with the residual add before it), kernels.short_attention for the image tower's attention and kernels.linear_gelu
    for every MLP's first layer (set_layer_norm / set_vision_attention / set_mlp("triton")). They run on CUDA;
    elsewhere the model falls back to torch's ops, so the column equals the eager one."""
    return clipfast_step_fn(cfg, pt, device, precision, batch_size, **KERNELS)


def clipfast_compiled_step_fn(cfg: ModelConfig, pt, device, precision, batch_size):
    """clipfast's eager step with every transformer block's non-attention part through torch.compile (inductor):
    CLIP.compile_blocks. Compiles on its first step (untimed warm-up)."""
    import torch._dynamo

    # a grid compiles for several presets, precisions and token counts: past dynamo's limit (8 per function) it
    # would fall back to eager without an error, and the column would time the eager step
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return clipfast_step_fn(cfg, pt, device, precision, batch_size, compile_backend="inductor")


def clipfast_graph_step_fn(cfg: ModelConfig, pt, device, precision, batch_size, **kernels):
    """clipfast's step as CUDA graphs: the same model, loss and fused AdamW (capturable), replayed per text bucket."""
    model = _clipfast_model(cfg, device, precision, **kernels)
    opt = _optimizer(model, precision, capturable=True)
    lr_on_device(opt, device)  # as clipfast.train's graphed step holds it (an LR schedule fills it in place)
    graphed = GraphedTrainStep(model, opt, autocast_dtype=torch.bfloat16 if precision == "amp_bf16" else None,
                               text_bucket=default_text_bucket(batch_size, cfg.text.context_length))
    grid = cfg.vision.grid

    def step(b):
        keep = image_keep_indices("random", batch_size, grid, pt.mask, device=device)  # eager, copied into the graph
        return graphed(b.images, b.text, b.cu_seqlens, keep)

    return model, opt, step


def clipfast_graph_kernels_step_fn(cfg: ModelConfig, pt, device, precision, batch_size):
    """clipfast's CUDA-graph step with every opt-in kernel (as clipfast_kernels_step_fn): the kernels' device time
    without their Python launch cost, which the eager step pays per call."""
    return clipfast_graph_step_fn(cfg, pt, device, precision, batch_size, **KERNELS)


def _single_process_dist(device) -> None:
    """torch.distributed with one rank (what `deepspeed.initialize` needs) unless a launcher already set it up."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import deepspeed

    from clipfast.launch import one_rank_env

    one_rank_env()  # the trainer's own defaults: rank 0 of 1 on a free local port
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def clipfast_ds_step_fn(cfg: ModelConfig, pt, device, precision, batch_size):
    """clipfast's step through DeepSpeed's engine, built as clipfast.train builds it (same config and optimizer
    functions: param groups, fused AdamW, gradient clipping, ZeRO stage 0 on one rank; bf16 on CUDA): the trainer's
    own step."""
    import deepspeed

    from clipfast.build import deepspeed_config, make_optimizer, trainer_clip
    from clipfast.config import TrainConfig
    from clipfast.loss import distributed_clip_loss
    from clipfast.optim import clipped_step

    _single_process_dist(device)
    tc = TrainConfig(batch_size=batch_size, lr=1e-5, lr_scaled_by_batch=False)
    model = CLIP(cfg).train()
    opt = make_optimizer(model, tc)
    bf16 = device.type == "cuda"
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(tc, 1, bf16=bf16))
    engine.enable_backward_allreduce = False  # as clipfast.train on one rank
    clip = trainer_clip(tc, 1, bf16)  # as clipfast.train: float32 clips inside the fused AdamW
    params = list(model.parameters())
    grid = cfg.vision.grid

    def step(b):
        keep = image_keep_indices("random", batch_size, grid, pt.mask, device=device)
        img, txt, scale = engine(b.images, b.text, b.cu_seqlens, b.max_len, keep=keep)
        loss = distributed_clip_loss(img, txt, scale)
        engine.backward(loss)
        with clipped_step(engine.optimizer, params, clip):
            engine.step()
        return loss.detach()

    return engine.module, opt, step


def open_clip_kwargs(cfg: ModelConfig, mask: float) -> dict:
    """open_clip.model.CLIP kwargs of cfg's architecture, with patch_dropout keeping clipfast's num_kept patches
    (open_clip keeps int(N * (1 - p)), clipfast round(N * (1 - mask)): p is chosen so both give K)."""
    from clipfast.interop import open_clip_cfg

    kw = open_clip_cfg(cfg)
    n = cfg.vision.num_patches
    k = num_kept(n, mask)
    if k < n:
        kw["vision_cfg"]["patch_dropout"] = 1.0 - (k + 0.5) / n
    return kw


def open_clip_step_fn(cfg: ModelConfig, pt, device, precision, batch_size):
    import open_clip

    with torch.device(device):
        model = open_clip.model.CLIP(**open_clip_kwargs(cfg, pt.mask)).train()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    opt = _optimizer(model, precision)
    loss_fn = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True)

    return model, opt, _eager_step(opt, device, precision, lambda b: loss_fn(*model(b.pixels, b.padded)))


# every column's step builder, by implementation name: (cfg, point, device, precision, batch) -> (model, opt, step)
BUILDERS = {"clipfast": clipfast_step_fn, "clipfast_compiled": clipfast_compiled_step_fn,
            "clipfast_kernels": clipfast_kernels_step_fn, "clipfast_graph": clipfast_graph_step_fn,
            "clipfast_graph_kernels": clipfast_graph_kernels_step_fn,
            "clipfast_ds": clipfast_ds_step_fn, "open_clip": open_clip_step_fn}
