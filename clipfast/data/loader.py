"""The DALI pipeline: shards -> decoded, cropped, resized uint8 images on the training device + packed text.

Images: a validating shard reader (clipfast.data.shards) feeds encoded bytes to DALI through
`external_source`; DALI decodes with a region of interest (`decoders.image_random_crop`: only the crop
is decoded) and resizes straight to the training resolution — `mixed` (nvJPEG on the GPU) when there
is one, the CPU otherwise. Evaluation decodes whole images and preprocesses them as open_clip's evaluation transform
does (eval_resize_crop: bicubic resize of the shorter side, centre crop, the same sizes and offsets).
Captions: tokenised and reduced on the host (clipfast.reduce.TextReducer), packed end to end. `reader_process=True`
(or a number of processes) reads the shards and tokenises in child processes instead of on the training thread
(clipfast.data.prefetch).
`augment="simclr"` adds SimCLR's flip, colour jitter, grayscale and blur to the training images ("CLIP + data
augmentation"); `views=V` adds V more views of each image for SLIP's self-supervised loss, each its own random crop
(area `view_crop_scale`) with SimCLR's augmentations (clipfast.data.augment). With views the image is decoded
whole once and cropped V + 1 times, instead of decoding only the crop.

A batch is {images: uint8 (B,3,H,W), views: uint8 (V,B,3,H,W) or None, text: int32 (T,), cu_seqlens: int32 (B+1,),
cu_seqlens_host: the same on the CPU, max_len: int, keys: [str], captions: [str] (as stored, before reduction),
meta: [dict]}, tensors on the training device but cu_seqlens_host.
"""
from __future__ import annotations

import collections
import copy
import io
import itertools
import logging
import time

import numpy as np
import torch

from clipfast.data.augment import check_augment, simclr
from clipfast.data.shards import MixedReader, ShardReader, list_shards, split_entries

log = logging.getLogger("clipfast.data")


