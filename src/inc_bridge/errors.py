"""Errors raised by inc_bridge. Every error a user can cause derives from IncBridgeError."""

from __future__ import annotations


class IncBridgeError(Exception):
    """Base class of every error inc_bridge raises on purpose."""


class RecipeError(IncBridgeError, ValueError):
    """A recipe is malformed: unknown key, wrong type or an invalid combination."""


class CalibrationError(IncBridgeError):
    """Calibration or measurement data is missing, malformed or not finite."""


class ConversionError(IncBridgeError):
    """A model cannot be converted with the given scales and selection."""


class SerializationError(IncBridgeError):
    """A saved model or measurement file cannot be written or read back."""


class BackendUnavailableError(IncBridgeError):
    """A requested kernel backend cannot run here; the message says why and what can."""
