"""The kernels as ``torch.library`` custom ops: ``torch.ops.inc_bridge.<op>``.

Every quantized layer (both forms) calls one of these ops with plain tensors and plain scalars;
the op body picks the backend's kernel (``kernel_for``: "auto" resolves from the tensors' device,
a backend without a kernel for the op runs ``emulated``) and runs it. To ``torch.compile`` and
``torch.export`` an op is one opaque node: dynamo does not trace into the kernels (the ``cpu``
backend's ctypes calls, ``data_ptr()`` and ``float(scale)`` happen only inside the op), so a model
compiles without graph breaks and exports to one graph. Shapes, dtypes and strides while tracing
come from each op's fake implementation, which runs the ``emulated`` kernel on fake tensors: every
backend returns what the emulated math returns (same shape, dtype and layout).

Arguments are tensors plus what the schema language has: ``float`` (the FP8 clamp bound),
``torch.dtype`` (the compute dtype, the FP8 format of a quantize) and ``str`` (the backend name).
The FP8 format of a weight is its ``qweight``'s dtype.

Example:
    >>> y = torch.ops.inc_bridge.linear(x, qweight, weight_scale, input_scale, None, 448.0,
    ...                                 torch.float32, "auto")  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import emulated
from .registry import Fp8Params, KernelFn, get_kernel, resolve_backend

__all__ = ["conv1d", "conv1d_args", "conv2d", "conv2d_args", "dequantize", "embedding", "grouped_linear", "kernel_for", "linear", "matmul", "matmul_args",
           "quantize", "sdpa", "sdpa_mask"]

LIBRARY = "inc_bridge"


def kernel_for(op: str, backend: str, device: torch.device) -> KernelFn:
    """The kernel an op runs: "auto" resolves from ``device``; see ``registry.get_kernel``.

    Args:
        op: one of ``registry.OPS``.
        backend: "auto" or a registered backend name (what the layer was converted with).
        device: the device of the op's main input.
    Returns:
        The backend's kernel, or the emulated one where the backend registers none for ``op``.
    Raises:
        BackendUnavailableError: ``backend`` is not a registered backend.
    """
    if backend == "auto":
        backend = resolve_backend("auto", device)
    return get_kernel(op, backend)


def _params(qdtype: torch.dtype, fp8_max: float, hp_dtype: torch.dtype) -> Fp8Params:
    return Fp8Params(qdtype, float(fp8_max), hp_dtype)


# ------------------------------------------------------------------ linear


@torch.library.custom_op(f"{LIBRARY}::linear", mutates_args=())
def linear(x: Tensor, qweight: Tensor, weight_scale: Tensor, input_scale: Tensor, bias: Tensor | None,
           fp8_max: float, hp_dtype: torch.dtype, backend: str) -> Tensor:
    """Static FP8 linear: ``qdq(x) @ dequant(qweight)ᵀ + bias`` by the backend's kernel."""
    kernel = kernel_for("linear", backend, x.device)
    return kernel(x, qweight, weight_scale, input_scale, bias, _params(qweight.dtype, fp8_max, hp_dtype))


@linear.register_fake
def _linear_fake(x, qweight, weight_scale, input_scale, bias, fp8_max, hp_dtype, backend):
    return emulated.linear_emulated(x, qweight, weight_scale, input_scale, bias, _params(qweight.dtype, fp8_max, hp_dtype))


# ------------------------------------------------------------------ conv2d


@torch.library.custom_op(f"{LIBRARY}::conv2d", mutates_args=())
def conv2d(x: Tensor, qweight: Tensor, weight_scale: Tensor, input_scale: Tensor, bias: Tensor | None,
           fp8_max: float, hp_dtype: torch.dtype, backend: str, stride: list[int], padding: list[int],
           padding_mode: str, dilation: list[int], groups: int) -> Tensor:
    """Static FP8 conv2d: ``conv2d(qdq(x), dequant(qweight), bias, ...)`` by the backend's kernel.

    ``padding_mode`` is "" for numeric ``padding``, or F.conv2d's string padding ("same" /
    "valid"; ``padding`` is then ignored): the schema has no int-or-string type.
    """
    kernel = kernel_for("conv2d", backend, x.device)
    return kernel(x, qweight, weight_scale, input_scale, bias, _params(qweight.dtype, fp8_max, hp_dtype),
                  stride, padding_mode or padding, dilation, groups)


