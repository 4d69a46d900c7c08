"""What a run keeps and how it comes back: model.pt, the engine's checkpoints in ckpt/ (saved, pruned, resumed in
any layout) and stopping early with a checkpoint when the scheduler says so (SIGTERM / SIGUSR1).

    ckpt/step<N>/      DeepSpeed's (or clipfast.engine's) checkpoint, every ckpt_every steps, at the end and on a
                       signal; keep_ckpts=K keeps the newest K
    ckpt/latest        the tag resume=true loads
    model.pt           plain float32 weights + model and run configs (clipfast.evaluate, clipfast.export, init_from)
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from clipfast import reshard
from clipfast.config import TrainConfig, to_dict
from clipfast.interop import resize_state_dict
from clipfast.model import CLIP
from clipfast.slip import without_head

log = logging.getLogger("clipfast.train")

# The process's exit status after a signal stopped it with a checkpoint: EX_TEMPFAIL ("try again"), apart from 0 (the
# run finished) and 1 (it failed), so that a job script can requeue itself, `resume=true` on the same command.
PREEMPTED_EXIT = 75
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
TAG = re.compile(r"step(\d+)$")


GATHER_NUMEL = 1 << 27  # parameters gathered whole at once under ZeRO stage 3 (full_weights): 512 MB in float32


def full_weights(module: CLIP, stage: int, keep: bool = True, gather_numel: int = GATHER_NUMEL) -> dict:
    """The module's state_dict in float32 on the CPU ({} where keep is False). Under ZeRO stage 3 each rank holds a
    slice of every parameter (and an empty placeholder for the rest), so they are gathered whole first: a collective,
    every rank calls it, in groups of at most `gather_numel` elements (a parameter larger than that alone), so that the
    gather never holds a model that fits the GPUs only in slices whole on one of them; only where keep is True (the
    rank that writes model.pt or evaluates) are the gathered weights copied out. (model.pt under stage 3 had held an
    empty token embedding, before the gather.)"""
    sd = module.state_dict(keep_vars=True)
    if stage != 3:
        return {k: v.detach().float().cpu() for k, v in sd.items()} if keep else {}
    import deepspeed

    names: dict[int, list[str]] = {}  # each parameter once, under all its names (a shared one has several)
    params = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    out, group, size = {}, [], 0

    def gather(ps):
        with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
            if keep:
                for p in ps:
                    w = p.detach().float().cpu().clone()
                    out.update(dict.fromkeys(names[id(p)], w))

    for p in params.values():
        n = getattr(p, "ds_numel", p.numel())  # (under stage 3 numel() is the placeholder's)
        if group and size + n > gather_numel:
            gather(group)
            group, size = [], 0
        group.append(p)
        size += n
    if group:
        gather(group)
    if not keep:
        return {}
    return {k: out[k] if k in out else v.detach().float().cpu() for k, v in sd.items()}


def save_model(path: Path, model: CLIP, cfg: TrainConfig, step: int, sd: dict | None = None) -> None:
    """model.pt: the weights (sd from full_weights, or the model's own state_dict) with the model's and the run's
    configs and the step."""
    sd = without_head(full_weights(model, 0) if sd is None else sd)
    tmp = path.with_suffix(".tmp")
    torch.save({"model_config": dataclasses.asdict(model.cfg), "state_dict": sd, "train_config": to_dict(cfg),
                "step": step}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file behind


def read_model_file(path: str, raw_ok: bool = False) -> dict:
    """What a clipfast model.pt holds (model_config, state_dict, train_config, step), from the file, a run folder
    holding one, or one of the run's checkpoints (`<run>/ckpt/step<N>`: its weights, in float32, with the run's model
    config; an engine=torch or DeepSpeed stage 0-2 checkpoint; `<run>/ckpt/latest` names the latest). raw_ok: a file
    of a bare state_dict is read as {"state_dict": it}."""
    p = _checkpoint_tag(Path(path))
    if _is_tag(p):
        return _read_checkpoint_tag(p)
    p = p / "model.pt" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no clipfast model file at {path!r} (expected model.pt from clipfast.train, a run "
                                f"folder, or a checkpoint of one: <run>/ckpt/step<N>)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:  # (not a file torch.save wrote)
        raise ValueError(f"{p} is not a model file torch can read ({type(e).__name__}: {e}); expected model.pt from "
                         f"clipfast.train, a run folder, or a checkpoint of one: <run>/ckpt/step<N>") from None
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        return ckpt
    if raw_ok and isinstance(ckpt, dict):
        return {"state_dict": ckpt.get("state_dict", ckpt)}
    raise ValueError(f"{p} is not a clipfast model file (no 'model_config'); open_clip files: clipfast.interop")


def _checkpoint_tag(p: Path) -> Path:
    """`<run>/ckpt/latest` (DeepSpeed's pointer file, holding a tag) -> the checkpoint it names; other paths as
    they are."""
    if p.name == "latest" and p.parent.name == "ckpt" and p.is_file():
        return p.parent / p.read_text().strip()
    return p


def is_model_path(path: str) -> bool:
    """Whether `path` is something read_model_file takes: a file, a run folder holding model.pt, or a run's checkpoint
    (`<run>/ckpt/step<N>`, or `<run>/ckpt/latest`)."""
    p = _checkpoint_tag(Path(path))
    return p.is_file() or (p / "model.pt").is_file() or _is_tag(p)


def _is_tag(p: Path) -> bool:
    """Whether `p` is one of a run's checkpoints, <run>/ckpt/step<N>."""
    return p.is_dir() and bool(TAG.match(p.name)) and p.parent.name == "ckpt"


def _read_checkpoint_tag(tag: Path) -> dict:
    run = read_model_file(str(tag.parent.parent))  # the run's model config (every checkpoint of the run has it)
    if (tag / reshard.STAGE3_MODEL_FILE).is_file():  # each rank's partition of the weights sits in its own file
        raise ValueError(f"{tag} is a ZeRO stage 3 checkpoint (its weights are partitioned over the ranks' files): "
                         f"gather them with DeepSpeed's zero_to_fp32.py in {tag.parent} (--tag {tag.name}); the "
                         f"run's latest weights are its model.pt")
    found = next((f for f in (tag / "state.pt", tag / reshard.MODEL_FILE) if f.is_file()), None)  # engine=torch's,
    if found is None:  # DeepSpeed's (stages 0-2)
        raise FileNotFoundError(f"{tag} holds no engine=torch or DeepSpeed checkpoint (state.pt, {reshard.MODEL_FILE})")
    sd = torch.load(found, map_location="cpu", weights_only=False)["module"]
    sd = without_head({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return {**run, "state_dict": sd, "step": int(TAG.match(tag.name).group(1))}


def load_weights(model: CLIP, path: str) -> None:
    """Start from a clipfast model.pt (or a run folder holding one, or one of its checkpoints): position embeddings
    resized to `model`."""
    try:
        ckpt = read_model_file(path, raw_ok=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_from: {e}") from None
    missing, unexpected = model.load_state_dict(resize_state_dict(without_head(ckpt["state_dict"]), model.cfg),
                                                strict=False)
    missing = without_head(dict.fromkeys(missing))  # a new SSL head starts from its own init
    if missing or unexpected:
        raise RuntimeError(f"init_from {path}: missing keys {sorted(missing)}, unexpected keys {unexpected}")
    log.info("initialised from %s (step %s)", path, ckpt.get("step", "?"))


def save(run, cfg: TrainConfig, out: Path, step: int, is_main: bool, progress: dict | None = None) -> None:
    """The engine's checkpoint ckpt/step<step> (every rank writes its part; its client state the step and
    `progress`, what the run counts across resumes), model.pt, and the older checkpoints beyond cfg.keep_ckpts
    removed."""
    ckpt_dir = out / "ckpt"
    run.engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={**(progress or {}), "step": step})
    if is_main or run.layout.stage == 3:  # (stage 3: every rank takes part in the gather)
        weights = full_weights(run.engine.module, run.layout.stage, keep=is_main)
    if is_main:
        save_model(out / "model.pt", run.engine.module, cfg, step, weights)
    if cfg.keep_ckpts:
        dist.barrier()  # every rank's part of the new checkpoint is written before an old one goes
        if is_main:
            prune(ckpt_dir, cfg.keep_ckpts)


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` step<N> checkpoints (never the one `latest` names); returns the removed."""
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    tags = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG.match(p.name)))
    gone = [p for _, p in tags[:-keep] if p.name != latest] if keep > 0 else []
    for p in gone:
        shutil.rmtree(p)
    if gone:
        log.info("removed %d older checkpoint(s) (keep_ckpts=%d): %s", len(gone), keep, ", ".join(p.name for p in gone))
    return gone


# what a run writes in its out_dir and an overwrite removes (config.json is written anew; tb/: TensorBoard's events;
# done.json: a finished stage's record, stages.json: a staged run's, curves.png: clipfast.plot's default output)
RUN_FILES = ("metrics.jsonl", "evals.jsonl", "eval.json", "model.pt", "ckpt", "tb", "done.json", "stages.json",
             "curves.png")


def fresh_out_dir(out: Path, overwrite: bool, is_main: bool) -> None:
    """resume=false: an earlier run in `out` (a logged step or a checkpoint) is an error, for its logs would mix with
    this run's and keep_ckpts would keep its checkpoints; overwrite=true removes them instead (rank 0). Every rank
    decides from the same files before any of them writes: call it before the first collective."""
    held = [n for n in ("metrics.jsonl", "evals.jsonl") if (out / n).is_file() and (out / n).stat().st_size]
    held += [n for n in ("stages.json", "done.json") if (out / n).is_file()]  # a staged run's, or one of its stages
    if (out / "ckpt").is_dir() and any((out / "ckpt").iterdir()):
        held.append("ckpt/")
    if not held:
        return
    if not overwrite:
        raise FileExistsError(f"out_dir {out} holds an earlier run ({', '.join(held)}): resume=true goes on from its "
                              f"latest checkpoint, overwrite=true starts afresh there (its logs and checkpoints "
                              f"removed), or give another out_dir")
    if is_main:
        gone = [n for n in RUN_FILES if (out / n).exists()]
        for n in gone:
            shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
        log.warning("overwrite=true: removed the earlier run's %s from %s", ", ".join(gone), out)


def resume(run, cfg: TrainConfig, ckpt_dir: Path, is_main: bool) -> dict:
    """With resume=true, load the latest checkpoint in ckpt_dir (one saved in another layout is converted first);
    returns its client state: "step", the step to continue from, and what save's `progress` held ({"step": 0}
    without a checkpoint)."""
    if not cfg.resume:
        return {"step": 0}
    if not (ckpt_dir / "latest").is_file():
        log.info("resume=true but no checkpoint in %s: starting from scratch", ckpt_dir)
        return {"step": 0}
    try:
        if run.plan and run.plan.convert:  # saved with another number of ranks, ZeRO stage, precision or engine
            client = resume_resharded(run, ckpt_dir, is_main)
        else:
            _, client = run.engine.load_checkpoint(str(ckpt_dir))
    except (RuntimeError, ValueError) as e:  # torch's load_state_dict; a converted checkpoint's zip(strict=True)
        if not any(what in str(e) for what in ("state_dict", "size mismatch", "zip()")):
            raise
        raise RuntimeError(_other_model(str(e), ckpt_dir)) from e
    step = int(client["step"])
    log.info("resumed from %s at step %d", ckpt_dir, step)
    apply_settings(run.engine.optimizer, run.scheduler, cfg)
    return {**client, "step": step}


def _other_model(error: str, ckpt_dir: Path) -> str:
    """What torch's load_state_dict error says, put as the settings that differ: a resume needs the model the
    checkpoint was saved from (SLIP switched on or off, another SSL head, image size or text length: a raw
    'Error(s) in loading state_dict' traceback before)."""
    keys = set(re.findall(r'"([\w.]+)"', error)) | set(re.findall(r"size mismatch for ([\w.]+)", error))
    hints = []
    if any(k.startswith("ssl_head.") for k in keys):
        hints.append("SLIP's head (ssl_weight on or off, ssl_hidden, ssl_dim)")
    if any(not k.startswith("ssl_head.") for k in keys):
        hints.append("the model or its sizes (model, image_size, text_len)")
    if not hints:
        hints.append("the model (model and its sizes)")
    shown = sorted(keys)
    return (f"resume=true: the checkpoint in {ckpt_dir} holds another model than this run's config makes: "
            f"{' and '.join(hints)} differ from the run that saved it (its out_dir's config.json); differing weights: "
            f"{', '.join(shown[:8])}{' ...' if len(shown) > 8 else ''}. Resume with the saved settings, or start a "
            f"new run from its weights with init_from={ckpt_dir.parent / 'model.pt'} (a new head or size is made "
            "there)")


def apply_settings(optimizer, scheduler, cfg: TrainConfig) -> None:
    """The config's peak lr, weight decay, betas and eps over the ones a loaded checkpoint restored (the optimizer's
    param groups and the scheduler's base_lrs hold the saved run's): a resume with lr=... after a loss spike gets
    it. The groups are clipfast.build.param_groups' (decay, no decay); the scheduler a LambdaLR, whose lambda is the
    config's already (a function is not saved)."""
    peak = cfg.effective_lr()
    want = [dict(weight_decay=cfg.weight_decay), dict(weight_decay=0.0)]
    changed = set()
    for i, g in enumerate(optimizer.param_groups):
        for key, value in dict(want[min(i, 1)], betas=tuple(cfg.betas), eps=cfg.eps).items():
            if key in g and (tuple(g[key]) if key == "betas" else g[key]) != value:
                changed.add(f"{key} {g[key]} -> {value}")
                g[key] = value
    if any(b != peak for b in scheduler.base_lrs):
        changed.add(f"lr {scheduler.base_lrs[0]:g} -> {peak:g}")
    scheduler.base_lrs = [peak] * len(scheduler.base_lrs)
    lrs = [peak * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]  # the next step's, as the scheduler sets
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        if isinstance(g["lr"], torch.Tensor):  # a CUDA graph's lr, filled in place
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr
    scheduler._last_lr = lrs
    if changed:
        log.warning("resume: the config's settings over the checkpoint's: %s", ", ".join(sorted(changed)))


def resume_resharded(run, ckpt_dir: Path, is_main: bool) -> dict:
    """Resume a checkpoint saved in another layout (clipfast.reshard): rank 0 writes its universal checkpoint, every
    rank loads it (ZeRO through DeepSpeed, stage 0 and engine=torch through reshard.load_single), then it is removed.
    Returns the client state."""
    tag, saved, layout, engine = run.plan.tag, run.plan.saved, run.layout, run.engine
    uni = ckpt_dir / f"{tag}_universal"
    if is_main:
        log.info("%s/%s was saved with %s; this run is %s: converting it to a universal checkpoint", ckpt_dir, tag,
                 saved, layout)
        t0 = time.perf_counter()
        reshard.to_universal(ckpt_dir / tag, uni, run.names, target=layout)
        log.info("universal checkpoint written in %.1f s", time.perf_counter() - t0)
    dist.barrier()
    if layout.stage:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=uni.name)
    else:
        client = reshard.load_single(uni, engine, run.names, layout)
    dist.barrier()
    if is_main:
        shutil.rmtree(uni, ignore_errors=True)
    return client


class Preemption:
    """A scheduler's notice that the job must end (SLURM's `--signal=USR1@120` or its SIGTERM before the kill,
    Kubernetes' SIGTERM, DeepSpeed's and torchrun's launchers passing on theirs): the handler only notes the signal,
    and the training loop stops at a step boundary with a checkpoint, every rank at the same step (`agreed`).
    Installed by clipfast.train.main, in the processes that train; a run called in-process (tests, notebooks) keeps
    the default handlers."""

    LAG = 2  # steps between a rank's flag and every rank's decision (the all-reduce of the flags, read this late)

    def __init__(self):
        self.signal: str | None = None
        self._old = {}
        self._flags = collections.deque()  # (all-reduced flag on the host, its copy's event), oldest first
        self._stream = None  # CUDA: the flags' own stream

    def install(self) -> Preemption:
        for name in PREEMPT_SIGNALS:
            num = getattr(signal, name)
            self._old[num] = signal.signal(num, self._note)
        return self

    def restore(self) -> None:
        for num, old in self._old.items():
            signal.signal(num, old)
        self._old = {}

    def _note(self, signum, frame) -> None:  # a signal handler: no logging (not reentrant), only the note
        self.signal = self.signal or signal.Signals(signum).name

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether to stop now: called by every rank after every step. One rank: whether it was signalled. Several: a
        signal reaches them at different moments (or only some), so each step all-reduces the flags (MAX) and the
        decision reads the result of LAG steps before, the same on every rank. Nothing waits for the GPU: the flag
        goes up by a fill kernel, comes back by an asynchronous copy to pinned memory, and is read once its event
        (LAG steps old) has passed; on its own stream, so that the training stream never waits for the all-reduce.
        226 us a step on 2 gloo ranks of this CPU; on GPUs untimed (three tiny operations and a 4-byte all-reduce
        a step)."""
        if world == 1:
            return self.signal is not None
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._stream):  # (on a side stream: the next step's work does not wait for it)
                flag = torch.full((1,), int(self.signal is not None), dtype=torch.int32, device=device)  # no sync
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                host = torch.empty(1, dtype=torch.int32, pin_memory=True)
                host.copy_(flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._flags.append((host, event))
        else:
            flag = torch.full((1,), int(self.signal is not None), dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._flags.append((flag, None))
        if len(self._flags) <= self.LAG:
            return False
        host, event = self._flags.popleft()
        if event is not None:
            event.synchronize()  # (LAG steps ago: long done unless the host runs that far ahead of the GPU)
        return bool(host.item())

    def reset(self) -> None:
        """Forget the flags in flight (a stage's end: the next stage starts its own count)."""
        self._flags.clear()
