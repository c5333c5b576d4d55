"""What one pp × dp rank holds during ``schedule.step``: the schedule replayed over FSDP2's units.

A pipeline stage ``fully_shard``-ed over ``dp`` ranks (:meth:`fxmem.shard.pipeline.PipelinePlan.build`)
does not hold "its parameters / dp" during a step. ``torch.distributed.pipelining`` runs every
microbatch's backward with FSDP2's resharding after backward and its gradient sync off
(``_PipelineStageBase.backward_maybe_with_nosync``, torch 2.11 and 2.13) and reduces after the last
one (``perform_reduce_grad``). So, read from FSDP2's code (``_fsdp_param_group``, ``_fsdp_collectives``,
``_fsdp_param``), per rank::

    forward of unit u     all-gather: a flat output (u's bytes, in the compute dtype), copied out
                          into u's unsharded parameters (again u's bytes); the flat buffer freed;
                          u resharded after its forward (blocks: ``reshard_after_forward=True``)
    backward of unit u    u all-gathered unless still gathered from an earlier backward; in its
                          pre-backward the next unit's all-gather is issued (prefetch): its flat
                          output, and on gloo a flat copy ``ProcessGroupGloo`` makes of it; u
                          stays gathered after its backward (resharding after backward is off);
                          its gradients are made whole (unsharded) and accumulate over the
                          microbatches — with ``MixedPrecisionPolicy`` made in the compute dtype
                          and cast into float32 accumulators at the unit's post-backward (from
                          the second microbatch on, the unit's low-precision gradients exist
                          beside the accumulators until then)
    reduce (after the     per unit: its gathered parameters freed, its whole gradients copied
    last backward)        into the reduce-scatter's flat input (float32), then freed; the
                          shard they reduce to kept
    the root unit         (parameters no block holds: embeddings, final norm, head) gathered at
                          the first forward and kept until the reduce (FSDP2 keeps the root
                          unsharded after forward)

:func:`step_peak` replays a stage's schedule (:func:`order`: GPipe's M forwards then M backwards;
1F1B's warm-up forwards, then backward / forward pairs, then the remaining backwards) over those
events, with each microbatch's saved activations held from its unit's forward to its unit's
backward, and returns the largest live total. What it does not count: the backward's own
temporaries (the gradient of each activation while its node runs), FSDP2's dim-0 padding, and a
collective's buffer whose last reference a communication thread drops later than the main thread
(a race: docs/shard.md). The rank's parameter shard, its boundary buffers and its sharded gradients
after the reduce are added by the caller (:attr:`fxmem.shard.pipeline.Stage.bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit of a stage (a block, or the part of a block the stage holds; the root's
    parameters before and after the blocks are two of these): its parameters' bytes as the rank
    keeps them (``master``: the float32 masters the gradients accumulate in), as they are
    all-gathered and computed (``gathered``: the compute dtype), and the activations its forward
    saves per microbatch."""

    master: int
    gathered: int
    activations: int


