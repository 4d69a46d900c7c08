"""The data path's host cost per sample, against what a GPU consumes.

    python bench/data_path.py [--samples 4000] [--out bench/results/data-path-<date>]

On a GPU, DALI decodes and resizes on the device (nvJPEG), but each rank's Python still reads the shards (tar
members, the cheap validity checks of clipfast.data.shards), tokenises and reduces the captions and packs them, on
the thread that launches the training step. A CUDA-graphed step leaves that thread free while the GPU works, so the
data keep up while host time per batch < step time; the eager step (DeepSpeed) launches from the same thread, so
there the host time adds to the step. This script times each host stage on shards like web data (JPEGs cut from
scikit-learn's two sample photos at 256-640 px, quality 75-95; captions of ImageNet class names in CLIP's prompt
templates with extra words, 4-40 words), one process, one thread, and puts the samples/s one host thread sustains
beside the samples/s per GPU of the committed H100 runs (their throughput.json). The DALI loader on this CPU (CPU
decoding) is timed too, for the record: it is not what a GPU run does.

Writes data_path.md / .json under --out. Shards are generated under --work (kept between runs, same seed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H100_RUN = ROOT / "bench/results/nvidia-h100-80gb-hbm3-2026-11-28-0d808c6/kernels/throughput.json"
EXTRA_WORDS = ("a photo of", "close-up", "vintage", "on a white background", "for sale", "high resolution", "in the",
               "garden", "with", "red", "blue", "stock image", "2019", "new", "and", "the", "#", "best", "free",
               "wallpaper", "beautiful", "small", "large", "at night", "café", "illustration")


def make_shards(work: Path, samples: int, per_shard: int = 1000, seed: int = 0) -> list[str]:
    """Web-like shards (kept: the same seed gives the same files)."""
    from PIL import Image

    from clipfast.data.shards import write_shard
    from clipfast.prompts import imagenet_classnames, template_set

    if per_shard != 1000:  # (the kept files are found by name: another split gets a folder of its own)
        work = work / f"{per_shard}-a-shard"
    work.mkdir(parents=True, exist_ok=True)
    want = [work / f"{i:05d}.tar" for i in range((samples + per_shard - 1) // per_shard)]
    if all(p.is_file() for p in want):
        return [str(p) for p in want]
    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in sample_photos(seed)]
    names, templates = imagenet_classnames(), template_set("openai")
    n = 0
    for path in want:
        batch = []
        for _ in range(min(per_shard, samples - n)):
            im = rng.choice(photos)
            w, h = im.size
            cw, ch = rng.randint(w // 3, w), rng.randint(h // 3, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            side = rng.randint(256, 640)
            crop = im.crop((x, y, x + cw, y + ch))
            crop.thumbnail((side, side))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=rng.randint(75, 95))
            words = rng.choice(templates).format(rng.choice(names)).split()
            words += [rng.choice(EXTRA_WORDS) for _ in range(max(0, int(rng.lognormvariate(1.6, 0.7)) - 2))]
            rng.shuffle(words[len(words) // 2:])
            batch.append({"__key__": f"{n:08d}", "jpg": buf.getvalue(), "txt": " ".join(words[:40])})
            n += 1
        write_shard(path, batch)
    return [str(p) for p in want]


def sample_photos(seed: int) -> list:
    """scikit-learn's two sample photos (427x640); where scikit-learn is missing (a GPU image), two made-up ones of
    the same size: smooth colour fields with noise, which JPEG compresses about as much."""
    try:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)
    except ImportError:
        import numpy as np

        g = np.random.default_rng(seed)
        y, x = np.mgrid[0:427, 0:640] / 64.0
        out = []
        for k in range(2):
            base = np.stack([np.sin(x * (1 + k) + c) * np.cos(y + c * k) for c in range(3)], -1) * 80 + 128
            out.append(np.clip(base + g.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        return out


def timed(fn, repeat: int = 3) -> float:
    """The best of `repeat` runs, seconds (one thread: the least disturbed run)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gpu_demand() -> list[dict]:
    """Samples/s per GPU of the committed H100 run's fastest clipfast column at each point."""
    if not H100_RUN.is_file():
        return []
    rows = json.loads(H100_RUN.read_text())["rows"]
    out = []
    for r in rows:
        cols = [(r.get(f"{c}_samples_s") or 0, c) for c in ("clipfast_graph_kernels", "clipfast_kernels",
                                                             "clipfast_graph", "clipfast")]
        sps, col = max(cols)
        if sps:
            out.append({"point": f"{r['preset']} {r['image_px']} px / {r['text_len']} tokens, batch {r['batch']}",
                        "column": col, "samples_s": sps, "ms": r[f"{col}_ms"], "batch": r["batch"]})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--work", default="/tmp/clipfast-data-path", help="where the generated shards are kept")
    ap.add_argument("--out", default=None, help="default bench/results/data-path-<date>")
    ap.add_argument("--no-loader", action="store_true", help="skip the DALI loader timing (CPU decode)")
    ap.add_argument("--per-shard", type=int, default=1000, help="samples a shard")
    ap.add_argument("--reader-processes", type=int, nargs="*", default=[2],
                    help="also time the reader process with this many children (at most one per shard)")
    args = ap.parse_args(argv)
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)} (at least 1)" for k in ("samples", "per_shard")
           if getattr(args, k) < 1]
    if not args.no_loader and args.samples < 256:
        bad.append(f"--samples {args.samples}: the loader is timed over batches of 256 (or --no-loader)")
    if bad:
        ap.error("; ".join(bad))
    from clipfast.data.loader import pack_text
    from clipfast.data.shards import ShardReader
    from clipfast.reduce import TextReducer

    shards = make_shards(Path(args.work), args.samples, args.per_shard)
    mb = sum(os.path.getsize(s) for s in shards) / 2**20
    n = args.samples

    def read():
        return list(ShardReader(shards, loop=False))

    got = read()
    assert len(got) == n, f"{len(got)} of {n} samples read"
    stages = {"read (tar + checks)": timed(read)}

    def pass_over():  # what a resume costs a sample before its position (ShardReader.restore): the training reader's
        r = ShardReader(shards, loop=True, seed=0)  # shuffle buffer of 1000, its last sample of the pass its first
        r.restore({"epoch": 0, "next": n - 1})
        next(iter(r))

    stages["resume: passing over (read + checks + shuffle, not yielded)"] = timed(pass_over)
    captions = [s.caption for s in got]
    # syntax masking tags words with lemminflect, which the GPU machines' image lacks: there its row is left out
    modes = [("truncate", 77), ("truncate", 16)]
    if importlib.util.find_spec("lemminflect") is not None:
        modes.append(("syntax", 8))
    else:
        print("lemminflect is not installed: no syntax-masking row (clipfast.pos needs it)", file=sys.stderr)
    for mode, length in modes:
        red = TextReducer(mode, length, seed=0)
        [red(c) for c in captions]  # the tokenizer's word cache warm, as in a long run
        stages[f"text: {mode} to {length}"] = timed(lambda red=red: [red(c) for c in captions])
    ids = [TextReducer("truncate", 77)(c) for c in captions]
    stages["pack (batches of 512)"] = timed(lambda: [pack_text(ids[i:i + 512]) for i in range(0, n, 512)])
    per = {k: v / n * 1e6 for k, v in stages.items()}  # us / sample
    host = {f"{mode} to {length}": per["read (tar + checks)"] + per[f"text: {mode} to {length}"]
            + per["pack (batches of 512)"] for mode, length in modes}
    from clipfast.data.prefetch import ReaderProcess

    def through_reader_process(processes: int = 1) -> float:
        """us a sample that the trainer receives from a ReaderProcess (reading and truncating to 16 in the children,
        the shards dealt out among them), after the first chunks: the children's pace, unless this process (which
        unpickles every chunk) is the slower side."""
        rp = ReaderProcess(ShardReader(shards, loop=True, seed=0), TextReducer("truncate", 16), processes=processes)
        it = iter(rp)
        for _ in range(min(n, 512)):
            next(it)
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        wall = time.perf_counter() - t0
        rp.close()
        return wall / n * 1e6

    counts = sorted({1, *[k for k in args.reader_processes if 1 <= k <= len(shards)]})
    children_us = {k: min(through_reader_process(k) for _ in range(2)) for k in counts}
    child_us = children_us[1]
    loader = {}
    if not args.no_loader:
        from clipfast.data import DaliLoader

        def run_loader(reader_process: bool) -> tuple[float, float]:
            """(wall, training thread's CPU time) per sample, us, over n samples after one batch."""
            dl = DaliLoader(",".join(shards), 256, 64, TextReducer("truncate", 16), train=True, threads=2,
                            device="cpu", seed=0, reader_process=reader_process)
            next(dl)
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n // 256):
                next(dl)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            dl.close()
            return wall / (n // 256 * 256) * 1e6, cpu / (n // 256 * 256) * 1e6

        for rp in (False, True):
            runs = [run_loader(rp) for _ in range(2)]
            loader["reader process" if rp else "reader in-process"] = {"wall_us": min(r[0] for r in runs),
                                                                      "thread_cpu_us": min(r[1] for r in runs)}

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    import clipfast

    meta = {"date": dt.date.today().isoformat(), "commit": commit, "clipfast": str(Path(clipfast.__file__).parent),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "samples": n, "shards": len(shards), "mb": round(mb, 1), "mean_kb": round(mb * 1024 / n, 1),
            "mean_words": round(sum(len(c.split()) for c in captions) / n, 1)}
    command = " ".join(["python bench/data_path.py", *(sys.argv[1:] if argv is None else argv)])
    res = {"meta": meta, "us_per_sample": per, "host_us_per_sample": host, "reader_process_us_per_sample": child_us,
           "reader_processes_us_per_sample": children_us, "loader": loader, "gpu_demand": gpu_demand()}
    lines = [f"# Data path, host cost per sample ({meta['date']}, commit {commit})", "",
             f"{n} samples in {len(shards)} shards, {meta['mb']} MB (mean {meta['mean_kb']} KB a JPEG, "
             f"{meta['mean_words']} words a caption); one process, one thread, best of 3; {meta['cpu']}, "
             f"Python {meta['python']}. Command: `{command}`.", "",
             "| stage | us / sample | samples/s (one thread) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {1e6 / v:,.0f} |" for k, v in per.items()]
    lines += ["", "| host total (read + text + pack) | us / sample | samples/s (one thread) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {1e6 / v:,.0f} |" for k, v in host.items()]
    lines += [f"| reader process: read + truncate to 16 in a child, received here (best of 2) | {child_us:.1f} | "
              f"{1e6 / child_us:,.0f} |"]
    lines += [f"| reader processes: the same in {k} children, the shards dealt out (best of 2; {os.cpu_count()} "
              f"cores here) | {us:.1f} | {1e6 / us:,.0f} |" for k, us in children_us.items() if k > 1]
    if loader:
        lines += ["", "DaliLoader on this CPU (decode, crop, resize to 64 px on the CPU with 2 DALI threads, batch "
                      "256; truncate to 16); the training thread's CPU time is what a GPU run's step shares its "
                      "thread with:", "",
                  "| loader | wall us / sample | samples/s | training thread's CPU us / sample |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['wall_us']:.0f} | {1e6 / v['wall_us']:,.0f} | {v['thread_cpu_us']:.1f} |"
                  for k, v in loader.items()]
    if res["gpu_demand"]:
        lines += ["", f"What one H100 consumed ({H100_RUN.relative_to(ROOT).parent}): host time per step at the "
                      "samples/s above (truncate to 16 / syntax to 8 for the short-text points, 77 otherwise):", "",
                  "| point | column | step ms | samples/s per GPU | host ms per step | host / step |",
                  "|---|---|---|---|---|---|"]
        for d in res["gpu_demand"]:
            mode = "truncate to 77" if "77 tokens" in d["point"] else ("syntax to 8" if "/ 8 tokens" in d["point"]
                                                                        else "truncate to 16")
            mode = mode if mode in host else "truncate to 16"  # no lemminflect: no syntax row
            host_ms = host[mode] * d["batch"] / 1e3
            lines.append(f"| {d['point']} | {d['column']} | {d['ms']:.1f} | {d['samples_s']:,.0f} | {host_ms:.1f} "
                         f"({mode}) | {host_ms / d['ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / f"bench/results/data-path-{meta['date']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_path.md").write_text(text)
    (out / "data_path.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # (the stages are one thread's Python; DALI's loader takes its own 2 threads)
    main()
