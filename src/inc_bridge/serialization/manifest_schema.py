"""The manifest's schema: every section ``load`` reads has the type it expects, checked once.

``inc_bridge.json`` is data from somewhere else. Checked here right after parsing, so that loading
can index it without meeting a number where a record should be (``"layers": {"fc": 3}``), a list
where a config should be, or a shape given as a string. Only structure is checked here; what the
values mean (dtypes, classes, shapes against the skeleton) is checked where they are used.
"""

from __future__ import annotations

from typing import Any

from ..errors import SerializationError
from ..safe_io import shorten


class _Schema:
    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise SerializationError(f"{self.origin}: {field} must be {expected}, got {shorten(value, 80)}")

    def str_(self, field: str, value: Any, optional: bool = False) -> None:
        if not (isinstance(value, str) or (optional and value is None)):
            self.fail(field, "a string" + (" or null" if optional else ""), value)

    def obj(self, field: str, value: Any, optional: bool = False) -> None:
        if not (isinstance(value, dict) or (optional and value is None)):
            self.fail(field, "a JSON object" + (" or null" if optional else ""), value)

    def shape(self, field: str, value: Any) -> None:
        if not (isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)):
            self.fail(field, "a list of non-negative integers", value)

    def str_map(self, field: str, value: Any, optional: bool = False) -> None:
        self.obj(field, value, optional)
        for k, v in (value or {}).items():
            self.str_(f"{field}[{k!r}]", v)


def check_manifest_schema(manifest: dict[str, Any], origin: str) -> None:
    """Raise SerializationError naming ``origin`` and the field for any section of the wrong type."""
    s = _Schema(origin)
    versions = manifest.get("versions", {})
    s.obj('"versions"', versions)
    for k, v in versions.items():
        s.str_(f'"versions"[{k!r}]', v, optional=True)
    for key in ("form", "backend", "backend_requested"):
        s.str_(f'"{key}"', manifest.get(key), optional=key != "form")
    s.obj('"recipe"', manifest.get("recipe"), optional=True)
    s.obj('"scales"', manifest.get("scales"), optional=True)
    s.str_map('"skipped"', manifest.get("skipped"), optional=True)
    s.str_map('"aliases"', manifest.get("aliases"))
    kv_cache = manifest.get("kv_cache", [])  # absent in files written before the FP8 KV cache
    if not (isinstance(kv_cache, list) and all(isinstance(n, str) for n in kv_cache)):
        s.fail('"kv_cache"', "a list of attention module names", kv_cache)
    tensors = manifest.get("tensors")
    s.obj('"tensors"', tensors)
    for name, rec in tensors.items():
        field = f'"tensors"[{shorten(name, 80)!r}]'
        s.obj(field, rec)
        s.str_(f"{field}.dtype", rec.get("dtype"))
        s.shape(f"{field}.shape", rec.get("shape"))
        s.str_(f"{field}.sha256", rec.get("sha256"))
    layers = manifest.get("layers")
    s.obj('"layers"', layers)
    for name, rec in layers.items():
        _check_layer(s, f'"layers"[{shorten(name, 80)!r}]', rec)


def _check_layer(s: _Schema, field: str, rec: Any) -> None:
    s.obj(field, rec)
    form = rec.get("form")
    if form not in ("module", "subclass"):
        s.fail(f"{field}.form", '"module" or "subclass"', form)
    s.str_(f"{field}.kind", rec.get("kind"), optional=True)
    if form == "module":
        s.str_(f"{field}.class", rec.get("class"))
        s.obj(f"{field}.config", rec.get("config"))
        return
    s.str_(f"{field}.module_class", rec.get("module_class"))
    if "in_place" in rec:
        s.str_(f"{field}.in_place", rec["in_place"])
        s.obj(f"{field}.config", rec.get("config"))
        return
    tensors = rec.get("tensors")
    s.obj(f"{field}.tensors", tensors)
    for local, trec in tensors.items():
        tfield = f"{field}.tensors[{shorten(local, 80)!r}]"
        s.obj(tfield, trec)
        s.str_(f"{tfield}.class", trec.get("class"))
        s.str_(f"{tfield}.dtype", trec.get("dtype"))
        s.shape(f"{tfield}.shape", trec.get("shape"))
        data = trec.get("data")
        if not (isinstance(data, list) and all(isinstance(d, str) for d in data)):
            s.fail(f"{tfield}.data", "a list of strings", data)
        s.obj(f"{tfield}.attributes", trec.get("attributes"))
