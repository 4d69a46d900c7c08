"""Multi-stage runs: CLIPA's pre-train at few tokens, then fine-tune at full size, as one command.

    deepspeed clipfast/train.py --config configs/demo_clipa.py [stages.1.steps=100 ...]

A config with `stages` (a tuple of dicts of overrides of its own fields, each with an optional "name")
runs each stage as a run of its own under out_dir/<name>/ — its own steps, LR schedule, fresh optimizer,
metrics.jsonl, ckpt/ and model.pt — and:

- stage i > 0 starts from stage i-1's model.pt (`init_from`, unless the stage sets one): position
  embeddings resized on load to the stage's resolution and text length (clipfast.interop.resize_state_dict);
- a stage's seed is the run's seed + its index (unless set), so stages do not replay the same data order;
- only the last stage evaluates at the end, unless a stage sets `eval_at_end` itself;
- a finished stage writes done.json; `resume=true` skips finished stages and resumes the first unfinished
  one from its own ckpt/ (or from the previous stage's weights if it has none); without resume every stage
  starts afresh;
- the last stage's model.pt and eval.json are copied to out_dir/, where single-stage runs leave them, and
  out_dir/stages.json sums up every stage (sizes, steps, loss, wall time, zero-shot result).

A config without stages is one stage whose folder is out_dir itself: exactly the single-stage run.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from clipfast.checkpoint import fresh_out_dir
from clipfast.config import TrainConfig, check_choice, check_stages, check_values, to_dict
from clipfast.engine import check_engine
from clipfast.presets import from_name
from clipfast.reduce import check, mask_grid

log = logging.getLogger("clipfast.stages")

DONE = "done.json"


def stage_name(i: int, overrides: dict) -> str:
    return overrides.get("name", f"stage{i}")


def expand(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """[(name, the stage's full TrainConfig)], in order; validates every stage before any of them runs."""
    if not cfg.stages:
        _check(cfg, "")
        return [("", cfg)]
    check_stages(cfg.stages)
    out: list[tuple[str, TrainConfig]] = []
    last = len(cfg.stages) - 1
    for i, overrides in enumerate(cfg.stages):
        name = stage_name(i, overrides)
        fields = {k: v for k, v in overrides.items() if k != "name"}
        fields.setdefault("seed", cfg.seed + i)
        fields.setdefault("eval_at_end", cfg.eval_at_end if i == last else False)
        if i > 0:
            fields.setdefault("init_from", str(Path(cfg.out_dir) / out[-1][0] / "model.pt"))
        st = dataclasses.replace(cfg, stages=(), out_dir=str(Path(cfg.out_dir) / name), **fields)
        _check(st, f"stage {name}: ")
        out.append((name, st))
    return out


def _check(st: TrainConfig, where: str) -> None:
    """Every value of a stage that can be checked without a device or the ranks, so that a bad one in a later stage
    stops the run before the first stage trains (the rest come when the engine is built)."""
    check_values(st, where)
    try:
        _check_settings(st)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None


def _check_settings(st: TrainConfig) -> None:
    from clipfast.accum import check_accum
    from clipfast.data.augment import check_augment
    from clipfast.data.prefetch import READER_PROCESS
    from clipfast.engine import OVERLAP_OPTIMIZER, TOWER_STREAMS, resolve_kernels
    from clipfast.slip import check_ssl

    check_engine(st, 1)  # (the rank count's own checks come when the engine is built)
    check_accum(st, 1)
    check_augment(st.augment)
    check_ssl(st)
    resolve_kernels(st, "cpu")  # (the choices of layer_norm, vision_attention, mlp)
    for key, valid in (("tower_streams", TOWER_STREAMS), ("overlap_optimizer", OVERLAP_OPTIMIZER),
                       ("reader_process", READER_PROCESS)):  # (their resolving needs the device)
        check_choice(st, key, valid)
    check(st.image_reduction, st.mask_ratio, st.text_reduction)
    vision = from_name(st.model).vision
    if st.image_size and vision.kind != "resnet" and st.image_size % vision.patch_size:
        p = vision.patch_size
        near = [k * p for k in (st.image_size // p, st.image_size // p + 1) if k]
        raise ValueError(f"image_size {st.image_size} is not a multiple of model {st.model}'s patch size {p} "
                         f"(e.g. {' or '.join(map(str, near))})")
    if st.image_size:
        vision = dataclasses.replace(vision, image_size=st.image_size)
    if vision.kind == "resnet":
        from clipfast.resnet import check_image_size

        try:
            check_image_size(vision.image_size)
        except ValueError as e:
            raise ValueError(f"model {st.model}: {e}") from None
    mask_grid(st.model, vision, st.image_reduction, st.mask_ratio)  # a ResNet takes no masks; a ratio the strategy
    # cannot come near on this grid is an error


def finished(st: TrainConfig) -> dict | None:
    """The done.json record of a stage that ran all its steps, else None."""
    path = Path(st.out_dir) / DONE
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("steps") == st.steps else None


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def run(cfg: TrainConfig, train_fn, *, is_main: bool, barrier=lambda: None) -> list[dict]:
    """Run the stages of `cfg` in order with `train_fn(stage_cfg, desc) -> summary dict`; returns the summaries."""
    stages = expand(cfg)
    # decide what to skip before anything is written, so that every rank takes the same decisions
    # (and which stages hold a checkpoint or a finished record: one that trained before a stage that trains now)
    plan = [(name, st, finished(st) if cfg.resume else None,
             cfg.resume and ((Path(st.out_dir) / DONE).is_file() or (Path(st.out_dir) / "ckpt").is_dir()))
            for name, st in stages]
    if not cfg.resume:  # the run's and every stage's folder checked (or, overwrite=true, emptied) before any is touched
        for folder, overwrite in [(cfg.out_dir, cfg.overwrite)] + [(st.out_dir, st.overwrite) for _, st in stages]:
            fresh_out_dir(Path(folder), overwrite, is_main)
    out = Path(cfg.out_dir)
    barrier()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    summaries, trained = [], False  # trained: a stage before this one trained in this launch
    for i, (name, st, done, held) in enumerate(plan):
        if done is not None and not trained:
            log.info("stage %s (%d/%d) finished before: skipped", name, i + 1, len(plan))
            summaries.append(done)
            continue
        st = dataclasses.replace(st, resume=cfg.resume)
        if trained and held:
            # the stage before trained in this launch (resumed, or given more steps): what this one holds grew from
            # that stage's older weights, so it starts afresh from the new ones
            log.warning("stage %s (%d/%d): the stage before it trained again, so its earlier results are removed and "
                        "it starts afresh", name, i + 1, len(plan))
            if is_main:
                fresh_out_dir(Path(st.out_dir), True, is_main)
            barrier()
            st = dataclasses.replace(st, resume=False, overwrite=True)
        trained = True
        if is_main:
            Path(st.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(st.out_dir) / DONE).unlink(missing_ok=True)
        log.info("stage %s (%d/%d): %d steps at %s px, %s text tokens, image %s (mask %.2f), text %s%s%s",
                 name, i + 1, len(plan), st.steps, st.image_size or "preset", st.text_len or "preset",
                 st.image_reduction, st.mask_ratio, st.text_reduction,
                 f", augment {st.augment}" if st.augment != "none" else "",
                 f", SLIP (ssl_weight {st.ssl_weight:g})" if st.ssl_weight else "")
        if st.ssl_weight and i and stages[i - 1][1].ssl_weight:
            # a stage starts from the one before's model.pt (init_from), the CLIP weights alone (interop leaves the
            # head out): SLIP's head and its batch statistics start afresh
            log.info("stage %s: SLIP's projection head starts afresh (the stage before's model.pt holds the CLIP "
                     "weights alone)", name)
        summary = {"stage": name, "steps": st.steps, "image_size": st.image_size, "text_len": st.text_len,
                   "image_reduction": st.image_reduction, "mask_ratio": st.mask_ratio,
                   "text_reduction": st.text_reduction, "augment": st.augment, "ssl_weight": st.ssl_weight,
                   **train_fn(st, name)}
        barrier()
        if summary.get("preempted"):  # stopped by a signal with a checkpoint: resume=true goes on in this stage
            summaries.append(summary)
            return summaries
        if is_main:
            (Path(st.out_dir) / DONE).write_text(json.dumps(summary, indent=1))
        summaries.append(summary)
        gc.collect()  # the stage's engine, optimizer state and DALI pipeline go before the next stage builds its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if is_main:
        last = Path(stages[-1][1].out_dir)
        for fname in ("model.pt", "eval.json"):
            if (last / fname).is_file():
                _copy(last / fname, out / fname)
        (out / "stages.json").write_text(json.dumps(summaries, indent=1))
    barrier()
    return summaries
