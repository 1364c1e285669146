"""Compiling ahead (``flexcomp.codegen.ahead``): what compiles at a plan's first call must be what
launches. On the CPU (Triton's interpreter, which compiles nothing) the stand-in launches are
checked against the launches a real forward and backward make, argument by argument, as Triton
specialises them; on a GPU, that the backward finds every kernel compiled and that the launcher
built ahead is the one Triton builds."""
from __future__ import annotations

import dataclasses
import functools
import math
import threading

import pytest
import torch
import triton
import triton.language as tl

from flexcomp import create_block_mask, flex_attention
from flexcomp.blockmask_build import _REUSE
from flexcomp.codegen import ahead, launch, launch_backward, launch_decode
from flexcomp.codegen.ahead import KernelLaunch
from flexcomp.codegen.backend import TRITON_BACKEND
from flexcomp.masks import causal_mask
from flexcomp.tiles import KernelFamily

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}
INT32 = 2**31


def _spec(x):
    """What Triton's JIT keys a kernel by, per argument: a tensor's dtype and 16-byte alignment, an
    integer's being 1, a multiple of 16 and within 32 bits; everything else (constexprs, functions,
    None) by value."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, x.data_ptr() % 16 == 0)
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return ("int", x == 1, x % 16 == 0, -INT32 <= x < INT32)
    if isinstance(x, float):
        return "float"
    if isinstance(x, tuple):
        return tuple(_spec(y) for y in x)
    return x


def _same_compile(a: KernelLaunch, b: KernelLaunch) -> None:
    assert a.kernel is b.kernel
    assert a.kwargs == b.kwargs
    assert a.grid == b.grid
    assert len(a.args) == len(b.args)
    # arguments the kernel does not specialise on (the JITFunction's, or the interpreter's jit kwargs)
    plain = getattr(a.kernel, "do_not_specialize", None) or getattr(a.kernel, "kwargs", {}).get("do_not_specialize")
    for i, (x, y) in enumerate(zip(a.args, b.args)):
        if a.kernel.arg_names[i] not in (plain or ()):
            assert _spec(x) == _spec(y), f"{a.kernel}: argument {i}: {_spec(x)} != {_spec(y)}"


def _recorded_call(monkeypatch, call):
    """Run ``call`` (a forward and its backward), recording the problem and plan the backend was
    asked to prepare and every kernel launch, in order."""
    prepared, launched = [], []
    monkeypatch.setattr(type(TRITON_BACKEND), "prepare",
                        lambda self, problem, plan, backward: prepared.append((problem, plan, backward)))
    run = KernelLaunch.run
    monkeypatch.setattr(KernelLaunch, "run", lambda self: (launched.append(self), run(self))[1])
    call()
    return prepared, launched


def _leaf(*shape, dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE, dtype=dtype) * 0.5).requires_grad_()


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def _bias_mod(score, b, h, q_idx, kv_idx, bias):
    return score + bias[h, kv_idx]


CASES = {
    "causal + soft-cap": dict(B=2, H=2, KH=2, KB=2, L=128, S=128, layout="bhsd", score=_softcap, bias=False),
    "GQA, a bias that requires grad (scatter)": dict(B=1, H=4, KH=2, KB=1, L=128, S=192, layout="bhsd", score=None,
                                                     bias=True),
    "bshd layout, keys shared over the batch": dict(B=2, H=2, KH=2, KB=1, L=128, S=128, layout="bshd",
                                                    score=_softcap, bias=False),
    "decode (split-KV and merge)": dict(B=1, H=4, KH=2, KB=1, L=8, S=512, layout="bhsd", score=_softcap,
                                        bias=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stand_in_launches_specialise_as_the_real_ones(monkeypatch, case):
    """forward_ahead / backward_ahead build, from the problem alone, launches that Triton keys like
    the real forward's and backward's (same kernels, constexprs, grids, argument specialisations)."""
    c = CASES[case]
    D = 16
    if c["layout"] == "bshd":
        q = torch.randn(c["B"], c["L"], c["H"], D, device=DEVICE).transpose(1, 2).requires_grad_()
    else:
        q = _leaf(c["B"], c["H"], c["L"], D)
    k, v = _leaf(c["KB"], c["KH"], c["S"], D), _leaf(c["KB"], c["KH"], c["S"], D)
    score = c["score"]
    if c["bias"]:
        bias = _leaf(c["H"], c["S"])
        score = functools.partial(_bias_mod, bias=bias)
    bm = create_block_mask(causal_mask, 1, 1, c["L"], c["S"], device=DEVICE, BLOCK_SIZE=64)

    def call():
        out = flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=c["H"] != c["KH"],
                             kernel_options=TRITON)
        out.backward(torch.randn_like(out))

    prepared, launched = _recorded_call(monkeypatch, call)
    assert len(prepared) == 1 and prepared[0][2], "one prepare, told that a backward follows"
    problem, plan, _ = prepared[0]
    forward = ([launch.forward_ahead(problem, plan)] if plan.family is KernelFamily.PREFILL else
               launch_decode.forward_ahead(problem, plan))
    want = [*forward, *launch_backward.backward_ahead(problem, plan)]
    assert plan.family is (KernelFamily.DECODE if "decode" in case else KernelFamily.PREFILL)
    assert [w.kernel for w in want] == [r.kernel for r in launched]
    for w, r in zip(want, launched):
        _same_compile(w, r)


@pytest.mark.parametrize("separate_full", [True, False])
def test_block_mask_kernels_compile_ahead_as_they_launch(monkeypatch, separate_full):
    """create_block_mask on the kernel path: the run tables' kernel, the classify kernel and the
    lists' kernel start compiling together, for launches keyed like the ones that then run (the
    lists' for a stand-in of the map the classify kernel fills)."""
    monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")  # the kernels (Triton's interpreter on the CPU)
    started, launched = [], []
    monkeypatch.setattr(ahead, "start", lambda launches, device: started.extend(launches) or [])
    run = KernelLaunch.run
    monkeypatch.setattr(KernelLaunch, "run", lambda self: (launched.append(self), run(self))[1])
    doc = torch.arange(320, device=DEVICE) // 96

    def ahead_doc_mask(b, h, q_idx, kv_idx):  # a structure of this test's own: its first map compiles
        return (doc[q_idx] == doc[kv_idx]) & (q_idx + 3 * b >= kv_idx)

    build = lambda: create_block_mask(ahead_doc_mask, 2, 1, 320, 320, device=DEVICE, BLOCK_SIZE=64,  # noqa: E731
                                      separate_full_blocks=separate_full)
    build()
    assert len(started) == 3 and len(launched) == 3
    for a, b in zip(started, launched):
        _same_compile(a, b)
    started.clear()
    _REUSE.clear()  # builds again (not the reuse cache's lists), compiles nothing ahead
    build()
    assert not started and len(launched) == 6