def order(schedule: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The stage's actions in one ``schedule.step``: ``("F", m)`` / ``("B", m)``, as
    ``ScheduleGPipe`` / ``Schedule1F1B`` run them (torch 2.11 and 2.13: 1F1B warms up with
    ``min(M, S - s)`` forwards, then alternates backward and forward, then drains the backwards)."""
    if schedule == "gpipe":
        return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]
    warmup = min(microbatches, stages - stage)
    out = [("F", m) for m in range(warmup)]
    f = warmup
    for b in range(microbatches):
        out.append(("B", b))
        if f < microbatches:
            out.append(("F", f))
            f += 1
    return out


def step_peak(prefix: Unit, blocks: list[Unit], suffix: Unit, actions: list[tuple[str, int]], dp: int,
              collective_copy: bool, loss_activations: int = 0) -> int:
    """The largest bytes live in the stage's step beyond its parameter shard and boundary buffers
    (the largest of :func:`replay`'s totals)."""
    return max(live for _, live in replay(prefix, blocks, suffix, actions, dp, collective_copy, loss_activations))


def replay(prefix: Unit, blocks: list[Unit], suffix: Unit, actions: list[tuple[str, int]], dp: int,
           collective_copy: bool, loss_activations: int = 0) -> list[tuple[str, int]]:
    """``(event, bytes live)`` at each moment the live total may peak, in step order (beyond the
    rank's parameter shard and boundary buffers).

    ``prefix`` / ``suffix``: the root unit's parameters (and their activations) before and after
    the blocks (``Unit(0, 0, 0)`` where there are none); ``blocks``: the block units in forward
    order; ``actions``: :func:`order`; ``collective_copy``: the backend copies an all-gather's
    output (gloo); ``loss_activations``: what the loss saves per microbatch on the last stage (its
    backward runs before the root's pre-backward hook). See the module docstring for the events.
    """
    low_grads = any(u.gathered != u.master for u in (prefix, *blocks, suffix))
    root = prefix.gathered + suffix.gathered
    n = len(blocks)
    gathered: set[int] = set()
    root_gathered = False
    acts: dict[int, int] = {}
    grads = 0             # unsharded gradients (float32 accumulators), whole
    backward_done = False
    events: list[tuple[str, int]] = []

    def at(label: str, extra: int = 0) -> None:
        events.append((label, live(extra)))

    def made(unit: Unit) -> int:
        """The gradients a unit's backward makes beside its saved activations (not yet freed).
        With mixed precision: the unit's gradients in the compute dtype, a separate allocation,
        every backward, until its post-backward casts them into (first backward) or adds them into
        (later ones) the float32 accumulators parameter by parameter. Without it autograd makes
        the accumulators themselves on the first backward, as the nodes that free the activations
        run (counted once they are freed), and later adds each parameter's new gradient into them
        as it is made (a one-parameter transient): none. Measured: counting the fp32 gradients
        beside all the activations over-counts HF Llama's GPipe stage by 0.6%; leaving out the
        bf16 ones under-counts the GPT's by 8%."""
        return unit.gathered if low_grads else 0

    def live(extra: int = 0) -> int:
        return ((root if root_gathered else 0) + sum(blocks[k].gathered for k in gathered) + sum(acts.values())
                + grads + extra)

    def issue(gathered_bytes: int) -> int:
        """An all-gather being issued: its flat output, gloo's copy of it, and with mixed
        precision the rank's shard cast to the compute dtype (the all-gather's input)."""
        cast = gathered_bytes // dp if low_grads else 0
        return (2 if collective_copy else 1) * gathered_bytes + cast

    def gather(label: str, gathered_bytes: int) -> None:
        """An all-gather not prefetched: issued, then copied out (flat output + parameters)."""
        at(label + " all-gather", issue(gathered_bytes))
        at(label + " copy-out", 2 * gathered_bytes)

    for kind, m in actions:
        if kind == "F":
            if not root_gathered:
                gather(f"F{m} root", root)
                root_gathered = True
            acts[m] = prefix.activations
            for k in range(n):
                if k not in gathered:
                    gather(f"F{m} unit {k}", blocks[k].gathered)
                    gathered.add(k)
                acts[m] += blocks[k].activations
                at(f"F{m} unit {k} forward")
                gathered.discard(k)                 # resharded after its forward
            acts[m] += suffix.activations + loss_activations
            at(f"F{m} end")
            continue
        # backward: the loss, the head (the root's parameters after the blocks), the blocks in
        # reverse, the embeddings (the root's before them)
        acts[m] -= loss_activations
        prefetched = None
        if suffix.master and n and n - 1 not in gathered:
            # the root's pre-backward (its output is the head's, not a block's) prefetches the
            # last block: its flat output stays until that block's copy-out
            prefetched = n - 1
            at(f"B{m} root prefetch {n - 1}", issue(blocks[n - 1].gathered))
        flat = blocks[prefetched].gathered if prefetched is not None else 0
        at(f"B{m} head gradients", flat + made(suffix))
        acts[m] -= suffix.activations
        if not backward_done:
            grads += suffix.master
        reverse = list(range(n - 1, -1, -1))
        for i, k in enumerate(reverse):
            unit = blocks[k]
            if k == prefetched:
                at(f"B{m} unit {k} copy-out", 2 * unit.gathered)
                gathered.add(k)
            elif k not in gathered:
                gather(f"B{m} unit {k}", unit.gathered)   # all-gathered in its pre-backward
                gathered.add(k)
            nxt = reverse[i + 1] if i + 1 < n else None
            prefetch = nxt is not None and nxt not in gathered
            if prefetch:   # in its pre-backward, the next unit's all-gather is issued
                at(f"B{m} unit {k} prefetch {nxt}", issue(blocks[nxt].gathered))
            flat = blocks[nxt].gathered if prefetch else 0
            at(f"B{m} unit {k} gradients", flat + made(unit))
            acts[m] -= unit.activations
            if not backward_done:
                grads += unit.master
            at(f"B{m} unit {k} backward", flat)
            if prefetch:   # the next unit's copy-out: flat output + parameters
                at(f"B{m} unit {nxt} copy-out", 2 * blocks[nxt].gathered)
                gathered.add(nxt)
        at(f"B{m} embedding gradients", made(prefix))
        if not backward_done:
            grads += prefix.master
        acts.pop(m)
        backward_done = True
        at(f"B{m} end")
    # perform_reduce_grad, unit by unit (the root first, then the blocks: FSDP2's state order): the
    # unit resharded (its parameters freed), then its whole gradients copied into the
    # reduce-scatter's flat input, then freed; the output is its shard (float32)
    sharded = 0
    for k in [None, *range(n)]:
        unit_master = prefix.master + suffix.master if k is None else blocks[k].master
        if k is None:
            root_gathered = False
        else:
            gathered.discard(k)
        at(f"reduce {'root' if k is None else f'unit {k}'}", sharded + unit_master)
        grads -= unit_master
        sharded += -(-unit_master // dp)
    return events


@dataclass(frozen=True)
class FSDPStage:
    """A stage's FSDP2 units and its schedule's actions: what :func:`step_peak` replays."""

    prefix: Unit
    blocks: tuple[Unit, ...]
    suffix: Unit
    actions: tuple[tuple[str, int], ...]
    dp: int
    collective_copy: bool   # the backend copies an all-gather's output (gloo)
    loss_activations: int = 0

    def replay(self) -> list[tuple[str, int]]:
        return replay(self.prefix, list(self.blocks), self.suffix, list(self.actions), self.dp, self.collective_copy,
                      self.loss_activations)

    def peak(self) -> int:
        return max(live for _, live in self.replay())
