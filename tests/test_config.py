import pytest

from clipfast.config import TrainConfig, apply_overrides, field_names, load_config


def test_overrides_parse_types():
    cfg = apply_overrides(TrainConfig(), ["steps=7", "lr=0.5", "resume=true", "crop_scale=0.5,1.0", "model=ViT-B-16"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.crop_scale, cfg.model) == (7, 0.5, True, (0.5, 1.0), "ViT-B-16")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KeyError) as e:
        apply_overrides(TrainConfig(), ["stepz=3"])
    msg = str(e.value)
    assert "stepz" in msg
    for name in field_names():
        assert name in msg


@pytest.mark.parametrize("item", ["steps=three", "resume=maybe", "steps"])
def test_bad_values_name_the_key(item):
    with pytest.raises(ValueError, match="steps|resume|key=value"):
        apply_overrides(TrainConfig(), [item])


def test_load_config_function_and_errors(tmp_path):
    p = tmp_path / "run.py"
    p.write_text(
        "from clipfast.config import TrainConfig\n"
        "def config():\n    return TrainConfig(steps=5)\n"
        "def longer():\n    return TrainConfig(steps=50)\n"
        "def broken():\n    return 3\n"
    )
    assert load_config(str(p)).steps == 5
    assert load_config(f"{p}:longer", ["lr=0.1"]).lr == 0.1
    with pytest.raises(AttributeError, match="longer"):
        load_config(f"{p}:nope")
    with pytest.raises(TypeError, match="TrainConfig"):
        load_config(f"{p}:broken")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_config(str(tmp_path / "missing.py"))


def test_repo_configs_load():
    cfg = load_config("configs/demo.py")
    assert cfg.model == "demo" and cfg.val_data


@pytest.mark.parametrize("item, what", [
    ("steps=-5", "steps must be 1 or more"), ("log_every=0", "log_every must be 1"), ("ckpt_every=0", "ckpt_every"),
    ("eval_every=-1", "eval_every must be 0 or more"), ("keep_ckpts=-1", "keep_ckpts"), ("batch_size=0", "batch_size"),
    ("data_threads=0", "data_threads"), ("text_len=1", "text_len must be 0"), ("zero_stage=7", "zero_stage must be"),
    ("precision=fp16", "precision must be one of auto, bf16, fp32"), ("kernels=foo", "kernels must be one of"),
    ("mask_ratio=1", r"mask_ratio must be in \[0, 1\)"), ("betas=0.9", "betas takes two numbers"),
    ("crop_scale=0.5", "crop_scale takes"), ("crop_scale=0.9,0.5", "crop_scale takes"),
    ("image_size=30", "image_size 30 is not a multiple of model demo's patch size 8 .e.g. 24 or 32"),
    ("engine=jax", "engine must be"), ("cuda_graph=true", "cuda_graph=true needs engine=torch"),
    ("train_weights=3,1", r"train_weights: 2 weight\(s\) for 1 training dataset\(s\) \(data/demo/train\)"),
    # these were found only when the stage's model or engine was built: after the stages before it had trained
    ("augment=simclr_nofip", "augment must be one of"), ("layer_norm=fast", "layer_norm must be one of"),
    ("tower_streams=yes", "tower_streams must be one of"), ("overlap_optimizer=maybe", "overlap_optimizer must be"),
    ("reader_process=sometimes", "reader_process must be one of"), ("accum_steps=3", "accum_steps=3 does not divide"),
    ("ssl_crop_scale=0.5,0.2", "ssl_crop_scale takes"),
    # accepted before: every caption [SOT, EOT] (the loss stays at ln B), a rising "cosine", NaN (not < 0)
    ("text_len=2", "text_len must be 0 .the preset's. or at least 3"),
    ("min_lr=0.5", r"min_lr 0.5 is above the peak learning rate 0.0005 \(lr 0.0005\)"),
    ("lr=nan", "lr must be 0 or more, got nan"),
])
def test_values_a_run_cannot_use_are_named_before_it_starts(item, what):
    """clipfast.stages.expand (what train.py's main calls first) checks every stage; these failed late (a ZeroDivision
    after step 1, an IndexError in AdamW, a DALI message) or not at all (fp32 for any other precision, 0 steps)."""
    from clipfast.stages import expand

    with pytest.raises(ValueError, match=what):
        expand(apply_overrides(TrainConfig(), [item]))
    with pytest.raises(ValueError, match=f"stage b: {what}"):  # in a stage, named with it
        expand(apply_overrides(TrainConfig(stages=({"name": "a"}, {"name": "b"})), [f"stages.b.{item}"]))
    expand(TrainConfig())  # the defaults pass


