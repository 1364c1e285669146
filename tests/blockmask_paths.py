"""The two build paths of ``create_block_mask`` for the device tests (``test_blockmask_kernels``):
:class:`Paths` builds a BlockMask on the kernel path or the torch evaluator and records what the
device launchers were given; :func:`tables_on` moves a mask_mod's module-level tensors."""
from __future__ import annotations

import types

import torch
from torch.nn.attention import flex_attention as tfa

import flexcomp.codegen.blockmask as on_device
from flexcomp import create_block_mask
from flexcomp.blockmask_build import _REUSE
from flexcomp.codegen.bounds import bounds_function
from flexcomp.sparsity import classify_blocks

from test_blockmask import FIELDS, assert_same  # tests/ is on sys.path (as for variants.py)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: a GPU, or Triton's interpreter
UNKNOWN = 3  # flexcomp.sparsity.BlockKind.UNKNOWN: what the classify kernel decides


def tables_on(fn, device):
    """``fn`` (a mask_mod reading module-level tensors, as test_blockmask's ``per_head_window`` its
    ``HEAD_WIN``) reading ``device`` copies of them: torch's create_block_mask on CUDA cannot index a
    CPU tensor with CUDA indices. Where they already are on ``device``, the same tensors (``Tensor.to``
    returns them): only the function object is new."""
    scope = dict(fn.__globals__)
    for name in fn.__code__.co_names:
        if isinstance(scope.get(name), torch.Tensor):
            scope[name] = scope[name].to(device)
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)


class Paths:
    """Builds a BlockMask on one path and records what the device launchers were given."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch
        self.launches: list = []
        real_classify, real_lists = on_device.evaluate_unknown, on_device.ordered_lists
        real_fused = on_device.classify

        def evaluate_unknown(tm, grid, kind, **kw):
            self.launches.append(("classify", tuple(kind.shape), int((kind == UNKNOWN).sum())))
            return real_classify(tm, grid, kind, **kw)

        def classify(tm, grid, B, H, device, separate_full):  # bounds and evaluation in one kernel
            if bounds_function(tm) is not None:  # recorded first: the launch may raise (IndexError)
                seen = []  # the blocks left to evaluate: at most those of the torch analysis
                classify_blocks(tm, grid, B, H, device, lambda tm, grid, k: seen.append(
                    (tuple(k.shape), int((k == UNKNOWN).sum()))))
                self.launches.append(("classify", *seen[0]))
            return real_fused(tm, grid, B, H, device, separate_full)

        def ordered_lists(kind, separate_full, *BH):
            self.launches.append(("lists", tuple(kind.shape), separate_full))
            return real_lists(kind, separate_full, *BH)

        monkeypatch.setattr(on_device, "evaluate_unknown", evaluate_unknown)
        monkeypatch.setattr(on_device, "classify", classify)
        monkeypatch.setattr(on_device, "ordered_lists", ordered_lists)

    def use(self, kernels: bool) -> None:
        self.mp.setenv("FLEXCOMP_BACKEND", "triton" if kernels else "reference")

    def build(self, kernels: bool, mask_mod, B, H, Q, KV, **kw):
        """A fresh build on the kernel path (``kernels``) or the torch evaluator; checks which ran."""
        self.use(kernels)
        _REUSE.clear()
        seen = len(self.launches)
        bm = create_block_mask(mask_mod, B, H, Q, KV, device=DEVICE, **kw)
        ran = [launch[0] for launch in self.launches[seen:]]
        assert ran == (["classify", "lists"] if kernels else []), ran
        self.last = self.launches[seen:]
        return bm

    def compare(self, mask_mod, B, H, Q, KV, what="", **kw):
        """Kernel path == torch's create_block_mask == flexcomp's torch-evaluator path, every field."""
        got = self.build(True, mask_mod, B, H, Q, KV, **kw)
        want = tfa.create_block_mask(mask_mod, B, H, Q, KV, device=DEVICE, **kw)
        assert_same(got, want, f"kernels vs torch: {what} B={B} H={H} Q={Q} KV={KV} {kw}")
        launches = self.last
        evaluator = self.build(False, mask_mod, B, H, Q, KV, **kw)
        assert_same(got, evaluator, f"kernels vs torch evaluator: {what} B={B} H={H} Q={Q} KV={KV} {kw}")
        for name in FIELDS:  # the same broadcast (stride-0) dims on both paths
            a, e = getattr(got, name), getattr(evaluator, name)
            if a is not None:
                assert [s == 0 for s in a.stride()[:2]] == [s == 0 for s in e.stride()[:2]], name
        self.last = launches
        return got
