"""The on-disk format: a directory with ``model.safetensors`` and ``inc_bridge.json``.

``model.safetensors`` holds every tensor of the model under its state-dict name (subclass weights
flattened: ``fc.weight.qdata``, ``fc.weight.scale``, ...), FP8 data as safetensors' F8_E4M3 /
F8_E5M2. ``inc_bridge.json`` (the manifest) holds the format version, library versions, each
quantized layer's form, kind, class and configuration, the dtype, shape and SHA-256 of every tensor,
and the recipe and scales when known. This module reads and checks both files and publishes a
finished directory atomically; it knows nothing about models.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import SerializationError
from ..formats import dtype_from_name, dtype_name
from ..safe_io import MiB, current_umask, loads_json, open_regular, read_head, read_text, shorten
from . import publish
from .manifest_schema import check_manifest_schema

FORMAT_NAME = "inc_bridge.quantized_model"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "inc_bridge.json"

# safetensors' names for the dtypes a quantized model holds.
_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes (any dtype, FP8 included)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def tensor_record(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_digest(t)}


# ---------------------------------------------------------------- writing


@contextmanager
def staging_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh hidden sibling directory of ``path``; on success it becomes ``path``, on error
    it is removed and ``path`` is as it was.

    ``path`` may be absent or an empty directory; with ``overwrite`` also a directory holding an
    inc_bridge save. Anything else (a project folder, a file, a link, ``.``) is refused before
    anything is written. The commit (``publish``) never leaves ``path`` absent, lets one of two
    concurrent saves to a new path win, and is final: see ``publish`` for how.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise SerializationError(f"{str(path) or repr('')}: not a directory name to save to; give one such as 'out/model'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SerializationError(f"{path}: cannot create its parent directory: {exc.strerror or exc}") from None
    publish.recover_and_clean(path, holds_save)
    replacing = _check_target(path, overwrite)
    tmp = publish.make_staging_dir(path)
    try:
        yield tmp
        if not any(tmp.iterdir()):
            raise SerializationError(f"{path}: nothing was written")
        _fsync_dir(tmp)
        _commit(tmp, path, replacing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def holds_save(directory: Path) -> bool:
    """True when ``directory`` (not a link) holds ``model.safetensors`` and an ``inc_bridge.json`` that
    begins with this format's name, as ``save`` writes it (a large model's manifest runs to hundreds
    of MB: only its beginning is read)."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir() or not (directory / TENSORS_FILE).is_file():
        return False
    try:
        head = read_head(directory / MANIFEST_FILE, 4096, error=SerializationError, what="manifest", within=directory)
    except SerializationError:
        return False
    return re.match(rb'\{\s*"format"\s*:\s*"' + re.escape(FORMAT_NAME.encode()) + rb'"', head) is not None


