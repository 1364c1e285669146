"""Exception types raised by flexcomp.

Every error says what was expected, what came, and (for mods) where in the user's code.

Every class is a :class:`FlexcompError` (a ``ValueError``) and, where torch 2.13 raises another
type for the same bad input, that type too, so research code that catches torch's exceptions
catches flexcomp's unchanged::

    try:
        flex_attention(q, k, v, block_mask=sliced)      # torch: RuntimeError
    except RuntimeError:                                # catches FlexcompRuntimeError
        ...

>>> issubclass(FlexcompNotImplementedError, RuntimeError), issubclass(FlexcompTraceError, RuntimeError)
(True, True)
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class FlexcompError(ValueError):
    """Base class of flexcomp's own errors (a ``ValueError``, like torch's validation errors)."""


class FlexcompTypeError(FlexcompError, TypeError):
    """An argument of the wrong type (torch raises ``TypeError``, or nothing where flexcomp is stricter)."""


class FlexcompAttributeError(FlexcompTypeError, AttributeError):
    """An argument of the wrong type where torch fails reading an attribute it lacks (``AttributeError``)."""


class FlexcompRuntimeError(FlexcompError, RuntimeError):
    """A bad input torch rejects with ``RuntimeError`` (a sliced BlockMask, a mask on another device...)."""


class FlexcompNotImplementedError(FlexcompRuntimeError, NotImplementedError):
    """An input torch does not support (``NotImplementedError``: not 4-D, nested tensors...)."""


class FlexcompAssertionError(FlexcompError, AssertionError):
    """A bad input torch rejects with ``AssertionError`` (half of a pair of BlockMask fields...)."""


class FlexcompZeroDivisionError(FlexcompRuntimeError, ZeroDivisionError):
    """A division by zero: a block size or head dim of 0 (torch: ``ZeroDivisionError``) or an integer
    ``//`` / ``%`` by zero inside a mod (torch: ``RuntimeError('ZeroDivisionError')``)."""


class FlexcompTraceError(FlexcompRuntimeError):
    """A score_mod or mask_mod used something the tracer cannot record.

    A ``RuntimeError`` as torch's (Dynamo's ``Unsupported``, vmap's data-dependent control flow).
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


class FlexcompIndexError(FlexcompError, IndexError):
    """A mod indexed a captured tensor out of range (an ``IndexError``, as torch raises).

    The message names the mod, the IR node of the load, the tensor's shape and the range reached."""


class FlexcompNotCallableError(FlexcompTraceError, TypeError):
    """A mod that is not callable (torch: ``TypeError`` in create_block_mask, ``RuntimeError`` in
    flex_attention and the mask combinators)."""


class FlexcompModSignatureError(FlexcompTraceError, AssertionError):
    """A mod with the wrong number of positional arguments (torch: ``AssertionError`` in
    create_block_mask / create_mask, Dynamo's ``Unsupported``, a ``RuntimeError``, in flex_attention)."""


class FlexcompModOutputError(FlexcompTraceError, AssertionError):
    """A mask_mod returning a non-bool tensor (torch: ``AssertionError`` in create_block_mask)."""


class FlexcompTraceIndexError(FlexcompTraceError, IndexError):
    """A mod indexing a captured tensor in a way torch rejects with ``IndexError`` (more indices than
    dims, a float index), found while tracing: the message names the mod and its line."""


@contextlib.contextmanager
def zero_division_names(graph, fn) -> Iterator[None]:
    """Turn torch's ``RuntimeError('ZeroDivisionError')`` raised while evaluating a traced mod into
    :func:`mod_zero_division`'s error, which names the mod, its line and the dividing nodes."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, FlexcompError) or "ZeroDivisionError" not in str(e):
            raise
        raise mod_zero_division(graph, fn) from None


def mod_zero_division(graph, fn) -> FlexcompZeroDivisionError:
    """The error for an integer ``//`` or ``%`` by zero met while evaluating a traced mod.

    ``graph`` is the mod's IR (:class:`flexcomp.ir.Graph`), ``fn`` the user's function; the message
    names the function, its file and line, and the IR nodes that divide.
    """
    code = getattr(fn, "__code__", None)
    where = f" at {code.co_filename}:{code.co_firstlineno}" if code is not None else ""
    divs = [graph.format_node(n) for n in graph.nodes
            if getattr(n.op, "value", None) in ("floordiv", "mod") and not n.dtype.is_float]
    err = FlexcompZeroDivisionError(
        f"{graph.kind.value} {graph.fn_name!r}{where} divides an integer by zero in "
        f"{'; '.join(repr(d) for d in divs) or 'an integer // or %'}: integer // and % by zero have no value "
        f"(torch raises RuntimeError('ZeroDivisionError') too); make every divisor nonzero for every index the "
        f"sequence lengths reach (e.g. .clamp(min=1)), or divide floats (x / 0 is inf, as IEEE)")
    err.function = graph.fn_name
    err.filename = code.co_filename if code is not None else ""
    err.lineno = code.co_firstlineno if code is not None else 0
    return err
