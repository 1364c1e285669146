"""flexcomp.codegen: the IR becomes Triton.

``lower`` turns a traced mod into the source of one small ``@triton.jit`` function, ``modules``
writes and imports it once per structure, ``kernels`` holds the real kernels that call it, and
``launch`` passes strides, captured tensors and tile configs. See docs/architecture.md.
"""
