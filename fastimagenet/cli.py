"""fastimagenet: train ResNets on ImageNet-style data (ImageFolder or .beton) as fast as the data pipeline allows.

Start with `fastimagenet demo` (a small run on the built-in Fashion-MNIST, CPU, minutes), then
`fastimagenet train --config RECIPE data.train=DIR data.val=DIR`; `fastimagenet recipes` lists the recipes.
Every command takes --help."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from fastimagenet import loaders
from fastimagenet.common.errors import Preempted, UserError

DATA_HOME = Path(os.environ.get("FASTIMAGENET_DATA", Path.home() / ".cache" / "fastimagenet"))


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    if getattr(args, "loader", None):
        extra.insert(0, f"loader.name={args.loader}")
    return extra


def cmd_train(args) -> None:
    from fastimagenet.config import load_config
    from fastimagenet.train import fit

    if args.resume == "auto":
        from fastimagenet.checkpoint import auto_resume

        cfg = load_config(args.config, _overrides(args))
        last = auto_resume(cfg)
        # no checkpoint yet: a start that died before its first checkpoint may have left files; begin again
        fit(cfg, last, overwrite=last is None)
        return
    if args.resume:
        from fastimagenet.checkpoint import resume_config

        if args.config or args.loader or args.overwrite:
            raise UserError("--resume continues a run with its saved config: drop --config/--loader/--overwrite")
        fit(*resume_config(Path(args.resume), args.overrides))
        return
    fit(load_config(args.config, _overrides(args)), overwrite=args.overwrite)


def cmd_export(args) -> None:
    from fastimagenet.export import export

    export(Path(args.run_dir), Path(args.out), args.checkpoint, args.ema, args.allow_blurpool)


def cmd_plot(args) -> None:
    from fastimagenet.plots import write_run_plot

    print(write_run_plot(Path(args.run_dir)))


def cmd_demo(args) -> None:
    from fastimagenet.config import load_config
    from fastimagenet.dataset_tools.fashion_mnist import CLASSES, prepare_fashion_mnist
    from fastimagenet.train import fit

    loader = load_config("demo_fashion_mnist", _overrides(args)).loader.name  # the recipe's, or --loader's
    # the data in the backend's own form, or image folders (each written once)
    own_form = loaders.demo_data(loader, DATA_HOME)
    if own_form:
        train, val = own_form
    else:
        root = prepare_fashion_mnist(DATA_HOME / "fashion-mnist")
        train, val = root / "train", root / "val"
    overrides = [f"data.train={train}", f"data.val={val}"]
    made_up = not loaders.reads(loader)  # a backend that reads no data makes up its images: it is told the classes
    if made_up:
        overrides.append(f"data.num_classes={len(CLASSES)}")
    if args.out_dir:
        overrides.append(f"runtime.out_dir={args.out_dir}")
    record = fit(load_config("demo_fashion_mnist", overrides + _overrides(args)), overwrite=args.overwrite)
    data = f"{loader} images (random: chance level)" if made_up else "Fashion-MNIST"
    print(f"demo: {data} val top-1 {record['val_top1']:.2%}")


def cmd_bench_loader(args) -> None:
    from fastimagenet.bench import bench_loaders, loader_table, print_result
    from fastimagenet.config import load_config

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("bench loader: --device cuda but torch sees no CUDA device on this machine; use --device "
                            "cpu")
    # `--baseline` with no value means the torchvision reference; no flag means no baseline.
    baselines = [] if args.baseline is None else list(dict.fromkeys(args.baseline or ["torchvision"]))
    names = list(dict.fromkeys(args.loader))
    not_loader = [item for item in args.overrides if not item.startswith("loader.")]
    if not_loader:
        raise UserError(f"bench loader: only loader.* settings apply here, not {', '.join(not_loader)}")
    options = dataclasses.replace(load_config(None, args.overrides).loader, name=names[0], workers=args.workers)
    results = []
    for result in bench_loaders(names, args.data, args.resolutions, args.batch_size, args.workers, args.device,
                                baselines, args.rounds, options, own_processes=True):
        print_result(result)
        results.append(result)
    print(loader_table(results, baselines))


def _resolutions(text: str) -> list[int]:
    """--resolutions: pixel counts separated by commas, e.g. 128,176,224."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixel counts separated by commas (e.g. 128,176,224), got "
                                         f"'{text}'") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"resolutions must be positive, got '{text}'")
    return values