@conv2d.register_fake
def _conv2d_fake(x, qweight, weight_scale, input_scale, bias, fp8_max, hp_dtype, backend, stride, padding,
                 padding_mode, dilation, groups):
    return emulated.conv2d_emulated(x, qweight, weight_scale, input_scale, bias,
                                    _params(qweight.dtype, fp8_max, hp_dtype), stride, padding_mode or padding,
                                    dilation, groups)


def _conv_args(stride, padding, dilation, dims: int) -> tuple[list[int], list[int], str, list[int]]:
    def spread(v) -> list[int]:
        return [int(v)] * dims if isinstance(v, int) else [int(i) for i in v]

    if isinstance(padding, str):
        return spread(stride), [0] * dims, padding, spread(dilation)
    return spread(stride), spread(padding), "", spread(dilation)


def conv2d_args(stride, padding, dilation) -> tuple[list[int], list[int], str, list[int]]:
    """F.conv2d's ``stride, padding, dilation`` (ints, pairs or a padding string) as the op's arguments."""
    return _conv_args(stride, padding, dilation, 2)


# ------------------------------------------------------------------ conv1d


@torch.library.custom_op(f"{LIBRARY}::conv1d", mutates_args=())
def conv1d(x: Tensor, qweight: Tensor, weight_scale: Tensor, input_scale: Tensor, bias: Tensor | None,
           fp8_max: float, hp_dtype: torch.dtype, backend: str, stride: list[int], padding: list[int],
           padding_mode: str, dilation: list[int], groups: int) -> Tensor:
    """Static FP8 conv1d: ``conv1d(qdq(x), dequant(qweight), bias, ...)``; arguments as ``conv2d``'s, one spatial dim."""
    kernel = kernel_for("conv1d", backend, x.device)
    return kernel(x, qweight, weight_scale, input_scale, bias, _params(qweight.dtype, fp8_max, hp_dtype),
                  stride, padding_mode or padding, dilation, groups)


@conv1d.register_fake
def _conv1d_fake(x, qweight, weight_scale, input_scale, bias, fp8_max, hp_dtype, backend, stride, padding,
                 padding_mode, dilation, groups):
    return emulated.conv1d_emulated(x, qweight, weight_scale, input_scale, bias,
                                    _params(qweight.dtype, fp8_max, hp_dtype), stride, padding_mode or padding,
                                    dilation, groups)


def conv1d_args(stride, padding, dilation) -> tuple[list[int], list[int], str, list[int]]:
    """F.conv1d's ``stride, padding, dilation`` (ints, 1-tuples or a padding string) as the op's arguments."""
    return _conv_args(stride, padding, dilation, 1)


# ------------------------------------------------------------------ embedding


@torch.library.custom_op(f"{LIBRARY}::embedding", mutates_args=())
def embedding(ids: Tensor, qweight: Tensor, weight_scale: Tensor, fp8_max: float, hp_dtype: torch.dtype,
              backend: str) -> Tensor:
    """Weight-only FP8 embedding: gather FP8 rows, dequantize them."""
    kernel = kernel_for("embedding", backend, qweight.device)
    return kernel(ids, qweight, weight_scale, _params(qweight.dtype, fp8_max, hp_dtype))


@embedding.register_fake
def _embedding_fake(ids, qweight, weight_scale, fp8_max, hp_dtype, backend):
    return emulated.embedding_emulated(ids, qweight, weight_scale, _params(qweight.dtype, fp8_max, hp_dtype))


# ------------------------------------------------------------------ grouped linear (fused MoE experts)


