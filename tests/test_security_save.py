"""Issue 14, saving slice: atomic and race-free saves, safe overwrite, umask, the weight memo, CLI errors.

Each test reproduces an input of the issue and asserts the clean result: the error class and
message, the model or directory left as it was, and no stray files.
"""

from __future__ import annotations

import copy

import pytest
import torch

import inc_bridge as ib

from .models import LinearNet, linear_batches


def _fp8_state(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a quantized model holds, subclass weights flattened (FP8 data and scales)."""
    from inc_bridge.serialization.saving import describe

    return describe(qmodel)[0]


@pytest.mark.parametrize("form", ["subclass", "module"])
@pytest.mark.parametrize("change", ["data_mul_", "data_assign"])
def test_quantize_sees_a_weight_changed_through_data(form, change):
    """Defect 4: quantize, change a weight through ``.data``, quantize again: equal to a fresh copy."""
    model, batches = LinearNet().eval(), linear_batches(2)
    ib.quantize(model, batches, form=form)  # the first run (it used to leave a memo keyed by id/_version)
    with torch.no_grad():
        if change == "data_mul_":
            model.fc1.weight.data.mul_(4)
        else:
            model.fc1.weight.data = torch.randn_like(model.fc1.weight) * 3
    again = ib.quantize(model, batches, form=form)
    fresh = ib.quantize(copy.deepcopy(model), batches, form=form)
    got, want = _fp8_state(again), _fp8_state(fresh)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].view(torch.uint8) if got[name].element_size() == 1 else got[name],
                           want[name].view(torch.uint8) if want[name].element_size() == 1 else want[name]), name
    x = linear_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(again(x), fresh(x))
