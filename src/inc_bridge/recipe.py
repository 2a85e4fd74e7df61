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
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .formats import MIN_SCALE, FP8Format, Target
from .opspecs import SPECS, OpSpec, spec_named
from .report_formats import ALL_REPORT_FORMATS, ReportFormat
from .safe_io import MiB, read_text, shorten, write_atomic
from .safe_yaml import dump_yaml, load_yaml
from .selectors import check_selector, matches

RECIPE_VERSION = 1


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class ScaleMethod(str, Enum):
    """Scale methods. The maxabs ones have INC's meaning (backoff 0.5 for weights, 0.25 for
    activations); ``percentile`` and ``mse`` clip activations using the histograms collected in the
    same calibration pass (activations only)."""

    MAXABS_ARBITRARY = "maxabs_arbitrary"
    MAXABS_POW2 = "maxabs_pow2"
    UNIT_SCALE = "unit_scale"
    PERCENTILE = "percentile"
    MSE = "mse"

    @property
    def from_histogram(self) -> bool:
        return self in (ScaleMethod.PERCENTILE, ScaleMethod.MSE)


KV_CACHE_OP = "kv_cache"  # not a layer kind: see ``_OpName.is_layer``


class _OpName(str, Enum):
    """A recipe op name; a layer op's facts are its ``OpSpec`` (``inc_bridge.opspecs``)."""

    @property
    def is_layer(self) -> bool:
        """Whether the op quantizes modules of its own: all but ``kv_cache``, with which
        transformers' caches keep K/V as FP8 codes made with the ``sdpa`` layers' k/v scales
        (so it needs ``sdpa``; outputs do not change). See ``kv_cache.py``."""
        return self.value != KV_CACHE_OP

    @property
    def spec(self) -> OpSpec:
        if not self.is_layer:
            raise ValueError(f"op {self.value!r} is not a layer op and has no OpSpec")
        return spec_named(self.value)

    @property
    def weight_only(self) -> bool:
        return self.is_layer and self.spec.weight_only

    @property
    def has_weight(self) -> bool:
        return self.is_layer and self.spec.has_weight

    @property
    def n_inputs(self) -> int:
        """How many inputs get a static scale: none (embedding ids), q/k/v, both matmul operands, else one."""
        return self.spec.n_inputs if self.is_layer else 0


