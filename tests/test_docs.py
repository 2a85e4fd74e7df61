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


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_name_api_paths_and_tests_that_exist():
    """Every ``ib.<name>`` in README and docs/ exists, every repo path they cite exists, and every
    ``tests/...py::name`` is a test or class in that file."""
    import inc_bridge as ib

    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        where = doc.relative_to(REPO)
        for dotted in set(re.findall(r"\bib\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)", text)):
            obj = ib
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                missing.append(f"{where}: ib.{dotted}")
        for path in set(re.findall(r"\b((?:tests|benchmarks|recipes|src/inc_bridge)/[\w./-]+\.(?:py|yaml|c))", text)):
            if not (REPO / path).exists():
                missing.append(f"{where}: {path}")
        for path, name in set(re.findall(r"(tests/test_\w+\.py)::(\w+)", text)):
            source = (REPO / path).read_text(encoding="utf-8") if (REPO / path).exists() else ""
            if f"def {name}(" not in source and f"class {name}(" not in source:
                missing.append(f"{where}: {path}::{name}")
        for page in set(re.findall(r"\]\(((?:docs/)?[\w]+\.md)(?:#[^)]*)?\)", text)):
            if not (doc.parent / page).exists():
                missing.append(f"{where}: link to {page}")
    assert missing == []


def test_recipes_page_documents_every_recipe_field():
    """docs/recipes.md has a row (or a section) for every field of the recipe schema: a section that
    is parsed but undocumented is how ``tuning.sensitivity`` went unnoticed."""
    from pydantic import BaseModel

    from inc_bridge.recipe import Recipe

    doc = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w.]+)`", doc, flags=re.M))
    sections = {name for pair in re.findall(r"^## `(\w+)`(?:, `(\w+)`)?", doc, flags=re.M) for name in pair if name}

    def leaves(model: type[BaseModel], prefix: str = ""):
        for name, info in model.model_fields.items():
            nested = [a for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
            if nested and name != "locked":
                yield from leaves(nested[0], f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    def documented(path: str) -> bool:
        parts = path.split(".")
        tails = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
        return bool(tails & rows) or (len(parts) == 1 and path in sections)

    undocumented = [path for path in leaves(Recipe) if not documented(path)]
    assert undocumented == []


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
