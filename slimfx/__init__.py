"""slimfx: a graph-transformation compiler that makes PyTorch models small and fast for deployment."""

from slimfx.errors import CaptureError, ExportError, PassError, RecipeError, SlimfxError, ValidationError

__version__ = "0.1.0"
__all__ = ["SlimfxError", "CaptureError", "PassError", "ExportError", "RecipeError", "ValidationError"]