def test_run_wide_overrides_a_stage_sets_itself_are_an_error_and_stages_star_sets_all():
    from clipfast.stages import expand

    cfg = TrainConfig(stages=({"name": "pre", "steps": 450, "lr": 1e-3}, {"name": "fine", "steps": 150}))
    with pytest.raises(ValueError, match=r"steps=20 would not reach stage\(s\) pre, fine.*stages\.\*\.steps"):
        apply_overrides(cfg, ["steps=20"])  # the stages' 450 and 150 steps would silently win
    assert [st.lr for _, st in expand(apply_overrides(cfg, ["lr=0.5", "stages.pre.lr=0.5"]))] == [0.5, 0.5]
    assert [st.steps for _, st in expand(apply_overrides(cfg, ["stages.*.steps=20"]))] == [20, 20]
    assert [st.warmup_steps for _, st in expand(apply_overrides(cfg, ["warmup_steps=3"]))] == [3, 3]  # set by none
    with pytest.raises(KeyError, match="no stages"):
        apply_overrides(TrainConfig(), ["stages.*.steps=20"])
    with pytest.raises(ValueError, match="'train_weights' takes comma-separated numbers"):
        apply_overrides(TrainConfig(), ["train_weights=a,b"])


def test_a_batch_the_ranks_cannot_split_is_an_error_under_either_engine():
    from clipfast.accum import check_accum

    for engine in ("torch", "deepspeed"):
        with pytest.raises(ValueError, match="batch_size 127 is not divisible by the 2 ranks"):
            check_accum(TrainConfig(batch_size=127, engine=engine), 2)
    check_accum(TrainConfig(batch_size=128, engine="torch"), 2)


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_or_overwritten(tmp_path, caplog):
    """resume=false into an out_dir with a logged step or a checkpoint: its metrics.jsonl / evals.jsonl would mix
    with the new run's and keep_ckpts would keep its newer-numbered checkpoints; overwrite=true removes them."""
    from clipfast.checkpoint import fresh_out_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # opened, nothing logged yet (a run that failed at its first step)
    (out / "config.json").write_text("{}")
    fresh_out_dir(out, overwrite=False, is_main=True)
    (out / "metrics.jsonl").write_text('{"step": 20}\n')
    (out / "ckpt" / "step20").mkdir(parents=True)
    (out / "model.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(metrics.jsonl, ckpt/\): resume=true"):
        fresh_out_dir(out, overwrite=False, is_main=True)
    fresh_out_dir(out, overwrite=True, is_main=False)  # rank > 0: decides the same, removes nothing
    assert (out / "ckpt" / "step20").is_dir()
    fresh_out_dir(out, overwrite=True, is_main=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert "removed the earlier run's metrics.jsonl, model.pt, ckpt" in caplog.text


def test_settings_only_a_built_model_checked_before_are_checked_before_any_stage(caplog):
    """A ResNet below 32 px, SLIP's temperature, a grid or block mask that cannot come near mask_ratio on the stage's
    grid (grid masking masked nothing at 0.3), a stage's JSON values of the wrong type ("false" was true): errors
    naming the stage, before the first stage trains; warmup_steps >= steps is a warning."""
    import logging

    from clipfast.stages import expand

    two = TrainConfig(stages=({"name": "a"}, {"name": "b"}))
    for items, what in [(["stages.b.model=demo-rn", "stages.b.image_size=16"], "needs image_size 32 or more"),
                        (["stages.b.model=demo-rn", "stages.b.image_size=63"], "not 31 mod 32"),
                        (["stages.b.ssl_weight=1", "stages.b.ssl_temperature=0"], "ssl_temperature must be > 0"),
                        (["stages.b.ssl_weight=1", "stages.b.ssl_hidden=0"], "ssl_hidden must be >= 1"),
                        (["stages.b.image_reduction=grid", "stages.b.mask_ratio=0.3"],
                         r"masks 0.000 of a 4x4 patch grid \(grid masking keeps one patch per g x g cell, which "
                         r"masks 0.75"),
                        (["stages.b.image_reduction=block", "stages.b.mask_ratio=0.1"], "masks 0.000 of a 4x4"),
                        (["stages.b.image_size=8", "stages.b.image_reduction=random", "stages.b.mask_ratio=0.5"],
                         r"'random' with mask_ratio=0.5 masks 0.000 of a 1x1 patch grid"),  # (it masked nothing)
                        (["stages.b.model=demo-rn", "stages.b.image_reduction=grid"], "asks for a patch mask")]:
        with pytest.raises(ValueError, match=f"stage b: .*{what}"):
            expand(apply_overrides(two, items))
    expand(apply_overrides(two, ["stages.b.image_size=64", "stages.b.image_reduction=grid",
                                 "stages.b.mask_ratio=0.75"]))  # 8x8 at 64 px: 16 of 64 kept
    for stage, what in [({"grad_checkpointing": "false"}, "grad_checkpointing takes true or false"),
                        ({"steps": "10"}, "steps takes a whole number, got str '10'"),
                        ({"text_len": 8.5}, "text_len takes a whole number"),
                        ({"crop_scale": 0.5}, "crop_scale takes a list of numbers")]:
        with pytest.raises(TypeError, match=f"stage 0: {what}"):
            expand(TrainConfig(stages=(stage,)))
    expand(TrainConfig(stages=({"lr": 1, "crop_scale": [0.5, 1], "name": "x"},)))  # an int for a float, a JSON list
    with caplog.at_level(logging.WARNING, logger="clipfast.config"):
        expand(apply_overrides(TrainConfig(), ["steps=10", "warmup_steps=15"]))
    assert "warmup_steps 15 >= steps 10: the learning rate never reaches its peak" in caplog.text
