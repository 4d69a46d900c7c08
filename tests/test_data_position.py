"""A resume goes on in the data where the checkpoint's last batch ended: the readers' positions (Sample.at, `advance`,
`restore`) for one reader, mixed datasets and reader processes, the loader's data_position, and the trainer's choice
between going on and a new pass (train.where_to_go_on)."""
import itertools
import json
import logging

import pytest

from clipfast.data import ShardReader, list_shards
from clipfast.data.prefetch import ReaderProcess
from clipfast.data.shards import MixedReader
from clipfast.reduce import TextReducer


def _take(reader, n, snapshots=None):
    """n samples of reader; `snapshots` gets its skip total after each."""
    out = []
    for s in itertools.islice(iter(reader), n):
        out.append(s)
        if snapshots is not None:
            snapshots.append(sum(reader.skipped.values()))
    return out


def _position(reader, samples):
    pos = None
    for s in samples:
        pos = reader.advance(pos, s.at)
    return pos


@pytest.mark.parametrize("n,k,buffer", [(40, 60, 16), (0, 30, 16), (1400, 100, 16), (1439, 20, 1), (1500, 50, 1),
                                       (7, 40, 1000)])
def test_a_restored_reader_goes_on_with_the_samples_after_its_position(corrupt_demo, n, k, buffer):
    """From the position after n samples, a reader made alike (same shards, seed) yields the samples the first went
    on with, across epochs (the demo's 1,439 training samples a pass); the skips it counts are those the first counted
    after its n-th sample, not those before (which the checkpoint's run counted), however the shuffle buffer draws."""
    shards = list_shards(str(corrupt_demo / "train"))
    first, skips = ShardReader(shards, seed=5, shuffle_buffer=buffer), []
    full = _take(first, n + k, skips)
    again = ShardReader(shards, seed=5, shuffle_buffer=buffer)
    pos = _position(again, full[:n])
    if pos is not None:
        assert pos == {"epoch": full[n - 1].at[0], "next": full[n - 1].at[1] + 1, "key": full[n - 1].key}
        again.restore(pos)
    rest = _take(again, k)
    assert [s.key for s in rest] == [s.key for s in full[n:]]
    assert [s.at for s in rest] == [s.at for s in full[n:]]
    assert sum(again.skipped.values()) == skips[-1] - (skips[n - 1] if n else 0)
    assert max(s.at[0] for s in full) == (n + k > 1439)  # (the cases that pass an epoch's end do)


