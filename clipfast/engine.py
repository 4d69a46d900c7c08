"""Training without DeepSpeed (`engine="torch"`): the part of DeepSpeedEngine that clipfast.train uses.

On one rank DeepSpeed has nothing to partition or reduce, and its engine still adds per-step work (hooks,
bucketed copies, per-parameter norms: on the demo model on CPU the engine's step took 24.5 ms where the same
model, loss and fused AdamW took ~21 ms eagerly); and DeepSpeed's step cannot be captured as a CUDA graph.
TorchEngine runs the same step with plain PyTorch:

- precision as DeepSpeed's: bf16 weights and activations with fp32 masters (clipfast.optim.MasterAdamW) when
  bf16, else fp32 weights with fused AdamW; the same param groups, LR schedule and gradient clipping;
- `cuda_graph=True` (CUDA only): the whole step - forward, loss, backward, clipping, AdamW - is replayed as CUDA
  graphs (clipfast.graph.GraphedTrainStep, text padded to buckets); the learning rate lives in a device
  tensor that the scheduler updates in place, so the graphs follow the schedule;
- several ranks (`world` > 1): data parallelism with the whole model and optimizer state on every rank (ZeRO stage
  0, as DDP; clipfast.dp): the ranks start from rank 0's weights and average their gradients, bucket by bucket during
  the backward (overlap_reduce) or after it, inside the graph where the step is one; the optimizer's update inside
  the backward (overlap_optimizer) is off, since it would update before the average;
- checkpoints: `save_checkpoint(dir, tag, client_state)` writes dir/tag/state.pt (model, optimizer, scheduler,
  client state) and dir/latest, as DeepSpeed lays them out (on several ranks rank 0 writes the one copy: every rank
  holds the same state, so the layout is one rank's, clipfast.reshard); `load_checkpoint(dir)` reads the latest back.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from clipfast.config import check_choice
from clipfast.dp import OverlappedAverage, average_gradients, broadcast_module, reduced_backward
from clipfast.graph import GraphedTrainStep, default_text_bucket, lr_on_device
from clipfast.layers import LAYER_NORMS, MLPS, VISION_ATTENTIONS
from clipfast.optim import MasterAdamW, clipped_step, run_as_own

log = logging.getLogger("clipfast.engine")


class TorchEngine:
    def __init__(self, model, cfg, device: torch.device, bf16: bool, cuda_graph: bool = False, world: int = 1):
        from clipfast.build import lr_lambda, make_optimizer, param_groups

        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=true needs a CUDA device (CUDA graphs); this run is on "
                             f"{device.type}: set cuda_graph=false")
        self.module = model.to(device)
        self.cfg, self.device, self.bf16, self.world = cfg, device, bf16, world
        self.rank = dist.get_rank() if world > 1 else 0
        if world > 1:  # before the optimizer copies the weights into its masters
            broadcast_module(self.module)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # the eager step's all-reduce inside the backward (the graphed step has its own: GraphedTrainStep)
        self.reducer = OverlappedAverage(self.params, world) if world > 1 and not cuda_graph and \
            getattr(cfg, "overlap_reduce", True) else None
        self._grad_sums: dict = {}  # float32 gradient sums over a step's passes (backward, bf16)
        kw = dict(lr=cfg.effective_lr(), betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
        if cuda_graph:
            kw["capturable"] = True
        if bf16:
            self.module.to(torch.bfloat16)
            self.optimizer = MasterAdamW(param_groups(self.module, cfg.weight_decay), **kw)
            inner = self.optimizer.opt
        else:  # make_optimizer's AdamW (capturable for graphs)
            self.optimizer = make_optimizer(self.module, cfg) if not cuda_graph else \
                torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), **kw)
            inner = self.optimizer
        if cuda_graph:  # a device tensor the graphs read, filled in place by the scheduler
            lr_on_device(inner, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lr_lambda(cfg))
        self.graph = None
        if cuda_graph:
            ctx = self.module.context_length
            accum = max(1, getattr(cfg, "accum_steps", 1))
            self.graph = GraphedTrainStep(self.module, self.optimizer, autocast_dtype=None,
                                          text_bucket=default_text_bucket(cfg.batch_size // world // accum, ctx),
                                          clip_grad_norm=cfg.grad_clip or None,
                                          overlap_optimizer=resolve_overlap_optimizer(cfg, device, world), world=world,
                                          accum_steps=accum, overlap_reduce=getattr(cfg, "overlap_reduce", True))

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """loss.backward(). Several passes before a step (clipfast.accum; last=False but for the last) sum bf16
        weights' gradients in float32, rounded to bf16 once after the last, as DeepSpeed's bf16 mode sums them. On
        several ranks the last pass ends with every gradient averaged over the ranks: during its backward where the
        pass's gradients are the step's (overlap_reduce; not after bf16 sums), else after it."""
        overlap = self.reducer is not None and last and not (self.bf16 and self._grad_sums)
        reduced_backward(loss, self.reducer if overlap else None)
        if self.bf16 and (self._grad_sums or not last):
            self._sum_passes(last)
        if overlap:
            self.reducer.finish()
        elif last:
            average_gradients(self.params, self.world)

    def _sum_passes(self, last: bool) -> None:
        for p in self.module.parameters():
            if p.grad is None:
                continue
            if p in self._grad_sums:
                self._grad_sums[p].add_(p.grad)
            else:
                self._grad_sums[p] = p.grad.float()
            p.grad = None
        if last:
            for p, total in self._grad_sums.items():
                p.grad = total.to(p.dtype)
            self._grad_sums.clear()

    def step(self) -> None:
        with clipped_step(self.optimizer, list(self.module.parameters()), self.cfg.grad_clip):  # fp32: in AdamW
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def graph_step(self, images, text, cu_seqlens, keep=None, cu_host=None) -> torch.Tensor:
        """cuda_graph=True: one whole step replayed (captured on a new text bucket); returns the loss. cu_host: the
        cu_seqlens on the host (accum_steps > 1 splits the text there without a sync)."""
        loss = self.graph(images, text, cu_seqlens, keep, cu_host=cu_host).clone()  # overwritten by the next step
        self.scheduler.step()
        return loss

    # --- checkpoints (DeepSpeed's layout: dir/<tag>/..., dir/latest holds the tag)
    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        """Rank 0 writes the state (every rank holds the same); on several ranks every rank returns once it is
        written, as from DeepSpeed's save_checkpoint."""
        if self.rank == 0:
            path = Path(ckpt_dir) / tag
            path.mkdir(parents=True, exist_ok=True)
            state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "client_state": client_state}
            torch.save(state, path / "state.tmp")
            os.replace(path / "state.tmp", path / "state.pt")  # a crash mid-write leaves the previous checkpoint
            (Path(ckpt_dir) / "latest").write_text(tag)
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, ckpt_dir: str) -> tuple[str, dict]:
        tag = (Path(ckpt_dir) / "latest").read_text().strip()
        path = Path(ckpt_dir) / tag / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{ckpt_dir}/latest names {tag!r}, but {path} is missing")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.load_state(state)
        return str(path), state["client_state"]

    def load_state(self, state: dict) -> None:
        """What save_checkpoint wrote (module, optimizer, scheduler), into this engine."""
        self.module.load_state_dict(state["module"])
        opt = state["optimizer"]  # MasterAdamW keeps its own run flags; a plain AdamW is told to (run_as_own)
        if not isinstance(self.optimizer, MasterAdamW):
            opt = run_as_own(opt, self.optimizer)
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.graph is not None:  # load_state_dict put the saved lr back, not the tensors the graphs read
            lr_on_device(self.optimizer, self.device)
            self.graph.graphs.clear()  # captured against the old lr tensors: capture again


