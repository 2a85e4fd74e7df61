"""``cpu``: FP8 kernels for x86 CPUs (Xeon), backed by a small native library.

FP8 weights stay FP8 in memory; nothing keeps a bf16 copy. What runs, per op (see docs/kernels.md):

* **linear, many rows** (prefill, batches): the activation is quantize-dequantized and the weight
  dequantized by native code into a temporary, then ``torch.matmul`` (oneDNN) runs exactly the call
  the emulated kernel makes. Same values, same call: the output is **bit-identical** to ``emulated``.
  The native conversions are what make it fast: torch's eager FP8 casts take ~5 ns per element
  here, the native ones 0.06-0.5 ns. Layers of ``TILED_MIN_WEIGHT`` (4M) weights and more are
  dequantized in blocks of output rows, one GEMM per block, to keep the temporaries small: same
  values, but a different GEMM call, so equality with ``emulated`` is not guaranteed (tests bound
  it by SQNR; on the machine it was developed on the results were identical).
* **linear, few rows** (decode: at most ``GEMV_MAX_ROWS`` rows, weight of at least
  ``GEMV_MIN_WEIGHT`` elements; prefill: at most ``FP8_GEMM_MAX_ROWS`` rows of a weight of at least
  ``TILED_MIN_WEIGHT``): a true FP8 x FP8 GEMV / GEMM, one native call (``_Native.linear``) that
  quantizes the activation, reads the 1-byte weights directly, multiplies FP8 values (exact in
  fp32), sums in fp32, applies the two static scales, rounds and adds the bias. A decode step reads
  half the bytes a bf16 GEMV reads; a prefill decodes each block of weight rows once into cache for
  all its rows. It differs from ``emulated`` only by the order and precision of the sums
  (``emulated`` rounds the dequantized weight to the model dtype first); tests bound the
  difference by SQNR, and check that the row count and thread count change no bit.
* **conv2d, embedding, sdpa, matmul**: native quantize-dequantize / dequantize feeding the same
  torch op ``emulated`` calls: bit-identical to ``emulated``.

Anything the native code does not cover (a float16 model, tensors on another device, a non-dense
activation) runs the emulated kernel. The library is built by ``make kernels`` (part of ``make
venv``/``make test``) from ``csrc/fp8_cpu.c``; without it this backend reports itself unavailable
and ``auto`` picks ``emulated``.

torchao's ``torch.ops.torchao.float8_linear_cpu`` would be the natural kernel here, but the torchao
0.18 wheel on PyPI ships no CPU implementation of it (``float8_linear_prepack_cpu`` raises
NotImplementedError for the CPU backend); ``torchao_float8_linear_cpu()`` probes it on a tiny tensor
and ``inc-bridge doctor`` prints the result. It also needs a prepacked (blocked) weight, which
these kernels, taking the same arguments as the emulated ones, do not have.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConversionError
from .emulated import (
    conv1d_emulated,
    conv2d_emulated,
    dequantize_emulated,
    embedding_emulated,
    linear_emulated,
    matmul_call,
    quantize_emulated,
)
from .registry import Availability, Fp8Params, register_backend, register_kernel

CPU = "cpu"
LIBRARY = Path(__file__).with_name("libinc_bridge_fp8.so")

# The FP8 GEMV runs for at most this many activation rows (beyond it, dequantize + oneDNN GEMM is
# faster) and for weights of at least this many elements (below it the layer is too small for the
# speed to matter, and the exact path keeps such layers bit-identical to ``emulated``).
GEMV_MAX_ROWS = 16
GEMV_MIN_WEIGHT = 1 << 18
# Weights of at least this many elements are dequantized in blocks of output rows, each block at
# most TILE_BYTES in the model dtype: one temporary of the whole layer (32 MiB and up for 4096 x
# 4096) is mmap-ed fresh by glibc on every call and its page faults cost about half a GEMM at
# M=256; blocks of a few MiB are reused from the heap. Each block is one oneDNN GEMM.
TILED_MIN_WEIGHT = 1 << 22
TILE_BYTES = 8 << 20
# Weights of TILED_MIN_WEIGHT elements and more (the layers of LLMs) run the FP8 kernel up to this
# many rows (prefill of a prompt, small batches): it decodes each block of weight rows once into a
# bf16 buffer in cache and reuses it for every activation row, where the tiled path writes and
# rereads a bf16 copy of the whole weight on every call. Beyond it oneDNN's GEMM is faster.
FP8_GEMM_MAX_ROWS = 256

_DTYPE = {torch.float32: 0, torch.bfloat16: 1}
_FORMAT = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}


def _require(ok: bool, what: str) -> None:
    """The last check before a pointer goes to C, which trusts every size it is given."""
    if not ok:
        raise ConversionError(f"cpu kernel: {what}; refusing to pass it to the native library (a corrupted or "
                              "hand-built model?)")


def _real(*tensors: torch.Tensor) -> bool:
    """Plain CPU tensors with data (a Parameter is one; fake, meta and subclass tensors are not)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and not t.is_meta
               for t in tensors)


