"""Every recipe in configs/ resolves, prints its plan and trains one tiny step on CPU with its own model; the
`recipes` listing and the README table name them all, with published figures labelled as someone else's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from fastimagenet.cli import main
from fastimagenet.common.errors import UserError
from fastimagenet.config import CONFIGS_DIR, _flatten, load_config
from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder
from fastimagenet.metrics import read_metrics
from fastimagenet.plan import build_plan
from fastimagenet.recipes import REFERENCE_LABEL, list_recipes, markdown_table, read_recipe
from fastimagenet.schedules import lr_at

RECIPES = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_promised_recipes_exist():
    assert {"rn50_18ep", "rn18_16ep", "rn50_90ep_classic", "resnet10_small_32px", "demo_fashion_mnist"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_prints_its_schedule(name):
    cfg = load_config(name)
    plan = build_plan(cfg)
    table = plan.table().splitlines()
    assert len(table) == cfg.epochs + 2  # header, one row per epoch, eval resolution
    # every recipe names its eval resolution and its largest training resolution: the table's ends, as written there
    recipe = yaml.safe_load((CONFIGS_DIR / f"{name}.yaml").read_text())
    assert table[-1] == f"eval at {recipe['data']['val_resolution']} px"
    assert table[-2].split()[:2] == [str(recipe["epochs"] - 1), str(recipe["schedule"]["max_resolution"])]
    assert read_recipe(CONFIGS_DIR / f"{name}.yaml").description


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for split in ("train", "val"):
        make_jpeg_folder(root / split, classes=2, per_class=2, size=72, seed=0)
    return root


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_one_step_on_cpu(name, tiny_folder, tmp_path):
    """The recipe's own model and optimizer; only the data, length, resolution and batch shrink to one step. The
    data is a JPEG folder, so the torchvision loader reads it whatever the recipe's loader (the demo's ffcv has its
    own tests: test_fashion_mnist.py)."""
    # 64 px rather than 32: an ImageNet ResNet then still has a 2x2 map at its last stage, as at full size.
    out = tmp_path / "run"
    overrides = [f"data.train={tiny_folder / 'train'}", f"data.val={tiny_folder / 'val'}", "loader.name=torchvision",
                 "epochs=1",
                 "schedule.stages=0,64,4", "data.val_resolution=64", "data.val_batch_size=4", "loader.workers=1",
                 "runtime.device=cpu", "runtime.compile=false", f"runtime.out_dir={out}"]
    assert main(["train", "--config", name, *overrides]) == 0
    [record] = read_metrics(out)
    assert math.isfinite(record["train_loss"]) and record["resolution"] == 64
    cfg = load_config(name)
    assert ("ema_val_top1" in record) == (cfg.optim.ema_decay > 0)
    saved = (out / "config.yaml").read_text()
    assert f"arch: {cfg.model.arch}" in saved and f"blurpool: {str(cfg.model.blurpool).lower()}" in saved


def test_rn50_18ep_is_the_speedrun_recipe():
    cfg = load_config("rn50_18ep")
    assert (cfg.model.arch, cfg.model.blurpool, cfg.epochs, cfg.runtime.tta_flip) == ("resnet50", True, 18, True)
    assert cfg.optim.label_smoothing > 0 and cfg.schedule.lr == "linear_ramp"
    plan = build_plan(cfg)
    assert (plan.rows[0].resolution, plan.rows[-1].resolution, plan.val_resolution) == (160, 192, 256)


# Keys that only matter under some other setting: a recipe that sets one without that setting is silently ignored.
_ONLY_WHEN = {
    "optim.momentum": lambda c: c.optim.name == "sgd",
    "optim.nesterov": lambda c: c.optim.name == "sgd",
    "optim.betas": lambda c: c.optim.name == "adamw",
    "schedule.milestones": lambda c: c.schedule.lr == "step",
    "schedule.gamma": lambda c: c.schedule.lr == "step",
    "schedule.peak": lambda c: c.schedule.lr in ("linear_ramp", "onecycle"),
    "schedule.end_lr_ratio": lambda c: c.schedule.lr != "step",
    "schedule.ramp_start": lambda c: not c.schedule.stages,
    "schedule.ramp_end": lambda c: not c.schedule.stages,
    "schedule.min_resolution": lambda c: not c.schedule.stages,
    "schedule.max_resolution": lambda c: not c.schedule.stages,
    "model.width": lambda c: c.model.arch.endswith("_small"),
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_sets_no_key_its_other_settings_ignore(name):
    cfg = load_config(name)
    keys = _flatten(yaml.safe_load((CONFIGS_DIR / f"{name}.yaml").read_text()))
    ignored = [key for key in keys if key in _ONLY_WHEN and not _ONLY_WHEN[key](cfg)]
    assert not ignored, f"{name}: these keys have no effect with the recipe's other settings: {ignored}"


@pytest.mark.parametrize("name", sorted(set(RECIPES) - {"demo_fashion_mnist"}))
def test_recipes_leave_precision_and_compile_to_the_hardware_presets(name):
    """bf16 + compile on CUDA, fp32 eager on CPU (runtime.py); only the CPU demo pins them."""
    cfg = load_config(name)
    assert (cfg.runtime.precision, cfg.runtime.compile) == ("auto", "auto")


@pytest.mark.parametrize("epochs", [16, 18, 40, 88])
def test_rn50_18ep_serves_other_lengths_by_fractions(epochs):
    cfg = load_config("rn50_18ep", [f"epochs={epochs}"])
    resolutions = [row.resolution for row in build_plan(cfg).rows]
    assert resolutions[0] == 160 and resolutions[-1] == 192 and resolutions == sorted(resolutions)
    assert 0.7 < resolutions.index(192) / epochs < 0.86  # the 192 px stage starts at the same point of the run
    lrs = [lr_at(e / epochs, 1024, cfg) for e in range(epochs)]
    assert lrs.index(max(lrs)) / epochs == pytest.approx(0.125, abs=1.5 / epochs)


def test_listing_names_every_recipe_and_labels_published_figures(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert f"\n{name}\n" in f"\n{out}"
    referenced = [r for r in list_recipes() if r.reference]
    assert {r.name for r in referenced} >= {"rn50_18ep", "rn18_16ep", "rn50_90ep_classic"}
    assert out.count(REFERENCE_LABEL) == len(referenced)


def test_readme_carries_the_recipe_table(capsys):
    assert main(["recipes", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table == markdown_table(list_recipes())
    assert table in README.read_text(), "README's recipe table is out of date: paste `fastimagenet recipes --markdown`"


def test_showing_one_recipe_prints_its_plan_with_overrides(capsys):
    assert main(["recipes", "rn50_18ep", "epochs=40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rn50_18ep: resnet50 + BlurPool, 40 epochs, sgd")
    assert "\n   39   192   1024" in out and out.rstrip().endswith("eval at 256 px")


def test_recipe_without_description_or_with_bad_yaml_is_named(tmp_path):
    (tmp_path / "bare.yaml").write_text("epochs: 3\n")
    with pytest.raises(UserError, match="bare.yaml: a recipe needs a one-line 'description:'"):
        list_recipes(tmp_path)
    (tmp_path / "bare.yaml").write_text("description: [unclosed\n")
    with pytest.raises(UserError, match="bare.yaml: not valid YAML"):
        read_recipe(tmp_path / "bare.yaml")


def test_unknown_recipe_suggests_the_closest(capsys):
    assert main(["recipes", "rn50_18"]) == 2
    assert "unknown recipe 'rn50_18' — did you mean 'rn50_18ep'?" in capsys.readouterr().err
