"""What a run is built from: the model of a config, the optimizer (AdamW over decay / no-decay groups, its warmup-cosine
schedule), the engine (DeepSpeed's ZeRO or clipfast.engine's TorchEngine) with what resuming needs, and the device's
peak for MFU. clipfast.train builds each run with these; bench/throughput.py and clipfast.engine take the same.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from clipfast import presets, reshard
from clipfast.accum import check_accum
from clipfast.checkpoint import load_weights
from clipfast.config import TrainConfig
from clipfast.data.augment import check_augment
from clipfast.engine import TorchEngine, check_engine, resolve_kernels, resolve_overlap_optimizer, resolve_tower_streams
from clipfast.model import CLIP
from clipfast.slip import check_ssl

log = logging.getLogger("clipfast.train")

# Parameters that get no weight decay: biases, norms, embeddings and the temperature (CLIP/open_clip practice).
NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: CLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over param_groups. fused: one kernel over all tensors (CUDA and CPU, torch >= 2.4); the demo model on
    CPU under ZeRO-1: 36 vs 69 ms per engine.step() against the default for-each loop. Under ZeRO or bf16 it runs
    over DeepSpeed's fp32 partitions."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.effective_lr(), betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=True)


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine to min_lr; a multiplier of the peak LR."""
    peak = cfg.effective_lr()
    floor = cfg.min_lr / peak if peak > 0 else 0.0

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def zero_stage(cfg: TrainConfig, world: int) -> int:
    """cfg.zero_stage, except on one rank, where ZeRO partitions nothing and its bucketed copies only cost time
    (the demo model on CPU: 62 vs 23 ms of backward + optimizer step per step with fused AdamW): stage 0 there."""
    return cfg.zero_stage if world > 1 else 0


def clips_in_optimizer(world: int, bf16: bool) -> bool:
    """One rank in float32: DeepSpeed (ZeRO stage 0, no loss scaling) steps the client optimizer itself, so the
    trainer clips inside its fused AdamW (clipfast.optim.clipped_step) and DeepSpeed does not clip: its per-tensor
    norm and multiply passes cost 44 ms of ViT-S/16's 406 ms step on the CPU. Elsewhere DeepSpeed's optimizer
    wrappers (ZeRO, bf16) own the gradients and clip them."""
    return world == 1 and not bf16


def trainer_clip(cfg: TrainConfig, world: int, bf16: bool) -> float:
    """The max norm the trainer clips to around DeepSpeed's engine.step() (clipfast.optim.clipped_step): cfg.grad_clip
    where clips_in_optimizer, else 0 (DeepSpeed clips, or engine=torch clips in its own step)."""
    return cfg.grad_clip if cfg.engine != "torch" and clips_in_optimizer(world, bf16) else 0.0


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict:
    check_accum(cfg, world)  # (the batch split over the ranks and the micro-batches)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // world // cfg.accum_steps,
        "gradient_accumulation_steps": cfg.accum_steps,  # clipfast.accum's passes, each backward its own
        # set explicitly (DeepSpeed's default is no clipping), unless the trainer clips in the optimizer
        "gradient_clipping": 0.0 if clips_in_optimizer(world, bf16) else cfg.grad_clip,
        "zero_optimization": {"stage": zero_stage(cfg, world)},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("4090", 165), ("A10", 125)):
        if key in name:
            return tflops * 1e12
    return None


