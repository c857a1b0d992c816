"""The repository stands on its own: no path outside it, configs that load from any working
directory, and method citations that point at sections that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from sparsejax.config import load_config, resolve_data_path
from tests.conftest import REPO

OUTSIDE = "../" + "shared"  # spelled in two parts so that this file does not match itself


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_refers_to_a_folder_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        if path.is_file() and OUTSIDE.encode() in path.read_bytes():
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_loads_from_another_working_directory(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / config)
    if cfg.data.path is not None:
        assert Path(cfg.data.path).exists(), cfg.data.path  # a file, or a prepared dir


def test_relative_data_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/tinyshakespeare.txt") == REPO / "data" / "tinyshakespeare.txt"
    assert resolve_data_path("data/no_such_corpus.txt") is None
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").write_text("local copy")
    # a file relative to the working directory wins over the repository's
    assert resolve_data_path("data/tinyshakespeare.txt") == Path("data/tinyshakespeare.txt")


def test_method_citations_point_at_sections_of_docs_methods():
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "methods.md").read_text(),
                              re.MULTILINE))
    cited = {}
    for path in _tracked_files():
        if path.suffix in (".py", ".md", ".ipynb", ".yaml") and path.is_file():
            for hit in re.finditer(r"docs/methods\.md`*,? §(\d+)(?:-(\d+))?", path.read_text()):
                for number in filter(None, hit.groups()):
                    cited.setdefault(number, str(path.relative_to(REPO)))
    assert cited, "no citations found: the pattern is stale"
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert missing == {}
