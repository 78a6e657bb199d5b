"""The training tricks the recipes use: BlurPool, EMA of weights, flip TTA, a separate test resolution, lr-find."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fastimagenet import lr_find
from fastimagenet import train as train_module
from fastimagenet.blurpool import BlurPoolConv2d
from fastimagenet.cli import main
from fastimagenet.common.errors import UserError
from fastimagenet.config import load_config
from fastimagenet.ema import ModelEma
from fastimagenet.evaluation import evaluate
from fastimagenet.lr_find import lr_range_test, suggest_lr
from fastimagenet.metrics import read_metrics
from fastimagenet.models import build_model
from fastimagenet.plan import build_plan
from fastimagenet.runtime import resolve_runtime
from fastimagenet.training_setup import build_loaders
from tests.conftest import TINY_RUN

TINY = [*TINY_RUN, "model.width=16", "optim.lr=0.8", "schedule.lr=onecycle", "schedule.peak=0.2"]


def tiny_cfg(data, *extra):
    return load_config(None, [f"data.train={data / 'train'}", f"data.val={data / 'val'}", *TINY, *extra])


# ---------------------------------------------------------------------------------------------- BlurPool
def test_blurpool_blurs_every_strided_stage_conv_and_keeps_torchvision_keys():
    model = build_model("resnet18", 10, blurpool=True)
    blurred = {name for name, m in model.named_modules() if isinstance(m, BlurPoolConv2d)}
    assert blurred == {f"layer{i}.0.{conv}" for i in (2, 3, 4) for conv in ("conv1", "downsample.0")}
    assert type(model.conv1) is nn.Conv2d  # the stem sees raw RGB and is left alone
    # Same state_dict keys as torchvision's own model: an exported checkpoint loads into resnet18().
    torchvision.models.resnet18(num_classes=10).load_state_dict(model.state_dict())
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_blurpool_stops_a_checkerboard_from_aliasing_into_a_constant():
    """A stride-2 sampling of a +1/-1 checkerboard reads only the +1s (pure aliasing); blurred first, it reads ~0."""
    plain = nn.Conv2d(16, 16, 1, stride=2, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
    blur = BlurPoolConv2d(16, 16, 1, stride=2, bias=False)
    blur.load_state_dict(plain.state_dict())
    idx = torch.arange(16)
    checkerboard = ((idx[:, None] + idx[None, :]) % 2 * -2 + 1).float().expand(1, 16, 16, 16)
    assert plain(checkerboard).mean().item() == pytest.approx(1.0)
    interior = blur(checkerboard)[..., 1:-1, 1:-1]
    assert interior.abs().max().item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.full((1, 16, 16, 16), 3.0)  # the filter sums to 1: flat regions pass unchanged
    assert torch.allclose(blur(flat)[..., 1:-1, 1:-1], plain(flat)[..., 1:-1, 1:-1])


def test_blurpool_on_small_archs_and_a_width_too_narrow_to_blur():
    model = build_model("resnet10_small", 4, width=16, blurpool=True)
    assert sum(isinstance(m, BlurPoolConv2d) for m in model.modules()) == 6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(UserError, match="model.blurpool=true but resnet10_small at width 1 has no strided"):
        build_model("resnet10_small", 4, width=1, blurpool=True)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_follows_its_formula_with_warm_up():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.5)
    assert not any(p.requires_grad for p in ema.module.parameters())
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 3))  # train mode: moves BN running stats and num_batches_tracked
    ema.update()  # warm-up: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.module[0].weight, 0.1 * start + 0.9 * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, 0.1 * 0 + 0.9 * model[1].running_mean)
    assert ema.module[1].num_batches_tracked.item() == 1  # integer buffers are copied, not averaged
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()  # decay min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    for _ in range(100):
        ema.update()
    assert ema.current_decay() == 0.5


def test_fit_evaluates_the_ema_model_every_epoch(jpeg_dataset, tmp_path):
    out = tmp_path / "run"
    assert main(["train", f"data.train={jpeg_dataset / 'train'}", f"data.val={jpeg_dataset / 'val'}", *TINY,
                 "epochs=2", "schedule.stages=0,24,16", "optim.ema_decay=0.9", f"runtime.out_dir={out}"]) == 0
    metrics = read_metrics(out)
    assert len(metrics) == 2
    for record in metrics:
        assert 0 <= record["ema_val_top1"] <= 1 and math.isfinite(record["ema_val_loss"])
        assert record["ema_val_loss"] != record["val_loss"]  # a different model, not the live one re-scored
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["ema"]["updates"] == 2 * (96 // 16)  # one update per optimizer step


def test_ema_decay_out_of_range_is_an_error():
    with pytest.raises(UserError, match="'optim.ema_decay' must be in \\[0, 1\\)"):
        load_config(None, ["optim.ema_decay=1.0"])


# ---------------------------------------------------------------------------------------------- TTA, test res
def test_flip_tta_scores_the_sum_of_the_image_and_its_mirror():
    """7 images in batches of 4: the last batch is padded, and the padding is scored by nobody. The expected figures
    are worked out image by image: the mirror made by reversing the columns, the loss as -log softmax."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    images = torch.randn(7, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 2, 1, 1])
    model(images)  # materialise the lazy layer
    rt = resolve_runtime(load_config(None, ["runtime.device=cpu"]))
    loader = [(images[i : i + 4].contiguous(memory_format=torch.channels_last), labels[i : i + 4]) for i in (0, 4)]
    plain = evaluate(model, model, loader, rt, per_rank_batch=4, tta_flip=False)
    tta = evaluate(model, model, loader, rt, per_rank_batch=4, tta_flip=True)

    def expected(logits_of) -> dict:
        losses, hits = [], []
        for image, label in zip(images, labels.tolist()):
            logits = logits_of(image).double()
            losses.append(math.log(logits.exp().sum()) - logits[label].item())
            hits.append(int(logits.argmax()) == label)
        return {"val_loss": sum(losses) / 7, "val_top1": sum(hits) / 7, "val_images": 7}

    with torch.no_grad():
        one = lambda image: model(image[None])[0]  # noqa: E731
        mirror = lambda image: image[:, :, list(range(7, -1, -1))]  # noqa: E731
        assert {k: plain[k] for k in ("val_loss", "val_top1", "val_images")} == pytest.approx(expected(one), rel=1e-5)
        both = expected(lambda image: one(image) + one(mirror(image)))
        assert {k: tta[k] for k in ("val_loss", "val_top1", "val_images")} == pytest.approx(both, rel=1e-5)
    assert tta["val_top1"] != plain["val_top1"]  # the mirror changed some answers: the two figures tell them apart


