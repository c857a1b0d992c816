"""The built wheel is the library: it holds every package, imports without the source tree
and trains. (An editable install hides a package the wheel leaves out.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_GPT

PACKAGES = sorted(str(p.parent.relative_to(REPO)).replace("/", ".")
                  for p in (REPO / "sparsejax").rglob("__init__.py"))


def _build_wheel(source: Path, out: Path) -> Path:
    """The wheel of a copy of the source tree (setuptools writes build/ beside it)."""
    for name in ("sparsejax", "kernels"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(source), "-w", str(out)], check=True)
    return next(out.glob("sparsejax-*.whl"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_the_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [*PACKAGES, "sparsejax.kernels"]
    missing = [p for p in expected if p.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert "sparsejax/kernels/nm_matmul.py" in names


@pytest.mark.slow
def test_the_installed_wheel_imports_every_module_and_trains_two_steps(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    # The dependencies come from this environment's site-packages, added as a plain path
    # (its .pth files, the editable install's among them, are not processed there).
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib, json, pkgutil, sparsejax, sparsejax.kernels\n"
             "mods = [m.name for m in pkgutil.walk_packages(sparsejax.__path__, 'sparsejax.')"
             " if not m.name.endswith('__main__')]\n"
             "[importlib.import_module(m) for m in mods]\n"
             "print(json.dumps({'file': sparsejax.__file__, 'modules': mods}))")
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(venv)), found["file"]
    assert "sparsejax.transforms.attention.gaincell" in found["modules"]
    run = subprocess.run([venv / "bin" / "sparsejax", "train", str(REPO / "configs/gpt_tiny.yaml"),
                          *TINY_GPT, "train.steps=2", f"run_dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and results["val_loss"] > 0
