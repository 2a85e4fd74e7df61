"""inc_bridge's private temporary directories, and the removal of those a killed process left behind.

Calibration hands INC a directory for its dumps and config files. ``TemporaryDirectory`` removes it
on every normal exit, but not after a SIGKILL or an out-of-memory kill. Each directory's name
therefore carries the creating process's pid, and ``remove_stale`` (run at the start of each
calibration) deletes the ones that are provably ours and orphaned: our name pattern, a real
directory (not a link) owned by this user, in the temp dir, whose process no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_PREFIX = "inc_bridge_"
_KINDS = ("calib", "inc", "log")
_NAME_RE = re.compile(rf"^{_PREFIX}(?:{'|'.join(_KINDS)})_(?P<pid>[1-9][0-9]{{0,9}})_[A-Za-z0-9_]+$")


def prefix(kind: str) -> str:
    """``inc_bridge_<kind>_<pid>_``: the name start of a private directory of this process."""
    if kind not in _KINDS:
        raise ValueError(f"unknown scratch kind {kind!r}; expected one of {_KINDS}")
    return f"{_PREFIX}{kind}_{os.getpid()}_"


@contextlib.contextmanager
def private_dir(kind: str) -> Iterator[Path]:
    """A new directory in the system temp dir, removed on exit (and by ``remove_stale`` if killed)."""
    with tempfile.TemporaryDirectory(prefix=prefix(kind)) as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: not provably dead
    return True


def remove_stale(root: Path | str | None = None) -> list[Path]:
    """Remove the private directories of dead inc_bridge processes in ``root`` (the temp dir).

    Returns the directories removed. Never raises: cleaning up is a courtesy, not a precondition.
    """
    base = Path(root if root is not None else tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        m = _NAME_RE.match(entry.name)
        if not m or int(m["pid"]) == os.getpid():
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid) or _alive(int(m["pid"])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
