"""``IncFp8Config``: inc_bridge's scales as a torchao ``AOBaseConfig``, for ``torchao.quantization.quantize_``.

torchao users quantize with ``quantize_(model, config)``. This config lets them do that with scales
that INC measured: the handler registered below runs inc_bridge's own builders
(``opspecs.entry_for(module).to_subclass``, through ``convert(..., inplace=True)``), so the model
is the one ``inc_bridge.convert(model, scales, form="subclass")`` returns, bit for bit.

Why the handler takes the whole model, not one layer at a time: the scales are keyed by layer
name, and torchao 0.18's ``quantize_`` calls a handler as ``handler(module, config)`` without the
module's name (only ``filter_fn(module, fqn)`` sees it). So ``IncFp8Config.whole_model`` selects
the root (fqn ``""``) and the handler converts every layer named in the scales, inside it. This
also keeps ``convert``'s guarantees that a per-layer walk would lose: everything is checked before
anything changes (a bad scale set leaves the model as it was), tied weights stay tied, and the
``ConversionResult`` is attached (``inc_bridge.conversion_result(model)`` works afterwards).

Importing this module registers the handler in torchao's handler table (torchao's own pattern,
``@register_quantize_module_handler``); it does nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .convert import convert
from .errors import ConversionError
from .opspecs import entry_for
from .recipe import Backend, Form
from .scales import ScaleSet

__all__ = ["IncFp8Config"]


@dataclass(frozen=True, eq=False)  # eq=False: comparing two ScaleSets would compare tensors elementwise
class IncFp8Config(AOBaseConfig):
    """Static FP8 (form "subclass") from inc_bridge scales, applied by ``torchao.quantization.quantize_``.

    ``quantize_`` changes the model in place (``ib.convert`` returns a copy unless
    ``inplace=True``): afterwards the layers named in ``scales`` hold ``Float8StaticTensor``
    weights (or quantize their inputs, for captured attention), exactly as in
    ``ib.convert(model, scales, form="subclass")``; layers without scales are left alone.

    Args:
        scales: from ``ib.compute_scales``; layer names are relative to the module the handler
            receives, which with ``filter_fn=IncFp8Config.whole_model`` is the model itself.
        backend: kernel backend, as in ``ib.convert``; "auto" picks the best available where the
            model is.
    Raises:
        ConversionError: ``scales`` is not a ScaleSet or ``backend`` is not a backend name (at
            construction); at ``quantize_``: a scaled layer is missing from the model or of another
            type, shape or dtype, the model is already quantized, or ``quantize_`` handed the
            handler a single layer (its default ``filter_fn``) instead of the model. The model is
            left unchanged in all these cases.
        BackendUnavailableError: ``backend`` cannot run here.

    Example:
        >>> from torchao.quantization import quantize_
        >>> quantize_(model, IncFp8Config(scales), filter_fn=IncFp8Config.whole_model)  # doctest: +SKIP
        >>> ib.conversion_result(model).summary()                                        # doctest: +SKIP
    """

    scales: ScaleSet
    backend: Backend = Backend.AUTO

    def __post_init__(self) -> None:
        if not isinstance(self.scales, ScaleSet):
            raise ConversionError(f"IncFp8Config.scales must be an inc_bridge.ScaleSet (from compute_scales), "
                                  f"not {type(self.scales).__name__}")
        try:
            backend = Backend(self.backend)
        except ValueError:
            raise ConversionError(f"IncFp8Config.backend {self.backend!r} is not a backend; valid: "
                                  f"{[b.value for b in Backend]}") from None
        object.__setattr__(self, "backend", backend)  # frozen: normalise the string once, here

    @staticmethod
    def whole_model(module: nn.Module, fqn: str) -> bool:
        """The ``filter_fn`` for ``quantize_``: select the model itself (fqn ``""``), where the layer names live."""
        return fqn == ""


@register_quantize_module_handler(IncFp8Config)
def _quantize_with_inc_scales(module: nn.Module, config: IncFp8Config) -> nn.Module:
    """Convert, in place, every layer of ``module`` named in ``config.scales``; return ``module``."""
    if entry_for(module) is not None and any(name not in dict(module.named_modules()) for name in config.scales.layers):
        raise ConversionError(
            f"IncFp8Config got a single {type(module).__name__} layer from quantize_, without its name; its scales are "
            "per layer name, so pass filter_fn=inc_bridge.IncFp8Config.whole_model to quantize_ (the model is unchanged)"
        )
    return convert(module, config.scales, form=Form.SUBCLASS, backend=config.backend, inplace=True)
