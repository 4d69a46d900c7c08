"""The shard reader and the captions' tokenising in a process of their own, off the thread that launches the steps.

On a GPU, DALI decodes on the device, but reading the shards, checking each sample and tokenising its caption is
Python (~33 us a web-like sample, bench/data_path.py): 34 ms of a B/16 112 px step of 1024 samples. On the training
thread that time adds to an eager step, which launches its kernels from the same thread. `ReaderProcess` runs the
reader (clipfast.data.shards) and the text reducer in a spawned child, in order, and hands the samples over in chunks
through a pipe; a thread of the parent unpickles them, so the training thread only takes finished samples.

The samples, their order, the token ids and the skip counts are those of the reader in-process: the child runs the
same reader and reducer (pickled with their seeds and RNG states) one sample after another. Skipped samples are
logged by the child (its stderr is the parent's) and counted in the parent (`skipped`, with the decoder's own).
With `processes` > 1 (the trainer's `reader_processes`) the rank's shards are dealt out among that many children
(`split_reader`), each reducer draws from its own seed, and their chunks are taken in turn: every sample once, in
an order that repeats from run to run, but not the in-process order.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from collections import Counter
from multiprocessing import resource_tracker

_END = "end"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _serve(reader, reducer, chunk: int, out) -> None:
    """The child: the reader's samples with their token ids, `chunk` at a time, then _END (or the exception), sent on
    `out`, the write end of a one-way pipe that only this process holds."""
    for sig in STOP_SIGNALS:  # a scheduler signals the whole process group: the trainer decides when to stop
        signal.signal(sig, signal.SIG_IGN)  # (clipfast.checkpoint) and ends this process (SIGKILL)
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="[reader] %(asctime)s %(name)s: %(message)s")

    # a thread sends (pickles, then writes while the parent reads), so that reading the next chunk overlaps the
    # write: sending from this thread halved the samples a second (66 -> 126-153 us a sample, /tmp bench on the
    # 2-core machine), as a multiprocessing Queue's own feeder thread does
    pending: queue.Queue = queue.Queue(maxsize=1)

    def send() -> None:
        while True:
            item = pending.get()
            try:
                out.send(item)  # blocks while the parent's side is full: the child reads no further ahead
            except OSError:  # (BrokenPipeError) the parent is gone: nobody will read on
                os._exit(0)
            except Exception:  # (an item that does not pickle) on stderr; the parent reports the exit code
                traceback.print_exc()
                os._exit(1)
            if not isinstance(item, tuple):
                return

    sender = threading.Thread(target=send, name="clipfast-reader-send")
    sender.start()
    put = pending.put
    try:
        buf = []
        for s in reader:
            s.ids = reducer(s.caption)
            buf.append(s)
            if len(buf) == chunk:
                put((buf, dict(reader.skipped)))
                buf = []
        put((buf, dict(reader.skipped)))
        put(_END)
    except Exception as e:  # the parent raises it where the samples run out
        put(e)
    sender.join()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so that a trainer killed outright
    (SIGKILL, the out-of-memory killer) leaves no reader behind; elsewhere its next send fails. (The
    signal follows the parent's thread that started this process: the trainer's main thread.)"""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():  # (died before the prctl)
        raise SystemExit(0)


def _kill(proc) -> None:
    if proc.is_alive():
        proc.kill()  # (it ignores SIGTERM)
    proc.join(timeout=10)


READER_PROCESS = ("auto", "off", "on")
log = logging.getLogger("clipfast.data")


