"""clipfast.data.prefetch: the reader and the captions' tokenising in a child process give what they give in-process
(samples, order, token ids, skip counts), its errors reach the trainer, and the loader's batches are the same."""
import pickle

import pytest

from clipfast.data import DaliLoader, ShardReader, list_shards, write_shard
from clipfast.data.prefetch import ReaderProcess
from clipfast.data.shards import MixedReader
from clipfast.reduce import TextReducer


def test_the_text_reducer_pickles_with_its_rng_state():
    red = TextReducer("random", 6, seed=4)
    caption = "a very long caption with many words so that the random mask has to drop most of them"
    red(caption)  # the RNG moved on once
    twin = pickle.loads(pickle.dumps(red))
    assert [twin(caption) for _ in range(5)] == [red(caption) for _ in range(5)]


@pytest.mark.parametrize("strategy", ["random", "syntax"])
def test_a_reader_process_yields_the_in_process_samples_ids_and_skips(corrupt_demo, strategy):
    shards = list_shards(str(corrupt_demo / "train"))
    here, red = ShardReader(shards, seed=3, loop=False), TextReducer(strategy, 8, seed=5)
    want = [(s.key, s.caption, s.meta, s.image, red(s.caption)) for s in here]
    there = ReaderProcess(ShardReader(shards, seed=3, loop=False), TextReducer(strategy, 8, seed=5), chunk=100)
    got = [(s.key, s.caption, s.meta, s.image, s.ids) for s in there]
    assert len(got) == len(want) > 1000 and got == want
    assert there.skipped == here.skipped and sum(there.skipped.values()) == 2  # "cut", "nocap"
    there.close()


def test_a_mixed_reader_process_draws_as_in_process(corrupt_demo):
    specs = [str(corrupt_demo / "train"), str(corrupt_demo / "val")]
    here, red = MixedReader(specs, (3, 1), seed=2), TextReducer("truncate", 16)
    it = iter(here)
    want = [(s.key, red(s.caption)) for s in (next(it) for _ in range(600))]
    there = ReaderProcess(MixedReader(specs, (3, 1), seed=2), TextReducer("truncate", 16), chunk=64)
    it = iter(there)
    assert [(s.key, s.ids) for s in (next(it) for _ in range(600))] == want
    there.close()
    assert not there._proc.is_alive()



def test_the_reader_process_error_is_raised_in_the_trainer(tmp_path):
    write_shard(tmp_path / "bad.tar", [{"__key__": "x", "jpg": b"not an image" * 10, "txt": "no"}])
    there = ReaderProcess(ShardReader([str(tmp_path / "bad.tar")]), TextReducer())
    with pytest.raises(RuntimeError, match="no valid samples"):
        next(iter(there))


def test_a_reader_process_that_dies_is_an_error_not_a_hang(corrupt_demo):
    there = ReaderProcess(ShardReader(list_shards(str(corrupt_demo / "train"))), TextReducer(), chunk=50, depth=2)
    it = iter(there)
    next(it)
    there._proc.kill()  # (as the out-of-memory killer would)
    with pytest.raises(RuntimeError, match="the reader process exited with code -9"):
        for _ in range(10_000):  # the chunks already sent, then the error
            next(it)


def _first_error(there, seconds: float = 60) -> str | None:
    """The RuntimeError that taking `there`'s first sample raises (None if it gives one), failing the test if the
    parent still waits after `seconds` rather than hanging it."""
    import threading

    raised = []

    def take():
        try:
            next(iter(there))
            raised.append(None)
        except RuntimeError as e:
            raised.append(str(e))

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=seconds)
    assert not t.is_alive(), f"the parent still waits for the reader process after {seconds} s"
    return raised[0]


