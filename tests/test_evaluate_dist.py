"""clipfast.evaluate on several ranks: each encodes its share of the images, captions and classes, and every rank
gets the one-rank result (two gloo ranks, spawned); an error on one rank is raised on both, not a hang."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipfast.data import write_shard
from clipfast.data.demo import build
from tests.conftest import free_port


def _model():
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    torch.manual_seed(0)
    return CLIP(from_name("demo", **{"vision.image_size": 32, "text.context_length": 16}), kernels="ref").eval()


def _evaluate(rank, world, port, sets, out):
    from clipfast.evaluate import retrieval, zero_shot

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, res = _model(), {}
    for name, (task, data) in sets.items():
        try:
            fn = zero_shot if task == "zeroshot" else retrieval
            res[name] = fn(model, data, batch_size=64, threads=1, rank=rank, world=world)
        except ValueError as e:
            res[name] = f"ValueError: {e}"
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, where a spawned gloo rank once aborted (SIGABRT, "terminate called
    # without an active exception") after its work was done: a crash of the harness, not of what is tested


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    build(root / "demo", seed=0, size=32)  # val: one shard (fewer than ranks: every other sample each)
    from clipfast.data import ShardReader, list_shards

    samples = [{"__key__": s.key, "jpg": s.image, "txt": s.caption, "json": s.meta}
               for s in ShardReader(list_shards(str(root / "demo" / "val")), loop=False)]
    for d in ("five", "bad"):
        (root / d).mkdir()
    for i in range(5):  # the same samples in 5 shards of uneven size (shards split 3 / 2 between the ranks)
        write_shard(root / "five" / f"v-{i}.tar", samples[i * 60: (i + 1) * 60 if i < 4 else None])
    (root / "five" / "meta.json").write_text((root / "demo" / "meta.json").read_text())
    bad = [dict(s) for s in samples[:10]]
    bad[7]["json"] = {"captions": []}  # one rank's sample: the error must reach both ranks
    write_shard(root / "bad" / "b-0.tar", bad[:5])
    write_shard(root / "bad" / "b-1.tar", bad[5:])
    return {"zs_one_shard": ("zeroshot", str(root / "demo" / "val")), "zs_five": ("zeroshot", str(root / "five")),
            "ret_one_shard": ("retrieval", str(root / "demo" / "val")), "ret_five": ("retrieval", str(root / "five")),
            "ret_bad": ("retrieval", str(root / "bad"))}


def test_two_ranks_evaluate_as_one(sets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    mp.spawn(_evaluate, args=(1, free_port(), sets, one), nprocs=1)
    mp.spawn(_evaluate, args=(2, free_port(), sets, two), nprocs=2)
    want = json.loads((one / "rank0.json").read_text())
    got = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]  # every rank has the whole set's result
    for name, res in want.items():
        if isinstance(res, str):
            assert got[0][name] == res and "'captions' in its .json must be a non-empty list" in res
            continue
        assert res["samples" if "top1" in res else "images"] == 359 and res["skipped"] == {}
        for k, v in res.items():
            assert got[0][name][k] == (v if k == "skipped" else pytest.approx(v, rel=1e-5, abs=1e-6)), (name, k)
    for k in ("top1", "top5", "samples"):  # the same samples in other shards: the same numbers
        assert want["zs_one_shard"][k] == pytest.approx(want["zs_five"][k])
    assert 0 < want["zs_one_shard"]["top1"] < 1  # (an untrained model: not all right, not all wrong)
