"""fxmem: graph-level memory passes for PyTorch.

``torch.compile(model, backend="fxmem", options={...})`` works without importing this package
(the backend is registered through an entry point). The public API is below and nothing else.
"""

from fxmem import shard  # noqa: E402  (fxmem.shard.plan / apply, docs/shard.md)
from fxmem.backend import backend
from fxmem.config import FxmemConfig, OptionError, parse_options
from fxmem.distill import distill
from fxmem.fit import FitError, FitResult, fit  # fxmem.fit is this function: import helpers with "from fxmem.fit import ..."
from fxmem.freeze import StaleWeightsError
from fxmem.pipeline import PassFailure, PassResult
from fxmem.report import Report, explain, optimize
from fxmem.verify import VerificationError

__version__ = "0.1.0"

__all__ = [
    "backend", "explain", "optimize", "Report", "distill", "fit", "FitResult", "FitError",
    "FxmemConfig", "parse_options", "OptionError", "PassFailure", "PassResult",
    "StaleWeightsError", "VerificationError", "shard", "__version__",
]
