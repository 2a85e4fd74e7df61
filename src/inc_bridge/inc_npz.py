"""INC's ``.npz`` measurement dumps, read without letting the file build any numpy object.

INC saves its measurement dict with ``np.savez(fname, d)``: one stored (uncompressed) zip member
``arr_0.npy`` holding a 0-d object array, i.e. a pickle of a dict whose leaves are small float32
arrays. ``numpy.load(allow_pickle=True)`` would let the file rebuild any numpy dtype with any state
(an object dtype over raw file bytes segfaults) and allocate whatever shape it names. Here:

* the file and each zip member are size-capped *before* anything is read or decompressed, and the
  member is read with a bounded read;
* the pickle is first scanned with ``pickletools`` (which only parses): opcodes outside plain data +
  the few numpy calls INC's dump uses are refused, and memo indices must be small;
* the unpickler resolves numpy's names to inert stand-ins defined here (``numpy.dtype`` becomes a
  description checked against a short list of numeric dtypes, ``_reconstruct`` an array whose bytes
  must match its shape exactly), every other global is refused, and the result is turned into plain
  Python data (lists of floats) with bounded depth and size.

Anything else raises CalibrationError naming the file and what was wrong.
"""

from __future__ import annotations

import ast
import io
import math
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

from . import safe_io
from .errors import CalibrationError

MAX_NPZ_BYTES = 256 * safe_io.MiB  # INC stores its member uncompressed: a real member is never larger
MAX_ELEMENTS = 1 << 26  # per array in the dump; a per-channel scale of the largest layers is far below
_MAX_DEPTH = 32
_MAX_HEADER = 4096
_MAX_OPS = 1 << 21  # pickle opcodes: INC writes about 60 per layer; each may cost ~100 bytes to run
_MEMBER = "arr_0.npy"
# numeric dtypes a dump may hold: numpy's dtype code -> struct format (INC writes float32 only)
_NUMERIC = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
            "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}
_OBJECT = "O8"
_OBJECT_FLAGS = 63  # numpy's flags of the object dtype; other values change how its bytes are read
_BYTEORDER = {"<": "<", "|": "<", "=": "=", ">": ">"}
_ALLOWED_OPS = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP MEMOIZE PUT BINPUT LONG_BINPUT GET BINGET LONG_BINGET
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 FLOAT BINFLOAT
    UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 STRING BINSTRING SHORT_BINSTRING
    SHORT_BINBYTES BINBYTES BINBYTES8 EMPTY_LIST APPEND APPENDS LIST EMPTY_DICT SETITEM SETITEMS DICT
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 GLOBAL STACK_GLOBAL REDUCE BUILD
""".split())
_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def read_npz(file: Path) -> Any:
    """The plain-data dict INC pickled into ``file`` (floats and lists of floats, never numpy objects).

    Raises:
        CalibrationError: not a regular file, too large, not a zip, no ``arr_0.npy``, a member larger
            than declared or than the cap, an unexpected array header, or a pickle that holds
            anything but INC's plain data.
    """
    raw = safe_io.read_bytes(file, max_bytes=MAX_NPZ_BYTES, error=CalibrationError,
                             what="INC measurement file")
    payload = _member(file, raw)
    stream = io.BytesIO(payload)
    _check_header(file, stream)
    pickled = payload[stream.tell():]
    _scan(file, pickled)
    try:
        top = _Unpickler(file, io.BytesIO(pickled)).load()
    except CalibrationError:
        raise
    except _Refused as exc:
        raise CalibrationError(f"{file}: not INC's measurement data: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            struct.error, MemoryError, RecursionError) as exc:
        raise CalibrationError(f"{file}: cannot read INC measurement file: {type(exc).__name__}: "
                               f"{safe_io.shorten(str(exc))}") from None
    if not isinstance(top, _Array) or top.kind != "object" or top.shape != ():
        raise CalibrationError(f"{file}: expected INC's single pickled dict inside the npz")
    return _plain(file, top, _Budget(len(pickled)), 0)


def _member(file: Path, raw: bytes) -> bytes:
    """``arr_0.npy``'s bytes, its declared size checked before decompressing and its read bounded."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if names != [_MEMBER]:
                raise CalibrationError(f"{file}: expected exactly one member '{_MEMBER}' inside the npz, "
                                       f"found {safe_io.shorten(names)}")
            info = infos[0]
            if info.file_size > MAX_NPZ_BYTES:
                raise CalibrationError(f"{file}: npz member '{_MEMBER}' declares {info.file_size} bytes, "
                                       f"more than the {MAX_NPZ_BYTES}-byte limit")
            with zf.open(info) as member:
                data = member.read(info.file_size + 1)
    except CalibrationError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError, MemoryError) as exc:
        raise CalibrationError(f"{file}: cannot read INC measurement file: {type(exc).__name__}: "
                               f"{safe_io.shorten(str(exc))}") from None
    if len(data) != info.file_size:
        raise CalibrationError(f"{file}: npz member '{_MEMBER}' holds more or fewer bytes than it declares")
    return data


