"""``save``: a quantized model → a directory that ``load`` turns back into the same model."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchao.utils import TorchAOBaseTensor

from .._version import __version__
from ..convert import _RESULT_ATTR, ConversionResult
from ..errors import SerializationError
from ..formats import dtype_name
from ..nn._fp8_module import Fp8Module
from . import registry
from .files import FORMAT_NAME, FORMAT_VERSION, staging_dir, tensor_record, write_manifest, write_tensors

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def save(qmodel: nn.Module, path: Path | str, *, overwrite: bool = False) -> Path:
    """Save a quantized model (either form) as ``path/model.safetensors`` + ``path/inc_bridge.json``.

    Every parameter and buffer is saved (non-persistent buffers too, so that a skeleton built on
    the meta device can be filled completely); FP8 tensor subclasses are flattened into their
    components. The directory appears at ``path`` only once complete: an error, Ctrl-C or a crash
    midway leaves ``path`` as it was (``serialization.publish`` says how), and the directory and
    files get the modes ``mkdir`` / ``open`` give under the umask.

    Args:
        qmodel: from ``inc_bridge.convert`` / ``quantize`` / ``load``. Its recipe, scales and skipped
            layers are recorded when ``conversion_result(qmodel)`` has them.
        path: the directory to create (missing parents are created); an empty directory is taken.
        overwrite: replace a directory that holds an earlier inc_bridge save, in one atomic step.
            Anything else at ``path`` (a folder with other files, a file, a link) is refused.
    Returns:
        ``path`` as a Path.
    Raises:
        SerializationError: a layer's class or tensor type cannot be saved, a tensor has no data
            (meta device), ``path`` is not a directory name (``.``, ``""``), holds something other
            than a save, or exists and ``overwrite`` is False (also when another save to it
            finished first).

    Example:
        >>> ib.save(qmodel, "out/model")   # doctest: +SKIP
    """
    tensors, manifest = describe(qmodel)
    path = Path(path)
    try:
        with staging_dir(path, overwrite) as tmp:
            write_tensors(tmp, tensors)
            write_manifest(tmp, manifest)
    except OSError as exc:
        raise SerializationError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return path


def describe(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write (CPU, contiguous, unshared) and the manifest."""
    result: ConversionResult | None = getattr(qmodel, _RESULT_ATTR, None)
    kinds = result.converted if result is not None else {}
    module_classes = registry.module_classes()
    layers: dict[str, dict[str, Any]] = {}
    module_layers: list[str] = []  # names of module-form / in-place layers: their subtree belongs to them
    writer = _TensorWriter()

    for name, module in qmodel.named_modules():
        inside = next((p for p in module_layers if name.startswith(p + ".")), None)
        cls = type(module)
        if inside is None and module_classes.get(cls.__name__) is cls:
            layers[name] = {"form": "module", "kind": kinds.get(name), "class": cls.__name__,
                            "config": _json_config(name, module.quant_config())}
            module_layers.append(name)
        elif inside is None and (found := registry.in_place_kind_of(module)) is not None:
            kind, config = found
            layers[name] = {"form": "subclass", "kind": kinds.get(name), "module_class": _qualname(cls),
                            "in_place": kind.name, "config": _json_config(name, config)}
            module_layers.append(name)
        elif inside is None and isinstance(module, Fp8Module):
            raise SerializationError(
                f"layer {name!r}: {cls.__name__} cannot be saved: it has no quant_config() / from_config() "
                f"(savable module classes: {', '.join(sorted(module_classes))})"
            )
        own = [(n, t, False) for n, t in module._parameters.items() if t is not None]
        own += [(n, t, True) for n, t in module._buffers.items() if t is not None]
        for local, t, _ in own:
            full = f"{name}.{local}" if name else local
            if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer):
                layer = layers.setdefault(name, {"form": "subclass", "kind": kinds.get(name), "module_class": _qualname(cls)})
                layer.setdefault("tensors", {})[local] = _flatten(full, t, writer)
                continue
            if t.dtype in FP8_DTYPES and inside is None and name not in module_layers:
                raise SerializationError(
                    f"tensor {full!r}: an FP8 tensor in {cls.__name__} {name!r}, which is not a registered quantized "
                    "module class; inc_bridge could not rebuild it"
                )
            writer.add(full, t)

    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "form": result.form.value if result is not None else _form_of(layers),
        "backend": result.backend if result is not None else None,
        "backend_requested": result.backend_requested if result is not None else None,
        "layers": layers,
        "skipped": dict(result.skipped) if result is not None else {},
        "recipe": result.recipe.model_dump(mode="json") if result is not None and result.recipe is not None else None,
        "scales": result.scales.to_dict() if result is not None and result.scales is not None else None,
        "kv_cache": list(result.kv_cache) if result is not None else [],
        "tensors": writer.records,
        "aliases": writer.aliases,
    }
    return writer.tensors, manifest


class _TensorWriter:
    """Collects tensors under their file names: ties become aliases, shared storage is copied apart."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.aliases: dict[str, str] = {}
        self._first_name: dict[int, str] = {}
        self._storages: set[int] = set()

    def add(self, name: str, t: torch.Tensor) -> None:
        if id(t) in self._first_name:  # a tied parameter: one tensor under two names
            self.aliases[name] = self._first_name[id(t)]
            return
        if t.is_meta:
            raise SerializationError(f"tensor {name!r} is on the meta device: it has no data to save")
        self._first_name[id(t)] = name
        data = t.detach().to("cpu").contiguous()
        storage = data.untyped_storage()
        # safetensors refuses tensors that share memory; a view of a larger storage is copied out too.
        if storage.data_ptr() in self._storages or storage.nbytes() != data.nbytes:
            data = data.clone()
        self._storages.add(data.untyped_storage().data_ptr())
        self.tensors[name] = data
        self.records[name] = tensor_record(data)


def _flatten(full: str, t: torch.Tensor, writer: _TensorWriter) -> dict[str, Any]:
    cls = type(t)
    if registry.tensor_classes().get(cls.__name__) is not cls or not isinstance(t, TorchAOBaseTensor):
        raise SerializationError(
            f"tensor {full!r} is a {cls.__name__}, which inc_bridge cannot save "
            f"(savable tensor classes: {', '.join(sorted(registry.tensor_classes()))})"
        )
    names, attrs = t.__tensor_flatten__()
    for data_name in names:
        writer.add(f"{full}.{data_name}", getattr(t, data_name))
    return {
        "class": cls.__name__,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "data": list(names),
        "attributes": {k: _encode_attr(full, k, v) for k, v in attrs.items()},
    }


def _encode_attr(full: str, key: str, value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"torch.dtype": dtype_name(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode_attr(full, key, v) for v in value]
    raise SerializationError(f"tensor {full!r}: attribute {key!r} of type {type(value).__name__} cannot be saved")


def _json_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    import json

    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"layer {name!r}: its quant_config() is not plain JSON: {exc}") from None
    return config


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _form_of(layers: dict[str, dict[str, Any]]) -> str:
    return "module" if any(rec["form"] == "module" for rec in layers.values()) else "subclass"


def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "inc_bridge": __version__,
        "torch": torch.__version__,
        "torchao": version("torchao"),
        "neural_compressor": version("neural-compressor-pt") or version("neural-compressor"),
        "safetensors": version("safetensors"),
    }
