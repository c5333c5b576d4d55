"""The passes. Each imports its contract from :mod:`fxmem.passes.base` (a leaf module); the
ordered table that runs them is :data:`fxmem.pipeline.PASSES`."""

from fxmem.passes.base import KernelRecord, PassContext, PassResult, UnsupportedGraph  # noqa: F401  (the pass contract)