def _check_header(file: Path, stream: io.BytesIO) -> None:
    """The .npy header must describe what INC writes: a 0-d object array (the pickled dict)."""
    magic = stream.read(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise CalibrationError(f"{file}: '{_MEMBER}' is not a .npy array")
    size_format = "<H" if magic[6] == 1 else "<I"
    size_raw = stream.read(struct.calcsize(size_format))
    if len(size_raw) != struct.calcsize(size_format):
        raise CalibrationError(f"{file}: '{_MEMBER}' has a truncated .npy header")
    (length,) = struct.unpack(size_format, size_raw)
    if length > _MAX_HEADER:
        raise CalibrationError(f"{file}: '{_MEMBER}' has a .npy header of {length} bytes (limit {_MAX_HEADER})")
    text = stream.read(length)
    try:
        header = ast.literal_eval(text.decode("utf-8" if magic[6] == 3 else "latin1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
        raise CalibrationError(f"{file}: '{_MEMBER}' has a malformed .npy header") from None
    if not isinstance(header, dict) or header.get("descr") != "|O" or header.get("shape") != ():
        raise CalibrationError(
            f"{file}: expected INC's pickled dict (a 0-d object array) inside the npz, got the header "
            f"{safe_io.shorten(header)}"
        )


def _scan(file: Path, pickled: bytes) -> None:
    """Parse (never run) the pickle: only plain-data opcodes and small memo indices."""
    count = 0
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(pickled)):
            count += 1
            if count > _MAX_OPS:
                raise CalibrationError(f"{file}: the pickle inside the npz has more than {_MAX_OPS} operations")
            if op.name not in _ALLOWED_OPS:
                raise CalibrationError(f"{file}: the pickle inside the npz uses {op.name}, which INC's dump never does")
            if op.name in _MEMO_OPS and (not isinstance(arg, int) or not 0 <= arg <= count):
                raise CalibrationError(f"{file}: the pickle inside the npz uses memo slot {arg}")
    except CalibrationError:
        raise
    except (ValueError, TypeError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        raise CalibrationError(f"{file}: cannot read INC measurement file: malformed pickle: "
                               f"{safe_io.shorten(str(exc))}") from None


class _Budget:
    """How many values the result may hold: a shared sub-list cannot multiply the work."""

    def __init__(self, pickle_bytes: int) -> None:
        self.left = pickle_bytes

    def take(self, file: Path, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise CalibrationError(f"{file}: the pickled dict inside the npz is larger than its file")


def _plain(file: Path, value: Any, budget: _Budget, depth: int) -> Any:
    """Plain data: str/int/float/bool/None, lists, dicts with str or int keys, flat numeric arrays."""
    if depth > _MAX_DEPTH:
        raise CalibrationError(f"{file}: the pickled dict inside the npz nests deeper than {_MAX_DEPTH}")
    budget.take(file, 1)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, _Array):
        if value.kind == "object":
            if value.shape != () or value.items is None or len(value.items) != 1:
                raise CalibrationError(f"{file}: object arrays inside the npz must hold one value")
            return _plain(file, value.items[0], budget, depth + 1)
        if value.kind != "numeric":
            raise CalibrationError(f"{file}: an array inside the npz was never given its data")
        return value.values
    if isinstance(value, (list, tuple)):
        return [_plain(file, v, budget, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CalibrationError(f"{file}: a key inside the npz is a {type(k).__name__}, not a string")
            out[k] = _plain(file, v, budget, depth + 1)
        return out
    raise CalibrationError(f"{file}: the npz holds a {type(value).__name__}, which INC's dump never does")


class _Refused(Exception):
    """A stand-in found something INC's dump never holds; ``read_npz`` adds the file name."""


class _Name:
    """What a global of the pickle resolves to: calls ``make`` and nothing else. It has no ``__dict__``
    and refuses ``BUILD``, so a pickle cannot change the stand-ins (pickle can ``setattr`` on any
    object it ``BUILD``s, and a class or function returned by ``find_class`` would be shared)."""

    __slots__ = ("_make",)

    def __init__(self, make: Any) -> None:
        object.__setattr__(self, "_make", make)

    def __call__(self, *args: Any) -> Any:
        if self._make is None:
            raise _Refused("numpy.ndarray is called directly")
        return self._make(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused("the pickle changes one of numpy's names")

    def __setstate__(self, state: Any) -> None:
        raise _Refused("the pickle changes one of numpy's names")


_NDARRAY = _Name(None)  # ``numpy.ndarray``: only a token that ``_reconstruct`` checks for


class _Dtype:
    """What ``numpy.dtype(code, align, copy)`` resolves to: a checked description, never a numpy dtype."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if code != _OBJECT and code not in _NUMERIC:
            raise _Refused(f"dtype {safe_io.shorten(code)} is not a plain numeric dtype")
        self.code = code
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subdescr, names, fields, elsize, alignment, flags)
        if (not isinstance(state, tuple) or len(state) != 8 or state[1] not in _BYTEORDER
                or state[2:5] != (None, None, None) or state[5:7] != (-1, -1)
                or state[7] != (_OBJECT_FLAGS if self.code == _OBJECT else 0)):
            raise _Refused(f"dtype state {safe_io.shorten(state)} is not that of a plain dtype")
        self.order = _BYTEORDER[state[1]]


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:
        raise _Refused("_reconstruct is called with something other than numpy.ndarray")
    return _Array()


class _Array:
    """What ``_reconstruct`` + ``BUILD`` make: a flat numeric numpy array of a dtype from our list,
    its byte count checked against its shape first (an object array keeps its pickled items)."""

    kind = "unset"
    shape: tuple[int, ...] = ()
    items: list[Any] | None = None
    values: Any = None

    def __setstate__(self, state: Any) -> None:
        # ndarray state: (version, shape, dtype, is_fortran, data)
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], _Dtype):
            raise _Refused("an array's state is not (version, shape, dtype, order, data)")
        _, shape, dtype, _, data = state
        if (not isinstance(shape, tuple) or len(shape) > 8
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise _Refused(f"an array's shape {safe_io.shorten(shape)} is not a tuple of sizes")
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise _Refused(f"an array of shape {safe_io.shorten(shape)} is larger than {MAX_ELEMENTS} values")
        self.shape = shape
        if dtype.code == _OBJECT:
            if not isinstance(data, list) or len(data) != count:
                raise _Refused("an object array's items do not match its shape")
            self.kind, self.items = "object", data
            return
        fmt = _NUMERIC[dtype.code]
        if not isinstance(data, bytes) or len(data) != count * struct.calcsize(fmt):
            raise _Refused(f"an array of shape {shape} and dtype {dtype.code} does not match its data")
        # A flat numeric array of a dtype we name ourselves, over exactly the bytes its shape needs; the
        # order (C or Fortran) does not matter: measurements take the max, scales are read flat.
        import numpy as np

        self.kind, self.values = "numeric", np.frombuffer(data, dtype=np.dtype(dtype.order + dtype.code))


def _scalar(dtype: Any, data: Any) -> float:
    if not isinstance(dtype, _Dtype) or dtype.code == _OBJECT or not isinstance(data, bytes):
        raise _Refused("a numpy scalar inside the npz is not a plain number")
    fmt = dtype.order + _NUMERIC[dtype.code]
    if len(data) != struct.calcsize(fmt):
        raise _Refused("a numpy scalar inside the npz does not match its dtype")
    return float(struct.unpack(fmt, data)[0])


_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_STAND_INS: dict[tuple[str, str], _Name] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Name(_Dtype),
    **{(m, "_reconstruct"): _Name(_reconstruct) for m in _MULTIARRAY},
    **{(m, "scalar"): _Name(_scalar) for m in _MULTIARRAY},
}


class _Unpickler(pickle.Unpickler):
    """Resolves numpy's names to the inert stand-ins above; refuses every other global."""

    def __init__(self, file: Path, stream: io.BytesIO) -> None:
        super().__init__(stream, encoding="latin1")
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is None:
            raise CalibrationError(
                f"{self._file}: refusing to load {safe_io.shorten(f'{module}.{name}', 80)} from an INC measurement file"
            )
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise CalibrationError(f"{self._file}: the pickle inside the npz uses persistent ids")
