"""Resuming a checkpoint on another number of ranks, ZeRO stage, precision or engine.

A checkpoint is laid out by the run that wrote it, and clipfast.train picks that layout from the world size
(`zero_stage` runs only on several ranks; one rank runs stage 0), the precision and the engine:
  DeepSpeed, ZeRO stages 1 to 3: each rank's slice of the flat fp32 masters and AdamW moments in a file of its own
      (zero_pp_rank_R_mp_rank_00_optim_states.pt; stage 3 a model-states file per rank too, its weights partitioned);
  DeepSpeed, stage 0: the whole optimizer state in mp_rank_00_model_states.pt, per parameter; in float32 the client
      optimizer's state (the fp32 weights are the module's), in bf16 DeepSpeed's FP16_UnfusedOptimizer's (fp32
      masters in `fp32_groups`, the client optimizer's moments beside them);
  engine=torch (clipfast.engine.TorchEngine, one rank, the CUDA-graph step): state.pt, per parameter too (bf16:
      MasterAdamW's masters and the AdamW over them).
Each loader takes only the layout it wrote. A run that grows from one GPU to eight, or from one node to two, failed
at resume: two ZeRO-1 ranks resumed on three raised DeepSpeed's "The checkpoint being loaded used a DP world size of
2 but the current world size is 3", resumed on one rank (stage 0) an AttributeError ('NoneType' object has no
attribute 'copy') in torch's Optimizer.load_state_dict, and a single-GPU engine=torch run could not go on under
DeepSpeed at all.

Here, when the layouts differ, the checkpoint goes through DeepSpeed's universal checkpoint first: a folder per
parameter holding its fp32 master, exp_avg, exp_avg_sq and step (`<tag>_universal/zero/<name>/*.pt`), which no rank
count shapes. ZeRO checkpoints are converted by DeepSpeed's ds_to_universal (a stage-3 one then rewritten into the
stages-1/2 form, unless it resumes under stage 3 again), the one-piece ones here (DeepSpeed has no converter for
them).
Loading: ZeRO stages 1, 2 and 3 take the universal checkpoint themselves (`checkpoint.load_universal` in the
DeepSpeed config); stage 0 and engine=torch are loaded here. Every value moves as it is: fp32 masters, moments
and step counts are copied, not recomputed, so a resharded run continues from the same optimizer state
(tests/test_reshard.py compares the full state of each layout after loading, parameter by parameter). The universal
folder is removed once every rank has loaded it. Stage 3 takes only a stage-3 checkpoint (on any number of ranks):
its universal loader reads a form of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from clipfast.optim import run_as_own

log = logging.getLogger(__name__)

MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's
STAGE3_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # its ZeRO stage 3 (one per rank)
TORCH_FILE = "state.pt"  # TorchEngine's
MOMENTS = ("exp_avg", "exp_avg_sq")
# the keys of DeepSpeed's model-states file that are not the client state (engine._load_checkpoint's list)
DEEPSPEED_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                  "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                  "checkpoint_parallel_dimensions", "ds_config", "ds_version", "universal_checkpoint_info")


@dataclass(frozen=True)
class Layout:
    """How a run keeps its optimizer state: its engine ("deepspeed" or "torch"), ZeRO `stage`, bf16 or float32, over
    `world` ranks. Stage 0 keeps the whole state on every rank, so its world size does not matter."""

    stage: int
    bf16: bool
    world: int
    engine: str = "deepspeed"

    def key(self) -> tuple:
        return (self.engine, self.stage, self.bf16, self.world if self.stage else None)

    def __str__(self) -> str:
        precision = "bf16" if self.bf16 else "float32"
        if self.engine == "torch":
            return f"engine=torch, {precision}"
        where = f" on {self.world} rank{'s' if self.world > 1 else ''}" if self.stage else ""
        return f"ZeRO stage {self.stage}, {precision}{where}"


def saved_layout(tag_dir: Path) -> Layout:
    """The layout of the checkpoint in tag_dir: a TorchEngine one's from its optimizer state (MasterAdamW's holds
    masters: bf16), a DeepSpeed one's from the config and world size it saved."""
    tag_dir = Path(tag_dir)
    if (tag_dir / TORCH_FILE).is_file():
        opt = torch.load(tag_dir / TORCH_FILE, map_location="cpu", weights_only=False, mmap=True)["optimizer"]
        return Layout(stage=0, bf16="master" in opt, world=1, engine="torch")
    path = tag_dir / MODEL_FILE
    if not path.is_file():
        path = tag_dir / STAGE3_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir} holds neither {MODEL_FILE} (DeepSpeed) nor {TORCH_FILE} (engine=torch): "
                                f"not a clipfast checkpoint")
    sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    cfg = sd.get("ds_config") or {}
    return Layout(stage=int(cfg.get("zero_optimization", {}).get("stage", 0)),
                  bf16=bool(cfg.get("bf16", {}).get("enabled", False)), world=int(sd.get("dp_world_size", 1)))


