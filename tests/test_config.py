"""Config: defaults -> recipe -> overrides, typed, with clear errors."""

from __future__ import annotations

import re

import pytest

from fastimagenet.common.errors import UserError
from fastimagenet.config import Config, from_saved, load_config, save_config


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=0.25", "epochs=3", "data.scale=0.2,1", "runtime.compile=false",
                             "loader.dali.device=cpu", "schedule.stages=0,64,8;2,96,4"])
    assert cfg.optim.lr == 0.25 and cfg.epochs == 3
    assert cfg.data.scale == (0.2, 1.0)
    assert cfg.runtime.compile == "false"
    assert cfg.loader.dali.device == "cpu"


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("description: x\nepochs: 5\noptim: {lr: 0.1, batch_size: 64}\n")
    cfg = load_config(str(recipe), ["optim.lr=0.2"])
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.batch_size) == (5, 0.2, 64)


def test_typo_gets_did_you_mean():
    with pytest.raises(UserError, match="unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=0.1"])


def test_typo_in_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim: {batch_sise: 64}\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown config key 'optim.batch_sise'.*optim.batch_size"):
        load_config(str(recipe))


# Every number validate() requires to be positive, or at least 0
POSITIVE = ("epochs", "optim.batch_size", "optim.accum_steps", "schedule.min_resolution", "schedule.max_resolution",
            "schedule.resolution_step", "model.width", "runtime.log_interval", "runtime.keep_best",
            "runtime.ddp_bucket_mb", "runtime.eval_every")
NON_NEGATIVE = ("data.num_classes", "data.val_resolution", "data.val_batch_size", "loader.workers", "optim.lr",
                "optim.weight_decay", "optim.grad_clip", "runtime.peak_tflops")


@pytest.mark.parametrize("override, message", [
    *[(f"{key}=0", re.escape(f"'{key}' must be > 0, got 0")) for key in POSITIVE],
    *[(f"{key}=-1", re.escape(f"'{key}' must be >= 0, got -1")) for key in NON_NEGATIVE],
    ("optim.batch_size=-4", "'optim.batch_size' must be > 0, got -4"),
    ("epochs=two", "'epochs' expects an integer"),
    ("runtime.precision=bf61", "must be one of .*did you mean 'bf16'"),
    ("data.scale=0.5,0.1", "'data.scale' must satisfy"),
    ("data.scale=0.5,1.5", "'data.scale' must satisfy"),
    ("data.ratio=2,1", "'data.ratio' must satisfy"),
    ("data.crop_ratio=1.5", re.escape("'data.crop_ratio' must be in (0, 1]")),
    ("runtime.preempt_grace_s=0", "'runtime.preempt_grace_s' must be > 0"),
    ("optim.label_smoothing=1", re.escape("'optim.label_smoothing' must be in [0, 1)")),
    ("schedule.min_resolution=512", "'schedule.min_resolution' must be <= 'schedule.max_resolution'"),
    ("schedule.ramp_start=0.9", "'schedule.ramp_start' <= 'schedule.ramp_end'"),
    ("schedule.ramp_end=1.5", "'schedule.ramp_end' <= 1"),
    *[(f"schedule.{key}=1.5", re.escape(f"'schedule.{key}' must be in [0, 1], got 1.5"))
      for key in ("warmup", "peak", "end_lr_ratio")],
    ("loader.dali.threads=-1", "loader.dali.threads >= 0"),
    ("loader.dali.hw_decoder_load=2", "0 <= loader.dali.hw_decoder_load <= 1"),
    ("schedule.stages=0,0,8", "resolution and batch must be > 0"),
    ("schedule.stages=1,64,8", "must start at epoch 0"),
    ("schedule.stages=0,64", "is not 'epoch,resolution,batch'"),
    ("optim", "expected key=value"),
    # Checks that need no hardware all run when the config is loaded, not once a run starts:
    ("loader.dali.prefetch=0", "need loader.dali.prefetch >= 1"),
    ("model.arch=resnet19", "'model.arch' must be one of .*did you mean 'resnet18'"),
    ("model.width=32", "'model.width' applies to the \\*_small archs"),
    ("optim.accum_steps=3", "must be divisible by 'optim.accum_steps' \\(3\\)"),
])
def test_impossible_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_recipes_command_checks_the_whole_config(capsys):
    from fastimagenet.cli import main

    assert main(["recipes", "rn50_18ep", "loader.dali.prefetch=0"]) == 2
    assert "loader.dali.prefetch >= 1" in capsys.readouterr().err


def test_stages_are_parsed_once_from_a_string_or_a_yaml_list(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("description: x\nepochs: 20\nschedule:\n  stages: [[0, 160, 1024], [11, 192, 768]]\n")
    from_list = load_config(str(recipe)).schedule.stages
    from_text = load_config(None, ["epochs=20", "schedule.stages=0,160,1024;11,192,768"]).schedule.stages
    assert from_list == from_text == ((0, 160, 1024), (11, 192, 768))
    assert from_list[1].resolution == 192 and from_list[1].batch == 768
    with pytest.raises(UserError, match="'schedule.stages' entry \\[0, 160\\] is not 'epoch,resolution,batch'"):
        load_config(None, ["epochs=20", "schedule.stages=[[0, 160]]"])


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(UserError, match="unknown recipe 'demo_fashion'.*did you mean 'demo_fashion_mnist'"):
        load_config("demo_fashion")


def test_saved_config_round_trips_with_commit_and_seed(tmp_path):
    cfg = load_config(None, ["runtime.seed=7", "data.ratio=0.5,2"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "git_commit:" in text and "seed: 7" in text
    assert from_saved(tmp_path / "config.yaml") == cfg


def test_defaults_are_valid():
    assert load_config() == Config()
