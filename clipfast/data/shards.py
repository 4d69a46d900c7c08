"""webdataset shards: listing, writing, and a validating sample reader.

A shard is a .tar of samples grouped by key: `key.jpg` + `key.txt` [+ `key.json`]. The reader checks
each sample before it reaches the decoder; a corrupt one (missing image or caption, caption not UTF-8
or empty, bytes that are not a complete JPEG/PNG) is skipped, counted by reason and logged by key —
never a crash, never a silent loss.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("clipfast.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def list_shards(spec: str) -> list[str]:
    """A folder of .tar files, a glob, or a comma-separated list of either -> sorted shard paths."""
    paths: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
        else:
            found = sorted(glob.glob(part))
        if not found:
            raise FileNotFoundError(f"no .tar shards found at {part!r} (a folder of shards, a glob, or a list)")
        paths.extend(found)
    if not paths:
        raise FileNotFoundError(f"no shards in data spec {spec!r}")
    return paths


def write_shard(path: str | Path, samples: list[dict]) -> None:
    """Write samples ({"__key__": str, "jpg": bytes, "txt": str, "json": dict, ...}) deterministically."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            key = s["__key__"]
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                if isinstance(value, str):
                    value = value.encode("utf-8")
                elif isinstance(value, dict):
                    value = json.dumps(value, sort_keys=True).encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(value), 0, 0o644
                tar.addfile(info, io.BytesIO(value))


def image_problem(data: bytes) -> str | None:
    """Why these bytes would not decode as a whole image, or None. Cheap: header, end marker, size."""
    if len(data) < 64:
        return f"image of only {len(data)} bytes"
    if data[:3] == b"\xff\xd8\xff":
        if b"\xff\xd9" not in data[-1024:]:
            return "JPEG without its end marker (truncated)"
        kind = "JPEG"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            return "PNG without its IEND chunk (truncated)"
        kind = "PNG"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WebP"
    else:
        return "not a JPEG, PNG or WebP file"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:  # a header PIL cannot parse will not decode either
        return f"unreadable {kind} header ({e.__class__.__name__})"
    if w < 1 or h < 1:
        return f"{kind} of size {w}x{h}"
    return None


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    meta: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict, repr=False)  # every file of the sample as stored, by extension


class ShardReader:
    """Iterates valid samples from this rank's shards, forever (epochs reshuffled) or once.

    Shards are split across ranks (shard i goes to rank i % world); with fewer shards than ranks every
    rank reads all shards and keeps every world-th sample instead. Shuffling: shard order per epoch,
    then a buffer of `shuffle_buffer` samples.
    """

    def __init__(self, shards: list[str], rank=0, world=1, seed=0, shuffle_buffer=1000, loop=True):
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop
        self.skipped: Counter = Counter()
        self.seen = 0
        self.epoch = 0
        self.split_samples = len(shards) < world

    def _my_shards(self) -> list[str]:
        if self.split_samples:
            return list(self.shards)
        return [s for i, s in enumerate(self.shards) if i % self.world == self.rank]

    def _skip(self, shard: str, key: str, reason: str) -> None:
        self.skipped[reason.split(" (")[0]] += 1
        log.warning("skipping sample %r in %s: %s", key, os.path.basename(shard), reason)

    def _samples_in(self, shard: str):
        try:
            tar = tarfile.open(shard)
        except (tarfile.TarError, OSError) as e:
            self._skip(shard, "*", f"unreadable shard ({e})")
            return
        groups: dict[str, dict] = {}
        order: list[str] = []
        with tar:
            try:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    key = os.path.join(os.path.dirname(m.name), key)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = tar.extractfile(m).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                self._skip(shard, "*", f"shard ends early after {len(order)} keys ({e})")
        for n, key in enumerate(order):
            if self.split_samples and n % self.world != self.rank:
                continue
            sample = self._validate(shard, key, groups.pop(key))
            if sample is not None:
                yield sample

    def _validate(self, shard: str, key: str, parts: dict) -> Sample | None:
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            return self._skip(shard, key, f"no image (has {', '.join(sorted(parts)) or 'nothing'})")
        if "txt" not in parts:
            return self._skip(shard, key, "no caption (.txt)")
        try:
            caption = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._skip(shard, key, "caption is not UTF-8")
        if not caption:
            return self._skip(shard, key, "empty caption")
        problem = image_problem(parts[ext])
        if problem:
            return self._skip(shard, key, problem)
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._skip(shard, key, "metadata .json does not parse")
        return Sample(key, parts[ext], caption, meta, parts)

    def __iter__(self):
        while True:
            rng = random.Random(self.seed * 1000003 + self.epoch)
            shards = self._my_shards()
            if self.loop:
                rng.shuffle(shards)
            buf: list[Sample] = []
            for shard in shards:
                for s in self._samples_in(shard):
                    self.seen += 1
                    if not self.loop or self.shuffle_buffer <= 1:
                        yield s
                        continue
                    buf.append(s)
                    if len(buf) >= self.shuffle_buffer:
                        yield buf.pop(rng.randrange(len(buf)))
            rng.shuffle(buf)
            yield from buf
            self.epoch += 1
            if not self.loop:
                return
            if self.seen == 0:
                raise RuntimeError(f"no valid samples in {len(shards)} shard(s): {dict(self.skipped)}")


class MixedReader:
    """Training samples drawn from several datasets by weight: each draw picks dataset i with probability
    w_i / sum(w) (a seeded generator), then that dataset's next sample (a ShardReader of its own, endless, shuffled,
    its shards split across ranks as usual). The datasets share one count of skipped samples. `drawn` counts the draws
    per dataset."""

    def __init__(self, specs: list[str], weights, rank=0, world=1, seed=0, shuffle_buffer=1000):
        if len(weights) != len(specs):
            raise ValueError(f"{len(weights)} weight(s) for {len(specs)} training dataset(s) ({', '.join(specs)}): "
                             "give one weight per comma-separated entry")
        if any(not w > 0 for w in weights):
            raise ValueError(f"dataset weights must be positive, got {tuple(weights)}")
        self.specs, self.weights = specs, [float(w) for w in weights]
        self.readers = [ShardReader(list_shards(spec), rank, world, seed * 7 + i, shuffle_buffer=shuffle_buffer)
                        for i, spec in enumerate(specs)]
        self.skipped: Counter = Counter()
        for r in self.readers:
            r.skipped = self.skipped  # one count, which the loader's decoder check adds to as well
        self.rng = random.Random(seed * 1000003 + rank)
        self.drawn = [0] * len(specs)

    def __iter__(self):
        sources = [iter(r) for r in self.readers]
        index = range(len(sources))
        while True:
            i = self.rng.choices(index, self.weights)[0]
            self.drawn[i] += 1
            yield next(sources[i])

