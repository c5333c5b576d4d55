"""Triton kernels: hand-written ones (:mod:`fxmem.kernels.int8_matmul`) and the code generator for
fused regions (:mod:`fxmem.kernels.codegen`), with their ``torch.library`` registrations and CPU
paths. Importing this package does not import Triton."""
