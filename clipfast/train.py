"""Train CLIP with DeepSpeed ZeRO. Reads top to bottom: setup -> data -> model/optimizer -> train_step -> loop.

    deepspeed clipfast/train.py --config configs/demo.py [key=value ...]
    deepspeed --num_gpus 2 clipfast/train.py --config configs/demo.py steps=20   # two ranks (CPU: gloo)
    python clipfast/train.py --config configs/demo.py engine=torch [cuda_graph=true]   # one rank, no DeepSpeed
    torchrun --nproc_per_node 8 clipfast/train.py --config ... engine=torch cuda_graph=true   # 8 data-parallel ranks
    srun python clipfast/train.py --config ...   # one task per GPU under SLURM, no launcher (clipfast.launch)

On one rank DeepSpeed runs ZeRO stage 0 without the gradient all-reduce; engine=torch (clipfast.engine) drops
the engine altogether (on several ranks as data parallelism, clipfast.dp), and on CUDA cuda_graph=true replays each
whole step as CUDA graphs (clipfast.graph).

Writes under out_dir: metrics.jsonl (one JSON line per log step), TensorBoard events, DeepSpeed
checkpoints in ckpt/ (every ckpt_every steps, at the end, and when a SIGTERM / SIGUSR1 stops the run early with exit
status 75; `resume=true` continues from the latest, on any number of ranks: a checkpoint saved with another world
size, ZeRO stage, precision or engine is converted, clipfast.reshard; clipfast.checkpoint; the data go on after the
checkpoint's last sample where the ranks and shards are the same, where_to_go_on),
model.pt (a plain state_dict + model config, for clipfast.evaluate and clipfast.export) and, when
val_data (zero-shot classification) or retrieval_data (image-text retrieval) is set, the final model's results in
eval.json; every evaluation (also each eval_every steps) goes to evals.jsonl and TensorBoard's eval/. A config
with `stages` runs each stage this way in out_dir/<stage>/, each starting from the previous one's weights
(clipfast.stages).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from clipfast.accum import cached_passes, split_batch
from clipfast.build import Run, build_engine, build_model, peak_flops, trainer_clip
from clipfast.checkpoint import PREEMPTED_EXIT, Preemption, fresh_out_dir, full_weights, resume, save
from clipfast.config import TrainConfig, load_config, to_dict
from clipfast.data import DaliLoader, list_shards
from clipfast.data.prefetch import resolve_reader_process
from clipfast.evaluate import eval_sets
from clipfast.flops import flops_per_sample, ssl_flops
from clipfast.launch import one_rank_env, release_shm_buffer, slurm_env
from clipfast.loss import distributed_clip_loss, distributed_simclr_loss
from clipfast.model import CLIP
from clipfast.optim import clipped_step
from clipfast.reduce import TextReducer, image_keep_indices, keep_count, mask_grid
from clipfast.slip import sync_batch_norms, without_head

log = logging.getLogger("clipfast.train")

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/<recipe>.py[:function]")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    return ap.parse_args(argv)


def main(argv=None, cli: bool = False):
    args = parse_args(argv)
    from clipfast import stages

    try:
        cfg = load_config(args.config, args.overrides)
        stages.expand(cfg)  # every stage's values checked (named by key) before any process group or model is made
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        if not cli:
            raise
        # from the command line a bad value is a line that names it, as argparse's errors, not a traceback
        raise SystemExit(f"clipfast/train.py: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}") \
            from None

    # --- setup (once per process; each stage of a multi-stage config is one call of train())
    preempt = Preemption().install()  # from here a SIGTERM / SIGUSR1 stops the run at a step, with a checkpoint
    cuda = torch.cuda.is_available()
    from_slurm = slurm_env()  # `srun python clipfast/train.py`: the rank from SLURM's variables (clipfast.launch)
    one_rank_env()
    if cfg.engine == "torch":  # no DeepSpeed needed: `python clipfast/train.py ... engine=torch` runs without it
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.engine != "torch" and not cuda:
        dist.barrier()  # every rank has mapped every shared-memory buffer
        release_shm_buffer(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s")
    if from_slurm:
        log.info("%s", from_slurm)
    if cfg.stages:
        done = stages.run(cfg, lambda st, name: train(st, device, rank, world, desc=name, preempt=preempt),
                          is_main=rank == 0, barrier=dist.barrier)
    else:
        done = [train(cfg, device, rank, world, preempt=preempt)]
    dist.barrier()
    if any(d.get("preempted") for d in done):
        dist.destroy_process_group()
        sys.exit(PREEMPTED_EXIT)


def skipped_so_far(loader, world: int, device) -> int:
    """The samples every rank's loader has skipped so far, summed over the ranks (a collective: every rank logs at the
    same steps)."""
    n = sum(loader.skipped.values())
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def data_identity(cfg: TrainConfig, world: int, reader_processes: int) -> dict:
    """What a saved data position holds for: the ranks, the seed, the training shards (by name, and how they group
    into datasets), their weights and the readers each rank reads in (reader_processes as split_reader cuts it; none
    reads as one). A resume where one of these changed starts a new pass instead (train). Shards re-made under the
    same names are caught later, by the key of the last sample passed over (ShardReader.restore)."""
    from clipfast.data.prefetch import reader_children
    from clipfast.data.shards import split_entries

    entries = [e.strip() for e in split_entries(cfg.train_data) if e.strip()] if cfg.train_weights else \
        [cfg.train_data]
    listed = [[os.path.basename(p) for p in list_shards(e)] for e in entries]
    names = "\n".join(n for names in listed for n in names)
    counts = [len(names) for names in listed]
    return {"world": world, "seed": cfg.seed, "shards": hashlib.sha1(names.encode()).hexdigest()[:16],
            "datasets": counts, "train_weights": [float(w) for w in cfg.train_weights],
            "readers": reader_children(counts, world, reader_processes)}


def gather_positions(loader, world: int) -> list:
    """Every rank's loader.data_position(), in rank order (a collective)."""
    pos = loader.data_position()
    if world == 1:
        return [pos]
    out = [None] * world
    dist.all_gather_object(out, pos)
    return out


