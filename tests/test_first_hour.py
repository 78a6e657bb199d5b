"""A new user's slips (issue 15): no silent wrong data, no runs mixed together, and a clear message for each.
Exports that work outside fastimagenet are tested in test_export.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from fastimagenet import loaders
from fastimagenet import cli
from fastimagenet import train as train_module
from fastimagenet.checkpoint import CheckpointKeeper, check_resume_changes
from fastimagenet.cli import main
from fastimagenet.common.errors import Preempted, UserError
from fastimagenet.config import differing_keys, from_saved, load_config
from fastimagenet.dataset_tools.scan import scan_image_folder
from fastimagenet.metrics import read_metrics
from fastimagenet.plan import build_plan
from fastimagenet.plots import _summary
from tests.conftest import LEARNING_RUN, TINY_RUN, make_spec

ONE_STAGE = ["schedule.stages=0,32,16"]


def _train_args(data, out, *extra):
    return ["train", "--loader", "torchvision", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
            f"runtime.out_dir={out}", *LEARNING_RUN, *ONE_STAGE, *extra]


@pytest.fixture(scope="module")
def finished_run(jpeg_dataset, tmp_path_factory):
    """A finished 2-epoch run with an EMA and the 2 best epochs kept. Tests only read it (or copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_train_args(jpeg_dataset, out, "epochs=2", "optim.ema_decay=0.9", "runtime.keep_best=2")) == 0
    return out


# ---------------------------------------------------------------- 1: a forgotten data path names its key
@pytest.mark.parametrize("name", ["torchvision", "dali", "ffcv"])
def test_an_unset_data_path_names_the_key_for_every_backend(name):
    """Checked before a backend sees the path (so also where the backend's package is missing)."""
    with pytest.raises(UserError, match=r"no train data given: set data\.train"):
        loaders.build_loader(name, make_spec("", train=True, name=name))
    with pytest.raises(UserError, match=r"no validation data given: set data\.val"):
        loaders.build_loader(name, make_spec("", train=False, name=name))


def test_train_inside_a_class_folder_without_data_val_is_an_error_not_a_validation_on_it(jpeg_dataset, monkeypatch,
                                                                                          capsys):
    """An unset data.val is an error naming it, not a validation on the current directory (here: the train split
    itself)."""
    monkeypatch.chdir(jpeg_dataset / "train")
    before = sorted(os.listdir("."))
    args = ["train", f"data.train={jpeg_dataset / 'train'}", *TINY_RUN, *ONE_STAGE, "epochs=1"]
    assert main(args) == 2
    assert "no validation data given: set data.val" in capsys.readouterr().err
    assert sorted(os.listdir(".")) == before  # no runs/<arch>-<time>/ left behind either


def test_lr_find_and_bench_name_their_missing_data_setting(tmp_path, capsys):
    assert main(["lr-find", *TINY_RUN, "--steps", "10", "--out", str(tmp_path / "lr.png")]) == 2
    assert "no train data given: set data.train" in capsys.readouterr().err
    assert main(["bench", "loader", "--loader", "torchvision"]) == 2
    assert "no train data given: set --data" in capsys.readouterr().err


def test_a_beton_given_to_a_folder_backend_suggests_the_ffcv_loader(tmp_path, capsys):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"\0")
    with pytest.raises(UserError, match=r"train\.beton: a \.beton file is read by the ffcv loader: use --loader ffcv"):
        scan_image_folder(beton)  # what the torchvision and dali backends read folders with
    assert main(["train", f"data.train={beton}", f"data.val={beton}", *TINY_RUN, *ONE_STAGE, "epochs=1",
                 f"runtime.out_dir={tmp_path / 'run'}"]) == 2
    assert "use --loader ffcv" in capsys.readouterr().err


