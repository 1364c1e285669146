"""Compiling ahead: the kernels of a plan's first call compiled in parallel, before they launch.

Triton compiles a kernel at its first launch (its frontend, MLIR and LLVM passes, then ``ptxas``),
then builds the kernel's C launcher with ``gcc`` and loads both, one kernel after another: for a
new mod, the forward kernel at the first call and the backward's kernels at the first backward.
Measured on the H200 (``docs/performance.md``), a cold causal + soft-cap call spent about 1.5 s in
the forward's compile and 0.35 s in its launcher, then 1.6 s in the backward's three compiles and
0.6 s in two more launchers.

Here, the first call of a plan (:meth:`flexcomp.codegen.backend.TritonBackend.prepare`) starts every
kernel the call launches, and when a backward will follow, the backward's too, on a thread pool:
each compiles through Triton's ``warmup`` (Triton's passes, LLVM and ``ptxas`` release the GIL, so
the compiles overlap) while a second pool builds its launcher from the signature Triton will give
it, so ``gcc`` runs beside the compile instead of after it. The call waits for its forward's
kernels; the backward waits for its own before its first launch (:func:`wait`), so no kernel is
compiled twice at once. The launch then finds the compiled kernel in Triton's cache and its
launcher in Triton's disk cache.

Stand-in arguments: the backward's tensors do not exist at the forward, so kernels compile for
``meta`` tensors of the right dtypes and strides (``data_ptr() == 0``: the 16-byte alignment torch's
allocator gives). A launch whose real arguments specialise differently (a tensor not 16-byte
aligned, a stride that is 1 where the stand-in's is not) compiles its own kernel at the launch, as
without this: time lost, never a wrong kernel, since Triton keys its cache by the launch's own
arguments. A compile that fails here is ignored: the launch compiles again and raises the error
where it belongs. ``FLEXCOMP_COMPILE_AHEAD=0`` turns all of this off (one kernel at a time, at
launch).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

import torch

LOG = logging.getLogger(__name__)
MAX_COMPILE_THREADS = 8  # a forward and a backward launch at most four kernels; each compile holds one core
LAUNCHER_THREADS = 4  # each waits on a gcc process


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)``.

    The launch code builds these, so that what compiles ahead (:func:`start`) is exactly what runs."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def run(self) -> None:
        """Launch (compiling first if Triton has no kernel for these arguments)."""
        if not _launch_compiled(self):
            self.kernel[self.grid](*self.args, **self.kwargs)


_TRITON: Optional[tuple] = None  # (knobs, driver, compute_cache_key), imported at the first launch


def _import_triton() -> Optional[tuple]:
    global _TRITON
    try:
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import compute_cache_key
    except ImportError:
        return None
    _TRITON = (knobs, driver, compute_cache_key)
    return _TRITON


def _run_kwargs(launch: KernelLaunch, knobs) -> dict:
    """The launch's keyword arguments as ``JITFunction.run`` completes them before binding."""
    return dict(launch.kwargs, debug=launch.kwargs.get("debug", launch.kernel.debug) or knobs.runtime.debug,
                instrumentation_mode=knobs.compilation.instrumentation_mode)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set (Triton 3.6 keeps an empty ``HookChain`` when none is)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_compiled(launch: KernelLaunch) -> bool:
    """Launch ``launch`` straight through the kernel Triton compiled and loaded for its arguments,
    found as ``JITFunction.run`` finds it (the same binder and cache key); False, launching nothing,
    when there is none yet, or when launch hooks (a profiler) or pre-run hooks are set: then
    ``run`` does it all. Skipped from ``run``: its check that no global a kernel read has changed
    since its compile (flexcomp's kernels read only their constants) and the launch metadata its
    hooks would get. About half of Triton's host time per launch."""
    kernel = launch.kernel
    triton_ = _TRITON or _import_triton()
    if triton_ is None or not hasattr(kernel, "device_caches"):  # another Triton, or not a JITFunction
        return False
    knobs, driver, compute_cache_key = triton_
    runtime = knobs.runtime
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) or kernel.pre_run_hooks:
        return False
    device = driver.active.get_current_device()
    caches = kernel.device_caches.get(device)
    if caches is None:
        return False
    kernel_cache, key_cache, _, _, binder = caches
    bound_args, specialization, options = binder(*launch.args, **_run_kwargs(launch, knobs))
    compiled = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
    if compiled is None or getattr(compiled, "_run", None) is None:  # not compiled, or not yet loaded
        return False
    grid = launch.grid
    run = compiled.run  # the launcher (before reading compiled.function: as run() orders it)
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
        driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None, None,
        *bound_args.values())
    return True


def enabled() -> bool:
    """Compiling ahead is on unless ``FLEXCOMP_COMPILE_AHEAD=0``."""
    return os.environ.get("FLEXCOMP_COMPILE_AHEAD", "1") != "0"


