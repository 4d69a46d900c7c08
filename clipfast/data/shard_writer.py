"""The writing half of clipfast.data.make_shards: inputs (Items) read, checked and (re-)encoded on worker threads, in
order, into OUT/{prefix}-NNNN.tar shards and OUT/make_shards.json. A bad input is skipped, counted by reason and
logged with its source and key; the sources (ImageFolder, CSV, COCO, Karpathy) and the command line stay in
make_shards."""
from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from clipfast.data.shards import image_problem, write_shard

log = logging.getLogger("clipfast.data")
MAX_LISTED_SKIPS = 1000  # make_shards.json names at most this many skipped samples (the counts are complete)


class UsageError(ValueError):
    """A bad argument (missing folder, unknown column, ...): main() reports it as a usage error, exit code 2."""


@dataclass
class Item:
    """One input: where its image is, its caption and .json; `problem` set when the input itself is bad."""

    source: str  # as the user's data names it, for logs
    path: Path | None
    caption: str = ""
    meta: dict = field(default_factory=dict)
    problem: str | None = None


def to_rgb(im):
    """A PIL image as RGB, 16-bit and 32-bit grayscale scaled to 8 bits (PIL's convert clips them: a 16-bit PNG's
    values 0-65535 became 0-255 and the rest white). Raises ValueError for pixel values outside 16 bits (integers) or
    0-1 (floats): their range is not known."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 1.0 if im.mode == "F" else 65535.0
        if lo < 0 or hi > top:
            raise ValueError(f"{im.mode} pixel values {lo:g} to {hi:g} are outside 0 to {top:g}: their range is not "
                             "known")
        a = np.rint(a.astype(np.float64) * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


def encode_image(data: bytes, max_side: int = 0, quality: int = 95) -> tuple[str, bytes, bool]:
    """-> (extension, bytes, copied). Raises if the image does not decode. Bytes are kept when the reader and every
    decoder take them as they are (a complete RGB or grayscale JPEG/PNG within max_side); else a JPEG is made."""
    from PIL import Image, ImageOps

    kind = None if image_problem(data) else {b"\xff\xd8": "jpg", b"\x89P": "png"}.get(data[:2])
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        small = max_side <= 0 or max(w, h) <= max_side
        if kind and im.mode in ("RGB", "L") and small:
            if kind == "jpg":
                im.draft(im.mode, (w // 8, h // 8))  # DCT scaling: every coefficient is still read, 1/64 the pixels
            im.load()  # the check: raises on truncated or corrupt data
            return kind, data, True
        if not small:  # a JPEG decodes at a power-of-two scale still at least twice the target (thumbnail's gap)
            im.draft(None, (2 * max_side, 2 * max_side))
        im = ImageOps.exif_transpose(to_rgb(im))  # convert first: a palette image would resize by nearest
        if not small:
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)  # keeps the aspect, never enlarges
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return "jpg", buf.getvalue(), False


def _load(item: Item, key: str, max_side: int, quality: int):
    """-> (sample dict, copied) or (None, reason). Runs in a worker thread."""
    if item.problem:
        return None, item.problem
    if not item.caption.strip():
        return None, "empty caption"
    try:
        data = item.path.read_bytes()
    except FileNotFoundError:
        return None, "missing file"
    except OSError as e:
        return None, f"unreadable file ({type(e).__name__}: {e})"
    try:
        ext, image, copied = encode_image(data, max_side, quality)
    except Exception as e:  # any decoder failure is the sample's, not the run's
        why = image_problem(data)
        why = "" if why is None or why.startswith("not a JPEG") else f"; {why}"
        return None, f"image does not decode ({type(e).__name__}: {e}{why})"
    return {"__key__": key, ext: image, "txt": item.caption.strip(), "json": item.meta}, copied


def _ordered(pool, fn, args, window: int):
    """(args, fn(*args)) for each of `args`, in order, with at most `window` calls in flight."""
    pending: collections.deque = collections.deque()
    for a in args:
        pending.append((a, pool.submit(fn, *a)))
        if len(pending) >= window:
            a, f = pending.popleft()
            yield a, f.result()
    while pending:
        a, f = pending.popleft()
        yield a, f.result()


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make OUT ready for a run: refused if it holds .tar shards (a folder is read whole), unless overwrite, which
    removes them and the old meta.json / make_shards.json."""
    old = sorted(out.glob("*.tar")) if out.is_dir() else []
    if old and not overwrite:
        names = ", ".join(p.name for p in old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
        raise UsageError(f"--out {str(out)!r} already holds .tar shards ({names}); give an empty or new folder, "
                         "or --overwrite to replace them")
    tmp = sorted(out.glob("*.tar.tmp")) if out.is_dir() else []  # (an interrupted run's shard in the writing)
    for p in old + tmp + [out / "meta.json", out / "make_shards.json"]:
        p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def check_prefix(prefix: str) -> None:
    """A shard and key prefix: letters, digits, - and _ (a key is the member name up to its first dot, and a shard
    name a file in OUT: a dot made every sample one key, a slash a folder that is not there)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix or ""):
        raise UsageError(f"--prefix {prefix!r}: use letters, digits, - and _ only (a key ends at its first dot, and "
                         "the shards are files in OUT)")


def write_samples(items, out, prefix: str, *, samples_per_shard=1000, max_side=0, quality=95, workers=4,
                  limit=None, progress=True, total=None, command=None, extra=None, on_write=None) -> dict:
    """Read, check and (re-)encode `items` (Items) on `workers` threads, in order; write OUT/{prefix}-NNNN.tar and
    OUT/make_shards.json; -> the summary. on_write(item) is called for each sample written."""
    from tqdm import tqdm

    check_prefix(prefix)
    out, t0 = Path(out), time.perf_counter()
    items = itertools.islice(items, limit) if limit else items
    total = min(total, limit) if total is not None and limit else total
    skipped, skipped_samples, shards, buf = Counter(), [], [], []
    n_in = n_written = n_copied = 0

    def flush():
        path = out / f"{prefix}-{len(shards):04d}.tar"
        write_shard(path.with_suffix(".tar.tmp"), buf)  # renamed when whole: an interrupted run leaves no half shard
        os.replace(path.with_suffix(".tar.tmp"), path)
        shards.append(path.name)
        buf.clear()

    args = ((it, f"{prefix}{i:08d}", max_side, quality) for i, it in enumerate(items))
    workers = max(1, workers)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, unit="image", desc=prefix, disable=not progress) as bar:
        for (item, key, *_), (sample, info) in _ordered(pool, _load, args, 4 * workers):
            n_in += 1
            bar.update(1)
            if sample is None:
                skipped[info.split(" (")[0]] += 1
                if len(skipped_samples) < MAX_LISTED_SKIPS:
                    skipped_samples.append({"source": item.source, "key": key, "reason": info})
                log.warning("skipping %s [key %s]: %s", item.source, key, info)
                continue
            n_written += 1
            n_copied += info
            if on_write:
                on_write(item)
            buf.append(sample)
            if len(buf) == samples_per_shard:
                flush()
        if buf:
            flush()
    summary = {
        "command": command, **(extra or {}), "inputs": n_in, "written": n_written, "copied": n_copied,
        "re_encoded": n_written - n_copied, "skipped": dict(skipped), "skipped_total": sum(skipped.values()),
        "skipped_samples": skipped_samples, "shards": shards, "prefix": prefix, "samples_per_shard": samples_per_shard,
        "max_side": max_side, "quality": quality, "limit": limit, "workers": workers, "out": str(out),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "make_shards.json").write_text(json.dumps(summary, indent=1))
    return summary