def test_the_corrupt_samples_passed_over_are_not_logged_again(corrupt_demo, caplog):
    shards = list_shards(str(corrupt_demo / "train"))
    full = _take(ShardReader(shards, seed=1, shuffle_buffer=1), 1439)  # one pass, in shard order: both skips logged
    i = [s.key for s in full].index("fine")  # the corrupt shard's good sample, after its two skips
    assert i < 1438
    again = ShardReader(shards, seed=1, shuffle_buffer=1)
    again.restore(_position(again, full[:i + 1]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        nxt = _take(again, 1)
    assert nxt[0].key == full[i + 1].key and "skipping sample" not in caplog.text and not again.skipped


def test_a_position_past_the_epochs_end_goes_on_with_the_next_epoch(corrupt_demo, caplog):
    shards = list_shards(str(corrupt_demo / "train"))
    r = ShardReader(shards, seed=1, shuffle_buffer=8)
    r.restore({"epoch": 2, "next": 1500})
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        s = _take(r, 1)[0]
    assert s.at[:2] == (3, 0) and "past that epoch's 1439 samples" in caplog.text
    with pytest.raises(ValueError, match="for a training reader"):
        ShardReader(shards, loop=False).restore({"epoch": 0, "next": 1})
    with pytest.raises(ValueError, match="not a reader position"):
        r.restore({"epoch": 0, "next": -1})


@pytest.mark.parametrize("block", [1 << 16, 7])
def test_mixed_datasets_go_on_with_the_same_draws_and_each_datasets_samples(corrupt_demo, monkeypatch, block):
    """The draws replayed, from the start of their block (every 7 draws here, as every 65,536 in a run: a resume
    replayed every draw of the run, 1.1 us each)."""
    monkeypatch.setattr(MixedReader, "DRAW_BLOCK", block)
    specs = [str(corrupt_demo / "train" / "train-000{0,1}.tar"), str(corrupt_demo / "train" / "zz-corrupt.tar")]

    def mixed():
        return MixedReader(specs, [3, 1], seed=2, shuffle_buffer=10)

    full = _take(mixed(), 400)  # the one-sample dataset loops often
    again = mixed()
    pos = _position(again, full[:150])
    assert pos["draws"] == 150 and all(p is not None for p in pos["readers"])
    again.restore(pos)
    assert [s.key for s in _take(again, 250)] == [s.key for s in full[150:]]
    assert again.drawn == [sum(s.at[1] == i for s in full[150:]) for i in (0, 1)] and again.draws == 400
    with pytest.raises(ValueError, match="a position of 1 datasets for 2"):
        mixed().restore({"draws": 1, "readers": [None]})


@pytest.mark.parametrize("processes", [1, 2])
def test_reader_processes_go_on_each_with_its_own_shards(corrupt_demo, processes):
    """One child: the in-process order. Two (each reading half the shards; their chunks taken in turn): each child's
    samples go on from its own position, wherever the position fell among the turns."""
    shards = list_shards(str(corrupt_demo / "train"))

    def proc(position=None):
        return ReaderProcess(ShardReader(shards, seed=4, shuffle_buffer=8), TextReducer("truncate", 8), chunk=20,
                             processes=processes, position=position)

    first = proc()
    full = _take(first, 300)
    pos = _position(first, full[:50])  # chunks of 20 in turn: 30 samples of child 0, 20 of child 1
    first.close()
    again = proc(pos)
    rest = _take(again, 250)
    again.close()
    if processes == 1:
        assert [s.key for s in rest] == [s.key for s in full[50:]]
        return
    assert pos["children"][0]["next"] == 30 and pos["children"][1]["next"] == 20
    for j in (0, 1):
        want = [s.key for s in full[50:] if s.at[0] == j]
        got = [s.key for s in rest if s.at[0] == j]
        n = min(len(want), len(got))
        assert n >= 80 and got[:n] == want[:n]


def test_the_loader_goes_on_after_its_last_batch(corrupt_demo):
    from clipfast.data import DaliLoader

    def loader(**kw):
        return DaliLoader(str(corrupt_demo / "train"), 16, 16, TextReducer("truncate", 8), seed=7, threads=1, **kw)

    first = loader()
    keys = [next(first)["keys"] for _ in range(3)]
    saved = json.loads(json.dumps(first.data_position()))  # (as a checkpoint keeps it)
    keys += [next(first)["keys"] for _ in range(6)]
    assert saved == {"seed": 7, "position": {"epoch": 0, "next": 48, "key": keys[2][-1]}}
    again = loader(reader_seed=saved["seed"], position=saved["position"])
    assert [next(again)["keys"] for _ in range(6)] == keys[3:]
    assert loader().data_position() == {"seed": 7, "position": None}
    with pytest.raises(ValueError, match="for training"):
        DaliLoader(str(corrupt_demo / "val"), 16, 16, TextReducer("truncate", 8), train=False, position=saved)


def test_the_trainer_goes_on_where_the_run_and_data_are_the_same_and_says_why_not(caplog):
    from clipfast.train import where_to_go_on

    identity = {"world": 2, "seed": 0, "shards": "ab12", "datasets": [6], "train_weights": [], "readers": 1}
    ranks = [{"seed": 3, "position": {"epoch": 0, "next": 32}}, {"seed": 3, "position": {"epoch": 0, "next": 31}}]
    client = {"step": 4, "data_position": {"identity": identity, "ranks": ranks}}
    assert where_to_go_on(client, identity, 1, 4, True) == ({"epoch": 0, "next": 31}, 3)
    assert where_to_go_on(client, identity, 1, 0, True) == (None, None)  # (a fresh run)
    with caplog.at_level(logging.WARNING, logger="clipfast"):
        assert where_to_go_on(client, {**identity, "world": 4}, 1, 4, True) == (None, None)
        assert where_to_go_on({"step": 4}, identity, 0, 4, True) == (None, None)
    assert "a new pass" in caplog.text and "world 2 -> 4" in caplog.text and "older clipfast" in caplog.text


def test_shards_changed_under_the_same_names_or_unreadable_now_are_said(corrupt_demo, tmp_path, caplog):
    """The replay reproduces the saved order only from the same shards: where the last sample passed over is not the
    one the position names (a shard re-made under its name), or a shard passed over no longer reads, a warning says
    the order is not the saved run's (both were silent: samples repeated and missed)."""
    import shutil

    data = tmp_path / "train"
    shutil.copytree(corrupt_demo / "train", data)
    shards = list_shards(str(data))
    full = _take(ShardReader(shards, seed=0, shuffle_buffer=16), 700)
    pos = _position(ShardReader(shards, seed=0), full[:600])
    caplog.clear()
    again = ShardReader(shards, seed=0, shuffle_buffer=16)
    again.restore(pos)
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        assert [s.key for s in _take(again, 100)] == [s.key for s in full[600:]]
    assert "changed" not in caplog.text  # the same shards: no word
    (data / "train-0001.tar").write_bytes(b"")  # now unreadable
    again = ShardReader(shards, seed=0, shuffle_buffer=16)
    again.restore(pos)
    with caplog.at_level(logging.WARNING, logger="clipfast.data"):
        _take(again, 1)
    assert "train-0001.tar, passed over on the way to the resumed position, is now an unreadable shard" in caplog.text
    assert "the shards changed since the checkpoint: sample 599 of epoch 0 is" in caplog.text
    assert f"the checkpoint's was {full[599].key!r}" in caplog.text


def test_a_data_identity_names_the_readers_split_reader_makes(tmp_path):
    """reader_processes as split_reader cuts it (16 shards over 8 ranks: 4 asked, 2 made, as with 2 asked); the
    datasets' grouping of the shards (a regrouped set crashed the resume: a MixedReader position for another layout);
    the seed."""
    from clipfast.config import TrainConfig
    from clipfast.data import write_shard
    from clipfast.train import data_identity

    for i in range(16):
        write_shard(tmp_path / f"s-{i:02d}.tar", [])
    cfg = TrainConfig(train_data=str(tmp_path))
    assert data_identity(cfg, 8, 4) == data_identity(cfg, 8, 2) != data_identity(cfg, 8, 1)
    assert data_identity(cfg, 8, 4)["readers"] == 2 and data_identity(cfg, 8, 0)["readers"] == 1
    a = TrainConfig(train_data=f"{tmp_path}/s-0{{0..1}}.tar,{tmp_path}/s-0{{2..3}}.tar", train_weights=(1, 1))
    b = TrainConfig(train_data=f"{tmp_path}/s-00.tar,{tmp_path}/s-0{{1..3}}.tar", train_weights=(1, 1))
    ia, ib = data_identity(a, 1, 0), data_identity(b, 1, 0)
    assert ia["shards"] == ib["shards"] and ia["datasets"] == [2, 2] and ib["datasets"] == [1, 3]
    assert data_identity(TrainConfig(train_data=str(tmp_path), seed=1), 8, 1)["seed"] == 1
