"""``ParallelStyle``\\ s that PyTorch does not ship, for what the 1-D plan splits: all DTensor, no communication of our own.

* :class:`ReplicatedParallel` — a layer computed whole on every rank inside a tensor-parallel
  region: the k/v projections of grouped-query attention with fewer kv heads than ranks. Its
  parameters become ``Replicate()`` DTensors; its output is a ``Replicate()`` DTensor whose
  gradient is brought back to ``Replicate()`` by DTensor (``DTensor.from_local``'s backward
  redistributes to the forward placement: an all-reduce when the gradient arrives ``Partial``).
  Without that the weight's gradient would be stored ``Partial`` (one rank's share) in
  ``param.grad``::

      before: k = k_proj(x)                          # x: Replicate DTensor; plain weight
      after:  k = from_local(linear(x, W_R).to_local(), [Replicate()])   # W_R: Replicate DTensor
              backward: grad_k Partial --all_reduce--> Replicate → grad W_R Replicate

* :class:`VirtualHeadsParallel` — the k/v projections of grouped-query attention with 1 < kv
  heads < ranks: the weight ``Replicate()``, each rank computing only the kv head its q heads use
  (real head ``r // (N / kv)``), returned as its shard of a ``Shard(-1)`` DTensor — N *virtual*
  heads, ``repeat_interleave(k, N / kv)`` globally. Both the weight's and the input's local
  gradients are this rank's share and are declared ``Partial``; DTensor sums them (the weight's
  by a ``from_local`` hop: one all-reduce in backward, so ``param.grad`` is ``Replicate()``)::

      before: k = k_proj(x)                                   # [B, T, kv * hd], one process
      after:  k_r = x_local @ W_local[rows of head r // (N/kv)].T   # [B, T, hd] on rank r
              k = from_local(k_r, [Shard(-1)])                # global [B, T, N * hd]
              backward: grad W (Partial) --all_reduce--> Replicate; grad x Partial (summed with q's)

* :class:`Conv1DColwiseParallel` / :class:`Conv1DRowwiseParallel` — ``ColwiseParallel`` /
  ``RowwiseParallel`` for ``transformers.pytorch_utils.Conv1D`` (GPT-2: weight ``[in, out]``,
  ``y = x @ W + b``): the output features are dim 1 of the weight (column-wise: weight
  ``Shard(1)``, bias ``Shard(0)``), the input features dim 0 (row-wise: weight ``Shard(0)``, bias
  ``Replicate()``). ``fused=k`` splits a layer whose output is k blocks side by side (GPT-2's
  ``c_attn`` = q | k | v) so that every rank gets its slice of *each* block: weight
  ``_StridedShard(1, split_factor=k)``, bias ``_StridedShard(0, split_factor=k)`` — the placement
  whose local tensor is ``[q_r | k_r | v_r]`` and whose ``full_tensor()`` (and state dict, and
  ``torch.distributed.checkpoint``) is the original ``[in, 3d]`` weight.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel


def is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (matched by class name: transformers is optional)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def strided_shard(dim: int, split_factor: int):
    """``_StridedShard(dim, split_factor=k)`` (private in torch; present in 2.11 and 2.13), or ``Shard(dim)`` for k = 1."""
    if split_factor == 1:
        return Shard(dim)
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=split_factor)


class ReplicatedParallel(ParallelStyle):
    """Compute a layer whole on every rank, with DTensor input and output (see the module docstring)."""

    def __init__(self, *, use_local_output: bool = False):
        super().__init__()
        self.use_local_output = use_local_output

    @staticmethod
    def _partition_fn(name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()]),
                                                          requires_grad=param.requires_grad))

    @staticmethod
    def _input_fn(mod, inputs, device_mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
        elif x.placements != (Replicate(),):
            x = x.redistribute(placements=[Replicate()])
        return (x, *inputs[1:])

    @staticmethod
    def _output_fn(use_local_output, mod, output, device_mesh):
        # to_local / from_local: the forward is the same Replicate DTensor; in backward,
        # from_local redistributes the gradient to Replicate (all-reduce of a Partial gradient)
        output = DTensor.from_local(output.to_local(), device_mesh, [Replicate()], run_check=False)
        return output.to_local() if use_local_output else output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition_fn, self._input_fn,
                                 partial(self._output_fn, self.use_local_output))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"


class VirtualHeadsParallel(ParallelStyle):
    """k/v of grouped-query attention with 1 < kv heads < ranks: one *virtual* kv head per rank.

    The weight stays whole (``Replicate()``) on every rank; rank r computes only the head its q
    heads use, real kv head ``r // (N / kv)``, and returns it as its shard of a ``Shard(-1)``
    DTensor. Globally that output is ``repeat_interleave(k, N / kv)`` over heads — N virtual
    heads — so q split by heads (q head h on rank ``h // (H / N)``) meets virtual head
    ``h // (H / N)`` = real head ``h // (H / kv)``, what grouped-query attention (SDPA's
    ``enable_gqa``) pairs it with in one process: exact. See the module docstring.
    """

    def __init__(self, *, kv_heads: int, head_dim: int, use_local_output: bool = False):
        super().__init__()
        self.kv_heads, self.head_dim, self.use_local_output = kv_heads, head_dim, use_local_output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"VirtualHeadsParallel splits nn.Linear, got {type(module).__name__}")
        n = device_mesh.size()
        if n % self.kv_heads or module.out_features != self.kv_heads * self.head_dim:
            raise ValueError(f"VirtualHeadsParallel: {module.out_features} output features are not {self.kv_heads} "
                             f"kv heads of {self.head_dim}, or {n} ranks are not a multiple of {self.kv_heads} kv heads")
        head = device_mesh.get_local_rank() // (n // self.kv_heads)
        rows = slice(head * self.head_dim, (head + 1) * self.head_dim)
        module = distribute_module(module, device_mesh, ReplicatedParallel._partition_fn,
                                   ReplicatedParallel._input_fn, None)
        # nn.Linear's forward computes the whole projection; this instance computes its head only
        module.forward = partial(_virtual_head_forward, module, device_mesh, rows, self.use_local_output)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kv_heads={self.kv_heads}, head_dim={self.head_dim}, " \
               f"use_local_output={self.use_local_output})"


def _partial_grad_local(param: DTensor, device_mesh):
    """The local tensor of a ``Replicate()`` parameter whose gradient, one rank's share (``Partial``),
    DTensor sums over the ranks before it reaches ``param.grad``.

    ``to_local(grad_placements=[Partial()])`` says the gradient is a share; the ``from_local`` in
    front of it brings it back to ``Replicate()`` in backward (its backward redistributes to the
    forward placement: one all-reduce). Without that hop ``param.grad`` would hold a ``Partial``
    DTensor and the optimizer would step on one rank's share.
    """
    whole = DTensor.from_local(param.to_local(), device_mesh, [Replicate()], run_check=False)
    return whole.to_local(grad_placements=[Partial()])


def _virtual_head_forward(module: nn.Linear, device_mesh, rows: slice, use_local_output: bool, x):
    # x: a Replicate DTensor (the input hook); its gradient from this rank's head is a share too
    x_local = x.to_local(grad_placements=[Partial()])
    weight = _partial_grad_local(module.weight, device_mesh)[rows]
    bias = _partial_grad_local(module.bias, device_mesh)[rows] if module.bias is not None else None
    out = DTensor.from_local(F.linear(x_local, weight, bias), device_mesh, [Shard(-1)], run_check=False)
    return out.to_local() if use_local_output else out


class Conv1DColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for GPT-2's ``Conv1D``: weight ``Shard(1)`` (``_StridedShard`` when ``fused``)."""

    def __init__(self, *, fused: int = 1, replicate_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.fused = fused
        # the bias whole on every rank (Replicate): DTensor slices it for addmm (local) and gathers
        # its gradient in backward. Used under FSDP2, whose dim-0 shard of a _StridedShard(0) bias
        # does not compose (docs/shard.md, "GPT-2's Conv1D under FSDP2")
        self.replicate_bias = replicate_bias

    def _partition_conv1d_fn(self, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            dim = 1 if pname == "weight" else 0  # weight [in, out], bias [out]
            placement = Replicate() if pname == "bias" and self.replicate_bias else strided_shard(dim, self.fused)
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param, device_mesh, [placement]),
                                                          requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not is_conv1d(module):
            return super()._apply(module, device_mesh)
        output_fn = partial(self._prepare_output_fn, self.output_layouts, self.use_local_output)
        if self.fused > 1:
            # the output is _StridedShard(-1, split_factor=k): rank r holds [q_r | k_r | v_r];
            # redistributing it to Shard(-1) would move data. Kept as it is.
            output_fn = partial(self._fused_output_fn, self.use_local_output)
        return distribute_module(module, device_mesh, self._partition_conv1d_fn,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 output_fn)

    @staticmethod
    def _fused_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.to_local() if use_local_output else outputs

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", fused={self.fused}" + (", replicate_bias=True)" if self.replicate_bias else ")")


class Conv1DRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for GPT-2's ``Conv1D``: weight ``Shard(0)``, bias ``Replicate()``."""

    def _partition_conv1d_fn(self, name, module, device_mesh):
        module.register_parameter("weight", nn.Parameter(distribute_tensor(module.weight, device_mesh, [Shard(0)]),
                                                         requires_grad=module.weight.requires_grad))
        if getattr(module, "bias", None) is not None:
            module.register_parameter("bias", nn.Parameter(distribute_tensor(module.bias, device_mesh, [Replicate()]),
                                                           requires_grad=module.bias.requires_grad))

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not is_conv1d(module):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)  # x @ W with W split on its input features
        return distribute_module(module, device_mesh, self._partition_conv1d_fn,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))