def build_model(cfg: TrainConfig, device: torch.device, is_main: bool = True) -> tuple[CLIP, object, int]:
    """The model of cfg (preset, sizes, kernels, init_from, compile): (model, its ModelConfig, text length)."""
    text_len = cfg.text_len or presets.from_name(cfg.model).text.context_length
    mcfg = presets.from_name(cfg.model, **{"text.context_length": max(text_len, 2)})
    if cfg.image_size:
        mcfg.vision.image_size = cfg.image_size
    mcfg.grad_checkpointing = cfg.grad_checkpointing
    check_augment(cfg.augment)
    check_ssl(cfg)
    impls = resolve_kernels(cfg, device)  # "auto": the Triton kernels when the step is a CUDA graph
    model = CLIP(mcfg, kernels=cfg.kernels).set_layer_norm(impls["layer_norm"])
    model.set_vision_attention(impls["vision_attention"]).set_mlp(impls["mlp"])
    model.set_tower_streams(resolve_tower_streams(cfg, device))
    resolve_overlap_optimizer(cfg, device)  # a bad value or an "on" that cannot be is an error now (the rank count:
    # when TorchEngine builds the graphed step), not at the step
    if is_main:
        log.info("layer_norm=%s vision_attention=%s mlp=%s tower_streams=%s", impls["layer_norm"],
                 impls["vision_attention"], impls["mlp"], model.tower_streams)
    if cfg.ssl_weight:  # SLIP (clipfast.slip)
        model.add_ssl_head(cfg.ssl_hidden, cfg.ssl_dim)
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    if cfg.compile:
        model.compile_blocks("inductor")
        if is_main:
            log.info("compile=true: transformer blocks go through torch.compile (inductor) on the first step")
    return model, mcfg, text_len


@dataclasses.dataclass
class Run:
    """The engine (DeepSpeed's or TorchEngine) and what resuming needs: the trainable parameters' names in the
    optimizer's order, this run's layout and the resume plan (clipfast.reshard.resume_plan)."""

    engine: object
    scheduler: object
    names: list[str]
    layout: reshard.Layout
    plan: reshard.Plan | None


def build_engine(cfg: TrainConfig, model: CLIP, device: torch.device, world: int, bf16: bool, ckpt_dir: Path) -> Run:
    check_engine(cfg, world)
    check_accum(cfg, world)
    if cfg.engine == "torch":
        layout = reshard.Layout(0, bf16, 1, engine="torch")
    else:
        layout = reshard.Layout(zero_stage(cfg, world), bf16, world)
    # both engines' optimizers number their parameters as param_groups lists them
    names = reshard.optimizer_names(model, param_groups(model, cfg.weight_decay))
    plan = reshard.resume_plan(ckpt_dir, layout) if cfg.resume else None
    if cfg.engine == "torch":  # plain PyTorch, data parallel on several ranks, CUDA graphs optional (clipfast.engine)
        engine = TorchEngine(model, cfg, device, bf16, cuda_graph=cfg.cuda_graph, world=world)
        return Run(engine, engine.scheduler, names, layout, plan)
    import deepspeed

    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if layout.stage != cfg.zero_stage:
        log.info("one rank: ZeRO stage %d would partition nothing, running stage 0", cfg.zero_stage)
    ds_cfg = deepspeed_config(cfg, world, bf16)
    if plan and plan.convert and layout.stage:  # ZeRO loads the universal checkpoint itself
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_cfg)
    undo_init_step(engine.optimizer)
    if world == 1:  # one rank: the all-reduce would only flatten and copy back every gradient (demo, CPU:
        engine.enable_backward_allreduce = False  # 26.5 vs 24.5 ms per step)
    return Run(engine, scheduler, names, layout, plan)


def undo_init_step(opt) -> None:
    """DeepSpeed's bf16 optimizer at stage 0 (FP16_UnfusedOptimizer) makes its AdamW state by stepping once with zero
    gradients at initialize: every step count began at 1, and the fp32 masters were decayed once by (1 - lr * wd).
    The first real step was then AdamW's second: its bias corrections 1 - beta^2 made the first update
    (1 + b2)^0.5 / (1 + b1) = 0.74 of AdamW's at betas (0.9, 0.98). Undone here: the counts back to 0 and the masters
    back to the weights they were copied from (bf16 values then, so exactly). Other optimizers: nothing to do."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(opt, FP16_UnfusedOptimizer):
        return
    with torch.no_grad():
        for low, masters in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            for p, m in zip(low, masters, strict=True):
                m.copy_(p.reshape(m.shape))
        for st in opt.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"].zero_()
            elif "step" in st:
                st["step"] = 0