def _dies_in_the_middle_of_a_chunk(reader, reducer, chunk, out):
    """A reader process's stand-in that is killed while it sends: the length of a 1 MB message, 10 bytes of it."""
    import os
    import signal
    import struct

    os.write(out.fileno(), struct.pack("!i", 1 << 20) + b"x" * 10)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_reader_process_killed_while_it_sends_is_an_error_not_a_hang(corrupt_demo, monkeypatch):
    """Killed in the middle of a chunk (the out-of-memory killer does not wait for a message's end): the parent, which
    has read the start of it, gets the error. It waited forever for the rest while it held a write end of the pipe
    too (a multiprocessing Queue): a full test run hung there once."""

    import clipfast.data.prefetch as prefetch

    monkeypatch.setattr(prefetch, "_serve", _dies_in_the_middle_of_a_chunk)
    there = ReaderProcess(ShardReader(list_shards(str(corrupt_demo / "train"))), TextReducer())
    assert _first_error(there) == "the reader process exited with code -9"


class _SampleThatDoesNotPickle:
    """A reader (picklable itself) whose one sample holds a lambda: the child cannot send it."""

    skipped: dict = {}

    def __iter__(self):
        import types

        yield types.SimpleNamespace(key="x", caption="a photo", fn=lambda: None)


def test_a_sample_the_child_cannot_send_is_an_error_not_a_hang():
    """The child's sending thread fails to pickle a chunk: the child ends with code 1 (the traceback on its stderr)
    and the trainer gets the error, instead of the child's reading thread waiting forever for its sender."""

    there = ReaderProcess(_SampleThatDoesNotPickle(), TextReducer(), chunk=1)
    assert _first_error(there) == "the reader process exited with code 1"


def test_the_loader_batches_are_the_same_with_a_reader_process(corrupt_demo):
    def batches(reader_process):
        dl = DaliLoader(str(corrupt_demo / "train"), 32, 16, TextReducer("block", 6, seed=1), train=True, seed=7,
                        threads=1, reader_process=reader_process)
        out = [next(dl) for _ in range(3)]
        dl.close()
        return out

    for a, b in zip(batches(False), batches(True), strict=True):
        assert a["keys"] == b["keys"]
        assert a["text"].tolist() == b["text"].tolist() and a["cu_seqlens"].tolist() == b["cu_seqlens"].tolist()
        assert a["images"].equal(b["images"])  # (the same DALI seed: the same crops)


def test_the_reader_process_outlives_a_group_signal_while_it_starts(corrupt_demo, tmp_path):
    """A scheduler's SIGTERM to the process group can come while the child imports (spawn: seconds on a busy
    machine): it is born with the signal blocked, and then ignores it. In a fresh interpreter, as the trainer is: the
    first start() also starts multiprocessing's resource tracker, which unblocked SIGINT and SIGTERM in the parent's
    thread before the child was spawned (a full test run lost its reader to a SIGTERM that way)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "group_signal.py"
    script.write_text(f"""
import os
import signal
import time
from clipfast.data.prefetch import ReaderProcess
from clipfast.data.shards import ShardReader, list_shards
from clipfast.reduce import TextReducer

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: None)  # (the trainer's own handler: clipfast.checkpoint.Preemption)
    there = ReaderProcess(ShardReader(list_shards({str(corrupt_demo / "train")!r})), TextReducer())
    for _ in range(20):  # from its first moment, while it imports, and after
        os.kill(there._proc.pid, signal.SIGTERM)
        time.sleep(0.1)
    print("a sample:", next(iter(there)).key, flush=True)
""")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "a sample:" in r.stdout, (r.stdout + r.stderr)[-2000:]


def test_an_error_with_a_reader_process_running_ends_the_program(corrupt_demo, tmp_path):
    """The child ignores SIGTERM (the trainer decides when to stop), and multiprocessing ends daemon children at exit
    with SIGTERM, then waits: without the child killed first, an error left the program hanging."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "crash.py"
    script.write_text(f"""
from clipfast.data.prefetch import ReaderProcess
from clipfast.data.shards import ShardReader, list_shards
from clipfast.reduce import TextReducer

if __name__ == "__main__":
    there = ReaderProcess(ShardReader(list_shards({str(corrupt_demo / "train")!r})), TextReducer())
    next(iter(there))
    raise SystemExit("an error while the reader runs")
""")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "an error while the reader runs" in r.stderr