def needs_conversion(saved: Layout, current: Layout) -> bool:
    """Whether a checkpoint of layout `saved` must go through the universal checkpoint to resume as `current`;
    a ValueError where it cannot (stage 3 from another stage)."""
    if saved.key() == current.key():
        return False
    if current.stage == 3 and saved.stage != 3:
        raise ValueError(f"the checkpoint was saved with {saved} and this run is {current}: only a ZeRO stage 3 "
                         f"checkpoint resumes under stage 3 (with any number of ranks); resume this one with "
                         f"zero_stage=1 or 2, or as it was saved")
    return True


def optimizer_names(model: torch.nn.Module, groups: list[dict]) -> list[str]:
    """The parameter names in the order of `groups`' parameters (clipfast.build.param_groups): the order in which a
    stage-0 optimizer numbers its state."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in groups for p in g["params"]]


def _save_param(folder: Path, key: str, value: torch.Tensor) -> None:
    """As ds_to_universal saves a tensor: fp32, a 0-d one (logit_scale) as shape (1,), which its loader chunks."""
    value = value.detach().float().cpu().contiguous()
    torch.save({"param": value.reshape(1) if value.dim() == 0 else value, "cat_dim": 0}, folder / f"{key}.pt")


def to_universal(tag_dir: Path, out_dir: Path, names: list[str], target: Layout | None = None) -> None:
    """Write the universal checkpoint of the checkpoint in tag_dir into out_dir, for a run of layout `target`.
    `names`: the trainable parameters in the optimizer's order (optimizer_names), which numbers a one-piece optimizer
    state."""
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    layout = saved_layout(tag_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if layout.stage:
        _zero_to_universal(tag_dir, out_dir)
        if layout.stage == 3 and (target is None or target.stage != 3):
            _stage3_as_stage12(out_dir)
    else:
        _write_universal(_read_single(tag_dir, layout, names), out_dir, names)


def _zero_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal, in this process (one worker: no process pool), its prints at debug level."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ds_to_universal.main(args)
    log.debug("ds_to_universal: %s", printed.getvalue())
    (out_dir.parent / "latest_universal").unlink(missing_ok=True)  # written beside out_dir; the tag is passed


def _one_step(states) -> torch.Tensor | None:
    """The AdamW step count of a ZeRO optimizer's flat groups (their states), where they all hold the same one."""
    steps = {float(st["step"]) for st in states.values() if "step" in st}
    return torch.tensor(steps.pop()) if len(steps) == 1 else None


