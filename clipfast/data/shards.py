"""webdataset shards: listing, writing, and a validating sample reader.

A shard is a .tar of samples grouped by key: `key.jpg` + `key.txt` [+ `key.json`]. The reader checks
each sample before it reaches the decoder; a corrupt one (missing image or caption, caption not UTF-8
or empty, bytes that are not a complete JPEG/PNG, a .json that is not an object, a key used twice in a
shard, the sample a shard cut short ends inside) is skipped, counted by reason and logged by key —
never a crash, never a silent loss. The tar itself is read by clipfast.data.tar.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clipfast.data.tar import ShardError, tar_files

log = logging.getLogger("clipfast.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_entries(spec: str) -> list[str]:
    """A data spec's comma-separated entries: split at the commas outside braces (`a-{0,1}.tar,b` is two)."""
    out, depth, cur = [], 0, []
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced braces in data spec {spec!r}")
    return out + ["".join(cur)]


def brace_expand(pattern: str) -> list[str]:
    """webdataset's / open_clip's shard patterns: `a-{0000..0041}.tar` (a numeric range, zero-padded as written),
    `a-{x,y}.tar` (alternatives, which may hold ranges and braces themselves); several braces multiply out."""
    i = pattern.find("{")
    if i < 0:
        return [pattern]
    depth = 0
    for j in range(i, len(pattern)):
        depth += (pattern[j] == "{") - (pattern[j] == "}")
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced braces in shard pattern {pattern!r}")
    body, head, tail = pattern[i + 1:j], pattern[:i], pattern[j + 1:]
    lo, dots, hi = body.partition("..")
    if dots and lo.isdigit() and hi.isdigit():
        padded = any(len(x) > 1 and x[0] == "0" for x in (lo, hi))  # bash's rule: a leading zero pads all
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(k).zfill(width) for k in range(int(lo), int(hi) + step, step)]
    else:
        choices = [c for alt in split_entries(body) for c in brace_expand(alt)]
    return [head + c + rest for c in choices for rest in brace_expand(tail)]


def list_shards(spec: str) -> list[str]:
    """A folder of .tar files, a glob, a brace pattern (`train-{0000..0041}.tar`), or a comma-separated list of
    these -> shard paths (each entry's sorted; a brace pattern's in its own order)."""
    paths: list[str] = []
    for entry in [p.strip() for p in split_entries(spec) if p.strip()]:
        if "{" not in entry:
            paths.extend(_found(entry))
            continue
        expanded = brace_expand(entry)
        missing = [p for p in expanded if not glob.glob(p)]
        if missing:
            raise FileNotFoundError(f"no shard at {missing[0]!r}, from the pattern {entry!r}"
                                    + (f" ({len(missing)} of its {len(expanded)} names missing)"
                                       if len(missing) > 1 else ""))
        for p in expanded:
            paths.extend(_found(p))
    if not paths:
        raise FileNotFoundError(f"no shards in data spec {spec!r}")
    return paths


def _found(part: str) -> list[str]:
    """The shards of one entry: a folder's .tar files or a glob's matches, sorted."""
    found = sorted(glob.glob(os.path.join(part, "*.tar") if os.path.isdir(part) else part))
    if not found:
        raise FileNotFoundError(f"no .tar shards found at {part!r} (a folder of shards, a glob, a brace pattern, or "
                                f"a list)")
    return found


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


# JPEG markers that start a frame header (SOF0-SOF15 but DHT, JPG, DAC), which holds the image's size
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS = frozenset({0xDA})  # start of scan
_FRAME_OR_END = _SOF | {0xD9} | _SOS


def _walk(data: bytes, until: frozenset, i: int = 2) -> tuple[int, int] | str:
    """(offset, marker) of the first marker in `until` met walking a JPEG's marker segments from offset i (a marker;
    2: the one after the start of image), or why the walk failed."""
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return f"no marker at byte {i}"
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in until:
            return i, m
        seg = data[i + 2] << 8 | data[i + 3]
        if seg < 2:
            return f"segment of length {seg} at byte {i}"
        i += 2 + seg
    return "headers run past the end"


