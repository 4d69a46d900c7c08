"""Multi-stage runs: stage expansion and overrides, weight hand-over with resizing, a tiny two-stage run + resume."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipfast import stages
from clipfast.checkpoint import fresh_out_dir
from clipfast.config import TrainConfig, apply_overrides, load_config
from clipfast.data.demo import build
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

TWO = (dict(name="pre", image_size=16, text_len=8, text_reduction="syntax", steps=10, lr=1e-3),
       dict(name="fine", image_size=32, text_len=16, steps=4, lr=1e-4, image_reduction="random", mask_ratio=0.3))


def test_no_stages_is_the_run_itself():
    cfg = TrainConfig(out_dir="runs/x")
    assert stages.expand(cfg) == [("", cfg)]


def test_expand_chains_stages():
    cfg = TrainConfig(out_dir="runs/x", seed=5, batch_size=64, stages=TWO)
    (n0, s0), (n1, s1) = stages.expand(cfg)
    assert (n0, n1) == ("pre", "fine")
    assert s0.out_dir == str(Path("runs/x/pre")) and s1.out_dir == str(Path("runs/x/fine"))
    assert (s0.image_size, s0.text_len, s0.steps, s0.text_reduction) == (16, 8, 10, "syntax")
    assert (s1.image_size, s1.text_len, s1.steps, s1.mask_ratio) == (32, 16, 4, 0.3)
    assert s0.batch_size == s1.batch_size == 64, "the run's own fields are the stages' defaults"
    assert s0.init_from == "" and s1.init_from == str(Path("runs/x/pre/model.pt"))
    assert (s0.seed, s1.seed) == (5, 6)
    assert (s0.eval_at_end, s1.eval_at_end) == (False, True)
    assert s0.stages == s1.stages == ()
    unnamed = stages.expand(dataclasses.replace(cfg, stages=({"steps": 1}, {"steps": 2})))
    assert [n for n, _ in unnamed] == ["stage0", "stage1"]


def test_stage_overrides_on_the_command_line():
    cfg = TrainConfig(stages=TWO)
    out = apply_overrides(cfg, ["stages.1.steps=7", "stages.pre.lr=0.002", "stages.fine.crop_scale=0.5,1.0",
                                "batch_size=32"])
    assert out.stages[1]["steps"] == 7 and out.stages[0]["lr"] == 0.002 and out.stages[1]["crop_scale"] == (0.5, 1.0)
    assert out.batch_size == 32 and cfg.stages[1]["steps"] == 4, "the original config is not modified"
    js = apply_overrides(TrainConfig(), ['stages=[{"steps": 3}, {"name": "b", "steps": 2}]'])
    assert js.stages == ({"steps": 3}, {"name": "b", "steps": 2})
    with pytest.raises(KeyError, match="unknown stage config key 'stepz'"):
        apply_overrides(cfg, ["stages.0.stepz=1"])
    with pytest.raises(KeyError, match="no stage 'tune'.*pre, fine"):
        apply_overrides(cfg, ["stages.tune.steps=1"])
    with pytest.raises(KeyError, match="unknown stage config key 'out_dir'"):
        apply_overrides(cfg, ["stages.0.out_dir=/tmp"])


def test_stage_validation_before_anything_runs():
    with pytest.raises(KeyError, match="run-wide key 'resume'"):
        apply_overrides(TrainConfig(), ['stages=[{"resume": true}]'])
    with pytest.raises(KeyError, match="unknown or run-wide key 'stepz'"):
        stages.expand(TrainConfig(stages=({"stepz": 1},)))
    with pytest.raises(ValueError, match="unique"):
        stages.expand(TrainConfig(stages=({"name": "a"}, {"name": "a"})))
    bad = TrainConfig(stages=(dict(steps=1), dict(steps=1, image_reduction="resize", mask_ratio=0.5)))
    with pytest.raises(ValueError, match="resize"):
        stages.run(bad, lambda st, name: pytest.fail("no stage may run"), is_main=True)
    with pytest.raises(ValueError, match="unknown text reduction"):
        stages.expand(TrainConfig(stages=(dict(text_reduction="nouns"),)))


def test_a_preempted_stage_ends_the_run_unfinished_and_resume_starts_there(tmp_path):
    """A stage stopped by a signal (train returns preempted) is not marked done and no later stage runs; the resumed
    run skips the stages done before and runs the stopped one again (with resume=true: from its checkpoint)."""
    cfg = TrainConfig(out_dir=str(tmp_path), stages=TWO[:1] + TWO[1:] + (dict(name="third", steps=2),))
    ran = []

    def train_fn(st, name):
        ran.append((name, st.resume))
        return {"step": 3, "preempted": True} if name == "fine" and len(ran) == 2 else {"step": st.steps}

    out = stages.run(cfg, train_fn, is_main=True)
    assert ran == [("pre", False), ("fine", False)] and out[-1]["preempted"]
    assert (tmp_path / "pre" / stages.DONE).is_file() and not (tmp_path / "fine" / stages.DONE).exists()
    assert not (tmp_path / "stages.json").exists()
    ran.clear()
    out = stages.run(dataclasses.replace(cfg, resume=True), train_fn, is_main=True)
    assert ran == [("fine", True), ("third", True)] and [s["stage"] for s in out] == ["pre", "fine", "third"]
    assert (tmp_path / "stages.json").is_file()


def test_a_fresh_staged_run_into_a_finished_one_is_refused_before_any_stage_is_touched(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), stages=TWO)
    stages.run(cfg, lambda st, name: {"step": st.steps}, is_main=True)
    (tmp_path / "fine" / "metrics.jsonl").write_text('{"step": 4}\n')  # what the last stage logged
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(stages.json\)"):
        stages.run(cfg, lambda st, name: {"step": st.steps}, is_main=True)
    assert (tmp_path / "pre" / stages.DONE).is_file()  # nothing removed or re-marked
    ran = []
    stages.run(dataclasses.replace(cfg, overwrite=True), lambda st, name: ran.append(name) or {"step": st.steps},
               is_main=True)
    assert ran == ["pre", "fine"] and not (tmp_path / "fine" / "metrics.jsonl").exists()


def test_overwrite_removes_every_stage_record_so_an_interrupted_overwrite_resumes_all_stages(tmp_path):
    """overwrite=true used to leave the stages' done.json and the run's model.pt / stages.json: stopped in its first
    stage and resumed, the new run skipped its fine-tune and reported the old one's model."""
    cfg = TrainConfig(out_dir=str(tmp_path), stages=TWO)
    stages.run(cfg, lambda st, name: {"step": st.steps}, is_main=True)
    (tmp_path / "model.pt").write_text("old")
    (tmp_path / "curves.png").write_text("old")
    ran = []

    def stopped_in_pre(st, name):
        ran.append((name, st.resume))
        return {"step": 3, "preempted": True} if name == "pre" else {"step": st.steps}

    stages.run(dataclasses.replace(cfg, overwrite=True), stopped_in_pre, is_main=True)
    assert ran == [("pre", False)]
    for gone in ("model.pt", "stages.json", "curves.png", "fine/done.json", "pre/done.json"):
        assert not (tmp_path / gone).exists(), gone
    ran.clear()
    stages.run(dataclasses.replace(cfg, resume=True), lambda st, name: ran.append((name, st.resume)) or
               {"step": st.steps}, is_main=True)  # fmt: skip
    assert ran == [("pre", True), ("fine", True)]  # the fine-tune runs (from nothing: its folder was emptied)
    with pytest.raises(FileExistsError, match="stages.json"):  # nor may a one-stage run reuse the folder
        fresh_out_dir(tmp_path, False, True)