def where_to_go_on(client: dict, identity: dict, rank: int, step: int, is_main: bool) -> tuple[dict | None, int | None]:
    """The data position and reader seed this rank goes on from (`client`, a checkpoint's client state), or
    (None, None) where it has none that holds for this run: a new pass then, its order seeded by the step."""
    saved = client.get("data_position")
    if not step:
        return None, None
    if saved is None:
        reason = "the checkpoint holds no position in the data (saved by an older clipfast)"
    else:
        changed = [k for k in identity if saved["identity"].get(k) != identity[k]]
        if not changed:
            mine = saved["ranks"][rank]
            return mine["position"], mine["seed"]
        reason = "its " + ", ".join(f"{k} {saved['identity'].get(k)!r} -> {identity[k]!r}" for k in changed)
    if is_main:
        log.warning("resume: the data starts a new pass, reshuffled, instead of going on after the last sample "
                    "trained on: %s", reason)
    return None, None


def end_cut_line(path: Path) -> None:
    """A log of JSON lines whose last line a crash cut short (the run killed mid-write) gets its newline, so that the
    resumed run's first record starts a line of its own: glued to the fragment, it was unreadable with it, and a
    reader took the older, pre-resume record of that step instead (clipfast.plot's "the later line wins")."""
    if not path.is_file() or not path.stat().st_size:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def evaluate_now(cfg: TrainConfig, run: Run, mcfg, device: torch.device, is_main: bool, step: int, writer, evals: Path,
                 say=print, rank: int = 0, world: int = 1) -> dict:
    """Zero-shot classification (val_data) and retrieval (retrieval_data) of the model as it is now, every rank
    encoding its share of the images and prompts (clipfast.evaluate; under ZeRO stage 3 on rank 0 alone, on a whole
    copy that every rank helps gather: the engine's module holds slices). The result is appended to `evals` with the
    step and logged to TensorBoard as eval/...; returns it on rank 0 ({} elsewhere)."""
    if not (cfg.val_data or cfg.retrieval_data):
        return {}
    model = run.engine.module
    if run.layout.stage == 3:
        weights = without_head(full_weights(model, 3, keep=is_main))  # a collective: every rank
        if not is_main:
            return {}
        model = CLIP(mcfg).to(device)
        model.load_state_dict(weights)
        rank, world = 0, 1
    from clipfast.evaluate import evaluate_all, scalars

    res = evaluate_all(model, cfg.val_data, cfg.retrieval_data, device, cfg.data_threads,
                       say=say if is_main else lambda line: None, rank=rank, world=world)
    if not is_main:
        return {}
    with open(evals, "a") as f:
        f.write(json.dumps({"step": step, **res}) + "\n")
    if writer:
        for k, v in scalars(res).items():
            writer.add_scalar(f"eval/{k}", v, step)
    return res


