"""Errors users can act on (defined in `ir.errors`, the bottom layer, re-exported here)."""

from slimfx.ir.errors import (
    CaptureError,
    DataError,
    ExportError,
    GateError,
    ModelFileError,
    PassCrash,
    PassError,
    RecipeError,
    SlimfxError,
    ValidationError,
)

__all__ = ["SlimfxError", "CaptureError", "PassError", "PassCrash", "ExportError", "RecipeError", "ValidationError", "GateError", "DataError",
           "ModelFileError"]