def test_a_stage_after_one_that_trained_again_starts_afresh(tmp_path, caplog):
    """Resumed with more pre-training steps: the pre-training goes on, and the fine-tune made from its older weights
    is redone from the start (it used to be skipped as finished, keeping the old model)."""
    cfg = TrainConfig(out_dir=str(tmp_path), stages=TWO)
    stages.run(cfg, lambda st, name: {"step": st.steps}, is_main=True)
    (tmp_path / "fine" / "ckpt").mkdir()
    (tmp_path / "fine" / "ckpt" / "latest").write_text("step4")
    longer = dataclasses.replace(cfg, resume=True, stages=(dict(TWO[0], steps=20), TWO[1]))
    ran = []
    with caplog.at_level("WARNING", logger="clipfast"):
        out = stages.run(longer, lambda st, name: ran.append((name, st.resume)) or {"step": st.steps},
                         is_main=True)  # fmt: skip
    assert ran == [("pre", True), ("fine", False)] and [s["steps"] for s in out] == [20, 4]
    assert not (tmp_path / "fine" / "ckpt").exists() and "stage fine (2/2): the stage before it trained" in caplog.text
    ran.clear()
    stages.run(longer, lambda st, name: ran.append(name) or {"step": st.steps}, is_main=True)
    assert ran == []  # both finished now


