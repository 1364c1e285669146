"""Exception types raised by flexcomp.

Every error says what was expected, what came, and (for mods) where in the user's code.
"""
from __future__ import annotations


class FlexcompError(ValueError):
    """Base class of flexcomp's own errors (a ``ValueError``, like torch's validation errors)."""


class FlexcompTraceError(FlexcompError):
    """A score_mod or mask_mod used something the tracer cannot record.

    The message names the user's function, its file and line, what was not supported and what to
    write instead. Attributes ``function``, ``filename`` and ``lineno`` hold the location.
    """

    def __init__(self, message: str, function: str = "", filename: str = "", lineno: int = 0):
        super().__init__(message)
        self.function = function
        self.filename = filename
        self.lineno = lineno


class FlexcompIRError(FlexcompError):
    """The IR verifier found a broken invariant (a bug in a pass, never a user error)."""
