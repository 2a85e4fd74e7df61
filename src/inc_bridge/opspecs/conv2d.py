"""Op ``conv2d``: ``nn.Conv2d`` with an FP8 weight and a static FP8 activation scale.

Subclass form: a ``Float8StaticTensor`` weight; ``F.conv2d`` on it (registered below) calls
``inc_bridge::conv2d``. Module form: ``QConv2d``, whose forward calls the same op. ONNX:
``OnnxFp8Conv`` with ``F.conv2d``. Saving records ``QConv2d``'s ``quant_config()`` or the flattened weight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..kernels import ops as kernel_ops
from ..nn.conv import QConv2d
from ..tensor import Float8StaticTensor
from ._build import with_fp8_weight
from ._conv import conv_torch_function, conv_twin
from .spec import OpSpec

Float8StaticTensor.implements_torch_function(F.conv2d)(
    conv_torch_function("conv2d", kernel_ops.conv2d, kernel_ops.conv2d_args))

CONV2D = OpSpec(
    name="conv2d",
    module_types=(nn.Conv2d,),
    quantized_type=QConv2d,
    has_weight=True,
    n_inputs=1,
    input_positions=lambda module: (0,),
    to_subclass=with_fp8_weight,
    to_module=QConv2d.from_float,
    kernel=kernel_ops.conv2d,
    onnx_twin=conv_twin(QConv2d, F.conv2d, "conv2d"),
)
