"""Triton kernels: hand-written ones (int8 matmul, ...) and the code generator for fused regions
(:mod:`fxmem.kernels.codegen`). Importing this package does not import Triton."""
