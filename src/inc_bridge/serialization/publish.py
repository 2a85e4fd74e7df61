"""Publishing a finished directory at ``path``: atomically, without a moment where ``path`` is absent.

``ib.save`` writes into a hidden sibling (``.NAME.partial-PID-TOKEN``) and then commits it:

* a new ``path`` (or an empty directory) takes a no-replace rename (Linux ``renameat2`` with
  ``RENAME_NOREPLACE``; elsewhere a plain rename, which POSIX refuses onto a non-empty directory and
  the staged directory is never empty), so of two processes saving to one new path exactly one
  wins and the other gets "already exists";
* replacing a previous save swaps the two directories in one step (``RENAME_EXCHANGE``), so
  ``path`` always holds one complete model; where the OS lacks it, the old directory is renamed
  aside (``.NAME.old-PID-TOKEN``) and put back on every failure, and SIGINT is held off between the
  two renames;
* once the new directory is at ``path`` the save is done: an interrupt arriving during the cleanup
  that follows is dropped rather than raised, since raising would report a completed save as failed.

Hidden directories left by runs that crashed (SIGKILL, power loss) are removed by the next save of
the same name when they are provably stale: their process is gone, or they are more than a day old.
If such a crash happened between the two renames, ``path`` is missing and the aside directory
holds the previous model: it is renamed back first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import SerializationError

STAGING, ASIDE = "partial", "old"
_STALE_AFTER_S = 24 * 3600  # a hidden directory of a live process (or a reused pid) older than this is stale
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}


def hidden_name(path: Path, kind: str) -> Path:
    """A new sibling name for ``path``: ``.NAME.<kind>-<pid>-<random>`` (the pid tells whether it is stale)."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def make_staging_dir(path: Path) -> Path:
    """Create the hidden sibling ``save`` writes into; ``mkdir`` applies the umask (mkdtemp would make it 0700)."""
    while True:
        tmp = hidden_name(path, STAGING)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


# ---------------------------------------------------------------- renameat2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the OS or file system lacks it, OSError otherwise."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    a, b = os.fsencode(src), os.fsencode(dst)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    else:
        number = _SYS_RENAMEAT2.get(os.uname().machine)
        if number is None:
            return False
        rc = libc.syscall(ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a), ctypes.c_int(_AT_FDCWD),
                          ctypes.c_char_p(b), ctypes.c_uint(flags))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel, or a file system without the flag (some network file systems)
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the non-empty directory ``src`` to ``dst``; SerializationError if ``dst`` appeared meanwhile."""
    try:
        if not _renameat2(src, dst, _RENAME_NOREPLACE):
            os.rename(src, dst)  # POSIX refuses to rename a directory onto a non-empty one
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise SerializationError(f"{dst}: already exists (another save got there first); "
                                     "pass overwrite=True to replace it") from None
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step; False where the OS cannot (then nothing happened)."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


# ---------------------------------------------------------------- interrupts


class _Deferred:
    pending = False
    committed = False
    previous: object = None  # the SIGINT handler held off

    def check(self) -> None:
        """Deliver the interrupt held off so far (before the commit point only): the previous
        handler runs, which by default raises KeyboardInterrupt."""
        if self.pending and not self.committed:
            self.pending = False
            if callable(self.previous):
                self.previous(signal.SIGINT, None)
            else:
                raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[_Deferred]:
    """Hold SIGINT off within the block (main thread only; elsewhere Python delivers none).

    ``check()`` raises one that arrived, at a point where the caller can still undo. On leaving, one
    that arrived is raised as usual unless the block set ``committed``; after the commit point it is
    dropped, so a finished save never reports KeyboardInterrupt.
    """
    state = _Deferred()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield state
        return

    def record(signum, frame):  # noqa: ARG001 - signal handler signature
        state.pending = True

    state.previous = previous
    signal.signal(signal.SIGINT, record)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
    state.check()


# ---------------------------------------------------------------- stale hidden directories


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process
    return True


def _stale(entry: os.DirEntry, now: float) -> bool:
    """A hidden directory of ours whose process is gone, or older than a day (a pid can be reused)."""
    rest = entry.name.rsplit("-", 2)
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    old = now - info.st_mtime > _STALE_AFTER_S
    if len(rest) == 3 and rest[1].isdigit():
        return old or not _pid_alive(int(rest[1]))
    return old  # a name of inc_bridge before pids were recorded (mkdtemp's random suffix)


def recover_and_clean(path: Path, is_complete: Callable[[Path], bool]) -> None:
    """Put back a previous model a crash left aside (``path`` missing and ``is_complete`` true of
    it), then remove stale hidden directories of ``path``'s name. Only directories whose names
    inc_bridge makes are touched."""
    parent = path.parent
    staging, aside = f".{path.name}.{STAGING}-", f".{path.name}.{ASIDE}-"
    now = time.time()
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith((staging, aside))]
    except OSError:
        return
    stale = [e for e in entries if _stale(e, now)]
    if not os.path.lexists(path):
        for entry in sorted((e for e in stale if e.name.startswith(aside)), key=lambda e: -e.stat().st_mtime):
            # this module renames the old directory itself aside; inc_bridge before it nested it one level down
            inner = Path(entry.path) / path.name
            source = inner if inner.is_dir() and not inner.is_symlink() else Path(entry.path)
            if not is_complete(source):
                continue
            try:
                rename_noreplace(source, path)
            except (OSError, SerializationError):
                continue
            break
    for entry in stale:
        shutil.rmtree(entry.path, ignore_errors=True)
