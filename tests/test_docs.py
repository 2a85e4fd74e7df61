"""Docs that name tests name tests that exist."""

from __future__ import annotations

import re

import pytest

from .conftest import REPO


def test_security_page_names_existing_tests():
    doc = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    current, named, missing = None, 0, []
    for m in re.finditer(r"(tests/test_[a-z_]+\.py)(?:::([a-z_0-9]+))?|`::([a-z_0-9]+)`", doc):
        if m.group(1):
            current = m.group(1)
        name = m.group(2) or m.group(3)
        if name:
            named += 1
            if f"def {name}(" not in (REPO / current).read_text(encoding="utf-8"):
                missing.append(f"{current}::{name}")
    assert named >= 40 and missing == []


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    """docs/quickstart.md's code blocks form one script; its asserts are the page's claims."""
    doc = (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8")
    script = "\n".join(re.findall(r"```python\n(.*?)```", doc, flags=re.S))
    assert "ib.quantize" in script
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "docs/quickstart.md", "exec"), {"__name__": "quickstart"})


def test_llm_page_runs_as_written(tmp_path, monkeypatch):
    """docs/llm.md on a tiny Llama saved to models/llama: its Python blocks as one script, then its
    ``inc-bridge quantize`` command through the CLI's main (``--format onnx``: tests/test_cli_hf.py)."""
    import json
    import shlex

    pytest.importorskip("compressed_tensors")
    pytest.importorskip("onnx")
    from inc_bridge.cli import main

    from .llm_models import write_model_dir

    doc = (REPO / "docs" / "llm.md").read_text(encoding="utf-8")
    script = "\n".join(re.findall(r"```python\n(.*?)```", doc, flags=re.S))
    commands = [line for block in re.findall(r"```bash\n(.*?)```", doc, flags=re.S) for line in block.splitlines()
                if line.startswith("inc-bridge quantize ")]
    assert "ib.save_pretrained" in script and len(commands) == 1
    monkeypatch.chdir(tmp_path)
    write_model_dir(tmp_path / "models" / "llama")
    samples = [" ".join(f"w{(7 * i + j) % 100}" for j in range(12)) for i in range(6)]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in samples))
    exec(compile(script, "docs/llm.md", "exec"), {"__name__": "llm_page"})
    for command in commands:
        assert main(shlex.split(command)[1:] + ["--quiet"]) == 0, command
    assert (tmp_path / "llama-fp8" / "config.json").is_file() and (tmp_path / "out" / "llama.onnx").is_file()
    from neural_compressor.torch.quantization import FP8Config

    (quant_config,) = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, flags=re.S) if "dump_stats_path" in b]
    assert FP8Config(**quant_config).to_dict()["dump_stats_path"] == "out/inc/measure"  # keys INC's config takes
