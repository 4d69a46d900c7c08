"""Data quality over quantity: score every image-text pair with a CLIP model and keep the best.

    python -m clipfast.data.filter --checkpoint runs/demo/model.pt --data data/demo/train --out data/top50 \\
        --keep-fraction 0.5
    python -m clipfast.data.filter --open-clip ViT-B-32 --checkpoint open_clip_vit_b32.bin --data 'shards/*.tar' \\
        --out data/kept --min-score 0.28

The score is the cosine similarity of a pair's image and caption embeddings (LAION's CLIP-score filter,
DataComp's CLIP-score baseline; "Scaling (Down) CLIP", Li, Xie & Cubuk 2024: at small budgets fewer, better
pairs beat more, noisier ones). The scorer is a clipfast `model.pt` (clipfast.evaluate.load_model) or, with
--open-clip NAME, an open_clip state dict for that model name loaded through clipfast.interop (architectures
clipfast's CLIP has; no download: give the weights file). Images are decoded on the host (threads), resized on
their short side and centre-cropped to the model's image size, as the evaluation does (open_clip's evaluation
transform), but turned upright by their EXIF orientation, as training sees them; captions are BPE'd and truncated to
the model's text length. Batches run in float32 on CUDA if there is one.

--keep-fraction F keeps the round(F * n) best of the n valid samples (ties: the earlier sample in read order
first); --min-score S keeps those scoring >= S. Kept samples are written in read order, each with all its files
byte for byte (key, image, caption, .json, ...), --samples-per-shard per shard, to OUT/filtered-NNNN.tar. Beside
them: scores.jsonl (shard, key, score, kept per scored sample, in read order), filter.json (counts, threshold,
fractions, skipped samples by reason and key, the command) and scores.png (the histogram, threshold marked;
needs matplotlib). A corrupt sample (ShardReader's checks, or an image that does not decode) is skipped, counted
and logged by key, never fatal. Two passes over the data (score, then copy), so memory stays one batch.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shlex
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from clipfast.data.loader import pack_text
from clipfast.data.shards import ShardReader, list_shards, write_shard

log = logging.getLogger("clipfast.data")
MAX_LISTED_SKIPS = 1000  # filter.json names at most this many skipped samples (the counts are complete)


class _Reader(ShardReader):
    """One shard, in order, once; remembers which samples it skipped (and, when quiet, does not log them again)."""

    def __init__(self, shard: str, quiet: bool = False):
        super().__init__([shard], loop=False, shuffle_buffer=0)
        self.quiet, self.skipped_keys = quiet, []

    def _skip(self, shard, key, reason):
        self.skipped_keys.append({"shard": os.path.basename(shard), "key": key, "reason": reason})
        if self.quiet:
            self.skipped[reason.split(" (")[0]] += 1
        else:
            super()._skip(shard, key, reason)


def decode(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 (3, size, size): turned upright by its EXIF orientation (as DALI's decoders do for
    training; the evaluation, as open_clip's, leaves it as stored), then open_clip's evaluation transform: the short
    side to `size` and the long to int(size * long / short), bicubic, and a centre crop at round((n - size) / 2)
    (Python's round, half to even), so that an image without an orientation tag gets open_clip's pixels exactly."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im.resize((w, h), Image.BICUBIC)
        left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
        im = im.crop((left, top, left + size, top + size))
        return np.array(im, dtype=np.uint8).transpose(2, 0, 1)  # a copy: writable, for torch.from_numpy


@torch.no_grad()
def score_batch(model, images: list[np.ndarray], captions: list[str], reducer, device) -> list[float]:
    """Cosine similarity of each image with its own caption."""
    x = torch.from_numpy(np.stack(images)).to(device)  # (B, 3, S, S) uint8
    text, cu, max_len = pack_text([reducer(c) for c in captions])
    img = model.encode_image(x, normalize=True).float()  # (B, E)
    txt = model.encode_text_packed(text.to(device), cu.to(device), max_len, normalize=True).float()  # (B, E)
    return (img * txt).sum(dim=-1).cpu().tolist()


def score_shards(model, shards: list[str], batch_size=256, device="cpu", workers=4, progress=True):
    """-> (records [(shard index, key, score)] in read order, skipped Counter by reason, skipped [{shard, key,
    reason}]). Batches run across shard boundaries; a sample whose image does not decode is skipped."""
    from tqdm import tqdm

    from clipfast.reduce import TextReducer

    reducer = TextReducer("truncate", model.context_length)
    size = model.cfg.vision.image_size
    records, skipped, skipped_keys = [], Counter(), []
    batch: list = []  # (shard index, sample)

    def flush(pool):
        arrays = list(pool.map(lambda item: _try_decode(item[1].image, size), batch))
        good = []
        for (si, s), a in zip(batch, arrays):
            if isinstance(a, Exception):
                skipped["does not decode"] += 1
                skipped_keys.append({"shard": os.path.basename(shards[si]), "key": s.key,
                                     "reason": f"does not decode ({type(a).__name__}: {a})"})
                log.warning("skipping sample %r in %s: the image does not decode (%s: %s)", s.key,
                            os.path.basename(shards[si]), type(a).__name__, a)
            else:
                good.append((si, s, a))
        if good:
            scores = score_batch(model, [a for *_, a in good], [s.caption for _, s, _ in good], reducer, device)
            records.extend((si, s.key, sc) for (si, s, _), sc in zip(good, scores))
        bar.update(len(batch))
        batch.clear()

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(unit="sample", desc="scoring", disable=not progress) as bar:
        for si, shard in enumerate(shards):
            reader = _Reader(shard)
            for s in reader:
                batch.append((si, s))
                if len(batch) == batch_size:
                    flush(pool)
            skipped.update(reader.skipped)
            skipped_keys += reader.skipped_keys
        if batch:
            flush(pool)
    return records, skipped, skipped_keys


def _try_decode(data: bytes, size: int):
    try:
        return decode(data, size)
    except Exception as e:  # any decoder failure is the sample's, not the run's
        return e


def select(scores: list[float], keep_fraction: float | None = None, min_score: float | None = None):
    """-> (kept flags in input order, threshold = the lowest kept score, or min_score; None if nothing kept).
    keep_fraction keeps the round(F * n) highest (half up), ties broken by input order (earlier first)."""
    if (keep_fraction is None) == (min_score is None):
        raise ValueError("give exactly one of keep_fraction and min_score")
    n = len(scores)
    if min_score is not None:
        kept = [s >= min_score for s in scores]
        return kept, min_score
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    k = math.floor(keep_fraction * n + 0.5)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    kept = [False] * n
    for i in order[:k]:
        kept[i] = True
    return kept, (scores[order[k - 1]] if k else None)


def write_kept(shards: list[str], keep: dict[int, set], out: Path, samples_per_shard: int) -> list[str]:
    """Copy the kept samples (shard index -> keys), in read order, into out/filtered-NNNN.tar."""
    written, buf = [], []

    def flush():
        path = out / f"filtered-{len(written):04d}.tar"
        write_shard(path, [{"__key__": s.key, **s.parts} for s in buf])
        written.append(path.name)
        buf.clear()

    for si, shard in enumerate(shards):
        if not keep.get(si):
            continue
        for s in _Reader(shard, quiet=True):  # skips were logged in the scoring pass
            if s.key in keep[si]:
                buf.append(s)
                if len(buf) == samples_per_shard:
                    flush()
    if buf:
        flush()
    return written


def histogram(scores: list[float], threshold: float | None, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no histogram (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=50, color="tab:blue")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4f}")
        ax.legend()
    ax.set_xlabel("image-text cosine similarity")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args, command: str) -> dict:
    shards = list_shards(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from clipfast.evaluate import load_model

    model = load_model(args.checkpoint, args.device, open_clip_name=args.open_clip)
    records, skipped, skipped_keys = score_shards(model, shards, args.batch_size, args.device, args.workers,
                                                  progress=not args.no_progress)
    if not records:
        raise ValueError(f"no valid samples to score in {args.data!r} (skipped: {dict(skipped)})")
    scores = [r[2] for r in records]
    kept, threshold = select(scores, args.keep_fraction, args.min_score)
    keep: dict[int, set] = {}
    for (si, key, _), k in zip(records, kept):
        if k:
            keep.setdefault(si, set()).add(key)
    written = write_kept(shards, keep, out, args.samples_per_shard)
    with open(out / "scores.jsonl", "w") as f:
        for (si, key, sc), k in zip(records, kept):
            f.write(json.dumps({"shard": os.path.basename(shards[si]), "key": key, "score": sc, "kept": k}) + "\n")
    n_kept = sum(kept)
    a = np.asarray(scores)
    summary = {
        "command": command, "data": args.data, "checkpoint": args.checkpoint, "open_clip": args.open_clip,
        "shards_in": len(shards), "scored": len(records), "kept": n_kept, "removed": len(records) - n_kept,
        "kept_share": n_kept / len(records), "keep_fraction": args.keep_fraction, "min_score": args.min_score,
        "threshold": threshold,
        "scores": {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()),
                   "max": float(a.max())},
        "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
        "skipped_samples": skipped_keys[:MAX_LISTED_SKIPS],
        "shards_out": written, "samples_per_shard": args.samples_per_shard, "device": str(args.device),
    }
    title = f"{n_kept} of {len(records)} kept ({100 * n_kept / len(records):.1f}%)"
    summary["histogram"] = "scores.png" if histogram(scores, threshold, out / "scores.png", title) else None
    (out / "filter.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="clipfast model.pt (or its run folder); with --open-clip, "
                    "that model's open_clip state dict")
    ap.add_argument("--open-clip", default=None, metavar="NAME", help="the open_clip model name of --checkpoint")
    ap.add_argument("--data", required=True, help="input shards: a folder of .tar, a glob, or a comma list")
    ap.add_argument("--out", required=True, help="folder for the kept shards, scores.jsonl, filter.json, scores.png")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-fraction", type=float, help="keep this share of the best-scoring samples, in (0, 1]")
    which.add_argument("--min-score", type=float, help="keep samples whose cosine similarity is at least this")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = ap.parse_args(argv)
    if args.keep_fraction is not None and not 0 < args.keep_fraction <= 1:
        ap.error(f"--keep-fraction must be in (0, 1], got {args.keep_fraction}")
    if args.min_score is not None and not -1 <= args.min_score <= 1:
        ap.error(f"--min-score is a cosine similarity, in [-1, 1]; got {args.min_score}")
    for name in ("samples_per_shard", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    from clipfast.checkpoint import is_model_path

    if not (Path(args.checkpoint).is_file() if args.open_clip else is_model_path(args.checkpoint)):
        ap.error(f"--checkpoint {args.checkpoint!r}: no such file" + ("" if args.open_clip else " (nor a run folder "
                 "holding model.pt, nor one of its checkpoints, <run>/ckpt/step<N>)"))
    try:
        list_shards(args.data)
    except FileNotFoundError as e:
        ap.error(f"--data: {e}")
    if Path(args.out).is_dir() and any(Path(args.out).glob("*.tar")):
        ap.error(f"--out {args.out!r} already holds .tar shards; give an empty or new folder")
    command = shlex.join([Path(sys.executable).name, "-m", "clipfast.data.filter", *(sys.argv[1:] if argv is None
                                                                                     else argv)])
    res = run(args, command)
    print(f"kept {res['kept']} of {res['scored']} samples ({100 * res['kept_share']:.1f}%), threshold "
          f"{res['threshold']}, skipped {res['skipped_total']} corrupt; wrote {len(res['shards_out'])} shard(s) "
          f"to {args.out}")
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