def _stage3_as_stage12(out_dir: Path) -> None:
    """ds_to_universal writes a stage-3 checkpoint in a form of its own, which only stage 3 loads: bare tensors per
    parameter, the step count in zero/optimizer_state.pt beside all the flat fp32 groups, and one model-states file
    per rank. Rewritten in the stages-1/2 form that the other loaders read: {"param": tensor} files, a step.pt per
    parameter, the hyper-parameters and ds_version in optimizer_state.pt, mp_rank_00_model_states.pt."""
    zero = out_dir / "zero"
    sd = torch.load(zero / "optimizer_state.pt", weights_only=False)
    model = torch.load(out_dir / STAGE3_MODEL_FILE, map_location="cpu", weights_only=False)
    step = _one_step(sd["optimizer_state_dict"]["state"])
    for folder in (f for f in zero.iterdir() if f.is_dir()):
        for file in folder.glob("*.pt"):
            value = torch.load(file, weights_only=False)
            if isinstance(value, torch.Tensor):
                torch.save({"param": value, "cat_dim": 0}, file)
        if step is not None and (folder / "exp_avg.pt").is_file():
            torch.save(step, folder / "step.pt")
    torch.save({"ds_version": model["ds_version"], "param_groups": sd["param_groups"],
                **{k: sd[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in sd}},
               zero / "optimizer_state.pt")
    shutil.copy2(out_dir / STAGE3_MODEL_FILE, out_dir / MODEL_FILE)


@dataclass
class OnePiece:
    """A whole optimizer state as stage 0 and engine=torch keep it: the module's state_dict, the fp32 masters and a
    torch optimizer state_dict over them (state numbered in the masters' order), the LR scheduler's state, the
    client state (the step) and DeepSpeed's counters (global_steps, ...: the model-states file's other keys)."""

    module: dict
    masters: list
    optimizer: dict
    scheduler: dict | None
    client: dict
    counters: dict


def _read_single(tag_dir: Path, layout: Layout, names: list[str]) -> OnePiece:
    if layout.engine == "torch":
        sd = torch.load(tag_dir / TORCH_FILE, map_location="cpu", weights_only=False)
        opt = sd["optimizer"]
        osd, masters = (opt["opt"], opt["master"]) if layout.bf16 else (opt, [sd["module"][n] for n in names])
        step = int(sd["client_state"]["step"])
        piece = OnePiece(sd["module"], masters, osd, sd["scheduler"], sd["client_state"],
                         {"global_steps": step, "skipped_steps": 0, "dp_world_size": 1, "mp_world_size": 1})
    else:
        sd = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=False)
        opt = sd["optimizer"]
        if opt is None:
            raise ValueError(f"{tag_dir / MODEL_FILE} holds no optimizer state")
        osd = opt["optimizer_state_dict"] if layout.bf16 else opt  # FP16_Optimizer's, or the client optimizer's
        masters = [t for g in opt["fp32_groups"] for t in g] if layout.bf16 else [sd["module"][n] for n in names]
        piece = OnePiece(sd["module"], masters, osd, sd.get("lr_scheduler"),
                         {k: v for k, v in sd.items() if k not in DEEPSPEED_KEYS},
                         {k: v for k, v in sd.items() if k in DEEPSPEED_KEYS and k not in ("module", "optimizer",
                                                                                            "lr_scheduler")})
    numbered = [i for g in osd["param_groups"] for i in g["params"]]
    if len(numbered) != len(names) or len(masters) != len(names):
        raise ValueError(f"{tag_dir}: the optimizer state holds {len(numbered)} parameters, this model trains "
                         f"{len(names)}")
    for i, name, master in zip(numbered, names, masters, strict=True):
        if master.numel() != piece.module[name].numel():  # (FP16_Optimizer keeps a 0-d one as shape (1,))
            raise ValueError(f"{tag_dir}: parameter {i} of the optimizer has shape {tuple(master.shape)}, the model's "
                             f"{name} {tuple(piece.module[name].shape)}")
    piece.optimizer = {"state": {pos: osd["state"][i] for pos, i in enumerate(numbered) if i in osd["state"]},
                       "param_groups": osd["param_groups"]}  # state renumbered by position
    return piece


