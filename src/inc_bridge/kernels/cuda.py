"""``cuda``: FP8 GEMMs on NVIDIA GPUs through ``torch._scaled_mm`` (compute capability ≥ 8.9).

Linear layers run a real FP8 x FP8 GEMM: the activation is quantized with its static per-tensor
scale, the FP8 weight is used as stored ([N, K] row-major is exactly the column-major [K, N]
operand cuBLASLt wants, so it is passed as ``qweight.t()`` without a copy), and the scales go to
``_scaled_mm``: both 0-d for a per-tensor weight scale; for a per-row weight scale the "rowwise"
form, activation scale expanded to [M, 1] and weight scale [1, N], with a bf16 output as rowwise
scaling requires. The bias is added afterwards in the model dtype, as ``emulated`` does.

What falls back to the ``emulated`` math (which runs on the GPU too, just not as an FP8 GEMM):
tensors that are not on a CUDA device, e5m2 weights (cuBLASLt has no e5m2 x e5m2 GEMM), K or N not
a multiple of 16 (``_scaled_mm``'s layout rule), and every op other than linear (conv2d,
embedding, sdpa, matmul).

Numerics: FP8 products summed in fp32 by the GEMM, then scaled; ``emulated`` rounds the
dequantized operands to the model dtype first. Tests bound the difference by SQNR; on CPU they run
this file's ``scaled_mm_linear`` through CPU ``torch._scaled_mm``, the same call contract.
"""

from __future__ import annotations

import torch

from ..quant import quantize_fp8
from .emulated import linear_emulated
from .registry import Availability, Fp8Params, register_backend, register_kernel

CUDA = "cuda"
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) and later have FP8 tensor cores
USE_FAST_ACCUM = False  # cuBLASLt's fast accumulation is faster on Hopper but less accurate


def availability() -> Availability:
    """Whether a CUDA device with FP8 GEMMs is usable: device present, capability ≥ 8.9."""
    if torch.version.hip is not None:
        return Availability(False, "this is a ROCm build of torch; the cuda backend targets NVIDIA FP8 (e4m3fn) GEMMs")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        return Availability(False, f"{why} (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < MIN_CAPABILITY:
        need = ".".join(map(str, MIN_CAPABILITY))
        return Availability(False, f"CUDA device {name} has compute capability {major}.{minor}; FP8 GEMM needs {need}")
    if not hasattr(torch, "_scaled_mm"):
        return Availability(False, f"this torch ({torch.__version__}) has no torch._scaled_mm")
    return Availability(True, f"torch._scaled_mm on {name} (compute capability {major}.{minor})")


register_backend(CUDA, device_type="cuda", check=availability)


def supports(x: torch.Tensor, qweight: torch.Tensor, p: Fp8Params) -> bool:
    """The shapes and formats ``scaled_mm_linear`` handles (device aside)."""
    n, k = qweight.shape
    return (
        qweight.dtype == torch.float8_e4m3fn
        and p.hp_dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k % 16 == 0
        and n % 16 == 0
        and qweight.is_contiguous()
    )


def scaled_mm_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """``y = x Wᵀ + b`` as one ``torch._scaled_mm`` call on FP8 operands (any device torch supports).

    Args:
        x: [..., K] activation in the model dtype.
        qweight: [N, K] FP8 e4m3fn weight, contiguous; K and N multiples of 16.
        weight_scale: fp32 0-d, or [N, 1] per output row.
        input_scale: fp32 0-d static activation scale.
        bias: [N] or None, added in the model dtype.
        p: FP8 format, clamp bound, model dtype.
    Returns:
        [..., N] in ``p.hp_dtype``.
    """
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    xq = quantize_fp8(x2d, input_scale, p.fp8_dtype, p.fp8_max).contiguous()
    if weight_scale.numel() == 1:
        y = torch._scaled_mm(
            xq, qweight.t(), scale_a=input_scale.reshape(()).float(), scale_b=weight_scale.reshape(()).float(),
            out_dtype=p.hp_dtype, use_fast_accum=USE_FAST_ACCUM,
        )
    else:
        scale_a = input_scale.float().reshape(1, 1).expand(x2d.shape[0], 1).contiguous()
        scale_b = weight_scale.float().reshape(1, n).contiguous()
        y = torch._scaled_mm(
            xq, qweight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16, use_fast_accum=USE_FAST_ACCUM,
        ).to(p.hp_dtype)
    y = y.reshape(*x.shape[:-1], n)
    return y + bias if bias is not None else y


@register_kernel("linear", CUDA, "torch._scaled_mm FP8 GEMM (e4m3, K and N multiples of 16), else emulated")
def linear_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """Static FP8 linear; the arguments and result are those of ``linear_emulated``."""
    if x.device.type == "cuda" and qweight.device.type == "cuda" and supports(x, qweight, p):
        return scaled_mm_linear(x, qweight, weight_scale, input_scale, bias, p)
    return linear_emulated(x, qweight, weight_scale, input_scale, bias, p)


# No FP8 conv / attention kernel is wired up for CUDA: the other ops run the emulated math on the GPU
# (``registry.get_kernel`` falls back to it).