def cmd_bench_train(args) -> None:
    from fastimagenet.bench import bench_train, print_result, train_table
    from fastimagenet.config import load_config

    results = []
    for result in bench_train(load_config(args.config, _overrides(args)), args.steps, args.rounds):
        print_result(result)
        results.append(result)
    print(train_table(results))


def cmd_make_data(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            raise UserError(f"{out}: not empty; new images would mix with what is there. Choose an empty or new "
                            "directory, or pass --force to replace its train/ and val/")
        import shutil

        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)
        (out / ".complete").unlink(missing_ok=True)
    if args.kind == "fashion-mnist":
        from fastimagenet.dataset_tools.fashion_mnist import prepare_fashion_mnist

        print(prepare_fashion_mnist(Path(args.out)))
    else:
        from fastimagenet.dataset_tools.synthetic_jpegs import make_jpeg_folder

        for split, per_class in (("train", args.per_class), ("val", max(1, args.per_class // 5))):
            make_jpeg_folder(Path(args.out) / split, args.classes, per_class, args.size, seed=int(split == "val"))
        print(f"{args.out}/{{train,val}}: {args.classes} classes of ~{args.size} px JPEGs")


def cmd_convert(args) -> None:
    from fastimagenet.dataset_tools.convert import ConvertOptions, convert, read_sidecar

    options = ConvertOptions(write_mode=args.write_mode, max_resolution=args.max_resolution,
                             jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                             smart_threshold=args.smart_threshold, workers=args.workers, subset=args.subset,
                             strict=args.strict, force=args.force)
    if args.format == "shards":
        from fastimagenet.dataset_tools.shards import convert_to_shards, read_index

        if args.write_mode != "jpg":
            raise UserError(f"--write-mode {args.write_mode}: shards store JPEGs (the write modes are for .beton "
                            "files); leave out --write-mode with --format shards")

        classes = read_index(args.classes_from).classes if args.classes_from else None
        reports = convert_to_shards(args.src, args.dst, options, classes, args.shard_size_mb, args.shard_order)
    else:
        classes = read_sidecar(args.classes_from)["classes"] if args.classes_from else None
        reports = convert(args.src, args.dst, options, classes)
    for report in reports:
        print(report.summary())


def cmd_inspect(args) -> None:
    from fastimagenet.dataset_tools.inspect_beton import format_inspection, inspect_beton

    info = inspect_beton(args.file, verify=args.verify)
    print(format_inspection(info))
    if "damaged_records" in info:
        raise UserError(f"{args.file}: damaged tables: {info['damaged_records']} bad records (the first listed "
                        "above); write it again with `fastimagenet convert --force`, or copy it again")
    if args.verify and not info["verified"]:
        raise UserError(f"{args.file}: some records do not decode (listed above); re-run `fastimagenet convert`")


def cmd_recipes(args) -> None:
    if not args.name:
        from fastimagenet.recipes import list_recipes, markdown_table, text_listing

        recipes = list_recipes()
        print(markdown_table(recipes) if args.markdown else text_listing(recipes))
        return
    from fastimagenet.config import load_config
    from fastimagenet.plan import build_plan

    cfg = load_config(args.name, args.overrides)
    o = cfg.optim
    print(f"{args.name}: {cfg.model.arch}{' + BlurPool' if cfg.model.blurpool else ''}, {cfg.epochs} epochs, "
          f"{o.name} lr {o.lr:g} per 256 images ({cfg.schedule.lr}), weight decay {o.weight_decay:g}, "
          f"label smoothing {o.label_smoothing:g}, EMA {o.ema_decay or 'off'}, flip TTA {cfg.runtime.tta_flip}")
    print(build_plan(cfg).table())


def cmd_lr_find(args) -> None:
    from fastimagenet.config import load_config
    from fastimagenet.lr_find import check_plot_path, lr_range_test, save_plot

    cfg = load_config(args.config, _overrides(args))
    # --out wins; else the run directory the config names; else runs/, like a run's own default
    out = check_plot_path(args.out or Path(cfg.runtime.out_dir or "runs") / "lr_find.png")
    result = lr_range_test(cfg, args.steps, args.min_lr, args.max_lr)
    save_plot(result, out, f"{args.config or 'defaults'} ({cfg.model.arch}, {cfg.loader.name})")
    end = "stopped early: the loss diverged" if result.stopped_early else "reached --max-lr"
    print(f"lr-find: {len(result.lrs)} steps at {result.resolution} px, batch {result.batch_size}; {end}")
    print(f"plot: {out}")
    print(f"suggested LR: optim.lr={result.suggested_lr:.3g} (per 256 images; "
          f"{result.suggested_lr * result.batch_size / 256:.3g} at batch {result.batch_size})")


def cmd_eval(args) -> None:
    from fastimagenet.eval_command import EvalOptions, report, run_eval

    result = run_eval(EvalOptions(source=args.source, data=args.data, loader=args.loader or "",
                                  resolution=args.resolution, crop_ratio=args.crop_ratio, tta_flip=args.tta_flip,
                                  batch_size=args.batch_size, checkpoint=args.checkpoint or "", ema=args.ema,
                                  arch=args.arch or "", per_class=args.per_class or "", overrides=args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(result))


def cmd_show_batch(args) -> None:
    from fastimagenet.config import load_config
    from fastimagenet.show_batch import show_batch

    split = "val" if args.val else "train"
    cfg = load_config(None, [f"loader.name={args.loader}", f"data.{split}={args.data}", *args.overrides])
    out = Path(args.out or f"runs/show-batch-{args.loader}-{split}-{args.resolution}px.png")
    print(show_batch(cfg, out, not args.val, args.resolution, args.batch_size))


def cmd_selfcheck(args) -> None:
    from fastimagenet.selfcheck import run_selfcheck

    print(f"{'check':<44} {'result':<8} figure")
    checks = run_selfcheck(Path(args.json))
    failed = [check.name for check in checks if check.result == "FAILED"]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks ok or skipped; JSON: {args.json}")
    if failed:
        raise UserError(f"selfcheck: {len(failed)} checks failed: {', '.join(failed)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastimagenet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order `--help` lists them.
    for add_command in (_add_train, _add_export, _add_plot, _add_demo, _add_bench, _add_make_data, _add_convert,
                        _add_inspect, _add_recipes, _add_eval, _add_show_batch, _add_selfcheck, _add_lr_find):
        add_command(sub)
    return _show_defaults(parser)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """`train`: a run from a recipe, or the continuation of one (--resume)."""
    train = sub.add_parser("train", help="Train a ResNet from a recipe plus key=value overrides.")
    train.add_argument("--config", help="A recipe: a YAML path or the name of a file in configs/ (e.g. rn50_18ep).")
    train.add_argument("--loader", choices=loaders.NAMES, help="Loader backend (same as loader.name=NAME).")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="Config overrides, e.g. data.train=/data/train epochs=16 optim.lr=0.5.")
    train.add_argument("--resume", metavar="RUN_DIR|auto",
                       help="Continue the run in RUN_DIR from its last checkpoint (the end of its last finished "
                            "epoch, or where a stop signal stopped it), with its saved config. 'auto': with the "
                            "whole command line, continue the run in runtime.out_dir if it has a checkpoint, else "
                            "start it (what a restart repeats). "
                            "key=value overrides may change only where and how it runs (runtime.device, "
                            "runtime.precision, runtime.compile, loader.*, the data.train/data.val paths, ...), "
                            "never what it trains (epochs, schedule.*, optim.*, model.*: an error).")
    train.add_argument("--overwrite", action="store_true",
                       help="runtime.out_dir may hold a previous run: its files are deleted before this run starts "
                            "(without it, such a directory is an error).")
    train.set_defaults(func=cmd_train)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """`export`: a run's model as a torch.export program or a state_dict."""
    export = sub.add_parser("export", help="Write a run's model for use outside fastimagenet (OUT.pt2: a "
                                           "self-contained torch.export program; OUT.pt: a state_dict), with "
                                           "OUT.json describing classes, input normalisation and resolution.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="The run directory (holds best.pt, last.pt).")
    export.add_argument("out", metavar="OUT", help="OUT.pt2: network + normalisation as a torch.export program that "
                                                   "runs without fastimagenet; OUT.pt: a plain state_dict. Written "
                                                   "atomically, with OUT.json beside it.")
    export.add_argument("--checkpoint", choices=("best", "last", "interrupted"), default="best",
                        help="Which checkpoint: the best epoch by val top-1 (default; with --ema, the epoch best by "
                             "the EMA's val top-1), the last finished epoch, or the weights saved on Ctrl-C.")
    export.add_argument("--ema", action="store_true", help="Export the EMA weights (runs with optim.ema_decay>0).")
    export.add_argument("--allow-blurpool", action="store_true",
                        help="Write OUT.pt for a BlurPool model anyway: it loads only into "
                             "fastimagenet.models.build_model(..., blurpool=True), not into torchvision's ResNet.")
    export.set_defaults(func=cmd_export)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    """`plot`: a run's curves as run.png."""
    plot = sub.add_parser("plot", help="Draw RUN_DIR/run.png: loss, accuracy, LR, resolution/batch and speed.")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="The run directory (holds metrics.jsonl, config.yaml).")
    plot.set_defaults(func=cmd_plot)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """`demo`: the built-in Fashion-MNIST run."""
    demo = sub.add_parser("demo", help="Train a small ResNet on the built-in Fashion-MNIST dataset (CPU, minutes).")
    demo.add_argument("--loader", choices=loaders.NAMES, help="Loader backend for the demo (default torchvision).")
    demo.add_argument("--out-dir", help="Run directory, the same as runtime.out_dir=DIR (default "
                                        "runs/<arch>-<timestamp>).")
    demo.add_argument("--overwrite", action="store_true",
                      help="The run directory may hold a previous run: its files are deleted first.")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="Config overrides on top of the demo recipe.")
    demo.set_defaults(func=cmd_demo)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """`bench loader` and `bench train`: images/s of a loader alone, and of training fed by it."""
    bench = sub.add_parser("bench", help="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    _add_bench_loader(bench_sub)
    _add_bench_train(bench_sub)


def _add_bench_loader(bench_sub: argparse._SubParsersAction) -> None:
    """`bench loader`: images/s of a loader alone."""
    bl = bench_sub.add_parser("loader", help="Images/s of loaders alone (median of timed passes), against baselines: one JSON line per backend and resolution, then a table.")
    bl.add_argument("--loader", choices=loaders.NAMES, nargs="+", required=True,
                    help="Loader backend(s) to measure; several are measured in one run, taking turns.")
    bl.add_argument("--data", default="", help="The images: an ImageFolder dir, a .beton converted from one, or a "
                                               "sharded split (a folder or s3:// prefix); each backend and baseline "
                                               "reads them in its own form (a folder's images are converted to a "
                                               "temporary .beton for ffcv; backends that read shards read them as "
                                               "they are).")
    bl.add_argument("--resolutions", "--resolution", type=_resolutions, default="176", metavar="PX[,PX...]",
                    help="Output resolution(s) in pixels, e.g. 128,176,224: each is measured in turn, every "
                         "pipeline rebuilt for it.")
    bl.add_argument("--batch-size", type=int, default=64, help="Images per batch.")
    bl.add_argument("--workers", type=int, default=0, help="Worker processes/threads (0: the CPUs this process may use).")
    bl.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="Where batches are delivered.")
    bl.add_argument("--rounds", type=int, default=3,
                    help="Timed passes per pipeline, taken in turns after one untimed pass each; medians reported.")
    bl.add_argument("--baseline", nargs="*", choices=("raw", "decode", "folder", *loaders.NAMES),
                    help="Also measure, in the same run: 'raw' (each backend's own library used by hand), a "
                         "backend's name (that backend's library used by hand on the same images: 'torchvision' is "
                         "the plain ImageFolder pipeline, the default when the flag has no value; 'ffcv' reads a "
                         ".beton, converted from the folder into a temporary directory when needed), 'decode' "
                         "(the images decoded whole with PIL by as many workers, no crop or resize: the cost of "
                         "decoding them) and/or 'folder' (with sharded --data: each backend on the image folder the "
                         "shards were written from). Every pipeline runs in a process of its own. JSON keys: "
                         "<baseline>_images_per_s, ratio_vs_<baseline> (of the medians) and "
                         "round_ratios_vs_<baseline> (within each round); then a table.")
    bl.add_argument("overrides", nargs="*", metavar="loader.KEY=VALUE",
                    help="Loader settings as in `train`, e.g. loader.cache_gb=0.05 loader.shuffle_buffer=512 (a node "
                         "cache smaller than the shards a shuffle buffer spans makes every pass fetch them again "
                         "from s3://); given before --loader and --baseline, whose lists would take them.")
    bl.set_defaults(func=cmd_bench_loader)


def _add_bench_train(bench_sub: argparse._SubParsersAction) -> None:
    """`bench train`: images/s of the training step fed by a loader, against the synthetic loader."""
    bt = bench_sub.add_parser(
        "train", help="Images/s of the whole training step (forward, backward, optimizer) fed by a loader, and fed "
                      "by the synthetic loader in the same run, per distinct (resolution, batch) of the recipe: "
                      "one JSON line each (loader_efficiency: their ratio), then a table.")
    bt.add_argument("--loader", choices=loaders.NAMES, required=True, help="Loader backend to measure.")
    bt.add_argument("--config", help="A recipe: a YAML path or the name of a file in configs/ (default: the "
                                     "built-in defaults); its model, precision, compile and schedule are used.")
    bt.add_argument("--steps", type=int, default=50,
                    help="Timed training steps per pass; keep it well above the loader's workers, as "
                         "each pass starts a new epoch of the loader.")
    bt.add_argument("--rounds", type=int, default=3,
                    help="Timed passes per pipeline, taken in turns after one untimed warm-up pass "
                         "each (compiles happen there); medians reported.")
    bt.add_argument("overrides", nargs="*", metavar="key=value",
                    help="Config overrides, e.g. data.train=/data/train loader.workers=8 runtime.device=cuda.")
    bt.set_defaults(func=cmd_bench_train)


def _add_make_data(sub: argparse._SubParsersAction) -> None:
    """`make-data`: a built-in dataset written as an ImageFolder tree."""
    make = sub.add_parser("make-data", help="Write a built-in dataset as an ImageFolder tree (train/ and val/).")
    make.add_argument("kind", choices=("fashion-mnist", "jpegs"),
                      help="fashion-mnist: Debian's Fashion-MNIST as JPEGs; jpegs: synthetic ImageNet-like JPEGs.")
    make.add_argument("out", help="Output directory.")
    make.add_argument("--classes", type=int, default=10, help="jpegs: number of classes.")
    make.add_argument("--per-class", type=int, default=50, help="jpegs: train images per class (val gets 1/5).")
    make.add_argument("--size", type=int, default=400, help="jpegs: typical image side in pixels.")
    make.add_argument("--force", action="store_true",
                      help="Write into a non-empty OUT: its train/ and val/ are deleted first (fashion-mnist: "
                           "the whole of OUT is replaced). Without it a non-empty OUT is an error.")
    make.set_defaults(func=cmd_make_data)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    """`convert`: ImageFolder images to FFCV .beton files."""
    from fastimagenet.dataset_tools.convert import WRITE_MODES, ConvertOptions  # numpy + PIL only: a light import
    from fastimagenet.dataset_tools.shards import DEFAULT_SHARD_MB, SHARD_ORDERS
    conv = sub.add_parser("convert", help="Write ImageFolder images to FFCV .beton files (for --loader ffcv) "
                                                 "or to tar shards, locally or in a bucket (--format shards).")
    conv.add_argument("src", metavar="SRC", help="An ImageFolder split (SRC/<class>/<image>), or a dataset root "
                                                 "holding train/ and val/.")
    conv.add_argument("dst", metavar="DST", help="The .beton file for a split; for a dataset root, a directory that "
                                                 "gets train.beton and val.beton (each with a .json class sidecar).")
    conv.add_argument("--format", choices=("beton", "shards"), default="beton",
                      help="beton: FFCV .beton files (for --loader ffcv); shards: WebDataset-layout tar shards with "
                           "an index.json and DALI index files, in a folder or at an s3://bucket/prefix DST (for "
                           "--loader torchvision and dali; DST/train and DST/val for a dataset root).")
    conv.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_MB,
                      help="shards: the size a shard is closed at, in MB (the default is in the 100 MB - 1 GB range "
                           "WebDataset suggests).")
    conv.add_argument("--shard-order", choices=SHARD_ORDERS, default="shuffled",
                      help="shards: the samples' order, shuffled once (so each shard mixes many classes) or the "
                           "folder's (by class, then name).")
    conv.add_argument("--write-mode", choices=WRITE_MODES, default=ConvertOptions.write_mode,
                      help="How images are stored: jpg (compact, decoded while loading), raw (pixels: fastest to "
                           "load, ~10x larger), proportion (JPEG for a random --compress-probability share), smart "
                           "(JPEG only for images whose pixels exceed --smart-threshold bytes).")
    conv.add_argument("--max-resolution", type=int, default=ConvertOptions.max_resolution,
                      help="Longer side in pixels; larger images are scaled down, smaller ones kept as they are.")
    conv.add_argument("--jpeg-quality", type=int, default=ConvertOptions.jpeg_quality,
                      help="JPEG quality (1-100) of stored images.")
    conv.add_argument("--compress-probability", type=float,
                      default=ConvertOptions.compress_probability,
                      help="proportion mode: the share of images stored as JPEG (the rest raw).")
    conv.add_argument("--smart-threshold", type=int, default=ConvertOptions.smart_threshold,
                      help="smart mode: store an image as JPEG when its raw pixels exceed this many bytes.")
    conv.add_argument("--workers", type=int, default=0, help="Writer processes (0: one per CPU core).")
    conv.add_argument("--subset", type=int, default=0, help="Only the first N images of each class, for trials.")
    conv.add_argument("--classes-from", metavar="TRAIN.beton",
                      help="Label a split with the classes of an already converted train split (its sidecar; with "
                           "--format shards, the train split's folder or s3:// prefix).")
    conv.add_argument("--strict", action="store_true",
                      help="Stop with an error on an unreadable image instead of skipping and reporting it.")
    conv.add_argument("--force", action="store_true", help="Overwrite existing output files.")
    conv.set_defaults(func=cmd_convert)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    """`inspect`: what a .beton file holds."""
    insp = sub.add_parser("inspect", help="Show what a .beton file holds: images, classes, fields, storage, sizes.")
    insp.add_argument("file", metavar="FILE.beton", help="The file to inspect.")
    insp.add_argument("--verify", action="store_true",
                      help="Also decode every stored image and check every label; exit status 2 if any fails.")
    insp.set_defaults(func=cmd_inspect)


def _add_recipes(sub: argparse._SubParsersAction) -> None:
    """`recipes`: the recipes in configs/, or one resolved."""
    recipes = sub.add_parser("recipes", help="List the recipes in configs/, or show one recipe's resolved plan.")
    recipes.add_argument("name", nargs="?", help="A recipe to resolve: prints its settings and schedule table.")
    recipes.add_argument("overrides", nargs="*", metavar="key=value",
                         help="Overrides applied to NAME before printing, e.g. epochs=40.")
    recipes.add_argument("--markdown", action="store_true", help="Print the listing as the README's Markdown table.")
    recipes.set_defaults(func=cmd_recipes)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """`eval`: a run, checkpoint or exported model scored on a split."""
    ev = sub.add_parser("eval", help="Score a run, a checkpoint or an exported model on a split, at any resolution "
                                     "or crop; prints a line and one JSON line.")
    ev.add_argument("source", metavar="SOURCE", help="A run directory, a checkpoint (.pt), or an exported "
                                                     "state_dict (with --arch).")
    ev.add_argument("--data", required=True, help="The split to score: an ImageFolder dir (a .beton for ffcv).")
    ev.add_argument("--loader", choices=loaders.NAMES, help="Loader backend (default: the run's).")
    ev.add_argument("--resolution", type=int, default=0, help="Eval resolution in pixels (default: the run's).")
    ev.add_argument("--crop-ratio", type=float, default=0.0,
                    help="Centre crop side / shorter image side (default: the run's data.crop_ratio).")
    ev.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                    help="Score the image plus its mirror (default: the run's runtime.tta_flip).")
    ev.add_argument("--batch-size", type=int, default=0, help="Global eval batch (default: the run's).")
    ev.add_argument("--checkpoint", choices=("best", "last", "interrupted"),
                    help="For a run directory: which checkpoint (default: best.pt when there is one, else last.pt).")
    ev.add_argument("--ema", action="store_true", help="Score the EMA weights of the checkpoint.")
    ev.add_argument("--arch", help="Architecture of an exported state_dict (a checkpoint knows its own).")
    ev.add_argument("--per-class", metavar="FILE.csv", help="Also write per-class top-1 (class,images,top1).")
    ev.add_argument("overrides", nargs="*", metavar="key=value",
                    help="Config overrides on top of the run's, e.g. runtime.device=cpu loader.workers=2.")
    ev.set_defaults(func=cmd_eval)


def _add_show_batch(sub: argparse._SubParsersAction) -> None:
    """`show-batch`: one batch as a loader delivers it, drawn as a PNG."""
    show = sub.add_parser("show-batch", help="Draw one batch exactly as a loader delivers it (after crop and flip), "
                                             "labelled with its class names, as a PNG.")
    show.add_argument("--loader", choices=loaders.NAMES, default="torchvision",
                      help="Loader backend (default: %(default)s).")
    show.add_argument("--data", required=True, help="The split to read: an ImageFolder dir (a .beton for ffcv).")
    show.add_argument("--resolution", type=int, default=224, help="Output side in pixels (default: %(default)s).")
    show.add_argument("--batch-size", type=int, default=16, help="Images in the grid (default: %(default)s).")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--train", action="store_true", help="Training augmentation: random crop + flip (default).")
    which.add_argument("--val", action="store_true", help="Evaluation: resize + centre crop.")
    show.add_argument("--out", help="PNG to write (default: runs/show-batch-LOADER-SPLIT-RESpx.png).")
    show.add_argument("overrides", nargs="*", metavar="key=value",
                      help="Config overrides, e.g. data.scale=0.35,1 loader.workers=1.")
    show.set_defaults(func=cmd_show_batch)


def _add_selfcheck(sub: argparse._SubParsersAction) -> None:
    """`selfcheck`: the checks for a new machine."""
    check = sub.add_parser("selfcheck", help="The first minutes on a new machine: what is installed, the GPU path "
                                             "(no host syncs in compiled bf16/fp16 epochs, loaders that never make "
                                             "the host wait, the fp16 first step) and bench train per backend, on "
                                             "JPEGs it writes itself; a table, and the same as JSON.")
    check.add_argument("--json", default="selfcheck.json", help="Where to write the results as JSON.")
    check.set_defaults(func=cmd_selfcheck)


def _add_lr_find(sub: argparse._SubParsersAction) -> None:
    """`lr-find`: the LR range test."""
    lr_find = sub.add_parser("lr-find", help="LR range test on a recipe: plots loss vs LR and suggests optim.lr "
                                             "(writes only the plot, no run directory or checkpoint).")
    lr_find.add_argument("--config", help="A recipe: a YAML path or the name of a file in configs/.")
    lr_find.add_argument("--loader", choices=loaders.NAMES, help="Loader backend (same as loader.name=NAME).")
    lr_find.add_argument("--steps", type=int, default=100, help="Optimizer steps in the sweep (at least 10).")
    lr_find.add_argument("--min-lr", type=float, default=1e-4, help="First LR, per 256 images like optim.lr.")
    lr_find.add_argument("--max-lr", type=float, default=10.0, help="Last LR, per 256 images like optim.lr.")
    lr_find.add_argument("--out", help="Where to write the PNG plot of loss vs LR (default: RUNTIME.OUT_DIR/lr_find.png "
                                       "when runtime.out_dir is set, else runs/lr_find.png).")
    lr_find.add_argument("overrides", nargs="*", metavar="key=value",
                         help="Config overrides, e.g. data.train=/data/train optim.batch_size=256.")
    lr_find.set_defaults(func=cmd_lr_find)


class _DefaultsHelp(argparse.HelpFormatter):
    """Help lines end with the option's default, unless it says it already or there is none worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, "", [], argparse.SUPPRESS)
                and "default" not in text.lower()):
            text = text[:-1] + " (default: %(default)s)." if text.endswith(".") else text + " (default: %(default)s)"
        return text


def _show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every parser and sub-parser shows defaults (set after building, so each add_parser call stays plain)."""
    parser.formatter_class = _DefaultsHelp
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse takes positionals in one run, so `key=value` overrides after an option (`eval RUN --data D
    runtime.device=cpu`) would be refused: those are added to the command's overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    # Each line is out as soon as it is printed, also into a pipe or a log file (Slurm's, `| tee`), where Python
    # would otherwise hold epochs of output in its buffer.
    if callable(getattr(sys.stdout, "reconfigure", None)):
        sys.stdout.reconfigure(line_buffering=True)
    args = parse(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe (`| head`) is reported here, not at exit
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whoever read our output (e.g. `| head`) stopped reading: not a failure. Point stdout at /dev/null so the
        # interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Preempted as exc:  # the run said where its checkpoint is
        return exc.exit_code
    except KeyboardInterrupt:  # outside training (which stops on Ctrl-C by itself, see Preempted)
        print("interrupted", file=sys.stderr)
        return 130
    return 0
