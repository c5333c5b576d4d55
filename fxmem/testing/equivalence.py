"""``assert_equivalent``: a compiled or transformed model computes what the eager model does."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree


def _loss(out: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise AssertionError("assert_equivalent(grads=True): no output requires grad")
    # a fixed, non-uniform weighting so that every output element's gradient matters
    total = 0
    for t in leaves:
        w = torch.linspace(0.5, 1.5, t.numel(), dtype=torch.float32, device=t.device).view(t.shape)
        total = total + (t.float() * w).sum()
    return total


def _run(model, args, kwargs, grads: bool, seed: int, params: list[torch.Tensor]):
    saved = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    try:
        if grads:
            out = model(*args, **kwargs)
            _loss(out).backward()
            g = {p: (None if p.grad is None else p.grad.clone()) for p in params}
        else:
            with torch.no_grad():
                out = model(*args, **kwargs)
            g = {}
    finally:
        for p in params:
            p.grad = saved[p]
    return out, g


def _parameters(model) -> list[torch.Tensor]:
    return list(model.parameters()) if isinstance(model, torch.nn.Module) else []


def assert_equivalent(
    model: torch.nn.Module,
    compiled: Any,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    grads: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> None:
    """Assert ``compiled(*args, **kwargs)`` equals ``model(*args, **kwargs)`` — outputs and grads.

    Both run from the same RNG seed (so dropout draws the same masks in both, where the compiled
    graph replays the RNG like eager). With ``grads=True`` both are differentiated through one
    fixed weighting of all outputs, and the gradients of ``model``'s parameters are compared
    (``compiled`` must share them, as ``torch.compile(model)`` does). ``atol``/``rtol`` default to
    ``torch.testing.assert_close``'s per-dtype defaults. Existing ``.grad`` values are restored.
    """
    kwargs = kwargs or {}
    # compiled shares model's parameters (as torch.compile does): gradients land on them
    params = [p for p in _parameters(model) if p.requires_grad]
    exp_out, exp_grads = _run(model, args, kwargs, grads, seed, params)
    act_out, act_grads = _run(compiled, args, kwargs, grads, seed, params)
    exp_leaves, exp_spec = pytree.tree_flatten(exp_out)
    act_leaves, act_spec = pytree.tree_flatten(act_out)
    assert exp_spec == act_spec, f"output structure differs: eager {exp_spec} vs compiled {act_spec}"
    for i, (e, a) in enumerate(zip(exp_leaves, act_leaves)):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, i=i: f"output {i}: {m}")
        else:
            assert a == e, f"output {i}: {a!r} != {e!r}"
    if grads:
        names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
        for p, g in exp_grads.items():
            got = act_grads.get(p)
            if g is None:
                assert got is None or torch.count_nonzero(got) == 0, f"grad of {names.get(p)}: eager None, compiled non-zero"
                continue
            assert got is not None, f"grad of {names.get(p)} missing in compiled"
            torch.testing.assert_close(got, g, atol=atol, rtol=rtol, msg=lambda m, n=names.get(p): f"grad of {n}: {m}")
