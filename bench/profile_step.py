"""Where one training step's time goes: device time per kind of kernel, next to the step's wall time.

    python bench/profile_step.py                                   # B/16 at 112 px / 16 tokens (a CLIPA point)
    python bench/profile_step.py --preset L/16 --size 96 --text-len 8 --batch 512 --impls clipfast open_clip
    python bench/profile_step.py --preset demo --size 32 --text-len 16 --batch 8 --device cpu   # CPU: op time

The same steps as bench/throughput.py (bench/steps.py; synthetic batches on the device), warmed up, then
profiled for --steps steps with torch.profiler. Kernels are grouped by name into matmul, attention, norm,
elementwise / activation, optimizer, copy / cast, other; each group's time per step and share is printed with
the busy share of the step (device time / wall time: well under 100% means the step waits on the CPU that
launches it) and, on a GPU, the time at least one kernel ran (below the summed device time by what ran side by side on
several streams), and where the GPU waited: the largest gaps with no kernel running, by the kernels around them.
Writes profile.md (and the top kernels) under --out (default bench/results/<device>-<date>/).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bench.steps as bench_steps  # noqa: E402
from bench.points import Point, make_batch, snap  # noqa: E402
from bench.report import device_info, git_commit  # noqa: E402
from bench.steps import BUILDERS  # noqa: E402
from clipfast.presets import from_name  # noqa: E402

# first match wins; names of cuBLAS/CUTLASS/Triton/ATen kernels and CPU ops
GROUPS = [
    ("optimizer", r"adam|foreach|multi_tensor|_fused_adamw"),
    # torch.compile'd code on the CPU (inductor's C++: MasterAdamW's fused_cast step, compiled blocks)
    ("compiled (inductor)", r"^## call compiledfxgraph"),
    ("attention", r"flash|fmha|attention|attn|_varlen|softmax"),
    ("matmul", r"gemm|sm90_xmma|cutlass|cublas|matmul|aten::mm|aten::addmm|aten::bmm|nvjet|_patch_embed|linear"),
    ("norm", r"layer_norm|layernorm|native_layer_norm|rms"),
    ("copy / cast", r"copy|cast|convert|to_copy|memcpy|memset|fill|cat|index|gather|scatter"),
    ("elementwise / activation", r"elementwise|vectorized|gelu|add|mul|div|exp|reduce|sum|mean|norm"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def covered(intervals) -> float:
    """The length of the union of (start, end) intervals: on a GPU timeline, the time at least one kernel ran. Below
    the kernels' summed time by what ran side by side (the text tower's stream, the optimizer inside the backward)."""
    total, start, end = 0.0, None, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += 0.0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + (0.0 if end is None else end - start)


def idle_gaps(kernels, steps: int = 1, top: int = 10) -> list[tuple[float, float, str, str]]:
    """Where the GPU waits: the gaps between the union's segments of (start, end, name) kernel intervals, summed per
    (the kernel that ended last before the gap, the one that starts it) and divided by `steps`; the `top` largest as
    (time per step, gaps per step, before, after), the units the intervals'. Between two steps the gap falls between
    one step's last kernel and the next one's first; the wait before the first profiled step is not seen."""
    pairs: dict[tuple[str, str], list] = {}
    end, last = None, None
    for s, e, name in sorted(kernels):
        if end is not None and s > end:
            acc = pairs.setdefault((last, name), [0.0, 0])
            acc[0] += s - end
            acc[1] += 1
        if end is None or e >= end:
            end, last = e, name
    rows = [(t / steps, n / steps, a, b) for (a, b), (t, n) in pairs.items()]
    return sorted(rows, key=lambda r: -r[0])[:top]


def _short(name: str, width: int = 90) -> str:
    """A kernel's name for a table: without the namespaces torch's templates repeat (at::native::, the anonymous
    one), cut at `width` characters."""
    name = name.replace("at::native::", "").replace("(anonymous namespace)::", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def profile(impl: str, args, device) -> tuple[str, dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = from_name(args.preset, **{"vision.image_size": args.size, "text.context_length": args.text_len})
    pt = Point(cfg.name, args.size, args.mask, args.text_len)
    mixed = device.type == "cuda" if args.precision == "auto" else args.precision == "mixed"
    precision = ("amp_bf16" if impl == "open_clip" else "bf16_master") if mixed else "fp32"
    # the label: the DeepSpeed step keeps the engine's own precision, as clipfast.train runs it (bf16 on CUDA, fp32
    # elsewhere), whatever --precision says
    label = ("bf16 (DeepSpeed)" if device.type == "cuda" else "fp32") if impl == "clipfast_ds" else precision
    torch.manual_seed(0)
    _, _, step = BUILDERS[impl](cfg, pt, device, precision, args.batch)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(args.batch, args.size, args.text_len, gen, device,
                       torch.float32 if precision != "bf16" else torch.bfloat16)
    for _ in range(args.warmup):
        step(batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    if cuda:  # device kernels: self device time of events that ran on the GPU; not the ranges user annotations (e.g.
        # "Optimizer.step#AdamW.step") draw over them on the GPU timeline, which counted the optimizer's time twice
        rows = [(e.key, e.self_device_time_total / 1e3 / args.steps, e.count // args.steps) for e in events
                if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False)]
    else:  # CPU: self time of aten ops
        rows = [(e.key, e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps) for e in events
                if e.key.startswith(("aten::", "## Call CompiledFxGraph")) and e.self_cpu_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    busy = sum(r[1] for r in rows)
    union, gaps = None, []
    if cuda:  # the GPU timeline: kernels of several streams side by side count once
        kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
                   and not getattr(e, "is_user_annotation", False)]
        union = covered((s, e) for s, e, _ in kernels) / 1e3 / args.steps
        gaps = idle_gaps(kernels, args.steps)
    groups: dict[str, list] = {}
    for name, ms, n in rows:
        g = groups.setdefault(group_of(name), [0.0, 0])
        g[0] += ms
        g[1] += n
    unit = "device" if cuda else "CPU op"
    streams = ", text tower on its own stream" if cuda and impl.startswith("clipfast") and bench_steps.TOWER_STREAMS \
        and impl != "clipfast_ds" else ""
    lines = [f"### {impl}: {cfg.name} {args.size} px, mask {args.mask:g}, text {args.text_len}, batch {args.batch}, "
             f"{label}{streams}",
             "", f"wall {wall * 1e3:.1f} ms per step; {unit} time {busy:.1f} ms per step "
             f"({100 * busy / (wall * 1e3):.0f}% of the wall time)"
             + ("" if union is None else f"; the GPU busy {union:.1f} ms per step (kernels side by side on several "
                                         f"streams for {busy - union:.1f} ms)"), "",
             f"| group | ms per step | share of {unit} time | kernels per step |", "|---|---|---|---|"]
    for name, (ms, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {ms:.2f} | {100 * ms / busy:.1f}% | {n} |")
    lines += ["", f"Top {args.top} by {unit} time:", "", "| kernel | group | ms per step | calls per step |",
              "|---|---|---|---|"]
    for name, ms, n in rows[: args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {group_of(name)} | {ms:.3f} | {n} |")
    if gaps:  # (the profiler's us)
        lines += ["", "Where the GPU waited (no kernel running), the largest, summed per pair of kernels around the "
                  "gap:", "", "| us per step | gaps per step | the kernel before the gap | the kernel after it |",
                  "|---|---|---|---|"]
        lines += [f"| {t:.1f} | {n:g} | `{_short(a)}` | `{_short(b)}` |" for t, n, a, b in gaps]
    summary = {"impl": impl, "wall_ms": wall * 1e3, "busy_ms": busy, "gpu_busy_ms": union,
               "groups": {k: v[0] for k, v in groups.items()}, "gaps": gaps}
    return "\n".join(lines), summary


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="B/16")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--mask", type=float, default=0.0)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--impls", nargs="+", default=["clipfast", "open_clip"], choices=sorted(BUILDERS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--precision", choices=["auto", "mixed", "fp32"], default="auto",
                    help="mixed: clipfast bf16_master, open_clip amp_bf16 (as throughput.py); auto: mixed on CUDA")
    ap.add_argument("--layer-norm", choices=["torch", "triton"], default="torch",
                    help="clipfast's layer norms (CLIP.set_layer_norm), as throughput.py --clipfast-layer-norm")
    ap.add_argument("--vision-attention", choices=["sdpa", "triton"], default="sdpa",
                    help="clipfast's image-tower attention (CLIP.set_vision_attention), as throughput.py "
                         "--clipfast-vision-attention")
    ap.add_argument("--tower-streams", choices=["on", "off"], default="on",
                    help="clipfast's text tower on its own CUDA stream (CLIP.set_tower_streams), as throughput.py")
    ap.add_argument("--knob", nargs="+", metavar="MODULE.NAME=VALUE",
                    help="kernel switches, as bench/throughput.py's --knob")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="output folder (default bench/results/<device>-<date>)")
    args = ap.parse_args(argv)
    if bench_steps.knob_problems(args.knob):
        ap.error("; ".join(bench_steps.knob_problems(args.knob)))
    bench_steps.LAYER_NORM = args.layer_norm
    bench_steps.VISION_ATTENTION = args.vision_attention
    bench_steps.TOWER_STREAMS = args.tower_streams == "on"
    knobs = bench_steps.set_knobs(args.knob)
    device = torch.device(args.device)
    args.size = snap(args.size, from_name(args.preset).vision.stride)
    name, slug = device_info(device)
    import datetime

    out = Path(args.out or ROOT / "bench" / "results" / f"{slug}-{datetime.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    parts, summaries = [f"# Step profile: {name}, {datetime.date.today().isoformat()}, commit `{git_commit()}`, "
                        f"torch {torch.__version__}" + "".join(f", {k}={v}" for k, v in knobs.items())], []
    for impl in args.impls:
        try:
            md, summary = profile(impl, args, device)
        except Exception as e:  # e.g. open_clip not installed: note it, go on
            md, summary = f"### {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", None
        print(md, flush=True)
        parts.append(md)
        if summary:
            summaries.append(summary)
    (out / "profile.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out / 'profile.md'}", file=sys.stderr)
    return summaries


if __name__ == "__main__":
    main()
