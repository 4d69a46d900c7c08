"""Demo data, real and offline: scikit-learn's bundled handwritten digits (1,797 8x8 scans) as shards.

    python -m clipfast.data.demo --out data/demo

Each digit is upscaled (bicubic) to --size px RGB JPEG; its caption comes from varied templates
("a photo of the number seven", "handwritten 7", ...). About 20% is held out (stratified per class)
with {"label", "classname"} in each sample's .json for zero-shot evaluation. Deterministic for a seed.

    python -m clipfast.data.demo --out data/demo_noisy --noise 0.5

makes a noisy variant for data-filtering experiments (clipfast.data.filter): that share of the *training*
captions (exactly round(noise * n), chosen by their own seeded generator) names a wrong digit, drawn uniformly
from the other nine; each training .json then says {"noisy": bool, "caption_label": the digit the caption
names}. Val stays clean. Every other byte equals the clean build's (same seed), and --noise 0 (the default)
writes exactly the clean data.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np

from clipfast.data.shards import write_shard

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {w} = the number word, {d} = the numeral
TEMPLATES = [
    "a photo of the number {w}",
    "handwritten {d}",
    "a scanned {w} in ink",
    "the digit {d}",
    "a blurry picture of the number {w}",
    "{w}, written by hand",
    "a low resolution scan of the digit {w}",
    "number {d}",
    "the number {w} drawn with a pen",
    "an image showing the digit {d}",
    "a small grey {w}",
    "a handwritten number: {w}",
    "pixel art of a {d}",
    "someone wrote the digit {w}",
]

# zero-shot prompts used by the evaluation (clipfast.evaluate reads them from meta.json)
EVAL_TEMPLATES = ["a photo of the number {}", "the digit {}", "handwritten {}"]


def digit_jpeg(pixels: np.ndarray, size: int, quality: int = 92) -> bytes:
    from PIL import Image

    img = Image.fromarray((255 - pixels * 255.0 / 16.0).clip(0, 255).astype(np.uint8), mode="L")  # ink dark
    img = img.resize((size, size), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build(out: str | Path, seed: int = 0, size: int = 48, val_share: float = 0.2, shard_size: int = 256,
          noise: float = 0.0) -> dict:
    from sklearn.datasets import load_digits

    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise is the share of training captions to corrupt, in [0, 1]; got {noise}")

    digits = load_digits()
    rng = random.Random(seed)
    out = Path(out)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(digits.target):
        by_class.setdefault(int(y), []).append(i)
    train_idx, val_idx = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_share)
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    rng.shuffle(train_idx)
    val_idx.sort()
    # a generator of its own, so that the clean data's draws (and bytes) are the same with and without noise
    noise_rng = random.Random(f"noise-{seed}")
    noisy = set(noise_rng.sample(train_idx, round(noise * len(train_idx)))) if noise > 0 else set()

    counts = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("*.tar"):
            old.unlink()
        samples = []
        for i in idx:
            y = int(digits.target[i])
            template = rng.choice(TEMPLATES)
            info = {"label": y, "classname": CLASSNAMES[y]}
            said = y
            if split == "train" and noise > 0:
                if i in noisy:
                    said = noise_rng.choice([d for d in range(10) if d != y])
                info.update(noisy=i in noisy, caption_label=said)
            samples.append({
                "__key__": f"{split}{i:05d}",
                "jpg": digit_jpeg(digits.images[i], size),
                "txt": template.format(w=CLASSNAMES[said], d=said),
                "json": info,
            })
        for s in range(0, len(samples), shard_size):
            write_shard(out / split / f"{split}-{s // shard_size:04d}.tar", samples[s : s + shard_size])
        counts[split] = len(samples)
    meta = {"classnames": CLASSNAMES, "templates": EVAL_TEMPLATES, "counts": counts, "seed": seed, "size": size}
    if noise > 0:
        meta["noise"] = {"share": noise, "noisy_train_captions": len(noisy)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=48, help="JPEG side in px")
    ap.add_argument("--val-share", type=float, default=0.2)
    ap.add_argument("--noise", type=float, default=0.0,
                    help="share of training captions replaced by a wrong digit's caption (val stays clean)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.noise <= 1.0:
        ap.error(f"--noise must be in [0, 1], got {args.noise}")
    meta = build(args.out, args.seed, args.size, args.val_share, noise=args.noise)
    noisy = f" ({meta['noise']['noisy_train_captions']} train captions noisy)" if args.noise > 0 else ""
    print(f"wrote {meta['counts']['train']} train + {meta['counts']['val']} val samples to {args.out}{noisy}")


if __name__ == "__main__":
    main()
