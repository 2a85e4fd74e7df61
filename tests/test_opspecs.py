"""One ``OpSpec`` per op: the registry, and what it promises (both forms call the op's custom op)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import inc_bridge as ib
from inc_bridge import opspecs
from inc_bridge.recipe import Op
from inc_bridge.select import select_layers
from inc_bridge.serialization import registry

from .attention_models import BaddbmmAttention, FunctionalAttention
from .models import AudioCNN, ToyNet

ALL_OPS = ib.Recipe.model_validate({"quantization": {"ops": [s.name for s in opspecs.SPECS]}})


class _RecordOps(TorchDispatchMode):
    """The ``inc_bridge::`` custom ops a forward calls, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "inc_bridge":
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 16), nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.emb(ids))


def _cases():
    yield "toy", ToyNet().eval(), [torch.randn(2, 4, 12, 12) for _ in range(2)]
    yield "conv1d", AudioCNN().eval(), [torch.randn(2, 4, 20) for _ in range(2)]
    yield "embedding", _Embed().eval(), [torch.randint(20, (2, 5)) for _ in range(2)]
    yield "sdpa", FunctionalAttention().eval(), [torch.randn(2, 6, 32) for _ in range(2)]
    yield "baddbmm", BaddbmmAttention().eval(), [torch.randn(2, 6, 32) for _ in range(2)]


def _both_forms(model, batches):
    ib.capture_attention(model, batches[0])
    scales = ib.compute_scales(ib.calibrate(model, batches, ALL_OPS), ALL_OPS, model=model)
    return ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module"), scales


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_both_forms_call_the_same_custom_ops(case):
    """Subclass form and module form run the same ``inc_bridge::`` ops in the same order, attention
    included (q/k/v or both operands through ``quantize``, then ``sdpa`` / ``matmul``), and agree
    bit for bit; every converted layer's op calls its spec's kernel."""
    _, model, batches = case
    qsub, qmod, scales = _both_forms(model, batches)
    calls = []
    for q in (qsub, qmod):
        with torch.no_grad(), _RecordOps() as rec:
            out = q(batches[1])
        calls.append((rec.ops, out))
    (sub_ops, sub_out), (mod_ops, mod_out) = calls
    assert sub_ops == mod_ops and torch.equal(sub_out, mod_out)
    kernels = {ls.kind.spec.kernel._qualname for ls in scales.layers.values()}
    assert kernels <= set(sub_ops), (kernels, sub_ops)


def test_recipe_ops_are_the_specs():
    layer_ops = [op.value for op in Op if op.is_layer]
    assert layer_ops == [s.name for s in opspecs.SPECS] == ["linear", "conv2d", "conv1d", "embedding", "sdpa", "bmm"]
    assert [op.value for op in Op if not op.is_layer] == ["kv_cache"] and not Op.KV_CACHE.has_weight
    assert Op.EMBEDDING.weight_only and not Op.SDPA.has_weight and Op.BMM.n_inputs == 2 and Op.SDPA.spec is opspecs.SPECS[4]
    assert Op.CONV1D.spec.bridge_observed and not Op.CONV2D.spec.bridge_observed  # INC patches Conv2d, not Conv1d
    with pytest.raises(ib.RecipeError, match="linear"):
        ib.Recipe.model_validate({"quantization": {"ops": ["conv3d"]}})


def test_specs_are_what_saving_and_lookup_use():
    for spec in opspecs.SPECS:
        assert registry.module_classes()[spec.quantized_type.__name__] is spec.quantized_type
        for t in spec.module_types:
            assert opspecs.entry_for(object.__new__(t)).spec is spec
    assert {k.name for k in registry.in_place_kinds().values()} == {"fp8_inputs"}
    assert opspecs.entry_for(nn.Conv1d(2, 2, 1)).spec is opspecs.spec_named("conv1d")
    assert opspecs.entry_for(nn.Conv3d(2, 2, 1)) is None
    with pytest.raises(KeyError, match="ops: linear, conv2d"):
        opspecs.spec_named("conv3d")


class _MyLinear(nn.Linear):
    """A subclass of nn.Linear: not quantized unless its type is registered (lookups are exact)."""


def test_register_module_type_adds_a_type_to_an_existing_op():
    model = nn.Sequential(_MyLinear(8, 4)).eval()
    batches = [torch.randn(3, 8) for _ in range(2)]
    recipe = ib.Recipe()
    with pytest.raises(ib.CalibrationError, match="nothing to calibrate"):
        ib.calibrate(model, batches, recipe)
    linear = opspecs.spec_named("linear")
    opspecs.register_module_type("linear", _MyLinear, to_subclass=linear.to_subclass, to_module=linear.to_module)
    with pytest.raises(TypeError, match="registered already"):
        opspecs.register_module_type("linear", _MyLinear, to_subclass=linear.to_subclass, to_module=linear.to_module)
    # INC measures only the types it patches, so the scales come from an nn.Linear with the same weights.
    twin = nn.Sequential(nn.Linear(8, 4)).eval()
    twin.load_state_dict(model.state_dict())
    scales = ib.compute_scales(ib.calibrate(twin, batches, recipe), recipe, model=twin)
    assert select_layers(model, recipe.quantization).selected == {"0": Op.LINEAR}
    qsub, qmod = ib.convert(model, scales, form="subclass"), ib.convert(model, scales, form="module")
    assert type(qsub[0]) is _MyLinear and type(qmod[0]).__name__ == "QuantizedLinear"
    assert torch.equal(qsub(batches[1]), qmod(batches[1]))