def _check_target(path: Path, overwrite: bool) -> bool:
    """What is at ``path`` and whether saving may go there: True when it holds a save to replace."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SerializationError(f"{path}: cannot look at it: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise SerializationError(f"{path}: is a symbolic link; refusing to save through or replace it")
    if not stat.S_ISDIR(info.st_mode):
        raise SerializationError(f"{path}: is a file, not a directory; refusing to replace it (inc_bridge saves a directory)")
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise SerializationError(f"{path}: cannot list it: {exc.strerror or exc}") from None
    if not names:
        return False
    if not overwrite:
        raise SerializationError(f"{path}: already exists; pass overwrite=True to replace it")
    if not holds_save(path):
        raise SerializationError(
            f"{path}: holds {len(names)} entries ({shorten(', '.join(names[:5]), 120)}) but no inc_bridge save "
            f"({MANIFEST_FILE} with \"format\": \"{FORMAT_NAME}\" and {TENSORS_FILE}); overwrite=True replaces only "
            "a saved model or an empty directory, so nothing was changed"
        )
    return True


def _commit(tmp: Path, path: Path, replacing: bool) -> None:
    """Put the finished ``tmp`` at ``path``: the commit point of a save.

    SIGINT is held off meanwhile: one that arrives before the commit aborts the save (``path`` as it
    was), one that arrives after it is dropped (the save is done).
    """
    with publish.interrupts_deferred() as state:
        old = None
        if not replacing:
            try:
                path.rmdir()  # an empty directory (gone already, or filled by another save: not ours to take)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise SerializationError(f"{path}: already exists (another save got there first); "
                                             "pass overwrite=True to replace it") from None
                raise
            state.check()
            publish.rename_noreplace(tmp, path)
        else:
            state.check()
            if publish.exchange(tmp, path):
                old = tmp  # the previous model, now under the hidden name
            else:
                old = publish.hidden_name(path, publish.ASIDE)
                os.rename(path, old)
                try:
                    state.check()
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)  # put the previous model back
                    raise
        state.committed = True
        # the save is done: nothing below may turn it into an error
        with contextlib.suppress(OSError):
            _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    try:
        text = json.dumps(manifest, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{MANIFEST_FILE}: the model description is not plain JSON: {exc}") from None
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    target = directory / TENSORS_FILE
    save_file(tensors, str(target), metadata={"format": "pt", "inc_bridge_format_version": str(FORMAT_VERSION)})
    with open(target, "rb") as f:
        os.fchmod(f.fileno(), 0o666 & ~current_umask())  # safetensors creates it 0600; follow the umask as open() does
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading

_MAX_MANIFEST = 64 * MiB


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, checked for format, version and the shape of every section.

    Read through ``safe_io`` (a regular file inside ``directory``, at most 64 MiB, JSON depth
    bounded), then checked against the schema, so later steps can index it without meeting a
    wrong type. SerializationError naming the file and the field otherwise.
    """
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise SerializationError(f"{directory}: not a directory saved by inc_bridge.save")
    text = read_text(path, max_bytes=_MAX_MANIFEST, error=SerializationError, what="model manifest", within=directory)
    manifest = loads_json(text, origin=str(path), error=SerializationError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SerializationError(f"{path}: not an inc_bridge model manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SerializationError(f"{path}: invalid format_version {shorten(version, 40)}")
    versions = manifest.get("versions", {})
    if version > FORMAT_VERSION:
        saved_by = versions.get("inc_bridge", "?") if isinstance(versions, dict) else "?"
        raise SerializationError(
            f"{path}: format version {version} (written by inc_bridge {shorten(saved_by, 40)}) is newer than this "
            f"inc_bridge reads (up to {FORMAT_VERSION}); upgrade inc_bridge to load it"
        )
    check_manifest_schema(manifest, str(path))
    return manifest


def read_header(path: Path, directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """Parse and bounds-check a safetensors header: tensor name → {dtype, shape, data_offsets}.

    Done by hand (the format is an 8-byte length and a JSON header) so that a truncated file names
    the first tensor whose bytes are missing. ``directory``: the file must lie inside it.
    """
    with open_regular(path, error=SerializationError, what="model file", within=directory) as f:
        size = os.fstat(f.fileno()).st_size
        header, n = _parse_header(f, path, size)
    return header


def _parse_header(f: Any, path: Path, size: int) -> tuple[dict[str, dict[str, Any]], int]:
    head = f.read(8)
    if len(head) < 8:
        raise SerializationError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise SerializationError(f"{path}: header of {n} bytes does not fit in a {size}-byte file (truncated or corrupted)")
    raw = f.read(n)
    header = loads_json(raw, origin=f"{path}: corrupted safetensors header", error=SerializationError)
    if not isinstance(header, dict):
        raise SerializationError(f"{path}: corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, info in header.items():
        _check_header_entry(path, name, info, data_bytes)
    return header, n


def _check_header_entry(path: Path, name: str, info: Any, data_bytes: int) -> None:
    """One tensor's entry: known dtype, non-negative int shape, offsets inside the data that hold
    exactly ``numel × itemsize`` bytes (what the reader then takes)."""
    bad = f"{path}: tensor {shorten(name, 80)!r}: corrupted header entry {shorten(info, 120)}"
    if not isinstance(info, dict):
        raise SerializationError(bad)
    offsets, dtype, shape = info.get("data_offsets"), info.get("dtype"), info.get("shape")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_nonneg_int(v) for v in offsets)
            or not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape) or not isinstance(dtype, str)):
        raise SerializationError(bad)
    if dtype not in _ST_DTYPES:
        raise SerializationError(f"{path}: tensor {shorten(name, 80)!r}: unsupported dtype {shorten(dtype, 40)}")
    begin, end = offsets
    if end > data_bytes:
        raise SerializationError(
            f"{path}: tensor {shorten(name, 80)!r}: its bytes {begin}..{end} lie past the end of the data "
            f"({data_bytes} bytes): the file is truncated"
        )
    torch_dtype = _ST_DTYPES[dtype]
    if end - begin != math.prod(shape) * torch_dtype.itemsize:
        raise SerializationError(
            f"{path}: tensor {shorten(name, 80)!r}: bytes {begin}..{end} do not hold a {dtype} tensor of shape {shape}"
        )
    info["dtype"] = dtype_name(torch_dtype)
    info["shape"] = shape


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_tensors(directory: Path, manifest: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, after checking names, dtypes, shapes and checksums against the manifest.

    The file is opened once (regular, inside ``directory``; no size cap: models are large), its
    header checked, and each tensor read from that open file into memory of its own.
    """
    path = Path(directory) / TENSORS_FILE
    expected: dict[str, dict[str, Any]] = manifest["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    with open_regular(path, error=SerializationError, what="model file", within=directory) as f:
        size = os.fstat(f.fileno()).st_size
        header, n = _parse_header(f, path, size)
        missing = sorted(set(expected) - set(header))
        extra = sorted(set(header) - set(expected))
        if missing or extra:
            what = f"missing {shorten(missing[:5])}" if missing else f"unexpected {shorten(extra[:5])}"
            raise SerializationError(f"{path}: tensors do not match {MANIFEST_FILE}: {what}")
        for name, rec in expected.items():
            got = header[name]
            if got["dtype"] != rec["dtype"] or got["shape"] != rec["shape"]:
                raise SerializationError(
                    f"{path}: tensor {name!r}: {got['dtype']}{got['shape']} in the file, {rec['dtype']}{rec['shape']} "
                    f"in {MANIFEST_FILE} (corrupted)"
                )
        for name, rec in expected.items():
            t = _tensor_at(f, path, name, 8 + n, header[name])
            if tensor_digest(t) != rec["sha256"]:
                raise SerializationError(f"{path}: tensor {name!r}: checksum mismatch, the file is corrupted")
            tensors[name] = t.to(device)
    return tensors


def _tensor_at(f: Any, path: Path, name: str, base: int, info: dict[str, Any]) -> torch.Tensor:
    """The tensor ``info`` describes, read from the open file into memory of its own (offsets
    already checked against the file's size; a file that shrank since is reported)."""
    begin, end = info["data_offsets"]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(base + begin)
    if end > begin and f.readinto(memoryview(raw.numpy())) != end - begin:
        raise SerializationError(f"{path}: tensor {name!r}: the file ended early (truncated while being read?)")
    return raw.view(dtype_from_name(info["dtype"])).reshape(info["shape"])