class _Pools:
    """The compile and launcher thread pools, made on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._compile: Optional[ThreadPoolExecutor] = None
        self._launcher: Optional[ThreadPoolExecutor] = None

    def get(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        with self._lock:
            if self._compile is None:
                threads = max(1, min(MAX_COMPILE_THREADS, os.cpu_count() or 1))
                self._compile = ThreadPoolExecutor(threads, thread_name_prefix="flexcomp-compile")
                self._launcher = ThreadPoolExecutor(LAUNCHER_THREADS, thread_name_prefix="flexcomp-launcher")
            return self._compile, self._launcher


_POOLS = _Pools()
_PENDING: dict[Hashable, list[Future]] = {}
_PENDING_LOCK = threading.Lock()
_LAUNCHERS: dict[str, Future] = {}  # by C source: built once per process


def start(launches: Sequence[KernelLaunch], device: torch.device) -> list[Future]:
    """Compile each launch's kernel on the pool (and build its launcher beside it); the futures end
    when both are done. Failures stay inside the futures (the launch raises them itself)."""
    launches = [launch for launch in launches if hasattr(launch.kernel, "device_caches")]  # Triton JITFunctions
    if not launches:  # Triton's interpreter, or a test's stand-in kernel
        return []
    compile_pool, launcher_pool = _POOLS.get()
    _hash_triton_once()
    futures = []
    for launch in launches:
        _binder(launch.kernel, device)  # made here: made by two compile threads at once, one's kernels would be lost
        futures.append(compile_pool.submit(_compile, launch, device))
        source = _launcher_source(launch, device)  # while it compiles
        if source is not None:
            with _PENDING_LOCK:  # one build per launcher source (kernels of one signature share it)
                if source not in _LAUNCHERS:
                    _LAUNCHERS[source] = launcher_pool.submit(_build_launcher, source)
                futures.append(_LAUNCHERS[source])
    return futures


def defer(key: Hashable, futures: list[Future]) -> None:
    """Keep ``futures`` until :func:`wait` for ``key`` (the backward's compiles, waited for at its launch)."""
    with _PENDING_LOCK:
        _PENDING.setdefault(key, []).extend(futures)


def wait(key: Hashable) -> None:
    """Wait for the compiles deferred under ``key``, if any (one dictionary lookup otherwise)."""
    if not _PENDING:
        return
    with _PENDING_LOCK:
        futures = _PENDING.pop(key, None)
    if futures:
        wait_futures(futures)


def wait_everything() -> None:
    """Wait for every deferred compile (tests; a process that wants its compiles done)."""
    with _PENDING_LOCK:
        futures = [f for fs in _PENDING.values() for f in fs]
        _PENDING.clear()
    wait_futures(futures)


def wait_all(futures: list[Future]) -> None:
    """Wait for ``futures`` (from :func:`start`)."""
    wait_futures(futures)


def guarded(prepare: Callable[[], None]) -> None:
    """Run ``prepare`` (building stand-in launches and starting their compiles); an exception there is
    logged and dropped: compiling ahead only saves time, and the launches that follow build their
    own arguments, compile at launch and raise what is wrong where it belongs."""
    try:
        prepare()
    except Exception as e:
        LOG.debug("flexcomp: compiling ahead skipped: %r", e)


def _hash_triton_once() -> None:
    """Triton hashes its own library (about 0.4 s) at its first compile in a process; once here, not
    once per compile thread."""
    from triton.runtime.cache import triton_key
    triton_key()


def _binder(kernel, device: torch.device):
    return kernel.device_caches[_index(device)]


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _compile(launch: KernelLaunch, device: torch.device) -> None:
    try:
        with torch.cuda.device(_index(device)):
            launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    except Exception as e:  # the launch compiles again and raises it there
        LOG.debug("flexcomp: compiling ahead failed (the launch will retry): %r", e)


def _launcher_source(launch: KernelLaunch, device: torch.device) -> Optional[str]:
    """The C source Triton's CUDA launcher will build for this launch (as ``CudaLauncher`` makes it,
    from the signature ``JITFunction.run`` derives); None off CUDA or if Triton's internals differ."""
    try:
        from triton import knobs
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime.driver import driver

        if not isinstance(driver.active, nvidia.CudaDriver):
            return None
        kernel = launch.kernel
        _, _, _, backend, binder = _binder(kernel, device)
        kwargs = _run_kwargs(launch, knobs)
        bound_args, specialization, options = binder(*launch.args, **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
        src = kernel.ASTSource(kernel, signature, constexprs, attrs)
        constants = {((kernel.arg_names.index(i),) if isinstance(i, str) else i): value
                     for i, value in src.constants.items()}
        return nvidia.make_launcher(constants, dict(src.signature), None)
    except Exception as e:  # Triton's internals moved: the launch builds its launcher itself
        LOG.debug("flexcomp: no launcher source ahead: %r", e)
        return None


def _build_launcher(source: str) -> None:
    """Build (or find in Triton's cache) the launcher module; the launch loads it from the cache."""
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime.build import compile_module_from_src

        compile_module_from_src(src=source, name="__triton_launcher", library_dirs=nvidia.library_dirs(),
                                include_dirs=nvidia.include_dirs, libraries=nvidia.libraries)
    except Exception as e:
        LOG.debug("flexcomp: building a launcher ahead failed: %r", e)
