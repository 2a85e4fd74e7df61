"""Save and load quantized models: ``save(qmodel, dir)``, ``load(skeleton, dir)``.

A saved model is a directory with ``model.safetensors`` (every tensor; FP8 as float8 safetensors
dtypes, subclass weights flattened) and ``inc_bridge.json`` (format version, library versions,
per-layer form, kind, class and configuration, per-tensor dtype, shape and SHA-256, recipe and
scales). ``registry`` holds the extension points new quantized kinds plug into. See
``docs/serialization.md``.
"""

from .files import FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE
from .loading import load
from .registry import InPlaceKind, register_in_place_kind, register_module_class, register_tensor_class
from .saving import save

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "TENSORS_FILE",
    "InPlaceKind",
    "load",
    "register_in_place_kind",
    "register_module_class",
    "register_tensor_class",
    "save",
]
