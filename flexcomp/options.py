"""Options: torch's ``kernel_options`` and flexcomp's environment, parsed once into frozen records.

``Options.parse`` runs once per call, at the API edge; nothing downstream reads the dict or the
environment again. The environment is read there, with the dict, so one call sees one consistent
set of settings: ``FLEXCOMP_BACKEND`` (below), ``TRITON_INTERPRET`` (Triton's CPU interpreter),
``FLEXCOMP_DUMP_DIR`` (write generated sources there, to keep) and ``FLEXCOMP_DEBUG=1`` (also print
each one as it is generated): :class:`Sources`. One exception, read where it acts and only on a
cold path: ``FLEXCOMP_COMPILE_AHEAD=0`` (:mod:`flexcomp.codegen.ahead`, at a plan's first call and
a block map's first build) makes kernels compile one at a time at their launch; it changes when
compiles happen, never what runs, so calls need not see it consistently (and do not pay for
reading it).

Backend choice, first match wins:

1. ``kernel_options={"BACKEND": ...}``: ``"reference"`` or ``"triton"`` (torch's ``"AUTO"`` means
   "choose"; torch's ``"TRITON"`` means ``"triton"``);
2. the environment variable ``FLEXCOMP_BACKEND`` (same values);
3. the default: ``triton`` on CUDA tensors, ``reference`` elsewhere.

Tile requests (``BLOCK_M``, ``fwd_num_warps``, ``bwd_BLOCK_N1``, ``BWD_SPLIT`` ...) are kept as
:class:`TileRequest` records, one per pass; the plan stage checks them against the BlockMask and
the device (:mod:`flexcomp.tiles`), for the Triton backend only (the reference has no tiles).
"""
from __future__ import annotations

import enum
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .cache import CACHE
from .errors import FlexcompAssertionError, FlexcompError, FlexcompRuntimeError, FlexcompTypeError

# the environment variables an Options reads (see the module's docstring)
_ENVIRONMENT = ("FLEXCOMP_BACKEND", "TRITON_INTERPRET", "FLEXCOMP_DUMP_DIR", "FLEXCOMP_DEBUG")
# Elements of one [B, H, chunk, KV_LEN] score tile of the reference backend; the chunk length follows.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class Pass(enum.Enum):
    """Which kernels a tile request is for; the value is torch's key prefix (``fwd_BLOCK_M``)."""

    FORWARD = "fwd_"
    BACKWARD = "bwd_"


# the tile keys of each pass, as torch's FlexKernelOptions names them, and the TileRequest field each fills
_TILE_FIELDS = {
    Pass.FORWARD: {"BLOCK_M": "block_m", "BLOCK_N": "block_n", "num_warps": "num_warps", "num_stages": "num_stages"},
    Pass.BACKWARD: {"BLOCK_M1": "block_m1", "BLOCK_N1": "block_n1", "BLOCK_M2": "block_m2", "BLOCK_N2": "block_n2",
                    "num_warps": "num_warps", "num_stages": "num_stages", "BWD_SPLIT": "split"},
}


@dataclass(frozen=True)
class TileRequest:
    """What ``kernel_options`` asked of one pass's tiles; None: the plan chooses.

    ``keys`` maps each given field to the ``kernel_options`` key it came from (``"bwd_BLOCK_M2"``),
    so an error names what the user wrote. A ``fwd_`` / ``bwd_`` key wins over the plain one.

    >>> Options.parse({"BLOCK_M": 64, "fwd_BLOCK_M": 32, "BACKEND": "reference"}).forward.block_m
    32
    """

    block_m: Optional[int] = None
    block_n: Optional[int] = None
    block_m1: Optional[int] = None
    block_n1: Optional[int] = None
    block_m2: Optional[int] = None
    block_n2: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    split: Optional[bool] = None
    keys: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse(kernel_options: Mapping[str, Any], which: Pass) -> "TileRequest":
        """The request for pass ``which`` from a checked ``kernel_options`` dict."""
        values, keys = {}, {}
        for key, name in _TILE_FIELDS[which].items():
            for k in (key, which.value + key):  # the prefixed form last: it wins
                if k in kernel_options:
                    values[name], keys[name] = kernel_options[k], k
        return TileRequest(**values, keys=tuple(sorted(keys.items())))

    def key_of(self, name: str) -> str:
        """The ``kernel_options`` key that set field ``name`` (its plain key if none did)."""
        plain = {v: k for fields in _TILE_FIELDS.values() for k, v in fields.items()}
        return dict(self.keys).get(name, plain.get(name, name))


@dataclass(frozen=True)
class Sources:
    """Where generated Triton sources go: ``dump_dir`` (``FLEXCOMP_DUMP_DIR``; None: a per-process
    temporary folder) and ``echo`` (``FLEXCOMP_DEBUG=1``: print each as it is generated)."""

    dump_dir: Optional[str] = None
    echo: bool = False

    @staticmethod
    def from_env() -> "Sources":
        """The environment's settings, now."""
        return Sources(os.environ.get("FLEXCOMP_DUMP_DIR") or None,
                       os.environ.get("FLEXCOMP_DEBUG", "0") not in ("", "0"))