def _assert_gone_within(pid: int, seconds: float, what: str) -> None:
    """Process `pid` ends within `seconds` (a zombie waiting for its reaper counts as gone); else it is killed and
    the test fails with `what`."""
    import os
    import signal
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1][0] == "Z":
                return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"{what} by {seconds} s")


@pytest.mark.parametrize("death_signal", [True, False])
def test_a_trainer_killed_outright_leaves_no_reader_behind(corrupt_demo, tmp_path, death_signal):
    """SIGKILL to the trainer (or the out-of-memory killer): the child, which ignores the polite signals, goes too:
    by Linux's parent-death signal, or, where that does not exist (here turned off in the child), by its next send,
    which fails once the pipe's read end has gone with the trainer."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "victim.py"
    script.write_text(f"""
import time
import clipfast.data.prefetch as prefetch
from clipfast.data.shards import ShardReader, list_shards
from clipfast.reduce import TextReducer


def serve_without_the_death_signal(*args):
    import clipfast.data.prefetch as p

    p._die_with_parent = lambda: None
    p._serve(*args)


if __name__ == "__main__":
    if not {death_signal}:
        prefetch._serve = serve_without_the_death_signal  # (the spawned child finds it in this script)
    there = prefetch.ReaderProcess(ShardReader(list_shards({str(corrupt_demo / "train")!r})), TextReducer(), chunk=16,
                                   depth=2)
    next(iter(there))
    print(there._proc.pid, flush=True)
    time.sleep(600)
""")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(root)},
                         stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    time.sleep(1)  # (the child fills the pipe and waits in its send)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    _assert_gone_within(child, 20, "the reader process outlived its trainer")


@pytest.mark.parametrize("mode", ["train", "views", "eval"])
def test_dali_reads_the_encoded_bytes_in_place_and_gives_what_a_copy_gives(corrupt_demo, mode, monkeypatch):
    """copy_input=False (DALI's no_copy): the samples' bytes must live until their iteration's outputs are taken.
    With the memory churned between batches (freed buffers overwritten), the images equal those of a copying loader,
    batch for batch, in training (with and without SLIP's extra views), and in evaluation."""
    import gc

    def batches(copy):
        monkeypatch.setattr(DaliLoader, "copy_input", copy)
        kw = {"train": mode != "eval", "views": 2 if mode == "views" else 0, "seed": 5, "threads": 1}
        dl = DaliLoader(str(corrupt_demo / ("val" if mode == "eval" else "train")), 24, 16, TextReducer("truncate", 8),
                        **kw)
        out = []
        for _ in range(5):
            b = next(dl)
            out.append((b["keys"], b["images"].clone(), None if b["views"] is None else b["views"].clone()))
            gc.collect()
            junk = [bytes([i % 251]) * 4096 for i in range(2000)]  # reuse whatever was freed
            del junk
        dl.close()
        return out

    for (ka, ia, va), (kb, ib, vb) in zip(batches(True), batches(False), strict=True):
        assert ka == kb and ia.equal(ib)
        assert (va is None and vb is None) or va.equal(vb)


def test_reader_process_resolves_by_device_and_refuses_a_bad_value():
    import torch

    from clipfast.config import TrainConfig
    from clipfast.data.prefetch import resolve_reader_process

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not resolve_reader_process(TrainConfig(), cpu) and resolve_reader_process(TrainConfig(), gpu)
    assert resolve_reader_process(TrainConfig(reader_process="on"), cpu)
    assert not resolve_reader_process(TrainConfig(reader_process="off"), gpu)
    with pytest.raises(ValueError, match=r"reader_process must be one of \('auto', 'off', 'on'\), got 'yes'"):
        resolve_reader_process(TrainConfig(reader_process="yes"), cpu)
    assert resolve_reader_process(TrainConfig(reader_processes=3), gpu) == 3
    assert resolve_reader_process(TrainConfig(reader_process="on"), cpu) == 1
    assert resolve_reader_process(TrainConfig(reader_processes=3), cpu) == 0  # (off there: a warning says so)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"reader_processes must be a whole number, 1 or more, got {bad!r}"):
            resolve_reader_process(TrainConfig(reader_processes=bad), gpu)
