"""Run by tests/test_reshard.py through DeepSpeed's launcher: clipfast.train's model and engine for a config, the
latest checkpoint resumed as the trainer resumes it (converted when saved in another layout; resume=false: none),
then rank 0 saves every trainable parameter's full state (clipfast.reshard.full_state), the step and the LR
scheduler's state to --dump.

    python -m deepspeed.launcher.runner --num_gpus N tests/_reshard_probe.py --dump F --config C key=value ...
"""
import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from clipfast import reshard
from clipfast import train as T
from clipfast.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    import deepspeed

    T.one_rank_env()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    T.release_shm_buffer(rank)
    device = torch.device("cpu")
    model, _, _ = T.build_model(cfg, device, rank == 0)
    ckpt_dir = Path(cfg.out_dir) / "ckpt"
    run = T.build_engine(cfg, model, device, world, cfg.precision == "bf16", ckpt_dir)
    step = T.resume(run, cfg, ckpt_dir, rank == 0)["step"]
    state = reshard.full_state(run.engine, run.names, run.layout)
    if rank == 0:
        torch.save({"step": step, "state": state, "scheduler": run.scheduler.state_dict(),
                    "lr": [g["lr"] for g in run.engine.optimizer.param_groups],
                    "module": {k: v.detach().cpu().clone() for k, v in run.engine.module.state_dict().items()},
                    "layout": str(run.layout), "converted": bool(run.plan and run.plan.convert)}, args.dump)
    dist.barrier()


if __name__ == "__main__":
    main()