# One member per op spec, in the specs' order: Op.LINEAR, Op.CONV2D, Op.CONV1D, Op.EMBEDDING, Op.SDPA, Op.BMM;
# then Op.KV_CACHE.
Op = _OpName("Op", [(spec.name.upper(), spec.name) for spec in SPECS] + [("KV_CACHE", KV_CACHE_OP)])  # type: ignore[misc]


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
    # allow_inf_nan=False: a recipe number is a setting or a scale, and .nan / .inf in YAML is
    # never a meaningful one (an infinite scale divides by zero, a NaN one poisons every output).
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _lowercase_enums(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML authors write E4M3 as often as e4m3; enum values are lower case. Only enum fields:
        # names, patterns and callable references are case-sensitive.
        if not _is_enum_field(cls.model_fields[info.field_name].annotation):
            return value
        if isinstance(value, str):
            return value.lower()
        if isinstance(value, (list, tuple)):
            return [v.lower() if isinstance(v, str) else v for v in value]
        return value


def _is_enum_field(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return True
    return any(_is_enum_field(a) for a in get_args(annotation))


class WeightQuant(_Closed):
    granularity: Granularity = Granularity.PER_TENSOR
    scale_method: ScaleMethod = ScaleMethod.MAXABS_ARBITRARY

    @field_validator("scale_method", mode="after")
    @classmethod
    def _weight_methods(cls, value: ScaleMethod) -> ScaleMethod:
        if value.from_histogram:
            raise ValueError(
                f"{value.value!r} is an activation scale method; weight scale methods: maxabs_arbitrary, "
                "maxabs_pow2, unit_scale"
            )
        return value


class ActivationQuant(_Closed):
    granularity: Granularity = Granularity.PER_TENSOR
    scale_method: ScaleMethod = ScaleMethod.MAXABS_ARBITRARY
    percentile: float = Field(default=99.99, gt=0.0, le=100.0)  # used by scale_method: percentile

    @field_validator("granularity", mode="after")
    @classmethod
    def _per_tensor_only(cls, value: Granularity) -> Granularity:
        # A static activation scale is one number: per-channel activations would need a scale per
        # input feature, which neither INC's CPU path nor the FP8 GEMMs we target consume.
        if value is not Granularity.PER_TENSOR:
            raise ValueError("activation granularity must be per_tensor (valid: per_tensor)")
        return value


# An exact module name or "re:<pattern>", checked item by item (errors name the list index).
Selector = Annotated[str, AfterValidator(check_selector)]

_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _check_callable_ref(value: str | None) -> str | None:
    if value is not None and not _CALLABLE_RE.match(value):
        raise ValueError(f"{shorten(value, 80)!r} is not a callable reference of the form 'package.module:function'")
    return value


class LayerOverride(_Closed):
    """Settings for the layers ``match`` selects (exact name or ``re:``); the first match wins."""

    match: Selector
    format: FP8Format | None = None
    weight: WeightQuant | None = None
    activation: ActivationQuant | None = None


class Quantization(_Closed):
    format: FP8Format = FP8Format.E4M3
    target: Target = Target.CPU
    weight: WeightQuant = Field(default_factory=WeightQuant)
    activation: ActivationQuant = Field(default_factory=ActivationQuant)
    ops: tuple[Op, ...] = (Op.LINEAR, Op.CONV2D)
    include: tuple[Selector, ...] = ()
    exclude: tuple[Selector, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()

    @field_validator("ops", mode="after")
    @classmethod
    def _ops(cls, value: tuple[Op, ...]) -> tuple[Op, ...]:
        if not value:
            raise ValueError("ops must name at least one op")
        if Op.KV_CACHE in value and Op.SDPA not in value:
            # The cache holds the FP8 codes QSDPA would make of K and V: those need the sdpa op's
            # static k/v scales. Implying sdpa would quantize attention the recipe did not ask for.
            raise ValueError("kv_cache stores keys and values with the static k/v scales of the sdpa op; "
                             "add 'sdpa' to ops (e.g. ops: [linear, sdpa, kv_cache])")
        return tuple(dict.fromkeys(value))


class ModelSource(_Closed):
    """Where the CLI gets the float model: ``factory`` returns it (``package.module:function``)."""

    factory: str

    _ref = field_validator("factory", mode="after")(classmethod(lambda cls, v: _check_callable_ref(v)))


class Calibration(_Closed):
    """``source`` returns an iterable of calibration batches; ``num_batches`` caps how many are used."""

    source: str | None = None
    num_batches: int | None = Field(default=None, ge=1)
    histogram_bins: int = Field(default=2048, ge=16, le=65536)

    _ref = field_validator("source", mode="after")(classmethod(lambda cls, v: _check_callable_ref(v)))


class Evaluation(_Closed):
    """``fn(model) -> float`` is the metric autotune judges by."""

    fn: str | None = None
    higher_is_better: bool = True

    _ref = field_validator("fn", mode="after")(classmethod(lambda cls, v: _check_callable_ref(v)))


class Tolerance(_Closed):
    """Tolerable metric loss: ``relative`` (fraction of the baseline) or ``absolute`` (metric units)."""

    relative: float | None = Field(default=None, ge=0.0)
    absolute: float | None = Field(default=None, ge=0.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Tolerance:
        if (self.relative is None) == (self.absolute is None):
            raise ValueError("set exactly one of relative or absolute")
        return self


class SearchSpace(_Closed):
    """Values autotune tries; an empty list keeps the ``quantization`` section's value."""

    format: tuple[FP8Format, ...] = ()
    weight_granularity: tuple[Granularity, ...] = ()
    weight_scale_method: tuple[ScaleMethod, ...] = ()
    activation_scale_method: tuple[ScaleMethod, ...] = ()

    @field_validator("weight_scale_method", mode="after")
    @classmethod
    def _weight_methods(cls, value: tuple[ScaleMethod, ...]) -> tuple[ScaleMethod, ...]:
        for v in value:
            WeightQuant(scale_method=v)
        return value


class Sensitivity(str, Enum):
    """How layer fallback ranks layers: ``sqnr`` (each layer's own output SQNR, one forward; cheap)
    or ``metric`` (``eval_fn`` with only that layer kept in high precision; one evaluation per layer)."""

    SQNR = "sqnr"
    METRIC = "metric"


class Tuning(_Closed):
    tolerable_loss: Tolerance = Field(default_factory=lambda: Tolerance(relative=0.01))
    max_trials: int = Field(default=20, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    layer_fallback: bool = True
    sensitivity: Sensitivity = Sensitivity.SQNR


class ReportConfig(_Closed):
    """What ``autotune`` writes into ``output_dir/report``: any of json, md, html, plots (the SVG
    files ``report.md`` links); all four by default. The report itself is built either way."""

    formats: tuple[ReportFormat, ...] = ALL_REPORT_FORMATS

    @field_validator("formats", mode="after")
    @classmethod
    def _listed_once(cls, value: tuple[ReportFormat, ...]) -> tuple[ReportFormat, ...]:
        if not value:
            raise ValueError(f"list at least one of {', '.join(f.value for f in ReportFormat)}")
        twice = sorted({f.value for f in value if value.count(f) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once")
        return value


# The largest scale a locked recipe may hold: bfloat16's maximum (a larger one becomes inf in a
# bfloat16 model). The smallest is MIN_SCALE, the floor every computed scale already has.
MAX_SCALE = 3.3895313892515355e38


def _check_scale(value: float, what: str) -> float:
    if not (MIN_SCALE <= value <= MAX_SCALE):  # also false for NaN
        raise ValueError(f"{what} {shorten(value, 40)} is out of range; a scale is finite and in [{MIN_SCALE:.6g}, {MAX_SCALE:.6g}]")
    return value


class LockedExperts(_Closed):
    """A fused MoE experts layer's finished scales, per matrix (gate_up_proj, down_proj) and per expert.

    ``weight_scales[m][e]`` is one number (per tensor) or one per output channel; ``fallback``: the
    experts that received no calibration tokens; ``tokens``: calibration tokens per expert.
    """

    input_scales: tuple[tuple[float, ...], tuple[float, ...]]
    weight_scales: tuple[tuple[float | tuple[float, ...], ...], tuple[float | tuple[float, ...], ...]]
    fallback: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> LockedExperts:
        experts = len(self.input_scales[0])
        if not experts or any(len(t) != experts for t in (*self.input_scales, *self.weight_scales)) or (
                self.tokens and len(self.tokens) != experts) or any(not 0 <= e < experts for e in self.fallback):
            raise ValueError(f"experts scales must have one entry per expert for both matrices ({experts} experts)")
        for m, (inputs, weights) in enumerate(zip(self.input_scales, self.weight_scales, strict=True)):
            for e, (a, w) in enumerate(zip(inputs, weights, strict=True)):
                _check_scale(a, f"matrix {m} expert {e} input scale")
                for i, v in enumerate(w if isinstance(w, tuple) else (w,)):
                    _check_scale(v, f"matrix {m} expert {e} weight scale {i}")
        return self


class LockedLayer(_Closed):
    """One layer's finished scales. ``input_scales`` has one scale per quantized input (see ``Op.n_inputs``);
    ``weight_scale`` is one number (per tensor) or one per output channel, None for layers without a weight.
    A fused experts layer has neither: its scales are per expert, in ``experts``."""

    kind: Op
    format: FP8Format
    fp8_max: float
    hp_dtype: Literal["float32", "bfloat16"]
    input_scales: tuple[float, ...] = ()
    weight_scale: float | tuple[float, ...] | None = None
    experts: LockedExperts | None = None

    @field_validator("input_scales", mode="after")
    @classmethod
    def _inputs(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(_check_scale(v, f"input scale {i}") for i, v in enumerate(value))

    @field_validator("weight_scale", mode="after")
    @classmethod
    def _weight(cls, value: float | tuple[float, ...] | None) -> float | tuple[float, ...] | None:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("a per-channel weight_scale needs one scale per output channel, got none")
            return tuple(_check_scale(v, f"weight scale {i}") for i, v in enumerate(value))
        return value if value is None else _check_scale(value, "weight scale")

    @model_validator(mode="after")
    def _consistent(self) -> LockedLayer:
        # The kernels index input scales by position and divide by fp8_max: a wrong count or range
        # must stop here, not as an IndexError or a NaN model later.
        if not self.kind.is_layer:
            raise ValueError(f"{self.kind.value!r} is not a layer kind (it uses the scales of the sdpa layers)")
        top = self.format.max
        if not (0.0 < self.fp8_max <= top):
            raise ValueError(f"fp8_max {shorten(self.fp8_max, 40)} is out of range for {self.format.value}; valid: 0 < fp8_max <= {top:g}")
        if self.experts is not None:
            if self.kind is not Op.LINEAR or self.input_scales or self.weight_scale is not None:
                raise ValueError("a fused experts layer (linear) keeps its scales in 'experts' only")
            return self
        if len(self.input_scales) != self.kind.n_inputs:
            raise ValueError(
                f"a {self.kind.value} layer has {self.kind.n_inputs} input scale(s), got {len(self.input_scales)}"
            )
        if (self.weight_scale is None) == self.kind.has_weight:
            need = "needs a weight_scale" if self.kind.has_weight else "has no weight, so no weight_scale"
            raise ValueError(f"a {self.kind.value} layer {need}")
        return self


class Locked(_Closed):
    """What autotune chose, with the scales themselves: ``apply_recipe`` needs no calibration."""

    scales: dict[str, LockedLayer]
    fallback: dict[str, str] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    captured_attention: bool = False
    trial: int | None = None
    # Informational (what autotune measured); autotune itself judges non-finite metrics.
    metric: float | None = Field(default=None, allow_inf_nan=True)
    baseline: float | None = Field(default=None, allow_inf_nan=True)


class Recipe(_Closed):
    version: Literal[1] = RECIPE_VERSION
    quantization: Quantization = Field(default_factory=Quantization)
    form: Form = Form.SUBCLASS
    backend: Backend = Backend.AUTO
    model: ModelSource | None = None
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    tuning: Tuning = Field(default_factory=Tuning)
    report: ReportConfig = Field(default_factory=ReportConfig)
    locked: Locked | None = None

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
        return dump_yaml(self.model_dump(mode="json", exclude_none=True))

    def save(self, path: Path | str) -> Path:
        """Write the recipe as YAML, atomically (a uniquely named sibling renamed into place, umask honoured)."""
        return write_atomic(path, self.to_yaml())

    def layer_settings(self, name: str) -> tuple[FP8Format, WeightQuant, ActivationQuant]:
        """Format, weight and activation settings for layer ``name`` after per-layer overrides."""
        q = self.quantization
        for i, o in enumerate(q.overrides):
            if matches(name, o.match, where=f"quantization.overrides.{i}.match"):
                return o.format or q.format, o.weight or q.weight, o.activation or q.activation
        return q.format, q.weight, q.activation


def resolve_callable(ref: str, key: str):
    """Import ``package.module:function``; RecipeError naming ``key`` if it cannot be found."""
    import importlib

    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"{key}: cannot load {shorten(ref, 120)!r}: {type(exc).__name__}: {shorten(str(exc))}") from None
    if not callable(obj):
        raise RecipeError(f"{key}: {shorten(ref, 120)!r} is not callable")
    return obj


def default_recipe() -> Recipe:
    """The recipe used when ``recipe=None``: E4M3, per-tensor, maxabs_arbitrary, linear + conv2d."""
    return Recipe()


# A hand-written recipe is a few kilobytes; a locked one carries every scale (per-channel scales of
# a BERT-base model are about 2.5 MB of YAML, read in about 2 s). The cap bounds time and memory.
MAX_RECIPE_BYTES = 16 * MiB


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe YAML file.

    Args:
        path: the YAML file. A string is taken as a path, never as YAML text.
    Returns:
        The validated Recipe.
    Raises:
        RecipeError: the file is missing, not a regular file (a FIFO, a device), larger than
            ``MAX_RECIPE_BYTES``, not UTF-8, not YAML (or nested too deeply, or an alias bomb: see
            ``safe_yaml``), or does not match the schema.
    """
    path = Path(path)
    text = read_text(path, max_bytes=MAX_RECIPE_BYTES, error=RecipeError, what="recipe")
    data = load_yaml(text, origin=str(path), error=RecipeError)
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


_MAX_ERRORS_SHOWN = 10


def _brief(value: Any) -> str:
    """A bounded repr: nested inputs are abbreviated *while* being printed (``repr`` of a shared,
    alias-built structure would take exponential time before anything could cut it)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 4, 6, 6, 6
    r.maxstring, r.maxother, r.maxlong = 80, 80, 40
    return shorten(r.repr(value))


def _format_errors(exc: ValidationError, source: str) -> str:
    # Every part that repeats the input (the value, the key path, a validator's message) is cut:
    # a recipe error must stay a few lines whatever the recipe holds.
    errors = exc.errors(include_url=False)
    lines = []
    for err in errors[:_MAX_ERRORS_SHOWN]:
        loc = tuple(err.get("loc", ()))
        where = shorten(".".join(shorten(str(p), 60) for p in loc) or "<root>")
        msg = shorten(err["msg"], 300)
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"{where}: unknown key {_brief(loc[-1])}; valid keys here: {valid}")
        elif err["type"] in ("enum", "literal_error"):
            lines.append(f"{where}: {_brief(err['input'])} is not valid; {msg.lower()}")
        else:
            lines.append(f"{where}: {msg} (got {_brief(err.get('input'))})")
    if len(errors) > _MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - _MAX_ERRORS_SHOWN} more errors")
    return f"{shorten(source)}: invalid recipe:\n  " + "\n  ".join(lines)