def test_demo_clipa_config_loads():
    cfg = load_config(str(ROOT / "configs" / "demo_clipa.py"))
    (_, pre), (_, fine) = stages.expand(cfg)
    base = load_config(str(ROOT / "configs" / "demo.py"))
    assert fine.image_size == base.image_size and fine.text_len == base.text_len
    assert pre.image_size < fine.image_size and pre.text_len < fine.text_len
    assert fine.eval_at_end and fine.val_data == base.val_data and fine.batch_size == base.batch_size


def _recipes():
    import importlib.util
    import inspect

    for path in sorted((ROOT / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, fn in vars(module).items():
            if (inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")
                    and inspect.signature(fn).return_annotation in (TrainConfig, "TrainConfig")):
                yield f"{path.name}:{name}"


RECIPES = list(_recipes())


def test_recipes_found():
    names = set(RECIPES)
    for want in ("demo.py:config", "demo_clipa.py:config", "clip.py:config", "clipa.py:b16_i50_t16",
                 "clipa.py:l16_i17_t16", "clipa.py:l16_i37_t8", "clipa_v2.py:config", "flip.py:mask50",
                 "flip.py:mask75", "strategies.py:clip", "strategies.py:clip_da", "strategies.py:flip",
                 "strategies.py:slip"):
        assert want in names, (want, names)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads_and_names_a_preset(recipe):
    from clipfast.presets import from_name

    cfg = load_config(str(ROOT / "configs" / recipe))
    mcfg = from_name(cfg.model)  # raises for a name presets.py does not have
    for _, st in stages.expand(cfg):
        size = st.image_size or mcfg.vision.image_size
        assert size % mcfg.vision.patch_size == 0, (recipe, size)
        assert 2 <= (st.text_len or mcfg.text.context_length) <= 77
        assert st.steps > 0 and 0 <= st.warmup_steps < st.steps
    if not recipe.startswith("demo"):  # the paper recipes share CLIPA's optimiser
        assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.2 and cfg.lr_scaled_by_batch
        assert cfg.crop_scale == (0.4, 1.0)


def test_load_weights_resizes_position_embeddings(tmp_path):
    from clipfast.checkpoint import load_weights, save_model
    from clipfast.model import CLIP
    from clipfast.presets import from_name

    small = CLIP(from_name("demo", **{"vision.image_size": 16, "text.context_length": 8}), kernels="ref")
    save_model(tmp_path / "model.pt", small, TrainConfig(), step=3)
    big = CLIP(from_name("demo", **{"vision.image_size": 32, "text.context_length": 16}), kernels="ref")
    load_weights(big, str(tmp_path))
    a, b = small.state_dict(), big.state_dict()
    assert b["visual.positional_embedding"].shape == (1 + 16, 128) and b["positional_embedding"].shape == (16, 128)
    assert torch.equal(b["positional_embedding"][:8], a["positional_embedding"])
    assert torch.equal(b["visual.positional_embedding"][0], a["visual.positional_embedding"][0]), "class slot kept"
    for k in a:
        if "positional_embedding" not in k:
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(FileNotFoundError, match="init_from"):
        load_weights(big, str(tmp_path / "nothing"))



def _run(config, *overrides):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           "clipfast/train.py", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _client_state(tag):
    """The client state of a DeepSpeed checkpoint (the step, and what the trainer counts across resumes): DeepSpeed
    keeps its keys at the top level of the model-states file."""
    sd = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    return {k: sd[k] for k in ("step", "skipped_samples", "train_s", "total_s")}


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_stage_run_end_to_end_and_resume(tmp_path):
    data = tmp_path / "digits"
    build(data, seed=0, size=32)
    out = tmp_path / "run"
    common = [f"train_data={data / 'train'}", f"val_data={data / 'val'}", f"out_dir={out}", "batch_size=16",
              "log_every=2", "ckpt_every=2", "tensorboard=false", "data_threads=1", "warmup_steps=1",
              "stages.pretrain.steps=3", "stages.pretrain.ckpt_every=2", "stages.pretrain.warmup_steps=1",
              "stages.finetune.warmup_steps=1", "stages.finetune.ckpt_every=2",
              "stages.finetune.image_reduction=grid", "stages.finetune.mask_ratio=0.75"]
    log = _run(ROOT / "configs" / "demo_clipa.py", "stages.finetune.steps=2", *common)
    assert "initialised from" in log and "pretrain/model.pt" in log
    pre, fine = out / "pretrain", out / "finetune"
    assert _steps(pre / "metrics.jsonl") == [2, 3] and _steps(fine / "metrics.jsonl") == [2]
    top = torch.load(out / "model.pt", weights_only=False)
    first = torch.load(pre / "model.pt", weights_only=False)
    assert top["model_config"]["vision"]["image_size"] == 32 and top["model_config"]["text"]["context_length"] == 16
    assert first["model_config"]["vision"]["image_size"] == 16 and first["model_config"]["text"]["context_length"] == 8
    assert top["step"] == 2 and top["train_config"]["mask_ratio"] == 0.75
    assert not (pre / "eval.json").exists(), "only the last stage evaluates"
    assert json.loads((out / "eval.json").read_text()) == json.loads((fine / "eval.json").read_text())
    summary = json.loads((out / "stages.json").read_text())
    assert [s["stage"] for s in summary] == ["pretrain", "finetune"] and summary[1]["top1"] is not None
    assert all(s["train_s"] > 0 for s in summary)

    # resume with a longer fine-tune: the finished pre-training is skipped, the fine-tune continues at step 2
    at2 = _client_state(fine / "ckpt" / "step2")
    log = _run(ROOT / "configs" / "demo_clipa.py", "stages.finetune.steps=4", "resume=true", *common)
    assert "stage pretrain (1/2) finished before: skipped" in log
    assert "at step 2" in log
    assert _steps(pre / "metrics.jsonl") == [2, 3] and _steps(fine / "metrics.jsonl") == [2, 4]
    assert torch.load(out / "model.pt", weights_only=False)["step"] == 4
    assert [s["steps"] for s in json.loads((out / "stages.json").read_text())] == [3, 4]
    # what the checkpoints carry across the resume: the wall times go on from the first launch's
    at4 = _client_state(fine / "ckpt" / "step4")
    assert at2["step"] == 2 and at4["step"] == 4 and at2["skipped_samples"] == at4["skipped_samples"] == 0
    assert at4["train_s"] > at2["train_s"] > 0 and at4["total_s"] > at2["total_s"] > at2["train_s"]
    assert json.loads((out / "stages.json").read_text())[1]["train_s"] >= at4["train_s"]
    # a checkpoint reads as a model file: the weights of its step, with the stage's model config
    from clipfast.checkpoint import read_model_file

    tagged, final = read_model_file(str(fine / "ckpt" / "step4")), torch.load(fine / "model.pt", weights_only=False)
    assert tagged["step"] == 4 and tagged["model_config"] == final["model_config"]
    assert tagged["state_dict"].keys() == final["state_dict"].keys()
    assert all(torch.equal(tagged["state_dict"][k], final["state_dict"][k]) for k in final["state_dict"])
    earlier = read_model_file(str(fine / "ckpt" / "step2"))
    assert earlier["step"] == 2 and not torch.equal(earlier["state_dict"]["text_projection"],
                                                    final["state_dict"]["text_projection"])


def test_a_stage_that_switches_strategy_says_so_and_records_it(tmp_path, caplog):
    """The stage line and stages.json name augment and SLIP where a stage sets them; a SLIP stage after a SLIP stage
    says its head starts afresh (model.pt, what the next stage starts from, holds the CLIP weights alone)."""
    import json
    import logging

    cfg = TrainConfig(out_dir=str(tmp_path), stages=(dict(name="pre", steps=2, ssl_weight=0.5, ssl_hidden=64,
                                                          ssl_dim=16, augment="simclr"),
                                                     dict(name="fine", steps=2, ssl_weight=0.5, ssl_hidden=64,
                                                          ssl_dim=16)))
    with caplog.at_level(logging.INFO, logger="clipfast.stages"):
        stages.run(cfg, lambda st, name: {"step": st.steps}, is_main=True)
    assert "stage pre (1/2): 2 steps at preset px, preset text tokens, image resize (mask 0.00), text truncate, " \
           "augment simclr, SLIP (ssl_weight 0.5)" in caplog.text
    assert "stage fine: SLIP's projection head starts afresh" in caplog.text
    assert "stage pre: SLIP's projection head" not in caplog.text
    rec = json.loads((tmp_path / "stages.json").read_text())
    assert [(r["augment"], r["ssl_weight"]) for r in rec] == [("simclr", 0.5), ("none", 0.5)]