class Backend(enum.Enum):
    """Where attention runs."""

    REFERENCE = "reference"  # torch ops from the IR, chunked; any device; the oracle
    TRITON = "triton"  # generated Triton kernels (flexcomp.codegen)


# torch's FlexKernelOptions keys: accepted so research code runs unchanged. They tune torch's
# Inductor kernels and have no meaning for the reference backend.
TORCH_KERNEL_OPTIONS = frozenset({
    "num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ",
    "FORCE_USE_FLEX_ATTENTION", "USE_TMA", "kpack", "matrix_instr_nonkdim", "waves_per_eu",
    "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE", "OUTPUT_MAX",
})
FLEXCOMP_KERNEL_OPTIONS = frozenset({"BACKEND", "CHUNK_ELEMENTS", "DETERMINISTIC", "FAST_TANH"})
# flexcomp's own tuning keys: passed to the Triton backend's configs with torch's
FLEXCOMP_TUNING_OPTIONS = frozenset({"BWD_SPLIT"})


@dataclass(frozen=True)
class Options:
    """What ``kernel_options`` asked for.

    Fields:
        backend: the chosen :class:`Backend` (None: choose by device).
        chunk_elements: score-tile size of the reference backend (memory bound).
        deterministic: captured-tensor gradients bit-identical run to run (Triton backend: fixed-point
            accumulation instead of float atomics; the reference backend always is).
        forward, backward: the tiles asked of the forward and the backward kernels.
        interpret: ``TRITON_INTERPRET=1`` was set: the Triton backend runs in Triton's CPU
            interpreter (it must have been set before the kernels were defined, as Triton wants).
        sources: where generated sources are written.
        family: the forward's kernel family asked for (``"decode"``: torch's ``BACKEND="TRITON_DECODE"``;
            ``"prefill"``: ``FORCE_USE_FLEX_ATTENTION=True``; None: chosen by the problem's shape).
        fast_tanh: ``FAST_TANH`` (default True): with float16 / bfloat16 inputs, the Triton backend's
            score_mods compute ``tanh`` (soft-capping, ``gelu(approximate="tanh")``, ``mish``) with the
            hardware's instruction, relative error at most 2**-11, about the inputs' rounding; False:
            libdevice's (float32 inputs always are).
    """

    backend: Optional[Backend] = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    deterministic: bool = False
    forward: TileRequest = field(default_factory=TileRequest)
    backward: TileRequest = field(default_factory=TileRequest)
    interpret: bool = False
    sources: Sources = field(default_factory=Sources)
    family: Optional[str] = None
    fast_tanh: bool = True

    @staticmethod
    def parse(kernel_options: Optional[Mapping[str, Any]]) -> "Options":
        """Validate torch's ``kernel_options`` dict and convert it.

        Every key is checked for its type (as torch's ``FlexKernelOptions`` declares it): ints
        (``BLOCK_M``, ``num_warps``, ... and their ``fwd_`` / ``bwd_`` forms, ``CHUNK_ELEMENTS``),
        bools (``PRESCALE_QK``, ``WRITE_DQ``, ..., ``DETERMINISTIC``, ``BWD_SPLIT``, ``FAST_TANH``) and the
        ``BACKEND`` string; an error names the key, what was expected and what came. As torch:
        ``OUTPUT_LOGSUMEXP`` / ``OUTPUT_MAX`` are internal (AssertionError), and ``BACKEND`` with
        ``FORCE_USE_FLEX_ATTENTION`` is a RuntimeError.

        >>> Options.parse({"BACKEND": "reference"}).backend
        <Backend.REFERENCE: 'reference'>
        >>> Options.parse({"BLOCK_M": "64"})
        Traceback (most recent call last):
        flexcomp.errors.FlexcompTypeError: kernel_options['BLOCK_M'] must be an int (a power of two), got '64' (str)

        A parse is kept per dict content (keys, values and their types) and environment, so a
        training loop's repeated calls cost one lookup; dicts holding unhashable values are parsed
        every time.
        """
        env = tuple(os.environ.get(name) for name in _ENVIRONMENT)
        try:
            key = ("options", env, None if kernel_options is None else
                   tuple((k, type(v), v) for k, v in kernel_options.items()))
            hash(key)
        except (TypeError, AttributeError):  # not a dict, or unhashable values: no keeping (parse says why)
            return Options._parse(kernel_options)
        return CACHE.get_or_make(key, lambda: Options._parse(kernel_options))

    @staticmethod
    def _parse(kernel_options: Optional[Mapping[str, Any]]) -> "Options":
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if kernel_options is None:
            return Options(backend=_parse_backend(os.environ.get("FLEXCOMP_BACKEND"), "FLEXCOMP_BACKEND"),
                           interpret=interpret, sources=Sources.from_env())
        if not isinstance(kernel_options, Mapping):
            raise FlexcompTypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
        for k in kernel_options:
            if not isinstance(k, str):
                raise FlexcompTypeError(f"kernel_options keys must be str, got {k!r} ({type(k).__name__})")
        for k in ("OUTPUT_LOGSUMEXP", "OUTPUT_MAX"):
            if k in kernel_options:
                raise FlexcompAssertionError(
                    f"{k} must not be in kernel_options: flex_attention sets it (ask for the LSE or the row max "
                    f"with return_aux=AuxRequest(lse=True, max_scores=True))")
        known = (TORCH_KERNEL_OPTIONS - {"OUTPUT_MAX"}) | FLEXCOMP_KERNEL_OPTIONS | FLEXCOMP_TUNING_OPTIONS
        unknown = [k for k in kernel_options
                   if k not in known and not (k[:4] in ("fwd_", "bwd_") and k[4:] in TORCH_KERNEL_OPTIONS)]
        if unknown:
            raise FlexcompError(
                f"kernel_options has unknown keys {unknown}; expected flexcomp's "
                f"{sorted(FLEXCOMP_KERNEL_OPTIONS | FLEXCOMP_TUNING_OPTIONS)} "
                f"or torch's FlexKernelOptions keys ({', '.join(sorted(known - FLEXCOMP_KERNEL_OPTIONS - FLEXCOMP_TUNING_OPTIONS))})")
        # the types torch's FlexKernelOptions declares; ints > 0 except ROCm's, which take 0 for "default"
        positive = {"num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2",
                    "SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE", "CHUNK_ELEMENTS"}
        non_negative = {"kpack", "matrix_instr_nonkdim", "waves_per_eu"}
        flags = {"PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
                 "USE_TMA", "DETERMINISTIC", "BWD_SPLIT", "FAST_TANH"}
        for k, v in kernel_options.items():
            base = k[4:] if k[:4] in ("fwd_", "bwd_") and k[4:] in TORCH_KERNEL_OPTIONS else k
            if base in positive | non_negative:
                what = "a power of two" if base.startswith("BLOCK_") else "> 0" if base in positive else ">= 0"
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise FlexcompTypeError(f"kernel_options[{k!r}] must be an int ({what}), got {v!r} ({type(v).__name__})")
                if v < (1 if base in positive else 0):
                    raise FlexcompError(f"kernel_options[{k!r}] must be an int {'> 0' if base in positive else '>= 0'}, "
                                        f"got {v}")
            elif base in flags and not isinstance(v, bool):
                raise FlexcompTypeError(f"kernel_options[{k!r}] must be True or False, got {v!r} ({type(v).__name__})")
        if "BACKEND" in kernel_options and kernel_options.get("FORCE_USE_FLEX_ATTENTION", False):
            raise FlexcompRuntimeError(
                "BACKEND cannot be combined with legacy FORCE_USE_FLEX_ATTENTION (torch refuses it too): drop "
                f"FORCE_USE_FLEX_ATTENTION and keep BACKEND={kernel_options['BACKEND']!r}")
        if "BACKEND" in kernel_options and kernel_options["BACKEND"] in (None, ""):
            raise FlexcompTypeError(f"kernel_options['BACKEND'] must be 'reference', 'triton' or 'auto' (or torch's "
                                    f"'AUTO', 'TRITON'...), got {kernel_options['BACKEND']!r}; leave the key out for "
                                    f"the default")
        backend = _parse_backend(kernel_options.get("BACKEND"), "kernel_options['BACKEND']")
        if backend is None:
            backend = _parse_backend(os.environ.get("FLEXCOMP_BACKEND"), "FLEXCOMP_BACKEND")
        chunk = int(kernel_options.get("CHUNK_ELEMENTS", DEFAULT_CHUNK_ELEMENTS))
        deterministic = kernel_options.get("DETERMINISTIC", False)
        family = None
        if str(kernel_options.get("BACKEND", "")).strip().lower() == "triton_decode":
            family = "decode"
        elif kernel_options.get("FORCE_USE_FLEX_ATTENTION", False):
            family = "prefill"
        return Options(backend, chunk, deterministic, TileRequest.parse(kernel_options, Pass.FORWARD),
                       TileRequest.parse(kernel_options, Pass.BACKWARD), interpret, Sources.from_env(), family,
                       kernel_options.get("FAST_TANH", True))


def _parse_backend(value: Optional[str], source: str) -> Optional[Backend]:
    """``"reference"`` / ``"triton"`` (any case, torch's ``"TRITON"``, ``"FLASH"``, ``"TRITON_DECODE"``),
    or None for ``"auto"`` / unset; anything else names ``source`` and what came."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise FlexcompTypeError(f"{source} must be 'reference', 'triton' or 'auto' (a str), got {value!r} "
                                f"({type(value).__name__})")
    v = value.strip().lower()
    if v == "auto":
        return None
    if v in ("flash", "triton_decode"):
        v = "triton"  # torch's other kernel families: flexcomp's generated kernels serve them
    if v in ("reference", "triton"):
        return Backend(v)
    raise FlexcompError(f"{source} must be 'reference', 'triton' or 'auto', got {value!r}")


def choose_backend(options: Options, device) -> Backend:
    """The backend for tensors on ``device`` (a ``torch.device``): the asked one, else by device."""
    if options.backend is not None:
        return options.backend
    return Backend.TRITON if device.type == "cuda" else Backend.REFERENCE


