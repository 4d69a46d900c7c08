"""What the ranks' per-step agreement on the text layout costs the host (clipfast.graph.agree_text_layout: one
all-reduce of three integers over a gloo group, which GraphedTrainStep makes on every step of a run on several ranks).

    python bench/dp_agree.py                     # 2 ranks on this machine, 2,000 calls each
    python bench/dp_agree.py --ranks 8 --calls 5000

Each rank calls it with its own token count (ranks 37 tokens apart) after 50 warm-up calls; rank 0 prints the
median and 90th percentile of its wall time per call. Only the host's time: no device takes part.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rank(rank: int, world: int, port: int, calls: int, bucket: int, ctx: int) -> None:
    import torch.distributed as dist

    from clipfast.graph import agree_text_layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(backend="gloo")
    total = 12_000 + 37 * rank
    for _ in range(50):
        agree_text_layout([total], bucket, ctx, group)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        agree_text_layout([total], bucket, ctx, group)
        times.append(time.perf_counter() - t0)
    times.sort()
    if rank == 0:
        print(f"agree_text_layout on {world} gloo ranks, {calls} calls: median {times[len(times) // 2] * 1e6:.0f} us, "
              f"90th percentile {times[int(len(times) * 0.9)] * 1e6:.0f} us")
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--bucket", type=int, default=512, help="text bucket, tokens")
    ap.add_argument("--context-length", type=int, default=16)
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    from clipfast.launch import free_port

    mp.spawn(_rank, args=(args.ranks, free_port(), args.calls, args.bucket, args.context_length), nprocs=args.ranks)


if __name__ == "__main__":
    main()
