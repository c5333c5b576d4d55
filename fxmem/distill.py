"""Knowledge distillation: a pruned (or int8, or low-precision) student learns from its teacher.

``fxmem.distill(student, teacher, batches, steps)`` minimizes, per step (Hinton et al., 2015)::

    loss = α · CE(student(x), labels) + (1 − α) · T² · KL(softmax(teacher(x) / T) ‖ softmax(student(x) / T))

over the last dimension of the logits. Hard labels are optional: a batch is ``x`` or
``(x, labels)`` (``x`` a tensor or a tuple of positional arguments); without labels the loss is
``T² · KL`` alone. ``T²`` keeps the soft-target gradients on the scale of the hard-label ones
when ``T`` changes. The teacher runs in eval mode under ``no_grad``; the student's parameters
are updated by AdamW (or the ``optimizer`` given). Logits are the model's output, its
``.logits`` attribute (Hugging Face outputs) or its first element (a ``(logits, loss)`` tuple).

A module from ``fxmem.optimize(..., prune=...)`` is a valid student: its smaller weights are
``nn.Parameter`` and receive gradients.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class DistillResult:
    """Per-step losses of a distillation run (``loss = alpha · ce + (1 − alpha) · T² · kl``)."""

    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)   # empty when no batch had labels


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits``, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"fxmem.distill: cannot find logits in a model output of type {type(out).__name__}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                 *, alpha: float = 0.5, temperature: float = 2.0, ignore_index: int = -100):
    """``(loss, kl, ce)``: the distillation loss of one batch (``ce`` is None without labels)."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    t = teacher_logits.reshape(-1, v).float().detach()
    # KL(p_teacher ‖ p_student), averaged over positions
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  log_target=True, reduction="batchmean")
    soft = temperature ** 2 * kl
    if labels is None:
        return soft, kl, None
    ce = F.cross_entropy(s, labels.reshape(-1), ignore_index=ignore_index)
    return alpha * ce + (1.0 - alpha) * soft, kl, ce


def _split(batch: Any) -> tuple[tuple, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, labels = batch
        return (x if isinstance(x, tuple) else (x,)), labels
    raise TypeError("fxmem.distill: a batch is an input tensor, or (inputs, labels) with inputs a tensor or a tuple")


def _cycle(batches: Iterable | Callable[[], Any]):
    if callable(batches):
        while True:
            yield batches()
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise ValueError("fxmem.distill: batches is empty")
        yield from itertools.cycle(batches)
    yield from batches


def _own_parameters(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Give ``student`` its own copy of every parameter it shares with ``teacher``.

    ``fxmem.optimize`` freezes the model's tensors by identity, so a pruned student still holds
    the teacher's unpruned parameters (embeddings, norms, ...). Training them in place would
    change the teacher while it teaches. Ties inside the student are kept (one copy per tensor).
    """
    shared = {id(p) for p in teacher.parameters()}
    copies: dict[int, torch.nn.Parameter] = {}
    for module in student.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in shared:
                if id(p) not in copies:
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = copies[id(p)]
    return len(copies)


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable | Callable[[], Any],
    steps: int,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
) -> DistillResult:
    """Train ``student`` for ``steps`` steps to match ``teacher`` (see the module docstring).

    ``batches``: a list (cycled), an iterator, or a callable returning one batch per call. Each
    batch is ``x`` or ``(x, labels)``. Returns the per-step losses; ``student`` is trained in place.
    Parameters the student shares with the teacher are copied first: the teacher never changes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fxmem.distill: alpha={alpha!r}; accepted: a float in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"fxmem.distill: temperature={temperature!r}; accepted: a float > 0")
    if steps < 0:
        raise ValueError(f"fxmem.distill: steps={steps!r}; accepted: an int >= 0")
    _own_parameters(student, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fxmem.distill: the student has no parameters that require grad")
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    was_training = teacher.training
    teacher.eval()
    result = DistillResult()
    source = _cycle(batches)
    bar = tqdm(range(steps), desc="distill", disable=not progress, leave=False)
    try:
        for _ in bar:
            x, labels = _split(next(source))
            with torch.no_grad():
                t_logits = logits_of(teacher(*x))
            s_logits = logits_of(student(*x))
            loss, kl, ce = distill_loss(s_logits, t_logits, labels, alpha=alpha, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            result.loss.append(float(loss.detach()))
            result.kl.append(float(kl.detach()))
            if ce is not None:
                result.ce.append(float(ce.detach()))
            bar.set_postfix(loss=f"{result.loss[-1]:.4f}", kl=f"{result.kl[-1]:.4f}")
    finally:
        bar.close()
        teacher.train(was_training)
    return result


__all__ = ["distill", "distill_loss", "logits_of", "DistillResult"]
