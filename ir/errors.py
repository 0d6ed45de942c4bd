"""Errors users can act on. Each message names what is at fault and what to do.

They live in the bottom layer (ir) so that every package can raise them without
importing upward; users import them from `slimfx.errors`.
"""


class SlimfxError(Exception):
    """Base class of every error slimfx raises for bad input or a failed check."""


class CaptureError(SlimfxError):
    """The model could not be captured into the IR (untraceable code, inputs that do not fit)."""


class PassError(SlimfxError):
    """A pass is unknown, got bad options, or broke the graph."""


class PassCrash(PassError):
    """A pass raised an exception that is not a SlimfxError. In a pass of the user's own (a plugin) it is the
    user's to fix, like any PassError; in a built-in pass (`builtin`) it is a bug in slimfx: the CLI prints the
    traceback and exits 1. The message names the pass and step and says how to replay it."""

    def __init__(self, message: str, *, builtin: bool = False):
        super().__init__(message)
        self.builtin = builtin


class ExportError(SlimfxError):
    """The graph cannot be written in the requested format."""


class RecipeError(SlimfxError):
    """A recipe file or object is malformed."""


class ValidationError(SlimfxError):
    """An exported model disagrees with the graph it came from beyond tolerance."""


class GateError(ValidationError):
    """The compiled or exported model failed a numeric check (the recipe's gate, an export's validation).
    The CLI exits with code 3 for these, 2 for other user errors."""


class ModelFileError(SlimfxError):
    """A saved model file (.slimfx) that cannot be written or read back: missing, not a slimfx file, truncated,
    corrupt, from a newer slimfx, or with parts that disagree (hand edits). The message names the file."""


class DataError(SlimfxError):
    """The data given for a model has the wrong structure, types or sizes."""
