"""Read-only analyses over FX graphs: sizes and storages, saved activations, liveness peak, cost."""

from fxmem.analysis.cost import GraphCost, graph_cost, is_compute_bound, node_bytes_moved, node_flops
from fxmem.analysis.liveness import PeakEstimate, estimate_peak
from fxmem.analysis.saved import (
    SavedTensor,
    describe_saved,
    measure_saved_bytes,
    saved_activation_bytes,
    saved_nodes,
)
from fxmem.analysis.sizes import (
    PARAM_META_KEY,
    is_parameter_node,
    module_parameter_bytes,
    node_bytes,
    parameter_bytes,
    storage_root,
    tensor_bytes,
    unique_storage_bytes,
)

__all__ = [
    "GraphCost", "graph_cost", "is_compute_bound", "node_bytes_moved", "node_flops",
    "PeakEstimate", "estimate_peak",
    "SavedTensor", "describe_saved", "measure_saved_bytes", "saved_activation_bytes", "saved_nodes",
    "PARAM_META_KEY", "is_parameter_node", "module_parameter_bytes", "node_bytes", "parameter_bytes",
    "storage_root", "tensor_bytes", "unique_storage_bytes",
]
