"""Reading untrusted files and writing files atomically: the one place inc_bridge touches the disk.

Every file inc_bridge reads (saved models, manifests, INC dumps, measurements, recipes, trial
logs, reports) is data from somewhere else. ``read_bytes`` opens it without blocking (a FIFO or a
device would hang or never end), refuses anything but a regular file, refuses a symlink that leaves
the directory it must stay in, and caps the size *before* reading. ``loads_json`` bounds the nesting
depth (deep JSON raises RecursionError deep inside the parser otherwise). ``write_atomic`` writes a
sibling temporary file with a unique name, applies the umask like ``open()`` would, fsyncs and
renames it into place, so a crash leaves either the old file or the new one.

Each function takes the error class to raise, so a recipe problem stays a ``RecipeError`` and a
model-file problem a ``SerializationError``; messages name the file and what was expected.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import IncBridgeError

MiB = 1 << 20
MAX_JSON_DEPTH = 64
_SHOWN = 200  # characters of a value quoted in an error message


def shorten(value: Any, limit: int = _SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never repeat a whole input."""
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_within(path: Path, root: Path, error: type[IncBridgeError]) -> None:
    """Raise ``error`` when ``path`` (after following symlinks) lies outside ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise error(f"{path}: a link to {real}, outside {root}; refusing to follow it")


@contextmanager
def open_regular(path: Path | str, *, error: type[IncBridgeError], what: str = "file",
                 within: Path | str | None = None) -> Iterator[BinaryIO]:
    """``path`` opened for binary reading without blocking; ``error`` unless it is a regular file.

    The open is non-blocking, so a FIFO or device is refused instead of hanging; the file stays
    open while the caller reads, so what is read is the file that was checked, not whatever the
    name points to a moment later. With ``within``, a symlink that leaves that directory is refused.
    """
    path = Path(path)
    if within is not None:
        check_within(path, Path(within), error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: {what} is not a regular file (a directory, FIFO or device); refusing to read it")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            yield f
        except OSError as exc:
            raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def read_bytes(path: Path | str, *, max_bytes: int, error: type[IncBridgeError], what: str = "file",
               within: Path | str | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``error`` for anything else.

    Args:
        path: the file.
        max_bytes: refuse larger files (checked from ``fstat`` before reading, and again while reading,
            as a file can grow).
        error: the IncBridgeError subclass to raise.
        what: what the file is, for the message ("recipe", "INC measurement file", ...).
        within: when given, ``path`` must resolve inside this directory (symlinks out are refused).
    Raises:
        error: missing, unreadable, not a regular file (FIFO, device, directory), too large, or a
            link out of ``within``.
    """
    with open_regular(path, error=error, what=what, within=within) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {what} of {size} bytes is larger than the {max_bytes}-byte limit")
        data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise error(f"{path}: {what} grew past the {max_bytes}-byte limit while being read")
        return data


def read_head(path: Path | str, n: int, *, error: type[IncBridgeError], what: str = "file",
              within: Path | str | None = None) -> bytes:
    """The first ``n`` bytes (or fewer) of a regular file of any size, under ``read_bytes``' rules
    otherwise: to recognise a file by its beginning without reading all of it."""
    with open_regular(path, error=error, what=what, within=within) as f:
        return f.read(n)


def read_text(path: Path | str, *, max_bytes: int, error: type[IncBridgeError], what: str = "file",
              within: Path | str | None = None) -> str:
    """``read_bytes`` decoded as UTF-8; ``error`` naming the byte offset when it is not UTF-8."""
    raw = read_bytes(path, max_bytes=max_bytes, error=error, what=what, within=within)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``value`` nests lists/dicts at most ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def loads_json(text: str | bytes, *, origin: str, error: type[IncBridgeError], max_depth: int = MAX_JSON_DEPTH,
               nonfinite: bool = False) -> Any:
    """``json.loads`` that raises ``error`` for invalid JSON, NaN/Infinity literals and deep nesting.

    ``nonfinite=True`` reads NaN/Infinity as floats, for files whose writer emits them (INC's dumps
    of a layer that saw NaN) so that the caller can name the layer; the caller must check them.
    """

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=float if nonfinite else _no_constants)
    except RecursionError:
        raise error(f"{origin}: JSON nested too deeply (limit {max_depth})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{origin}: not valid JSON: {shorten(str(exc))}") from None
    if not json_depth_ok(value, max_depth):
        raise error(f"{origin}: JSON nested too deeply (limit {max_depth})")
    return value


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask is a global swap)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path | str, data: str | bytes, *, mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` through a uniquely named sibling file renamed into place.

    The file gets ``mode & ~umask`` as ``open()`` would (mkstemp alone makes it 0600), is fsynced
    before the rename, and the temporary file is removed on any failure, KeyboardInterrupt included.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode & ~current_umask())
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
