"""A new user's first hour: what inc_bridge prints and says without being asked."""

from __future__ import annotations

import logging
import subprocess
import sys


def test_import_prints_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import inc_bridge"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_import_leaves_no_logging_filters_behind():
    import inc_bridge  # noqa: F401

    for name in ("torchao", "torch.utils._pytree"):
        assert logging.getLogger(name).filters == []