def resolve_reader_process(cfg, device) -> int:  # device: a torch.device
    """How many child processes the trainer's loader reads in (0: none, the training thread reads): with
    `reader_process` "auto" where the model trains on a GPU (there the training thread launches the steps; on the CPU
    the child competes with DALI's decoding threads for the cores: 322 -> 340 us a sample on the 2-core machine,
    bench/results/data-path-2026-11-27), or "on", `reader_processes` of them (default 1)."""
    from clipfast.config import check_choice

    value = check_choice(cfg, "reader_process", READER_PROCESS)
    n = getattr(cfg, "reader_processes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"reader_processes must be a whole number, 1 or more, got {n!r}")
    on = value == "on" or (value == "auto" and device.type == "cuda")
    if not on and n > 1:
        log.warning("reader_processes=%d is unused: the reader process is off (reader_process=%r on %s)", n, value,
                    device.type)
    return n if on else 0


def reader_children(shard_counts: list[int], world: int, n: int) -> int:
    """How many readers split_reader makes of a rank's n for datasets of these shard counts over `world` ranks: n cut
    to the smallest shards // world among the datasets read in whole shards (those with at least `world`)."""
    whole = [c // world for c in shard_counts if c >= world]
    return max(1, min(n, *whole)) if whole else max(1, n)


def split_reader(reader, n: int) -> list:
    """`reader` (ShardReader or MixedReader) as n readers whose samples, together, are its samples: rank r of
    `world` becomes ranks r, r + world, ... of world x n, so its shards are dealt out among them and the other ranks'
    stay theirs; each reader shuffles on its own. Where the ranks read whole shards, n is cut to shards // world, so
    that the readers do too (the same cut on every rank: otherwise a rank whose readers outnumbered the shards would
    read every shard's share of samples, ShardReader's way with fewer shards than ranks, beside ranks reading whole
    shards). With fewer shards than ranks, every reader reads them all and keeps every (world x n)-th sample. A
    MixedReader's datasets are split alike, with one n for all, cut to the smallest shards // world among those read
    in whole shards (otherwise such a dataset would be read in full by every reader of every rank)."""
    from clipfast.data.shards import MixedReader, ShardReader

    if n <= 1:
        return [reader]
    if not isinstance(reader, (ShardReader, MixedReader)):
        raise TypeError(f"cannot split a {type(reader).__name__} over reader processes (a ShardReader or MixedReader)")
    rank, world = reader.rank, reader.world
    n = reader_children([len(r.shards) for r in (reader.readers if isinstance(reader, MixedReader) else [reader])],
                        world, n)
    if n == 1:
        return [reader]
    if isinstance(reader, ShardReader):
        return [ShardReader(reader.shards, rank + j * world, world * n, reader.seed * 1009 + j,
                            shuffle_buffer=reader.shuffle_buffer, loop=reader.loop, need_caption=reader.need_caption)
                for j in range(n)]
    return [MixedReader(reader.specs, reader.weights, rank + j * world, world * n, reader.seed * 1009 + j,
                        shuffle_buffer=reader.shuffle_buffer) for j in range(n)]


class _Child:
    """One reader process: the child, the pipe's read end, and the thread that unpickles what comes through it."""

    def __init__(self, ctx, reader, reducer, chunk: int, depth: int, name: str):
        self.conn, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_serve, args=(reader, reducer, chunk, send), daemon=True, name=name)
        # the child is born with the scheduler's signals blocked (a mask survives exec; a SIGTERM to the process
        # group while it imports would kill it); the parent's are held only while it starts, then delivered. The
        # resource tracker first: started inside the first start(), it unblocks SIGINT and SIGTERM in this thread
        # after spawning itself (multiprocessing.resource_tracker), and the child was born with them open
        resource_tracker.ensure_running()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        # the child holds the pipe's only write end, so its death is the end of the pipe, also in the middle of a
        # chunk: with the parent holding one too (a multiprocessing Queue), a reader killed while it sent left the
        # parent waiting forever for the rest of that chunk
        send.close()
        # multiprocessing ends daemon children at exit with SIGTERM, which this one ignores, and then waits for it:
        # killed first (atexit runs the later registered first), or an exit after an error would hang
        atexit.register(_kill, self.proc)
        self.closed = False
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.counts: dict = {}  # the child's skip counts as of its last chunk
        self.pull = threading.Thread(target=self._unpickle, daemon=True, name=f"{name}-pull")
        self.pull.start()

    def _unpickle(self) -> None:
        try:
            while not self.closed:
                try:
                    item = self.conn.recv()
                except (EOFError, OSError):  # the child is gone: killed (out of memory), or close()
                    if not self.closed:
                        self.proc.join(timeout=10)
                        self.ready.put(RuntimeError(f"the reader process exited with code {self.proc.exitcode}"))
                    return
                self.ready.put(item)
                if not isinstance(item, tuple):
                    return
        finally:
            self.conn.close()  # (its file descriptor now, not when the collector gets to it)

    def close(self) -> None:
        self.closed = True
        _kill(self.proc)  # (the pull thread's read then ends)
        try:  # and a pull thread waiting to hand over a chunk goes on to that end, closing its pipe end
            while True:
                self.ready.get_nowait()
        except queue.Empty:
            pass


class ReaderProcess:
    """Iterates `reader`'s samples (ShardReader or MixedReader), each with `ids` = reducer(caption), made in a child
    process. `chunk` samples travel together; `depth` chunks wait at most in the parent, and what the pipe holds
    (the child stops reading while they do).

    `processes` > 1: that many children, the reader's shards dealt out among them (`split_reader`), each with the
    reducer reseeded (`TextReducer.for_worker`), for hosts where one child cannot keep up with the GPU; their chunks
    are taken in turn (child 0's first, child 1's first, ...), so a run is the same from run to run, and a child that
    runs out (a reader that does not loop) leaves the turn to the others."""

    def __init__(self, reader, reducer, chunk: int = 256, depth: int = 8, processes: int = 1,
                 position: dict | None = None):
        ctx = mp.get_context("spawn")  # (fork would copy CUDA's and DALI's threads' state)
        readers = split_reader(reader, processes)
        self._readers = readers  # (the parent's copies: for `advance`)
        if position is not None:  # (advance's, from a run with as many children) each child's reader goes on from there
            if len(readers) == 1:
                readers[0].restore(position)
            else:
                if len(position["children"]) != len(readers):
                    raise ValueError(f"a position of {len(position['children'])} reader processes for {len(readers)}")
                for r, p in zip(readers, position["children"]):
                    if p is not None:
                        r.restore(p)
        reducers = [reducer] if len(readers) == 1 else [reducer.for_worker(j) for j in range(len(readers))]
        per_child = max(2, depth // len(readers))
        self._children = [_Child(ctx, r, red, chunk, per_child, "clipfast-reader" + (f"-{j}" if j else ""))
                          for j, (r, red) in enumerate(zip(readers, reducers, strict=True))]
        self._proc = self._children[0].proc  # (the first child's process)
        self.skipped: Counter = Counter()  # the children's counts as of their last chunks, and the parent's additions

    @property
    def processes(self) -> int:
        return len(self._children)

    def advance(self, position: dict | None, at: tuple) -> dict:
        """The position just after the sample `at` (its Sample.at): one child's, its reader's; with several, each
        child's reader's (None: none of its samples yet), updated in place."""
        if len(self._readers) == 1:
            return self._readers[0].advance(position, at)
        j, inner = at
        if position is None:
            position = {"children": [None] * len(self._readers)}
        position["children"][j] = self._readers[j].advance(position["children"][j], inner)
        return position

    def __iter__(self):
        several = len(self._children) > 1
        turn = list(enumerate(self._children))
        while turn:
            for j, child in list(turn):
                item = child.ready.get()  # note: a wait here is the data path's stall, counted in the loader's wait_s
                if isinstance(item, BaseException):
                    raise item
                if item == _END:
                    turn.remove((j, child))
                    continue
                samples, counts = item
                for k, v in counts.items():
                    self.skipped[k] += v - child.counts.get(k, 0)
                child.counts = counts
                if several:
                    for s in samples:
                        s.at = (j, s.at)
                yield from samples

    def close(self) -> None:
        for child in self._children:
            child.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass
