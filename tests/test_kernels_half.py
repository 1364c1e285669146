"""float16 / bfloat16 inputs through the generated Triton kernels (Triton's interpreter on CPU, the
real thing on a GPU): their score_mods take the hardware's tanh (``FloatType.F32_APPROX``, PTX
``tanh.approx.f32``), unless ``kernel_options={"FAST_TANH": False}``; its error against the dense
float64 oracle stays at the inputs' rounding, forward and backward."""
from __future__ import annotations

import pytest
import torch

from flexcomp import create_block_mask, flex_attention
from flexcomp.cache import CACHE
from flexcomp.masks import causal_mask, softcap
from flexcomp.testing import dense_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"BACKEND": "triton"}
HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
TANH_REL_ERR = 2.0**-10  # PTX's bound for tanh.approx.f32 is 2**-11 relative: twice that, for the test


def _inputs(dtype, B, H, S, D, logit_scale=1.0, seed=0):
    """q, k (scaled so logits reach ``logit_scale`` times their usual size), v and d_out."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda scale=1.0: (torch.randn(B, H, S, D, device=DEVICE, generator=g) * scale).to(dtype)  # noqa: E731
    return r(logit_scale**0.5), r(logit_scale**0.5), r(), r()


def _errors(q, k, v, d_out, score_mod, options) -> dict[str, float]:
    """Max |x - x64| / max |x64| of out, dq, dk, dv, and max |lse - lse64|, against the float64 oracle."""
    S = q.shape[2]
    bm = create_block_mask(causal_mask, None, None, S, S, device=DEVICE, BLOCK_SIZE=32)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flex_attention(*leaves, score_mod=score_mod, block_mask=bm, return_lse=True,
                              kernel_options={**TRITON, **options})
    grads = torch.autograd.grad(out, leaves, d_out)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = dense_attention(*ref, score_mod, causal_mask)
    rgrads = torch.autograd.grad(ro, ref, d_out.double())
    rel = lambda a, r: ((a.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    errs = {n: rel(a, r) for n, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ro, *rgrads))}
    errs["lse"] = (lse.double() - rl).abs().max().item()
    return errs


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_mods_take_the_hardware_tanh_unless_asked_not_to(dtype, tmp_path, monkeypatch):
    """The generated score_mod and its derivative are the ``_approx`` variants (``ops.tanh_approx``) for
    16-bit inputs, the plain ones with ``FAST_TANH=False``; both within the inputs' rounding of the oracle."""
    from flexcomp.codegen.launch import _has_hardware_tanh

    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    q, k, v, d_out = _inputs(dtype, 1, 2, 64, 16)
    hardware = _has_hardware_tanh(torch.device(DEVICE))  # the interpreter, or an NVIDIA GPU from sm_75
    for options, tanh in (({}, "ops.tanh_approx(" if hardware else "ops.tanh("), ({"FAST_TANH": False}, "ops.tanh(")):
        dump = tmp_path / str(bool(options))
        monkeypatch.setenv("FLEXCOMP_DUMP_DIR", str(dump))
        CACHE.clear()  # generated functions are kept per structure: generate them again, into dump
        errs = _errors(q, k, v, d_out, softcap(2.0), options)
        assert max(errs.values()) < tol, errs
        mods = {p.name: p.read_text() for p in dump.iterdir() if p.name.startswith(("score_mod_", "score_grad_"))}
        assert sorted(name.split("_")[1] for name in mods) == ["grad", "mod"]  # forward's and backward's
        assert all(name.endswith("_approx.py") == (hardware and not options) for name in mods), sorted(mods)
        assert all(tanh in src and src.count("ops.tanh") == src.count(tanh) for src in mods.values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cap", [5.0, 50.0])
def test_hardware_tanh_errors_stay_at_the_inputs_rounding(dtype, cap):
    """Against the float64 oracle, with logits large enough to be capped: out, dq, dk, dv with the
    hardware tanh at most 1.25 times libdevice's error; the LSE (float32) moves by at most the
    capped logits' error, ``cap * 2**-10``, beyond libdevice's."""
    q, k, v, d_out = _inputs(dtype, 2, 4, 1024, 128, logit_scale=4.0, seed=int(cap))
    fast = _errors(q, k, v, d_out, softcap(cap), {})
    exact = _errors(q, k, v, d_out, softcap(cap), {"FAST_TANH": False})
    for name in ("out", "dq", "dk", "dv"):  # a small absolute margin: max errors move a little run to run
        assert fast[name] <= 1.25 * exact[name] + 2.0**-12, (name, fast, exact)
    assert fast["lse"] <= exact["lse"] + cap * TANH_REL_ERR, (fast, exact)


def test_gpus_before_turing_keep_libdevices_tanh(monkeypatch):
    """PTX's ``tanh.approx.f32`` needs an NVIDIA GPU of compute capability 7.5: a V100 (7.0) and ROCm
    devices run libdevice's."""
    from flexcomp.codegen import launch

    monkeypatch.setattr(torch.version, "hip", None)
    try:
        for capability, hardware in (((7, 0), False), ((7, 5), True), ((9, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            CACHE.clear()
            assert launch._has_hardware_tanh(torch.device("cuda", 0)) is hardware, capability
        assert launch._has_hardware_tanh(torch.device("cpu"))  # the interpreter's tanh_approx is its formula
        monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: capability (9, 4) on an MI300, but no PTX
        assert not launch._has_hardware_tanh(torch.device("cuda", 0))
    finally:
        CACHE.clear()  # no answer from a faked capability stays for the tests after
