"""Shared fixtures. The suite must leave no files behind in the working directory or the repo."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Property tests draw the same examples on every run (a CI failure reproduces on any machine) and
# keep no example database; hypothesis' own cache goes to a temporary directory, not the working
# one. INC_BRIDGE_HYPOTHESIS=explore draws new examples.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="inc_bridge_hypothesis_")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("INC_BRIDGE_HYPOTHESIS", "repeatable"))

REPO = Path(__file__).resolve().parent.parent
_IGNORED = {".venv", ".git", ".pytest_cache", ".ruff_cache", "__pycache__"}


def _snapshot(root: Path) -> set[Path]:
    files = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED and not d.endswith(".egg-info")]
        files.update(Path(dirpath, f) for f in filenames)
    return files


@pytest.fixture(scope="session", autouse=True)
def no_files_left_behind():
    """Fail the run if any test writes a file into the working directory or the repository."""
    roots = {Path.cwd().resolve(), REPO}
    before = {root: _snapshot(root) for root in roots}
    yield
    new = sorted(str(p) for root in roots for p in _snapshot(root) - before[root])
    if new:
        pytest.fail(f"tests left files behind: {new[:10]}", pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
