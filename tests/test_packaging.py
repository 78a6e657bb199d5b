"""The project as a library: a built wheel carries the recipes and trains from a fresh environment outside the
checkout, and the backend extras install what the loader registry asks for."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from fastimagenet import loaders
from fastimagenet.common.errors import UserError
from fastimagenet.config import CONFIGS_DIR, SOURCE_TREE, recipe_files
from fastimagenet.dataset_tools import object_store
from fastimagenet.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_backend_extras_install_what_the_registry_asks_for():
    """`pip install 'fastimagenet[dali]'` installs the packages the registry names when the dali backend is missing
    them, and so for every extra; the hints of the other backends name only base dependencies."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert set(extras) <= set(loaders.NAMES) | {"s3"}
    for name, backend in loaders._BACKENDS.items():
        named = {_requirement_name(word) for word in backend.install.split("pip install", 1)[1].split()}
        assert named == extras[name] if name in extras else named <= base, (name, backend.install)
    # s3:// data (any backend): the packages the object store's message names when boto3 is missing, and that extra
    named = {_requirement_name(word) for word in object_store.INSTALL_HINT.split("pip install", 1)[1].split()[:1]}
    assert named == extras["s3"] and "'fastimagenet[s3]'" in object_store.INSTALL_HINT


def test_the_checkout_reads_its_own_configs_and_a_missing_directory_is_named(tmp_path):
    assert SOURCE_TREE == ROOT and CONFIGS_DIR == ROOT / "configs"
    with pytest.raises(UserError, match=f"no recipes: {tmp_path / 'gone'} does not exist"):
        recipe_files(tmp_path / "gone")


def _borrowed_paths() -> list[str]:
    """This interpreter's import path beyond the standard library (the project's .venv: torch and the rest, and
    whatever .pth files add to it), less any entry that holds the project's own packages (the checkout itself)."""
    stdlib = Path(sysconfig.get_path("stdlib"))  # lib-dynload included
    return [entry for entry in sys.path if entry and Path(entry).is_dir() and not Path(entry).is_relative_to(stdlib)
            and not (Path(entry) / "fastimagenet").exists()]


def _run(command: list, cwd: Path, env: dict, timeout: float = 600) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_lists_the_recipes_and_trains(tmp_path):
    """What `pip install .` gives a user, checked where the checkout cannot help: the project's files (as a clean
    clone has them) are built into a wheel, installed without dependencies into a new venv outside the checkout,
    and run from a directory outside it. The venv borrows the dependencies of this environment (torch, ...) through
    a .pth path entry instead of downloading them again; the project itself is only the wheel's copy. Building uses
    pip's isolated build environment (setuptools from the package index or pip's cache), as a user's build does."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the project's files are those git tracks")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info where it runs
    for name in filter(None, files):
        if (ROOT / name).is_file():  # not a tracked file deleted in the work tree
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source], outside, env)
    [wheel] = (tmp_path / "dist").glob("fastimagenet-*.whl")
    contents = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert recipes and all(f"fastimagenet/configs/{name}.yaml" in contents for name in recipes)
    # the optional JPEG region decoder: where this machine built it for the checkout, the wheel has it too
    decoder = find_spec("fastimagenet.loaders._jpeg_roi") is not None
    assert any(re.fullmatch(r"fastimagenet/loaders/_jpeg_roi\..*\.so", name) for name in contents) or not decoder
    # one name in site-packages: loaders/ and dataset_tools/ install inside the package
    assert {name.split("/")[0] for name in contents if not name.startswith("fastimagenet-")} == {"fastimagenet"}

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], outside, env)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    (Path(venv_site) / "borrowed_dependencies.pth").write_text("\n".join(_borrowed_paths()) + "\n")
    # --ignore-installed: the borrowed paths hold this checkout's own (editable) install; leave it alone
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], outside, env)

    modules = (["fastimagenet", "fastimagenet.loaders", "fastimagenet.dataset_tools", "fastimagenet.config"]
               + ["fastimagenet.loaders._jpeg_roi"] * decoder)
    where = json.loads(_run([python, "-c", "import importlib, json, sys; from fastimagenet.config import CONFIGS_DIR; "
                             "print(json.dumps([importlib.import_module(m).__file__ for m in sys.argv[1:]] + "
                             "[str(CONFIGS_DIR)]))", *modules], outside, env))
    assert all(Path(path).is_relative_to(venv) for path in where), where

    listing = _run([venv / "bin" / "fastimagenet", "recipes"], outside, env)
    assert [line for line in listing.splitlines() if not line.startswith(" ")] == recipes

    run = tmp_path / "run"
    _run([venv / "bin" / "fastimagenet", "train", "--config", "resnet10_small_32px", "--loader", "synthetic",
          "epochs=1", "schedule.stages=0,32,8", "loader.synthetic_samples=8", "data.num_classes=4",
          "data.val_batch_size=8", "runtime.device=cpu", "runtime.compile=false", f"runtime.out_dir={run}"],
         outside, env)
    [record] = read_metrics(run)
    assert math.isfinite(record["train_loss"]) and record["resolution"] == 32
    assert "git_commit: unknown" in (run / "config.yaml").read_text()  # an install is no checkout
