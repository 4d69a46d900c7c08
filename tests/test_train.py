"""End to end through the DeepSpeed launcher: two CPU ranks (gloo), checkpoints, resume, evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]



def _deepspeed(ranks, *overrides, timeout=900):
    """The run through DeepSpeed's launcher; afterwards none of its ranks' shared-memory all-reduce buffers is left in
    /dev/shm (clipfast.launch.release_shm_buffer)."""
    from clipfast.launch import shm_buffer_path

    port = str(free_port())
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port,
           "clipfast/train.py", "--config", "configs/demo.py", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    with mock.patch.dict(os.environ, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}):
        left = [p for p in map(shm_buffer_path, range(ranks)) if p.exists()]
    for p in left:  # not left for the next run to fill /dev/shm with
        p.unlink()
    assert not left, f"shared-memory buffers left behind: {left}"
    return r


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_train_checkpoint_resume_evaluate(data, tmp_path):
    out = tmp_path / "run"
    common = [f"train_data={data / 'train'}", f"val_data={data / 'val'}", f"out_dir={out}", "batch_size=16",
              "log_every=2", "ckpt_every=2", "warmup_steps=2", "tensorboard=false", "data_threads=1"]
    r = _deepspeed(2, "steps=4", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = _metrics(out)
    assert [x["step"] for x in m] == [2, 4]
    assert all(x["loss"] > 0 and x["samples_per_s"] > 0 and 0 <= x["data_wait_share"] <= 1 for x in m)
    assert (out / "ckpt" / "latest").read_text().strip() == "step4"
    assert (out / "model.pt").is_file()
    ev = json.loads((out / "eval.json").read_text())
    assert ev["samples"] == 359 and 0 <= ev["top1"] <= ev["top5"] <= 1

    at4 = _data_position(out / "ckpt" / "step4" / "mp_rank_00_model_states.pt")
    assert [(p["position"]["epoch"], p["position"]["next"]) for p in at4["ranks"]] == [(0, 32)] * 2  # 4 x 8 a rank
    assert at4["identity"]["world"] == 2

    r = _deepspeed(2, "steps=6", "resume=true", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "at step 4" in r.stdout + r.stderr
    assert [x["step"] for x in _metrics(out)] == [2, 4, 6]
    assert (out / "ckpt" / "latest").read_text().strip() == "step6"
    at6 = _data_position(out / "ckpt" / "step6" / "mp_rank_00_model_states.pt")  # on from there, in the same order
    assert [(p["seed"], p["position"]["epoch"], p["position"]["next"]) for p in at6["ranks"]] == \
        [(p["seed"], 0, 48) for p in at4["ranks"]]
    assert "a new pass" not in r.stdout + r.stderr


def _data_position(path):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("client_state", state)["data_position"]  # (engine=torch's state.pt, or DeepSpeed's)


def test_unknown_key_fails_listing_valid_keys():
    r = subprocess.run([sys.executable, "clipfast/train.py", "--config", "configs/demo.py", "stepz=3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "unknown config key 'stepz'" in r.stderr and "batch_size" in r.stderr and "zero_stage" in r.stderr


def test_evaluate_cli(data, tmp_path, capsys):
    import torch

    from clipfast.checkpoint import save_model
    from clipfast.config import TrainConfig
    from clipfast.evaluate import main as evaluate_main
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    model = CLIP(from_name("demo"), kernels="ref")
    save_model(tmp_path / "model.pt", model, TrainConfig(), step=0)
    res = evaluate_main(["--checkpoint", str(tmp_path), "--data", str(data / "val"), "--device", "cpu",
                         "--out", str(tmp_path / "e.json")])
    assert res["samples"] == 359 and res["classes"] == 10
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == res["top1"]
    torch.save({"x": 1}, tmp_path / "bad.pt")
    for name, why in (("none", "no clipfast model file at"), ("bad.pt", "is not a clipfast model file")):
        with pytest.raises(SystemExit) as e:  # a line naming the file, not a traceback
            evaluate_main(["--checkpoint", str(tmp_path / name), "--data", str(data / "val")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--checkpoint '{tmp_path / name}': " in err and why in err


def test_one_rank_runs_zero_stage_0_and_more_ranks_the_configured_stage():
    from clipfast.build import deepspeed_config
    from clipfast.config import TrainConfig

    cfg = TrainConfig(batch_size=8, zero_stage=2)
    assert deepspeed_config(cfg, 1, bf16=False)["zero_optimization"]["stage"] == 0
    assert deepspeed_config(cfg, 2, bf16=True)["zero_optimization"]["stage"] == 2
    assert deepspeed_config(cfg, 2, bf16=True)["bf16"]["enabled"] is True
    # one rank in float32 the trainer clips inside its fused AdamW (clipfast.optim.clipped_step), else DeepSpeed
    assert deepspeed_config(cfg, 1, bf16=False)["gradient_clipping"] == 0.0
    assert deepspeed_config(cfg, 1, bf16=True)["gradient_clipping"] == cfg.grad_clip
    assert deepspeed_config(cfg, 2, bf16=False)["gradient_clipping"] == cfg.grad_clip > 0
    from clipfast.build import trainer_clip  # exactly one of the two clips

    for world, bf16 in ((1, False), (1, True), (2, False)):
        assert (trainer_clip(cfg, world, bf16) > 0) != (deepspeed_config(cfg, world, bf16)["gradient_clipping"] > 0)
    assert trainer_clip(TrainConfig(engine="torch"), 1, False) == 0.0  # TorchEngine.step clips itself
    with pytest.raises(ValueError, match="not divisible"):
        deepspeed_config(TrainConfig(batch_size=9), 2, bf16=False)


def _python_without_deepspeed(tmp_path, *overrides, timeout=900):
    """`python clipfast/train.py` with no launcher, and `import deepspeed` made to fail."""
    fake = tmp_path / "no_deepspeed"
    (fake / "deepspeed").mkdir(parents=True, exist_ok=True)
    (fake / "deepspeed" / "__init__.py").write_text("raise ImportError('deepspeed is blocked in this test')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "clipfast/train.py", "--config", "configs/demo.py", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_one_rank_torch_engine_trains_resumes_without_deepspeed(data, tmp_path):
    out = tmp_path / "run_torch"
    common = [f"train_data={data / 'train'}", f"out_dir={out}", "batch_size=16", "log_every=2", "ckpt_every=2",
              "warmup_steps=2", "tensorboard=false", "data_threads=1", "eval_at_end=false", "engine=torch"]
    r = _python_without_deepspeed(tmp_path, "steps=4", *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "ckpt" / "step4" / "state.pt").is_file() and (out / "model.pt").is_file()
    import torch

    from clipfast.evaluate import load_model

    tagged, final = load_model(str(out / "ckpt" / "step4")), load_model(str(out))  # a checkpoint, as a model file
    assert all(torch.equal(a, b) for a, b in zip(tagged.state_dict().values(), final.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="or a checkpoint of one"):
        load_model(str(out / "ckpt"))
    assert "train step 4/4: loss" in r.stderr  # not a terminal: a line per log step, not tqdm's bar
    r = _python_without_deepspeed(tmp_path, "steps=6", *common)  # a fresh run into the folder of one
    assert r.returncode != 0 and "holds an earlier run (metrics.jsonl, ckpt/)" in r.stderr
    r = _python_without_deepspeed(tmp_path, "steps=9", "resume=true", "image_size=48", *common)  # does not load
    assert r.returncode != 0 and "positional_embedding" in r.stderr
    assert json.loads((out / "config.json").read_text())["steps"] == 4  # the run's config, not the failed resume's
    r = _python_without_deepspeed(tmp_path, "steps=6", "resume=true", "compile=true", *common)  # resumed, compiled
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "at step 4" in r.stdout + r.stderr and "compile=true: transformer blocks" in r.stdout + r.stderr
    m = _metrics(out)
    assert [x["step"] for x in m] == [2, 4, 6] and all(0 < x["loss"] < 10 for x in m)
    assert json.loads((out / "config.json").read_text())["compile"] is True
    [at6] = _data_position(out / "ckpt" / "step6" / "state.pt")["ranks"]
    assert at6["seed"] == 0 and (at6["position"]["epoch"], at6["position"]["next"]) == (0, 96)
    r = _deepspeed(1, "steps=2", *common[:-1], "cuda_graph=true")  # DeepSpeed's engine cannot be captured
    assert r.returncode != 0 and "cuda_graph=true needs engine=torch" in r.stdout + r.stderr


def test_full_weights_gathers_zero3_slices_a_group_at_a_time(monkeypatch):
    """Under ZeRO stage 3 full_weights gathers the parameters in groups of at most gather_numel elements (one larger
    parameter alone), the same groups on every rank (a collective), and only the rank that keeps them copies them out:
    the state_dict, buffers included, a shared parameter under each of its names. (Here DeepSpeed's
    GatheredParameters is a stand-in that records its groups; tests/test_reshard.py gathers real slices on 2 ranks.)"""
    import contextlib

    import deepspeed
    import torch

    from clipfast.checkpoint import full_weights

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 30), torch.nn.Linear(30, 2)
            self.norm = torch.nn.BatchNorm1d(2)  # buffers: running stats and a count
            self.tied = self.a  # the same parameters under a second name

    net = Net()
    groups = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        groups.append([p.numel() for p in params])
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    got = full_weights(net, 3, gather_numel=100)
    assert groups == [[64, 8], [240], [30, 60, 2, 2, 2]]  # a; b.weight (240 > 100: alone); b.bias, c and the norm
    want = net.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    assert got["tied.weight"] is got["a.weight"]
    mine, groups[:] = groups[:], []
    assert full_weights(net, 3, keep=False, gather_numel=100) == {} and groups == mine
    assert full_weights(net, 1, keep=False) == {} and groups == mine  # stages 0-2: no gather


def test_each_venv_builds_torch_extensions_in_a_folder_of_its_own(tmp_path):
    """DeepSpeed's comm op is built by torch into a folder per Python and CUDA version that all of a user's venvs
    shared: two venvs rebuilt it whenever the other had (45-67 s a launch). Importing clipfast names one per
    interpreter prefix, unless TORCH_EXTENSIONS_DIR is set."""
    import hashlib

    code = "import clipfast, os, sys; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    want = tmp_path / ".cache" / "torch_extensions" / ("clipfast-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])
    assert got.stdout.strip() == str(want)
    got = subprocess.run([sys.executable, "-c", code], env={**env, "TORCH_EXTENSIONS_DIR": "/x"}, capture_output=True,
                         text=True, check=True)
    assert got.stdout.strip() == "/x"