TOWER_STREAMS = ("auto", "off", "on")


def resolve_tower_streams(cfg, device) -> bool:
    """Whether the text tower runs on its own CUDA stream (CLIP.set_tower_streams). "auto": with engine=torch on
    CUDA, eager or graphed. On an H100 (bench/results/nvidia-h100-80gb-hbm3-2026-11-26-c9d6f1c) the graphed step
    with the kernels went from 70.1 to 67.1 ms at B/16 112 px / 16 tokens and from 80.5 to 79.4 ms at L/16 96 px /
    8 tokens, the eager one with the kernels from 94.9 to 80.3 ms (B/16). Off under DeepSpeed: its gradient hooks
    with a second stream are untried on a GPU. Off on the CPU, where there are no streams."""
    value = check_choice(cfg, "tower_streams", TOWER_STREAMS)
    if torch.device(device).type != "cuda":
        if value == "on":
            log.warning("tower_streams=on is off on %s: streams are CUDA's", torch.device(device).type)
        return False
    return value == "on" or (value == "auto" and getattr(cfg, "engine", "deepspeed") == "torch")


OVERLAP_OPTIMIZER = ("auto", "off", "on")


def resolve_overlap_optimizer(cfg, device, world: int = 1) -> bool | None:
    """GraphedTrainStep's overlap_optimizer for the config: None for "auto" (on where it can be: MasterAdamW's
    Triton step, i.e. bf16 weights, and no clipping), True for "on", False for "off". "on" where it cannot be is an
    error naming the keys to change; a bad value lists the choices."""
    value = check_choice(cfg, "overlap_optimizer", OVERLAP_OPTIMIZER)
    if value == "on":
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.device(device).type == "cuda")
        need = [what for what, ok in (("engine=torch cuda_graph=true", cfg.engine == "torch" and cfg.cuda_graph),
                                      ("bf16 weights (precision=bf16 or auto on CUDA)", bf16),
                                      (f"grad_clip=0 (is {cfg.grad_clip}: clipping needs the global norm before any "
                                       "update)", not cfg.grad_clip),
                                      (f"accum_steps=1 (is {cfg.accum_steps}: the update comes after the last pass)",
                                       cfg.accum_steps == 1),
                                      (f"one rank (this launch has {world}: each parameter would be updated before its "
                                       "gradient is averaged over the ranks)", world == 1)) if not ok]
        if need:
            raise ValueError(f"overlap_optimizer=on needs {'; '.join(need)}")
    return {"auto": None, "on": True, "off": False}[value]


