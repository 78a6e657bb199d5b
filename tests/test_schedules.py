"""Schedules are pure functions of the epoch / run progress, evaluated once into the run's plan."""

from __future__ import annotations

import pytest

from fastimagenet.config import load_config
from fastimagenet.plan import build_plan
from fastimagenet.schedules import lr_at, lr_factor


def test_ramp_is_rounded_to_the_step_and_spans_the_fractions():
    cfg = load_config(None, ["epochs=16", "schedule.min_resolution=160", "schedule.max_resolution=192",
                             "schedule.ramp_start=0.5", "schedule.ramp_end=0.75", "schedule.resolution_step=32"])
    plan = build_plan(cfg)
    resolutions = [row.resolution for row in plan.rows]
    assert resolutions[:9] == [160] * 9 and resolutions[12:] == [192] * 4
    assert all(r % 32 == 0 for r in resolutions)
    assert plan.val_resolution == 192


def test_ramp_scales_with_the_run_length():
    for epochs in (16, 40, 88):
        cfg = load_config(None, [f"epochs={epochs}", "schedule.min_resolution=128", "schedule.max_resolution=192",
                                 "schedule.ramp_start=0.25", "schedule.ramp_end=0.75"])
        rows = build_plan(cfg).rows
        assert rows[0].resolution == 128 and rows[epochs - 1].resolution == 192


def test_explicit_stages_set_resolution_and_batch():
    cfg = load_config(None, ["epochs=6", "schedule.stages=0,128,512;2,160,256;5,192,128", "data.val_resolution=224"])
    plan = build_plan(cfg)
    assert [row.resolution for row in plan.rows] == [128, 128, 160, 160, 160, 192]
    assert [row.batch_size for row in plan.rows] == [512, 512, 256, 256, 256, 128]
    assert plan.val_resolution == 224
    assert "eval at 224 px" in plan.table()


def test_lr_is_per_256_images():
    cfg = load_config(None, ["optim.lr=0.5", "schedule.lr=step", "schedule.milestones=0.5"])
    assert lr_at(0.1, 512, cfg) == pytest.approx(1.0)
    assert lr_at(0.6, 128, cfg) == pytest.approx(0.025)


@pytest.mark.parametrize("kind", ["linear_ramp", "onecycle"])
def test_ramp_shapes_peak_then_fall(kind):
    s = load_config(None, [f"schedule.lr={kind}", "schedule.peak=0.2", "schedule.end_lr_ratio=0.1"]).schedule
    assert lr_factor(0.0, s) == 0.0
    assert lr_factor(0.1, s) == pytest.approx(0.5)
    assert lr_factor(0.2, s) == pytest.approx(1.0)
    assert lr_factor(1.0, s) == pytest.approx(0.1)
    falling = [lr_factor(p / 10, s) for p in range(2, 11)]
    assert falling == sorted(falling, reverse=True)


def test_cosine_with_warmup():
    s = load_config(None, ["schedule.lr=cosine", "schedule.warmup=0.1"]).schedule
    assert lr_factor(0.05, s) == pytest.approx(0.5)
    assert lr_factor(0.1, s) == pytest.approx(1.0)
    assert lr_factor(0.55, s) == pytest.approx(0.5)
    assert lr_factor(1.0, s) == pytest.approx(0.0, abs=1e-9)


def test_plateau_drops_after_patience_flat_validations_down_to_its_floor():
    from fastimagenet.plateau import Plateau

    plateau = Plateau(factor=0.5, patience=2, min_scale=0.25, threshold=0.01)
    drops = [plateau.observe(top1) for top1 in (0.50, 0.505, 0.50, 0.60, 0.60, 0.59, 0.5, 0.5, 0.5)]
    # 0.505 is within the threshold of the best: flat, like 0.50; 0.60 a new best; the floor stops the third drop
    assert drops == [False, False, True, False, False, True, False, False, False]
    assert plateau.scale == 0.25 and plateau.best == 0.60
    again = Plateau(factor=0.5, patience=2, min_scale=0.25, threshold=0.01)
    again.load_state_dict(plateau.state_dict())
    assert again == plateau


def test_the_plateau_plan_is_the_warm_up_then_the_peak():
    cfg = load_config(None, ["schedule.lr=plateau", "schedule.warmup=0.25", "epochs=8", "optim.lr=0.4"])
    plan = build_plan(cfg)
    assert [round(plan.lr(epoch, 0, 1) / plan.lr(7, 1, 1), 3) for epoch in range(4)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(Exception, match="plateau_factor"):
        load_config(None, ["schedule.lr=plateau", "schedule.plateau_factor=1.5"])
