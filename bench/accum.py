"""What accum_steps costs and saves: one training step of the same batch with the loss over all of it, in 1, 2, 4, 8
micro-batches (clipfast.accum), its transient memory peak and its time.

    python bench/accum.py                                     # CPU: ViT-S-16 at 64 px, text 16, batch 256 (~2 min)
    python bench/accum.py --preset B/16 --image-size 112 --text-len 16 --batch 1024 --accum 1 4 16   # a GPU
    python bench/accum.py ... --graph             # CUDA: also each point as one CUDA graph (clipfast.graph)

A step: the passes of clipfast.accum.cached_passes (or, at 1, one forward and backward), then AdamW. Peak: the step's
transient memory above what was allocated before it (activations, gradients, features; CUDA's allocator on a GPU,
the profiler's allocation trace on the CPU: bench/measure.py). Time: median of --steps after one warm-up step, the
points interleaved step by step (bench/measure.time_interleaved). Batches are synthetic, as in bench/throughput.py.
Prints a markdown table; --out DIR also writes accum.md and accum.json there with the device and the commit.
--graph (CUDA) adds a row per point for GraphedTrainStep(accum_steps=N) on a copy of the model, with fused capturable
AdamW: both passes and the update replayed as one graph; its memory is the graph pool's, what the capture kept
(the replays allocate nothing), above what was allocated before it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.measure import step_peak_bytes, time_interleaved  # noqa: E402
from bench.points import make_batch  # noqa: E402
from bench.report import device_info, git_commit  # noqa: E402
from clipfast.accum import cached_passes, split_batch  # noqa: E402
from clipfast.loss import clip_loss  # noqa: E402
from clipfast.model import CLIP  # noqa: E402
from clipfast.presets import from_name  # noqa: E402


def step_fn(model, opt, n: int):
    def forward(mb):
        return model(mb["images"], mb["text"], mb["cu_seqlens"], mb["max_len"], keep=None)

    def loss_fn(outs):
        return clip_loss(*outs), {}

    def step(b):
        batch = {"images": b.images, "views": None, "text": b.text, "cu_seqlens": b.cu_seqlens, "max_len": b.max_len}
        if n == 1:
            loss_fn(forward(batch))[0].backward()
        else:
            cached_passes(model, forward, split_batch(batch, None, n), loss_fn, lambda loss, last: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def graph_step_fn(model, n: int, text_len: int, batch: int):
    """(step, pool bytes): GraphedTrainStep(accum_steps=n) over `model`; the pool is measured at its first call."""
    from clipfast.graph import GraphedTrainStep, default_text_bucket

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=True)
    graph = GraphedTrainStep(model, opt, autocast_dtype=None, text_bucket=default_text_bucket(batch // n, text_len),
                             accum_steps=n)
    pool, cu_hosts = {}, {}

    def step(b):
        cu_host = cu_hosts.get(id(b))  # made once per batch, outside the timed steps' host work
        if cu_host is None:
            cu_host = cu_hosts[id(b)] = torch.cat([torch.zeros(1, dtype=torch.int64), b.lengths.cumsum(0)]).int()
        if not graph.graphs:  # the capture: what it allocates stays the graph's
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            graph(b.images, b.text, b.cu_seqlens, None, cu_host=cu_host)
            torch.cuda.synchronize()
            pool["bytes"] = torch.cuda.memory_allocated() - before
            return
        graph(b.images, b.text, b.cu_seqlens, None, cu_host=cu_host)

    return step, pool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="S/16")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per point, after one warm-up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="", help="also write accum.md / accum.json here")
    ap.add_argument("--graph", action="store_true", help="CUDA: also each point as one CUDA graph")
    args = ap.parse_args(argv)
    bad = [f"--accum {n} (at least 1)" for n in args.accum if n < 1]
    bad += [f"--batch {args.batch} does not split into {n} micro-batches" for n in args.accum
            if n >= 1 and args.batch % n]
    bad += [f"--{k} {getattr(args, k)} (at least 1)" for k in ("batch", "steps") if getattr(args, k) < 1]
    if args.graph and not args.device.startswith("cuda"):
        bad.append(f"--graph needs a CUDA device (CUDA graphs), not --device {args.device}")
    if bad:
        ap.error("; ".join(bad))
    device = torch.device(args.device)
    cfg = from_name(args.preset, **{"text.context_length": args.text_len})
    cfg.vision.image_size = args.image_size
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIP(cfg).train()
    model = model.to(torch.bfloat16) if bf16 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(args.batch, args.image_size, args.text_len, gen, device, torch.float32)
    steps = {n: step_fn(model, opt, n) for n in args.accum}
    peaks = {}
    for n, step in steps.items():
        step(batch)  # warm-up (optimizer state made, kernels chosen)
        peaks[n] = step_peak_bytes(step, batch, device)
    if args.graph:
        for n in args.accum:
            step, pool = graph_step_fn(copy.deepcopy(model), n, args.text_len, args.batch)
            step(batch)  # the capture (after an eager step inside it)
            steps[f"graph {n}"], peaks[f"graph {n}"] = step, pool["bytes"]
    wall, _ = time_interleaved(steps, [batch], args.steps, device)
    times = {n: statistics.median(v) for n, v in wall.items()}
    name, _ = device_info(device)
    head = (f"{args.preset} at {args.image_size} px, text {args.text_len}, batch {args.batch}, "
            f"{'bf16' if bf16 else 'fp32'}, {name}, commit {git_commit()}")
    base = min(args.accum)  # the ratios' reference: the fewest micro-batches asked for (usually 1)
    lines = [head, "", f"| accum_steps | micro-batch | step peak | vs {base} | ms per step | samples/s | vs {base} |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for key in steps:
        n = key if isinstance(key, int) else int(key.split()[-1])
        ref = base if isinstance(key, int) else f"graph {base}"
        ms = 1e3 * times[key]
        rows.append({"accum_steps": n, "graph": not isinstance(key, int), "micro_batch": args.batch // n,
                     "peak_bytes": peaks[key], "ms": ms, "samples_per_s": args.batch / times[key]})
        lines.append(f"| {key} | {args.batch // n} | {peaks[key] / 2**20:,.0f} MiB | {peaks[key] / peaks[ref]:.2f}x | "
                     f"{ms:,.0f} | {args.batch / times[key]:,.0f} | {times[ref] / times[key]:.2f}x |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "accum.md").write_text("\n".join(lines) + "\n")
        (out / "accum.json").write_text(json.dumps({"setup": head, "command": " ".join(sys.argv), "rows": rows},
                                                   indent=1))
    return rows


if __name__ == "__main__":
    main()
