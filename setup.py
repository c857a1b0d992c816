"""Package discovery (the metadata is in pyproject.toml): every package under sparsejax/ is
found, so a new subpackage ships without an edit, and kernels/ is installed as
sparsejax.kernels. tests/test_packaging.py builds the wheel and trains from it."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["sparsejax", "sparsejax.*"]), "sparsejax.kernels"],
      package_dir={"sparsejax.kernels": "kernels"})
