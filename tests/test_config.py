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