def train(cfg: TrainConfig, device: torch.device, rank: int, world: int, desc: str = "train",
          preempt: Preemption | None = None) -> dict:
    """One training run (a stage) in cfg.out_dir; returns {"step", "loss", "train_s", "total_s", "top1"}, and
    "preempted": true where a signal (`preempt`, installed by main) stopped it early with a checkpoint."""
    preempt = preempt or Preemption()  # (not installed: never signalled)
    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out_dir)
    is_main = rank == 0
    for key, task in (("val_data", "zeroshot"), ("retrieval_data", "retrieval")):  # found now, not after the training
        if cfg.eval_at_end or cfg.eval_every:  # (where it will be evaluated)
            for _, data in eval_sets(getattr(cfg, key), task):
                try:
                    list_shards(data)
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"{key}: {e}") from None
    reader_process = resolve_reader_process(cfg, device)  # (a bad value is an error before anything is built)
    if not cfg.resume:
        fresh_out_dir(out, cfg.overwrite, is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    # --- model / optimizer / engine, and the checkpoint resumed
    model, mcfg, text_len = build_model(cfg, device, is_main)
    sync_batch_norms(model, world, device)
    ckpt_dir = out / "ckpt"
    run = build_engine(cfg, model, device, world, bf16, ckpt_dir)
    engine, scheduler = run.engine, run.scheduler
    clip = trainer_clip(cfg, world, bf16)  # DeepSpeed on one float32 rank: clipped inside the fused AdamW
    params = [p for p in model.parameters() if p.requires_grad]
    client = resume(run, cfg, ckpt_dir, is_main)
    step = int(client["step"])
    # counted across resumes (saved with each checkpoint): skipped samples, wall time
    before = {k: client.get(k, 0) for k in ("skipped_samples", "train_s", "total_s")}
    if is_main:  # once the model is built and the checkpoint loaded: a resume that fails leaves the run's config
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    # --- data: on resume, on from the sample after the checkpoint's last (the same order: the reader's seed as saved);
    # the crops and text masks reseeded by the step, and where the ranks or the data changed, the order too
    identity = data_identity(cfg, world, reader_process)
    position, reader_seed = where_to_go_on(client, identity, rank, step, is_main)
    grid = mask_grid(mcfg.name, mcfg.vision, cfg.image_reduction, cfg.mask_ratio)  # a ResNet takes no masks
    keep_k = keep_count(cfg.image_reduction, grid, cfg.mask_ratio)  # also validates the reduction settings
    loader = DaliLoader(cfg.train_data, cfg.batch_size // world, mcfg.vision.image_size,
                        TextReducer(cfg.text_reduction, text_len, seed=cfg.seed * 131 + rank + step),
                        train=True, rank=rank, world=world, seed=cfg.seed + step, crop_scale=tuple(cfg.crop_scale),
                        threads=cfg.data_threads, device=device, augment=cfg.augment, views=2 if cfg.ssl_weight else 0,
                        view_crop_scale=tuple(cfg.ssl_crop_scale), weights=tuple(cfg.train_weights),
                        reader_process=reader_process, reader_seed=reader_seed, position=position)
    if reader_process and is_main:
        log.info("reading the shards in %d child process(es) per rank", getattr(loader.reader, "processes", 1))
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1009 + rank + step)

    parts = {}  # the loss's terms where it has several (SLIP), logged beside it

    def forward(mb: dict):
        views = {"views": mb["views"]} if cfg.ssl_weight else {}
        return engine(mb["images"], mb["text"], mb["cu_seqlens"], mb["max_len"], keep=mb["keep"], **views)

    def losses(outs) -> tuple[torch.Tensor, dict]:
        """The loss over the whole (all ranks') batch, and its terms where it has several."""
        if not cfg.ssl_weight:
            img, txt, scale = outs
            return distributed_clip_loss(img, txt, scale), {}
        img, txt, scale, z = outs  # SLIP: CLIP's loss plus SimCLR's on the two extra views
        terms = {"clip_loss": distributed_clip_loss(img, txt, scale),
                 "ssl_loss": distributed_simclr_loss(z[0], z[1], cfg.ssl_temperature)}
        return terms["clip_loss"] + cfg.ssl_weight * terms["ssl_loss"], terms

    def backward(loss: torch.Tensor, last: bool = True) -> None:
        """One backward pass; after the last of a step's (accum_steps), the optimizer step."""
        if cfg.engine == "torch":
            engine.backward(loss, last)
            if last:
                engine.step()
            return
        engine.backward(loss, scale_wrt_gas=False)  # each pass's loss is the whole batch's: summed, not averaged
        with clipped_step(engine.optimizer, params, clip if last else 0):  # clip 0: nothing to do here
            engine.step()  # DeepSpeed counts the passes and steps the optimizer after the last

    def train_step(batch) -> torch.Tensor:
        keep = image_keep_indices(cfg.image_reduction, batch["images"].shape[0], grid, cfg.mask_ratio,
                                  device=device, generator=gen)
        if cfg.cuda_graph:  # forward, loss, backward, clipping and optimizer in one replay
            return engine.graph_step(batch["images"], batch["text"], batch["cu_seqlens"], keep,
                                     cu_host=batch.get("cu_seqlens_host"))
        if cfg.accum_steps > 1:  # the whole batch's loss over micro-batches (clipfast.accum)
            loss, terms = cached_passes(engine.module, forward, split_batch(batch, keep, cfg.accum_steps), losses,
                                        backward)
        else:
            loss, terms = losses(forward({**batch, "keep": keep}))
            backward(loss)
        parts.update({k: v.detach() for k, v in terms.items()})  # (logged; not holding the graph)
        return loss.detach()

    # --- loop
    writer = None
    if is_main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    evals = out / "evals.jsonl"  # every evaluation's result, by step (eval_every, eval_at_end)
    if is_main:  # (a resume appends to the logs of the run before it)
        for log_file in (out / "metrics.jsonl", evals):
            end_cut_line(log_file)
    metrics = open(out / "metrics.jsonl", "a") if is_main else None
    peak = peak_flops(device)
    from tqdm import tqdm

    # a bar on a terminal; in a log file (a batch job's, a pipe) a plain line each log step instead, since tqdm's
    # carriage-return updates pile up in one line there, with log records glued to them
    interactive = sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (is_main and interactive), dynamic_ncols=True, desc=desc)
    t_loop = t_last = time.perf_counter()

    def progress() -> dict:  # what a checkpoint carries across resumes (skipped_so_far: a collective; every rank saves)
        now = time.perf_counter()
        return {"skipped_samples": before["skipped_samples"] + skipped_so_far(loader, world, device),
                "train_s": before["train_s"] + now - t_loop, "total_s": before["total_s"] + now - t_start,
                "data_position": {"identity": identity, "ranks": gather_positions(loader, world)}}

    preempted = False
    wait_last, samples_last, text_tokens, loss_v = loader.wait_s, 0, 0, None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    while step < cfg.steps:
        batch = next(loader)
        text_tokens += batch["text"].shape[0]
        lr_used = scheduler.get_last_lr()[0]  # (the step's own; the scheduler moves on after it)
        loss = train_step(batch)
        step += 1
        samples_last += cfg.batch_size
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_v = loss.item()  # note: this is a CPU-GPU sync point, once per log_every steps
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"non-finite loss {loss_v} at step {step}: stopping")
            now = time.perf_counter()
            dt = now - t_last
            sps = samples_last / dt
            avg_text = text_tokens / (samples_last / world)
            fl = flops_per_sample(mcfg, keep_k, avg_text, training=True)
            if cfg.ssl_weight:
                fl += 3 * ssl_flops(mcfg, cfg.ssl_hidden, cfg.ssl_dim)
            rec = {
                "step": step, "loss": loss_v, "lr": lr_used,
                "logit_scale": engine.module.logit_scale.exp().item(),  # sync point, once per log
                "samples_per_s": sps, "tflops": sps * fl / 1e12 / world,
                "mfu": (sps * fl / world / peak) if peak else None,
                "data_wait_share": (loader.wait_s - wait_last) / dt,
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                "skipped_samples": before["skipped_samples"] + skipped_so_far(loader, world, device),
                **{k: v.item() for k, v in parts.items()},  # (sync points, once per log)
            }
            t_last, wait_last, samples_last, text_tokens = now, loader.wait_s, 0, 0
            if is_main:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if writer:
                    for k, v in rec.items():
                        if v is not None and k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix(loss=f"{loss_v:.3f}", sps=f"{sps:.0f}", wait=f"{rec['data_wait_share']:.0%}")
                if not interactive:
                    log.info("%s step %d/%d: loss %.4f, %.0f samples/s, data wait %.0f%%", desc, step, cfg.steps,
                             loss_v, sps, 100 * rec["data_wait_share"])
        bar.update(1)
        saved = step % cfg.ckpt_every == 0 or step == cfg.steps
        if saved:
            save(run, cfg, out, step, is_main, progress())
        if cfg.eval_every and step % cfg.eval_every == 0 and not (step == cfg.steps and cfg.eval_at_end):
            t0 = time.perf_counter()
            evaluate_now(cfg, run, mcfg, device, is_main, step, writer, evals, say=bar.write, rank=rank, world=world)
            t_last += time.perf_counter() - t0  # not training time: left out of the next line's samples/s
        # a scheduler's signal: stop here, every rank at this step (on several ranks a signal counts LAG steps
        # after it came: the ranks' flags are all-reduced each step and read that much later, without a host sync)
        if preempt.agreed(world, device):
            if not saved:
                save(run, cfg, out, step, is_main, progress())
            if is_main:
                log.warning("%s received: stopped at step %d of %d with a checkpoint in %s; the same command with "
                            "resume=true goes on from there (exit status %d)", preempt.signal or "a signal on "
                            "another rank", step, cfg.steps, out / "ckpt", PREEMPTED_EXIT)
            preempted = True
            break
    bar.close()
    preempt.reset()  # (every rank leaves the loop at the same step: the flags in flight are the same everywhere)
    loader.close()
    train_s = before["train_s"] + time.perf_counter() - t_loop  # (and the launches before a resume)
    if loader.skipped:
        log.warning("skipped %d corrupt samples: %s", sum(loader.skipped.values()), loader.skipped)

    # --- evaluate the final model (a preempted run does that when it is resumed at its last step)
    res = {}
    if cfg.eval_at_end and not preempted:
        res = evaluate_now(cfg, run, mcfg, device, is_main, step, writer, evals, say=lambda m: print(m, flush=True),
                           rank=rank, world=world)
    first = next((k for k in res if k.split(":")[0] == "zeroshot"), None)
    if res and is_main:  # the first zero-shot set's numbers at the top level, as before; the other sets by key
        final = {"step": step, **res.get(first, {}), **{k: v for k, v in res.items() if k != first}}
        (out / "eval.json").write_text(json.dumps(final, indent=1))
    if writer:
        writer.close()
    if metrics:
        metrics.close()
    total_s = before["total_s"] + time.perf_counter() - t_start
    return {"step": step, "loss": loss_v, "train_s": train_s, "total_s": total_s,
            "top1": res[first]["top1"] if first else None, **({"preempted": True} if preempted else {})}


if __name__ == "__main__":
    main(cli=True)
