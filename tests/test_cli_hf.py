"""``inc-bridge quantize`` and ``tune`` on a Hugging Face model folder with calibration text."""

from __future__ import annotations

import json
import os

import pytest
import torch

import inc_bridge as ib
from inc_bridge.cli import main
from inc_bridge.hf_folder import load_model_folder, mean_log_likelihood, read_calibration_texts, token_batches

from .llm_models import assert_equal_up_to_gemm_order, write_model_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SAMPLES = ["w1 w2 w3 w4 w5 w6 w7 w8", "w9 w10 w11 w12 w13", "w20 w21 w22 w23 w24 w25", "w30 w31 w32 w33 w34 w35 w36"]


@pytest.fixture
def folder(tmp_path):
    return write_model_dir(tmp_path / "tiny-llama")


@pytest.fixture
def calib_txt(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(SAMPLES[:2] + [""] + SAMPLES[2:]) + "\n")
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantize_writes_a_checkpoint_equal_to_the_python_api(folder, calib_txt, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(folder), "--calib", str(calib_txt), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "quantized 15 layers with 4 calibration samples" in printed.out
    assert "calibrating" in printed.err  # the progress bar, on stderr

    model, tokenizer = load_model_folder(folder)
    batches = token_batches(tokenizer, read_calibration_texts(calib_txt), 512)
    assert len(batches) == 4  # the empty line is no sample
    q = ib.quantize(model, batches)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer(["w40 w41 w42 w43 w44"], return_tensors="pt")["input_ids"]
    assert_equal_up_to_gemm_order(_logits(q, ids), _logits(loaded, ids))
    assert transformers.AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == tokenizer("w5 w6")["input_ids"]


def test_quantize_jsonl_to_the_inc_bridge_format(folder, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(SAMPLES)))
    out = tmp_path / "ib"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("quantization:\n  weight: {granularity: per_channel}\nform: module\n")
    assert main(["quantize", "--model", str(folder), "--calib", str(calib), "--recipe", str(recipe), "--out", str(out),
                 "--format", "inc_bridge", "--max-samples", "3", "--seq-len", "4", "--quiet"]) == 0
    manifest = json.loads((out / "inc_bridge.json").read_text())
    assert manifest["form"] == "module" and len(manifest["layers"]) == 15
    config = transformers.AutoConfig.from_pretrained(out)
    loaded = ib.load(transformers.AutoModelForCausalLM.from_config(config).eval(), out)
    assert loaded.model.layers[0].mlp.up_proj.weight_scale.shape == (128, 1)


def test_quantize_to_onnx(folder, calib_txt, tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    assert main(["quantize", "--model", str(folder), "--calib", str(calib_txt), "--out", str(out), "--format", "onnx",
                 "--quiet"]) == 0
    import onnx

    graph = onnx.load(str(out)).graph
    assert any(init.data_type == onnx.TensorProto.FLOAT8E4M3FN for init in graph.initializer)


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("none", ["--model", "{tmp}/missing"], r"missing: not a model folder \(no such directory\)"),
    ("empty_dir", ["--model", "{tmp}/empty"], r"empty: not a Hugging Face model folder \(no config.json\)"),
    ("none", ["--calib", "{tmp}/missing.txt"], r"missing.txt: cannot read calibration text"),
    ("csv", ["--calib", "{tmp}/calib.csv"], r"calib.csv: calibration text must be a .txt file"),
    ("bad_jsonl", ["--calib", "{tmp}/bad.jsonl"], r"bad.jsonl, line 2: expected a JSON object with a string \"text\""),
    ("broken_jsonl", ["--calib", "{tmp}/broken.jsonl"], r"broken.jsonl, line 1: not valid JSON"),
    ("blank", ["--calib", "{tmp}/blank.txt"], r"blank.txt: no calibration samples"),
])
def test_quantize_errors_are_one_line_and_exit_2(folder, calib_txt, tmp_path, capsys, setup, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "calib.csv").write_text("w1 w2\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"content": "w3"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    (tmp_path / "blank.txt").write_text("\n  \n")
    given = {"--model": str(folder), "--calib": str(calib_txt), "--out": str(tmp_path / "out")}
    given.update(dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2]), strict=True)))
    assert main(["quantize", *[x for kv in given.items() for x in kv], "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inc-bridge quantize: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_tune_takes_a_model_folder_and_calibration_text(folder, calib_txt, tmp_path, capsys):
    out = tmp_path / "tune"
    rc = main(["tune", "--model", str(folder), "--calib", str(calib_txt), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc in (0, 1) and "baseline" in printed  # 1: the tolerance was not met, which is a result too
    model, tokenizer = load_model_folder(folder)
    baseline = mean_log_likelihood(token_batches(tokenizer, read_calibration_texts(calib_txt), 512))(model)
    assert f"baseline {baseline:.6g}," in printed  # the default metric: mean token log-likelihood of the text
    assert ib.load_recipe(out / "locked_recipe.yaml").quantization.weight.granularity.value in ("per_tensor", "per_channel")
    assert os.path.isfile(out / "report" / "report.json")


def test_tune_needs_model_and_calib_together(calib_txt, capsys):
    assert main(["tune", "--calib", str(calib_txt)]) == 2
    assert "--model and --calib go together" in capsys.readouterr().err
