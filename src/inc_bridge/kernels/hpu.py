"""``hpu``: FP8 GEMMs on Intel Gaudi through the ``habana_frameworks`` custom ops.

**Not run on a Gaudi.** This module is written against the op contract that Intel Neural
Compressor's own Gaudi path uses (``neural_compressor/torch/algorithms/fp8_quant``, INC 3.10), and
the tests exercise it only with a stand-in implementation of those ops registered on CPU. The
contract, as INC calls it:

* ``torch.ops.hpu.cast_to_fp8_v2(x, scale_inv, stochastic_rounding, is_amax, dtype)`` →
  ``(q, amax)``: ``q = fp8(x * scale_inv)``, saturating to the device's FP8 range (240 for e4m3 on
  Gaudi2, 448 on Gaudi3; the recipe's ``target`` already sized the scales for it). INC passes
  ``scale_inv = 1 / scale``.
* ``torch.ops.hpu.fp8_gemm_v2(A, trans_A, B, trans_B, D, out_dtype, A_scale_inv, B_scale_inv,
  bias, accumulate)`` → ``(op(A) @ op(B)) * A_scale_inv * B_scale_inv`` in ``out_dtype``, where
  the "scale_inv" arguments are the dequantization scales (x ≈ q · scale): INC passes its input
  scale and weight scale, a 1-D [N] tensor for a per-output-channel weight scale.

Our FP8 weight is [N, K] (INC keeps it transposed as [K, N]), so it is passed with
``trans_B=True``. The bias is added afterwards in the model dtype, as ``emulated`` and INC do.
Quantizing with ``x * (1 / scale)`` instead of ``x / scale`` can round a value differently from
``emulated``, and the GEMM sums FP8 products in its own order, so tests bound the difference by
SQNR. Ops other than linear, and tensors not on an HPU, run the emulated math.
"""

from __future__ import annotations

import importlib.util

import torch

from .emulated import linear_emulated
from .registry import Availability, Fp8Params, register_backend, register_kernel

HPU = "hpu"


def availability() -> Availability:
    """Whether Gaudi's FP8 ops can run: habana_frameworks importable, an HPU visible, the op defined."""
    if importlib.util.find_spec("habana_frameworks") is None:
        return Availability(False, "habana_frameworks (the Gaudi PyTorch bridge) is not installed")
    try:
        import habana_frameworks.torch.core  # noqa: F401  (registers the hpu device and torch.ops.hpu)
    except Exception as exc:  # noqa: BLE001  (a broken install is "unavailable", with its message)
        return Availability(False, f"habana_frameworks does not import: {type(exc).__name__}: {exc}")
    hpu = getattr(torch, "hpu", None)
    if hpu is None or not hpu.is_available():
        return Availability(False, "habana_frameworks imports but no HPU device is visible")
    if not hasattr(torch.ops.hpu, "fp8_gemm_v2") or not hasattr(torch.ops.hpu, "cast_to_fp8_v2"):
        return Availability(False, "this habana_frameworks has no torch.ops.hpu.fp8_gemm_v2 / cast_to_fp8_v2")
    return Availability(True, f"torch.ops.hpu.fp8_gemm_v2 on {hpu.get_device_name()}")


register_backend(HPU, device_type="hpu", check=availability)


def fp8_gemm_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """``y = x Wᵀ + b`` with Gaudi's cast_to_fp8_v2 and fp8_gemm_v2, on whatever device the ops serve.

    Args and Returns: those of ``linear_emulated``.
    """
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    xq = torch.ops.hpu.cast_to_fp8_v2(x2d, torch.reciprocal(input_scale.float()), False, False, p.fp8_dtype)[0]
    w_scale = weight_scale.float().reshape(-1) if weight_scale.numel() > 1 else weight_scale.float()
    y = torch.ops.hpu.fp8_gemm_v2(xq, False, qweight, True, None, p.hp_dtype, input_scale.float(), w_scale, None, False)
    y = y.reshape(*x.shape[:-1], n)
    return y + bias if bias is not None else y


@register_kernel("linear", HPU, "torch.ops.hpu.fp8_gemm_v2 (contract of INC's Gaudi path; untested on hardware)")
def linear_hpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None,
    p: Fp8Params,
) -> torch.Tensor:
    """Static FP8 linear; the arguments and result are those of ``linear_emulated``."""
    if x.device.type == "hpu" and qweight.device.type == "hpu":
        return fp8_gemm_linear(x, qweight, weight_scale, input_scale, bias, p)
    return linear_emulated(x, qweight, weight_scale, input_scale, bias, p)


# INC's Gaudi path also has conv2d_fp8 and fp8_fused_sdpa; they are not wired up here yet.
