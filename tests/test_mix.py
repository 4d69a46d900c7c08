"""train_weights: training datasets drawn by weight (clipfast.data.shards.MixedReader), in the loader and trainer."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipfast.data import DaliLoader, write_shard
from clipfast.data.shards import MixedReader
from clipfast.reduce import TextReducer

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (level, 30, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _source(folder: Path, name: str, n: int, shards: int = 2, corrupt: int = 0) -> str:
    folder.mkdir(parents=True)
    samples = [{"__key__": f"{name}{i:03d}", "jpg": _jpeg(5 * i % 250), "txt": f"{name} sample {i}"} for i in range(n)]
    for i in range(corrupt):
        samples[i]["jpg"] = b"\xff\xd8 not a jpeg"
    per = -(-n // shards)
    for s in range(shards):
        write_shard(folder / f"{name}-{s:04d}.tar", samples[s * per:(s + 1) * per])
    return str(folder)


def test_draws_follow_the_weights_and_each_dataset_loops(tmp_path):
    a, b = _source(tmp_path / "a", "a", 20), _source(tmp_path / "b", "b", 10, shards=1)
    reader = MixedReader([a, b], (3, 1), seed=0, shuffle_buffer=8)
    it = iter(reader)
    got = [next(it).caption.split()[0] for _ in range(2000)]
    n_a = got.count("a")
    assert reader.drawn == [n_a, 2000 - n_a]
    assert abs(n_a - 1500) < 5 * (2000 * 0.75 * 0.25) ** 0.5  # binomial: 5 standard deviations
    # b's 10 samples came round ~50 times each, a's 20 ~75 times: both datasets loop on their own
    assert len({c for c in got if c == "b"}) == 1 and reader.readers[1].epoch >= 40


def test_weights_are_checked(tmp_path):
    a, b = _source(tmp_path / "a", "a", 4), _source(tmp_path / "b", "b", 4)
    with pytest.raises(ValueError, match=r"1 weight\(s\) for 2 training dataset\(s\)"):
        MixedReader([a, b], (1,))
    with pytest.raises(ValueError, match="must be positive"):
        MixedReader([a, b], (1, 0))
    with pytest.raises(ValueError, match="for training"):
        DaliLoader(f"{a},{b}", 4, 16, TextReducer("truncate", 8), train=False, weights=(1, 1))


def test_the_loader_mixes_batches_and_counts_every_datasets_skips(tmp_path):
    a, b = _source(tmp_path / "a", "a", 24), _source(tmp_path / "b", "b", 12, corrupt=2)
    # a as a brace pattern whose comma is its own (two datasets, not three: the loader split at every comma)
    loader = DaliLoader(f"{a}/a-{{0000,0001}}.tar,{b}", 16, 16, TextReducer("truncate", 8), train=True, threads=1,
                        weights=(1, 1))
    assert [len(r.shards) for r in loader.reader.readers] == [2, 2]
    captions = [c for _ in range(6) for c in next(loader)["captions"]]
    n_b = sum(c.startswith("b ") for c in captions)
    assert 0 < n_b < len(captions)
    # b's two bad samples, counted in the loader's one count (again each time b comes round)
    assert list(loader.skipped) == ["image of only 13 bytes"] and loader.skipped["image of only 13 bytes"] >= 2


@pytest.mark.slow
def test_the_trainer_takes_train_weights(data, tmp_path):
    b = _source(tmp_path / "b", "b", 32)
    out = tmp_path / "run"
    cmd = [sys.executable, "clipfast/train.py", "--config", "configs/demo.py", "engine=torch", "steps=2",
           "log_every=1", "batch_size=16", "warmup_steps=1", "tensorboard=false", "data_threads=1", "val_data=",
           f"train_data={data / 'train'},{b}", "train_weights=3,1", f"out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["train_weights"] == [3.0, 1.0]
    r = subprocess.run([*cmd[:-2], "train_weights=1", f"out_dir={out}2"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode != 0 and "train_weights: 1 weight(s) for 2 training dataset(s)" in r.stderr  # before the
    # model is built (it came from the loader, after it)
    assert not (tmp_path / "run2").exists()
