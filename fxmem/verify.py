"""``verify=True``: run eager once beside the compiled graph and raise on mismatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from fxmem.config import VerifyConfig


class VerificationError(AssertionError):
    """The compiled graph's outputs differ from eager's beyond the tolerance."""


def compare_outputs(expected: Any, actual: Any, config: VerifyConfig, what: str) -> None:
    """``torch.testing.assert_close`` over two output pytrees, re-raised as VerificationError."""
    exp_leaves = torch.utils._pytree.tree_leaves(expected)
    act_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(exp_leaves) != len(act_leaves):
        raise VerificationError(f"fxmem verify: {what} returned {len(act_leaves)} outputs, eager {len(exp_leaves)}")
    for i, (e, a) in enumerate(zip(exp_leaves, act_leaves)):
        if not isinstance(e, torch.Tensor):
            continue
        try:
            torch.testing.assert_close(a.detach(), e.detach(), atol=config.atol, rtol=config.rtol,
                                       check_dtype=True)
        except AssertionError as err:
            raise VerificationError(f"fxmem verify: output {i} of {what} differs from eager:\n{err}") from None


def verify_outputs(eager_gm: fx.GraphModule, compiled: Callable, config: VerifyConfig) -> Callable:
    """Wrap ``compiled`` so its first call also runs ``eager_gm`` on the same inputs and compares.

    Random ops see the same generator state in both runs (the state is restored between them).
    """
    state = {"checked": False}

    def run(*args: Any) -> Any:
        if state["checked"]:
            return compiled(*args)
        rng = torch.get_rng_state()
        out = compiled(*args)
        torch.set_rng_state(rng)
        with torch.no_grad():
            ref = eager_gm(*args)
        state["checked"] = True
        compare_outputs(ref, out, config, "the fxmem-compiled graph")
        return out

    return run