def test_varlen_packing_kernels_compile_ahead_as_they_launch(monkeypatch):
    """A packing's first build on the kernel path starts its block-kind kernel and the lists' kernel
    (that lists the kv side now and the q side when a backward first reads it) for launches keyed
    like the real ones; a later packing of the same sizes starts nothing."""
    from flexcomp import flash_attn as fa

    monkeypatch.setenv("FLEXCOMP_BACKEND", "triton")
    started, launched = [], []
    monkeypatch.setattr(ahead, "start", lambda launches, device: started.extend(launches) or [])
    run = KernelLaunch.run
    monkeypatch.setattr(KernelLaunch, "run", lambda self: (launched.append(self), run(self))[1])

    def build(lengths):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        bm = fa._build_packing(cu, cu, sum(lengths), sum(lengths), 96, 0, torch.device(DEVICE)).block_mask
        bm.q_num_blocks  # the q lists: built when first read  # noqa: B018
        return bm

    build([100, 37, 250, 93])  # 480 tokens: a size no other test packs
    assert len(started) == 2 and len(launched) == 3  # the lists' kernel: launched twice (kv, then q)
    _same_compile(started[0], launched[0])
    for lists in launched[1:]:  # one kernel for both sides (the grid says which rows are listed)
        _same_compile(started[1], dataclasses.replace(lists, grid=started[1].grid))
    started.clear()
    build([200, 280])
    assert not started and len(launched) == 6


def test_no_backward_follows_under_no_grad(monkeypatch):
    from flexcomp.codegen.kernels.forward import flex_fwd

    q, k, v = (torch.randn(1, 1, 64, 16, device=DEVICE) for _ in range(3))
    prepared, launched = _recorded_call(
        monkeypatch, lambda: flex_attention(q, k, v, score_mod=_softcap, kernel_options=TRITON))
    assert [p[2] for p in prepared] == [False]
    # the forward alone (on a GPU the every-block-full mask's build launches its own kernels first)
    assert [run.kernel for run in launched if "blockmask" not in run.kernel.fn.__module__] == [flex_fwd]


def test_deferred_compiles_are_waited_for_once():
    """``wait`` blocks until the futures deferred under its key are done, then forgets them."""
    release, done = threading.Event(), []
    pool = ahead._POOLS.get()[0]
    f = pool.submit(lambda: (release.wait(5), done.append(1)))
    ahead.defer(("test", 1), [f])
    threading.Timer(0.05, release.set).start()
    ahead.wait(("test", 1))
    assert done == [1]
    ahead.wait(("test", 1))  # nothing left: returns at once
    ahead.wait(("another key",))


