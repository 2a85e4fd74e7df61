"""Recipe schema v1: a closed, versioned description of how to quantize a model.

The schema is the contract of ``../shared/DESIGN.md``: ``quantization`` (format, target, weight and
activation granularity and scale method, ops, include/exclude), ``form`` and ``backend``. Unknown keys
are rejected with their YAML path and the valid keys; bad values name the valid choices.

Example:
    >>> r = load_recipe(Path("recipes/fp8_e4m3_static.yaml"))
    >>> r.quantization.format
    <FP8Format.E4M3: 'e4m3'>
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .formats import FP8Format, Target

RECIPE_VERSION = 1


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class ScaleMethod(str, Enum):
    """Scale methods with INC's meaning (backoff 0.5 for weights, 0.25 for activations)."""

    MAXABS_ARBITRARY = "maxabs_arbitrary"
    MAXABS_POW2 = "maxabs_pow2"
    UNIT_SCALE = "unit_scale"


class Op(str, Enum):
    LINEAR = "linear"
    CONV2D = "conv2d"
    EMBEDDING = "embedding"  # weight-only: an embedding's input is integer ids
    SDPA = "sdpa"  # captured scaled-dot-product attention: q, k, v quantized
    BMM = "bmm"  # captured activation × activation matmul / bmm: both operands quantized

    @property
    def weight_only(self) -> bool:
        return self is Op.EMBEDDING

    @property
    def has_weight(self) -> bool:
        return self not in (Op.SDPA, Op.BMM)


class Form(str, Enum):
    SUBCLASS = "subclass"
    MODULE = "module"


class Backend(str, Enum):
    AUTO = "auto"
    EMULATED = "emulated"
    CPU = "cpu"
    CUDA = "cuda"
    HPU = "hpu"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    @field_validator("*", mode="before")
    @classmethod
    def _lowercase_enums(cls, value: Any) -> Any:
        # YAML authors write E4M3 as often as e4m3; enum values are lower case.
        return value.lower() if isinstance(value, str) and not value.startswith("re:") else value


class WeightQuant(_Closed):
    granularity: Granularity = Granularity.PER_TENSOR
    scale_method: ScaleMethod = ScaleMethod.MAXABS_ARBITRARY


class ActivationQuant(_Closed):
    granularity: Granularity = Granularity.PER_TENSOR
    scale_method: ScaleMethod = ScaleMethod.MAXABS_ARBITRARY

    @field_validator("granularity", mode="after")
    @classmethod
    def _per_tensor_only(cls, value: Granularity) -> Granularity:
        # A static activation scale is one number: per-channel activations would need a scale per
        # input feature, which neither INC's CPU path nor the FP8 GEMMs we target consume.
        if value is not Granularity.PER_TENSOR:
            raise ValueError("activation granularity must be per_tensor (valid: per_tensor)")
        return value


def _check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a layer selector must be a non-empty string")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern[3:]!r}: {exc}") from None
    return pattern


class Quantization(_Closed):
    format: FP8Format = FP8Format.E4M3
    target: Target = Target.CPU
    weight: WeightQuant = Field(default_factory=WeightQuant)
    activation: ActivationQuant = Field(default_factory=ActivationQuant)
    ops: tuple[Op, ...] = (Op.LINEAR, Op.CONV2D)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @field_validator("include", "exclude", mode="after")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_pattern(p) for p in value)

    @field_validator("ops", mode="after")
    @classmethod
    def _ops(cls, value: tuple[Op, ...]) -> tuple[Op, ...]:
        if not value:
            raise ValueError("ops must name at least one op")
        return tuple(dict.fromkeys(value))


class Recipe(_Closed):
    version: Literal[1] = RECIPE_VERSION
    quantization: Quantization = Field(default_factory=Quantization)
    form: Form = Form.SUBCLASS
    backend: Backend = Backend.AUTO

    @model_validator(mode="after")
    def _unit_scale_together(self) -> Recipe:
        # INC's unit_scale is a whole-layer choice: a unit weight scale beside a maxabs activation
        # scale (or the reverse) has no INC counterpart, so we refuse it rather than invent one.
        q = self.quantization
        unit = [q.weight.scale_method is ScaleMethod.UNIT_SCALE, q.activation.scale_method is ScaleMethod.UNIT_SCALE]
        if any(unit) and not all(unit):
            raise ValueError("unit_scale must be used for both quantization.weight and quantization.activation")
        return self

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, source: str = "recipe", **kwargs: Any) -> Recipe:  # type: ignore[override]
        """Validate a dict; raise RecipeError naming the key path and the valid choices."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise RecipeError(_format_errors(exc, source)) from None

    def to_yaml(self) -> str:
        """The recipe as YAML text that ``load_recipe`` reads back to an equal recipe."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def default_recipe() -> Recipe:
    """The recipe used when ``recipe=None``: E4M3, per-tensor, maxabs_arbitrary, linear + conv2d."""
    return Recipe()


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe YAML file.

    Args:
        path: the YAML file. A string is taken as a path, never as YAML text.
    Returns:
        The validated Recipe.
    Raises:
        RecipeError: the file is missing, not YAML, or does not match the schema.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    return Recipe.model_validate(data, source=str(path))


def resolve_recipe(recipe: Recipe | Path | str | dict | None) -> Recipe:
    """Accept the forms public functions take: None (default), a Recipe, a path or a dict."""
    if recipe is None:
        return default_recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.model_validate(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise RecipeError(f"recipe must be a Recipe, a dict, a path or None, got {type(recipe).__name__}")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the key at ``loc`` (used to list the valid keys)."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{where}: unknown key {loc[-1]!r}; valid keys here: {valid}")
        elif err["type"] in ("enum", "literal_error"):
            lines.append(f"{where}: {err['input']!r} is not valid; {err['msg'].lower()}")
        else:
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: invalid recipe:\n  " + "\n  ".join(lines)