def _write_universal(piece: OnePiece, out_dir: Path, names: list[str]) -> None:
    """Per parameter its fp32 master, exp_avg, exp_avg_sq and step, as ds_to_universal writes them; the optimizer's
    hyper-parameters in zero/optimizer_state.pt and a model-states file (module, scheduler, counters, client state)
    for DeepSpeed's loader."""
    zero = out_dir / "zero"
    for name, tensor in piece.module.items():  # the module's weights (and any frozen one) first
        (zero / name).mkdir(parents=True, exist_ok=True)
        _save_param(zero / name, "fp32", tensor)
    for pos, (name, master) in enumerate(zip(names, piece.masters, strict=True)):
        _save_param(zero / name, "fp32", master)
        st = piece.optimizer["state"].get(pos, {})
        for key in MOMENTS:
            if key in st:
                _save_param(zero / name, key, st[key])
        if "step" in st:
            torch.save(torch.as_tensor(st["step"], dtype=torch.float32).cpu(), zero / name / "step.pt")
    import deepspeed

    groups = [{k: v for k, v in g.items() if k != "params"} for g in piece.optimizer["param_groups"]]
    torch.save({"ds_version": deepspeed.__version__, "param_groups": groups}, zero / "optimizer_state.pt")
    torch.save({**piece.counters, **piece.client, "module": piece.module, "optimizer": None,
                "lr_scheduler": piece.scheduler, "ds_version": deepspeed.__version__}, out_dir / MODEL_FILE)


def _read_universal(uni_dir: Path, names: list[str]) -> OnePiece:
    """A universal checkpoint as one piece, for the trainable parameters `names` in the optimizer's order."""
    uni_dir = Path(uni_dir)
    sd = torch.load(uni_dir / MODEL_FILE, map_location="cpu", weights_only=False)
    zero = uni_dir / "zero"
    masters, state = [], {}
    for pos, name in enumerate(names):
        folder = zero / name
        if not (folder / "fp32.pt").is_file():
            raise FileNotFoundError(f"{folder / 'fp32.pt'} is missing: the checkpoint has no parameter {name}")
        masters.append(torch.load(folder / "fp32.pt", weights_only=False)["param"])
        st = {k: torch.load(folder / f"{k}.pt", weights_only=False)["param"] for k in MOMENTS
              if (folder / f"{k}.pt").is_file()}
        if (folder / "step.pt").is_file():
            st["step"] = torch.as_tensor(torch.load(folder / "step.pt", weights_only=False), dtype=torch.float32)
        if st:
            state[pos] = st
    groups = torch.load(zero / "optimizer_state.pt", weights_only=False)["param_groups"]
    return OnePiece(sd["module"], masters, {"state": state, "param_groups": groups}, sd.get("lr_scheduler"),
                    {k: v for k, v in sd.items() if k not in DEEPSPEED_KEYS},
                    {k: sd[k] for k in ("global_steps", "global_samples", "skipped_steps") if k in sd})


def _optimizer_state(piece: OnePiece, optimizer, shaped_as: list) -> dict:
    """piece's optimizer state for `optimizer` (a torch optimizer over `shaped_as`, in names' order): its own
    parameter numbering, the saved hyper-parameters, each tensor in its parameter's shape. (Its run flags stay its
    own: the loaders pass it through clipfast.optim.run_as_own.)"""
    current = optimizer.state_dict()["param_groups"]
    saved = piece.optimizer["param_groups"]
    if len(saved) != len(current):
        raise ValueError(f"the checkpoint has {len(saved)} parameter groups, this optimizer {len(current)}")
    groups = [{**s, "params": c["params"]} for s, c in zip(saved, current, strict=True)]
    state = {pos: {k: (v if k == "step" else v.reshape(shaped_as[pos].shape)) for k, v in st.items()}
             for pos, st in piece.optimizer["state"].items()}
    return {"state": state, "param_groups": groups}


def _client_optimizer(engine, layout: Layout):
    """The torch optimizer of a one-piece engine, over its fp32 masters: DeepSpeed's bf16 FP16_Optimizer and
    TorchEngine's bf16 MasterAdamW each wrap one; in float32 the engine's optimizer is it, over the module's weights."""
    if not layout.bf16:
        return engine.optimizer
    return engine.optimizer.opt if layout.engine == "torch" else engine.optimizer.optimizer