def jpeg_size(data: bytes) -> tuple[int, int] | str:
    """(width, height) from a JPEG's frame header, found by walking the marker segments before the first scan; or
    why it cannot be found. A few microseconds: PIL's Image.open did the same walk in ~50 (DQT tables parsed)."""
    return _jpeg_frame(data)[0]


def _jpeg_frame(data: bytes) -> tuple[tuple[int, int] | str, int]:
    """(jpeg_size's answer, the frame header's offset)."""
    found = _walk(data, _FRAME_OR_END)
    if isinstance(found, str):
        return found, 0
    i, m = found
    if m in (0xD9, 0xDA):
        return "no frame header before the scan", i
    if i + 9 > len(data):
        return "headers run past the end", i
    return (data[i + 7] << 8 | data[i + 8], data[i + 5] << 8 | data[i + 6]), i


_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its CRC (always these 8 bytes)


def _png_chunk_problem(data: bytes) -> str | None:
    """The first critical chunk (IHDR, PLTE, IDAT, IEND: a capital first letter) whose CRC does not match its bytes,
    or that runs past the end, up to IEND: libpng (DALI's decoder) refuses such a PNG where PIL's load() does not
    check, and DALI's error stops the whole batch. An ancillary chunk's bad CRC libpng only warns about."""
    at, n = 8, len(data)
    while at + 12 <= n:
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        end = at + 12 + length
        name = kind.decode("latin-1")
        if end > n:
            return f"PNG chunk runs past the end ({name!r} at byte {at})"
        if not kind[0] & 0x20 and zlib.crc32(data[at + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"PNG {name} chunk fails its CRC (at byte {at})"
        if kind == b"IEND":
            return None
        at = end
    return "PNG without its IEND chunk (truncated)"


def image_problem(data: bytes) -> str | None:
    """Why these bytes would not decode as a whole image, or None. Cheap: header, end marker, size (JPEG's from its
    frame header, PNG's from IHDR, WebP's through PIL), a PNG's critical chunks' CRCs (zlib's crc32 over its bytes)."""
    if len(data) < 64:
        return f"image of only {len(data)} bytes"
    if data[:3] == b"\xff\xd8\xff":
        # an end marker after the first scan (searched from the end: found at once in a whole file); bytes after it
        # are allowed (motion photos, padding), an EXIF thumbnail's end marker (before the scan) does not count
        (size, at), kind = _jpeg_frame(data), "JPEG"
        if not isinstance(size, str):
            scan = _walk(data, _SOS, at)  # (from the frame header on)
            if data.rfind(b"\xff\xd9", len(data) if isinstance(scan, str) else scan[0]) < 0:
                return "JPEG without its end marker (truncated)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(_PNG_END) < 0:  # (from the end: found at once; trailing bytes allowed, as for a JPEG)
            return "PNG without its IEND chunk (truncated)"
        kind = "PNG"
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) if data[12:16] == b"IHDR" \
            else "no IHDR chunk first"
        crc = None if isinstance(size, str) else _png_chunk_problem(data)
        if crc:
            return crc
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WebP"
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                size = im.size
        except Exception as e:  # a header PIL cannot parse will not decode either
            size = e.__class__.__name__
    else:
        return "not a JPEG, PNG or WebP file"
    if isinstance(size, str):
        return f"unreadable {kind} header ({size})"
    w, h = size
    if w < 1 or h < 1:
        return f"{kind} of size {w}x{h}"
    return None


def _split_name(name: str) -> tuple[str | None, str]:
    """A member name's (sample key, lower-case extension), as webdataset splits it: the key runs to the first dot of
    the file's own name (directories kept); (None, "") where it has no dot."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        return None, ""
    return (f"{head}/{key}" if head else key), ext.lower()


def _sample_key(name: str) -> str:
    return _split_name(name)[0] or name


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    meta: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict, repr=False)  # every file of the sample as stored, by extension
    ids: list | None = field(default=None, repr=False)  # the caption's token ids, where a reader process made them
    # where the training reader yielded it: (epoch, n), its n-th sample of that epoch; a MixedReader's (draw, dataset,
    # (epoch, n)); a ReaderProcess's with several children (child, that). The loader's `advance` keeps the position
    at: tuple | None = field(default=None, repr=False)


class ShardReader:
    """Iterates valid samples from this rank's shards, forever (epochs reshuffled) or once.

    Shards are split across ranks (shard i goes to rank i % world); with fewer shards than ranks every
    rank reads all shards and keeps every world-th sample instead. Shuffling: shard order per epoch,
    then a buffer of `shuffle_buffer` samples.

    An epoch's order is a function of the seed, the epoch and the shards alone, so a position in it (`advance`) is
    enough to go on from there (`restore`): the epoch is read again up to there, its shuffle replayed, nothing yielded.
    """

    def __init__(self, shards: list[str], rank=0, world=1, seed=0, shuffle_buffer=1000, loop=True, need_caption=True):
        self.shards, self.rank, self.world = shards, rank, world
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop
        # False (evaluation): a sample without a .txt is read where its .json has a "label" or "captions", its
        # caption then "" (zero-shot reads the label, retrieval the .json's captions first)
        self.need_caption = need_caption
        self.skipped: Counter = Counter()
        self.seen = 0
        self.epoch = 0
        self.split_samples = len(shards) < world
        self._passed_over = 0  # samples of the first epoch iterated not to yield again (`restore`)
        self._replaying = False  # (then skips are neither counted nor logged: the run before did that)
        self._expect_key = None  # the key of the last sample passed over, as the position recorded it

    @staticmethod
    def advance(position: dict | None, at: tuple) -> dict:
        """The position just after the sample yielded `at` (its Sample.at): its epoch, its index + 1, its key."""
        return {"epoch": at[0], "next": at[1] + 1, "key": at[2]}

    def restore(self, position: dict) -> None:
        """Iterate on from `position` (advance's): its epoch, without that epoch's first `next` samples. They are read,
        checked and shuffled again (the buffer's draws repeat), but not yielded, and their skips not counted or logged
        again (the run that saved the position did; it may also have counted some read ahead of it). Called before
        iterating; a reader that does not loop has no position to go on from. Where the last sample passed over is not
        the one the position names (the shards changed, or one no longer reads), a warning says so: the order then is
        not the saved run's, and the pass may repeat or miss samples."""
        if not self.loop:
            raise ValueError("restore is for a training reader (loop=True)")
        epoch, n = int(position["epoch"]), int(position["next"])
        if epoch < 0 or n < 0:
            raise ValueError(f"not a reader position: {position!r}")
        self.epoch, self._passed_over, self._expect_key = epoch, n, position.get("key")

    def _my_shards(self) -> list[str]:
        if self.split_samples:
            return list(self.shards)
        return [s for i, s in enumerate(self.shards) if i % self.world == self.rank]

    def _skip(self, shard: str, key: str, reason: str) -> None:
        if self._replaying:  # (counted and logged by the run that saved the position; but a shard that no longer
            if key == "*" and reason.startswith("unreadable shard"):  # reads is news, and changes the order)
                log.warning("%s, passed over on the way to the resumed position, is now an unreadable shard (%s): "
                            "its samples are not where the checkpoint's run had them", os.path.basename(shard), reason)
            return
        self.skipped[reason.split(" (")[0]] += 1
        log.warning("skipping sample %r in %s: %s", key, os.path.basename(shard), reason)

    def _samples_in(self, shard: str):
        try:
            data = Path(shard).read_bytes()
        except OSError as e:
            self._skip(shard, "*", f"unreadable shard ({e})")
            return
        groups: dict[str, dict] = {}
        order: list[str] = []
        last = dup = None  # the key of the file before; a key seen again, whose second sample's files are passed over
        try:
            for name, payload in tar_files(data):
                key, ext = _split_name(name)
                if key is None:
                    continue
                if key == dup:
                    continue
                dup = None
                parts = groups.get(key)
                if parts is None:
                    parts = groups[key] = {}
                    order.append(key)
                elif key != last or ext in parts:  # a sample's files are contiguous: this is a second sample
                    self._skip(shard, key, "duplicate key (a second sample with this key in the shard)")
                    last = dup = key
                    continue
                parts[ext] = payload
                last = key
        except ShardError as e:
            cut = None if e.member is None else _sample_key(e.member)
            if e.boundary:  # every file before the end is whole, but what followed it is gone: said once, by shard
                self._skip(shard, "*", f"shard cut short ({e}; its {len(order)} keys read)")
            elif not order:
                self._skip(shard, "*", f"unreadable shard ({e})")
                return
            elif cut is not None and cut != order[-1]:  # a new sample's first file cut: the samples before it whole
                self._skip(shard, cut, f"incomplete sample (the shard ends inside it, after {len(order)} whole keys: "
                                       f"{e})")
            else:
                # the last key's files may be cut short (its .json or caption past the end): not read as whole; one
                # sample lost, so one count (the shard's error goes in the reason)
                self._skip(shard, order[-1], f"incomplete sample (the shard ends inside or after it, after "
                                             f"{len(order)} keys: {e})")
                groups.pop(order.pop())
        del data
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
        if "txt" not in parts and (self.need_caption or "json" not in parts):
            return self._skip(shard, key, "no caption (.txt)")
        try:
            caption = parts["txt"].decode("utf-8").strip() if "txt" in parts else None
        except UnicodeDecodeError:
            return self._skip(shard, key, "caption is not UTF-8")
        if caption == "":
            return self._skip(shard, key, "empty caption")
        if caption and ("&" in caption or not any(c.isalnum() for c in caption)):  # (the tokenizer's cleaning then)
            from clipfast.tokenizer import Tokenizer

            if not Tokenizer.clean(caption):
                return self._skip(shard, key, "empty caption (nothing left after cleaning: HTML entities, control "
                                  "characters)")
        problem = image_problem(parts[ext])
        if problem:
            return self._skip(shard, key, problem)
        meta = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._skip(shard, key, "metadata .json does not parse")
            if not isinstance(meta, dict):
                return self._skip(shard, key, f"metadata .json is not an object (a {type(meta).__name__})")
        if caption is None:  # (an evaluation sample without a .txt)
            if "label" not in meta and "captions" not in meta:
                return self._skip(shard, key, "no caption (.txt), nor a label or captions in its .json")
            caption = ""
        return Sample(key, parts[ext], caption, meta, parts)

    def _epoch(self, rng: random.Random):
        """One epoch's samples, in order."""
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

    def __iter__(self):
        while True:
            rng = random.Random(self.seed * 1000003 + self.epoch)
            passed_over, self._passed_over = self._passed_over, 0
            self._replaying = passed_over > 0
            n = -1
            for n, s in enumerate(self._epoch(rng)):
                if n < passed_over:
                    self._replaying = n + 1 < passed_over  # (what is read after the last one passed over counts)
                    if not self._replaying and self._expect_key not in (None, s.key):
                        log.warning("the shards changed since the checkpoint: sample %d of epoch %d is %r, the "
                                    "checkpoint's was %r; going on in the changed order, so this pass may repeat or "
                                    "miss samples", n, self.epoch, s.key, self._expect_key)
                    continue
                s.at = (self.epoch, n, s.key)
                yield s
            self._replaying, self._expect_key = False, None
            if passed_over > n + 1:
                log.warning("the position to go on from, sample %d of epoch %d, is past that epoch's %d samples (the "
                            "shards changed?): going on with the next epoch", passed_over, self.epoch, n + 1)
            self.epoch += 1
            if not self.loop:
                return
            if self.seen == 0:
                raise RuntimeError(f"no valid samples in {len(self._my_shards())} shard(s): {dict(self.skipped)}")


def check_weights(specs: list[str], weights) -> None:
    """One positive weight per dataset (train_data's comma-separated entries): MixedReader's rule, which the run config
    checks before anything is built."""
    if len(weights) != len(specs):
        raise ValueError(f"{len(weights)} weight(s) for {len(specs)} training dataset(s) ({', '.join(specs)}): "
                         "give one weight per comma-separated entry")
    if any(not w > 0 for w in weights):
        raise ValueError(f"dataset weights must be positive, got {tuple(weights)}")


class MixedReader:
    """Training samples drawn from several datasets by weight: each draw picks dataset i with probability
    w_i / sum(w) (a seeded generator), then that dataset's next sample (a ShardReader of its own, endless, shuffled,
    its shards split across ranks as usual). The datasets share one count of skipped samples. `drawn` counts the draws
    per dataset (this reader's, since it was made). The generator is reseeded every DRAW_BLOCK draws (from the seed,
    rank and block), so that a resume replays at most that many draws, not every draw of the run (1.1 us each)."""

    DRAW_BLOCK = 1 << 16

    def __init__(self, specs: list[str], weights, rank=0, world=1, seed=0, shuffle_buffer=1000):
        check_weights(specs, weights)
        self.specs, self.weights = specs, [float(w) for w in weights]
        self.rank, self.world, self.seed, self.shuffle_buffer = rank, world, seed, shuffle_buffer
        self.readers = [ShardReader(list_shards(spec), rank, world, seed * 7 + i, shuffle_buffer=shuffle_buffer)
                        for i, spec in enumerate(specs)]
        self.skipped: Counter = Counter()
        for r in self.readers:
            r.skipped = self.skipped  # one count, which the loader's decoder check adds to as well
        self.draws = 0  # draws made (or passed over by restore) since the run began
        self.rng = self._block_rng(0)
        self.drawn = [0] * len(specs)

    def _block_rng(self, block: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.rank}:{block}")  # (a str seed: the same in every process)

    def advance(self, position: dict | None, at: tuple) -> dict:
        """The position just after the sample drawn `at` (its Sample.at): the draws so far and each dataset's reader's
        position (None: none of its samples yet). Updates `position` in place."""
        m, i, inner = at
        if position is None:
            position = {"draws": 0, "readers": [None] * len(self.readers)}
        position["draws"] = m + 1
        position["readers"][i] = self.readers[i].advance(position["readers"][i], inner)
        return position

    def restore(self, position: dict) -> None:
        """Iterate on from `position` (advance's): the draws replayed (no sample read), each dataset's reader
        restored."""
        if len(position["readers"]) != len(self.readers):
            raise ValueError(f"a position of {len(position['readers'])} datasets for {len(self.readers)}")
        index = range(len(self.readers))
        self.draws = int(position["draws"])
        self.rng = self._block_rng(self.draws // self.DRAW_BLOCK)
        for _ in range(self.draws % self.DRAW_BLOCK):  # (the block's draws before the position)
            self.rng.choices(index, self.weights)
        for reader, p in zip(self.readers, position["readers"]):
            if p is not None:
                reader.restore(p)

    def __iter__(self):
        sources = [iter(r) for r in self.readers]
        index = range(len(sources))
        while True:
            m = self.draws
            if m and m % self.DRAW_BLOCK == 0:
                self.rng = self._block_rng(m // self.DRAW_BLOCK)
            i = self.rng.choices(index, self.weights)[0]
            self.drawn[i] += 1
            self.draws = m + 1
            s = next(sources[i])
            s.at = (m, i, s.at)
            yield s

