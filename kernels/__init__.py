"""fastkd.kernels: Triton kernels (installed from the top-level kernels/ folder as the subpackage fastkd.kernels)."""
