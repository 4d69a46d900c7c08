"""Resuming a checkpoint with another number of ranks, ZeRO stage, precision or engine (clipfast.reshard).

Each case resumes one checkpoint twice through tests/_reshard_probe.py (clipfast.train's own model, engine and resume):
once in the layout that saved it, once in another, and compares what each engine then holds, in full: every
parameter's fp32 master, exp_avg, exp_avg_sq and step, the module's weights, the LR and the scheduler's state. Before
clipfast.reshard the other layouts failed to load (DeepSpeed: "The checkpoint being loaded used a DP world size of 2
but the current world size is 3"; on one rank an AttributeError in torch's Optimizer.load_state_dict)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from clipfast import reshard
from clipfast.reshard import Layout
from tests.conftest import free_port
from tests.test_train import ROOT, _deepspeed, _metrics


def test_layouts_that_need_a_conversion():
    assert not reshard.needs_conversion(Layout(1, False, 2), Layout(1, False, 2))
    assert not reshard.needs_conversion(Layout(0, True, 1), Layout(0, True, 4))  # stage 0: every rank holds it all
    assert reshard.needs_conversion(Layout(1, False, 2), Layout(1, False, 3))
    assert reshard.needs_conversion(Layout(1, False, 2), Layout(0, False, 1))
    assert reshard.needs_conversion(Layout(1, True, 2), Layout(2, True, 2))
    assert reshard.needs_conversion(Layout(0, True, 1), Layout(0, False, 1))
    assert reshard.needs_conversion(Layout(3, True, 2), Layout(3, True, 4))
    assert reshard.needs_conversion(Layout(3, True, 2), Layout(1, True, 2))
    with pytest.raises(ValueError, match="only a ZeRO stage 3 checkpoint resumes under stage 3.*zero_stage=1 or 2"):
        reshard.needs_conversion(Layout(1, True, 2), Layout(3, True, 2))
    assert not reshard.needs_conversion(Layout(0, True, 1, "torch"), Layout(0, True, 1, "torch"))
    assert reshard.needs_conversion(Layout(0, True, 1, "torch"), Layout(0, True, 1))
    assert str(Layout(1, True, 2)) == "ZeRO stage 1, bf16 on 2 ranks" and str(Layout(0, False, 3)) == \
        "ZeRO stage 0, float32"
    assert str(Layout(0, True, 1, "torch")) == "engine=torch, bf16"


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "step2").mkdir()
    with pytest.raises(FileNotFoundError, match="step2 holds neither mp_rank_00_model_states.pt .DeepSpeed. nor "
                                                "state.pt .engine=torch.: not a clipfast checkpoint"):
        reshard.saved_layout(tmp_path / "step2")


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step8")
    with pytest.raises(FileNotFoundError, match="latest names 'step8', but .*step8 is missing"):
        reshard.resume_plan(tmp_path, Layout(1, False, 2))
    assert reshard.resume_plan(tmp_path / "none", Layout(1, False, 2)) is None



def _probe(ranks, out, dump, *overrides, resume=True):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "tests/_reshard_probe.py", "--dump", str(dump), "--config", "configs/demo.py",
           f"out_dir={out}", f"resume={str(resume).lower()}", "tensorboard=false", "data_threads=1", "min_lr=1e-4",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list((out / "ckpt").glob("*universal*")), "the universal checkpoint was left behind"  # (or none made)
    return torch.load(dump, weights_only=False)


def _assert_same_state(a, b):
    assert b["converted"] and not a["converted"]
    assert a["step"] == b["step"] == 3
    assert a["lr"] == b["lr"] and a["lr"][0] > 1e-4  # in the warm-up (4/5 of the peak; the floor is 1e-4): restored
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 50
    assert all(float(st["step"]) == 3 for st in a["state"].values())  # AdamW's own count: three steps, no more
    for name, sa in a["state"].items():
        sb = b["state"][name]
        assert sa.keys() == sb.keys() == {"fp32", "exp_avg", "exp_avg_sq", "step"}, name
        for key in sa:
            assert torch.equal(sa[key].reshape(-1), sb[key].reshape(-1)), (name, key)
    assert float(a["state"]["logit_scale"]["exp_avg_sq"].reshape(-1)[0]) > 0  # moments, not zeros, compared


@pytest.mark.slow
def test_resume_on_other_ranks_stages_precisions_and_engines(data, tmp_path):
    common = [f"train_data={data / 'train'}", "batch_size=12", "steps=3", "ckpt_every=3", "warmup_steps=5",
              "min_lr=1e-4", "tensorboard=false", "data_threads=1", "eval_at_end=false"]
    probe = [f"train_data={data / 'train'}", "batch_size=12", "steps=3", "warmup_steps=5"]  # (the run's schedule: a
    # resume takes the config's lr and schedule over the checkpoint's)

    def train(ranks, out, *overrides):
        r = _deepspeed(ranks, f"out_dir={out}", *common, *overrides)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # ZeRO-1 on two float32 ranks -> three ranks (ZeRO-1), one float32 rank (stage 0: the client optimizer) and one
    # bf16 rank (FP16_Optimizer): the bf16 weights are the masters rounded
    zero = tmp_path / "zero"
    train(2, zero)
    native = _probe(2, zero, tmp_path / "z.pt", *probe)
    assert native["layout"] == "ZeRO stage 1, float32 on 2 ranks"
    for i, (ranks, layout, *more) in enumerate(((3, "ZeRO stage 1, float32 on 3 ranks"),
                                                 (1, "ZeRO stage 0, float32"),
                                                 (1, "ZeRO stage 0, bf16", "precision=bf16"))):
        other = _probe(ranks, zero, tmp_path / f"z{i}.pt", *probe, *more)
        assert other["layout"] == layout
        _assert_same_state(native, other)
        bf16 = bool(more)  # the run's own weights, rounded where this one is bf16
        assert all(torch.equal(native["module"][k].to(other["module"][k].dtype), other["module"][k]) and
                   (other["module"][k].dtype == torch.bfloat16) == bf16 for k in native["module"])

    # ZeRO-3 on two float32 ranks (its checkpoint: one model-states file per rank) -> ZeRO-3 on three ranks (DeepSpeed's
    # stage-3 universal form) and one float32 rank (that form rewritten into the stages-1/2 one)
    three = tmp_path / "three"
    train(2, three, "zero_stage=3", f"val_data={data / 'val'}", "eval_at_end=true")
    native = _probe(2, three, tmp_path / "3.pt", *probe, "zero_stage=3")
    assert native["layout"] == "ZeRO stage 3, float32 on 2 ranks"
    # model.pt and the evaluation hold the whole model, gathered from the ranks' slices (model.pt had held an empty
    # token embedding), equal to the checkpoint's fp32 masters
    weights = torch.load(three / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(weights[k].reshape(-1), st["fp32"].reshape(-1)) for k, st in native["state"].items())
    assert json.loads((three / "eval.json").read_text())["samples"] == 359
    from clipfast.checkpoint import read_model_file

    tag = next((three / "ckpt").glob("step*"))
    with pytest.raises(ValueError, match="is a ZeRO stage 3 checkpoint .*zero_to_fp32.py"):  # not read as empty weights
        read_model_file(str(tag))
    for i, (ranks, layout, *more) in enumerate(((3, "ZeRO stage 3, float32 on 3 ranks", "zero_stage=3"),
                                                 (1, "ZeRO stage 0, float32"))):
        other = _probe(ranks, three, tmp_path / f"3{i}.pt", *probe, *more)
        assert other["layout"] == layout
        _assert_same_state(native, other)

    # one bf16 rank (stage 0: DeepSpeed's FP16_Optimizer) -> two bf16 ranks under ZeRO-2, and engine=torch in bf16
    # (MasterAdamW; its masters are not the bf16 weights: they come from FP16_Optimizer's)
    single = tmp_path / "single"
    train(1, single, "precision=bf16")
    native = _probe(1, single, tmp_path / "s.pt", *probe, "precision=bf16")
    assert native["layout"] == "ZeRO stage 0, bf16"
    for i, (ranks, layout, *more) in enumerate(((2, "ZeRO stage 2, bf16 on 2 ranks", "zero_stage=2"),
                                                 (1, "engine=torch, bf16", "engine=torch"))):
        other = _probe(ranks, single, tmp_path / f"s{i}.pt", *probe, "precision=bf16", *more)
        assert other["layout"] == layout
        _assert_same_state(native, other)
        assert all(torch.equal(native["module"][k], other["module"][k]) for k in native["module"])  # bf16 weights
    assert any(not torch.equal(w.float(), native["state"][k]["fp32"].reshape(w.shape))
               for k, w in native["module"].items() if k in native["state"])  # masters that rounding lost

    # engine=torch (one rank, no DeepSpeed engine; bf16: MasterAdamW) -> DeepSpeed's ZeRO-1 on two ranks
    for precision, dtype in (("fp32", "float32"), ("bf16", "bf16")):  # (precision=float32 used to pass as fp32)
        alone = tmp_path / f"torch_{precision}"
        train(1, alone, "engine=torch", f"precision={precision}")
        native = _probe(1, alone, tmp_path / f"t_{precision}.pt", *probe, "engine=torch", f"precision={precision}")
        assert native["layout"] == f"engine=torch, {dtype}"
        other = _probe(2, alone, tmp_path / f"t2_{precision}.pt", *probe, f"precision={precision}")
        assert other["layout"] == f"ZeRO stage 1, {dtype} on 2 ranks"
        _assert_same_state(native, other)
        assert all(torch.equal(native["module"][k], other["module"][k]) for k in native["module"])

    # the trainer: the ZeRO-1 run goes on on one rank, logs the conversion, and its next checkpoint is stage 0's
    r = _deepspeed(1, f"out_dir={zero}", "resume=true", *common[:2], "steps=5", *common[3:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "was saved with ZeRO stage 1, float32 on 2 ranks; this run is ZeRO stage 0, float32" in log
    assert "resumed from" in log and "at step 3" in log
    assert [x["step"] for x in _metrics(zero)] == [3, 5] and all(0 < x["loss"] < 10 for x in _metrics(zero))
    assert reshard.saved_layout(zero / "ckpt" / "step5") == Layout(0, False, 1)
    assert not list((zero / "ckpt").glob("*universal*"))


@pytest.mark.slow
def test_bf16_stage_0_starts_from_adamw_step_0(data, tmp_path):
    """DeepSpeed's bf16 stage-0 optimizer steps once with zero gradients at initialize (clipfast.build.undo_init_step
    undoes it): a fresh engine holds no step yet and masters equal to its weights."""
    fresh = _probe(1, tmp_path / "fresh", tmp_path / "f.pt", f"train_data={data / 'train'}", "precision=bf16",
                   resume=False)
    assert fresh["layout"] == "ZeRO stage 0, bf16" and fresh["step"] == 0
    assert all(float(st["step"]) == 0 for st in fresh["state"].values())
    assert all(torch.equal(fresh["module"][k].float().reshape(-1), st["fp32"].reshape(-1))
               for k, st in fresh["state"].items())