def test_val_resolution_differs_from_the_last_training_resolution(jpeg_dataset):
    cfg = tiny_cfg(jpeg_dataset, "epochs=2", "schedule.stages=0,24,8;1,32,8", "data.val_resolution=48")
    train_loader, val_loader = build_loaders(cfg, build_plan(cfg), resolve_runtime(cfg))
    assert next(iter(train_loader))[0].shape[-2:] == (24, 24)
    assert next(iter(val_loader))[0].shape[-2:] == (48, 48)
    assert build_plan(cfg).table().splitlines()[-1] == "eval at 48 px"


# ---------------------------------------------------------------------------------------------- lr-find
def test_suggest_lr_picks_the_steepest_descent_before_the_minimum():
    lrs = list(np.logspace(-4, 1, 60))
    # Loss falls fastest at lr=1e-2 (a tanh step in log-LR), bottoms out, then blows up past lr=1.
    losses = [2 - math.tanh(math.log10(lr) + 2) + max(0.0, math.log10(lr)) ** 2 * 5 for lr in lrs]
    assert suggest_lr(lrs, losses) == pytest.approx(1e-2, rel=0.25)
    assert suggest_lr(lrs[:5], [3.0, 2.0, 1.0, 2.0, 3.0]) == pytest.approx(lrs[2] / 10)  # too short a curve