def _check_layer(op: str, qweight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                 p: Fp8Params, dims: int, act: bool = True) -> None:
    """A layer's tensors fit each other (shapes and dtypes only: this also runs while tracing)."""
    _require(qweight.dtype == p.fp8_dtype and qweight.dtype in _FORMAT,
             f"{op}: the weight is {qweight.dtype}, the layer's format is {p.fp8_dtype}")
    _require(qweight.dim() == dims, f"{op}: the weight has {qweight.dim()} dimensions, expected {dims}")
    rows = qweight.shape[0]
    _require(isinstance(weight_scale, torch.Tensor) and weight_scale.numel() in (1, rows),
             f"{op}: the weight scale has {getattr(weight_scale, 'numel', lambda: '?')()} values for {rows} rows; "
             f"expected 1 or {rows}")
    if act:
        _require(isinstance(input_scale, torch.Tensor) and input_scale.numel() == 1,
                 f"{op}: the activation scale must have exactly one value, got "
                 f"{'none' if input_scale is None else input_scale.numel()}")


def _check_scale(scale: torch.Tensor, rows: int | None, what: str) -> None:
    """An fp32 scale on the CPU with one value, or (``rows`` given) one per row."""
    _require(isinstance(scale, torch.Tensor) and _real(scale) and scale.dtype in (torch.float32, torch.bfloat16,
             torch.float16), f"{what} must be a float CPU tensor, got {type(scale).__name__}")
    ok = scale.numel() == 1 or (rows is not None and scale.numel() == rows)
    _require(ok, f"{what} has {scale.numel()} values; expected 1" + (f" or {rows} (one per row)" if rows is not None else ""))


def _check_dense(t: torch.Tensor, dtypes: dict, what: str, contiguous: bool = False) -> None:
    _require(_real(t) and t.dtype in dtypes, f"{what}: {t.dtype} on {t.device} is not a dtype this kernel takes "
             f"({', '.join(str(d) for d in dtypes)})")
    _require(t.is_contiguous() if contiguous else _dense(t), f"{what} is not {'contiguous' if contiguous else 'dense'}")