def eval_resize_crop(encoded, size: int, decode_device: str, op_device: str):
    """Decoded, resized and cropped evaluation images as open_clip's evaluation transform makes them (torchvision's
    Resize(size) with bicubic interpolation on PIL images, then CenterCrop(size)): the shorter side to `size`, the
    longer to int(size * long / short), antialiased cubic filtering, the crop's offsets round((n - size) / 2) half to
    even (Python's round); the orientation as stored (PIL does not apply EXIF's). Computed per sample in the graph
    from the encoded headers. tests/test_data.py's nine images come within 0.06-0.22 levels of 255 of open_clip's
    pixels on average per image; DALI's shorter-side resize and centre crop before were 0.4-3.8 levels off (a pixel
    of shift where the offset rounds, linear filtering) and 62.8 on the JPEG that EXIF says to rotate."""
    from nvidia.dali import fn, types

    shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT64)  # (H, W, C)
    h, w = shape[0], shape[1]
    nh = size + (h > w) * (size * h // w - size)  # integer floor: int(size * h / w) exactly
    nw = size + (w > h) * (size * w // h - size)
    dy, dx = nh - size, nw - size
    top = dy // 2 + (dy & 1 & (dy // 2))  # half to even: k + 1/2 rounds up where k is odd
    left = dx // 2 + (dx & 1 & (dx // 2))
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
    images = fn.resize(images, device=op_device, resize_x=fn.cast(nw, dtype=types.FLOAT),
                       resize_y=fn.cast(nh, dtype=types.FLOAT), interp_type=types.INTERP_CUBIC, antialias=True)
    start = fn.cast(fn.stack(top, left), dtype=types.INT32)
    return fn.slice(images, start=start, shape=[size, size], axes=[0, 1], device=op_device)


def _host_rejects(image: bytes) -> str | None:
    """Why PIL cannot decode `image` whole, or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def pack_text(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[[ids], ...] -> packed ids (T,) int32, cu_seqlens (S+1,) int32, max length."""
    lengths = [len(s) for s in seqs]
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(cu[-1]))
    return torch.from_numpy(flat), torch.from_numpy(cu), max(lengths, default=0)


class DaliLoader:
    """Iterator of batches. `train=True`: endless, shuffled, random-resized-crop; else one ordered pass.
    Training: `data_position()` says where the batches returned so far end; a loader made alike with that `position`
    (and its seed as `reader_seed`) goes on with the samples this one would have returned next (a resume)."""

    # False: DALI reads each batch's encoded bytes where they are (no_copy), instead of copying them on the training
    # thread (13 us a web-like sample, most of what that thread still spent in the loader with the reader process).
    # DALI may use them until the outputs of their iteration are taken; _pending holds their samples until then.
    copy_input = False

    def __init__(self, data: str, batch_size: int, image_size: int, text_reducer, *, train=True, rank=0,
                 world=1, seed=0, crop_scale=(0.4, 1.0), threads=2, device: torch.device | str = "cpu",
                 drop_last=None, augment="none", views=0, view_crop_scale=(0.08, 1.0), weights=(),
                 reader_process=False, reader_seed=None, position=None):
        from nvidia.dali import fn, pipeline_def, types

        check_augment(augment)
        if views < 0 or (views and not train):
            raise ValueError(f"views must be 0, or more for training; got views={views} with train={train}")

        self.device = torch.device(device)
        self.batch_size, self.train, self.text_reducer = batch_size, train, text_reducer
        self.drop_last = train if drop_last is None else drop_last
        if weights and not train:
            raise ValueError("dataset weights are for training; an evaluation reads its data once, in order")
        # the samples' order: `reader_seed` (default `seed`, which also seeds the crops); `position`, the
        # data_position() of a loader made alike, goes on after the last sample that loader returned (a resume)
        self.reader_seed = seed if reader_seed is None else reader_seed
        if position is not None and not train:
            raise ValueError("a position to go on from is for training; an evaluation reads its data once, in order")
        if weights:  # `data`'s comma-separated entries as datasets of their own, drawn by weight
            self.reader = MixedReader([d.strip() for d in split_entries(data) if d.strip()], weights, rank, world,
                                      self.reader_seed)
        else:
            self.reader = ShardReader(list_shards(data), rank, world, self.reader_seed, loop=train,
                                      shuffle_buffer=1000 if train else 0, need_caption=train)
        if reader_process:  # reading and tokenising in child processes (clipfast.data.prefetch); True: one
            from clipfast.data.prefetch import ReaderProcess

            self.reader = ReaderProcess(self.reader, text_reducer, processes=int(reader_process), position=position)
        elif position is not None:
            self.reader.restore(position)
        self._position = copy.deepcopy(position)  # after the last sample returned (the reader's `advance`)
        self._samples = iter(self.reader)
        self._pending: collections.deque = collections.deque()
        self.wait_s = 0.0  # host time spent waiting for batches (stall), for the training log
        gpu = self.device.type == "cuda"
        decode_device = "mixed" if gpu else "cpu"
        op_device = "gpu" if gpu else "cpu"

        device_id = (self.device.index or 0) if gpu else None  # None: a CPU-only pipeline
        self._decode_device, self._device_id, self._probe = decode_device, device_id, None

        def crop(images, area):
            return fn.random_resized_crop(images, device=op_device, size=(image_size, image_size),
                                          random_area=list(area), random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                          antialias=True)

        def chw(images):
            return fn.transpose(images, device=op_device, perm=[2, 0, 1])  # HWC -> CHW

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                      seed=seed * 7919 + rank, prefetch_queue_depth=2, exec_dynamic=True,
                      enable_conditionals=augment != "none" or views > 0)
        def pipe():
            jpegs = fn.external_source(source=self._next_encoded, batch=True, dtype=types.UINT8,
                                       no_copy=not self.copy_input)
            if not train:
                return chw(eval_resize_crop(jpegs, image_size, decode_device, op_device))
            if views:  # one whole decode, cropped for the CLIP view and again for each SSL view
                whole = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
                images = crop(whole, crop_scale)
                extra = [chw(simclr(crop(whole, view_crop_scale), image_size, op_device,
                                    flip=augment != "simclr_noflip")) for _ in range(views)]  # (no mirror where asked)
            else:  # only the crop is decoded
                images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                                       random_area=list(crop_scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                                       num_attempts=10)
                images = fn.resize(images, device=op_device, resize_x=image_size, resize_y=image_size,
                                   antialias=True)
                extra = []
            if augment != "none":
                images = simclr(images, image_size, op_device, flip=augment == "simclr")
            return (chw(images), *extra)

        self._make_pipe = pipe
        self.pipe = pipe()
        self.pipe.build()

    def _next_encoded(self):
        """DALI's source: the next batch of encoded images; its captions wait in _pending, in order."""
        batch = list(itertools.islice(self._samples, self.batch_size))
        if not batch or (self.drop_last and len(batch) < self.batch_size):
            raise StopIteration
        self._pending.append(batch)
        return [np.frombuffer(s.image, dtype=np.uint8) for s in batch]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            images, *views = self.pipe.run()  # raises StopIteration at the end of an evaluation pass
        except RuntimeError as e:  # a sample the reader's checks passed but the decoder rejects
            self._recover(e)
            return next(self)
        samples = self._pending.popleft()
        if self.train:
            advance, position = self.reader.advance, self._position
            for s in samples:
                position = advance(position, s.at)
            self._position = position
        text, cu, max_len = pack_text([self.text_reducer(s.caption) if s.ids is None else s.ids for s in samples])
        out = self._to_torch(images)
        if views:  # each view copied straight into its slice of one (V, B, 3, H, W) tensor (no stack: one copy fewer)
            buf = torch.empty((len(views), *out.shape), dtype=torch.uint8, device=out.device)
            for v, slot in zip(views, buf):
                self._to_torch(v, slot)
            views = buf
        else:
            views = None
        self.wait_s += time.perf_counter() - t0
        nb = self.device.type == "cuda"
        return {
            "images": out,
            "views": views,
            "text": text.to(self.device, non_blocking=nb),
            "cu_seqlens": cu.to(self.device, non_blocking=nb),
            "cu_seqlens_host": cu,  # (where the graphed step splits micro-batches: no device read)
            "max_len": max_len,
            "keys": [s.key for s in samples],
            "captions": [s.caption for s in samples],
            "meta": [s.meta for s in samples],
        }

    def data_position(self) -> dict:
        """Where the samples returned so far end, for a loader made alike to go on from (DaliLoader's `position`, with
        `reader_seed` this one's): {"seed": the reader's seed, "position": the reader's position, None before any}."""
        return {"seed": self.reader_seed, "position": copy.deepcopy(self._position)}

    def _to_torch(self, images, out: torch.Tensor | None = None) -> torch.Tensor:
        """DALI's batch as a uint8 tensor on the training device; into `out` (contiguous, its shape) if given."""
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = images.as_tensor()
            out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device) if out is None else out
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        host = torch.from_numpy(images.as_array())
        return host if out is None else out.copy_(host)

    def _recover(self, error: Exception) -> None:
        """Find the undecodable samples among those fed to DALI, skip them (counted and logged by key), put the rest
        back in front of the stream and rebuild the pipeline, which DALI leaves unusable after an error. Found by a
        full host decode (PIL); where PIL takes them all, by DALI's own decoder, a sample at a time (slower; its
        decoder refuses some that PIL's takes). An error that no sample explains, or that every sample alone meets in
        DALI's decoder, is raised: it is not the data's."""
        fed = [s for batch in self._pending for s in batch]
        self._pending.clear()
        why = {id(s): _host_rejects(s.image) for s in fed}
        if not any(why.values()):
            why = {id(s): self._dali_rejects(s.image) for s in fed}
            if all(why.values()):  # every sample, alone, fails too: the decoder's trouble (memory, device), not theirs
                raise error
        good = []
        for s in fed:
            if why[id(s)] is None:
                good.append(s)
                continue
            self.reader.skipped["does not decode"] += 1
            log.warning("skipping sample %r: the decoder rejects it (%s)", s.key, why[id(s)])
        if len(good) == len(fed):
            raise error
        self._samples = itertools.chain(good, self._samples)
        self.pipe = self._make_pipe()
        self.pipe.build()

    def _dali_rejects(self, image: bytes) -> str | None:
        """Why DALI's decoder (this loader's device) refuses `image` alone, or None: a one-sample pipeline, built
        again after each refusal (DALI leaves a pipeline unusable after an error)."""
        from nvidia.dali import fn, pipeline_def, types

        if self._probe is None:
            @pipeline_def(batch_size=1, num_threads=1, device_id=self._device_id, prefetch_queue_depth=1)
            def probe():
                encoded = fn.external_source(name="encoded", dtype=types.UINT8)
                return fn.decoders.image(encoded, device=self._decode_device, output_type=types.RGB)

            self._probe = probe()
            self._probe.build()
        self._probe.feed_input("encoded", [np.frombuffer(image, dtype=np.uint8)])
        try:
            self._probe.run()
            return None
        except RuntimeError as e:
            self._probe = None  # (what DALI says after "encountered:", e.g. "nvImageCodec failure: '#3'")
            lines = [ln.strip() for ln in str(e).split("encountered:", 1)[-1].splitlines()
                     if ln.strip() and "no longer valid" not in ln]
            return f"DALI: {lines[0] if lines else 'decode error'}"

    def close(self) -> None:
        """Ends the reader process, if there is one (also when the loader is collected)."""
        close = getattr(self.reader, "close", None)
        if close:
            close()

    @property
    def skipped(self) -> dict:
        return dict(self.reader.skipped)
