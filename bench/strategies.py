"""The "Scaling (Down) CLIP" training strategies side by side on the CPU demo: CLIP, CLIP + data augmentation, FLIP,
SLIP, and CLIP with a ResNet image tower, each on all of the training data and on half of it, same steps, batch and
seed.

    python bench/strategies.py                       # 10 runs of configs/demo.py, ~2-7 min each on 2 CPU cores
    python bench/strategies.py --runs clip clip_da --steps 300 --seeds 0 1
    python bench/strategies.py --runs resnet --append   # add to (or redo in) the results already in --out

Each run is `deepspeed clipfast/train.py --config configs/demo.py <overrides>` (one rank); the zero-shot top-1/top-5
on the held-out digits come from its eval.json, samples/s from its metrics.jsonl (the median over the log lines
after the first). Writes results.md (the table), results.json and strategies.png under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the strategies as overrides of configs/demo.py (configs/strategies.py has the same four on ViT-B/16); SLIP's head
# is scaled to the demo's 128-wide image tower (SLIP: 4096 hidden, 256 out on ViT-B's 768)
STRATEGIES = {
    "clip": [],
    "clip_da": ["augment=simclr"],
    "clip_da_noflip": ["augment=simclr_noflip"],  # the same without the flip (a mirrored digit is another digit)
    "flip": ["image_reduction=random", "mask_ratio=0.5"],
    "slip": ["ssl_weight=1", "ssl_hidden=512", "ssl_dim=128"],
    "resnet": ["model=demo-rn"],  # CLIP with a ResNet image tower (open_clip's ModifiedResNet, 1.3 M parameters)
}


def run_one(name: str, data: str, half: bool, steps: int, seed: int, out: Path, threads: int = 0) -> dict:
    shards = sorted((Path(data) / "train").glob("*.tar"))
    if half and len(shards) < 2:
        raise ValueError(f"--half needs at least 2 training shards in {data}/train, found {len(shards)}")
    train = ",".join(map(str, shards[: len(shards) // 2] if half else shards))
    run_dir = out / f"{name}{'_half' if half else ''}_s{seed}"
    with socket.socket() as sock:  # a free port: DeepSpeed's default 29500 may be another run's
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", port, "clipfast/train.py", "--config",
           "configs/demo.py",
           f"train_data={train}", f"val_data={data}/val", f"out_dir={run_dir}", f"steps={steps}", f"seed={seed}",
           "tensorboard=false", f"ckpt_every={steps}", "overwrite=true", *STRATEGIES[name]]  # (a rerun: afresh)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    if threads:  # torch's intra-op threads per run: 1 where other jobs share the cores (oversubscribed, 2 threads per
        env["OMP_NUM_THREADS"] = str(threads)  # process ran the demo at 45 samples/s instead of ~900)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    ev = json.loads((run_dir / "eval.json").read_text())
    m = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sps = statistics.median(x["samples_per_s"] for x in m[1:]) if len(m) > 1 else m[0]["samples_per_s"]
    return {"strategy": name, "data": "half" if half else "all", "train_shards": len(train.split(",")),
            "seed": seed, "steps": steps, "top1": ev["top1"], "top5": ev["top5"], "final_loss": m[-1]["loss"],
            "samples_per_s": sps, "wall_s": wall, "threads": threads or os.environ.get("OMP_NUM_THREADS"),
            "overrides": STRATEGIES[name]}


def table(rows: list[dict]) -> str:
    lines = ["| strategy | data | seed | zero-shot top-1 | top-5 | final loss | samples/s (median) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['data']} ({r['train_shards']} shards) | {r['seed']} | "
                     f"{100 * r['top1']:.2f}% | {100 * r['top5']:.2f}% | {r['final_loss']:.3f} | "
                     f"{r['samples_per_s']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in STRATEGIES if any(r["strategy"] == n for r in rows)]  # in STRATEGIES' order
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, data in enumerate(("all", "half")):
        for i, n in enumerate(names):
            vals = [100 * r["top1"] for r in rows if r["strategy"] == n and r["data"] == data]
            if vals:
                x = i + (j - 0.5) * 0.38
                ax.bar(x, statistics.mean(vals), width=0.36, color=("C0", "C1")[j],
                       label=f"{data} of the training data" if i == 0 else None)
                ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("zero-shot top-1 (%)")
    lo = min(100 * r["top1"] for r in rows)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.set_title("training strategies on the CPU demo (digits), same steps and batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--data", default="data/demo", help="the demo data (python -m clipfast.data.demo --out DIR)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-half", action="store_true", help="only the runs on all of the training data")
    ap.add_argument("--out", default=None, help="default bench/results/strategies-demo-<date>")
    ap.add_argument("--append", action="store_true", help="keep --out's other rows (same strategy/data/seed: redone)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per run (0: as set)")
    ap.add_argument("--runs-dir", default="runs/strategies", help="the runs' own folders (checkpoints, metrics)")
    args = ap.parse_args(argv)
    if not (Path(args.data) / "meta.json").is_file():
        raise SystemExit(f"no demo data at {args.data!r}: python -m clipfast.data.demo --out {args.data}")
    out = Path(args.out or ROOT / "bench/results" / f"strategies-demo-{datetime.date.today()}")
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for seed in args.seeds:
        for half in (False,) if args.no_half else (False, True):
            for name in args.runs:
                rows.append(run_one(name, args.data, half, args.steps, seed, Path(args.runs_dir),
                                    args.threads))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    for r in rows:
        r.update(commit=commit, date=str(datetime.date.today()), command=" ".join(sys.argv))
    old = []  # read now, not at the start: another --append run into the same folder may have finished meanwhile
    if args.append and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())["rows"]
    done = {(r["strategy"], r["data"], r["seed"]) for r in rows}
    rows = [r for r in old if (r["strategy"], r["data"], r["seed"]) not in done] + rows
    (out / "results.json").write_text(json.dumps({"rows": rows}, indent=1))
    md = table(rows)
    runs = sorted({(r.get("commit", "?"), r.get("date", "?"), r.get("command", "?")) for r in rows})
    head = "\n".join(f"- commit {c}, {d}: `{cmd}`" for c, d, cmd in runs)
    (out / "results.md").write_text(f"{head}\n\n{md}\n")
    plot(rows, out / "strategies.png")
    print(md)


if __name__ == "__main__":
    main()
