"""``load``: a saved directory + a freshly built float model → the quantized model, checked first.

Loading runs in two phases. ``_Plan`` reads and checks everything (both files, every name, shape,
dtype and checksum, every layer against the skeleton) and builds the new modules and tensors off to
the side; only then does ``_Plan.apply`` install them, with plain assignments that cannot fail half
way. A failed load therefore leaves the skeleton exactly as it was.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import hf_attention_sites
from ..capture_rewrite import disable_fast_paths_above
from ..convert import _RESULT_ATTR, ConversionResult, _set_submodule
from ..errors import BackendUnavailableError, RecipeError, SerializationError
from ..formats import dtype_from_name, dtype_name
from ..fp8_checks import check_scale_values
from ..kernels import resolve_backend
from ..kv_cache import enable_fp8_kv_cache
from ..nn._fp8_module import Fp8Module
from ..recipe import Form, Recipe
from ..safe_io import shorten
from . import registry
from .files import MANIFEST_FILE, TENSORS_FILE, read_manifest, read_tensors
from .saving import FP8_DTYPES, _qualname

_FORMAT_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def load(
    model_skeleton: nn.Module,
    path: Path | str,
    *,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> nn.Module:
    """Rebuild a model saved by ``save`` inside ``model_skeleton``, in place.

    No calibration data and no INC are needed: the skeleton only provides the architecture. It may
    be built on the meta device; its float dtype must be the saved model's (build it in bf16, or
    ``.to(torch.bfloat16)`` it, for a bf16 model). A model with captured attention needs
    ``inc_bridge.capture_attention(skeleton)`` first, as before quantizing.

    Args:
        model_skeleton: a freshly constructed float model of the saved architecture.
        path: the directory ``save`` wrote.
        device: where the loaded tensors go.
        backend: run the quantized layers with this kernel backend instead of the saved one. A
            model converted with backend "auto" picks again here, for ``device`` (e.g. "emulated"
            where the cpu backend's native library is not built).
    Returns:
        ``model_skeleton``, now the quantized model; ``conversion_result`` works on it.
    Raises:
        SerializationError: a file is missing, truncated or corrupted, was written by a newer
            format version, or does not match the skeleton (names, shapes, dtypes, layer types),
            or a saved backend is not available here. The message names the file, the tensor or
            layer and the mismatch; the skeleton is unchanged.

    Example:
        >>> with torch.device("meta"):
        ...     skeleton = MyNet()
        >>> qmodel = ib.load(skeleton, "out/model")   # doctest: +SKIP
    """
    directory = Path(path)
    _check_device(device)
    manifest = read_manifest(directory)
    tensors = read_tensors(directory, manifest, device)
    requested = backend if backend is not None else manifest.get("backend_requested")
    if requested == "auto":
        backend = resolve_backend("auto", torch.device(device).type)
    plan = _Plan(model_skeleton, manifest, tensors, directory, backend, requested)
    plan.apply()
    return model_skeleton


def _check_device(device: torch.device | str) -> None:
    """The tensors can go to ``device`` here (a CPU-only torch asserts on "cuda" deep inside ``.to``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SerializationError(f"device {shorten(device, 60)}: not a torch device (e.g. \"cpu\", \"cuda:0\")") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {str(dev)!r}: CUDA is not available in this torch build or on this machine; "
                                      "load with device=\"cpu\"")
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # noqa: BLE001  (any failure means "cannot put tensors there")
        raise BackendUnavailableError(f"device {str(dev)!r} is not available here: {shorten(str(exc), 120)}") from None


class _Plan:
    def __init__(
        self,
        skeleton: nn.Module,
        manifest: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        directory: Path,
        backend: str | None,
        requested: str | None = None,
    ) -> None:
        self.skeleton = skeleton
        self.manifest_path = directory / MANIFEST_FILE
        self.tensors_path = directory / TENSORS_FILE
        self.tensors = dict(tensors)
        self.backend = backend
        self.requested = requested
        self.modules = dict(skeleton.named_modules())
        self.consumed: set[str] = set()
        self.assignments: list[tuple[nn.Module, str, torch.Tensor]] = []  # (module, local name, value)
        self.rebuilt: dict[tuple, torch.Tensor] = {}  # one subclass weight per set of saved parts: ties survive
        self.replacements: dict[str, nn.Module] = {}
        self._params: dict[int, nn.Parameter] = {}  # one Parameter per loaded tensor: ties survive

        self.scales = manifest.get("scales")
        self._expand_aliases(manifest["aliases"])
        layers: dict[str, dict[str, Any]] = manifest["layers"]
        subclass_slots: set[tuple[str, str]] = set()
        for name, rec in layers.items():
            try:
                if rec["form"] == "module" or "in_place" in rec:
                    self._plan_module_layer(name, rec)
                elif rec["form"] == "subclass":
                    subclass_slots |= {(name, local) for local in rec["tensors"]}
                else:
                    raise SerializationError(f"{self.manifest_path}: layer {name!r}: unknown form {rec['form']!r}")
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise SerializationError(f"{self.manifest_path}: layer {name!r}: malformed record ({shorten(repr(exc), 200)})") from None
        for name, rec in layers.items():
            if rec["form"] == "subclass" and "tensors" in rec:
                if self._inside_replacement(name):
                    raise SerializationError(f"{self.manifest_path}: layer {name!r} lies inside another quantized layer")
                try:
                    self._plan_subclass_tensors(name, rec)
                except (KeyError, TypeError, AttributeError, ValueError) as exc:
                    raise SerializationError(f"{self.manifest_path}: layer {name!r}: malformed record ({shorten(repr(exc), 200)})") from None
        self._plan_float_tensors(subclass_slots)
        leftover = sorted(set(self.tensors) - self.consumed)
        if leftover:
            raise SerializationError(
                f"{self.tensors_path}: tensor {leftover[0]!r} has no place in the skeleton ({len(leftover)} such tensors; "
                "a checkpoint for a different architecture?)"
            )
        self.result = self._conversion_result(manifest, layers)
        self.kv_cache = self._plan_kv_cache(manifest.get("kv_cache", []), layers)

    # ------------------------------------------------------------ the phases

    def apply(self) -> None:
        """Install the planned tensors and modules: plain assignments only, nothing here can fail."""
        for module, local, value in self.assignments:
            if isinstance(value, nn.Parameter):
                module._parameters[local] = value
            else:
                module._buffers[local] = value
        for name, new in self.replacements.items():
            _set_submodule(self.skeleton, name, new)
        disable_fast_paths_above(self.skeleton, list(self.result.converted))
        object.__setattr__(self.skeleton, _RESULT_ATTR, self.result)
        if self.kv_cache:
            self.result.kv_cache = enable_fp8_kv_cache(self.skeleton, [f"{n}.sdpa" if n else "sdpa" for n in self.kv_cache])

    def _plan_kv_cache(self, names: list[str], layers: dict[str, dict[str, Any]]) -> list[str]:
        """The attention modules to give an FP8 KV cache: each must be captured transformers attention
        whose sdpa layer the file quantizes (checked before anything is installed)."""
        sites = hf_attention_sites(self.skeleton) if names else {}
        for name in names:
            sdpa = sites.get(name)
            if sdpa is None or sdpa not in layers or layers[sdpa].get("kind") != "sdpa":
                raise SerializationError(
                    f"{self.manifest_path}: kv_cache names {shorten(name, 80)!r}, which is not a captured transformers "
                    "attention module with a quantized sdpa layer here (capture_attention(skeleton) first?)"
                )
        return list(names)

    # ------------------------------------------------------------ layers replaced by a new module

    def _plan_module_layer(self, name: str, rec: dict[str, Any]) -> None:
        target = self.modules.get(name)
        if target is None or not name:
            raise SerializationError(
                f"{self.manifest_path}: layer {name!r}: the skeleton has no module of that name (a different "
                "architecture, or attention not captured with inc_bridge.capture_attention?)"
            )
        config = self._with_backend(name, dict(rec["config"]))
        if rec["form"] == "module":
            cls = registry.module_classes().get(rec["class"])
            if cls is None:
                raise SerializationError(
                    f"{self.manifest_path}: layer {name!r}: unknown quantized module class {rec['class']!r} (saved by a "
                    f"newer inc_bridge?); known: {', '.join(sorted(registry.module_classes()))}"
                )
            try:
                new = cls.from_config(config, device="meta")
            except Exception as exc:  # a config this version cannot build is a file problem
                raise SerializationError(f"{self.manifest_path}: layer {name!r}: cannot build {cls.__name__} from {config}: {exc}") from None
            self._read_renamed(name, new)
            self._check_replaces(name, target, new, cls.__name__)
            adopt = getattr(new, "adopt", None)
            if callable(adopt):  # a layer that runs its float module's algorithm (QExperts) takes it from the skeleton
                try:
                    adopt(target)
                except Exception as exc:
                    raise SerializationError(f"{self.manifest_path}: layer {name!r}: {cls.__name__} cannot take the "
                                             f"skeleton's {type(target).__name__}: {exc}") from None
            extra = self._fill(name, new, allow_extra=False)
            for local, t in (new.scale_buffers() if isinstance(new, Fp8Module) else {}).items():
                check_scale_values(t, where=f"{self.tensors_path}: tensor {name + '.' + local!r}", error=SerializationError)
        else:
            if rec["in_place"] not in registry.in_place_kinds():
                raise SerializationError(
                    f"{self.manifest_path}: layer {name!r}: unknown in-place quantization {rec['in_place']!r}; "
                    f"known: {', '.join(sorted(registry.in_place_kinds()))}"
                )
            self._check_class(name, target, rec["module_class"])
            kind = registry.in_place_kind(target, rec["in_place"])
            if kind is None:
                raise SerializationError(f"{self.manifest_path}: layer {name!r}: in-place quantization "
                                         f"{rec['in_place']!r} does not apply to a {type(target).__name__}")
            new = copy.deepcopy(target)
            extra = self._fill(name, new, allow_extra=True)
            for local, t in extra.items():  # an in-place kind's own tensors are its scales
                where = f"{self.tensors_path}: tensor {name + '.' + local!r}"
                if t.dtype != torch.float32:
                    raise SerializationError(f"{where}: scales must be float32, got {dtype_name(t.dtype)}")
                check_scale_values(t, where=where, error=SerializationError)
            try:
                kind.restore(new, extra, config)
            except Exception as exc:
                raise SerializationError(f"{self.manifest_path}: layer {name!r}: cannot restore {kind.name}: {exc}") from None
            unplaced = sorted(set(extra) - set(_slots(new)))
            if unplaced:
                raise SerializationError(f"{self.tensors_path}: tensor {name + '.' + unplaced[0]!r}: {kind.name} left it unused")
        self.replacements[name] = new

    def _fill(self, name: str, new: nn.Module, *, allow_extra: bool) -> dict[str, torch.Tensor]:
        """Plan the file's tensors under ``name.`` into ``new`` (not yet installed); return the rest."""
        prefix = f"{name}."
        for local, (owner, attr, old) in _slots(new).items():
            full = prefix + local
            value = self._take(full, old, f"the saved {type(new).__name__}")
            if isinstance(value, nn.Parameter):
                owner._parameters[attr] = value
            else:
                owner._buffers[attr] = value
        extra = {n[len(prefix):]: t for n, t in self.tensors.items() if n.startswith(prefix) and n not in self.consumed}
        if extra and not allow_extra:
            first = next(iter(extra))
            raise SerializationError(f"{self.tensors_path}: tensor {prefix + first!r}: {type(new).__name__} {name!r} has no such tensor")
        self.consumed |= {prefix + n for n in extra}
        return extra

    def _read_renamed(self, name: str, new: nn.Module) -> None:
        """A directory saved before a module-form layer renamed a tensor (FP8 ``weight`` → ``qweight``)
        holds it under the old name: read it under the new one. The format version is unchanged, as
        both spellings load."""
        for old_local, local in getattr(new, "renamed_tensors", {}).items():
            old_full, full = f"{name}.{old_local}", f"{name}.{local}"
            if old_full in self.tensors and full not in self.tensors:
                self.tensors[full] = self.tensors.pop(old_full)

    def _check_replaces(self, name: str, target: nn.Module, new: nn.Module, cls_name: str) -> None:
        """The skeleton's float module must have the saved layer's tensors, shape for shape."""
        new_slots = _slots(new)
        renamed = getattr(new, "renamed_tensors", {})
        for local, (_, _, old) in _slots(target).items():
            full = f"{name}.{local}"
            got = new_slots.get(renamed.get(local, local))
            if got is None:
                raise SerializationError(
                    f"{self.tensors_path}: layer {name!r}: the skeleton's {type(target).__name__} has tensor {full!r}, "
                    f"the saved {cls_name} does not (a different architecture?)"
                )
            saved = got[2]
            if saved.shape != old.shape:
                raise SerializationError(
                    f"{self.tensors_path}: tensor {full!r}: shape {list(saved.shape)} in the file, {list(old.shape)} in the "
                    "skeleton (a checkpoint for a different architecture?)"
                )
            if saved.dtype not in FP8_DTYPES and saved.dtype != old.dtype:
                raise SerializationError(self._dtype_message(full, saved.dtype, old.dtype))

    # ------------------------------------------------------------ subclass-form weights

    def _plan_subclass_tensors(self, name: str, rec: dict[str, Any]) -> None:
        module = self.modules.get(name)
        if module is None:
            raise SerializationError(f"{self.manifest_path}: layer {name!r}: the skeleton has no module of that name")
        self._check_class(name, module, rec["module_class"])
        for local, trec in rec["tensors"].items():
            full = f"{name}.{local}"
            cls = registry.tensor_classes().get(trec["class"])
            if cls is None:
                raise SerializationError(
                    f"{self.manifest_path}: tensor {full!r}: unknown tensor class {trec['class']!r}; "
                    f"known: {', '.join(sorted(registry.tensor_classes()))}"
                )
            old = module._parameters.get(local, module._buffers.get(local))
            if old is None:
                raise SerializationError(f"{self.manifest_path}: tensor {full!r}: the skeleton's {type(module).__name__} has no such tensor")
            shape, dtype = list(trec["shape"]), dtype_from_name(trec["dtype"])
            if list(old.shape) != shape:
                raise SerializationError(
                    f"{self.tensors_path}: tensor {full!r}: shape {shape} in the file, {list(old.shape)} in the skeleton "
                    "(a checkpoint for a different architecture?)"
                )
            if old.dtype != dtype:
                raise SerializationError(self._dtype_message(full, dtype, old.dtype))
            data_names = set(trec["data"])
            required = {"qdata", "scale"} if isinstance(module, nn.Embedding) else {"qdata", "scale", "act_scale"}
            known = set(getattr(cls, "tensor_data_names", [])) | set(getattr(cls, "optional_tensor_data_names", []))
            if not required <= data_names <= known | required:
                raise SerializationError(
                    f"{self.manifest_path}: tensor {full!r}: data {sorted(data_names)}, expected {sorted(required)}"
                    + ("" if isinstance(module, nn.Embedding) else " (a linear or conv weight needs its activation scale)")
                )
            parts = {}
            for data_name in trec["data"]:
                part = f"{full}.{data_name}"
                if part not in self.tensors:
                    raise SerializationError(f"{self.tensors_path}: tensor {part!r} is missing")
                parts[data_name] = self.tensors[part]
                self.consumed.add(part)
            self._check_parts(name, full, parts)
            attrs = {k: _decode_attr(v) for k, v in trec["attributes"].items()}
            attrs = self._with_backend(full, attrs)
            try:
                value = cls.__tensor_unflatten__(parts, attrs, torch.Size(shape), None)
            except Exception as exc:
                raise SerializationError(f"{self.manifest_path}: tensor {full!r}: cannot rebuild {cls.__name__}: {exc}") from None
            if list(value.shape) != shape or value.dtype != dtype:
                raise SerializationError(f"{self.manifest_path}: tensor {full!r}: rebuilt {cls.__name__} has the wrong shape or dtype")
            is_param = local in module._parameters
            # Tied weights were saved once (the other names are aliases of the same parts): layers
            # whose parts are the very same tensors get the very same weight back.
            key = (cls, local, is_param, tuple(sorted((k, id(v)) for k, v in parts.items())), repr(sorted(attrs.items())))
            if key not in self.rebuilt:
                self.rebuilt[key] = nn.Parameter(value, requires_grad=False) if is_param else value
            self.assignments.append((module, local, self.rebuilt[key]))

    def _check_parts(self, layer: str, full: str, parts: dict[str, torch.Tensor]) -> None:
        """A subclass weight's scales: fp32, finite, positive; its FP8 format the one its scales were made for."""
        for data_name in ("scale", "act_scale"):
            t = parts.get(data_name)
            if t is None:
                continue
            where = f"{self.tensors_path}: tensor {full + '.' + data_name!r}"
            if t.dtype != torch.float32:
                raise SerializationError(f"{where}: scales must be float32, got {dtype_name(t.dtype)}")
            check_scale_values(t, where=where, error=SerializationError)
        srec = self.scales.get(layer) if isinstance(self.scales, dict) else None
        fmt = srec.get("format") if isinstance(srec, dict) else None
        qdata = parts.get("qdata")
        if isinstance(fmt, str) and qdata is not None and fmt in _FORMAT_DTYPES and qdata.dtype != _FORMAT_DTYPES[fmt]:
            raise SerializationError(
                f"{self.tensors_path}: tensor {full + '.qdata'!r}: {dtype_name(qdata.dtype)} data for a layer whose scales "
                f"were computed for {fmt} ({MANIFEST_FILE} \"scales\"); the data is mislabelled"
            )

    # ------------------------------------------------------------ everything else

    def _plan_float_tensors(self, subclass_slots: set[tuple[str, str]]) -> None:
        for mname, module in self.modules.items():
            if self._inside_replacement(mname):
                continue
            non_persistent = module._non_persistent_buffers_set
            for local, old in [*module._parameters.items(), *module._buffers.items()]:
                if old is None or (mname, local) in subclass_slots:
                    continue
                full = f"{mname}.{local}" if mname else local
                if full not in self.tensors:
                    if local in non_persistent and not old.is_meta:
                        continue  # e.g. a buffer computed at construction that the file predates
                    raise SerializationError(
                        f"{self.tensors_path}: tensor {full!r} of the skeleton is not in the file (a checkpoint for a "
                        "different architecture?)"
                    )
                self.assignments.append((module, local, self._take(full, old, "the skeleton")))

    # ------------------------------------------------------------ helpers

    def _take(self, full: str, old: torch.Tensor, where: str) -> torch.Tensor:
        """The file's tensor for slot ``full`` (checked against ``old``), as a Parameter if ``old`` is one."""
        value = self.tensors.get(full)
        if value is None:
            raise SerializationError(f"{self.tensors_path}: tensor {full!r} is missing (expected by {where})")
        if value.shape != old.shape:
            raise SerializationError(
                f"{self.tensors_path}: tensor {full!r}: shape {list(value.shape)} in the file, {list(old.shape)} in {where} "
                "(a checkpoint for a different architecture?)"
            )
        if value.dtype != old.dtype:
            raise SerializationError(self._dtype_message(full, value.dtype, old.dtype, where))
        self.consumed.add(full)
        if not isinstance(old, nn.Parameter):
            return value
        param = self._params.get(id(value))
        if param is None:
            grad = old.requires_grad and value.dtype.is_floating_point and value.dtype not in FP8_DTYPES
            param = self._params[id(value)] = nn.Parameter(value, requires_grad=grad)
        return param

    def _dtype_message(self, full: str, saved: torch.dtype, skeleton: torch.dtype, where: str = "the skeleton") -> str:
        hint = ""
        if saved.is_floating_point and skeleton.is_floating_point:
            hint = f"; build the skeleton in {dtype_name(saved)} (e.g. skeleton.to(torch.{dtype_name(saved)}))"
        return f"{self.tensors_path}: tensor {full!r}: dtype {dtype_name(saved)} in the file, {dtype_name(skeleton)} in {where}{hint}"

    def _check_class(self, name: str, module: nn.Module, saved: str) -> None:
        if _qualname(type(module)) != saved:
            raise SerializationError(
                f"{self.manifest_path}: layer {name!r} is a {saved} in the file but a {_qualname(type(module))} in the skeleton"
            )

    def _inside_replacement(self, name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in self.replacements)

    def _with_backend(self, where: str, values: dict[str, Any]) -> dict[str, Any]:
        """Apply the ``backend`` override, and check the backend a layer will run with exists here."""
        if "backend" not in values:
            return values
        if self.backend is not None:
            values["backend"] = self.backend
        try:
            resolve_backend(values["backend"])
        except BackendUnavailableError as exc:
            raise SerializationError(
                f"{self.manifest_path}: {where!r} was saved for kernel backend {values['backend']!r}: {exc}; pass "
                "backend='emulated' to load to run it here"
            ) from None
        return values

    def _expand_aliases(self, aliases: dict[str, str]) -> None:
        for alias, target in aliases.items():
            if target not in self.tensors or alias in self.tensors:
                raise SerializationError(f"{self.manifest_path}: alias {alias!r} → {target!r} does not name a saved tensor")
            self.tensors[alias] = self.tensors[target]

    def _conversion_result(self, manifest: dict[str, Any], layers: dict[str, dict[str, Any]]) -> ConversionResult:
        try:
            form = Form(manifest.get("form"))
        except ValueError:
            raise SerializationError(f"{self.manifest_path}: invalid form {manifest.get('form')!r}") from None
        recipe = None
        if manifest.get("recipe") is not None:
            try:
                recipe = Recipe.model_validate(manifest["recipe"], source=str(self.manifest_path))
            except (RecipeError, TypeError, ValueError) as exc:
                raise SerializationError(shorten(str(exc), 600)) from None
        return ConversionResult(
            form=form,
            backend=self.backend or manifest.get("backend") or "unknown",
            backend_requested=self.requested,
            converted={name: rec.get("kind") or "unknown" for name, rec in layers.items()},
            skipped=dict(manifest.get("skipped") or {}),
            recipe=recipe,
        )


def _slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer in ``module``'s subtree: local name → (owner, attribute, tensor)."""
    slots = {}
    for mname, m in module.named_modules():
        for attr, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None:
                slots[f"{mname}.{attr}" if mname else attr] = (m, attr, t)
    return slots


def _decode_attr(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"torch.dtype"}:
        return dtype_from_name(value["torch.dtype"])
    if isinstance(value, list):
        return [_decode_attr(v) for v in value]
    return value