def check_engine(cfg, world: int) -> None:
    """engine is "deepspeed" or "torch"; cuda_graph needs engine="torch"."""
    if cfg.engine not in ("deepspeed", "torch"):
        raise ValueError(f"engine must be 'deepspeed' or 'torch', got {cfg.engine!r}")
    if cfg.cuda_graph and cfg.engine != "torch":
        raise ValueError("cuda_graph=true needs engine=torch (DeepSpeed's engine step cannot be captured)")



# the opt-in kernels' config keys: the model's (plain choice, kernel choice)
KERNEL_KEYS = {"layer_norm": LAYER_NORMS, "vision_attention": VISION_ATTENTIONS, "mlp": MLPS}


def resolve_kernels(cfg, device) -> dict:
    """{key: choice} for layer_norm, vision_attention and mlp; "auto" becomes the kernel when the step runs as CUDA
    graphs on CUDA (engine=torch cuda_graph=true), the plain op otherwise; the other choices pass as given, and
    anything else is an error that lists them.

    Why "auto" is tied to graphs: on an H100 (bench/results/nvidia-h100-80gb-hbm3-2026-11-26-dab88c7) the kernels made
    the B/16 112 px / 16-token graphed step 1.18x faster (92.2 -> 78.4 ms) but the eager step only 1.01x, and the
    eager B/16 224 px step 0.88x: each Triton launch costs more host time than the torch op it replaces, which an
    eager step with many small kernels pays and a graph replay does not.
    """
    use = bool(getattr(cfg, "cuda_graph", False)) and torch.device(device).type == "cuda"
    out = {}
    for key, pair in KERNEL_KEYS.items():
        value = getattr(cfg, key)
        if value not in ("auto", *pair):
            raise ValueError(f"{key} must be one of {('auto', *pair)}, got {value!r}")
        out[key] = (pair[1] if use else pair[0]) if value == "auto" else value
    return out
