"""Launch-config sweep of clipfast's opt-in kernels at the CLIPA goal shapes, beside torch's ops: device time per call.

    python bench/sweep_kernels.py --out bench/results/<dir>        # CUDA; ~60 s on an H100 (about 45 compiles)
    TRITON_INTERPRET=1 python bench/sweep_kernels.py --smoke       # CPU: tiny shapes, two configs each, no timing

Why: the kernels' tiles and program counts were chosen from sm_90 compiles (registers, spills) without a GPU. The H100
suite at 5cc21e3 (bench/results/nvidia-h100-80gb-hbm3-2026-11-26-5cc21e3/profile.md) timed them inside a B/16 step:
the layer-norm backward at 5.4 ms for 51 calls and the GELU backward at 5.4 ms for 24, each ~1.5x what its bytes
need at HBM speed. This measures each candidate config directly, with CUDA events (triton.testing.do_bench, median),
and checks every config's outputs against the current default's before it is timed: a config that is fast but wrong
is reported as wrong, never as a winner.

Kernels and shapes (bf16, the vision tower at the goal points: B/16 112 px batch 1024 = 51,200 rows x 768, MLP
3,072; L/16 96 px batch 512 = 18,944 rows x 1,024, MLP 4,096):
- add_layer_norm backward (HAS_RES, HAS_RB: the pre-norm blocks' path, the residual's bias gradient too): BLOCK_M x
  num_warps x programs per SM, and the row loop's loads pipelined 2-3 tiles deep (kernels.layer_norm.BWD_STAGES) at
  a few of them; timed with its partial-sum finish (kernels._common.finish_sums), as the model runs
  it; torch: F.layer_norm backward + the add + the bias gradient's sum
- add_layer_norm forward (with the residual's bias): BLOCK_M x num_warps; torch: the adds + F.layer_norm
- GELU backward with the bias gradient: BLOCK_M x BLOCK_N x num_warps x programs per SM (and the loads pipelined,
  kernels.gelu.BWD_STAGES, at a few), with its finish; torch:
  GeluBackward + the bias-gradient sum
- short attention (N = 50 and 37, d = 64, one tile per sequence and head, the qkv bias in the kernels as the model
  runs them): forward and backward num_warps x num_stages, the one-tile forward kernel and several (sequence, head)
  pairs per program (kernels.short_attention.FWD_HEADS / BWD_HEADS); torch: bias add + SDPA forward, SDPA backward
  + the stack + the bias sum
- AdamW over fp32 masters of bf16 weights (kernels.adamw) on one MLP weight: BLOCK x num_warps; torch: fused AdamW
  over fp32, and the cast + fused AdamW + copy that MasterAdamW ran before the kernel
- the partial sums' finish (kernels._common.finish_sums) at the layer norm's, the GELU bias's and the qkv bias's
  partial-sum shapes: BLOCK_C x rows per tile x num_warps; torch: part.sum(0).to(dtype)
- the column sums (kernels.column_sums) of the text tower's qkv-bias gradient and the image tower's position-embedding
  gradient: BLOCK_M x BLOCK_N x num_warps, programs per SM at the default tile; torch: x.sum(0)
- the MLP's fused matmuls (kernels.mlp, opt-in): forward and backward, tiles x warps x stages x persistence; torch:
  cuBLAS + GELU forward, cuBLAS + kernels.linear_gelu's GELU backward
Writes sweep.md (one table per kernel and shape, fastest first, the default and torch marked) and sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from bench import sweeps  # noqa: E402


def _timer(device, rep_ms: int):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")

    def cpu(fn):  # --smoke: runs the function once; the numbers mean nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def markdown(results: dict, meta: dict) -> str:
    out = [f"# Kernel launch-config sweep: {meta['device']}, {meta['date']}, commit `{meta['commit']}`", "",
           f"torch {meta['torch']}, triton {meta['triton']}; "
           + ("median device time per call (triton.testing.do_bench, CUDA events)" if not meta.get("smoke") else
              "--smoke: one run of each config in Triton's interpreter, whose times mean nothing")
           + "; each config's outputs checked against the default's first. "
           + f"Command: `{meta['command']}`", ""]
    for shape, per_kernel in results.items():
        for kernel, rows in per_kernel.items():
            ok = sorted((r for r in rows if r.get("ms") is not None), key=lambda r: r["ms"])
            bad = [r for r in rows if r.get("ms") is None]
            base = next((r["ms"] for r in rows if r.get("default") and r.get("ms")), None)
            out += [f"## {kernel}, {shape}", "", "| config | ms | vs default |", "|---|---|---|"]
            for r in ok:
                tag = " (default)" if r.get("default") else ""
                rel = f"{base / r['ms']:.2f}×" if base else "–"
                out.append(f"| {'**' + r['config'] + '**' if r.get('torch') else r['config'] + tag} | "
                           f"{r['ms']:.4f} | {rel} |")
            out += [f"| {r['config']} | – | {r['error']} |" for r in bad]
            out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for sweep.md and sweep.json (default: print only)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two configs per kernel (CPU interpreter)")
    ap.add_argument("--rep-ms", type=int, default=25, help="do_bench's measuring time per config, ms")
    names = ["add_ln", "gelu", "attention", "adamw", "finish", "colsum", "mlp"]
    ap.add_argument("--kernels", nargs="+", default=names, choices=names)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("sweep_kernels.py times CUDA kernels: run it on a GPU, or with --smoke under "
                         "TRITON_INTERPRET=1 to check the harness")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("sweep_kernels.py --smoke without a GPU runs the kernels in Triton's interpreter: set "
                         "TRITON_INTERPRET=1 (TRITON_INTERPRET=1 python bench/sweep_kernels.py --smoke)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = _timer(device, args.rep_ms)
    fns = {name: getattr(sweeps, f"sweep_{name}") for name in args.kernels}
    from bench.report import device_info, git_commit

    meta = dict(device=device_info(device)[0], date=time.strftime("%Y-%m-%d"), commit=git_commit(),
                torch=torch.__version__, triton=triton.__version__, smoke=args.smoke,
                command="python bench/sweep_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    results = {}
    t0 = time.time()
    for shape, s in (sweeps.SMOKE if args.smoke else sweeps.SHAPES).items():
        results[shape] = {}
        for name in args.kernels:
            results[shape].update(fns[name](s, device, dtype, timer, args.smoke))
            print(f"[{time.time() - t0:.0f} s] {shape}: {name} done", flush=True)
            if args.out:  # after each kernel: a run cut short keeps what it measured
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "sweep.md").write_text(markdown(results, meta) + "\n")
                (args.out / "sweep.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    print(markdown(results, meta))
    return results


if __name__ == "__main__":
    main()
