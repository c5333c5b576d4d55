"""fxmem: graph-level memory passes for PyTorch.

``torch.compile(model, backend="fxmem", options={...})`` works without importing this package
(the backend is registered through an entry point). The public API is below and nothing else.
"""

from fxmem.backend import backend
from fxmem.config import FxmemConfig, OptionError, parse_options
from fxmem.distill import distill
from fxmem.fit import FitError, FitResult, fit  # fxmem.fit is this function: import helpers with "from fxmem.fit import ..."
from fxmem.freeze import StaleWeightsError
from fxmem.pipeline import PassFailure, PassResult
from fxmem.report import Report, explain, optimize
from fxmem.verify import VerificationError

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fxmem.shard`` (plan / apply, docs/shard.md) is imported on first use: it loads DTensor's
    and pipelining's machinery, which a compile does not need, and ``backend="fxmem"`` imports
    this package inside the user's first ``torch.compile`` call (a restarted run served by
    AOTAutograd's cache spends most of its compile time importing)."""
    if name == "shard":
        import importlib

        return importlib.import_module("fxmem.shard")
    raise AttributeError(f"module 'fxmem' has no attribute {name!r}")


__all__ = [
    "backend", "explain", "optimize", "Report", "distill", "fit", "FitResult", "FitError",
    "FxmemConfig", "parse_options", "OptionError", "PassFailure", "PassResult",
    "StaleWeightsError", "VerificationError", "shard", "__version__",
]
