"""Real model: all-MiniLM-L6-v2 (trained BERT, 22.7M parameters), all Linear layers in FP8 E4M3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import inc_bridge as ib

from .models import SENTENCES, embed, inc_reference, load_minilm, minilm_batches

pytestmark = pytest.mark.slow

RECIPE = ib.Recipe.model_validate({"quantization": {"ops": ["linear"]}})


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    calib = minilm_batches(tokenizer, SENTENCES[::2])  # calibrate on half of the sentences
    evaluate = minilm_batches(tokenizer, SENTENCES)  # evaluate on all 36
    reference = embed(model, evaluate)
    meas = ib.calibrate(model, calib, RECIPE)
    scales = ib.compute_scales(meas, RECIPE, model=model)
    return model, calib, evaluate, reference, scales


def test_embeddings_close_to_fp32_and_forms_identical(minilm):
    model, _, evaluate, reference, scales = minilm
    assert len(scales) == 37  # 6 layers x 6 Linear + pooler
    sub = embed(ib.convert(model, scales, form="subclass"), evaluate)
    mod = embed(ib.convert(model, scales, form="module"), evaluate)
    assert torch.equal(sub, mod)
    cosine = (sub * reference).sum(-1)
    assert len(cosine) >= 32
    print(f"MiniLM FP8 E4M3 maxabs_arbitrary: mean cosine {cosine.mean():.5f}, min {cosine.min():.5f}")
    assert cosine.mean() >= 0.997


def test_embeddings_equal_to_inc_converted_model(minilm):
    model, calib, evaluate, _, scales = minilm
    inc_model = inc_reference(model, calib, torch.float32, "maxabs_arbitrary")
    ours = embed(ib.convert(model, scales, form="module"), evaluate)
    assert torch.equal(embed(inc_model, evaluate), ours)


def test_linear_weight_bytes_at_most_051_of_bf16(minilm):
    model, _, _, _, scales = minilm
    bf16_bytes = sum(m.weight.numel() * 2 for m in model.modules() if type(m) is nn.Linear)
    qmod = ib.convert(model, scales, form="module")
    qsub = ib.convert(model, scales, form="subclass")
    mod_bytes = sum(
        m.qweight.numel() * m.qweight.element_size() + m.weight_scale.numel() * 4 + m.input_scale.numel() * 4
        for m in qmod.modules() if isinstance(m, ib.nn.QuantizedLinear)
    )
    sub_bytes = sum(
        w.qdata.numel() * w.qdata.element_size() + w.scale.numel() * 4 + w.act_scale.numel() * 4
        for w in (m.weight for m in qsub.modules() if type(m) is nn.Linear)
    )
    print(f"Linear weight bytes: bf16 {bf16_bytes}, module form {mod_bytes}, subclass form {sub_bytes}")
    assert mod_bytes <= 0.51 * bf16_bytes and sub_bytes <= 0.51 * bf16_bytes
    assert all(
        isinstance(m.weight, ib.Float8StaticTensor) and m.weight.qdata.dtype == torch.float8_e4m3fn
        for m in qsub.modules() if type(m) is nn.Linear
    )
