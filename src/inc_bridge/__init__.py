"""inc_bridge: INC's FP8 measurements → torchao Float8 tensors or quantized modules, bit-exact.

Example:
    >>> import inc_bridge as ib
    >>> qmodel = ib.quantize(model, calib_batches)                       # doctest: +SKIP
    >>> meas = ib.calibrate(model, calib_batches)                         # doctest: +SKIP
    >>> qmodel = ib.convert(model, ib.compute_scales(meas, model=model), form="module")  # doctest: +SKIP
"""

# _torchao_import first: it imports torchao with its import-time log lines muted, before any module below does.
# hf_layers registers the entries of transformers' Conv1D and fused MoE experts.
from . import _torchao_import, hf_layers, nn  # noqa: F401  (imported for their effect)
from ._version import __version__ as __version__
from .activation import Float8ActivationTensor
from .calibrate import calibrate
from .capture import capture_attention, captured_sites
from .convert import ConversionResult, conversion_result, convert
from .errors import (
    BackendUnavailableError,
    CalibrationError,
    ConversionError,
    IncBridgeError,
    RecipeError,
    SerializationError,
)
from .formats import FP8Format, Target
from .inc_export import export_inc_measurements
from .inc_files import load_inc_measurements
from .kv_cache import KVCacheLayer, kv_cache_scales
from .measurements import LayerStats, Measurements
from .onnx_export import export_onnx
from .pipeline import compute_scales, quantize
from .recipe import Recipe, default_recipe, load_recipe
from .report import Report
from .scales import LayerScales, ScaleSet, clear_caches
from .serialization import load, save
from .serialization.pretrained import ExportFormat, save_pretrained
from .tensor import Float8StaticTensor
from .torchao_config import IncFp8Config
from .tune import TuneResult, apply_recipe, autotune

__all__ = [
    "BackendUnavailableError",
    "CalibrationError",
    "ConversionError",
    "ConversionResult",
    "Float8ActivationTensor",
    "FP8Format",
    "Float8StaticTensor",
    "ExportFormat",
    "IncBridgeError",
    "IncFp8Config",
    "KVCacheLayer",
    "LayerScales",
    "LayerStats",
    "Measurements",
    "RecipeError",
    "Recipe",
    "Report",
    "ScaleSet",
    "SerializationError",
    "Target",
    "TuneResult",
    "apply_recipe",
    "autotune",
    "calibrate",
    "capture_attention",
    "captured_sites",
    "clear_caches",
    "compute_scales",
    "conversion_result",
    "convert",
    "default_recipe",
    "export_inc_measurements",
    "export_onnx",
    "kv_cache_scales",
    "load",
    "load_inc_measurements",
    "load_recipe",
    "nn",
    "quantize",
    "save",
    "save_pretrained",
]
