"""slimfx: a graph-transformation compiler that makes PyTorch models small and fast for deployment."""

from slimfx.errors import (
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

__version__ = "0.1.0"
# every error of slimfx.errors is importable as slimfx.X too (README: `slimfx.GateError`)
__all__ = ["compile", "CompileResult", "Recipe", "load_recipe", "Data", "save", "load",
           "SlimfxError", "CaptureError", "PassError", "ExportError", "RecipeError", "ValidationError", "GateError",
           "DataError", "ModelFileError", "PassCrash"]


def __getattr__(name: str):
    # The driver pulls in passes and exporters; load it on first use so `import slimfx.errors` stays light.
    if name in ("compile", "CompileResult"):
        from slimfx import driver

        return getattr(driver, name)
    if name in ("save", "load"):
        from slimfx import persist

        return getattr(persist, name)
    if name == "Data":
        from slimfx.data import Data

        return Data
    if name in ("Recipe", "load_recipe"):
        from slimfx import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'slimfx' has no attribute {name!r}")
