"""DTensor sharding rules fxmem adds to PyTorch: a process-wide registration, made explicitly.

DTensor has rules for the CUDA SDPA kernels but none for
``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which is what
``F.scaled_dot_product_attention`` runs on CPU. Planning (:func:`fxmem.shard.plan`, through
DTensor's propagator) and running (:func:`fxmem.shard.apply`, DTensors on CPU) both need them.

``register()`` adds them through the public ``torch.distributed.tensor.experimental.register_sharding``
— DTensor's registry is process-wide, so this is the one place fxmem changes it. Importing this
module does nothing; ``fxmem.shard.plan`` and ``fxmem.shard.apply`` call ``register()``, and
calling it again is a no-op (it checks DTensor's table, so rules someone else registered for these
ops are kept).
"""

from __future__ import annotations

import torch


def register() -> None:
    """Heads-parallel (and batch-parallel) DTensor rules for CPU flash attention.

    DTensor has rules for the CUDA SDPA kernels but none for
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which is what
    ``F.scaled_dot_product_attention`` runs on CPU. Attention is independent per head and per
    batch row, so ``Shard(0)``/``Shard(1)`` of q, k, v give the same shard of the output (and of
    the gradients). Grouped-query attention with a single kv head (``enable_gqa``: k and v have
    one head, which the CPU kernel uses for every q head) has one more: q split by heads, k and v
    replicated; in backward the kv gradients are then ``Partial`` (each rank's q heads' share,
    summed by DTensor where a replicated value is needed). Idempotent.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    if registered():
        return

    def mask_placement(mask, p):
        if mask is None:
            return None
        if p.is_shard() and mask.shape[p.dim] == 1:
            return Replicate()  # a mask broadcast over heads (or batch) is the same on every rank
        return p

    def shared_kv_head(q, k):
        return len(q.shape) == 4 and len(k.shape) == 4 and k.shape[1] == 1 and q.shape[1] > 1

    @register_sharding(fwd)
    def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
        rules = []
        for p in (Replicate(), Shard(0), Shard(1)):
            rules.append(([p, p], [p, p, p, None, None, mask_placement(attn_mask, p), None]))
        if shared_kv_head(q, k):
            # grouped-query attention with ONE kv head (the CPU kernel broadcasts it to every q
            # head): q split by heads, k/v whole on every rank; each rank's q heads use that head
            h = Shard(1)
            rules.append(([h, h], [h, Replicate(), Replicate(), None, None, mask_placement(attn_mask, h), None]))
        return rules

    @register_sharding(bwd)
    def _sdpa_cpu_backward(grad, q, k, v, out, lse, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
        rules = []
        for p in (Replicate(), Shard(0), Shard(1)):
            rules.append(([p, p, p], [p] * 6 + [None, None, mask_placement(attn_mask, p), None]))
        if shared_kv_head(q, k):
            # each rank's gradient of the shared kv head holds its own q heads' share: Partial (sum)
            h = Shard(1)
            rules.append(([h, Partial(), Partial()],
                          [h, h, Replicate(), Replicate(), h, h, None, None, mask_placement(attn_mask, h), None]))
        return rules


def registered() -> bool:
    """True when DTensor has rules for CPU flash attention (forward and backward)."""
    from torch.distributed.tensor import DTensor

    aten = torch.ops.aten
    prop = DTensor._op_dispatcher.sharding_propagator
    return all(op in prop.op_strategy_funcs for op in (aten._scaled_dot_product_flash_attention_for_cpu.default,
                                                       aten._scaled_dot_product_flash_attention_for_cpu_backward.default))
