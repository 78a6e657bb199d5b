"""The numerical settings do what they say: each test fails if its setting is ignored. One training step of a tiny
model on fixed images, with BatchNorm in eval mode so that batch composition alone does not change the numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastimagenet.config import load_config
from fastimagenet.optim import set_lr
from fastimagenet.plan import build_plan
from fastimagenet.runtime import resolve_runtime, seed_everything
from fastimagenet.schedules import lr_factor
from fastimagenet.train import accumulation_group, train_step
from fastimagenet.training_setup import build_training
from tests.conftest import TINY_RUN

# Plain SGD with a constant LR and no weight decay: an update is exactly -lr * gradient.
PLAIN = [*TINY_RUN, "loader.name=synthetic", "data.num_classes=4", "loader.synthetic_samples=16", "epochs=1",
         "schedule.stages=0,16,8", "optim.momentum=0", "optim.weight_decay=0", "optim.label_smoothing=0"]


def _run(*extra):
    cfg = load_config(None, [*PLAIN, *extra])
    seed_everything(0)  # the same initial weights for every run built here
    run = build_training(cfg, build_plan(cfg), resolve_runtime(cfg), with_val=False)
    run.train_module.eval()  # BatchNorm from running statistics: the same function of each image in any batch
    set_lr(run.optimizer, 1.0)
    return run


def _batch(count=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 16, 16, 3), dtype=torch.uint8, generator=generator).permute(0, 3, 1, 2)
    return images, torch.arange(count) % 4


def _params(run):
    return torch.cat([p.detach().flatten() for p in run.model.parameters()])


def test_accumulation_equals_one_big_batch():
    images, labels = _batch()
    big = _run()
    train_step(big, images, labels, accum_steps=1, update=True)
    accumulated = _run("optim.accum_steps=2")
    assert not train_step(accumulated, images[:4], labels[:4], accum_steps=2, update=False).isnan()
    assert torch.equal(_params(accumulated), _params(_run()))  # no update before the group ends
    train_step(accumulated, images[4:], labels[4:], accum_steps=2, update=True)
    assert torch.allclose(_params(accumulated), _params(big), atol=1e-6)


def test_a_last_group_cut_short_by_the_epoch_is_averaged_over_what_it_has():
    assert [accumulation_group(s, 5, 2) for s in range(5)] == [2, 2, 2, 2, 1]
    assert [accumulation_group(s, 6, 3) for s in range(6)] == [3, 3, 3, 3, 3, 3]
    images, labels = _batch(4)
    whole = _run()
    train_step(whole, images, labels, accum_steps=1, update=True)
    alone = _run("optim.accum_steps=2")  # the last group of an odd epoch: one micro-batch, averaged over one
    train_step(alone, images, labels, accum_steps=accumulation_group(4, 5, 2), update=True)
    assert torch.allclose(_params(alone), _params(whole), atol=1e-6)


def test_gradient_clipping_bounds_the_update():
    images, labels = _batch()
    free, clipped = _run(), _run("optim.grad_clip=0.01")
    before = _params(free)
    train_step(free, images, labels, 1, True)
    train_step(clipped, images, labels, 1, True)
    assert (before - _params(free)).norm() > 0.05  # the raw gradient is well above the clip
    assert (before - _params(clipped)).norm() == pytest.approx(0.01, rel=1e-3)  # lr 1: update = clipped gradient


def test_a_step_with_inf_gradients_is_skipped_and_the_scale_backs_off():
    """precision=fp16's GradScaler (fp16 needs CUDA: a CPU scaler stands in for it): a step whose gradients hold an
    inf leaves the weights as they were, even through clipping, and halves the scale; the next step updates them."""
    run = _run("optim.grad_clip=1.0")
    run.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    images, labels = _batch()
    before = _params(run)
    poison = run.model.fc.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    train_step(run, images, labels, 1, True)
    poison.remove()
    assert torch.equal(_params(run), before) and run.scaler.get_scale() == 512.0
    train_step(run, images, labels, 1, True)
    assert torch.isfinite(_params(run)).all() and not torch.equal(_params(run), before)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_is_the_loss_the_step_reports(smoothing):
    images, labels = _batch()
    run = _run(f"optim.label_smoothing={smoothing}")
    with torch.no_grad():
        expected = F.cross_entropy(run.forward(images), labels, label_smoothing=smoothing)
    assert train_step(run, images, labels, 1, True).item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():
        other = F.cross_entropy(run.forward(images), labels, label_smoothing=0.15)
    assert other.item() != pytest.approx(expected.item(), rel=1e-3)


def test_optimizer_settings_reach_the_optimizer_and_change_the_update():
    sgd = _run("optim.momentum=0.8", "optim.nesterov=true")
    assert (sgd.optimizer.defaults["momentum"], sgd.optimizer.defaults["nesterov"]) == (0.8, True)
    adamw = _run("optim.name=adamw", "optim.betas=0.8,0.95")
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.optimizer.defaults["betas"] == (0.8, 0.95)
    updates = []
    for extra in (["optim.momentum=0"], ["optim.momentum=0.9"], ["optim.momentum=0.9", "optim.nesterov=true"]):
        run = _run(*extra)
        before = _params(run)
        for seed in (1, 2):  # momentum shows from the second step on
            train_step(run, *_batch(seed=seed), 1, True)
        updates.append(_params(run) - before)
    assert not torch.allclose(updates[0], updates[1]) and not torch.allclose(updates[1], updates[2])


def test_zero_init_residual_and_channels_last_switch():
    def last_bn_weights(run):
        return torch.cat([block.bn2.weight.detach() for layer in (run.model.layer1, run.model.layer2)
                          for block in layer])

    assert not last_bn_weights(_run()).any()
    assert last_bn_weights(_run("model.zero_init_residual=false")).all()
    conv = _run().model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert _run("runtime.channels_last=false").model.conv1.weight.is_contiguous()


@pytest.mark.parametrize("kind", ["step", "cosine", "linear_ramp", "onecycle"])
def test_every_lr_schedule_warms_up_from_zero(kind):
    s = load_config(None, [f"schedule.lr={kind}", "schedule.warmup=0.2", "schedule.peak=0.2"]).schedule
    assert lr_factor(0.0, s) == 0.0
    assert lr_factor(0.1, s) == pytest.approx(0.5)
    assert lr_factor(0.2, s) == pytest.approx(1.0)


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    s = load_config(None, ["schedule.lr=step", "schedule.milestones=0.5,0.75", "schedule.gamma=0.5"]).schedule
    assert [lr_factor(p, s) for p in (0.4, 0.5, 0.7, 0.75, 0.99)] == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_normalisation_module_is_what_the_forward_applies():
    run = _run()
    images, _ = _batch(2)
    expected = run.model(((images.float() - run.train_module.mean) / run.train_module.std))
    assert torch.allclose(run.forward(images), expected)
    assert isinstance(run.train_module, nn.Module) and run.train_module.net is run.model