# ---------------------------------------------------------------- 2: one run per directory
def test_a_directory_holding_a_run_is_refused_and_overwrite_replaces_it(finished_run, jpeg_dataset, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert main(_train_args(jpeg_dataset, out, "epochs=1")) == 2
    err = capsys.readouterr().err
    assert "runtime.out_dir already holds a run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]  # untouched
    (out / "notes.txt").write_text("mine")
    assert main([*_train_args(jpeg_dataset, out, "epochs=1"), "--overwrite"]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [0]  # the new run alone, not appended to the old one
    assert not (out / "best-ema.pt").exists() and not (out / "best-epoch001.pt").exists()
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only a run's own files are cleared


def test_a_run_that_fails_before_training_leaves_no_directory(jpeg_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new"
    assert main(["train", f"data.train={jpeg_dataset / 'train'}", f"data.val={tmp_path / 'missing'}", *TINY_RUN,
                 *ONE_STAGE, "epochs=1", f"runtime.out_dir={out}"]) == 2
    assert "missing: data directory does not exist" in capsys.readouterr().err
    assert not out.exists()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory in the first step")

    monkeypatch.setattr("fastimagenet.train.train_one_epoch", fail)
    with pytest.raises(RuntimeError, match="first step"):
        main(_train_args(jpeg_dataset, out, "epochs=1"))
    assert not out.exists()  # made for training, removed when the first epoch failed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="first step"):
        main(_train_args(jpeg_dataset, "", "epochs=1"))  # the default runs/<arch>-<time>/ too
    assert not list((tmp_path / "runs").glob("*"))


# ---------------------------------------------------------------- 3: resume does not rewrite history
def test_resume_refuses_overrides_that_change_the_runs_past(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "'epochs' (2 -> 3) would change its past" in err and "start a new run" in err
    for override in ("optim.lr=0.1", "schedule.lr=cosine", "model.width=16", "data.scale=0.5,1", "runtime.seed=1"):
        assert main(["train", "--resume", str(finished_run), override]) == 2
        assert f"'{override.split('=')[0]}'" in capsys.readouterr().err
    # where and how it runs may change: these pass the check and meet the next one
    assert main(["train", "--resume", str(finished_run), "runtime.device=cpu", "loader.workers=2",
                 "runtime.compile=false", f"data.val={finished_run}"]) == 2
    assert "already finished its 2 epochs" in capsys.readouterr().err


def test_a_crashed_run_resumes_with_the_overrides_it_may_take(jpeg_dataset, tmp_path, monkeypatch, capsys):
    """A run that died in epoch 1 goes on with another val folder and one best epoch kept: both show in what the
    resumed epochs write, and config.yaml records them."""
    out = tmp_path / "run"
    fit_epoch = train_module.train_one_epoch

    def dies_in_epoch_1(run, row, *args):
        if row.epoch == 1:
            raise KeyboardInterrupt  # no stop handling: what a crash leaves is epoch 0's checkpoint
        return fit_epoch(run, row, *args)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_one_epoch", dies_in_epoch_1)
        assert main(_train_args(jpeg_dataset, out, "epochs=3", "runtime.keep_best=2", "schedule.stages=0,16,32",
                                "data.val_resolution=16")) == 130
    fewer = tmp_path / "val"  # 2 images of each class instead of 8
    for path in sorted((jpeg_dataset / "val").glob("*/img_000[01].jpg")):
        (fewer / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, fewer / path.parent.name)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), f"data.val={fewer}", "runtime.keep_best=1"]) == 0
    assert "(resuming at epoch 1)" in capsys.readouterr().out
    assert [(r["epoch"], r["val_images"]) for r in read_metrics(out)] == [(0, 32), (1, 8), (2, 8)]
    assert len(list(out.glob("best-epoch*.pt"))) == 1
    saved = from_saved(out / "config.yaml")
    assert (saved.data.val, saved.runtime.keep_best, saved.epochs) == (str(fewer), 1, 3)


def test_the_difference_helper_lists_every_key_that_differs():
    saved, other = load_config(), load_config(overrides=["epochs=3", "loader.name=synthetic", "runtime.device=cpu"])
    assert [key for key, _, _ in differing_keys(saved, other)] == ["epochs", "loader.name", "runtime.device"]
    with pytest.raises(UserError, match="'epochs' \\(16 -> 3\\)"):
        check_resume_changes(saved, other, "RUN")
    check_resume_changes(saved, load_config(overrides=["loader.name=synthetic", "runtime.device=cpu"]), "RUN")


# ---------------------------------------------------------------- 4: make-data never mixes datasets
def test_make_data_refuses_a_non_empty_target_unless_forced(tmp_path, capsys):
    out = tmp_path / "data"
    small = ["--per-class", "1", "--size", "24"]
    assert main(["make-data", "jpegs", str(out), "--classes", "3", *small]) == 0
    assert main(["make-data", "jpegs", str(out), "--classes", "2", *small]) == 2
    err = capsys.readouterr().err
    assert "data: not empty" in err and "--force" in err
    assert sorted(p.name for p in (out / "train").iterdir()) == ["class_00", "class_01", "class_02"]
    assert main(["make-data", "jpegs", str(out), "--classes", "2", *small, "--force"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["class_00", "class_01"]  # replaced, not mixed


def test_make_data_writes_the_classes_images_and_sizes_it_prints(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["make-data", "jpegs", str(out), "--classes", "3", "--per-class", "10", "--size", "40"]) == 0
    assert capsys.readouterr().out.strip() == f"{out}/{{train,val}}: 3 classes of ~40 px JPEGs"
    for split, per_class in (("train", 10), ("val", 2)):  # val gets a fifth
        assert sorted(p.name for p in (out / split).iterdir()) == ["class_00", "class_01", "class_02"]
        for folder in (out / split).iterdir():
            assert len(list(folder.iterdir())) == per_class
            for path in folder.iterdir():
                with Image.open(path) as image:
                    assert image.format == "JPEG" and image.mode == "RGB"
                    assert all(30 <= side <= 50 for side in image.size)  # ~40 px: within 25%
    assert (out / "train/class_00/img_0000.jpg").read_bytes() != (out / "val/class_00/img_0000.jpg").read_bytes()


# ---------------------------------------------------------------- 6: the EMA's own best; no stale interrupted.pt
def test_the_keeper_ranks_the_ema_on_its_own_and_a_finished_epoch_retires_interrupted_pt(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_best=1)
    (tmp_path / "interrupted.pt").write_bytes(b"weights of a Ctrl-C")
    for epoch, (top1, ema_top1) in enumerate([(0.9, 0.75), (0.8, 1.0), (0.7, 0.9)]):
        keeper.rank(epoch, top1, ema_top1)
        keeper.save({"epoch": epoch}, epoch)
        assert not (tmp_path / "interrupted.pt").exists()
    assert torch.load(tmp_path / "best.pt")["epoch"] == 0
    assert torch.load(tmp_path / "best-ema.pt")["epoch"] == 1  # the raw model's best epoch had a worse EMA
    assert keeper.ema_best == (1.0, 1)


def test_export_ema_best_takes_the_epoch_best_for_the_ema(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    records = read_metrics(run)
    best_ema = max(records, key=lambda r: (r["ema_val_top1"], -r["epoch"]))["epoch"]
    assert torch.load(run / "best-ema.pt", weights_only=False)["epoch"] == best_ema
    assert main(["export", str(run), str(tmp_path / "ema.pt"), "--ema"]) == 0
    assert json.loads((tmp_path / "ema.pt.json").read_text())["source"]["checkpoint"] == "best-ema.pt"
    # a run from before best-ema.pt: the kept checkpoint with the best ema_val_top1 in metrics.jsonl
    (run / "best-ema.pt").unlink()
    for r in records:
        r["ema_val_top1"], r["val_top1"] = (1.0, 0.0) if r["epoch"] == 0 else (0.0, 1.0)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["export", str(run), str(tmp_path / "ema.pt"), "--ema"]) == 0
    assert json.loads((tmp_path / "ema.pt.json").read_text())["source"]["epoch"] == 0


def test_export_last_takes_the_last_epoch(finished_run, tmp_path):
    assert main(["export", str(finished_run), str(tmp_path / "last.pt"), "--checkpoint", "last"]) == 0
    source = json.loads((tmp_path / "last.pt.json").read_text())["source"]
    assert (source["checkpoint"], source["epoch"]) == ("last.pt", 1)
    last = torch.load(finished_run / "last.pt", weights_only=False)["model"]
    exported = torch.load(tmp_path / "last.pt", weights_only=True)
    assert exported.keys() == last.keys() and all(torch.equal(exported[key], last[key]) for key in last)


# ---------------------------------------------------------------- 7: every slip gets a message, never a traceback
@pytest.mark.skipif(torch.cuda.is_available(), reason="the slip is asking for CUDA on a machine without it")
def test_bench_on_cuda_without_a_gpu_is_a_message(jpeg_dataset, capsys):
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--device", "cuda"]) == 2
    assert "--device cuda but torch sees no CUDA device" in capsys.readouterr().err


def test_bench_names_its_own_flags(jpeg_dataset, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "loader", "--loader", "torchvision", "--device", "gpu"])
    assert exit_.value.code == 2 and "invalid choice: 'gpu'" in capsys.readouterr().err
    assert main(["bench", "loader", "--loader", "synthetic", "--baseline"]) == 2
    assert "--baseline torchvision reads an ImageFolder: give it with --data" in capsys.readouterr().err
    assert main(["bench", "loader", "--loader", "torchvision", "--data", str(jpeg_dataset / "train"),
                 "--batch-size", "1000", "--workers", "1", "--rounds", "1"]) == 2
    assert "(lower --batch-size)" in capsys.readouterr().err


def test_output_cut_short_by_a_closed_pipe_is_not_a_traceback():
    """`fastimagenet recipes --markdown | head`: the reader goes away before we write."""
    process = subprocess.Popen([sys.executable, "-m", "fastimagenet", "recipes", "--markdown"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 0 and "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_a_bare_or_misspelt_key_or_value_gets_a_did_you_mean():
    with pytest.raises(UserError, match="unknown config key 'lr' — did you mean 'optim.lr'"):
        load_config(overrides=["lr=0.1"])
    with pytest.raises(UserError, match="unknown config key 'batch_size' — did you mean 'optim.batch_size'"):
        load_config(overrides=["batch_size=64"])
    with pytest.raises(UserError, match="got 'resnet19' — did you mean 'resnet18'"):
        load_config(overrides=["model.arch=resnet19"])


def test_ctrl_c_is_reported_once(monkeypatch, capsys):
    def reported(args):
        print("interrupted in epoch 3: weights saved to RUN/interrupted.pt", file=sys.stderr)
        raise Preempted(2)  # SIGINT

    monkeypatch.setattr(cli, "cmd_recipes", reported)
    assert main(["recipes"]) == 130
    assert capsys.readouterr().err == "interrupted in epoch 3: weights saved to RUN/interrupted.pt\n"  # alone

    def plain(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_recipes", plain)
    assert main(["recipes"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# ---------------------------------------------------------------- 8: consistency
def test_demo_recipe_scales_with_epochs_and_explicit_stages_say_they_count_epochs():
    cfg = load_config("demo_fashion_mnist")
    rows = build_plan(cfg).rows
    assert [r.resolution for r in rows] == [16, 16, 16, 20, 24, 28, 28, 28, 28, 28, 28]  # the recipe's comment says so
    # and it validates after the first 28 px epoch and the last
    assert [e for e in range(cfg.epochs) if train_module.validates(e, cfg.epochs, cfg.runtime.eval_every)] == [5, 10]
    assert [r.resolution for r in build_plan(load_config("demo_fashion_mnist", ["epochs=1"])).rows] == [16]
    with pytest.raises(UserError, match="explicit stages count epochs and do not scale with 'epochs'"):
        load_config(overrides=["epochs=2", "schedule.stages=0,128,256;4,160,256"])


def test_config_yaml_records_what_ran_and_still_round_trips(finished_run):
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["runtime"]["precision"] == "auto"  # what was asked for ...
    assert {k: saved["resolved"][k] for k in ("device", "precision", "compile", "processes")} == \
        {"device": "cpu", "precision": "fp32", "compile": False, "processes": 1}  # ... and what it became
    assert from_saved(finished_run / "config.yaml").epochs == 2


def test_help_speaks_to_users_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "fastimagenet demo" in top and "tests call" not in top
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    assert "(default: 100)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["bench", "loader", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 3)" in text and "(default: 176)" in text


def test_demo_takes_runtime_out_dir_like_train(monkeypatch):
    seen = {}
    monkeypatch.setattr("fastimagenet.dataset_tools.fashion_mnist.prepare_fashion_mnist", lambda out: out)
    monkeypatch.setattr("fastimagenet.dataset_tools.fashion_mnist.fashion_mnist_betons",
                        lambda out: (out / "t", out / "v"))
    monkeypatch.setattr("fastimagenet.train.fit", lambda cfg, overwrite=False: seen.update(
        out=cfg.runtime.out_dir, overwrite=overwrite) or {"val_top1": 0.5})
    assert main(["demo", "runtime.out_dir=A"]) == 0 and seen == {"out": "A", "overwrite": False}
    assert main(["demo", "--out-dir", "B", "--overwrite"]) == 0 and seen == {"out": "B", "overwrite": True}


def test_run_png_summary_numbers_the_best_epoch_both_ways(finished_run):
    cfg = from_saved(finished_run / "config.yaml")
    records = read_metrics(finished_run)
    best = max(records, key=lambda r: r["val_top1"])["epoch"]
    assert f"(epoch {best}, at {best + 1} on the x axes)" in _summary(records, records, cfg, build_plan(cfg))
