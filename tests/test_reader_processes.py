"""clipfast.data.prefetch with several reader processes (the trainer's reader_processes): the shards dealt out among
them (split_reader) so that each rank still reads its own share, each once; each child's caption masking its own;
their chunks taken in turn; one child's death an error."""
import pytest

from clipfast.data import ShardReader, list_shards
from clipfast.data.prefetch import ReaderProcess
from clipfast.data.shards import MixedReader
from clipfast.reduce import TextReducer


def test_several_reader_processes_deal_out_the_shards(corrupt_demo):
    """processes=3: every sample of the in-process reader once (the shards dealt out among the children), its ids
    the reducer's, the skips counted once; chunks taken in turn, so two runs give the same order; close ends all."""
    shards = list_shards(str(corrupt_demo / "train"))
    red, here = TextReducer("truncate", 8), ShardReader(shards, seed=3, loop=False)
    want = {s.key: red(s.caption) for s in here}

    def run():
        there = ReaderProcess(ShardReader(shards, seed=3, loop=False), TextReducer("truncate", 8), chunk=100,
                              processes=3)
        got = [(s.key, s.ids) for s in there]
        there.close()
        assert there.processes == 3 and not any(c.proc.is_alive() for c in there._children)
        assert there.skipped == here.skipped and sum(here.skipped.values()) == 2  # "cut", "nocap"
        return got

    first = run()
    assert len(first) == len(want) and dict(first) == want
    assert run() == first
    # the first chunk is child 0's, the second child 1's: samples of different shards
    shard_of = {s.key: sh for sh in shards for s in ShardReader([sh], loop=False)}
    assert {shard_of[k] for k, _ in first[:100]}.isdisjoint({shard_of[k] for k, _ in first[100:200]})


@pytest.mark.parametrize("n_shards,world", [(7, 1), (7, 2), (5, 2), (2, 1), (3, 4)])
def test_split_reader_keeps_each_rank_share(corrupt_demo, tmp_path, n_shards, world):
    """split_reader: the readers of rank r together read rank r's samples, each once, at any world size. Ranks that
    read whole shards: at most shards // world readers, the same number on every rank (5 shards over 2 ranks: rank 0
    has 3, but 3 readers would need 6 shards to read whole ones); fewer shards than ranks (every rank reads them all
    and keeps its share of the samples): the share dealt out sample by sample."""
    from clipfast.data.prefetch import split_reader

    shards = list_shards(str(corrupt_demo / "train"))[:n_shards]
    for rank in range(world):
        whole = ShardReader(shards, rank, world, seed=1, loop=False)
        parts = split_reader(whole, 3)
        keys = [[s.key for s in p] for p in parts]
        assert sorted(k for ks in keys for k in ks) == sorted(s.key for s in whole), rank
        assert len(parts) == (min(3, n_shards // world) if not whole.split_samples else 3)
        assert all(p.split_samples == whole.split_samples for p in parts)
        assert all(keys), "a reader without samples"


def test_split_reader_deals_out_each_dataset_of_a_mixture(corrupt_demo):
    """Each dataset of a mixture split as a ShardReader is, with one n for all: on one rank, 2 readers (train: 7
    shards, val: 2), over both readers every sample of each dataset once, the weights kept, the draws each reader's
    own. On 2 ranks val's 2 shards allow one reader a rank: n is cut to 1 (2 readers would each read all of val)."""
    from clipfast.data.prefetch import split_reader

    specs = [str(corrupt_demo / "train"), str(corrupt_demo / "val")]
    parts = split_reader(MixedReader(specs, (3, 1), seed=2), 2)
    assert len(parts) == 2 and not any(r.split_samples for p in parts for r in p.readers)
    for i, spec in enumerate(specs):
        keys = [s.key for p in parts for s in ShardReader(p.readers[i].shards, p.readers[i].rank, p.readers[i].world,
                                                          loop=False)]
        assert sorted(keys) == sorted(s.key for s in ShardReader(list_shards(spec), loop=False)), spec
    assert [p.weights for p in parts] == [[3.0, 1.0]] * 2 and parts[0].rng.random() != parts[1].rng.random()
    two_ranks = MixedReader(specs, (3, 1), rank=1, world=2, seed=2)
    assert split_reader(two_ranks, 2) == [two_ranks]
    with pytest.raises(TypeError, match="cannot split a list over reader processes"):
        split_reader([], 2)


def test_each_reader_process_masks_captions_with_its_own_rng():
    """for_worker(j): the same settings, an RNG of its own (seeded from the original's state and j): workers mask the
    same caption differently, and the same worker of the same reducer masks it the same way in every run."""
    caption = "a very long caption with many words so that the random mask has to drop most of them"
    a, b = TextReducer("random", 6, seed=4).for_worker(0), TextReducer("random", 6, seed=4).for_worker(1)
    twin = TextReducer("random", 6, seed=4).for_worker(1)
    runs = [[w(caption) for _ in range(5)] for w in (a, b, twin)]
    assert runs[0] != runs[1] and runs[1] == runs[2]
    assert (a.strategy, a.length) == ("random", 6)


def test_one_of_several_reader_processes_dying_is_an_error(corrupt_demo):
    there = ReaderProcess(ShardReader(list_shards(str(corrupt_demo / "train"))), TextReducer(), chunk=50, depth=4,
                          processes=2)
    it = iter(there)
    next(it)
    there._children[1].proc.kill()
    with pytest.raises(RuntimeError, match="the reader process exited with code -9"):
        for _ in range(10_000):
            next(it)
    there.close()
