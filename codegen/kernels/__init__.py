"""The real ``@triton.jit`` kernels. Only the mod bodies they call are generated."""
