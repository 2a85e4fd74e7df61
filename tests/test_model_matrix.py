"""The model matrix: 20 models users quantized, each checked out of eager PyTorch.

Per model (tests/matrix_models.py: tiny transformers configs with random weights, plain-torch
re-implementations of the ResNet / MobileNet-v3 / ConvNeXt / EfficientNet blocks because torchvision
and timm cannot be installed beside this torch build, nn.TransformerEncoder and small plain models),
with and without attention capture, both forms, backend auto:

* the two forms give ``torch.equal`` outputs;
* ``ib.save`` / ``ib.load`` gives ``torch.equal`` outputs;
* ``ib.export_onnx`` + onnxruntime on two input shapes (batch and sequence length / image size
  differ from the example's) stays within ``ONNX_MIN_SQNR`` of eager;
* ``torch.compile(fullgraph=True)`` runs and stays within ``COMPILE_MIN_SQNR`` of eager.

The last test renders the matrix (model x check) from these results; docs/compile.md holds it,
written by ``INC_BRIDGE_WRITE_MATRIX=1 pytest tests/test_model_matrix.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import inc_bridge as ib

from . import matrix_checks as mc
from .matrix_models import CASES

pytestmark = pytest.mark.matrix

# onnxruntime computes the float glue (matmul accumulation, softmax, layer norm, GELU) in its own
# order; an activation that lands next to an FP8 rounding boundary may then round to the
# neighbouring FP8 value. Measured: >= 60 dB on every model, most are bit-identical (inf).
ONNX_MIN_SQNR = 40.0
# Inductor fuses the float glue around the opaque inc_bridge kernels (layer norm, softmax, GELU,
# rotary embeddings) and may reassociate it, with the same FP8 rounding-boundary effect. Measured:
# >= 60 dB; most models are bit-identical (inf).
COMPILE_MIN_SQNR = 40.0

VARIANTS = [(name, attention) for name, case in CASES.items()
            for attention in ((False, True) if case.attention_ops else (False,))]
FORMS = ("subclass", "module")
CHECKS = ("forms equal", "save/load", "onnx", "compile")
RESULTS: dict[tuple[str, bool, str, str], str] = {}  # (model, attention, check, form) -> cell text
DOC = Path(__file__).resolve().parent.parent / "docs" / "compile.md"
BEGIN, END = "<!-- model-matrix:begin -->", "<!-- model-matrix:end -->"


def _id(v: tuple[str, bool]) -> str:
    return f"{v[0]}-{'attention' if v[1] else 'plain'}"


@pytest.fixture(scope="module")
def variant():
    cache: dict[tuple[str, bool], mc.Variant] = {}

    def get(name: str, attention: bool) -> mc.Variant:
        if (name, attention) not in cache:
            cache.clear()  # one model at a time in memory; tests run variant by variant
            cache[(name, attention)] = mc.build_variant(name, attention)
        return cache[(name, attention)]

    return get


def _db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.0f} dB"


@pytest.mark.parametrize("v", VARIANTS, ids=_id)
def test_matrix(variant, v, tmp_path):
    """All checks of one model variant, both forms (one test: the quantized model is built once)."""
    name, attention = v
    for check in CHECKS:  # a check that raises leaves its cells marked failed
        for form in (("",) if check == "forms equal" else FORMS):
            RESULTS[(name, attention, check, form)] = "FAILED"
    q = variant(name, attention)
    x = q.inputs()
    assert torch.equal(mc.call(q.forms["subclass"], x), mc.call(q.forms["module"], x))
    RESULTS[(name, attention, "forms equal", "")] = "equal"
    for form in FORMS:
        mc.check_save_load(q, form, tmp_path)
        RESULTS[(name, attention, "save/load", form)] = "equal"
    fails = CASES[name].onnx_float_attention_fails
    if fails and not attention:  # float attention the exporter cannot take: the float model fails too
        assert fails in mc.float_onnx_error(q)
        for form in FORMS:
            with pytest.raises(ib.SerializationError, match=fails):
                mc.check_onnx(q, form, tmp_path)
            RESULTS[(name, attention, "onnx", form)] = "float fails too"
    for form in FORMS if not (fails and not attention) else ():
        onnx = mc.check_onnx(q, form, tmp_path)
        assert onnx >= ONNX_MIN_SQNR, f"{form}: onnxruntime vs eager {onnx:.1f} dB"
        RESULTS[(name, attention, "onnx", form)] = _db(onnx)
    for form in FORMS:
        compiled = mc.check_compile(q, form)
        assert compiled >= COMPILE_MIN_SQNR, f"{form}: compiled vs eager {compiled:.1f} dB"
        RESULTS[(name, attention, "compile", form)] = _db(compiled)


COLUMNS = [("forms equal", "")] + [(c, f) for c in CHECKS[1:] for f in FORMS]


def _row(name: str, attention: bool) -> str:
    case = CASES[name]
    ops = ", ".join(case.attention_ops if attention else case.plain_ops)
    return f"| {name} | {ops} | " + " | ".join(RESULTS[(name, attention, c, f)] for c, f in COLUMNS) + " |"


def _key(row: str) -> tuple[str, str]:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return cells[0], cells[1]


def render(documented: list[str]) -> str:
    """The matrix as a markdown table, one row per model variant, one column per check and form.

    Rows of variants this run did not check (a ``-k`` selection) are kept from ``documented``.
    """
    head = "| model | ops | " + " | ".join(f"{c} ({f})" if f else c for c, f in COLUMNS) + " |"
    old = {_key(r): r for r in documented}
    rows = []
    for name, attention in VARIANTS:
        case = CASES[name]
        ops = ", ".join(case.attention_ops if attention else case.plain_ops)
        if (name, attention, "forms equal", "") in RESULTS:
            rows.append(_row(name, attention))
        elif (name, ops) in old:
            rows.append(old[(name, ops)])
    return "\n".join([head, "|" + "---|" * (len(COLUMNS) + 2), *rows])


def _documented() -> tuple[str, list[str]]:
    text = DOC.read_text()
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip().splitlines()
    return text, block[2:]


def test_matrix_table_in_the_docs():
    """docs/compile.md shows the matrix these tests produced: the same models, ops and checks, all passed.

    ``INC_BRIDGE_WRITE_MATRIX=1`` writes this run's rows into it instead.
    """
    text, documented = _documented()
    if os.environ.get("INC_BRIDGE_WRITE_MATRIX"):
        table = render(documented)
        print("\n" + table)
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        return
    expected = {(name, ", ".join(CASES[name].attention_ops if a else CASES[name].plain_ops)) for name, a in VARIANTS}
    assert sorted(map(_key, documented)) == sorted(expected)
    # Figures vary by CPU (onnxruntime's and inductor's kernels); what must hold is that every cell passed.
    cells = [c.strip() for r in documented for c in r.strip().strip("|").split("|")[2:]]
    assert len(cells) == len(documented) * len(COLUMNS)
    assert all(re.fullmatch(r"equal|exact|\d+ dB|float fails too", c) for c in cells), cells
