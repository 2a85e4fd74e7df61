"""safe_io: the one reader of untrusted files and the one atomic writer."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from inc_bridge import safe_io
from inc_bridge.errors import RecipeError, SerializationError


def test_reads_a_regular_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert safe_io.loads_json(safe_io.read_text(path, max_bytes=100, error=RecipeError), origin="a",
                              error=RecipeError) == {"a": [1, 2]}


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            safe_io.read_bytes(fifo, max_bytes=100, error=SerializationError)
        except SerializationError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in result["error"]


def test_devices_and_directories_are_refused(tmp_path):
    for path in ("/dev/zero", tmp_path):
        with pytest.raises(SerializationError, match="not a regular file"):
            safe_io.read_bytes(path, max_bytes=100, error=SerializationError)


def test_size_cap_is_checked_before_reading(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    with pytest.raises(RecipeError, match="larger than the 100-byte limit"):
        safe_io.read_bytes(path, max_bytes=100, error=RecipeError)
    assert safe_io.read_bytes(path, max_bytes=101, error=RecipeError) == b"x" * 101


def test_symlink_out_of_the_directory_is_refused(tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("secret")
    inside = tmp_path / "dir"
    inside.mkdir()
    (inside / "link").symlink_to(outside)
    (inside / "ok").write_text("ok")
    (inside / "link_in").symlink_to(inside / "ok")
    with pytest.raises(SerializationError, match="outside"):
        safe_io.read_bytes(inside / "link", max_bytes=100, error=SerializationError, within=inside)
    assert safe_io.read_bytes(inside / "link_in", max_bytes=100, error=SerializationError, within=inside) == b"ok"


def test_non_utf8_and_deep_json_raise_the_given_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(RecipeError, match="not UTF-8"):
        safe_io.read_text(path, max_bytes=100, error=RecipeError)
    with pytest.raises(RecipeError, match="nested too deeply"):
        safe_io.loads_json("[" * 100_000 + "]" * 100_000, origin="x", error=RecipeError)
    with pytest.raises(RecipeError, match="nested too deeply"):
        safe_io.loads_json("[" * 65 + "]" * 65, origin="x", error=RecipeError)
    assert safe_io.loads_json("[" * 64 + "]" * 64, origin="x", error=RecipeError) is not None
    with pytest.raises(RecipeError, match="not a JSON number"):
        safe_io.loads_json('{"a": NaN}', origin="x", error=RecipeError)


def test_write_atomic_follows_the_umask_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    old = os.umask(0o027)
    try:
        safe_io.write_atomic(path, "one")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    safe_io.write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_shorten_caps_messages():
    assert safe_io.shorten("x" * 10_000).endswith("(10000 characters)")
    assert len(safe_io.shorten("x" * 10_000)) < 300