def load_single(uni_dir: Path, engine, names: list[str], layout: Layout) -> dict:
    """Load a universal checkpoint into a one-piece engine (DeepSpeed stage 0, or TorchEngine): the module's weights,
    the fp32 masters, the optimizer's moments, steps and hyper-parameters, the LR scheduler's state, DeepSpeed's
    counters. Returns the client state."""
    piece = _read_universal(uni_dir, names)
    module = engine.module
    params = dict(module.named_parameters())
    for n, m in zip(names, piece.masters, strict=True):
        if m.numel() != params[n].numel():
            raise ValueError(f"the checkpoint's {n} has {m.numel()} elements, this run's model {tuple(params[n].shape)}"
                             f": resume needs the model and sizes it was saved with (model, image_size, text_len); to "
                             f"start from its weights at other sizes, init_from=<its out_dir>/model.pt")
    masters = [m.reshape(params[n].shape) for n, m in zip(names, piece.masters, strict=True)]
    # the weights: the masters (rounded where the module is bf16; a stage-3 checkpoint's module holds only empty
    # placeholders), its buffers from the checkpoint's module
    weights = {**piece.module, **dict(zip(names, masters, strict=True))}
    if layout.engine == "torch":  # TorchEngine's own state.pt format, through its own loader
        if layout.bf16:
            opt = {"opt": _optimizer_state(piece, engine.optimizer.opt, masters), "master": masters}
        else:
            opt = _optimizer_state(piece, engine.optimizer, masters)
        engine.load_state({"module": weights, "optimizer": opt, "scheduler": piece.scheduler,
                           "client_state": piece.client})
        return piece.client
    module.load_state_dict(weights)
    client = _client_optimizer(engine, layout)
    own = [p for g in client.param_groups for p in g["params"]]  # fp32: the module's; bf16: FP16_Optimizer's
    if len(own) != len(names):
        raise ValueError(f"the optimizer holds {len(own)} parameters, the model trains {len(names)}")
    with torch.no_grad():
        for master, p in zip(masters, own, strict=True):
            p.copy_(master.reshape(p.shape))
    client.load_state_dict(run_as_own(_optimizer_state(piece, client, own), client))
    if engine.lr_scheduler is not None and piece.scheduler is not None:
        engine.lr_scheduler.load_state_dict(piece.scheduler)
    engine.global_steps = piece.counters.get("global_steps", 0)
    engine.global_samples = piece.counters.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = piece.counters.get("skipped_steps", 0)
    return piece.client


class Plan(NamedTuple):
    """The latest checkpoint (its tag and layout) and whether it must be converted to resume in this run's layout."""

    tag: str
    saved: Layout
    convert: bool


def resume_plan(ckpt_dir: Path, current: Layout) -> Plan | None:
    """The Plan for resuming the latest checkpoint in ckpt_dir as `current`; None without one."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{latest} names {tag!r}, but {Path(ckpt_dir) / tag} is missing")
    saved = saved_layout(Path(ckpt_dir) / tag)
    return Plan(tag, saved, needs_conversion(saved, current))


def full_state(engine, names: list[str], layout: Layout) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter's fp32 master, exp_avg, exp_avg_sq and step as full tensors on the CPU, whatever the
    layout: ZeRO through DeepSpeed's safe_get_full_* (collectives: call on every rank), one-piece ones from the
    optimizer. What tests compare across layouts."""
    out = {}
    params = dict(engine.module.named_parameters())
    if layout.stage:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # else linked at the first step
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        opt = engine.optimizer.optimizer  # the client optimizer over the flat fp32 partitions: its step counts
        step = _one_step(opt.state)
        for name in names:
            p = params[name]
            out[name] = {"fp32": safe_get_full_fp32_param(p).float().cpu(),
                         **{k: safe_get_full_optimizer_state(p, k).float().cpu() for k in MOMENTS}}
            if step is not None:  # one count for every group, as a stage-0 optimizer keeps one per parameter
                out[name]["step"] = step
        return out
    client = _client_optimizer(engine, layout)
    masters = [p for g in client.param_groups for p in g["params"]]
    for name, master in zip(names, masters, strict=True):
        st = client.state.get(master, {})
        out[name] = {"fp32": master.detach().float().cpu().clone(),
                     **{k: st[k].float().cpu().clone() for k in MOMENTS if k in st}}
        if "step" in st:
            out[name]["step"] = torch.as_tensor(st["step"], dtype=torch.float32).cpu()
    return out
