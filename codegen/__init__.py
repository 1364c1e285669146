"""flexcomp.codegen: lowering the IR to Triton (issue 3, "Code generation").

This package is where traced score_mod / mask_mod graphs become generated ``@triton.jit`` helpers
that the real flash-attention kernels call. Until it lands, the ``triton`` backend is not
available and ``flex_attention`` says so when asked for it.
"""
