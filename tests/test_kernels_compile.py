"""Kernels compiled for the GPU on a machine without one.

Triton's interpreter (the CPU tests) runs kernels without compiling them, so a kernel that only the
compiler rejects would pass every CPU test. These compile kernels for Hopper (sm_90: Triton's
frontend, LLVM and the ptxas bundled with the pinned Triton) in a process without
``TRITON_INTERPRET``; no device is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_varlen_kinds_compiles_for_hopper_without_a_gpu():
    """The varlen packing kernel (``codegen/kernels/blockmask.py: varlen_kinds``) compiles to a cubin,
    with the specialisations a launch may bring (integer arguments equal to 1 become constants)."""
    script = textwrap.dedent('''
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from flexcomp.codegen.kernels import blockmask as K
        names = ["KIND", "CU_Q", "CU_K", "N", "TOTAL_Q", "NUM_KV", "LEFT", "RIGHT", "BLOCK_M", "BLOCK_N", "CHUNK",
                 "DOC_CHUNK"]
        types = ["*i8", "*i64", "*i64"] + ["i32"] * 5 + ["constexpr"] * 4
        for ones in ((), ("LEFT", "N", "TOTAL_Q")):
            sig = {n: ("constexpr" if n in ones else t) for n, t in zip(names, types)}
            consts = {"BLOCK_M": 128, "BLOCK_N": 128, "CHUNK": 1024, "DOC_CHUNK": 256, **{n: 1 for n in ones}}
            positions = {(names.index(k),): v for k, v in consts.items()}
            src = ASTSource(fn=K.varlen_kinds, signature=sig, constexprs=positions)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"]
        print("OK")
    ''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


def test_classify_by_bounds_compiles_for_hopper_without_a_gpu():
    """The fused block-map kernel (``classify_by_bounds``) with generated bounds functions
    (``flexcomp.codegen.bounds``: float64 interval arithmetic, ``//``, ``%``, float mods, captured
    numbers read at run time, point and run loads of captured tensors) compiles to a cubin, with the
    mask's plain and checked argument layouts; so does each ``runs`` kernel writing the run tables."""
    script = textwrap.dedent('''
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import flexcomp
        from flexcomp.codegen.bounds import bounds_function
        from flexcomp.codegen.kernels import blockmask as K
        from flexcomp.codegen.launch import mod_args
        from flexcomp.ir import ModKind
        from flexcomp.masks import causal_mask, dilated_sliding_window, document_mask, prefix_lm, sliding_window
        from flexcomp.trace import trace

        POINTER = {torch.int32: "*i32", torch.int64: "*i64", torch.float32: "*fp32", torch.int8: "*i8"}

        def types_of(bufs):
            return tuple(POINTER[b.dtype] if isinstance(b, torch.Tensor) else "i32" for b in bufs)

        def chunked(n):
            return lambda b, h, q, kv: (q // n) == (kv // n)

        doc = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 20, 300, 80, 12]))
        docs, scale, flags = torch.stack([doc, doc.flip(0)]), torch.tensor([0.5, -1.0]), torch.rand(512) < 0.3
        masks = [flexcomp.and_masks(causal_mask, sliding_window(100)), dilated_sliding_window(40, 3), chunked(64),
                 lambda b, h, q, kv: (q.float() * 0.37 - kv.float() * 0.61 + (h + 1).float() * 3.0) > 0.25,
                 prefix_lm(7), document_mask(doc_ids=doc), lambda b, h, q, kv: docs[b, q] == docs[b, kv],
                 lambda b, h, q, kv: (q - kv) * scale[h] < 20, lambda b, h, q, kv: flags[kv] | (q == kv)]
        names = K.classify_by_bounds.arg_names
        for m in masks:
            tm = trace(m, ModKind.MASK)
            plain = mod_args(tm, tm.graph, torch.device("cpu"))
            for checked in (False, True):
                args = mod_args(tm, tm.graph, torch.device("cpu"), checked=checked)
                types = {"KIND": "*i8", "SCALARS": "*fp64", "RUNS": "*fp64", "MASK_BUFS": types_of(args.bufs),
                         "BOUNDS_BUFS": types_of(plain.bufs),
                         **{n: "i32" for n in ("SK0", "SK1", "SK2", "NUM_Q", "NUM_KV", "HX", "Q_LEN", "KV_LEN")}}
                consts = {"BOUNDS": bounds_function(tm).fn, "MASK_MOD": args.fn, "BLOCK_M": 128, "BLOCK_N": 128,
                          "PAD_M": 128, "PAD_N": 128, "CHUNK": 16}
                sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
                src = ASTSource(fn=K.classify_by_bounds, signature=sig,
                                constexprs={(names.index(k),): v for k, v in consts.items()})
                assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
            bf = bounds_function(tm)
            if bf.runs:  # the run tables' kernel
                consts = {"BLOCK_M": 128, "BLOCK_N": 128, "PAD_M": 128, "PAD_N": 128}
                names = bf.runs_fn.arg_names
                sig = {"ARGS": types_of(plain.bufs), "RUNS": "*fp64", **{n: "constexpr" for n in consts}}
                src = ASTSource(fn=bf.runs_fn, signature=sig,
                                constexprs={(names.index(k),): v for k, v in consts.items()})
                assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
            names = K.classify_by_bounds.arg_names
        print("OK")
    ''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


def test_hardware_tanh_is_one_instruction_for_float32_only(tmp_path):
    """``ops.tanh_approx`` compiles to PTX ``tanh.approx.f32`` for float32 (the 16-bit inputs' mods)
    and to libdevice's exact tanh for float64; ``ops.tanh`` never to the approximation."""
    script = textwrap.dedent('''
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from flexcomp.codegen import ops

        @triton.jit
        def kernel(X, Y, APPROX: tl.constexpr):
            offs = tl.arange(0, 128)
            x = tl.load(X + offs)
            tl.store(Y + offs, ops.tanh_approx(x) if APPROX else ops.tanh(x))

        for t, approx, want in (("fp32", True, 1), ("fp32", False, 0), ("fp64", True, 0)):
            src = ASTSource(fn=kernel, signature={"X": "*" + t, "Y": "*" + t, "APPROX": "constexpr"},
                            constexprs={(2,): approx})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            assert ("tanh.approx.f32" in ptx) == bool(want), (t, approx)
        print("OK")
    ''')
    path = tmp_path / "tanh_ptx.py"  # Triton reads a @triton.jit function's source from its file
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
