"""The @triton.jit functions of the fused task-arithmetic-family kernel (launcher: ``fused_ta``)."""