class _Native:
    """Typed wrappers of the library's C functions (see csrc/fp8_cpu.c).

    Each checks the dtypes, sizes and layout of what it passes: the C code reads and writes
    exactly ``numel`` elements (and ``rows`` scales) from the pointers it gets.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.ib_quantize.argtypes = [p, i32, i64, f32, f32, i32, p, i32]
        lib.ib_quantize_rows.argtypes = [p, i32, i64, i64, p, f32, i32, p, i32]
        lib.ib_qdq.argtypes = [p, i32, i64, f32, f32, i32, p, i32, i32]
        lib.ib_dequant.argtypes = [p, i64, i64, p, i32, i32, p, i32, i32, i32]
        lib.ib_clip_errors.argtypes = [p, i64, ctypes.c_double, p, i64, ctypes.c_double, i32, p]
        lib.ib_fp8_gemv.argtypes = [p, i64, i64, p, i64, i32, p, p, i32]
        lib.ib_fp8_gemv_scratch.argtypes = [i64, i64]
        lib.ib_fp8_gemv_scratch.restype = i64
        lib.ib_fp8_linear.argtypes = [p, i32, i64, i64, f32, f32, p, i64, i32, p, i32, p, p, i32, p, i32]
        lib.ib_set_openmp.argtypes = [i32]
        lib.ib_add_bias.argtypes = [p, i32, i64, i64, p, i32]
        self.lib = lib
        self.simd = bool(lib.ib_fp8_gemv_simd())

    def set_openmp(self, on: bool) -> bool:
        """Run the kernels' threads on torch's OpenMP workers (True, the default where the library
        was built with OpenMP) or on threads of their own (False); returns whether OpenMP is in use (False where the library was built
        without it). See ``parallel_for`` in csrc/fp8_cpu.c for what each costs."""
        return bool(self.lib.ib_set_openmp(int(on)))

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
        """``quant.quantize_fp8`` for a dense float32/bfloat16 ``x`` (same strides out)."""
        _check_dense(x, _DTYPE, "quantize input")
        _check_scale(scale, None, "quantize scale")
        _require(fp8_dtype in _FORMAT, f"unknown FP8 format {fp8_dtype}")
        q = torch.empty_like(x, dtype=fp8_dtype)
        self.lib.ib_quantize(x.data_ptr(), _DTYPE[x.dtype], x.numel(), float(scale), fp8_max, _FORMAT[fp8_dtype],
                             q.data_ptr(), torch.get_num_threads())
        return q

    def quantize_rows(self, x: torch.Tensor, scales: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor:
        """``quant.quantize_fp8`` of a contiguous float32/bfloat16 ``x`` with one scale per row (dim 0)."""
        _check_dense(x, _DTYPE, "quantize_rows input", contiguous=True)
        _require(x.dim() > 0 and fp8_dtype in _FORMAT, "quantize_rows needs a tensor with rows and an FP8 format")
        q = torch.empty_like(x, dtype=fp8_dtype)
        rows = x.shape[0]
        _check_scale(scales, rows, "quantize_rows scales")
        _require(scales.numel() == rows, f"quantize_rows: {scales.numel()} scales for {rows} rows")
        scales = scales.to(torch.float32).contiguous()
        self.lib.ib_quantize_rows(x.data_ptr(), _DTYPE[x.dtype], rows, x.numel() // rows if rows else 0,
                                  scales.data_ptr(), fp8_max, _FORMAT[fp8_dtype], q.data_ptr(), torch.get_num_threads())
        return q

    def qdq(self, x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float,
            out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """``quant.quant_dequant`` for a dense float32/bfloat16 ``x``, bit for bit; into ``out`` (a
        contiguous tensor of ``out_dtype`` and ``x``'s shape, ``x`` then contiguous too) if given."""
        _check_dense(x, _DTYPE, "qdq input")
        _check_scale(scale, None, "activation scale")
        _require(fp8_dtype in _FORMAT and out_dtype in _DTYPE, f"qdq: unsupported formats {fp8_dtype} -> {out_dtype}")
        if out is None:
            out = torch.empty_like(x, dtype=out_dtype)
        else:
            _check_dense(out, _DTYPE, "qdq output", contiguous=True)
            _require(x.is_contiguous() and out.dtype == out_dtype and out.shape == x.shape,
                     f"qdq: output {out.dtype}{list(out.shape)} for a {out_dtype} result of {list(x.shape)}")
        self.lib.ib_qdq(x.data_ptr(), _DTYPE[x.dtype], x.numel(), float(scale), fp8_max, _FORMAT[fp8_dtype],
                        out.data_ptr(), _DTYPE[out_dtype], torch.get_num_threads())
        return out

    def dequant(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, transpose: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``quant.dequantize_fp8`` of q viewed as [rows, -1], one scale or one per row.

        ``transpose=True`` returns the [-1, rows] contiguous transpose, equal to dequantizing
        ``q.t().contiguous()`` with ``scale.t()``. With one scale ``q`` may be any dense layout
        (elementwise in memory order; the result keeps the layout); per row it must be contiguous.
        ``out``: where to write it (the result's shape, strides and ``out_dtype``).
        """
        _require(q.dim() > 0, "dequant needs a tensor with rows")
        n = q.shape[0]
        k = q.numel() // n if n else 0
        _check_dense(q, _FORMAT, "FP8 weight", contiguous=transpose or scale.numel() > 1)
        _check_scale(scale, n, "weight scale")
        _require(out_dtype in _DTYPE, f"dequant: unsupported output dtype {out_dtype}")
        per_row = scale.numel() > 1
        scale = scale.to(torch.float32).contiguous()
        shape, stride = ((k, n), (n, 1)) if transpose else (q.shape, q.stride())
        if out is None:
            out = torch.empty((k, n), dtype=out_dtype) if transpose else torch.empty_like(q, dtype=out_dtype)
        _require(_real(out) and out.dtype == out_dtype and out.shape == shape and out.stride() == stride,
                 f"dequant: output {out.dtype}{list(out.shape)} strides {out.stride()} for {out_dtype}{list(shape)} "
                 f"strides {stride}")
        self.lib.ib_dequant(q.data_ptr(), n, k, scale.data_ptr(), int(per_row), _FORMAT[q.dtype], out.data_ptr(),
                            _DTYPE[out_dtype], int(transpose), torch.get_num_threads())
        return out

    def clip_errors(self, counts: torch.Tensor, width: float, scales: torch.Tensor, fp8_dtype: torch.dtype,
                    fp8_max: float) -> torch.Tensor:
        """Squared error of each candidate scale over a histogram of bins of ``width`` (float64)."""
        for t, what in ((counts, "histogram counts"), (scales, "candidate scales")):
            _check_dense(t, {torch.float64: 0}, what, contiguous=True)
        _require(fp8_dtype in _FORMAT, f"unknown FP8 format {fp8_dtype}")
        errors = torch.empty(scales.numel(), dtype=torch.float64)
        self.lib.ib_clip_errors(counts.data_ptr(), counts.numel(), width, scales.data_ptr(), scales.numel(), fp8_max,
                                _FORMAT[fp8_dtype], errors.data_ptr())
        return errors

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``y.add_(bias)`` for a contiguous float32/bfloat16 ``y`` [..., N] and ``bias`` [N] of its dtype, bit for bit."""
        _check_dense(y, _DTYPE, "bias-add output", contiguous=True)
        _check_dense(bias, _DTYPE, "bias", contiguous=True)
        n = bias.numel()
        _require(bias.dtype == y.dtype and y.dim() > 0 and y.shape[-1] == n,
                 f"add_bias: bias {bias.dtype}[{n}] for a {y.dtype}{list(y.shape)} output")
        self.lib.ib_add_bias(y.data_ptr(), _DTYPE[y.dtype], y.numel() // n if n else 0, n, bias.data_ptr(),
                             torch.get_num_threads())
        return y

    def gemv(self, xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fp32 [M, N] = Σ_k xq[m, k] · w[n, k] for FP8 ``xq`` [M, K] and ``w`` [N, K] of one format."""
        _check_dense(xq, _FORMAT, "quantized activation", contiguous=True)
        _check_dense(w, _FORMAT, "FP8 weight", contiguous=True)
        _require(xq.dim() == 2 and w.dim() == 2 and xq.shape[1] == w.shape[1] and xq.dtype == w.dtype,
                 f"gemv: activation {xq.dtype}{list(xq.shape)} does not fit weight {w.dtype}{list(w.shape)}")
        m, k = xq.shape
        n = w.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        scratch = torch.empty(self.lib.ib_fp8_gemv_scratch(m, k), dtype=torch.uint8)
        self.lib.ib_fp8_gemv(xq.data_ptr(), m, k, w.data_ptr(), n, _FORMAT[w.dtype], y.data_ptr(), scratch.data_ptr(),
                             torch.get_num_threads())
        return y

    def linear(self, x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
               bias: torch.Tensor | None, fp8_max: float) -> torch.Tensor:
        """A static FP8 linear in one native call: quantize ``x`` [M, K], the FP8 GEMV/GEMM with
        ``qweight`` [N, K], both scales, the output dtype's rounding, then ``bias``.

        The same bits as ``(gemv(quantize(x), qweight) * (input_scale * weight_scale)).to(x.dtype)
        + bias`` in torch; scales must be fp32 and the bias (if any) ``x``'s dtype.
        """
        _check_dense(x, _DTYPE, "linear input", contiguous=True)
        _check_dense(qweight, _FORMAT, "FP8 weight", contiguous=True)
        _require(x.dim() == 2 and qweight.dim() == 2 and x.shape[1] == qweight.shape[1],
                 f"linear: activation {list(x.shape)} does not fit weight {list(qweight.shape)}")
        m, k = x.shape
        n = qweight.shape[0]
        _check_scale(weight_scale, n, "weight scale")
        _check_scale(input_scale, None, "activation scale")
        _require(weight_scale.dtype == torch.float32 and input_scale.dtype == torch.float32, "linear: scales must be fp32")
        if bias is not None:
            _check_dense(bias, _DTYPE, "bias", contiguous=True)
            _require(bias.dtype == x.dtype and bias.numel() == n, f"linear: bias {bias.dtype}[{bias.numel()}] for "
                     f"{x.dtype} output of {n} features")
        weight_scale = weight_scale.contiguous()
        y = torch.empty(m, n, dtype=x.dtype)
        scratch = torch.empty(self.lib.ib_fp8_gemv_scratch(m, k), dtype=torch.uint8)
        self.lib.ib_fp8_linear(x.data_ptr(), _DTYPE[x.dtype], m, k, float(input_scale), fp8_max, qweight.data_ptr(), n,
                               _FORMAT[qweight.dtype], weight_scale.data_ptr(), int(weight_scale.numel() > 1),
                               None if bias is None else bias.data_ptr(), y.data_ptr(), _DTYPE[x.dtype],
                               scratch.data_ptr(), torch.get_num_threads())
        return y


@functools.lru_cache(maxsize=1)
def _load() -> tuple[_Native | None, str]:
    if not LIBRARY.is_file():
        return None, f"native library not built ({LIBRARY.name} missing): run `make kernels` (needs a C compiler)"
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as exc:
        return None, f"native library {LIBRARY.name} does not load: {exc}"
    if not lib.ib_cpu_supported():
        return None, (f"{LIBRARY.name} was built (-march=native) for a CPU with instructions this one lacks; "
                      "rebuild it here with `make -B kernels`")
    try:
        return _Native(lib), ""
    except AttributeError as exc:  # a function this version calls is missing: built from older source
        return None, f"{LIBRARY.name} is older than its source ({exc}); rebuild it with `make -B kernels`"


def native() -> _Native | None:
    """The loaded native library, or None where it is not built or cannot run here."""
    return _load()[0]


def availability() -> Availability:
    """Whether the cpu backend can run: it needs its native library (``make kernels``)."""
    lib, why = _load()
    if lib is None:
        return Availability(False, why)
    gemv = "AVX512-BF16 FP8 GEMV" if lib.simd else "portable C FP8 GEMV (no AVX512-BF16 at build time)"
    return Availability(True, f"native FP8 conversions and {gemv}, {torch.get_num_threads()} threads")


register_backend(CPU, device_type="cpu", check=availability)


@functools.lru_cache(maxsize=1)
def torchao_float8_linear_cpu() -> Availability:
    """Whether torchao's ``float8_linear_cpu`` op runs here: tried once on a tiny tensor."""
    try:
        import torchao.ops  # noqa: F401  (defines the op schemas)

        w = torch.ones(32, 32).to(torch.float8_e4m3fn)
        torch.ops.torchao.float8_linear_prepack_cpu(w, torch.ones(32))
    except NotImplementedError:
        return Availability(False, "no CPU kernel in this torchao build: float8_linear_prepack_cpu raises "
                                   "NotImplementedError")
    except Exception as exc:  # noqa: BLE001  (any failure means "cannot use it")
        return Availability(False, f"{type(exc).__name__}: {str(exc).strip()[:100]}")
    return Availability(True, "torch.ops.torchao.float8_linear_cpu runs (needs a prepacked weight; not used)")


# ------------------------------------------------------------------ helpers


def _dense(t: torch.Tensor) -> bool:
    """``t`` covers its memory without gaps or overlap (any dim order), so elementwise native code
    can walk it in memory order and ``empty_like(t)`` has the same strides."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def native_quantize(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> torch.Tensor | None:
    """``quant.quantize_fp8`` by native code for a 0-d fp32 scale or one per row shaped to broadcast
    over ``x`` ([rows, 1, ...]); None where it cannot run (torch's broadcasting rules then apply)."""
    lib = _native_for(Fp8Params(fp8_dtype, fp8_max, x.dtype), x)
    if lib is None or not _plain_cpu(x, scale) or scale.dtype != torch.float32 or x.dim() == 0:
        return None
    if scale.dim() == 0:  # elementwise in memory order: any dense layout (the result keeps it)
        return lib.quantize(x, scale, fp8_dtype, fp8_max)
    if not x.is_contiguous():
        return None
    if tuple(scale.shape) == (x.shape[0],) + (1,) * (x.dim() - 1):
        return lib.quantize_rows(x, scale.reshape(-1), fp8_dtype, fp8_max)
    return None


def native_dequantize(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype,
                      scratch: str | None = None) -> torch.Tensor | None:
    """``quant.dequantize_fp8`` by native code for a dense ``q`` (any dim order; the result keeps
    it) and a 0-d fp32 scale; None where it cannot run. ``scratch``: write it into this thread's
    scratch buffer of that name (for a temporary that one torch op reads and drops)."""
    lib = native()
    if (lib is None or not _plain_cpu(q, scale) or q.dtype not in _FORMAT or out_dtype not in _DTYPE or q.dim() == 0
            or scale.dim() != 0 or scale.dtype != torch.float32 or not _dense(q)):
        return None
    out = _SCRATCH.get(scratch, tuple(q.shape), tuple(q.stride()), out_dtype) if scratch else None
    return lib.dequant(q, scale, out_dtype, out=out)


def _plain_cpu(*tensors: torch.Tensor) -> bool:
    """Real CPU tensors with data (not fake, functional or meta ones met while tracing)."""
    return all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)


def native_clip_errors(counts: torch.Tensor, width: float, scales: torch.Tensor, fp8_dtype: torch.dtype,
                       fp8_max: float) -> torch.Tensor | None:
    """``scales.clip_errors`` by native code (same bits); None where it cannot run."""
    lib = native()
    tensors = (counts, scales)
    if lib is None or fp8_dtype not in _FORMAT or any(
            t.dtype != torch.float64 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return lib.clip_errors(counts, width, scales, fp8_dtype, fp8_max)


def _native_for(p: Fp8Params, *tensors: torch.Tensor) -> _Native | None:
    """The native library when it covers these tensors and formats, else None (run emulated)."""
    lib = native()
    if lib is None or p.fp8_dtype not in _FORMAT or p.hp_dtype not in _DTYPE:
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _DTYPE or not _dense(t):
            return None
    return lib


def _cpu_weight(qweight: torch.Tensor) -> bool:
    return qweight.device.type == "cpu" and qweight.is_contiguous()


class _Scratch(threading.local):
    """Reusable buffers per thread for temporaries a kernel's torch op reads once and drops: a
    linear or conv layer's quantize-dequantized input, the exact path's dequantized weight,
    attention's dequantized operands. Why: a fresh multi-MiB temporary on every call is a
    fresh ``mmap`` whose page faults cost MiniLM's 1536-wide layers about 1 ms a call (2 threads;
    gone with glibc's mmap threshold raised). Results never depend on it: the buffer is written in
    full before it is read. Inputs above ``SCRATCH_MAX_BYTES`` get a temporary of their own, so a
    long prompt does not leave a large buffer behind."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor of this dense layout in buffer ``slot``, or None (too large)."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes > SCRATCH_MAX_BYTES:
            return None
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).as_strided(shape, stride)


_SCRATCH = _Scratch()
SCRATCH_MAX_BYTES = 16 << 20


def _qdq_input(lib: _Native, x: torch.Tensor, scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """A linear or conv layer input's quantize-dequantize, in this thread's scratch buffer where it fits
    (a dense non-contiguous input, e.g. channels-last, gets a temporary of its own layout)."""
    out = _SCRATCH.get("input", tuple(x.shape), tuple(x.stride()), p.hp_dtype) if x.is_contiguous() else None
    return lib.qdq(x, scale, p.fp8_dtype, p.fp8_max, p.hp_dtype, out=out)


def _dequant_weight_kn(lib: _Native, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized [K, N] weight the exact path multiplies by, in scratch where it fits."""
    n, k = qweight.shape
    return lib.dequant(qweight, scale, dtype, transpose=True, out=_SCRATCH.get("weight", (k, n), (n, 1), dtype))


def _dequant_operand(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """``dequantize_cpu`` of an attention operand that the torch op reads once: in scratch where it fits."""
    out = native_dequantize(q, scale, dtype, scratch=slot)
    return dequantize_emulated(q, scale, dtype) if out is None else out


def linear_route(x: torch.Tensor, qweight: torch.Tensor, p: Fp8Params) -> str:
    """Which path ``linear_cpu`` takes for these tensors (decided by shapes, dtypes and layout).

    "emulated" (native code does not cover them) and "exact" (native conversions around the very
    matmul ``emulated`` calls) give ``linear_emulated``'s bits; "fp8" (the FP8 GEMV/GEMM) and "tiled"
    (row-block GEMMs of a large weight) do not promise them.
    """
    if _native_for(p, x) is None or not _cpu_weight(qweight) or x.dtype != p.hp_dtype:
        return "emulated"
    n, k = qweight.shape
    rows = x.numel() // k if k else 0
    fp8_rows = FP8_GEMM_MAX_ROWS if n * k >= TILED_MIN_WEIGHT else GEMV_MAX_ROWS
    if 0 < rows <= fp8_rows and n * k >= GEMV_MIN_WEIGHT and x.is_contiguous():
        return "fp8"
    return "tiled" if n * k >= TILED_MIN_WEIGHT else "exact"


# ------------------------------------------------------------------ kernels


@register_kernel("linear", CPU, f"≤{GEMV_MAX_ROWS} rows (≤{FP8_GEMM_MAX_ROWS} of 4M+ weights): native FP8 GEMV/GEMM; "
                 "else native qdq/dequant + oneDNN GEMM (exact below 4M weights)")
def linear_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """Static FP8 linear; the arguments and result are those of ``linear_emulated``."""
    _check_layer("linear", qweight, weight_scale, input_scale, p, 2)
    route = linear_route(x, qweight, p)
    if route == "emulated":
        return linear_emulated(x, qweight, weight_scale, input_scale, bias, p)
    lib = native()
    n, k = qweight.shape
    rows = x.numel() // k if k else 0
    if route == "fp8":
        if weight_scale.dtype == input_scale.dtype == torch.float32:
            fused = bias is not None and bias.dtype == x.dtype and bias.is_contiguous() and bias.numel() == n
            y = lib.linear(x.reshape(rows, k), qweight, weight_scale.reshape(-1), input_scale, bias if fused else None,
                           p.fp8_max).reshape(*x.shape[:-1], n)
            return y if fused else _add_bias(lib, y, bias)
        xq = lib.quantize(x.reshape(rows, k), input_scale, p.fp8_dtype, p.fp8_max)
        acc = lib.gemv(xq, qweight)
        scale = input_scale * (weight_scale.reshape(1, n) if weight_scale.numel() > 1 else weight_scale)
        y = (acc * scale).to(p.hp_dtype).reshape(*x.shape[:-1], n)
    elif route == "tiled":
        xq = _qdq_input(lib, x, input_scale, p)
        rows_per_tile = max(1, TILE_BYTES // (k * p.hp_dtype.itemsize))
        per_row = weight_scale.numel() > 1
        y = torch.cat([
            F.linear(xq, lib.dequant(qweight[i : i + rows_per_tile], weight_scale[i : i + rows_per_tile] if per_row
                                     else weight_scale, p.hp_dtype))
            for i in range(0, n, rows_per_tile)
        ], dim=-1)
    else:
        xq = _qdq_input(lib, x, input_scale, p)
        y = torch.matmul(xq, _dequant_weight_kn(lib, qweight, weight_scale, p.hp_dtype))
    return _add_bias(lib, y, bias)


def _add_bias(lib: _Native, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y + bias`` in place (y is ours: a second [rows, N] temporary costs as much as the add), natively
    where the layouts allow: same bits as torch's ``add_``, about a third faster."""
    if bias is None:
        return y
    if y.dtype in _DTYPE and bias.dtype == y.dtype and y.is_contiguous() and bias.is_contiguous() and _real(bias) and bias.dim() == 1:
        return lib.add_bias(y, bias)
    return y.add_(bias)


def _conv_cpu(op: str, dims: int, conv, emulated_conv, x: torch.Tensor, qweight: torch.Tensor,
              weight_scale: torch.Tensor, input_scale: torch.Tensor, bias: torch.Tensor | None, p: Fp8Params,
              *geometry) -> torch.Tensor:
    """A conv kernel's body: native qdq(x) and dequant(W), then the torch ``conv`` the emulated one calls."""
    _check_layer(op, qweight, weight_scale, input_scale, p, dims)
    lib = _native_for(p, x)
    if lib is None or not _cpu_weight(qweight):
        return emulated_conv(x, qweight, weight_scale, input_scale, bias, p, *geometry)
    xq = _qdq_input(lib, x, input_scale, p)
    w = lib.dequant(qweight, weight_scale.reshape(-1), p.hp_dtype)
    return conv(xq, w, bias, *geometry)


@register_kernel("conv2d", CPU, "native qdq(x) and dequant(W), then torch conv2d (exact)")
def conv2d_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 0,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``conv2d_emulated`` with native conversions."""
    return _conv_cpu("conv2d", 4, F.conv2d, conv2d_emulated, x, qweight, weight_scale, input_scale, bias, p, stride,
                     padding, dilation, groups)


@register_kernel("embedding", CPU, "gather FP8 rows, native dequant (exact)")
def embedding_cpu(ids: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """``embedding_emulated`` with a native dequantization of the gathered rows."""
    _check_layer("embedding", qweight, weight_scale, None, p, 2, act=False)
    lib = _native_for(p)
    if lib is None or not _cpu_weight(qweight) or ids.device.type != "cpu" or ids.numel() == 0:
        return embedding_emulated(ids, qweight, weight_scale, p)
    dim = qweight.shape[-1]
    rows = F.embedding(ids.reshape(-1), qweight.view(torch.uint8)).view(qweight.dtype)
    scale = F.embedding(ids.reshape(-1), weight_scale).reshape(-1) if weight_scale.dim() else weight_scale
    return lib.dequant(rows, scale, p.hp_dtype).reshape(*ids.shape, dim)


@register_kernel("sdpa", CPU, "native dequant of q, k, v, then torch SDPA (exact)")
def sdpa_cpu(q, k, v, scales: tuple[torch.Tensor, ...], out_dtype: torch.dtype, **sdpa_kwargs) -> torch.Tensor:
    """``sdpa_emulated`` with native dequantization."""
    q, k, v = (_dequant_operand(t, s, out_dtype, slot) for t, s, slot in zip((q, k, v), scales, "qkv", strict=True))
    return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)


@register_kernel("matmul", CPU, "native dequant of both operands, then the torch matmul (exact)")
def matmul_cpu(fn: str, a: torch.Tensor, b: torch.Tensor, scales: tuple[torch.Tensor, ...], addend: torch.Tensor | None,
               beta: float, alpha: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``matmul_emulated`` with native dequantization."""
    a, b = _dequant_operand(a, scales[0], out_dtype, "a"), _dequant_operand(b, scales[1], out_dtype, "b")
    return matmul_call(fn, a, b, addend, beta, alpha)


@register_kernel("quantize", CPU, "native quantize (exact)")
def quantize_cpu(x: torch.Tensor, scale: torch.Tensor, p: Fp8Params) -> torch.Tensor:
    """``quantize_emulated`` by native code where it covers the tensors (same FP8 bytes)."""
    q = native_quantize(x, scale, p.fp8_dtype, p.fp8_max)
    return quantize_emulated(x, scale, p) if q is None else q


@register_kernel("dequantize", CPU, "native dequantize (exact)")
def dequantize_cpu(q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_emulated`` by native code where it covers the tensors (same values)."""
    out = native_dequantize(q, scale, out_dtype)
    return dequantize_emulated(q, scale, out_dtype) if out is None else out


@register_kernel("conv1d", CPU, "native qdq(x) and dequant(W), then torch conv1d (exact)")
def conv1d_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 0,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``conv1d_emulated`` with native conversions (as ``conv2d_cpu``: same values, same torch call)."""
    return _conv_cpu("conv1d", 3, F.conv1d, conv1d_emulated, x, qweight, weight_scale, input_scale, bias, p, stride,
                     padding, dilation, groups)
