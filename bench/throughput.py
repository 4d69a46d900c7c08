"""Training throughput against token length: clipfast next to open_clip 3.3.0 at the same settings.

    python bench/throughput.py                    # CPU grid: ViT-S-16, 64-112 px, mask 0.5, text 8-77 (~3 min)
    python bench/throughput.py --grid gpu         # S/16, B/16, L/14, H/14 at 64-224 px, text 8-77, masks at 224 px
    python bench/throughput.py --presets B/16 --sizes 112 224 --masks 0.5 --text-lens 16 77 --batch 64
    python bench/throughput.py --grid clipa       # the CLIPA goal points: B/16 at 112 px / 16, L/16 at 96 px / 8

A grid point is (preset, image size, mask ratio, text length); the preset at its own size, no mask and its full
text context is always measured too ("full tokens"). At each point clipfast's CLIP and open_clip's CLIP of the
same architecture (force_image_size / force_context_length; patch_dropout set to keep the same number of
patches) run full training steps: forward, local-loss InfoNCE, backward, AdamW. The two alternate step by step
in one process, so load from other work on a shared machine falls on both alike, and the median step time
after warm-up is kept (CUDA events on a GPU). Precision: bf16 autocast over fp32 weights on CUDA, fp32 on CPU.

Batches are synthetic, made on the device before timing, so the data path is not timed (--data DIR times
clipfast with its DALI loader instead, and skips open_clip). Captions have realistic lengths: log-normal with
median 12 tokens (start and end included), clipped to [2, text length]; packed end to end for clipfast,
padded to the text length for open_clip, which is what each does in training.

Columns: step time, samples/s, tokens/s (kept patches + real caption tokens), TFLOP/s and MFU from
clipfast.flops over useful work (kept patches, real tokens: the same FLOPs for both, so padding that open_clip
computes counts as waste), peak memory (weights + optimizer state + the step's transient peak: CUDA allocator
on a GPU, the profiler's allocation trace on CPU), the speed-up over the same preset at full tokens next to the
FLOP ratio and their quotient (scaling efficiency), and clipfast / open_clip.

On CUDA a third column, "graphs", runs clipfast's step as CUDA graphs (clipfast.graph.GraphedTrainStep: text
padded to a bucket, the whole step replayed by one launch); --no-cuda-graph leaves it out. --compile adds
"compiled": the eager step with each transformer block's layer norms, projections, MLP and residuals through
torch.compile (clipfast.model.CLIP.compile_blocks; compiled in the warm-up). --kernels adds "kernels": the eager
step with the opt-in kernels, kernels.layer_norm (with the residual adds), kernels.short_attention (the image tower)
and kernels.linear_gelu, beside the plain one in the same interleaved run, with their ratio ("kernels / clipfast");
with the graphs column also "graphs+kernels", the CUDA-graph step with the same kernels, with its ratios to open_clip
and to the plain graphs ("graphs+kernels / graphs": the kernels' device time, without the launch cost the eager
step pays for each Triton call). Batch: the GPU grid
scales each preset's batch up where a point has fewer image tokens than the full one, by the largest power of
two up to --max-batch-scale (4) that the token ratio allows, as a CLIPA run would (same memory, more samples);
--batch fixes it. Writes throughput.{md,csv,json,png}
under --out (default bench/results/<device>-<date>/).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/throughput.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bench.steps as bench_steps  # noqa: E402
from bench.measure import persistent_bytes, step_peak_bytes, time_interleaved  # noqa: E402
from bench.points import (  # noqa: E402
    CAPTION_MEDIAN,
    CAPTION_SIGMA,
    GRIDS,
    Batch,
    Point,
    cpu_has_amx,
    grid_points,
    make_batch,
    parse_points,
    point_batch,
)
from bench.report import (  # noqa: E402
    device_info,
    git_commit,
    plot,
    readme_section,
    update_readme,
    write_outputs,
)
from bench.steps import BUILDERS  # noqa: E402
from clipfast.flops import flops_per_sample  # noqa: E402
from clipfast.presets import from_name  # noqa: E402
from clipfast.reduce import num_kept  # noqa: E402

# ---- measurement helpers (the rest in bench/measure.py) ----------------------------------------------------

def data_step_times(step, loader, n_warm: int, n_steps: int, device) -> tuple[list[float], float]:
    """--data: clipfast steps fed by its DALI loader, timed with the loader (wall clock, synced per step)."""
    def run():
        raw = next(loader)
        b = Batch(raw["images"], None, raw["text"], raw["cu_seqlens"], raw["max_len"], None,
                  (raw["cu_seqlens"][1:] - raw["cu_seqlens"][:-1]).cpu())
        step(b)
        return b

    for _ in range(n_warm):
        run()
    times, tokens = [], []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        b = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # note: sync per step, so the wall clock covers the device work
        times.append(time.perf_counter() - t0)
        tokens.append(float(b.lengths.float().mean()))
    return times, statistics.fmean(tokens)


# ---- one grid point -------------------------------------------------------------------------------------------

# columns whose first step may fail (what it does, for the message) without costing the point: the failure is
# printed, kept in the row as <name>_error, and the column left out
OPTIONAL_COLUMNS = {"clipfast_graph": "CUDA graph capture", "clipfast_compiled": "torch.compile",
                    "clipfast_kernels": "the opt-in kernels",
                    "clipfast_graph_kernels": "CUDA graph capture with the opt-in kernels"}

def _warm_up(step, batches, n: int, impl: str, pt: Point) -> None:
    """Steps 1..n-1 (after the profiled step: its teardown slowed the next step on the CPU); a non-finite loss at the
    end raises (one sync per model)."""
    loss = None
    for i in range(1, n):
        loss = step(batches[i % len(batches)])
    if loss is not None and not math.isfinite(loss.item()):
        raise FloatingPointError(f"{impl}: non-finite loss at {pt.label}")


def _leave_out(impl: str, why: str, error: str, impls: list, mem: dict, row: dict, device) -> None:
    """An optional column that failed: why printed, error kept in the row as <name>_error, the column removed from
    impls and mem; its memory goes back to the next column (the caller has dropped its own references first)."""
    print(f"{OPTIONAL_COLUMNS[impl]} {why}", file=sys.stderr)
    row[impl.replace("clipfast_", "") + "_error"] = error
    impls.remove(impl)
    mem.pop(impl, None)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _time_dropping_on_oom(steps: dict, batches, args, device, impls: list, mem: dict, row: dict):
    """time_interleaved; where the device runs out of memory in it (every column built and warmed, but the eager
    columns' activations and the graphs' private pools together past the device: five L/16 columns on an 80 GB H100,
    dab88c7), the optional column built last is left out, its error in the row, and the timing runs again; with no
    optional column left the error is raised (the point fails)."""
    while True:
        try:
            return time_interleaved(steps, batches, args.steps, device)
        except torch.OutOfMemoryError as e:
            optional = [i for i in impls if i in OPTIONAL_COLUMNS]
            if not optional:
                raise
            impl, msg = optional[-1], str(e)
            del steps[optional[-1]], e
            _leave_out(impl, f"left out: out of memory while timing all columns: {msg[:300]}",
                       f"OutOfMemoryError while timing: {msg[:200]}", impls, mem, row, device)


def measure(pt: Point, args, device, have_open_clip: bool) -> dict:
    cfg = from_name(pt.preset, **{"vision.image_size": pt.size, "text.context_length": pt.text_len})
    n = cfg.vision.num_patches
    k = num_kept(n, pt.mask)
    bs = point_batch(args, pt, k)
    gen = torch.Generator().manual_seed(args.seed)
    pixel_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    batches = [make_batch(bs, pt.size, pt.text_len, gen, device, pixel_dtype) for _ in range(args.batches)]
    text_tokens = statistics.fmean(float(b.lengths.float().mean()) for b in batches)
    row = dict(preset=pt.preset, image_px=pt.size, mask=pt.mask, image_tokens=k, text_len=pt.text_len,
               batch=bs, load_1min=round(os.getloadavg()[0], 2))
    # the required columns first, then the optional ones, the --kernels headline (graphs+kernels) first among them:
    # every column's model stays alive for the interleaved timing, so where the device runs out of memory (five L/16
    # columns of ~23 GB on an 80 GB H100) the columns built last are the ones left out
    impls = ["clipfast"]
    if args.deepspeed and not args.data:
        impls.append("clipfast_ds")
    if have_open_clip and not args.data:
        impls.append("open_clip")
    graphs = device.type == "cuda" and not args.no_cuda_graph and not args.data
    if graphs and args.kernels:
        impls.append("clipfast_graph_kernels")
    if graphs:
        impls.append("clipfast_graph")
    if args.kernels and not args.data:
        impls.append("clipfast_kernels")
    if args.compile and not args.data:
        impls.append("clipfast_compiled")
    impls = [i for i in impls if i not in args.skip]
    steps, mem = {}, {}
    for impl in list(impls):
        torch.manual_seed(args.seed)
        precision = args.precision if impl == "open_clip" else args.clipfast_precision
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
        model = opt = step = None
        if impl not in OPTIONAL_COLUMNS:
            model, opt, step = BUILDERS[impl](cfg, pt, device, precision, bs)
        if impl == "clipfast_ds":  # DeepSpeed's optimizer keeps fp32 partitions outside .state: count what it allocated
            step(batches[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                held = torch.cuda.memory_allocated(device) - before
            else:  # CPU, fp32, ZeRO stage 0 on one rank: the engine steps the torch optimizer itself, whose state
                # holds the two Adam moments (weights + moments: 12 bytes a parameter; no fp32 copy in fp32)
                held = persistent_bytes(model, getattr(opt, "optimizer", opt))
            mem[impl] = held + step_peak_bytes(step, batches[0], device)
            _warm_up(step, batches, args.warmup, impl, pt)
        elif impl in OPTIONAL_COLUMNS:
            # the graph's first call is the eager step + capture, so its peak is what the graph holds; the compiled
            # step's first call compiles, the kernels step's first call compiles its Triton kernels. A failure here or
            # in the warm-up below (a non-finite loss too) costs its column, not the point.
            try:
                model, opt, step = BUILDERS[impl](cfg, pt, device, precision, bs)  # may run out of memory too
                if not impl.startswith("clipfast_graph"):
                    step(batches[0])
                mem[impl] = persistent_bytes(model, opt) + step_peak_bytes(step, batches[0], device)
                _warm_up(step, batches, args.warmup, impl, pt)
            except Exception as e:
                kind, msg = type(e).__name__, str(e)
                del model, opt, step, e  # the exception's traceback holds the step's tensors
                _leave_out(impl, f"FAILED at {pt.label}, column left out: {kind}: {msg[:500]}", f"{kind}: {msg[:200]}",
                           impls, mem, row, device)
                continue
        else:
            step(batches[0])  # allocates the optimizer state, so the memory step below sees only transients
            mem[impl] = persistent_bytes(model, opt) + step_peak_bytes(step, batches[0], device)
            _warm_up(step, batches, args.warmup, impl, pt)
        steps[impl] = step
    model = opt = step = None  # the last column's model lives on in steps only, so dropping its step frees it
    cpu_times = None
    if args.data:
        from clipfast.data import DaliLoader
        from clipfast.reduce import TextReducer

        loader = DaliLoader(args.data, bs, pt.size, TextReducer(length=pt.text_len), device=device, seed=args.seed,
                            reader_process=device.type == "cuda")  # (as the trainer's reader_process=auto)
        wall, text_tokens = data_step_times(steps["clipfast"], loader, args.warmup, args.steps, device)
        loader.close()
        times = wall = {"clipfast": wall}
    else:
        wall, cpu_times = _time_dropping_on_oom(steps, batches, args, device, impls, mem, row)
        times = cpu_times if args.timer_used == "cpu" else wall
    row["text_tokens"] = round(text_tokens, 2)
    row["pad_frac"] = round(1 - text_tokens / pt.text_len, 3)
    fl = flops_per_sample(cfg, k, text_tokens, training=True)
    row["gflop_per_sample"] = round(fl / 1e9, 3)
    # what open_clip executes: the padded text and the patch embedding of every patch (it drops after conv1)
    v = cfg.vision
    fl_oc = flops_per_sample(cfg, k, pt.text_len, training=True) + 3 * 2 * (n - k) * 3 * v.patch_size**2 * v.width
    if "open_clip" in impls:
        row["open_clip_exec_flop_ratio"] = round(fl_oc / fl, 3)
    for impl in impls:
        t = statistics.median(times[impl])
        q = statistics.quantiles(times[impl], n=4) if len(times[impl]) > 1 else [t, t, t]
        sps = bs / t
        row.update({
            f"{impl}_ms": round(t * 1e3, 2), f"{impl}_iqr_ms": round((q[2] - q[0]) * 1e3, 2),
            f"{impl}_wall_ms": round(statistics.median(wall[impl]) * 1e3, 2),
            f"{impl}_samples_s": round(sps, 2), f"{impl}_tokens_s": round(sps * (k + text_tokens), 1),
            f"{impl}_tflops": round(sps * fl / 1e12, 4),
            f"{impl}_mfu": round(sps * fl / args.peak, 4) if args.peak else None,
            f"{impl}_peak_mib": round(mem[impl] / 2**20, 1),
        })
    if "open_clip" in impls:
        row["vs_open_clip_wall"] = round(row["open_clip_wall_ms"] / row["clipfast_wall_ms"], 3)
    row["load_1min_end"] = round(os.getloadavg()[0], 2)
    return row


# ---- main -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None, help="preset grid (default: gpu on CUDA, else cpu)")
    ap.add_argument("--presets", nargs="+", help="preset names or aliases (S/16, B/16, ...)")
    ap.add_argument("--points", nargs="+", metavar="PRESET:SIZE:TEXT[:MASK]",
                    help="exactly these points (then each preset's full-token point), instead of the grid; "
                         "e.g. B/16:112:16 L/16:96:8 (the CLIPA goal points)")
    ap.add_argument("--sizes", nargs="+", type=int, help="image sides in px (snapped to the patch size)")
    ap.add_argument("--masks", nargs="*", type=float, help="mask ratios, measured at the largest size")
    ap.add_argument("--text-lens", nargs="+", type=int,
                    help="caption clip lengths = open_clip's context length, measured in this order")
    ap.add_argument("--batch", type=int, help="batch size (gpu grid default: per preset, scaled, see below)")
    ap.add_argument("--max-batch-scale", type=int,
                    help="grow the preset's batch by up to this power of two at points with fewer image tokens")
    ap.add_argument("--no-cuda-graph", action="store_true", help="leave out the CUDA-graph column (CUDA only)")
    ap.add_argument("--compile", action="store_true",
                    help="add a column: clipfast with its blocks' non-attention part compiled (CLIP.compile_blocks)")
    ap.add_argument("--kernels", action="store_true",
                    help="add a column: clipfast with its opt-in kernels (layer norm, vision attention, MLP); on "
                         "CUDA with graphs, also graphs+kernels")
    ap.add_argument("--kernels-mlp", choices=["triton", "triton_gemm"], default="triton",
                    help="the MLP in the kernels columns (CLIP.set_mlp): kernels.linear_gelu, or kernels.mlp (the "
                         "GELU inside Triton matmuls)")
    ap.add_argument("--tower-streams", choices=["on", "off"], default="on",
                    help="clipfast's columns (not --deepspeed's) run the text tower on a second CUDA stream beside "
                         "the image tower, as clipfast.train does with engine=torch on CUDA (CLIP.set_tower_streams); "
                         "off: one stream, as before c9d6f1c")
    ap.add_argument("--knob", nargs="+", metavar="MODULE.NAME=VALUE",
                    help="set kernel switches for the run (bench/steps.py KNOBS), e.g. short_attention.FWD_HEADS=1 "
                         "adamw.SLOTS=1 _common.FINISH=torch: a variant against the default, in the tables' notes")
    ap.add_argument("--deepspeed", action="store_true",
                    help="add a column: clipfast through DeepSpeed's engine as clipfast.train runs it (one rank)")
    ap.add_argument("--steps", type=int, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, help="untimed steps first (at least one per distinct batch)")
    ap.add_argument("--batches", type=int, help="distinct synthetic batches cycled through")
    ap.add_argument("--timer", choices=["auto", "wall", "cpu"], default="auto",
                    help="cpu: process CPU time (auto on CPU with 1 thread); wall: perf_counter / CUDA events")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="CPU intra-op threads (cpu grid default: 1, see GRIDS)")
    ap.add_argument("--precision", choices=["amp_bf16", "bf16", "fp32"],
                    help="open_clip's (clipfast's too, unless --clipfast-precision): amp_bf16 on CUDA, else fp32")
    ap.add_argument("--clipfast-precision", choices=["bf16_master", "amp_bf16", "bf16", "fp32"],
                    help="clipfast's; default on CUDA bf16_master, as clipfast.train runs (DeepSpeed bf16: bf16 "
                         "weights and activations, fp32 master weights in the optimizer), else --precision")
    ap.add_argument("--clipfast-layer-norm", choices=["torch", "triton"], default="torch",
                    help="clipfast's layer norms (CLIP.set_layer_norm): torch's, or kernels.layer_norm on CUDA")
    ap.add_argument("--clipfast-vision-attention", choices=["sdpa", "triton"], default="sdpa",
                    help="clipfast's image-tower attention (CLIP.set_vision_attention): SDPA, or "
                         "kernels.short_attention on CUDA for <= 64 tokens")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: clipfast.build.peak_flops)")
    ap.add_argument("--no-open-clip", action="store_true", help="skip the open_clip column")
    ap.add_argument("--skip", nargs="+", default=[], choices=sorted(OPTIONAL_COLUMNS),
                    help="leave out these optional columns (e.g. all but graphs+kernels, for a quick A/B of a --knob)")
    ap.add_argument("--data", help="webdataset shards: time clipfast with its DALI loader (open_clip skipped)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; start no new point after (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="output folder (default bench/results/<device>-<date>)")
    ap.add_argument("--update-readme", action="store_true", help="write the table into README.md's bench section")
    args = ap.parse_args(argv)
    check_args(ap, args)
    grid = GRIDS[args.grid or ("gpu" if args.device.startswith("cuda") else "cpu")]
    for key in ("presets", "sizes", "masks", "text_lens", "batch", "steps", "warmup", "batches", "threads",
                "max_batch_scale"):
        if getattr(args, key) is None:
            setattr(args, key, grid[key])
    args.warmup = max(args.warmup, args.batches)
    args.precision = args.precision or ("amp_bf16" if args.device.startswith("cuda") else "fp32")
    args.clipfast_precision = args.clipfast_precision or (
        "bf16_master" if args.device.startswith("cuda") and args.precision == "amp_bf16" else args.precision)
    return args


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Values no point can run with are usage errors now (exit status 2), not a failure at every point."""
    bad = []
    for key, least in (("sizes", 1), ("text_lens", 2), ("batch", 1), ("steps", 1), ("warmup", 0), ("batches", 1),
                       ("threads", 1), ("max_batch_scale", 1)):  # fmt: skip
        value = getattr(args, key)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if v < least:
                bad.append(f"--{key.replace('_', '-')} {v} (at least {least})")
    bad += [f"--masks {m} (a ratio in [0, 1))" for m in args.masks or [] if not 0 <= m < 1]
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        bad.append(f"--peak-tflops {args.peak_tflops} (above 0)")
    for name in args.presets or []:
        try:
            from_name(name)
        except KeyError as e:
            bad.append(f"--presets: {e.args[0]}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        bad.append(f"--device {args.device}: torch sees no CUDA device here")
    bad += bench_steps.knob_problems(args.knob)
    if args.time_budget < 0:
        bad.append(f"--time-budget {args.time_budget} (0 for none, else seconds above 0)")
    if args.timer == "cpu" and (args.threads or 1) > 1:
        bad.append(f"--timer cpu with --threads {args.threads}: process CPU time sums the threads (their spin-waits "
                   "too), so it is no step time; use --timer wall, or one thread")
    if args.points:
        given = [f"--{k.replace('_', '-')}" for k in ("presets", "sizes", "masks", "text_lens")
                 if getattr(args, k) is not None]
        if given:
            bad.append(f"--points takes the points whole: {', '.join(given)} would be ignored")
        try:
            args.point_groups = parse_points(args.points)
        except SystemExit as e:
            bad.append(str(e))
    if args.data:
        ignored = [f"--{k}" for k in ("deepspeed", "kernels", "compile") if getattr(args, k)]
        if ignored:
            bad.append(f"--data times clipfast's own step with its loader alone: {', '.join(ignored)} would be "
                       "ignored")
        from clipfast.data.shards import list_shards  # (no DALI needed to list them)

        try:
            list_shards(args.data)
        except FileNotFoundError as e:
            bad.append(f"--data: {e}")
    if bad:
        ap.error("; ".join(bad))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    bench_steps.LAYER_NORM = args.clipfast_layer_norm
    bench_steps.VISION_ATTENTION = args.clipfast_vision_attention
    bench_steps.KERNELS["mlp"] = args.kernels_mlp
    bench_steps.TOWER_STREAMS = args.tower_streams == "on"
    knobs = bench_steps.set_knobs(args.knob)
    if args.threads:
        torch.set_num_threads(args.threads)
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    args.timer_used = "cpu" if device.type == "cpu" and (args.timer == "cpu" or args.timer == "auto" and one_thread) \
        else "wall"
    have_open_clip = False
    note = ""
    if not args.no_open_clip:
        try:
            import open_clip

            have_open_clip = True
            note = f"open_clip {open_clip.__version__}"
        except ImportError as e:
            note = f"open_clip not installed ({e}): its column is skipped"
            print(f"note: {note}", file=sys.stderr)
    if args.data:
        note = "--data: clipfast timed with its DALI loader; open_clip skipped"
        args.timer_used = "wall"  # the loader's work runs in DALI's threads too
    if args.peak_tflops:
        args.peak = args.peak_tflops * 1e12
    else:
        try:
            from clipfast.build import peak_flops

            args.peak = peak_flops(device)
        except ImportError:
            args.peak = None
    name, slug = device_info(device)
    today = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / "bench" / "results" / f"{slug}-{today}")
    earlier = [f for f in (out / f"throughput.{ext}" for ext in ("md", "csv", "json", "png")) if f.exists()]
    if earlier:  # (the default folder is per device and day: a second run that day writes into the first's)
        print(f"note: {out} holds an earlier run's results; this run replaces them once it has measured a point",
              file=sys.stderr)
    import triton

    # (10 timed steps, the GPU grids' default, left the goal points' medians 1-2% apart between H100 runs of the same
    # code on 2026-11-28: --steps buys a steadier median)
    counted = f"{args.steps} steps per column, interleaved, after {args.warmup} warm-up"
    meta = dict(device=name, date=today, commit=git_commit(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), open_clip=note,
                precision=(args.precision if args.clipfast_precision == args.precision else
                           f"clipfast {args.clipfast_precision}, open_clip {args.precision}")
                # the DeepSpeed column runs the engine as clipfast.train does, whatever the flags say
                + ("" if not args.deepspeed or args.data else
                   ", DeepSpeed column bf16 (the engine's)" if device.type == "cuda" else ", DeepSpeed column fp32")
                + ("" if args.clipfast_layer_norm == "torch" else f", clipfast layer norm {args.clipfast_layer_norm}")
                + ("" if args.clipfast_vision_attention == "sdpa"
                   else f", clipfast vision attention {args.clipfast_vision_attention}")
                + ("" if args.kernels_mlp == "triton" else f", kernels columns' MLP {args.kernels_mlp}")
                + ("" if args.tower_streams == "on" or device.type != "cuda"
                   else ", clipfast's towers on one CUDA stream (--tower-streams off)")
                + "".join(f", {k}={v}" for k, v in knobs.items()),
                knobs=knobs,
                kernels_mlp={"triton": "kernels.linear_gelu", "triton_gemm": "kernels.mlp"}[args.kernels_mlp],
                threads=torch.get_num_threads(), peak_tflops=args.peak / 1e12 if args.peak else None,
                load_start=os.getloadavg(), argv=sys.argv[1:] if argv is None else list(argv),
                captions=f"log-normal lengths, median {CAPTION_MEDIAN}, sigma {CAPTION_SIGMA}, clipped to [2, text "
                         f"len]; packed for clipfast" + (", padded to text len for open_clip" if have_open_clip else "")
                         if not args.data else f"from the shards in {args.data}, truncated to the text length, packed",
                timing={"cpu": "median process CPU time per step (1 intra-op thread: immune to time-slicing by other "
                               f"jobs), {counted}; wall-clock medians in the CSV",
                        "wall": (f"median wall time per step, {counted}" if not args.data else
                                 "median wall time per step of clipfast's one column, each step's batch from the "
                                 f"loader, {args.steps} steps after {args.warmup} warm-up")
                                + (" (CUDA events)" if device.type == "cuda" else "")}[args.timer_used])
    groups = args.point_groups if args.points else grid_points(args.presets, args.sizes, args.masks, args.text_lens)
    n_points = sum(map(len, groups.values()))
    rows, skipped, t0 = [], [], time.perf_counter()
    print(f"# {name} | torch {torch.__version__} | triton {triton.__version__} | {note} | {n_points} points",
          file=sys.stderr)
    if device.type == "cpu" and args.precision == "fp32" and cpu_has_amx():
        print("# this CPU has AMX (fast bf16 matmuls): --precision amp_bf16 --clipfast-precision bf16_master times "
              "both libraries in their mixed precision, as on a GPU", file=sys.stderr)
    i = 0
    for g, points in enumerate(groups.values()):
        # the time budget is shared out per preset (what one leaves over goes to the next), so a slow preset
        # cannot starve the ones after it
        left = args.time_budget - (time.perf_counter() - t0)
        deadline = time.perf_counter() + left / (len(groups) - g)
        for pt in points:
            i += 1
            if args.time_budget and time.perf_counter() > deadline:
                skipped.append(f"{pt.label} (time budget)")
                continue
            try:
                row = measure(pt, args, device, have_open_clip)
            except Exception as e:  # e.g. out of memory or a kernel that fails to compile: note it, go on
                print(f"[{i}/{n_points}] {pt.label}: FAILED {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                skipped.append(f"{pt.label} ({type(e).__name__})")
                row = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row is None:
                continue
            if not rows:  # the first point measured: the earlier run's files go (its plot would stay beside ours)
                out.mkdir(parents=True, exist_ok=True)
                for f in earlier:
                    f.unlink(missing_ok=True)
            rows.append(row)
            print(f"[{i}/{n_points}] {pt.label}: clipfast {row['clipfast_ms']} ms, open_clip "
                  f"{row.get('open_clip_ms', '–')} ms, load {row['load_1min']} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
            write_outputs(rows, meta, skipped, out, t0)  # after every point: a run cut short keeps what it measured
    if not rows:  # every point failed (or none fit the time budget): a failed run, not an empty success; the earlier
        # results in --out and the README's section stay as they were
        raise SystemExit(f"throughput.py: no point was measured, nothing written ({'; '.join(skipped)})")
    md = write_outputs(rows, meta, skipped, out, t0)
    print(md)
    plot(rows, out / "throughput.png", f"training throughput, {name}, {meta['date']}, commit {meta['commit']}")
    if args.update_readme:
        rel = os.path.relpath((out / "throughput.png").resolve(), ROOT)  # (an --out outside the checkout: ../..)
        shown = [a for a in (argv or sys.argv[1:]) if a != "--update-readme"]
        update_readme(readme_section(md, rel, shlex.join(["python", "bench/throughput.py", *shown])))
    print(f"wrote {out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
