"""Op ``conv1d``: ``torch.nn.Conv1d`` with an FP8 weight and a static FP8 activation scale.

Built as ``conv2d`` is, with one spatial dim. Subclass form: a ``Float8StaticTensor`` weight;
``F.conv1d`` on it calls ``inc_bridge::conv1d``. Module form: ``QConv1d``. ONNX: ``OnnxFp8Conv``
with ``F.conv1d`` (QuantizeLinear / DequantizeLinear around a Conv). INC 3.10 does not patch
``nn.Conv1d`` (on any device), so the bridge measures its input (``bridge_observed``) with INC's
statistic, the running max of ``|x|``. Not transformers' ``Conv1D`` (GPT-2), which is a linear layer
(``hf_layers.py``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..kernels import ops as kernel_ops
from ..nn.conv import QConv1d
from ..tensor import Float8StaticTensor
from ._build import with_fp8_weight
from ._conv import conv_torch_function, conv_twin
from .spec import OpSpec

Float8StaticTensor.implements_torch_function(F.conv1d)(
    conv_torch_function("conv1d", kernel_ops.conv1d, kernel_ops.conv1d_args))

CONV1D = OpSpec(
    name="conv1d",
    module_types=(nn.Conv1d,),
    quantized_type=QConv1d,
    has_weight=True,
    n_inputs=1,
    input_positions=lambda module: (0,),
    to_subclass=with_fp8_weight,
    to_module=QConv1d.from_float,
    kernel=kernel_ops.conv1d,
    onnx_twin=conv_twin(QConv1d, F.conv1d, "conv1d"),
    bridge_observed=True,
)
