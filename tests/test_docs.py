"""Docs that name tests name tests that exist."""

from __future__ import annotations

import re

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
