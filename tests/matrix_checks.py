"""The checks of the model matrix, one function each, shared by tests/test_model_matrix.py.

A ``Variant`` is one model of ``matrix_models.CASES`` quantized with one op set ("plain": linear and
conv2d; "attention": the model's attention ops too), in both forms, from one calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import inc_bridge as ib

from .matrix_models import CASES, SHAPES

CALIB_SEEDS = (11, 12)
EVAL_SEED = 5


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's ``compute_error``); inf when equal."""
    ref, x = ref.double(), x.double()
    noise = torch.linalg.vector_norm(ref - x)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(ref) / noise))


def first_tensor(out: Any) -> torch.Tensor:
    """The model's main output: a tensor, the first of a tuple, or a transformers output's first field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # transformers' ModelOutput: logits / last_hidden_state first
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return first_tensor(out[0])


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return first_tensor(model(**inputs))
        if isinstance(inputs, tuple):
            return first_tensor(model(*inputs))
        return first_tensor(model(inputs))


@dataclass
class Variant:
    name: str
    ops: tuple[str, ...]
    attention: bool
    float_model: nn.Module  # captured when ``attention``
    forms: dict[str, nn.Module] = field(default_factory=dict)

    def inputs(self, shape: tuple[int, int] = SHAPES[0], seed: int = EVAL_SEED) -> Any:
        return CASES[self.name].inputs(*shape, seed)

    def skeleton(self) -> nn.Module:
        """A fresh float model to ``ib.load`` into (captured like the quantized one)."""
        model = CASES[self.name].build()
        if self.attention:
            ib.capture_attention(model, self.inputs())
        return model


def build_variant(name: str, attention: bool) -> Variant:
    case = CASES[name]
    ops = case.attention_ops if attention else case.plain_ops
    recipe = ib.Recipe.model_validate({"quantization": {"ops": list(ops), "exclude": list(case.exclude)}})
    model = case.build()
    calib = [case.inputs(*SHAPES[0], s) for s in CALIB_SEEDS]
    if attention:
        ib.capture_attention(model, calib[0])
    scales = ib.compute_scales(ib.calibrate(model, calib, recipe), recipe, model=model)
    variant = Variant(name, ops, attention, model)
    for form in ("subclass", "module"):
        variant.forms[form] = ib.convert(model, scales, form=form, backend="auto").eval()
    return variant


def check_save_load(v: Variant, form: str, tmp: Path) -> None:
    q = v.forms[form]
    ib.save(q, tmp / form)
    loaded = ib.load(v.skeleton(), tmp / form)
    x = v.inputs()
    assert torch.equal(call(loaded, x), call(q, x))


def _flat_inputs(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, dict):
        return [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if isinstance(inputs, tuple):
        return list(inputs)
    return [inputs]


def check_onnx(v: Variant, form: str, tmp: Path) -> float:
    """Export with the first shape, run onnxruntime on both shapes; returns the lower SQNR vs eager (dB)."""
    import onnxruntime as ort

    q = v.forms[form]
    path = ib.export_onnx(q, v.inputs(), tmp / f"{form}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = float("inf")
    for shape in SHAPES:
        x = v.inputs(shape)
        feeds = dict(zip(names, (t.numpy() for t in _flat_inputs(x)), strict=True))
        got = torch.from_numpy(session.run(None, feeds)[0])
        ref = call(q, x)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        worst = min(worst, sqnr(ref, got))
    return worst


def check_compile(v: Variant, form: str) -> float:
    """torch.compile(fullgraph=True) on the first shape; returns SQNR vs eager (inf: equal)."""
    q = v.forms[form]
    x = v.inputs()
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True)
    got = call(compiled, x)
    torch._dynamo.reset()
    return sqnr(call(q, x), got)


def float_onnx_error(v: Variant) -> str:
    """torch.onnx.export's own error for the float model (the innermost cause), "" if it exports."""
    model = CASES[v.name].build()
    for m in model.modules():  # as ib.export_onnx does: no key/value cache among the outputs
        if getattr(getattr(m, "config", None), "use_cache", None):
            m.config.use_cache = False
    inputs = v.inputs()
    try:
        torch.onnx.export(model, (), kwargs=inputs, dynamo=True, opset_version=21, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; its message is the point
        while exc.__cause__ is not None:
            exc = exc.__cause__
        return str(exc)
    return ""