def test_a_failure_while_preparing_is_left_to_the_launch(caplog):
    """Compiling ahead only saves time: what goes wrong there is logged, and the launch that follows
    (which builds its own arguments) raises it where it belongs."""
    def broken():
        raise RuntimeError("stand-in failure")

    with caplog.at_level("DEBUG", logger="flexcomp.codegen.ahead"):
        ahead.guarded(broken)
    assert "stand-in failure" in caplog.text


def test_compile_ahead_switch(monkeypatch):
    monkeypatch.setenv("FLEXCOMP_COMPILE_AHEAD", "0")
    assert not ahead.enabled()
    monkeypatch.setenv("FLEXCOMP_COMPILE_AHEAD", "1")
    assert ahead.enabled()


@pytest.mark.gpu
def test_the_backward_finds_its_kernels_compiled():
    """A new mod's first call with gradients: once the deferred compiles are done, the backward
    compiles nothing, and its gradients match the reference backend's."""
    from flexcomp.codegen.kernels.backward import flex_bwd, flex_bwd_delta

    def fresh(score, b, h, q_idx, kv_idx):  # a structure no other test compiles
        return score * 0.75 + torch.sin(score) * 0.0625 + math.pi * 1e-3

    q, k, v = (_leaf(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    bm = create_block_mask(causal_mask, 1, 1, 256, 256, device=DEVICE)
    out = flex_attention(q, k, v, score_mod=fresh, block_mask=bm, kernel_options=TRITON)
    ahead.wait_everything()
    index = torch.cuda.current_device()
    sizes = lambda: [len(f.device_caches[index][0]) for f in (flex_bwd, flex_bwd_delta)]  # noqa: E731
    before = sizes()
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    assert sizes() == before, "the backward compiled a kernel the forward did not compile ahead"
    cq, ck, cv = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = flex_attention(cq, ck, cv, score_mod=fresh, block_mask=bm, kernel_options={"BACKEND": "reference"})
    want = torch.autograd.grad(ref, (cq, ck, cv), do.float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_the_launcher_built_ahead_is_the_one_triton_builds(monkeypatch):
    """The C source compiled ahead for the forward's launcher equals what Triton's ``CudaLauncher``
    generates from the compiled kernel (otherwise gcc would run twice)."""
    from triton.backends.nvidia import driver as nvidia

    from flexcomp.codegen.kernels.forward import flex_fwd

    q, k, v = (torch.randn(1, 2, 128, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
    prepared, launched = _recorded_call(
        monkeypatch, lambda: flex_attention(q, k, v, score_mod=_softcap, kernel_options=TRITON))
    problem, plan, _ = prepared[0]
    ours = ahead._launcher_source(launch.forward_ahead(problem, plan), problem.device)
    compiled = [kern for kern in flex_fwd.device_caches[torch.cuda.current_device()][0].values()
                if kern.src.fn is flex_fwd]
    theirs = set()
    for kern in compiled:
        constants = {((flex_fwd.arg_names.index(i),) if isinstance(i, str) else i): value
                     for i, value in kern.src.constants.items()}
        theirs.add(nvidia.make_launcher(constants, dict(kern.src.signature), None))
    assert ours is not None and ours in theirs


@triton.jit
def _scaled_copy(X, Y, N, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * SCALE, mask=offs < N)


@pytest.mark.gpu
def test_launches_go_straight_to_the_compiled_kernel_unless_hooked(monkeypatch):
    """After Triton's first launch of a specialisation, ``KernelLaunch.run`` launches its compiled
    kernel directly (the same one ``JITFunction.run`` picks: a new specialisation, here another
    constexpr, goes through Triton again); with a launch hook set (a profiler) Triton launches."""
    from triton import knobs

    x = torch.randn(1000, device=DEVICE)
    y = torch.empty_like(x)
    direct = []
    real = ahead._launch_compiled
    monkeypatch.setattr(ahead, "_launch_compiled", lambda launch: direct.append(real(launch)) or direct[-1])
    for scale in (2.0, 2.0, 3.0, 3.0):
        y.zero_()
        KernelLaunch(_scaled_copy, (triton.cdiv(1000, 256),), (x, y, 1000, scale, 256)).run()
        torch.testing.assert_close(y, x * scale, rtol=0, atol=0)
    assert direct == [False, True, False, True]
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        KernelLaunch(_scaled_copy, (triton.cdiv(1000, 256),), (x, y, 1000, 2.0, 256)).run()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert direct[-1] is False and seen == ["_scaled_copy"]
