"""fastkd.kernels: the fused distillation losses (installed from the top-level kernels/ folder as the subpackage
fastkd.kernels): Triton kernels on CUDA, a native C++ kernel on the CPU. Triton is imported only where a Triton
kernel is launched."""