@pytest.fixture
def cliff_loss(monkeypatch):
    """lr-find's loss made a known function of the LR (per 256 images; the runs below use batch 16): 2 below 0.01,
    1 from there to 1, far higher above. It falls fastest at the sweep's first LR of at least 0.01, and the test
    diverges at its first LR above 1. The model still runs forward and backward on the loader's batches."""
    lrs = []
    set_lr = lr_find.set_lr
    monkeypatch.setattr(lr_find, "set_lr", lambda optimizer, lr: (lrs.append(lr * 256 / 16), set_lr(optimizer, lr)))

    def loss(logits, labels, label_smoothing):
        return logits.sum() * 0 + (2.0 if lrs[-1] < 0.01 else 1.0 if lrs[-1] <= 1 else 1000.0)

    monkeypatch.setattr(train_module, "F", SimpleNamespace(cross_entropy=loss))  # train_step's loss


def test_lr_find_sweeps_and_suggests_where_the_loss_falls_fastest(jpeg_dataset, cliff_loss):
    sweep = np.geomspace(1e-4, 10, 20)
    result = lr_range_test(tiny_cfg(jpeg_dataset, "schedule.stages=0,24,16"), steps=20, min_lr=1e-4, max_lr=10)
    diverged = int(np.argmax(sweep > 1))
    assert result.stopped_early and result.lrs == pytest.approx(sweep[: diverged + 1].tolist())
    assert result.suggested_lr == pytest.approx(sweep[sweep >= 0.01][0])


def test_lr_find_writes_a_png_and_suggests_an_lr_without_touching_runs(jpeg_dataset, tmp_path, monkeypatch, capsys,
                                                                        cliff_loss):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", "--config", "resnet10_small_32px", f"data.train={jpeg_dataset / 'train'}",
                 "model.width=16", "optim.batch_size=16", "loader.workers=1", "runtime.device=cpu",
                 "--steps", "20", "--out", "plots/lr.png"]) == 0
    out = capsys.readouterr().out
    assert "at 32 px, batch 16; stopped early: the loss diverged" in out
    suggested = np.geomspace(1e-4, 10, 20)[8]  # the first of the sweep's LRs at or above 0.01
    assert f"suggested LR: optim.lr={suggested:.3g} (per 256 images; {suggested / 16:.3g} at batch 16)" in out
    assert (tmp_path / "plots" / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Only the plot: no run directory, no checkpoint, no temporary file left behind.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["plots", "plots/lr.png"]


def test_lr_find_stops_when_the_loss_diverges(jpeg_dataset):
    cfg = tiny_cfg(jpeg_dataset, "schedule.stages=0,24,16", "optim.label_smoothing=0")
    result = lr_range_test(cfg, steps=20, min_lr=10.0, max_lr=1e8)
    assert result.stopped_early and len(result.lrs) < 20
    assert result.losses[-1] > 4 * min(result.losses)  # the blow-up it stopped at: 4 times the lowest loss
    # too short a curve for a slope: a tenth of the LR at the lowest loss
    assert result.suggested_lr == result.lrs[result.losses.index(min(result.losses))] / 10


def test_lr_find_writes_into_runtime_out_dir_when_no_out_is_given(jpeg_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", "--config", "resnet10_small_32px", f"data.train={jpeg_dataset / 'train'}",
                 "model.width=16", "optim.batch_size=16", "loader.workers=1", "runtime.device=cpu",
                 f"runtime.out_dir={tmp_path / 'mine'}", "--steps", "10"]) == 0
    assert f"plot: {tmp_path / 'mine' / 'lr_find.png'}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # nothing in the current directory


@pytest.mark.parametrize("args, message", [
    (["--min-lr", "1", "--max-lr", "0.1"], "need 0 < --min-lr < --max-lr"),
    (["--steps", "3"], "--steps must be at least 10"),
    (["--out", "lr.jpg"], "lr.jpg: the lr-find plot is a PNG"),
])
def test_lr_find_bad_options_are_clear_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["lr-find", f"data.train={tmp_path}", "runtime.device=cpu", *args]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
