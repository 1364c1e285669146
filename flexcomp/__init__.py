"""flexcomp: a mask-programmable attention compiler, and a drop-in for torch's flex_attention.

Switch research code with one import line::

    from flexcomp import flex_attention, create_block_mask, and_masks, or_masks, BlockMask

The pipeline, in the order data flows (see docs/architecture.md):
trace -> ir (ir_ops registry) / builder -> symbolic -> ranges / sparsity / derivative -> blockmask
-> options / problem -> plan (tiles) -> codegen -> runtime (reference / Triton backends) -> api.
"""
from .api import AuxOutput, AuxRequest, flex_attention
from .blockmask import BlockMask, noop_mask
from .blockmask_build import and_masks, create_block_mask, create_mask, or_masks
from .errors import (FlexcompAssertionError, FlexcompAttributeError, FlexcompError, FlexcompIndexError,
                     FlexcompIRError, FlexcompModOutputError, FlexcompModSignatureError, FlexcompNotCallableError,
                     FlexcompNotImplementedError, FlexcompRuntimeError, FlexcompTraceError, FlexcompTraceIndexError,
                     FlexcompTypeError, FlexcompZeroDivisionError)
from .explain import explain

__all__ = [
    "flex_attention", "create_block_mask", "create_mask", "BlockMask", "and_masks", "or_masks",
    "noop_mask", "AuxRequest", "AuxOutput", "explain", "FlexcompError", "FlexcompTraceError",
    "FlexcompIRError", "FlexcompTypeError", "FlexcompAttributeError", "FlexcompRuntimeError",
    "FlexcompNotImplementedError", "FlexcompAssertionError", "FlexcompIndexError", "FlexcompZeroDivisionError",
    "FlexcompNotCallableError", "FlexcompModSignatureError", "FlexcompModOutputError", "FlexcompTraceIndexError",
]
__version__ = "0.1.0"