@torch.library.custom_op(f"{LIBRARY}::grouped_linear", mutates_args=())
def grouped_linear(x: Tensor, qweight: Tensor, weight_scale: Tensor, input_scale: Tensor, offs: Tensor,
                   fp8_max: float, hp_dtype: torch.dtype, backend: str) -> Tensor:
    """Per-expert static FP8 linear over rows grouped by expert (``F.grouped_mm``'s ``offs``).

    ``qweight`` [E, out, in], ``weight_scale`` [E] or [E, out, 1], ``input_scale`` [E]: rows
    ``offs[e-1]:offs[e]`` of ``x`` [rows, in] go through expert ``e``'s ``linear`` kernel with its
    own scales; rows past ``offs[-1]`` stay zero. One op, so the row counts (data) are read only
    inside it: ``torch.compile`` traces an MoE layer without a graph break.
    """
    kernel = kernel_for("linear", backend, x.device)
    p = _params(qweight.dtype, fp8_max, hp_dtype)
    out = x.new_zeros(x.shape[0], qweight.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = kernel(x[start:end], qweight[e], weight_scale[e], input_scale[e], None, p)
        start = end
    return out


@grouped_linear.register_fake
def _grouped_linear_fake(x, qweight, weight_scale, input_scale, offs, fp8_max, hp_dtype, backend):
    return x.new_empty(x.shape[0], qweight.shape[1])


# ------------------------------------------------------------------ activation quantize / dequantize


@torch.library.custom_op(f"{LIBRARY}::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float, backend: str) -> Tensor:
    """``clamp(x / scale, ±fp8_max)`` cast to ``fp8_dtype``: an activation with its static scale."""
    return kernel_for("quantize", backend, x.device)(x, scale, _params(fp8_dtype, fp8_max, x.dtype))


@quantize.register_fake
def _quantize_fake(x, scale, fp8_dtype, fp8_max, backend):
    return emulated.quantize_emulated(x, scale, _params(fp8_dtype, fp8_max, x.dtype))


@torch.library.custom_op(f"{LIBRARY}::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, out_dtype: torch.dtype, backend: str) -> Tensor:
    """``q * scale`` computed in fp32, cast to ``out_dtype``."""
    return kernel_for("dequantize", backend, q.device)(q, scale, out_dtype)


@dequantize.register_fake
def _dequantize_fake(q, scale, out_dtype, backend):
    return emulated.dequantize_emulated(q, scale, out_dtype)


# ------------------------------------------------------------------ attention: sdpa, matmul / bmm / baddbmm
#
# Attention ops take their activations already in FP8 (each with its static scale), from
# ``inc_bridge::quantize``: the module form (QSDPA / QMatmul) quantizes and calls the op, the
# subclass form's Float8ActivationTensors hand their FP8 data and scales to the same op. A backend
# with an FP8 attention kernel reads them as they are; the others dequantize them to ``hp_dtype``
# and run torch's op in high precision.


@torch.library.custom_op(f"{LIBRARY}::sdpa", mutates_args=())
def sdpa(query: Tensor, key: Tensor, value: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor,
         attn_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
         hp_dtype: torch.dtype, backend: str) -> Tensor:
    """``F.scaled_dot_product_attention`` of FP8 q, k, v (each with its static scale), in ``hp_dtype``."""
    kernel = kernel_for("sdpa", backend, query.device)
    return kernel(query, key, value, (q_scale, k_scale, v_scale), hp_dtype, attn_mask=attn_mask, dropout_p=dropout_p,
                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def sdpa_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``attn_mask`` as the callers of ``sdpa`` pass it: a boolean mask becomes the additive mask
    ``F.scaled_dot_product_attention`` itself makes of one (0 where True, -inf where False, in the
    query's dtype), so attention is the same. Why: under torch.compile inductor writes boolean
    tensors about 6x slower than floats, and building MiniLM's six masks as booleans cost 12 ms of
    a 400 ms forward."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.where(attn_mask, 0.0, float("-inf")).to(dtype)


@sdpa.register_fake
def _sdpa_fake(query, key, value, q_scale, k_scale, v_scale, attn_mask, dropout_p, is_causal, scale, enable_gqa,
               hp_dtype, backend):
    return emulated.sdpa_emulated(query, key, value, (q_scale, k_scale, v_scale), hp_dtype, attn_mask=attn_mask,
                                  dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


# ``fn`` names the torch function; ``addend``, ``beta`` and ``alpha`` are baddbmm's (``addend`` None otherwise).
@torch.library.custom_op(f"{LIBRARY}::matmul", mutates_args=())
def matmul(fn: str, a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, addend: Tensor | None, beta: float,
           alpha: float, hp_dtype: torch.dtype, backend: str) -> Tensor:
    """``torch.matmul`` / ``bmm`` / ``baddbmm`` of two FP8 operands (each with its static scale), in ``hp_dtype``."""
    kernel = kernel_for("matmul", backend, a.device)
    return kernel(fn, a, b, (a_scale, b_scale), addend, beta, alpha, hp_dtype)


@matmul.register_fake
def _matmul_fake(fn, a, b, a_scale, b_scale, addend, beta, alpha, hp_dtype, backend):
    return emulated.matmul_emulated(fn, a, b, (a_scale, b_scale), addend, beta, alpha, hp_dtype)


def matmul_args(fn: str, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None, float, float]:
    """A captured ``torch.matmul`` / ``bmm`` / ``baddbmm`` call as the op's ``a, b, addend, beta, alpha``.

    Raises:
        NotImplementedError: an argument the op does not carry (``out=``, extra positionals).
    """
    kwargs = dict(kwargs)
    beta, alpha = float(kwargs.pop("beta", 1.0)), float(kwargs.pop("alpha", 1.0))
    names = ("input", "batch1", "batch2") if fn == "baddbmm" else ("input", "mat2" if fn == "bmm" else "other")
    values = list(args) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
    if kwargs or len(values) != len(names):
        raise NotImplementedError(f"quantized {fn}: takes {', '.join(names)} (and beta, alpha for baddbmm); "
                                  f"got {len(values)} operands and {sorted(kwargs) or 'no'} other keywords")
    if fn == "baddbmm":
        return values[1], values[2], values[0], beta, alpha
    return values[0], values[1], None, beta, alpha


# ------------------------------------------------------------------ gradients
#
# A quantized model is for inference, but its ops must not stop autograd from tracing: torch.compile
# builds a joint forward/backward graph whenever an input requires grad (a float embedding's output,
# a bias left as a trainable Parameter), and an op without a formula fails there. The formulas are
# the usual straight-through ones: the activation's quantize-dequantize passes gradients unchanged,
# the FP8 weight is used dequantized and gets no gradient, and the bias gets its ordinary one.


def _linear_setup(ctx, inputs, output) -> None:
    x, qweight, weight_scale, _input_scale, bias, _fp8_max, hp_dtype, _backend = inputs
    ctx.save_for_backward(qweight, weight_scale)
    ctx.hp_dtype, ctx.x_dtype = hp_dtype, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad):
    qweight, weight_scale = ctx.saved_tensors
    w = emulated.dequantize_emulated(qweight, weight_scale, ctx.hp_dtype)  # [N, K]
    grad_x = torch.matmul(grad.to(ctx.hp_dtype), w).to(ctx.x_dtype)
    grad_bias = None if ctx.bias_dtype is None else grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _conv_setup(ctx, inputs, output) -> None:
    x, qweight, weight_scale, _input_scale, bias, _fp8_max, hp_dtype, _backend, stride, padding, padding_mode, \
        dilation, groups = inputs
    dims = qweight.dim() - 2
    if padding_mode == "valid":
        padding = [0] * dims
    elif padding_mode == "same":
        total = [d * (k - 1) for d, k in zip(dilation, qweight.shape[2:], strict=True)]
        padding = [t // 2 for t in total]
        ctx.asymmetric = any(t % 2 for t in total)
    ctx.save_for_backward(x, qweight, weight_scale)
    ctx.hp_dtype, ctx.has_bias = hp_dtype, bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.asymmetric = getattr(ctx, "asymmetric", False)


def _conv_backward(op: str):
    """The straight-through backward of ``inc_bridge::<op>`` (conv1d or conv2d): ``aten.convolution_backward``."""

    def backward(ctx, grad):
        x, qweight, weight_scale = ctx.saved_tensors
        if ctx.asymmetric:
            raise NotImplementedError(f"inc_bridge::{op}: no gradient for padding='same' with an even kernel extent")
        stride, padding, dilation, groups = ctx.conv
        dims = qweight.dim() - 2
        w = emulated.dequantize_emulated(qweight, weight_scale, ctx.hp_dtype)
        batched = x.dim() == dims + 2
        xb, gb = (x, grad) if batched else (x.unsqueeze(0), grad.unsqueeze(0))
        grad_x, _, _ = torch.ops.aten.convolution_backward(
            gb.to(ctx.hp_dtype), xb.to(ctx.hp_dtype), w, None, stride, padding, dilation, False, [0] * dims, groups,
            [True, False, False])
        grad_x = (grad_x if batched else grad_x.squeeze(0)).to(x.dtype)
        grad_bias = None
        if ctx.has_bias:
            grad_bias = gb.sum(dim=(0, *range(2, dims + 2))).to(ctx.bias_dtype)
        return grad_x, None, None, None, grad_bias, None, None, None, None, None, None, None, None

    return backward


conv2d.register_autograd(_conv_backward("conv2d"), setup_context=_conv_setup)
conv1d.register_autograd(_conv_backward("conv1d"), setup_context=_conv_setup)



def _quantize_backward(ctx, grad):
    """Straight through: d(quantize)/dx taken as 1 (the FP8 output's gradient, as the input's dtype)."""
    return (grad.to(ctx.x_dtype),) + (None,) * 4


def _quantize_setup(ctx, inputs, output) -> None:
    ctx.x_dtype = inputs[0].dtype


def _dequantize_backward(ctx, grad):
    return (grad.to(ctx.q_dtype),) + (None,) * 3


def _dequantize_setup(ctx, inputs, output) -> None:
    ctx.q_dtype = inputs[0].dtype


quantize.register_autograd(_quantize_backward, setup_context=_quantize_setup)
dequantize.register_autograd(_dequantize_backward, setup_context=_dequantize_setup)


def _vjp_backward(fn, tensors, grad):
    """Straight-through gradients of ``fn(*tensors)`` (the quantize-dequantize taken as identity)."""
    _, vjp = torch.func.vjp(fn, *tensors)
    return vjp(grad)


def _sdpa_setup(ctx, inputs, output) -> None:
    query, key, value, q_scale, k_scale, v_scale, attn_mask, dropout_p, is_causal, scale, enable_gqa, hp_dtype = inputs[:12]
    ctx.save_for_backward(query, key, value, q_scale, k_scale, v_scale, attn_mask)
    ctx.hp_dtype = hp_dtype
    ctx.kwargs = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}


def _sdpa_backward(ctx, grad):
    query, key, value, q_scale, k_scale, v_scale, attn_mask = ctx.saved_tensors
    if ctx.kwargs["dropout_p"]:
        raise NotImplementedError("inc_bridge::sdpa: no gradient with dropout (the op does not return its mask)")
    qkv = [emulated.dequantize_emulated(t, s, ctx.hp_dtype) for t, s in ((query, q_scale), (key, k_scale), (value, v_scale))]
    grads = _vjp_backward(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, **ctx.kwargs), tuple(qkv), grad)
    # The inputs are FP8: their gradients reach the inc_bridge::quantize that made them (straight through).
    return (*grads,) + (None,) * 10


sdpa.register_autograd(_sdpa_backward, setup_context=_sdpa_setup)


def _matmul_setup(ctx, inputs, output) -> None:
    fn, a, b, a_scale, b_scale, addend, beta, alpha, hp_dtype = inputs[:9]
    ctx.save_for_backward(a, b, a_scale, b_scale, addend)
    ctx.fn, ctx.beta, ctx.alpha, ctx.hp_dtype = fn, beta, alpha, hp_dtype


def _matmul_backward(ctx, grad):
    a, b, a_scale, b_scale, addend = ctx.saved_tensors
    a, b = emulated.dequantize_emulated(a, a_scale, ctx.hp_dtype), emulated.dequantize_emulated(b, b_scale, ctx.hp_dtype)
    if ctx.fn == "baddbmm":
        ga, gb, gadd = _vjp_backward(lambda x, y, z: torch.baddbmm(z, x, y, beta=ctx.beta, alpha=ctx.alpha),
                                     (a, b, addend), grad)
    else:
        (ga, gb), gadd = _vjp_backward(torch.matmul if ctx.fn == "matmul" else torch.bmm, (a, b), grad), None
    return None, ga, gb, None, None, gadd, None, None, None, None


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)
