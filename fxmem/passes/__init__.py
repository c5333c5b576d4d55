from fxmem.pipeline import PassResult, UnsupportedGraph  # noqa: F401  (the pass contract)
